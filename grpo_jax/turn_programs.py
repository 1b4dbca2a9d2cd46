"""The jitted programs of multi-turn episodes: the policy's turns and the observations written
into one KV cache per row (the host side, grpo_jax/multiturn.py, runs them).

    programs = turn_programs.make_programs(model_config, TurnSettings(sampling, stop_seqs, ...))
    prefix, state = programs.start(params, prompt_tokens_PxT, prompt_mask_PxT, rng)
    state = programs.decode(params, prefix, state)        # the turn, until every row stops
    state = programs.inject(params, prefix, state, keep_BxS, obs_BxK, obs_mask_BxK, resume_B,
                            done_B)                       # observations in, the next turn's draw

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
- Stop sequences are matched on token ids inside the decode loop (`TurnSettings.stop_seqs`).
  A row that fills its token budget C, or the timeline while still generating, is marked
  truncated (the host decides an episode's truncation from how it ended: multiturn.rollout).
- Three jitted programs: `start` (prefill + first draw), `decode` (the turn's while_loop),
  `inject` (retraction, observation tokens, the first draw of the next turn); `inject` compiles
  once per observation width K (the host buckets it to multiples of 16).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from grpo_jax import models
from grpo_jax.models import KVCache, ModelConfig
from grpo_jax.draws import sample_tokens
from grpo_jax.sampling import SamplingSettings, is_eos, prefill_and_draw

HOLE, POLICY, ENV = 0, 1, 2  # kind of a timeline slot


@dataclasses.dataclass(frozen=True)
class TurnSettings:
  """Static (hashable) multi-turn settings: a change recompiles.

  sampling:   the draw (num_samples, temperature, filters, eos_ids, pad_id); its
              max_new_tokens is C, the per-row budget of policy + observation tokens.
  stop_seqs:  token-id sequences that end a policy turn (`multiturn.stop_sequences`).
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


def _uniforms(rng: jax.Array, draw: jax.Array, rows: int) -> jax.Array:
  """The uniforms of the episode's `draw`-th decode step, [rows, 2]: one key per step of the
  shared timeline (fold_in(rng, draw)), rows drawing in turn from it."""
  return jax.random.uniform(jax.random.fold_in(rng, draw), (rows, 2), jnp.float32)


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
  prefix, prompt_len_P, tokens_B, logprobs_B = prefill_and_draw(
      params, config, s, prompt_tokens_PxT, prompt_mask_PxT, _uniforms(rng, 0, B))
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
    u_Bx2 = _uniforms(state.rng, state.draws, state.active_B.shape[0])
    tokens_B, logprobs_B = sample_tokens(logits_Bx1xV[:, 0], u_Bx2, settings.sampling)
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
  tokens_B, logprobs_B = sample_tokens(logits_BxV, _uniforms(state.rng, state.draws, B),
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
