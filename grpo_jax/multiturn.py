"""Multi-turn rollouts: the policy's text and an environment's observations in one sequence.

    programs = turn_programs.make_programs(model_config, settings)
    episodes = multiturn.rollout(programs, params, prompt_ids_PxT, prompt_mask_PxT, rng,
                                 env, records_P, tokenizer)
    episodes.tokens_BxC, .policy_mask_BxC (loss mask: the policy's tokens), .env_mask_BxC,
    .logprobs_BxC (exact, policy tokens), .truncated_B, .turns (per row: texts, tool results),
    .policy_texts (what rewards score) and .texts (the whole episode), .lengths_B

An episode alternates policy turns and observations. The policy decodes until every row has
either ended its turn with a stop sequence (a tool call, e.g. Qwen's "```output"), emitted an
EOS (the episode is over) or used its token budget; the host then steps the environment of every
row that called it (in parallel threads: `run_python` waits on a child process), appends the
observation's tokens and decoding continues, up to `max_turns` policy turns. This module is the
host side: the environment protocol, stop sequences, and the episode loop over the jitted
programs of grpo_jax/turn_programs.py (one KV cache per row, continued across turns; its
docstring has the design).

- Stop sequences are matched on token ids inside the jitted loop (each stop string's
  tokenizations from `stop_sequences`); the host then re-checks the decoded text of the turn and
  retracts any tokens after the first stop string (a tokenization the table missed), so a
  multi-token stop string always ends the turn where its text ends.
- Budgets: `max_new_tokens` (C) counts policy + observation tokens of a row (what the trainer
  sees); an observation that does not fit ends the episode as truncated. The timeline has
  `slots` >= C slots; a row still generating when it is full is truncated. An episode is
  truncated when it ends without an EOS for want of room (tokens, timeline, turns), whatever
  happened in earlier turns. An observation over `max_observation_tokens` is cut (the
  environment's `observation_template` kept whole: `Environment`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import time
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from grpo_jax.turn_programs import ENV, HOLE, POLICY, Programs, TurnSettings


# ----------------------------------------------------------------------------- environments


@dataclasses.dataclass(frozen=True)
class EnvStep:
  """What the environment answers to one policy turn."""
  observation: str            # text appended after the turn ("" ends the episode)
  done: bool = False          # the episode ends here (no further policy turn)
  reward: float = 0.0         # added to the episode's environment reward
  info: Any = None            # e.g. {"status": "ok", "seconds": 0.1}: counted in the metrics


class Environment(Protocol):
  """An environment in a page: `reset` from a dataset record, `step` on the policy's text.

  `stop_strings` end a policy turn (the environment is stepped on the turn's text); an EOS ends
  the episode without a step. With no stop strings the environment is never stepped: every
  episode is one turn, as single-turn sampling. `step` runs in a worker thread, concurrently for
  the rows of a batch: keep per-episode data in the state it returns, not on `self`.

  Optional: `observation_template`, a str.format template with one `{output}` field (the Python
  tool's "\n{output}\n```\n"). An observation written with it that is over
  `max_observation_tokens` keeps the template's text whole and loses the end of its output
  (marked " ..."), so the policy still reads the fence that closes the output; any other
  observation over the limit loses its last tokens.
  """
  stop_strings: tuple[str, ...]

  def reset(self, record: dict) -> Any:
    ...

  def step(self, state: Any, text: str) -> tuple[Any, EnvStep]:
    ...


# ----------------------------------------------------------------------------- host loop


@dataclasses.dataclass(frozen=True)
class Turn:
  """One policy turn and what the environment answered (None: it ended without a tool call)."""
  text: str
  observation: Optional[str] = None
  info: Any = None


@dataclasses.dataclass(frozen=True)
class Episodes:
  """B = P * G episodes, prompt-major rows, compacted: real tokens only, right-padded to C.

  Two readings of an episode: the policy's (its turns' tokens and text: the loss mask, what
  rewards score as `completions`) and the whole episode's (observations included: what the
  model read, what the token budget C counts, so what `truncated_B` and `lengths_B` refer to).
  """
  tokens_BxC: np.ndarray       # int32, pad after the episode
  policy_mask_BxC: np.ndarray  # int32 1 on the policy's tokens: the loss mask
  env_mask_BxC: np.ndarray     # int32 1 on observation tokens
  logprobs_BxC: np.ndarray     # float32 sampler log-probs, 0 off the policy's tokens
  truncated_B: np.ndarray      # bool: a budget ran out (tokens, timeline, or turns)
  turns: tuple[tuple[Turn, ...], ...]
  env_reward_B: np.ndarray     # float32: sum of the environment's step rewards
  texts: tuple[str, ...]       # the whole episode's text (policy + observations)
  policy_texts: tuple[str, ...]  # the policy's text alone (its turns, in order)
  lengths_B: np.ndarray        # int32 tokens before the EOS, policy + observations
  policy_lengths_B: np.ndarray  # int32 the policy's tokens before the EOS
  figures: dict


def check_environment(env, name: Optional[str] = None) -> None:
  """ValueError naming the environment (`name`, else its class) and the field, unless it has
  `reset`, `step` and `stop_strings` a sequence of non-empty strings (() is single-turn). A bare
  string would end a turn at each of its characters, an empty one after every token."""
  name = name or type(env).__name__
  for field in ("reset", "step", "stop_strings"):
    if not hasattr(env, field):
      raise ValueError(f"environment {name} has no {field!r} (see grpo_jax/multiturn.py "
                       "Environment)")
  stops = env.stop_strings
  if (isinstance(stops, (str, bytes)) or not isinstance(stops, Sequence)
      or not all(isinstance(x, str) and x for x in stops)):
    raise ValueError(f"{name}.stop_strings = {stops!r}: a tuple of non-empty strings, each of "
                     "which ends a policy turn (e.g. ('```output',)); () for single-turn "
                     "episodes")


def stop_sequences(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token sequences that end a turn: each stop string encoded alone and after a space and a
  newline (the contexts a tokenizer merges differently), leading word-boundary pieces that
  decode to nothing removed. The host's text check covers any tokenization not listed."""
  seqs = []
  for text in stop_strings:
    for context in ("", " ", "\n"):
      ids = list(tokenizer.encode(context + text))
      while ids and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
      if context and ids and tokenizer.decode(ids[:1]).strip() not in text:
        continue  # the context merged into the first piece: covered by the host check
      if ids and tuple(ids) not in seqs:
        seqs.append(tuple(ids))
  return tuple(seqs)


