"""Continuous batching: G completions of P prompts decoded in W <= P * G slots, inside jit.

    out = decode(params, config, settings, prompt_tokens_PxT, prompt_mask_PxT, rng)
    # settings.continuous, decode_slots = W (0: one per row); the static batch's samples

A static batch decodes all B = P * G rows until the longest one ends: on GSM8K-like lengths
(mean ~40% of the budget, a tail to it) most of its decode work belongs to rows that have
ended. Here the ended rows' work is saved, with no host round trip:

- The prompts are prefilled once, as in the static path, and every sample's first token drawn
  from its prompt's last logits (`sampling.prefill_and_draw`).
- W < B slots: when a sample ends (EOS, stop id, budget) its slot takes the next pending sample
  (in sample order) at the end of the same step (at most W / 4 per step), copying its prompt's
  prefill into the slot's prefix rows. W = B (`decode_slots` 0): slot s holds sample s and the
  group shares its prompt's rows, as in the static path, until the first compaction.
- Each slot's completion cache is a ring (`KVCache.ring`) written at step mod (N - 1), which
  grows with the steps as the static path's cache does (before step N - 1 no sample is older
  than the steps run); a sample occupies at most N - 1 consecutive steps, so it never meets its
  own tokens; a slot's ring row is invalidated when a new sample takes the slot.
- Once no sample is pending and at most half the slots are live, the live slots are compacted
  into W / 2 slots (a loop of half the width), down to W / 4 (not below 16 slots): the tail of
  long samples does not keep W slots busy. After that the ring is read at its full N - 1 slots.
- Draws are keyed per sample and position (`draws.sample_keys`), as in the static path: a
  sample's tokens and log-probs do not depend on its slot or step (equal to the static batch's
  up to float rounding in the attention's sums: tests/test_slots.py).

What it saves depends on the cost of a step against its rows: on CPU a step costs a fixed part
(the loop's dispatch, the draw) plus a part per row, so one slot per row with the tail compacted
measured best (BENCHMARKS.md, "Rollout").
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from grpo_jax import models, sampling, sharding
from grpo_jax.draws import row_uniforms, sample_keys, sample_tokens
from grpo_jax.models import KVCache, ModelConfig, per_layer

Params = Any
MIN_WIDTH_DIVISOR = 4  # the tail's compaction stops at W / 4 slots,
MIN_WIDTH = 16         # and at 16: a narrower loop saves less than its compile costs


@flax.struct.dataclass
class Slots:
  """The W decode slots."""
  sample_W: jax.Array   # int32: the sample a slot holds (B before the first fill)
  drawn_W: jax.Array    # int32: tokens of that sample drawn so far (the next one's position)
  last_W: jax.Array     # int32: its last drawn token (fed at the next step)
  live_W: jax.Array     # bool: the sample still draws tokens
  own: KVCache          # [W, ..., N - 1] ring: the sample's fed tokens
  # [W, ..., T]: a copy of the sample's prompt's prefill; None while slot s holds sample s
  # (one slot per row, before the first compaction): the group then shares its prompt's rows.
  prefix: Optional[KVCache]


@flax.struct.dataclass
class DecodeState:
  slots: Slots
  next_sample: jax.Array  # int32 []: the first sample no slot has taken
  step: jax.Array         # int32 []: steps run (the ring's write index is step mod N - 1)
  tokens_BxN: jax.Array
  logprobs_BxN: jax.Array
  # In-flight updates (`decode_first` / `decode_rest`): which weights drew each token, 0 the
  # first, 1 the update's; None in a plain decode.
  versions_BxN: Optional[jax.Array] = None


@flax.struct.dataclass
class Prompts:
  """What every refill reads: the prompts' prefill and each sample's first token."""
  prefix: KVCache       # [P, ..., T]
  length_P: jax.Array   # int32 real prompt tokens
  first_B: jax.Array    # int32 each sample's token 0
  ended_B: jax.Array    # bool: the sample ends at token 0 (an EOS, or a budget of 1)


def widths(settings: sampling.SamplingSettings, rows: int) -> list[int]:
  """The slot count of each loop: W, W / 2, ... down to W / 4 and not below 16, W <= rows."""
  width = min(settings.decode_slots or rows, rows)
  floor = max(MIN_WIDTH, width // MIN_WIDTH_DIVISOR)
  out = [width]
  while out[-1] // 2 >= floor:
    out.append(out[-1] // 2)
  return out


def _gather_rows(cache: KVCache, rows_M) -> KVCache:
  take = lambda a: a[rows_M]  # noqa: E731
  return cache.replace(k_BxKxDxS=per_layer(take, cache.k_BxKxDxS),
                       v_BxKxSxD=per_layer(take, cache.v_BxKxSxD),
                       valid_BxS=cache.valid_BxS[rows_M], pos_BxS=cache.pos_BxS[rows_M])


def _set_rows(cache: KVCache, slots_M, rows: KVCache) -> KVCache:
  """`cache` with rows `slots_M` replaced by `rows` (slot index W: dropped)."""
  put = lambda a, b: a.at[slots_M].set(b, mode="drop")  # noqa: E731
  return cache.replace(k_BxKxDxS=per_layer(put, cache.k_BxKxDxS, rows.k_BxKxDxS),
                       v_BxKxSxD=per_layer(put, cache.v_BxKxSxD, rows.v_BxKxSxD),
                       valid_BxS=put(cache.valid_BxS, rows.valid_BxS),
                       pos_BxS=put(cache.pos_BxS, rows.pos_BxS))


def _prompt_of(sample_W, prompts: Prompts, num_samples: int) -> jax.Array:
  """The prompt row of each sample id (B, a slot no sample has taken yet: the last prompt)."""
  return jnp.minimum(sample_W, prompts.first_B.shape[0] - 1) // num_samples


def refill(state: DecodeState, prompts: Prompts, num_samples: int, most: int) -> DecodeState:
  """Up to `most` free slots take the next pending samples (in sample order)."""
  sl = state.slots
  W, B = sl.live_W.shape[0], prompts.first_B.shape[0]
  slot_M = jnp.nonzero(~sl.live_W, size=most, fill_value=W)[0]
  sample_M = state.next_sample + jnp.arange(most, dtype=jnp.int32)
  take_M = (slot_M < W) & (sample_M < B)
  slot_M = jnp.where(take_M, slot_M, W)
  sample_M = jnp.minimum(sample_M, B - 1)
  put = lambda a, b: a.at[slot_M].set(b, mode="drop")  # noqa: E731
  own = sl.own.replace(valid_BxS=put(sl.own.valid_BxS, False))
  slots = sl.replace(
      sample_W=put(sl.sample_W, sample_M), drawn_W=put(sl.drawn_W, 1),
      last_W=put(sl.last_W, prompts.first_B[sample_M]),
      live_W=put(sl.live_W, ~prompts.ended_B[sample_M]), own=own,
      prefix=_set_rows(sl.prefix, slot_M, _gather_rows(
          prompts.prefix, _prompt_of(sample_M, prompts, num_samples))))
  return state.replace(slots=slots,
                       next_sample=state.next_sample + jnp.sum(take_M, dtype=jnp.int32))


def _maybe_refill(state: DecodeState, prompts: Prompts, num_samples: int, most: int):
  B = prompts.first_B.shape[0]
  due = jnp.any(~state.slots.live_W) & (state.next_sample < B)
  return lax.cond(due, lambda s: refill(s, prompts, num_samples, most), lambda s: s, state)


def decode_step(state: DecodeState, params: Params, config: ModelConfig,
                settings: sampling.SamplingSettings, prompts: Prompts, rng, tables,
                version: int = 0):
  """One token for every live slot, recorded at its sample's row and position."""
  sl = state.slots
  B, N = state.tokens_BxN.shape
  G = settings.num_samples
  own = sl.own.replace(index=state.step % sl.own.max_len)
  position_W = prompts.length_P[_prompt_of(sl.sample_W, prompts, G)] + sl.drawn_W - 1
  logits_Wx1xV, own = models.forward(
      params, config, sl.last_W[:, None], position_W[:, None],
      sl.live_W[:, None].astype(jnp.int32), own,
      prefix=prompts.prefix if sl.prefix is None else sl.prefix, rope_tables=tables)
  u_Wx2 = row_uniforms(sample_keys(rng, sl.sample_W, sl.drawn_W))
  tokens_W, logprobs_W = sample_tokens(logits_Wx1xV[:, 0], u_Wx2, settings)
  row_W = jnp.where(sl.live_W, sl.sample_W, B)  # ended slots write nothing
  # An ended slot stays at its position: beyond the RoPE table its keys would be NaN, and a
  # NaN value times a masked weight of 0 is NaN in the next sample's attention.
  drawn_W = sl.drawn_W + sl.live_W.astype(jnp.int32)
  live_W = sl.live_W & ~sampling.is_eos(tokens_W, settings.eos_ids) & (drawn_W < N)
  versions = state.versions_BxN
  if versions is not None:
    versions = versions.at[row_W, sl.drawn_W].set(version, mode="drop")
  return state.replace(
      slots=sl.replace(drawn_W=drawn_W, last_W=tokens_W, live_W=live_W, own=own),
      step=state.step + 1, versions_BxN=versions,
      tokens_BxN=state.tokens_BxN.at[row_W, sl.drawn_W].set(tokens_W, mode="drop"),
      logprobs_BxN=state.logprobs_BxN.at[row_W, sl.drawn_W].set(logprobs_W, mode="drop"))


