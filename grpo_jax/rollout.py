"""Rollout: P prompts -> G completions each -> reward rows [K, P, G] (-> step rewards), on the host.

    roll, position = rollout.collect(data, sampler, r, params, position, key, start=...)
    adv = rollout.coefficients(roll, r, data.rewards.weights)       # [N] or [N, C]
    batch = rollout.train_batch(roll, adv, mask_truncated=r.mask_truncated_completions)

`collect` reads the paradigm's data source (teacher solutions, or samples of the live or frozen
policy), draws with the sampler (`samplers.Sampler`: single-turn or tool-using episodes; the key
folded with the resample round), decodes, and scores every row with the reward functions (text)
and the learned ORM (tokens, `rm`). DAPO dynamic sampling is a selection over groups: draw up to
1 + max_resample_rounds rounds of P prompts, keep groups whose weighted rewards differ, fill up
with zero-spread ones. With tools, rewards and the verifier score the policy's text; the whole
episode is the rewards' `episodes` argument and samples' "episode".

Host and device overlap: `start(token_batch)` is called as soon as a step's tokens are on the
host, before their texts are decoded and scored (when no selection follows: no dynamic
sampling); the trainer dispatches its log-prob passes there, which need only tokens, so the
device runs them while the host decodes and scores. What `start` returns is `Rollout.started`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from absl import logging

from grpo_jax import advantages as advantages_lib
from grpo_jax import rewards as rewards_lib
from grpo_jax import reward_table, samplers
from grpo_jax.data import arithmetic, iterator
from grpo_jax.experiment import Data
from grpo_jax.rewards import reward_model as rm_lib
from grpo_jax.rewards import steps as steps_lib
from grpo_jax.settings import RolloutSettings
from grpo_jax.train_step import TrainBatch

# The learned reward model on a batch of tokens -> host scores ([N], or [N, S] with steps).
RMScorer = Callable[[rm_lib.RMBatch], np.ndarray]


class StepRewards(NamedTuple):
  """Process supervision: steps end at tokens containing the step delimiter, [N, S] each."""
  end_NxS: np.ndarray      # int32 completion-token index ending step s
  mask_NxS: np.ndarray     # int32 1 where step s exists
  rewards_NxS: np.ndarray  # float32 verifier labels or learned-PRM probabilities (0 off-mask)
  labels_NxS: np.ndarray   # float32 the task's step verifier (PRM training labels)


@dataclasses.dataclass(frozen=True)
class Rollout:
  """P groups of G completions, rows prompt-major (row p * G + g), NumPy on the host.

  For the "teacher" data source the N = P * G rows are teacher solutions of N problems, with
  no reward rows (K = 0), texts or records.
  """
  prompt_ids_NxL: np.ndarray
  prompt_mask_NxL: np.ndarray
  tokens_NxC: np.ndarray
  mask_NxC: np.ndarray       # 1 up to and including the EOS
  truncated_N: np.ndarray    # bool: no EOS within the budget
  scores_KxPxG: np.ndarray   # float32 reward rows, unweighted, in `rewards.names` order
  reward_PxG: np.ndarray     # their weighted sum (`rewards.weighted_sum`), what advantages read
  verified_N: np.ndarray     # float32 exact-answer verifier (RM labels, verified accuracy)
  texts: tuple[str, ...]     # N decoded completions (tools: the policy's text, as scored)
  records: tuple[dict, ...]  # P problems
  steps: Optional[StepRewards]
  figures: dict              # host-side figures: rewards, rounds, timing
  sampler_logprobs_NxC: Optional[np.ndarray] = None  # the sampler's own (None: teacher data)
  started: Any = None        # what `collect`'s `start` returned for this rollout's tokens
  versions_NxC: Optional[np.ndarray] = None  # in-flight updates: which weights drew each token
  episode_texts: tuple[str, ...] = ()  # tools: N whole episodes (tool output included)


@dataclasses.dataclass(frozen=True)
class _Round:
  """One draw of P prompts x G samples, scored."""
  records: list
  ids_NxL: np.ndarray
  pmask_NxL: np.ndarray
  drawn: samplers.Drawn
  texts: tuple[str, ...]
  scores_KxN: np.ndarray
  reward_N: np.ndarray   # the weighted sum of the reward rows
  verified_N: np.ndarray
  failed_K: np.ndarray
  spread_P: np.ndarray  # groups whose weighted rewards differ


def collect(data: Data, sampler: samplers.Sampler, r: RolloutSettings, params,
            position: iterator.Position, key: jax.Array, *, rm: Optional[RMScorer] = None,
            start: Optional[Callable[[TrainBatch], Any]] = None
            ) -> tuple[Rollout, iterator.Position]:
  """One rollout of the paradigm's data source, and the iterator's next position.

  `params`: the policy in the sampler's layout (`weights.decode_params`). `rm`: the learned
  reward model's scorer (None before it is trained: its reward row is 0). `start`: called with
  `train_batch`'s batch less its advantages (zeros) as soon as the tokens are on the host,
  before texts and rewards, when every drawn row is kept (no dynamic sampling); its result is
  the rollout's `started`. Teacher data never calls it."""
  if r.paradigm.data == "teacher":
    return _teacher(data, r, position)
  P, G = r.num_prompts, r.num_samples
  rounds, t_sample, t_score, gen_tokens, zero_spread = [], 0.0, 0.0, 0, 0
  started = None
  for k in range(1 + (r.max_resample_rounds if r.dynamic_sampling else 0)):
    idx, position = iterator.next_indices(position, len(data.task.train), P)
    t0 = time.perf_counter()
    records = [data.task.train[i] for i in idx]
    ids, mask = data.train_prompts.ids_NxL[idx], data.train_prompts.mask_NxL[idx]
    drawn = sampler(params, ids, mask, jax.random.fold_in(key, k), records)
    ids_N, pmask_N = np.repeat(ids, G, 0), np.repeat(mask, G, 0)
    if start is not None and not r.dynamic_sampling:  # device work queued before host work
      started = start(_batch(ids_N, pmask_N, drawn.tokens_BxC, drawn.mask_BxC,
                             drawn.truncated_B, np.zeros(len(drawn.mask_BxC)),
                             r.mask_truncated_completions, drawn.logprobs_BxC))
    t1 = time.perf_counter()  # sample_s: draw, tokens to the host, passes queued
    scored = _score(data, r, records, ids_N, pmask_N, drawn, rm)
    t_score += time.perf_counter() - t1
    t_sample += t1 - t0
    gen_tokens += int(drawn.mask_BxC.sum())
    zero_spread += int((~scored.spread_P).sum()) if k == 0 else 0
    rounds.append(scored)
    if not r.dynamic_sampling or sum(int(d.spread_P.sum()) for d in rounds) >= P:
      break
  roll = _select_groups(rounds, P, G, keep_all=not r.dynamic_sampling)
  steps = step_rewards(data.tokenizer, r, roll, rm) if r.step_rewards else None
  figures = _figures(roll, data.rewards.names, steps,
                     learned_steps=r.process_reward == "prm" and rm is not None)
  if data.env is not None:  # turns, tool calls by status, env-token fraction, tool vs decode time
    figures.update(mean_figures([d.drawn.episodes.figures for d in rounds]))
  if r.reward_errors == "zero":
    failed_K = sum(d.failed_K.astype(np.int64) for d in rounds)
    figures.update({f"reward_errors/{name}": int(n) for name, n in zip(data.rewards.names,
                                                                        failed_K)})
  figures.update(zero_spread_fraction=zero_spread / P, sample_rounds=len(rounds),
                 sample_s=t_sample, score_s=t_score, tok_per_s=gen_tokens / max(t_sample, 1e-9))
  return dataclasses.replace(roll, steps=steps, figures=figures, started=started), position


