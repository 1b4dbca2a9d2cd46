"""Multi-turn rollouts: the policy's text and an environment's observations in one sequence.

    programs = multiturn.make_programs(model_config, settings, mesh)
    episodes = multiturn.rollout(programs, params, prompt_ids_PxT, prompt_mask_PxT, rng,
                                 env, records_P, tokenizer)
    episodes.tokens_BxC, .policy_mask_BxC (loss mask: the policy's tokens), .env_mask_BxC,
    .logprobs_BxC (exact, policy tokens), .truncated_B, .turns (per row: texts, tool results),
    .policy_texts (what rewards score) and .texts (the whole episode), .lengths_B

An episode alternates policy turns and observations. The policy decodes until every row has
either ended its turn with a stop sequence (a tool call, e.g. Qwen's "```output"), emitted an
EOS (the episode is over) or used its token budget; the host then steps the environment of every
row that called it (in parallel threads: `run_python` waits on a child process), appends the
observation's tokens and decoding continues, up to `max_turns` policy turns.

Design:
- One KV cache per row for the whole episode, continued across turns (never re-encoding the
  prefix): the prompt is prefilled once per group (`models.forward(prefix=...)`, as in
  `sampling`), observations are written into the same cache by one forward over their tokens.
- A shared timeline of S cache slots: every decode step writes one slot for all rows, an
  observation block K + 1 slots. A row that is not generating (waiting for its tool, finished)
  writes a hole: an invalid slot that no query attends to. RoPE positions count real tokens
  only, and Gemma 3's sliding windows measure distance in them, not in slots (the cache keeps
  each slot's position), so a row's sequence with its holes removed is exactly the sequence the
  trainer teacher-forces: policy log-probs stay exact (tests/test_multiturn.py and
  tests/test_sliding_window.py compare them with `train_step.sequence_logprobs`). Rows that
  wait or have finished never stall the others: the decode loop runs while any row generates;
  finished rows cost their slot's compute only.
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
- Three jitted programs: `start` (prefill + first draw), `decode` (the turn's while_loop),
  `inject` (retraction, observation tokens, the first draw of the next turn); `inject` compiles
  once per observation width K, bucketed to multiples of 16.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import re
import time
from typing import Any, Optional, Protocol, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from grpo_jax import models
from grpo_jax.models import KVCache, ModelConfig
from grpo_jax.sampling import SamplingSettings, is_eos, prefill, sample_tokens

HOLE, POLICY, ENV = 0, 1, 2  # kind of a timeline slot


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


# ----------------------------------------------------------------------------- settings, state


@dataclasses.dataclass(frozen=True)
class TurnSettings:
  """Static (hashable) multi-turn settings: a change recompiles.

  sampling:   the draw (num_samples, temperature, filters, eos_ids, pad_id); its
              max_new_tokens is C, the per-row budget of policy + observation tokens.
  stop_seqs:  token-id sequences that end a policy turn (`stop_sequences`).
  slots:      S >= C, the timeline's capacity (holes included).
  """
  sampling: SamplingSettings
  stop_seqs: tuple[tuple[int, ...], ...] = ()
  max_turns: int = 4
  slots: int = 0
  max_observation_tokens: int = 64

  def __post_init__(self):
    C = self.sampling.max_new_tokens
    if self.slots < C:
      raise ValueError(f"TurnSettings: slots ({self.slots}) must be >= max_new_tokens ({C})")
    if self.max_turns < 1 or self.max_observation_tokens < 1:
      raise ValueError("TurnSettings: max_turns and max_observation_tokens must be >= 1")
    if any(not seq for seq in self.stop_seqs):
      raise ValueError("TurnSettings: an empty stop sequence")

  @property
  def stop_len(self) -> int:
    return max([len(s) for s in self.stop_seqs] or [1])


@flax.struct.dataclass
class TurnState:
  """Traced state of an episode batch (B rows, S timeline slots)."""
  index: jax.Array        # int32 []: slots < index are in the cache
  draws: jax.Array        # int32 []: decode steps so far (fold_in counter of the draws)
  pending_B: jax.Array    # bool: slot `index` holds a drawn, not yet fed policy token
  active_B: jax.Array     # bool: generating in this turn
  stopped_B: jax.Array    # bool: ended its turn with a stop sequence (waits for the env)
  done_B: jax.Array       # bool: the episode is over
  truncated_B: jax.Array  # bool: over because a budget ran out
  count_B: jax.Array      # int32: real completion tokens (policy + env), pending included
  recent_BxL: jax.Array   # int32: the turn's last L policy tokens (-1 before the turn's start)
  tokens_BxS: jax.Array   # int32
  kind_BxS: jax.Array     # int8: HOLE / POLICY / ENV
  logprobs_BxS: jax.Array  # float32, policy slots
  prompt_len_B: jax.Array  # int32
  cache: KVCache
  rng: jax.Array


def _stop_table(settings: TurnSettings) -> tuple[np.ndarray, np.ndarray]:
  """([M, L] right-aligned stop ids, -2 where shorter; [M, L] bool: compared positions)."""
  L = settings.stop_len
  # No stop sequences: one that no token equals (ids are >= 0, `recent` holds -1 before a
  # turn's start); a row without compared positions would match every token.
  seqs = settings.stop_seqs or ((-3,),)
  table = np.full((len(seqs), L), -2, np.int32)
  used = np.zeros((len(seqs), L), bool)
  for m, seq in enumerate(seqs):
    table[m, L - len(seq):] = seq
    used[m, L - len(seq):] = True
  return table, used


def _record(state: TurnState, tokens_B, logprobs_B, drew_B, settings: TurnSettings) -> TurnState:
  """Writes the rows' drawn tokens at slot `index` (holes elsewhere) and updates their status."""
  s = settings.sampling
  tokens_B = jnp.where(drew_B, tokens_B, s.pad_id)
  slot = state.index
  put = lambda arr, val: lax.dynamic_update_slice_in_dim(arr, val[:, None], slot, axis=1)  # noqa: E731
  recent_BxL = jnp.where(drew_B[:, None], jnp.concatenate(
      [state.recent_BxL[:, 1:], tokens_B[:, None]], axis=1), state.recent_BxL)
  table, used = _stop_table(settings)
  match_BxM = jnp.all((recent_BxL[:, None, :] == table[None]) | ~used[None], axis=-1)
  stop_B = drew_B & jnp.any(match_BxM, axis=-1)
  eos_B = is_eos(tokens_B, s.eos_ids) & drew_B
  count_B = state.count_B + drew_B
  full_B = drew_B & ~eos_B & ~stop_B & (count_B >= s.max_new_tokens)
  return state.replace(
      pending_B=drew_B,
      active_B=state.active_B & drew_B & ~eos_B & ~stop_B & ~full_B,
      stopped_B=state.stopped_B | stop_B,
      done_B=state.done_B | eos_B | full_B,
      truncated_B=state.truncated_B | full_B,
      count_B=count_B,
      recent_BxL=recent_BxL,
      tokens_BxS=put(state.tokens_BxS, tokens_B),
      kind_BxS=put(state.kind_BxS, jnp.where(drew_B, POLICY, HOLE).astype(jnp.int8)),
      logprobs_BxS=put(state.logprobs_BxS, jnp.where(drew_B, logprobs_B, 0.0)))


