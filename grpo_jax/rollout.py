"""Rollout: P prompts -> G completions each -> reward rows [K, P, G] (-> step rewards), on the host.

    roll, position = rollout.collect(exp, params, position, step, start=...)
    adv = advantages.coefficients(paradigm.coefficient, roll.scores_KxPxG, weights, ...)
    batch = rollout.train_batch(roll, adv, mask_truncated=...)

`collect` reads the paradigm's data source (teacher solutions, or samples of the live or frozen
policy), samples with the jitted sampler (`fold_in(Stream.ROLLOUT key, step)`, then the resample
round), decodes, and scores every row with the reward functions (text) and the learned ORM
(tokens). DAPO dynamic sampling is a selection over groups: draw up to 1 + max_resample_rounds
rounds of P prompts, keep groups whose weighted rewards differ, fill up with zero-spread ones.
With tools, the rows are episodes (`multiturn.rollout`): rewards and the verifier score the
policy's text, the whole episode is the rewards' `episodes` argument and samples' "episode".

Host and device overlap: `start(token_batch)` is called as soon as a step's tokens are on the
host, before their texts are decoded and scored (when no selection follows: no dynamic
sampling); the trainer dispatches its log-prob passes there, which need only tokens, so the
device runs them while the host decodes and scores. What `start` returns is `Rollout.started`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from absl import logging

from grpo_jax import experiment, multiturn, tasks
from grpo_jax import rewards as rewards_lib
from grpo_jax.data import arithmetic, iterator
from grpo_jax.experiment import Experiment, Stream
from grpo_jax.rewards import reward_model as rm_lib
from grpo_jax.rewards import steps as steps_lib
from grpo_jax.train_step import TrainBatch


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
  scores_KxPxG: np.ndarray   # float32 reward rows, unweighted, in `exp.rewards.names` order
  verified_N: np.ndarray     # float32 exact-answer verifier (RM labels, verified accuracy)
  texts: tuple[str, ...]     # N decoded completions (tools: the policy's text, as scored)
  records: tuple[dict, ...]  # P problems
  steps: Optional[StepRewards]
  figures: dict              # host-side figures: rewards, rounds, timing
  started: Any = None        # what `collect`'s `start` returned for this rollout's tokens
  episode_texts: tuple[str, ...] = ()  # tools: N whole episodes (tool output included)


def collect(exp: Experiment, params, position: iterator.Position, step: int, rm_params=None,
            stream: Stream = Stream.ROLLOUT,
            start: Optional[Callable[[TrainBatch], Any]] = None) -> tuple[Rollout, iterator.Position]:
  """One rollout of the paradigm's data source, and the iterator's next position.

  `start`: called with `train_batch`'s batch less its advantages (zeros) as soon as the tokens
  are on the host, before texts and rewards, when every drawn row is kept (no dynamic
  sampling); its result is the rollout's `started`. Teacher data never calls it."""
  r = exp.settings.rollout
  if r.paradigm.data == "teacher":
    return _teacher(exp, position)
  P, G = r.num_prompts, r.num_samples
  params = experiment.decode_params(exp, params)  # once per rollout, not per decoded token
  weights = np.asarray(exp.rewards.weights)
  rounds, t_sample, t_score, gen_tokens, zero_spread = [], 0.0, 0.0, 0, 0
  failed_K = np.zeros(len(exp.rewards.names), np.int64)
  started = None
  for k in range(1 + (r.max_resample_rounds if r.dynamic_sampling else 0)):
    idx, position = iterator.next_indices(position, len(exp.task.train), P)
    t0 = time.perf_counter()
    drawn = _sample(exp, params, idx, jax.random.fold_in(exp.key(stream, step), k))
    if start is not None and not r.dynamic_sampling:  # device work queued before host work
      started = start(_token_batch(drawn, r.mask_truncated_completions))
    t1 = time.perf_counter()  # sample_s: draw, tokens to the host, passes queued
    drawn.update(_score(exp, drawn, rm_params))
    t_score += time.perf_counter() - t1
    failed_K += drawn["failed"]
    t_sample += t1 - t0
    gen_tokens += int(drawn["mask"].sum())
    combined_PxG = rewards_lib.weighted_sum(weights, drawn["scores"]).reshape(P, G)
    drawn["spread_P"] = ~np.all(combined_PxG == combined_PxG[:, :1], axis=1)
    zero_spread += int((~drawn["spread_P"]).sum()) if k == 0 else 0
    rounds.append(drawn)
    if not r.dynamic_sampling or sum(int(d["spread_P"].sum()) for d in rounds) >= P:
      break
  roll = _select_groups(exp, rounds, P, G, keep_all=not r.dynamic_sampling)
  steps = None
  if r.paradigm.coefficient == "process" or (exp.settings.reward_model.enabled
                                             and exp.settings.reward_model.kind == "prm"):
    steps = step_rewards(exp, roll, rm_params)
  figures = _figures(roll, exp.rewards, steps, P, G)
  if exp.env is not None:  # turns, tool calls by status, env-token fraction, tool vs decode time
    figures.update(_mean_figures([d["figures"] for d in rounds]))
  if exp.settings.rollout.reward_errors == "zero":
    figures.update({f"reward_errors/{name}": int(n) for name, n in zip(exp.rewards.names,
                                                                        failed_K)})
  figures.update(zero_spread_fraction=zero_spread / P, sample_rounds=len(rounds),
                 sample_s=t_sample, score_s=t_score, tok_per_s=gen_tokens / max(t_sample, 1e-9))
  return dataclasses.replace(roll, steps=steps, figures=figures, started=started), position