def compact(state: DecodeState, width: int, prompts: Prompts, num_samples: int) -> DecodeState:
  """The slots with live samples first, cut to `width` (the caller ensures they fit)."""
  keep_M = jnp.argsort(~state.slots.live_W, stable=True)[:width]
  sl = state.slots
  sample_M = sl.sample_W[keep_M]
  if sl.prefix is None:  # the group's shared rows -> a copy per slot
    prefix = _gather_rows(prompts.prefix, _prompt_of(sample_M, prompts, num_samples))
  else:
    prefix = _gather_rows(sl.prefix, keep_M)
  return state.replace(slots=Slots(
      sample_W=sample_M, drawn_W=sl.drawn_W[keep_M], last_W=sl.last_W[keep_M],
      live_W=sl.live_W[keep_M], own=_gather_rows(sl.own, keep_M), prefix=prefix))


def _first_slots(config: ModelConfig, width: int, prompt_len: int, prompts: Prompts) -> Slots:
  """W empty slots (the first refill fills them), or with W = B slot s holding sample s."""
  B = prompts.first_B.shape[0]
  own = models.init_cache(config, width, 0).replace(ring=True)
  if width == B:
    return Slots(sample_W=jnp.arange(B, dtype=jnp.int32), drawn_W=jnp.ones((B,), jnp.int32),
                 last_W=prompts.first_B, live_W=~prompts.ended_B, own=own, prefix=None)
  zeros = jnp.zeros((width,), jnp.int32)
  return Slots(sample_W=jnp.full((width,), B, jnp.int32), drawn_W=zeros, last_W=zeros,
               live_W=jnp.zeros((width,), jnp.bool_), own=own,
               prefix=models.init_cache(config, width, prompt_len))