def _stop_cut(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> Optional[int]:
  """The number of the turn's tokens up to the one that completes the first stop string, or
  None when the text holds none."""
  text = tokenizer.decode(ids)
  ends = [m.end() for s in stop_strings for m in [re.search(re.escape(s), text)] if m]
  if not ends:
    return None
  end = min(ends)
  for n in range(1, len(ids) + 1):  # the shortest prefix whose text reaches the stop's end
    if len(tokenizer.decode(ids[:n])) >= end:
      return n
  return len(ids)


CUT_MARK = " ..."  # ends an output that was cut short


def _template_parts(template: Optional[str]) -> Optional[tuple[str, str]]:
  """The text of `template` before and after its `{output}` field, or None."""
  try:
    parts = template.format(output="\0").split("\0") if template else []
  except (KeyError, IndexError, ValueError):
    return None
  return (parts[0], parts[1]) if len(parts) == 2 else None


def _observation_ids(tokenizer, observation: str, limit: int,
                     template: Optional[str] = None) -> list[int]:
  """The observation's tokens, at most `limit`. One written with `template` (the environment's
  `observation_template`) that does not fit keeps the template's text and as much of its output
  as fits, then CUT_MARK; if even the template does not fit, or the observation is not written
  with it, its first `limit` tokens."""
  ids = list(tokenizer.encode(observation)) if observation else []
  parts = _template_parts(template)
  if len(ids) <= limit or parts is None:
    return ids[:limit]
  before, after = parts
  if (not observation.startswith(before) or not observation.endswith(after)
      or len(observation) < len(before) + len(after)):
    return ids[:limit]
  output = observation[len(before):len(observation) - len(after)]
  encode = lambda n: list(tokenizer.encode(before + output[:n] + CUT_MARK + after))  # noqa: E731
  if len(encode(0)) > limit:
    return ids[:limit]
  lo, hi = 0, len(output)  # the most characters of the output that fit: encode(lo) fits
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if len(encode(mid)) <= limit else (lo, mid - 1)
  return encode(lo)


def _bucket(k: int, limit: int) -> int:
  return min(max(16, -(-k // 16) * 16), max(16, -(-limit // 16) * 16))


@dataclasses.dataclass
class _Rows:
  """The host's record of B running episodes, updated turn by turn."""
  env_states: list
  turns: list[list[Turn]]
  env_reward: np.ndarray   # float32: sum of the environment's step rewards
  finished: np.ndarray     # bool
  # The host decides truncation from how each episode ended, not from the device's flag: that
  # one is sticky, and a turn the host cut at a stop string ran to its budget only in tokens the
  # host retracted (the row is resumed, or ended by its environment).
  truncated: np.ndarray
  eos: np.ndarray          # bool: the episode ended with an EOS (its last policy token)
  keep: np.ndarray         # [B, S] bool: slots the host retracted (after a stop string)
  turn_start: np.ndarray   # int64: slot of the first token of the row's current turn


def rollout(programs: Programs, params, prompt_tokens_PxT, prompt_mask_PxT, rng,
            env: Environment, records_P: Sequence[dict], tokenizer, *,
            max_workers: int = 4, to_host=np.asarray) -> Episodes:
  """G episodes per prompt with `env`: decode, step the environments, continue (module doc).
  `to_host` fetches a device array (the driver's gathers a multi-host one)."""
  check_environment(env)
  settings = programs.settings
  s = settings.sampling
  G, C, S = s.num_samples, s.max_new_tokens, settings.slots
  B = len(records_P) * G
  template = getattr(env, "observation_template", None)
  rows = _Rows(env_states=[env.reset(dict(records_P[b // G])) for b in range(B)],
               turns=[[] for _ in range(B)], env_reward=np.zeros(B, np.float32),
               finished=np.zeros(B, bool), truncated=np.zeros(B, bool), eos=np.zeros(B, bool),
               keep=np.ones((B, S), bool), turn_start=np.zeros(B, np.int64))
  timer = {"decode_s": 0.0, "env_s": 0.0}
  t0 = time.perf_counter()
  prefix, state = programs.start(params, prompt_tokens_PxT, prompt_mask_PxT, rng)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, max_workers))
  try:
    for turn in range(settings.max_turns):
      state = programs.decode(params, prefix, state)
      tokens, kind, index = (to_host(x) for x in (state.tokens_BxS, state.kind_BxS, state.index))
      index = int(index)
      timer["decode_s"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      calls = _end_turns(rows, tokens, kind, index, turn, settings, env, tokenizer)
      if not calls:
        break
      resume, obs_ids = _step_envs(rows, pool, env, calls, kind, settings, tokenizer, template)
      K, obs, obs_mask = _observation_block(rows, resume, obs_ids, index, settings)
      timer["env_s"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      state = programs.inject(params, prefix, state, rows.keep, obs, obs_mask, resume,
                              rows.finished)
      rows.turn_start = np.where(resume, index + 1 + K, rows.turn_start)
      if not resume.any():
        break
  finally:
    pool.shutdown(wait=True)
  final = {name: to_host(x) for name, x in (("tokens", state.tokens_BxS), ("kind", state.kind_BxS),
                                            ("logprobs", state.logprobs_BxS))}
  timer["decode_s"] += time.perf_counter() - t0
  final["kind"] = np.where(rows.keep, final["kind"], HOLE)
  final["truncated"], final["eos"] = rows.truncated, rows.eos
  return _compact(final, rows.turns, rows.env_reward, C, s.pad_id, tokenizer, timer)


def _end_turns(rows: _Rows, tokens, kind, index: int, turn: int, settings: TurnSettings, env,
               tokenizer) -> list[tuple[int, str]]:
  """Reads the turn each running row decoded (its policy slots up to `index`): [(row, text)] of
  the tool calls to run. A turn without a stop string (an EOS, or a budget) ends the episode;
  a tool call at the turn limit ends it truncated, the call not run."""
  calls = []
  for b in np.flatnonzero(~rows.finished):
    slots = np.flatnonzero(kind[b, rows.turn_start[b]:index + 1] == POLICY) + rows.turn_start[b]
    ids = tokens[b, slots].tolist()
    cut = _stop_cut(tokenizer, ids, env.stop_strings) if ids else None
    if cut is None:  # EOS, or a budget: the episode is over
      rows.turns[b].append(Turn(tokenizer.decode(ids)))
      rows.eos[b] = bool(ids) and ids[-1] in settings.sampling.eos_ids
      rows.finished[b], rows.truncated[b] = True, not rows.eos[b]
      continue
    rows.keep[b, slots[cut:]] = False
    text = tokenizer.decode(ids[:cut])
    if turn + 1 < settings.max_turns:
      calls.append((b, text))
    else:  # the turn limit: the call is not run
      rows.turns[b].append(Turn(text))
      rows.finished[b] = rows.truncated[b] = True
  return calls


def _step_envs(rows: _Rows, pool, env, calls, kind, settings: TurnSettings, tokenizer,
               template) -> tuple[np.ndarray, dict]:
  """Steps the environments of `calls` in the pool's threads: (resume [B] bool, the rows whose
  next turn starts; {row: observation ids}). An observation that does not fit the row's token
  budget ends its episode truncated."""
  futures = [(b, text, pool.submit(env.step, rows.env_states[b], text)) for b, text in calls]
  count = ((kind != HOLE) & rows.keep).sum(1)
  resume, obs_ids = np.zeros(len(rows.finished), bool), {}
  for b, text, future in futures:
    rows.env_states[b], out = future.result()
    rows.env_reward[b] += float(out.reward)
    ids = _observation_ids(tokenizer, out.observation, settings.max_observation_tokens,
                           template)
    if count[b] + len(ids) + (0 if out.done else 1) > settings.sampling.max_new_tokens:
      ids, rows.truncated[b] = [], True  # no room: ends truncated
    # The next turn starts from the observation's last token: an empty one ends the episode.
    resume[b] = bool(ids) and not out.done and not rows.truncated[b]
    rows.finished[b] = not resume[b]
    obs_ids[b] = ids
    rows.turns[b].append(Turn(text, tokenizer.decode(ids), out.info))
  return resume, obs_ids


def _observation_block(rows: _Rows, resume, obs_ids: dict, index: int,
                       settings: TurnSettings) -> tuple[int, np.ndarray, np.ndarray]:
  """(K, [B, K] observation tokens left-aligned, their mask), K bucketed. When the timeline
  cannot take the block and a further turn, every episode stops (`resume` cleared in place)."""
  B = len(resume)
  K = _bucket(max(len(v) for v in obs_ids.values()), settings.max_observation_tokens)
  if index + K + 2 > settings.slots - 1:  # no room for the block and a turn: all stop
    rows.truncated |= resume
    rows.finished[:] = True
    resume[:] = False
    for b in obs_ids:  # the calls ran; their observations are not appended
      rows.turns[b][-1] = dataclasses.replace(rows.turns[b][-1], observation="")
    obs_ids = {}
  obs = np.full((B, K), settings.sampling.pad_id, np.int32)
  obs_mask = np.zeros((B, K), np.int32)
  for b, ids in obs_ids.items():
    obs[b, :len(ids)] = ids
    obs_mask[b, :len(ids)] = 1
  return K, obs, obs_mask


def _compact(final: dict, turns, env_reward, C: int, pad_id: int, tokenizer,
             timer: dict) -> Episodes:
  """Each row's real slots in order, right-padded to C; the episode figures."""
  B = final["tokens"].shape[0]
  tokens = np.full((B, C), pad_id, np.int32)
  policy, env_mask = np.zeros((B, C), np.int32), np.zeros((B, C), np.int32)
  logprobs = np.zeros((B, C), np.float32)
  for b in range(B):
    slots = np.flatnonzero(final["kind"][b] != HOLE)
    if len(slots) > C:
      raise AssertionError(f"episode {b} has {len(slots)} tokens > budget {C}")
    n = len(slots)
    tokens[b, :n] = final["tokens"][b, slots]
    policy[b, :n] = final["kind"][b, slots] == POLICY
    env_mask[b, :n] = final["kind"][b, slots] == ENV
    logprobs[b, :n] = final["logprobs"][b, slots] * policy[b, :n]
  texts = tuple(tokenizer.decode_batch(tokens, policy | env_mask))
  policy_texts = tuple(tokenizer.decode_batch(tokens, policy))
  calls = [sum(t.observation is not None for t in row) for row in turns]
  statuses: dict[str, int] = {}
  for row in turns:
    for t in row:
      if t.observation is not None:
        status = (t.info or {}).get("status", "ok") if isinstance(t.info, dict) else "ok"
        statuses[status] = statuses.get(status, 0) + 1
  real = max(int((policy | env_mask).sum()), 1)
  figures = {"episode/turns": float(np.mean([len(row) for row in turns])),
             "episode/tool_calls": float(np.mean(calls)),
             "episode/env_token_fraction": float(env_mask.sum() / real),
             "episode/tool_s": timer["env_s"], "episode/decode_s": timer["decode_s"]}
  total_calls = max(sum(calls), 1)
  for status, n in sorted(statuses.items()):
    figures[f"episode/tool_{status}"] = n / total_calls
  eos = final["eos"].astype(np.int32)
  return Episodes(
      tokens_BxC=tokens, policy_mask_BxC=policy, env_mask_BxC=env_mask, logprobs_BxC=logprobs,
      truncated_B=final["truncated"], turns=tuple(tuple(row) for row in turns),
      env_reward_B=env_reward, texts=texts, policy_texts=policy_texts,
      lengths_B=((policy | env_mask).sum(1) - eos).astype(np.int32),
      policy_lengths_B=(policy.sum(1) - eos).astype(np.int32), figures=figures)