def _positions(state: TurnState) -> jax.Array:
  """[B] position of the next token fed: prompt length + real slots already in the cache."""
  fed_B = jnp.sum((state.kind_BxS != HOLE) & (jnp.arange(state.kind_BxS.shape[1]) < state.index),
                  axis=1)
  return state.prompt_len_B + fed_B.astype(jnp.int32)


# ----------------------------------------------------------------------------- jitted programs


def start(params, prompt_tokens_PxT, prompt_mask_PxT, rng, *, config: ModelConfig,
          settings: TurnSettings) -> tuple[KVCache, TurnState]:
  """Prefills each prompt once (shared by its G rows) and draws every row's first token."""
  s = settings.sampling
  P = prompt_tokens_PxT.shape[0]
  G, S = s.num_samples, settings.slots
  B = P * G
  prefix, logits_PxV, prompt_len_P = prefill(params, config, prompt_tokens_PxT, prompt_mask_PxT)
  tokens_B, logprobs_B = sample_tokens(jnp.repeat(logits_PxV, G, axis=0),
                                       jax.random.fold_in(rng, 0), s)
  state = TurnState(
      index=jnp.zeros((), jnp.int32), draws=jnp.ones((), jnp.int32),
      pending_B=jnp.zeros((B,), bool), active_B=jnp.ones((B,), bool),
      stopped_B=jnp.zeros((B,), bool), done_B=jnp.zeros((B,), bool),
      truncated_B=jnp.zeros((B,), bool), count_B=jnp.zeros((B,), jnp.int32),
      recent_BxL=jnp.full((B, settings.stop_len), -1, jnp.int32),
      tokens_BxS=jnp.full((B, S), s.pad_id, jnp.int32),
      kind_BxS=jnp.zeros((B, S), jnp.int8), logprobs_BxS=jnp.zeros((B, S), jnp.float32),
      prompt_len_B=jnp.repeat(prompt_len_P, G).astype(jnp.int32),
      cache=models.init_cache(config, B, S), rng=rng)
  return prefix, _record(state, tokens_B, logprobs_B, jnp.ones((B,), bool), settings)