def _start(params: Params, config: ModelConfig, settings: sampling.SamplingSettings,
           prompt_tokens_PxT, prompt_mask_PxT, rng, *, versions: bool = False
           ) -> tuple[DecodeState, Prompts]:
  """The prompts prefilled, every sample's first token drawn, the first slots filled."""
  P, T = prompt_tokens_PxT.shape
  G, N = settings.num_samples, settings.max_new_tokens
  B = P * G
  first_keys = sample_keys(rng, jnp.arange(B, dtype=jnp.int32), 0)
  prefix, length_P, first_B, first_logprobs_B = sampling.prefill_and_draw(
      params, config, settings, prompt_tokens_PxT, prompt_mask_PxT, row_uniforms(first_keys))
  prompts = Prompts(prefix=prefix, length_P=length_P, first_B=first_B,
                    ended_B=sampling.is_eos(first_B, settings.eos_ids) | (N == 1))
  plan = widths(settings, B)
  refills = plan[0] < B
  state = DecodeState(
      slots=_first_slots(config, plan[0], T, prompts),
      next_sample=jnp.asarray(0 if refills else B, jnp.int32), step=jnp.zeros((), jnp.int32),
      tokens_BxN=jnp.full((B, N), settings.pad_id, jnp.int32).at[:, 0].set(first_B),
      logprobs_BxN=jnp.zeros((B, N), jnp.float32).at[:, 0].set(first_logprobs_B),
      versions_BxN=jnp.zeros((B, N), jnp.int32) if versions else None)
  if refills:
    state = refill(state, prompts, G, plan[0])
  return state, prompts