def _token_batch(drawn: dict, mask_truncated: bool) -> TrainBatch:
  """`train_batch` of one round's rows, advantages not known yet (zeros)."""
  return _batch(drawn["ids"], drawn["pmask"], drawn["tokens"], drawn["mask"],
                drawn["truncated"], np.zeros(len(drawn["mask"])), mask_truncated)


def _sample(exp: Experiment, params, idx, key) -> dict:
  ids, mask = exp.train_prompts.ids_NxL[idx], exp.train_prompts.mask_NxL[idx]
  G = exp.settings.rollout.num_samples
  records = [exp.task.train[i] for i in idx]
  if exp.env is not None:
    ep = episodes(exp, exp.programs.sample_train, params, ids, mask, key, records)
    # Rewards score the policy's text; the episode (tool output included) is their
    # `episodes` argument.
    return dict(records=records, ids=np.repeat(ids, G, 0), pmask=np.repeat(mask, G, 0),
                tokens=ep.tokens_BxC, mask=ep.policy_mask_BxC, truncated=ep.truncated_B,
                texts=list(ep.policy_texts), lengths=ep.policy_lengths_B,
                episode_texts=list(ep.texts), episodes=ep, figures=ep.figures)
  out = exp.programs.sample_train(params, *exp.shard(ids, mask), key)
  tokens, cmask = to_host(out.tokens), to_host(out.mask)
  return dict(records=[exp.task.train[i] for i in idx], ids=np.repeat(ids, G, 0),
              pmask=np.repeat(mask, G, 0), tokens=tokens, mask=cmask,
              truncated=to_host(out.truncated).astype(bool))  # texts: decoded by `_score`


def episodes(exp: Experiment, programs, params, ids, mask, key, records):
  """Multi-turn episodes of the prompts `ids` with the run's environment (config.tools)."""
  t = exp.settings.tools
  return multiturn.rollout(programs, params, *exp.shard(ids, mask), key, exp.env, records,
                           exp.tokenizer, max_workers=t.max_workers, to_host=to_host)


def _score(exp: Experiment, drawn: dict, rm_params) -> dict:
  """Texts (unless multi-turn episodes brought theirs), reward rows [K, N] (rule functions on
  text, then the ORM on tokens) and the verifier."""
  r = exp.settings.rollout
  cmask, truncated = drawn["mask"], drawn["truncated"]
  texts = drawn.get("texts") or exp.tokenizer.decode_batch(drawn["tokens"], cmask)
  lengths = drawn.get("lengths")
  if lengths is None:
    lengths = completion_lengths(cmask, truncated)
  prompts_P = [exp.task.prompt(rec) for rec in drawn["records"]]
  columns = tasks.reward_columns(drawn["records"], prompts_P, drawn["tokens"], cmask, lengths,
                                 r.num_samples, drawn.get("episodes"))
  fns = exp.rewards.fns
  failed_K = np.zeros(len(exp.rewards.names), bool)
  if fns:
    scored = rewards_lib.score_rows(fns, exp.rewards.weights[:len(fns)], texts, columns,
                                    names=exp.rewards.names[:len(fns)],
                                    timeout_s=r.reward_timeout_s, on_error=r.reward_errors)
    scores_KxN = scored.scores_KxN
    failed_K[:len(fns)] = scored.failed_K
    for message in scored.messages:
      logging.warning("%s: this batch scores 0 (config.grpo.reward_errors = 'zero')", message)
  else:
    scores_KxN = np.zeros((0, len(texts)), np.float32)
  if "reward_model" in exp.rewards.names:  # ORM score of the tokens the sampler produced
    rm_N = (to_host(exp.programs.rm_score(rm_params, exp.shard(rm_lib.RMBatch(
        drawn["ids"], drawn["pmask"], drawn["tokens"], cmask))[0])) if rm_params is not None
            else np.zeros(len(texts)))  # no RM yet: bootstrap sampling only
    scores_KxN = np.concatenate([scores_KxN, rm_N[None].astype(np.float32)], 0)
  verified_N = np.asarray(rewards_lib.exact_answer_reward(texts, columns["final_answer"]),
                          np.float32)
  return dict(texts=texts, scores=scores_KxN, verified=verified_N, failed=failed_K)