def decode(params, prefix: KVCache, state: TurnState, *, config: ModelConfig,
           settings: TurnSettings) -> TurnState:
  """Decodes while any row is active and the timeline has room: feeds the pending tokens,
  draws the next one for the active rows."""
  S = settings.slots
  tables = models.rope_tables(config, prefix.max_len + S + 1)  # positions < prompt + slots

  def step_fn(state: TurnState) -> TurnState:
    feed_B = state.pending_B
    pos_Bx1 = _positions(state)[:, None]
    cache = state.cache.replace(index=state.index)
    logits_Bx1xV, cache = models.forward(
        params, config, state.tokens_BxS[:, state.index][:, None], pos_Bx1,
        feed_B[:, None].astype(jnp.int32), cache, prefix=prefix, rope_tables=tables)
    tokens_B, logprobs_B = sample_tokens(logits_Bx1xV[:, 0],
                                         jax.random.fold_in(state.rng, state.draws),
                                         settings.sampling)
    state = state.replace(cache=cache, index=state.index + 1, draws=state.draws + 1)
    return _record(state, tokens_B, logprobs_B, state.active_B, settings)

  cond_fn = lambda st: jnp.any(st.active_B) & (st.index + 1 < S)  # noqa: E731
  state = lax.while_loop(cond_fn, step_fn, state)
  # Rows still generating when the timeline is full: truncated.
  full_B = state.active_B & (state.index + 1 >= S)
  return state.replace(active_B=state.active_B & ~full_B, done_B=state.done_B | full_B,
                       truncated_B=state.truncated_B | full_B)