def _score(data: Data, r: RolloutSettings, records: list, ids_N, pmask_N,
           drawn: samplers.Drawn, rm: Optional[RMScorer]) -> _Round:
  """Texts (unless episodes brought theirs), reward rows [K, N] (rule functions on text, then
  the ORM on tokens), the verifier, and which groups have reward spread."""
  texts = samplers.texts_of(drawn, data.tokenizer)
  cmask = drawn.mask_BxC
  prompts_P = [data.task.prompt(rec) for rec in records]
  columns = reward_table.reward_columns(records, prompts_P, drawn.tokens_BxC, cmask,
                                        drawn.lengths_B, r.num_samples, drawn.episodes)
  rewards = data.rewards
  fns = rewards.fns
  failed_K = np.zeros(len(rewards.names), bool)
  if fns:
    scored = rewards_lib.score_rows(fns, rewards.weights[:len(fns)], list(texts), columns,
                                    names=rewards.names[:len(fns)],
                                    timeout_s=r.reward_timeout_s, on_error=r.reward_errors)
    scores_KxN = scored.scores_KxN
    failed_K[:len(fns)] = scored.failed_K
    for message in scored.messages:
      logging.warning("%s: this batch scores 0 (config.grpo.reward_errors = 'zero')", message)
  else:
    scores_KxN = np.zeros((0, len(texts)), np.float32)
  if "reward_model" in rewards.names:  # ORM score of the tokens the sampler produced
    rm_N = (rm(rm_lib.RMBatch(ids_N, pmask_N, drawn.tokens_BxC, cmask)) if rm is not None
            else np.zeros(len(texts)))  # no RM yet: bootstrap sampling only
    scores_KxN = np.concatenate([scores_KxN, rm_N[None].astype(np.float32)], 0)
  verified_N = np.asarray(rewards_lib.exact_answer_reward(list(texts), columns["final_answer"]),
                          np.float32)
  reward_N = rewards_lib.weighted_sum(np.asarray(rewards.weights), scores_KxN)
  reward_PxG = reward_N.reshape(-1, r.num_samples)
  spread_P = ~np.all(reward_PxG == reward_PxG[:, :1], axis=1)
  return _Round(records, ids_N, pmask_N, drawn, texts, scores_KxN, reward_N, verified_N, failed_K,
                spread_P)


