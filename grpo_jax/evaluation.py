"""Held-out evaluation: greedy pass@1 on the eval split; pass@k and maj@k from k samples.

Each figure comes in two readings of a completion's answer:
  lenient  the number after `####`, else the last number in the text (`eval/accuracy`, the
           figure the training curves have always shown, and `eval/pass_at_k` / `maj_at_k`);
  strict   only a `####`-anchored answer counts (`eval/accuracy_strict`, `eval/strict_pass_at_k`,
           `eval/strict_maj_at_k`): what the GSM8K protocol scores, and what a model that has
           not learnt the answer format is not credited for.
With tools (config.tools) the answer is read from the policy's text alone (its turns, not the
tool's output: a printed number is not an answer the policy gave), as the training rewards read
it; samples show the whole episode too.
The gap between the two is the part of the accuracy that the answer format does not carry. The
strict pass@k / maj@k names start with `strict_` so that `eval/pass_at_*` still names pass@k
alone (tools/plot_metrics.py's default curves).

Batches have a fixed shape (the last one wraps around), so each sampler compiles once; the
sampling key of batch b at GRPO step s is fold_in(fold_in(Stream key, s), b), so no two batches
draw the same uniforms.
"""

from __future__ import annotations

import collections
import math
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from grpo_jax import rewards as rewards_lib
from grpo_jax import rollout, samplers, sharding
from grpo_jax.experiment import Data, Keys, Programs, Stream
from grpo_jax.settings import EvalSettings

# progress(what, batches_done, num_batches): called after each decoded batch ("greedy" /
# "samples"), e.g. to print a progress line while a long evaluation decodes.
ProgressFn = Callable[[str, int, int], None]


class EvalResult(NamedTuple):
  accuracy: float                 # greedy, exact answer (lenient: last number as fallback)
  accuracy_strict: float          # greedy, only a "####"-anchored answer counts
  format: float                   # greedy completions with a "#### N" line
  accuracy_flawed_verb: Optional[float]  # arithmetic task: problems the teacher gets wrong
  accuracy_other: Optional[float]
  k: int
  pass_at_k: Optional[float]      # any of k samples right (lenient); None: no pass@k
  pass_at_k_strict: Optional[float]
  maj_at_k: Optional[float]       # the most common answer of k samples right (lenient)
  maj_at_k_strict: Optional[float]
  num_problems: int               # problems behind the greedy figures
  pass_k_problems: int            # problems behind pass@k / maj@k (0: none)
  samples: list                   # the first greedy completions, for samples.jsonl
  episodes: dict = {}             # tools: greedy episodes' eval/tool_calls, eval/turns, ...
  curve: dict = {}                # K -> (pass@K, maj@K) for K = 1, 2, 4, .. <= k (`at_k_curve`)

  def figures(self) -> dict:
    out = {"eval/accuracy": self.accuracy, "eval/accuracy_strict": self.accuracy_strict,
           "eval/format": self.format}
    if self.accuracy_flawed_verb is not None:
      out["eval/accuracy_flawed_verb"] = self.accuracy_flawed_verb
      out["eval/accuracy_other"] = self.accuracy_other
    if self.pass_at_k is not None:
      out[f"eval/pass_at_{self.k}"] = self.pass_at_k
      out[f"eval/maj_at_{self.k}"] = self.maj_at_k
      out[f"eval/strict_pass_at_{self.k}"] = self.pass_at_k_strict
      out[f"eval/strict_maj_at_{self.k}"] = self.maj_at_k_strict
    out.update(self.episodes)
    return out


def answer_key(text: str, *, strict: bool = False):
  """The number a completion answers, or None: what maj@k votes on. `strict`: only a number
  after `####` counts."""
  return rewards_lib.parse_number(rewards_lib.extract_answer(text, fallback=not strict) or "")