def _mean_figures(rows: list[dict]) -> dict:
  """Episode figures of the sampling rounds: times summed, the rest averaged."""
  keys = dict.fromkeys(k for row in rows for k in row)
  return {k: (sum(row.get(k, 0.0) for row in rows) if k.endswith("_s")
              else float(np.mean([row.get(k, 0.0) for row in rows]))) for k in keys}


def completion_lengths(mask_NxC, truncated_N) -> np.ndarray:
  """Tokens of each single-turn completion before its EOS: the mask counts the EOS of every
  completion that was not truncated. (An episode can end without an EOS and not truncated, by
  its environment: `multiturn.Episodes` counts its own lengths.)"""
  return np.asarray(mask_NxC).sum(1) - (~np.asarray(truncated_N, bool))


def _select_groups(exp, rounds: list[dict], P: int, G: int, keep_all: bool) -> Rollout:
  """The first P groups with reward spread (in draw order), then zero-spread ones if the rounds
  ran out (bounded resampling), as one Rollout."""
  spread = np.concatenate([d["spread_P"] for d in rounds]) | keep_all
  pick_P = np.concatenate([np.flatnonzero(spread), np.flatnonzero(~spread)])[:P]
  rows_N = (pick_P[:, None] * G + np.arange(G)).reshape(-1)
  cat = lambda key: np.concatenate([d[key] for d in rounds], axis=-1 if key == "scores" else 0)  # noqa: E731
  texts = [t for d in rounds for t in d["texts"]]
  episode_texts = [t for d in rounds for t in d.get("episode_texts", ())]
  records = [rec for d in rounds for rec in d["records"]]
  K = rounds[0]["scores"].shape[0]
  return Rollout(
      prompt_ids_NxL=cat("ids")[rows_N], prompt_mask_NxL=cat("pmask")[rows_N],
      tokens_NxC=cat("tokens")[rows_N], mask_NxC=cat("mask")[rows_N],
      truncated_N=cat("truncated")[rows_N], scores_KxPxG=cat("scores")[:, rows_N].reshape(K, P, G),
      verified_N=cat("verified")[rows_N], texts=tuple(texts[i] for i in rows_N),
      records=tuple(records[p] for p in pick_P), steps=None, figures={},
      episode_texts=tuple(episode_texts[i] for i in rows_N) if episode_texts else ())