def mean_figures(rows: Sequence[dict]) -> dict:
  """Episode figures of several batches: times summed, the rest averaged."""
  keys = dict.fromkeys(k for row in rows for k in row)
  return {k: (sum(row.get(k, 0.0) for row in rows) if k.endswith("_s")
              else float(np.mean([row.get(k, 0.0) for row in rows]))) for k in keys}


def _select_groups(rounds: list[_Round], P: int, G: int, keep_all: bool) -> Rollout:
  """The first P groups with reward spread (in draw order), then zero-spread ones if the rounds
  ran out (bounded resampling), as one Rollout."""
  spread = np.concatenate([d.spread_P for d in rounds]) | keep_all
  pick_P = np.concatenate([np.flatnonzero(spread), np.flatnonzero(~spread)])[:P]
  rows_N = (pick_P[:, None] * G + np.arange(G)).reshape(-1)
  cat = lambda get: np.concatenate([get(d) for d in rounds], axis=0)[rows_N]  # noqa: E731
  texts = [t for d in rounds for t in d.texts]
  records = [rec for d in rounds for rec in d.records]
  scores_KxN = np.concatenate([d.scores_KxN for d in rounds], axis=-1)[:, rows_N]
  episode_texts = ()
  if rounds[0].drawn.episodes is not None:
    whole = [t for d in rounds for t in d.drawn.episodes.texts]
    episode_texts = tuple(whole[i] for i in rows_N)
  return Rollout(
      prompt_ids_NxL=cat(lambda d: d.ids_NxL), prompt_mask_NxL=cat(lambda d: d.pmask_NxL),
      tokens_NxC=cat(lambda d: d.drawn.tokens_BxC), mask_NxC=cat(lambda d: d.drawn.mask_BxC),
      truncated_N=cat(lambda d: d.drawn.truncated_B),
      scores_KxPxG=scores_KxN.reshape(scores_KxN.shape[0], P, G),
      reward_PxG=cat(lambda d: d.reward_N).reshape(P, G),
      verified_N=cat(lambda d: d.verified_N), texts=tuple(texts[i] for i in rows_N),
      records=tuple(records[p] for p in pick_P), steps=None, figures={},
      sampler_logprobs_NxC=(cat(lambda d: d.drawn.logprobs_BxC)
                            if rounds[0].drawn.logprobs_BxC is not None else None),
      episode_texts=episode_texts,
      versions_NxC=(cat(lambda d: d.drawn.versions_BxC)
                    if rounds[0].drawn.versions_BxC is not None else None))


