"""The reward table: which functions score a rollout, with what weights, what they receive.

    rewards = reward_functions(settings.rollout, settings.reward_model, reward_fns)
    check_rewards(rewards, task, settings.rollout, env)   # one call on two records, before training
    columns = reward_columns(records, prompts_P, tokens_NxC, mask_NxC, lengths_N, G, episodes)

The rows are the built-in rule rewards, your own (config.grpo.reward_fns, or `reward_fns` from
Python), then the learned ORM. A name, signature or return value that cannot work is a
ConfigError naming the reward, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from grpo_jax import multiturn, tasks
from grpo_jax import rewards as rewards_lib
from grpo_jax.settings import ConfigError, RewardModelSettings, RolloutSettings


@dataclasses.dataclass(frozen=True)
class Rewards:
  """The reward rows of a rollout, [K, P, G]: rule functions first, then the learned ORM."""
  fns: tuple[Callable, ...]
  names: tuple[str, ...]
  weights: tuple[float, ...]


def reward_functions(r: RolloutSettings, rm: RewardModelSettings,
                     extra: Optional[Mapping[str, Callable]] = None) -> Rewards:
  """The reward rows: built-in rule rewards, your own (config.grpo.reward_fns, or `extra` from
  Python: `grpo_jax.train(config, workdir, reward_fns={"name": fn})`), then the learned ORM.
  Weights from config.grpo.rewards (0 = off; a function of yours not listed there: 1.0)."""
  builtin = {
      "exact_answer": rewards_lib.exact_answer_reward,
      "format": rewards_lib.format_reward,
      "overlong": functools.partial(
          rewards_lib.overlong_penalty_reward, max_length=r.max_completion_length,
          cache_length=r.overlong_cache_length),
  }
  yours = {name: (spec if callable(spec)
                  else tasks.load_reward_fn(spec, f"config.grpo.reward_fns.{name}"))
           for name, spec in r.reward_fns}
  for name, fn in (extra or {}).items():
    if not callable(fn):
      raise ConfigError(f"reward_fns[{name!r}] = {fn!r} is not callable")
    yours[name] = fn
  for name in yours:
    if name in builtin or name == "reward_model":
      raise ConfigError(f"config.grpo.reward_fns.{name}: {name!r} is a built-in reward's name; "
                        "choose another")
  weights = dict(r.rewards)
  for name in yours:
    weights.setdefault(name, 1.0)
  table = {**builtin, **yours}
  fns, names, ws = [], [], []
  for name, weight in weights.items():
    if name not in table:
      raise ConfigError(f"config.grpo.rewards: unknown reward {name!r}; known: {sorted(table)} "
                        "(name your own in config.grpo.reward_fns)")
    if weight:  # listed with weight 0: off (so that a flag can switch it on)
      fns.append(table[name])
      names.append(name)
      ws.append(weight)
  if rm.enabled and rm.kind == "orm" and rm.weight:
    names.append("reward_model")
    ws.append(rm.weight)
  learned = rm.enabled and (rm.kind == "prm" or rm.weight)
  if not fns and not learned and r.paradigm.coefficient != "process":
    raise ConfigError("config.grpo.rewards: all weights are 0; GRPO needs at least one reward")
  return Rewards(tuple(fns), tuple(names), tuple(ws))


def reward_columns(records: Sequence[dict], prompts_P: Sequence[str], tokens_NxC, mask_NxC,
                   lengths_N, group_size: int, episodes=None) -> dict[str, list]:
  """What a reward function receives besides `completions`, one value per completion: every
  column of the record, `prompts` (the prompt text), `completion_ids` (token ids up to and
  including the EOS) and `completion_length` (tokens before the EOS), all of the policy's
  tokens; with tools (`episodes`: multiturn.Episodes), `episodes`: per completion the whole
  episode, tool output included: "text", "length" (its tokens before the EOS, policy and tool:
  what the token budget counts), "turns" (each {"text", "observation", "info"}), "tool_calls"
  and "env_reward"."""
  keys = dict.fromkeys(k for rec in records for k in rec)  # in order; json rows may differ
  columns = rewards_lib.expand_columns({k: [rec.get(k) for rec in records] for k in keys},
                                       group_size)
  columns["prompts"] = rewards_lib.expand_columns({"p": list(prompts_P)}, group_size)["p"]
  columns["completion_ids"] = [row[m > 0].tolist() for row, m in zip(tokens_NxC, mask_NxC)]
  columns["completion_length"] = np.asarray(lengths_N).tolist()
  if episodes is not None:
    columns["episodes"] = [
        {"text": text, "length": int(n), "turns": [dataclasses.asdict(t) for t in row],
         "env_reward": float(r), "tool_calls": sum(t.observation is not None for t in row)}
        for text, n, row, r in zip(episodes.texts, episodes.lengths_B, episodes.turns,
                                   episodes.env_reward_B, strict=True)]
  return columns


def check_rewards(rewards: Rewards, task: tasks.Task, r: RolloutSettings, env=None) -> None:
  """Calls each reward function once on two training records' solutions, with the arguments a
  real call gets, before anything compiles: a wrong signature, a missing column, a bad return
  value or a row no reward applies to is a ConfigError naming the reward or the row (with
  reward_errors = "zero", a failing function is only a warning). With an environment (multi-turn
  run) `episodes` replays each solution, the environment not run: its turns and the tool output
  written in it (`env.teacher_segments`, else one turn), no info, environment reward 0; the
  completions are the policy's part of it, as in a rollout."""
  rows = task.train[:2]
  texts = [rec["solution"] or rec["final_answer"] for rec in rows]
  episodes = _replayed_episodes(env, texts) if env is not None else None
  if episodes is not None:
    texts = list(episodes.policy_texts)
  ids = np.zeros((len(rows), 1), np.int32)
  prompts_N = [task.prompt(rec) for rec in rows]
  columns = reward_columns(rows, prompts_N, ids, ids + 1, [len(t.split()) for t in texts], 1,
                           episodes)
  scores_KxN = np.zeros((len(rewards.fns), len(rows)), np.float32)
  for k, (fn, name) in enumerate(zip(rewards.fns, rewards.names)):
    try:
      scores_KxN[k] = rewards_lib.call_reward(fn, name, texts, columns, r.reward_timeout_s)
    except rewards_lib.RewardFunctionError as e:
      message = (f"config.grpo.reward_fns / rewards: {e} (checked on 2 training records before "
                 "training)")
      if r.reward_errors == "raise":
        raise ConfigError(message) from None
      logging.warning("%s", message)
  if rewards.fns:
    try:
      rewards_lib.check_rows_rewarded(scores_KxN, prompts_N)
    except rewards_lib.RewardFunctionError as e:
      raise ConfigError(f"config.grpo.reward_fns / rewards: {e} (checked on 2 training records "
                        "before training)") from None


