"""Held-out evaluation: greedy pass@1 on the eval split; pass@k and maj@k from k samples.

Batches have a fixed shape (the last one wraps around), so each sampler compiles once; the
sampling key of batch b at GRPO step s is fold_in(fold_in(Stream key, s), b), so no two batches
draw the same uniforms.
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Optional

import jax
import numpy as np

from grpo_jax import rewards as rewards_lib
from grpo_jax import experiment, sharding
from grpo_jax.experiment import Experiment, Stream
from grpo_jax.rollout import to_host


class EvalResult(NamedTuple):
  accuracy: float                 # greedy, exact answer
  format: float                   # greedy completions with a "#### N" line
  accuracy_flawed_verb: Optional[float]  # arithmetic task: problems the teacher gets wrong
  accuracy_other: Optional[float]
  k: int
  pass_at_k: Optional[float]      # any of k samples right
  maj_at_k: Optional[float]       # the most common answer of k samples right
  samples: list                   # the first greedy completions, for samples.jsonl

  def figures(self) -> dict:
    out = {"eval/accuracy": self.accuracy, "eval/format": self.format}
    if self.accuracy_flawed_verb is not None:
      out["eval/accuracy_flawed_verb"] = self.accuracy_flawed_verb
      out["eval/accuracy_other"] = self.accuracy_other
    if self.pass_at_k is not None:
      out[f"eval/pass_at_{self.k}"] = self.pass_at_k
      out[f"eval/maj_at_{self.k}"] = self.maj_at_k
    return out


def answer_key(text: str):
  """The number a completion answers, or None: what maj@k votes on."""
  return rewards_lib.parse_number(rewards_lib.extract_answer(text) or "")


def _decode_batches(exp: Experiment, sampler, params, num: int, batch_size: int, key):
  """Completions of eval prompts 0..num-1, in order, batch b drawn with fold_in(key, b)."""
  ids, mask = exp.eval_prompts.ids_NxL, exp.eval_prompts.mask_NxL
  texts = []
  for b, start in enumerate(range(0, num, batch_size)):
    rows = np.arange(start, start + batch_size) % num  # fixed shape: the last batch wraps
    out = sampler(params, *exp.shard(ids[rows], mask[rows]), jax.random.fold_in(key, b))
    decoded = exp.tokenizer.decode_batch(to_host(out.tokens), to_host(out.mask))
    per_prompt = len(decoded) // batch_size
    texts += decoded[:min(batch_size, num - start) * per_prompt]
  return texts


def evaluate(exp: Experiment, params, step: int) -> EvalResult:
  e = exp.settings.eval
  params = experiment.compute_params(exp, params)
  records = exp.task.eval
  n = min(len(records), e.num_problems or len(records))
  greedy = _decode_batches(exp, exp.programs.sample_greedy, params, n, e.batch_size,
                           exp.key(Stream.EVAL_GREEDY, step))
  answers = [r["final_answer"] for r in records[:n]]
  correct = np.asarray(rewards_lib.exact_answer_reward(greedy, answers)) > 0
  flawed = np.asarray([bool(r.get("has_flawed_verb", False)) for r in records[:n]])
  split = flawed.any() and not flawed.all()
  pass_k = maj_k = None
  if exp.programs.sample_eval_k is not None and e.pass_k_problems:
    m = min(n, e.pass_k_problems)
    dp = sharding.data_parallel_size(exp.mesh)
    per_batch = max(dp, (e.batch_size // e.k) // dp * dp)  # prompts, sharded over the data axes
    texts = _decode_batches(exp, exp.programs.sample_eval_k, params, m, per_batch,
                            exp.key(Stream.EVAL_SAMPLES, step))
    groups = [texts[i * e.k:(i + 1) * e.k] for i in range(m)]
    pass_k = float(np.mean([max(rewards_lib.exact_answer_reward(g, [a] * e.k)) > 0
                            for g, a in zip(groups, answers)]))
    maj_k = float(np.mean([_majority_right(g, a) for g, a in zip(groups, answers)]))
  samples = [{"prompt": exp.task.prompt(records[i]["question"]), "completion": greedy[i],
              "final_answer": answers[i], "correct": bool(correct[i])}
             for i in range(min(n, e.log_samples))]
  return EvalResult(
      accuracy=float(correct.mean()),
      format=float(np.mean(rewards_lib.format_reward(greedy))),
      accuracy_flawed_verb=float(correct[flawed].mean()) if split else None,
      accuracy_other=float(correct[~flawed].mean()) if split else None,
      k=e.k, pass_at_k=pass_k, maj_at_k=maj_k, samples=samples)


def _majority_right(group: list[str], truth: str) -> bool:
  counted = collections.Counter(k for k in map(answer_key, group) if k is not None)
  majority = counted.most_common(1)[0][0] if counted else None
  return majority is not None and majority == answer_key("#### " + truth)