def _run(state: DecodeState, params: Params, config: ModelConfig,
         settings: sampling.SamplingSettings, prompts: Prompts, rng, *, ends: list[int],
         stop: Optional[int] = None, tail: bool = True, version: int = 0) -> DecodeState:
  """Decode steps with `params`: a loop per block end of `ends` (the ring grown to it), each
  while a sample is busy and the step is below the end (and `stop`; with a stop, no early
  exit to compact), then (`tail`) the compaction levels until no sample is busy."""
  B = state.tokens_BxN.shape[0]
  G, N = settings.num_samples, settings.max_new_tokens
  plan = widths(settings, B)
  refills = plan[0] < B
  tables = models.rope_tables(config, prompts.prefix.max_len + N + 1)

  def body(most: int):
    def step(s: DecodeState) -> DecodeState:
      s = decode_step(s, params, config, settings, prompts, rng, tables, version)
      return _maybe_refill(s, prompts, G, most) if refills else s
    return step

  busy = lambda s: jnp.any(s.slots.live_W) | (s.next_sample < B)  # noqa: E731
  shrink = lambda s, width: (s.next_sample >= B) & (  # noqa: E731
      jnp.sum(s.slots.live_W) <= width // 2)
  # The ring grows with the steps as the static path's cache does: before step N - 1 no sample
  # is older than the steps run, so the first blocks need fewer slots (and never wrap). A
  # fixed-length batch with as many slots as rows decodes exactly as the static path.
  compacts = len(plan) > 1 and stop is None
  for end in ends:
    state = state.replace(slots=state.slots.replace(
        own=sampling.grow_cache(state.slots.own, end)))
    limit = end if stop is None else min(end, stop)
    state = lax.while_loop(
        lambda s, limit=limit: busy(s) & (s.step < limit) & ~(compacts & shrink(s, plan[0])),
        body(max(1, plan[0] // 4)), state)
  if not tail or not (refills or len(plan) > 1):  # (no tail: every sample has had its steps)
    return state
  # The tail: once nothing is pending and half the slots or fewer are live, half the width.
  for level, width in enumerate(plan):
    if level:
      state = compact(state, width, prompts, G)
    last = level == len(plan) - 1
    state = lax.while_loop(
        lambda s, width=width, last=last: busy(s) if last else busy(s) & ~shrink(s, width),
        body(max(1, width // 4)), state)
  return state


def decode(params: Params, config: ModelConfig, settings: sampling.SamplingSettings,
           prompt_tokens_PxT, prompt_mask_PxT, rng) -> sampling.SampleOutput:
  """`sampling.sample_with_settings` in `settings.decode_slots` slots (traceable)."""
  state, prompts = _start(params, config, settings, prompt_tokens_PxT, prompt_mask_PxT, rng)
  state = _run(state, params, config, settings, prompts, rng,
               ends=sampling.block_ends(settings))
  return sampling.finish(state.tokens_BxN, state.logprobs_BxN, settings)


# ----------------------------------------------------------------------------- in-flight updates


@flax.struct.dataclass
class Paused:
  """A decode stopped after its first decode steps, to go on with other weights."""
  state: DecodeState
  prompts: Prompts


def decode_first(params: Params, config: ModelConfig, settings: sampling.SamplingSettings,
                 prompt_tokens_PxT, prompt_mask_PxT, rng, steps: int) -> Paused:
  """`decode`'s prefill and its first `steps` decode steps (no compaction before them);
  every token so far is tagged 0."""
  state, prompts = _start(params, config, settings, prompt_tokens_PxT, prompt_mask_PxT, rng,
                          versions=True)
  ends = sampling.block_ends(settings)
  first = [end for i, end in enumerate(ends) if i == 0 or ends[i - 1] < steps]
  return Paused(_run(state, params, config, settings, prompts, rng, ends=first, stop=steps,
                     tail=False), prompts)


def decode_rest(params: Params, config: ModelConfig, settings: sampling.SamplingSettings,
                paused: Paused, rng, steps: int) -> sampling.SampleOutput:
  """The decode `decode_first(..., steps)` paused, on to its end with `params`, these tokens
  tagged 1: the samples in progress keep their caches and go on; the samples not started yet
  start (from the prompts' prefill, and the first token, of the first weights)."""
  ends = [end for end in sampling.block_ends(settings) if end >= steps]
  state = _run(paused.state, params, config, settings, paused.prompts, rng, ends=ends,
               version=1)
  out = sampling.finish(state.tokens_BxN, state.logprobs_BxN, settings)
  return out.replace(versions=state.versions_BxN * out.mask)


class InFlight(NamedTuple):
  """The two jitted halves of a decode whose weights change after `steps` decode steps."""
  first: Any  # (params, prompt_tokens_PxT, prompt_mask_PxT, rng) -> Paused
  rest: Any   # (params, paused, rng) -> SampleOutput with versions
  steps: int


def make_inflight(config: ModelConfig, settings: sampling.SamplingSettings, steps: int,
                  mesh: Optional[Mesh] = None) -> InFlight:
  """`decode_first` / `decode_rest` jitted (as `sampling.make_sampler`, with a mesh: the
  prompts and outputs sharded over the batch axes, the key replicated)."""
  first_fn = lambda params, tokens, mask, rng: decode_first(  # noqa: E731
      params, config, settings, tokens, mask, rng, steps)
  rest_fn = lambda params, paused, rng: decode_rest(  # noqa: E731
      params, config, settings, paused, rng, steps)
  if mesh is None:
    return InFlight(jax.jit(first_fn), jax.jit(rest_fn), steps)
  rows2, out = sampling.output_shardings(mesh, versions=True)
  key = sharding.replicated(mesh)
  return InFlight(jax.jit(first_fn, in_shardings=(None, rows2, rows2, key)),
                  jax.jit(rest_fn, in_shardings=(None, None, key), out_shardings=out), steps)