def _replayed_episodes(env, texts: Sequence[str]):
  """`multiturn.Episodes` of the given solutions as the policy's turns: what `reward_columns`
  reads of a rollout's episodes, for `check_rewards`."""
  split = getattr(env, "teacher_segments", None)
  turns = []
  for text in texts:
    parts = split(text) if split else [(text, False)]
    row = []
    for part, is_obs in parts:
      if is_obs and row:
        row[-1] = dataclasses.replace(row[-1], observation=part)
      else:
        row.append(multiturn.Turn(part))
    turns.append(tuple(row))
  policy_texts = tuple("".join(t.text for t in row) for row in turns)
  count = lambda strings: np.asarray([len(s.split()) for s in strings], np.int32)  # noqa: E731
  zeros = np.zeros((len(texts), 1), np.int32)
  return multiturn.Episodes(
      tokens_BxC=zeros, policy_mask_BxC=zeros + 1, env_mask_BxC=zeros,
      logprobs_BxC=zeros.astype(np.float32), truncated_B=np.zeros(len(texts), bool),
      turns=tuple(turns), env_reward_B=np.zeros(len(texts), np.float32), texts=tuple(texts),
      policy_texts=policy_texts, lengths_B=count(texts), policy_lengths_B=count(policy_texts),
      figures={})