def step_rewards(tokenizer, r: RolloutSettings, roll: Rollout,
                 rm: Optional[RMScorer]) -> StepRewards:
  """Step boundaries at tokens containing `grpo.step_delimiter`; labels from the arithmetic
  task's step verifier; rewards are those labels (`grpo.process_reward = "verifier"`, an oracle
  PRM) or the learned PRM's probabilities (`"prm"`, once it is trained)."""
  end, mask = steps_lib.batch_step_boundaries(roll.tokens_NxC, roll.mask_NxC, tokenizer,
                                              max_steps=r.max_steps, delimiter=r.step_delimiter)
  G = r.num_samples
  labels = np.zeros(end.shape, np.float32)
  for n, text in enumerate(roll.texts):
    lab = arithmetic.step_labels(text, roll.records[n // G])
    k = int(mask[n].sum())
    if len(lab) > k:  # the boundaries kept the first k - 1 steps and the last one
      lab = lab[:k - 1] + lab[-1:] if k else []
    labels[n, :len(lab)] = lab[:k]
  rewards = labels
  if r.process_reward == "prm" and rm is not None:
    rewards = rm(rm_lib.RMBatch(roll.prompt_ids_NxL, roll.prompt_mask_NxL, roll.tokens_NxC,
                                roll.mask_NxC, step_end=end, step_mask=mask)).astype(np.float32)
  return StepRewards(end, mask, rewards * mask, labels)


def _figures(roll: Rollout, names: Sequence[str], steps: Optional[StepRewards], *,
             learned_steps: bool = False) -> dict:
  combined = roll.reward_PxG
  figures = {"reward": float(combined.mean()), "reward_std": float(combined.std()),
             "truncated_fraction": float(roll.truncated_N.mean()),
             # generated tokens per completion, EOS included, truncated ones too
             "completion_length": float(roll.mask_NxC.sum(1).mean())}
  for name, mean in zip(names, rewards_lib.reward_means(roll.scores_KxPxG)):
    figures[f"reward/{name}"] = mean
  figures["verified_accuracy"] = float(roll.verified_N.mean())
  if "reward_model" in names:  # the learned ORM on fresh samples it has not trained on
    says_right = roll.scores_KxPxG[list(names).index("reward_model")].reshape(-1) >= 0.5
    figures.update(_rm_figures(says_right, roll.verified_N > 0))  # against the exact answer
  if learned_steps:  # the learned PRM on the fresh samples' steps, against the step verifier
    on = steps.mask_NxS > 0
    figures.update(_rm_figures(steps.rewards_NxS[on] >= 0.5, steps.labels_NxS[on] > 0))
  if steps is not None:
    figures["step_reward"] = float((steps.rewards_NxS * steps.mask_NxS).sum()
                                   / max(steps.mask_NxS.sum(), 1))
  return figures


def _rm_figures(says_right: np.ndarray, right: np.ndarray) -> dict:
  """A learned RM's "right" (p >= 0.5) against the verifier's: how often they agree, and how
  often it rates right what is wrong (reward hacking)."""
  return {"rm_agreement": float(np.mean(says_right == right)),
          "reward_hacking": float(np.mean(says_right & ~right))}


def _teacher(data: Data, r: RolloutSettings, position) -> tuple[Rollout, iterator.Position]:
  """The "sft" paradigm: P * G teacher solutions of distinct problems per step."""
  P, G = r.num_prompts, r.num_samples
  idx, position = iterator.next_indices(position, len(data.task.sft), P * G)
  prompts, targets = data.teacher
  return Rollout(
      prompt_ids_NxL=prompts.ids_NxL[idx], prompt_mask_NxL=prompts.mask_NxL[idx],
      tokens_NxC=targets.ids_NxC[idx], mask_NxC=targets.mask_NxC[idx],
      truncated_N=np.zeros(P * G, bool), scores_KxPxG=np.zeros((0, P, G), np.float32),
      reward_PxG=np.zeros((P, G), np.float32),
      verified_N=np.ones(P * G, np.float32), texts=(), records=(), steps=None,
      figures={"sample_s": 0.0, "score_s": 0.0, "tok_per_s": 0.0}), position


def coefficients(roll: Rollout, r: RolloutSettings, weights_K) -> np.ndarray:
  """The paradigm's gradient coefficient of every row (`advantages.coefficients`): [N], or
  [N, C] per token for process supervision."""
  steps = roll.steps
  return advantages_lib.coefficients(
      r.paradigm.coefficient, roll.scores_KxPxG, weights_K, scale=r.advantage_scale,
      steps=(steps.end_NxS, steps.mask_NxS, steps.rewards_NxS) if steps else None,
      num_tokens=roll.tokens_NxC.shape[1])


def train_batch(roll: Rollout, advantages, *, mask_truncated: bool) -> TrainBatch:
  """The update's batch: `advantages` [N] or [N, C]; with `mask_truncated` the completions
  that hit the budget get no loss (DAPO's over-long filtering)."""
  return _batch(roll.prompt_ids_NxL, roll.prompt_mask_NxL, roll.tokens_NxC, roll.mask_NxC,
                roll.truncated_N, advantages, mask_truncated, roll.sampler_logprobs_NxC)


def _batch(ids, pmask, tokens, mask, truncated, advantages, mask_truncated: bool,
           sampler_logprobs=None) -> TrainBatch:
  mask = mask * (~truncated[:, None]) if mask_truncated else mask
  return TrainBatch(prompt_tokens=ids, prompt_mask=pmask, completion_tokens=tokens,
                    completion_mask=mask, advantages=np.asarray(advantages, np.float32),
                    sampler_logprobs=(None if sampler_logprobs is None
                                      else np.asarray(sampler_logprobs, np.float32)))


def samples(tokenizer, roll: Rollout, advantages, num: int = 2) -> list[dict]:
  """The first prompt's first completions with reward and advantage (and steps), for
  samples.jsonl."""
  if not roll.records:
    return []
  rows = []
  for i in range(min(roll.reward_PxG.shape[1], num)):
    row = {"question": roll.records[0]["question"], "completion": roll.texts[i],
           "final_answer": roll.records[0]["final_answer"],
           "reward": float(roll.reward_PxG[0, i]),
           "advantage": float(np.asarray(advantages)[i].mean())}
    if roll.episode_texts:  # tools: "completion" is the policy's text, this the whole episode
      row["episode"] = roll.episode_texts[i]
    if roll.steps is not None:  # per-step rewards and their token spans, for inspection
      st = roll.steps
      ends = st.end_NxS[i][st.mask_NxS[i] > 0].tolist()
      starts = [0] + [e + 1 for e in ends[:-1]]
      row["steps"] = [{"span": [a, b],
                       "text": tokenizer.decode(roll.tokens_NxC[i][a:b + 1].tolist()),
                       "reward": float(st.rewards_NxS[i, j]), "label": int(st.labels_NxS[i, j])}
                      for j, (a, b) in enumerate(zip(starts, ends))]
    rows.append(row)
  return rows


def histograms(roll: Rollout, names: Sequence[str], advantages) -> dict:
  """TensorBoard histograms of one rollout: completion lengths, advantages (per completion),
  rewards (weighted sum and each row)."""
  adv_N = np.asarray(advantages).reshape(roll.tokens_NxC.shape[0], -1)
  arrays = {"completion_length": roll.mask_NxC.sum(-1),
            "advantage": adv_N.sum(-1) / np.maximum((adv_N != 0).sum(-1), 1)}
  if roll.scores_KxPxG.shape[0]:
    arrays["reward"] = roll.reward_PxG.reshape(-1)
    arrays.update({f"reward/{name}": roll.scores_KxPxG[k].reshape(-1)
                   for k, name in enumerate(names)})
  return arrays


def rm_examples(roll: Rollout, prm: bool) -> dict:
  """The reward model's training data from a rollout: tokens with the verifier's labels
  (outcome, [N]; per step for a PRM (`prm`), [N, S])."""
  out = dict(prompt_tokens=roll.prompt_ids_NxL, prompt_mask=roll.prompt_mask_NxL,
             completion_tokens=roll.tokens_NxC, completion_mask=roll.mask_NxC,
             labels=roll.verified_N)
  if prm:
    out.update(step_end=roll.steps.end_NxS, step_mask=roll.steps.mask_NxS,
               labels=roll.steps.labels_NxS.astype(np.float32))
  return out