def _decode_batches(data: Data, sampler: samplers.Sampler, params, num: int, batch_size: int,
                    key, progress: Optional[ProgressFn] = None, what: str = "",
                    episode_figures: Optional[list] = None,
                    whole_texts: Optional[list] = None) -> list[str]:
  """The policy's text of eval prompts 0..num-1, in order, batch b drawn with fold_in(key, b).
  `whole_texts` gets what the model read and wrote (with tools, the episodes, tool output
  included; else the completions again), `episode_figures` each batch's episode figures."""
  ids, mask = data.eval_prompts.ids_NxL, data.eval_prompts.mask_NxL
  starts = range(0, num, batch_size)
  texts = []
  for b, start in enumerate(starts):
    rows = np.arange(start, start + batch_size) % num  # fixed shape: the last batch wraps
    drawn = sampler(params, ids[rows], mask[rows], jax.random.fold_in(key, b),
                    [data.task.eval[i] for i in rows])
    decoded = samplers.texts_of(drawn, data.tokenizer)
    if episode_figures is not None and drawn.episodes is not None:
      episode_figures.append(drawn.episodes.figures)
    kept = min(batch_size, num - start) * (len(decoded) // batch_size)
    texts += decoded[:kept]
    if whole_texts is not None:
      whole_texts += drawn.whole_texts(decoded)[:kept]
    if progress is not None:
      progress(what, b + 1, len(starts))
  return texts


def _correct(texts: list[str], answers: list[str], strict: bool) -> np.ndarray:
  return np.asarray(rewards_lib.exact_answer_reward(texts, answers, fallback=not strict)) > 0


def evaluate(data: Data, programs: Programs, e: EvalSettings, params, keys: Keys, step: int,
             *, progress: Optional[ProgressFn] = None) -> EvalResult:
  """Greedy accuracy on the first `eval.num_problems` held-out problems (0: all) and, with
  `eval.k > 1`, pass@k / maj@k on the first `eval.pass_k_problems`, at GRPO step `step` (which
  picks the sampling keys). `params`: the policy in the sampler's layout
  (`weights.decode_params`)."""
  records = data.task.eval
  n = min(len(records), e.num_problems or len(records))
  episode_figures, whole = [], []
  greedy = _decode_batches(data, programs.sample_greedy, params, n, e.batch_size,
                           keys(Stream.EVAL_GREEDY, step), progress, "greedy",
                           episode_figures, whole)
  answers = [r["final_answer"] for r in records[:n]]
  correct = _correct(greedy, answers, strict=False)
  flawed = np.asarray([bool(r.get("has_flawed_verb", False)) for r in records[:n]])
  split = flawed.any() and not flawed.all()
  m, pass_k, maj_k, pass_k_strict, maj_k_strict, curve = 0, None, None, None, None, {}
  sample_k = programs.sample_eval_k
  if sample_k is not None and e.pass_k_problems:
    m = min(n, e.pass_k_problems)
    dp = sharding.data_parallel_size(sample_k.mesh)
    per_batch = max(dp, (e.batch_size // e.k) // dp * dp)  # prompts, sharded over the data axes
    texts = _decode_batches(data, sample_k, params, m, per_batch,
                            keys(Stream.EVAL_SAMPLES, step), progress, "samples")
    groups = [texts[i * e.k:(i + 1) * e.k] for i in range(m)]
    pass_k, maj_k = _at_k(groups, answers, strict=False)
    pass_k_strict, maj_k_strict = _at_k(groups, answers, strict=True)
    curve = at_k_curve(groups, answers)
  samples = [{"prompt": data.task.prompt(records[i]), "completion": greedy[i],
              "final_answer": answers[i], "correct": bool(correct[i]),
              **({"episode": whole[i]} if data.env is not None else {})}
             for i in range(min(n, e.log_samples))]
  return EvalResult(
      accuracy=float(correct.mean()),
      accuracy_strict=float(_correct(greedy, answers, strict=True).mean()),
      format=float(np.mean(rewards_lib.format_reward(greedy))),
      accuracy_flawed_verb=float(correct[flawed].mean()) if split else None,
      accuracy_other=float(correct[~flawed].mean()) if split else None,
      k=e.k, pass_at_k=pass_k, pass_at_k_strict=pass_k_strict, maj_at_k=maj_k,
      maj_at_k_strict=maj_k_strict, num_problems=n, pass_k_problems=m, samples=samples,
      curve=curve,
      episodes={k.replace("episode/", "eval/"): v for k, v in
                rollout.mean_figures(episode_figures).items() if not k.endswith("_s")})


def _at_k(groups: list[list[str]], answers: list[str], strict: bool) -> tuple[float, float]:
  """(pass@k, maj@k) over problems, each with its k completions."""
  right = [_correct(g, [a] * len(g), strict).any() for g, a in zip(groups, answers)]
  majority = [_majority_right(g, a, strict) for g, a in zip(groups, answers)]
  return float(np.mean(right)), float(np.mean(majority))


def at_k_curve(groups: list[list[str]], answers: list[str]) -> dict[int, tuple[float, float]]:
  """K -> (pass@K, maj@K) (lenient) for K = 1, 2, 4, ... up to the k completions of each
  problem: pass@K by the unbiased estimator 1 - C(k - c, K) / C(k, K) (c right of k; Chen et
  al. 2021), maj@K averaged over the k // K disjoint blocks of K completions."""
  k = min(len(g) for g in groups)
  right = [int(_correct(g[:k], [a] * k, strict=False).sum()) for g, a in zip(groups, answers)]
  curve, K = {}, 1
  while K <= k:
    pass_at = np.mean([1.0 - math.comb(k - c, K) / math.comb(k, K) for c in right])
    maj_at = np.mean([np.mean([_majority_right(g[b * K:(b + 1) * K], a)
                               for b in range(k // K)]) for g, a in zip(groups, answers)])
    curve[K], K = (float(pass_at), float(maj_at)), 2 * K
  return curve


def _majority_right(group: list[str], truth: str, strict: bool = False) -> bool:
  """Whether the most common answer of `group` (answers that do not parse do not vote) is
  `truth`."""
  counted = collections.Counter(
      k for k in (answer_key(t, strict=strict) for t in group) if k is not None)
  majority = counted.most_common(1)[0][0] if counted else None
  return majority is not None and majority == answer_key("#### " + truth)