def inject(params, prefix: KVCache, state: TurnState, keep_BxS, obs_BxK, obs_mask_BxK,
           resume_B, done_B, *, config: ModelConfig, settings: TurnSettings) -> TurnState:
  """Retracts the slots the host drops (`keep_BxS` 0), feeds the pending tokens and the
  observations (left-aligned in [B, K]) at slots [index, index + K + 1), draws the first token
  of the next turn for the `resume_B` rows; `done_B` rows end their episode."""
  B, K = obs_BxK.shape
  keep_BxS = keep_BxS.astype(bool)
  cache = state.cache
  cache = cache.replace(valid_BxS=cache.valid_BxS & keep_BxS, index=state.index)
  pending_B = state.pending_B & keep_BxS[:, state.index]
  kind_BxS = jnp.where(keep_BxS, state.kind_BxS, HOLE).astype(jnp.int8)
  state = state.replace(cache=cache, pending_B=pending_B, kind_BxS=kind_BxS,
                        logprobs_BxS=jnp.where(keep_BxS, state.logprobs_BxS, 0.0),
                        count_B=jnp.sum(kind_BxS != HOLE, axis=1).astype(jnp.int32))
  obs_mask_BxK = obs_mask_BxK.astype(bool)
  tokens_BxT = jnp.concatenate([state.tokens_BxS[:, state.index][:, None], obs_BxK], axis=1)
  feed_BxT = jnp.concatenate([pending_B[:, None], obs_mask_BxK], axis=1)
  pos_BxT = _positions(state)[:, None] + jnp.cumsum(feed_BxT, axis=1) - feed_BxT
  hidden_BxTxE, cache = models.forward(params, config, tokens_BxT, pos_BxT,
                                       feed_BxT.astype(jnp.int32), state.cache, prefix=prefix,
                                       return_hidden=True)
  T = K + 1
  last_B = (T - 1) - jnp.argmax(feed_BxT[:, ::-1], axis=1)  # the last real token fed
  hidden_Bx1xE = jnp.take_along_axis(hidden_BxTxE, last_B[:, None, None], axis=1)
  logits_BxV = models.unembed(params, config, hidden_Bx1xE)[:, 0]
  put = lambda arr, val: lax.dynamic_update_slice_in_dim(arr, val, state.index + 1, axis=1)  # noqa: E731
  n_obs_B = jnp.sum(obs_mask_BxK, axis=1).astype(jnp.int32)
  state = state.replace(
      cache=cache, index=state.index + 1 + K,
      tokens_BxS=put(state.tokens_BxS, jnp.where(obs_mask_BxK, obs_BxK,
                                                 settings.sampling.pad_id)),
      kind_BxS=put(state.kind_BxS, jnp.where(obs_mask_BxK, ENV, HOLE).astype(jnp.int8)),
      count_B=state.count_B + n_obs_B,
      active_B=resume_B, stopped_B=jnp.zeros_like(resume_B), done_B=state.done_B | done_B,
      recent_BxL=jnp.full_like(state.recent_BxL, -1))
  tokens_B, logprobs_B = sample_tokens(logits_BxV, jax.random.fold_in(state.rng, state.draws),
                                       settings.sampling)
  state = state.replace(draws=state.draws + 1)
  return _record(state, tokens_B, logprobs_B, resume_B, settings)


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of one (model, settings): `start`, `decode`, `inject`."""
  settings: TurnSettings
  start: Any
  decode: Any
  inject: Any


def make_programs(config: ModelConfig, settings: TurnSettings) -> Programs:
  """Jitted once per (config, settings); inputs keep the shardings they were placed with
  (prompt rows over the batch axes: GSPMD carries them through the state)."""
  return Programs(
      settings=settings,
      start=jax.jit(functools.partial(start, config=config, settings=settings)),
      decode=jax.jit(functools.partial(decode, config=config, settings=settings),
                     donate_argnames=("state",)),
      inject=jax.jit(functools.partial(inject, config=config, settings=settings),
                     donate_argnames=("state",)))


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
  env_states = [env.reset(dict(records_P[b // G])) for b in range(B)]
  turns: list[list[Turn]] = [[] for _ in range(B)]
  env_reward = np.zeros(B, np.float32)
  finished = np.zeros(B, bool)
  # The host decides truncation from how each episode ended, not from the device's flag: that
  # one is sticky, and a turn the host cut at a stop string ran to its budget only in tokens the
  # host retracted (the row is resumed, or ended by its environment).
  truncated = np.zeros(B, bool)
  eos = np.zeros(B, bool)         # the episode ended with an EOS (its last policy token)
  keep = np.ones((B, S), bool)    # slots the host retracted (after a stop string)
  turn_start = np.zeros(B, np.int64)  # slot of the first token of the row's current turn
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
      calls = []
      for b in np.flatnonzero(~finished):
        slots = np.flatnonzero(kind[b, turn_start[b]:index + 1] == POLICY) + turn_start[b]
        ids = tokens[b, slots].tolist()
        cut = _stop_cut(tokenizer, ids, env.stop_strings) if ids else None
        if cut is None:  # EOS, or a budget: the episode is over
          turns[b].append(Turn(tokenizer.decode(ids)))
          eos[b] = bool(ids) and ids[-1] in s.eos_ids
          finished[b], truncated[b] = True, not eos[b]
          continue
        keep[b, slots[cut:]] = False
        text = tokenizer.decode(ids[:cut])
        if turn + 1 < settings.max_turns:
          calls.append((b, text))
        else:  # the turn limit: the call is not run
          turns[b].append(Turn(text))
          finished[b] = truncated[b] = True
      if not calls:
        break
      futures = [(b, text, pool.submit(env.step, env_states[b], text)) for b, text in calls]
      count = ((kind != HOLE) & keep).sum(1)
      resume, obs_ids = np.zeros(B, bool), {}
      for b, text, future in futures:
        env_states[b], out = future.result()
        env_reward[b] += float(out.reward)
        ids = _observation_ids(tokenizer, out.observation, settings.max_observation_tokens,
                               template)
        if count[b] + len(ids) + (0 if out.done else 1) > C:  # no room: ends truncated
          ids, truncated[b] = [], True
        # The next turn starts from the observation's last token: an empty one ends the episode.
        resume[b] = bool(ids) and not out.done and not truncated[b]
        finished[b] = not resume[b]
        obs_ids[b] = ids
        turns[b].append(Turn(text, tokenizer.decode(ids), out.info))
      K = _bucket(max(len(v) for v in obs_ids.values()), settings.max_observation_tokens)
      if index + K + 2 > S - 1:  # the timeline cannot take the block and a turn: all stop
        truncated |= resume
        finished[:] = True
        resume[:] = False
        for b in obs_ids:  # the calls ran; their observations are not appended
          turns[b][-1] = dataclasses.replace(turns[b][-1], observation="")
        obs_ids = {}
      obs = np.full((B, K), s.pad_id, np.int32)
      obs_mask = np.zeros((B, K), np.int32)
      for b, ids in obs_ids.items():
        obs[b, :len(ids)] = ids
        obs_mask[b, :len(ids)] = 1
      timer["env_s"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      state = programs.inject(params, prefix, state, keep, obs, obs_mask, resume, finished)
      turn_start = np.where(resume, index + 1 + K, turn_start)
      if not resume.any():
        break
  finally:
    pool.shutdown(wait=True)
  final = {name: to_host(x) for name, x in (("tokens", state.tokens_BxS), ("kind", state.kind_BxS),
                                            ("logprobs", state.logprobs_BxS))}
  timer["decode_s"] += time.perf_counter() - t0
  final["kind"] = np.where(keep, final["kind"], HOLE)
  final["truncated"], final["eos"] = truncated, eos
  return _compact(final, turns, env_reward, C, s.pad_id, tokenizer, timer)


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