def step_rewards(exp: Experiment, roll: Rollout, rm_params) -> StepRewards:
  """Step boundaries at tokens containing `grpo.step_delimiter`; labels from the arithmetic
  task's step verifier; rewards are those labels (`grpo.process_reward = "verifier"`, an oracle
  PRM) or the learned PRM's probabilities (`"prm"`, once it is trained)."""
  r = exp.settings.rollout
  end, mask = steps_lib.batch_step_boundaries(roll.tokens_NxC, roll.mask_NxC, exp.tokenizer,
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
  if r.process_reward == "prm" and rm_params is not None:
    batch = rm_lib.RMBatch(roll.prompt_ids_NxL, roll.prompt_mask_NxL, roll.tokens_NxC,
                           roll.mask_NxC, step_end=end, step_mask=mask)
    rewards = to_host(exp.programs.rm_score(rm_params, exp.shard(batch)[0])).astype(np.float32)
  return StepRewards(end, mask, rewards * mask, labels)


def _figures(roll: Rollout, rewards, steps: Optional[StepRewards], P: int, G: int) -> dict:
  scores = roll.scores_KxPxG
  combined = (rewards_lib.weighted_sum(rewards.weights, scores) if scores.shape[0]
              else np.zeros((P, G), np.float32))
  figures = {"reward": float(combined.mean()), "reward_std": float(combined.std()),
             "truncated_fraction": float(roll.truncated_N.mean()),
             # generated tokens per completion, EOS included, truncated ones too
             "completion_length": float(roll.mask_NxC.sum(1).mean())}
  for name, mean in zip(rewards.names, rewards_lib.reward_means(scores)):
    figures[f"reward/{name}"] = mean
  figures["verified_accuracy"] = float(roll.verified_N.mean())
  if steps is not None:
    figures["step_reward"] = float((steps.rewards_NxS * steps.mask_NxS).sum()
                                   / max(steps.mask_NxS.sum(), 1))
  return figures


def _teacher(exp: Experiment, position) -> tuple[Rollout, iterator.Position]:
  """The "sft" paradigm: P * G teacher solutions of distinct problems per step."""
  r = exp.settings.rollout
  P, G = r.num_prompts, r.num_samples
  idx, position = iterator.next_indices(position, len(exp.task.sft), P * G)
  prompts, targets = exp.teacher
  return Rollout(
      prompt_ids_NxL=prompts.ids_NxL[idx], prompt_mask_NxL=prompts.mask_NxL[idx],
      tokens_NxC=targets.ids_NxC[idx], mask_NxC=targets.mask_NxC[idx],
      truncated_N=np.zeros(P * G, bool), scores_KxPxG=np.zeros((0, P, G), np.float32),
      verified_N=np.ones(P * G, np.float32), texts=(), records=(), steps=None,
      figures={"sample_s": 0.0, "score_s": 0.0, "tok_per_s": 0.0}), position


def train_batch(roll: Rollout, advantages, *, mask_truncated: bool) -> TrainBatch:
  """The update's batch: `advantages` [N] or [N, C]; with `mask_truncated` the completions
  that hit the budget get no loss (DAPO's over-long filtering)."""
  return _batch(roll.prompt_ids_NxL, roll.prompt_mask_NxL, roll.tokens_NxC, roll.mask_NxC,
                roll.truncated_N, advantages, mask_truncated)


def _batch(ids, pmask, tokens, mask, truncated, advantages, mask_truncated: bool) -> TrainBatch:
  mask = mask * (~truncated[:, None]) if mask_truncated else mask
  return TrainBatch(prompt_tokens=ids, prompt_mask=pmask, completion_tokens=tokens,
                    completion_mask=mask, advantages=np.asarray(advantages, np.float32))


def samples(exp: Experiment, roll: Rollout, advantages, num: int = 2) -> list[dict]:
  """The first prompt's first completions with reward and advantage (and steps), for
  samples.jsonl."""
  if not roll.records:
    return []
  combined = rewards_lib.weighted_sum(exp.rewards.weights, roll.scores_KxPxG) \
      if roll.scores_KxPxG.shape[0] else np.zeros(roll.scores_KxPxG.shape[1:], np.float32)
  rows = []
  for i in range(min(exp.settings.rollout.num_samples, num)):
    row = {"question": roll.records[0]["question"], "completion": roll.texts[i],
           "final_answer": roll.records[0]["final_answer"], "reward": float(combined[0, i]),
           "advantage": float(np.asarray(advantages)[i].mean())}
    if roll.episode_texts:  # tools: "completion" is the policy's text, this the whole episode
      row["episode"] = roll.episode_texts[i]
    if roll.steps is not None:  # per-step rewards and their token spans, for inspection
      st = roll.steps
      ends = st.end_NxS[i][st.mask_NxS[i] > 0].tolist()
      starts = [0] + [e + 1 for e in ends[:-1]]
      row["steps"] = [{"span": [a, b],
                       "text": exp.tokenizer.decode(roll.tokens_NxC[i][a:b + 1].tolist()),
                       "reward": float(st.rewards_NxS[i, j]), "label": int(st.labels_NxS[i, j])}
                      for j, (a, b) in enumerate(zip(starts, ends))]
    rows.append(row)
  return rows


def rm_examples(exp: Experiment, roll: Rollout) -> dict:
  """The reward model's training data from a rollout: tokens with the verifier's labels
  (outcome, [N]; per step for a PRM, [N, S])."""
  out = dict(prompt_tokens=roll.prompt_ids_NxL, prompt_mask=roll.prompt_mask_NxL,
             completion_tokens=roll.tokens_NxC, completion_mask=roll.mask_NxC,
             labels=roll.verified_N)
  if exp.settings.reward_model.kind == "prm":
    out.update(step_end=roll.steps.end_NxS, step_mask=roll.steps.mask_NxS,
               labels=roll.steps.labels_NxS.astype(np.float32))
  return out


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as a NumPy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
