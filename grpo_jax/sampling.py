"""Group sampling for GRPO: prefill each prompt once, decode G completions per prompt in a while_loop.

    out = sample(params, config, prompt_tokens_PxT, prompt_mask_PxT, rng=key, num_samples=G,
                 max_new_tokens=N, temperature=1.0, eos_ids=(eos,), pad_id=pad)
    out.tokens [P*G, N], out.logprobs [P*G, N], out.mask [P*G, N], out.lengths [P*G],
    out.truncated [P*G]; rows are prompt-major (rows p*G .. p*G+G-1 are prompt p's group).

The trainer calls `make_sampler(config, settings)` once and then the returned jitted function
every step (one compilation per static `SamplingSettings` and input shape).

Design (decode speed on CPU, see BENCHMARKS.md for the measured effect of each choice):
- Each prompt is prefilled once into a [P, ...] cache that the G rows of its group attend to
  through `models.forward(..., prefix=...)`; only the completion tokens are cached per row.
- The per-row completion cache grows in fixed-size blocks: block b is decoded by its own
  `lax.while_loop` over a cache of (b + 1) * block_size slots, so early steps do not read (and
  mask) empty slots. Every loop exits as soon as all rows have emitted an EOS id.
- Sampling is an exact inverse-CDF draw over exp(z - max z) in two levels (block sums of the
  vocabulary, then one block), with cumulative sums as small triangular matmuls: XLA CPU's
  `argmax` (used by `jax.random.categorical` / Gumbel-max) over the vocabulary cost more per step
  than the rest of the sampling.
- Randomness is keyed per sample and position: token t of sample i draws its uniforms from
  `fold_in(fold_in(rng, i), t)` (`draws.sample_keys`), i = its row p * G + g. A sample's tokens depend
  on the call's key, its id and its prompt only: not on the batch it shares, its slot or the
  step it ran in (what a decoder that refills finished rows' slots needs), nor on how the batch
  is sharded; the same key reproduces the samples.

Log-probs: `logprobs[b, s]` is log softmax(logits / T)[token], the UNFILTERED tempered
distribution (what `train_step.sequence_logprobs` recomputes and what TRL returns), even when
top-k / top-p / min-p restrict the draw; 0 on masked (post-EOS) positions. Greedy decoding
(temperature 0) returns log softmax(logits)[token] (temperature 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import models, sharding
from grpo_jax.draws import row_uniforms, sample_keys, sample_tokens
from grpo_jax.models import KVCache, ModelConfig, per_layer

Params = Any


# ----------------------------------------------------------------------------- settings and state


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Static (hashable) sampling configuration: a change recompiles, a new key or prompt does not.

  num_samples:    G completions per prompt.
  max_new_tokens: N, the completion budget.
  temperature:    0 = greedy; otherwise logits are divided by it.
  top_k, top_p, min_p: optional filters of the tempered distribution, applied in that order
                  (as transformers does); ties at a threshold are kept.
  eos_ids:        token ids that end a completion (included in it, mask 1).
  pad_id:         emitted after the EOS (mask 0, log-prob 0).
  block_size:     completion-cache block (slots); >= max_new_tokens gives one loop.
  continuous:     False: a static batch (every row decodes until the longest ends); True:
                  continuous batching (`slots.py`): the same samples, ended rows' work saved.
  decode_slots:   continuous: the slots (0 or >= rows: one per row, the tail compacted;
                  fewer: a slot takes the next pending sample when its sample ends).
  """
  num_samples: int
  max_new_tokens: int
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  min_p: Optional[float] = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  block_size: int = 32
  continuous: bool = False
  decode_slots: int = 0

  def __post_init__(self):
    if self.num_samples < 1 or self.max_new_tokens < 1 or self.block_size < 1:
      raise ValueError(f"SamplingSettings: num_samples, max_new_tokens and block_size must be "
                       f">= 1, got {self}")
    if self.decode_slots < 0:
      raise ValueError(f"SamplingSettings: decode_slots must be >= 0, got {self.decode_slots}")
    if not self.temperature >= 0:
      raise ValueError(f"SamplingSettings: temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"SamplingSettings: top_k must be >= 1 or None, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingSettings: top_p must be in (0, 1] or None, got {self.top_p}")
    if self.min_p is not None and not 0 <= self.min_p <= 1:
      raise ValueError(f"SamplingSettings: min_p must be in [0, 1] or None, got {self.min_p}")
    if not isinstance(self.eos_ids, tuple):
      raise ValueError(f"SamplingSettings: eos_ids must be a tuple (hashable), got "
                       f"{type(self.eos_ids).__name__}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def filtered(self) -> bool:
    return (self.top_k is not None or (self.top_p is not None and self.top_p < 1)
            or bool(self.min_p))


@flax.struct.dataclass
class SampleOutput:
  """Completions of P prompts x G samples, prompt-major rows (B = P * G)."""
  tokens: jax.Array     # [B, N] int32; pad_id after the EOS
  logprobs: jax.Array   # [B, N] float32: log softmax(logits / T)[token]; 0 where mask is 0
  mask: jax.Array       # [B, N] int32: 1 up to and including the first EOS
  lengths: jax.Array    # [B] int32: number of completion tokens (sum of mask)
  truncated: jax.Array  # [B] bool: no EOS within max_new_tokens
  # [B, N] int32, in-flight updates only (slots.make_inflight): 1 where the update's weights
  # drew the token, 0 where the first weights did (and off the mask)
  versions: Optional[jax.Array] = None


@flax.struct.dataclass
class SamplingState:
  """Traced state of the decode loop."""
  step: jax.Array           # int32 []: tokens generated so far (all rows)
  last_token_B: jax.Array   # int32 [B]: token generated at step - 1 (fed next)
  done_B: jax.Array         # bool [B]: row has emitted an EOS
  tokens_BxN: jax.Array     # int32 [B, N]
  logprobs_BxN: jax.Array   # float32 [B, N]
  cache: KVCache            # per-row completion cache, slot s holds token s
  rng: jax.Array            # the call's key (token t of sample i: `sample_keys`)


# ----------------------------------------------------------------------------- decode loop


def _record(state: SamplingState, tokens_B, logprobs_B, settings: SamplingSettings):
  """Writes step `state.step`'s tokens (pad for finished rows) and advances the step."""
  done_B = state.done_B
  tokens_B = jnp.where(done_B, settings.pad_id, tokens_B)
  logprobs_B = jnp.where(done_B, 0.0, logprobs_B)
  is_eos_B = is_eos(tokens_B, settings.eos_ids)
  return state.replace(
      step=state.step + 1,
      last_token_B=tokens_B,
      done_B=done_B | is_eos_B,
      tokens_BxN=lax.dynamic_update_slice_in_dim(state.tokens_BxN, tokens_B[:, None],
                                                 state.step, axis=1),
      logprobs_BxN=lax.dynamic_update_slice_in_dim(state.logprobs_BxN, logprobs_B[:, None],
                                                   state.step, axis=1))


def grow_cache(cache: KVCache, slots: int) -> KVCache:
  """The same cache with `slots` slots (new ones empty): the next block of the completion."""
  extra = slots - cache.max_len
  if extra == 0:
    return cache
  pad_k = lambda k: jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, extra)))
  pad_v = lambda v: jnp.pad(v, ((0, 0), (0, 0), (0, extra), (0, 0)))
  return cache.replace(k_BxKxDxS=per_layer(pad_k, cache.k_BxKxDxS),
                       v_BxKxSxD=per_layer(pad_v, cache.v_BxKxSxD),
                       valid_BxS=jnp.pad(cache.valid_BxS, ((0, 0), (0, extra))),
                       pos_BxS=jnp.pad(cache.pos_BxS, ((0, 0), (0, extra))))


def block_ends(settings: SamplingSettings) -> list[int]:
  """Cache capacity of each block loop; the last equals the N - 1 tokens that are fed back."""
  fed = settings.max_new_tokens - 1
  ends = list(range(settings.block_size, fed, settings.block_size)) + [fed]
  return [e for e in ends if e > 0]


def prefill(params: Params, config: ModelConfig, prompt_tokens_PxT, prompt_mask_PxT):
  """Each left-padded prompt through the model once: (its KV cache, the last position's
  logits [P, V] (only that position is unembedded), the prompt lengths [P] int32)."""
  P, T = prompt_tokens_PxT.shape
  prompt_mask_PxT = prompt_mask_PxT.astype(jnp.int32)
  positions_PxT = jnp.maximum(jnp.cumsum(prompt_mask_PxT, axis=1) - 1, 0)
  prefix = models.init_cache(config, P, T)
  hidden_PxTxE, prefix = models.forward(params, config, prompt_tokens_PxT, positions_PxT,
                                        prompt_mask_PxT, prefix, return_hidden=True)
  logits_PxV = models.unembed(params, config, hidden_PxTxE[:, -1:])[:, 0]
  return prefix, logits_PxV, jnp.sum(prompt_mask_PxT, axis=1)


def prefill_and_draw(params: Params, config: ModelConfig, settings: SamplingSettings,
                     prompt_tokens_PxT, prompt_mask_PxT, u_Bx2):
  """`prefill`, then every row's first token (G rows per prompt) with the uniforms `u_Bx2`:
  (the prompts' KV cache, their lengths [P], tokens [B], log-probs [B])."""
  prefix, logits_PxV, prompt_len_P = prefill(params, config, prompt_tokens_PxT, prompt_mask_PxT)
  tokens_B, logprobs_B = sample_tokens(jnp.repeat(logits_PxV, settings.num_samples, axis=0),
                                       u_Bx2, settings)
  return prefix, prompt_len_P, tokens_B, logprobs_B


def sample_with_settings(params: Params, config: ModelConfig, settings: SamplingSettings,
                         prompt_tokens_PxT, prompt_mask_PxT, rng) -> SampleOutput:
  """`sample` with its static settings in one object (traceable; see `make_sampler`): in
  decode slots with `settings.continuous`, else a static batch."""
  P = prompt_tokens_PxT.shape[0]
  G, N = settings.num_samples, settings.max_new_tokens
  B = P * G
  if settings.continuous and N > 1:
    from grpo_jax import slots  # pylint: disable=import-outside-toplevel  (slots imports this)
    return slots.decode(params, config, settings, prompt_tokens_PxT, prompt_mask_PxT, rng)
  sample_ids_B = jnp.arange(B, dtype=jnp.int32)
  draw = lambda position: row_uniforms(sample_keys(rng, sample_ids_B, position))  # noqa: E731
  prefix, prompt_len_P, tokens_B, logprobs_B = prefill_and_draw(
      params, config, settings, prompt_tokens_PxT, prompt_mask_PxT, draw(0))
  state = SamplingState(
      step=jnp.zeros((), jnp.int32),
      last_token_B=jnp.zeros((B,), jnp.int32),
      done_B=jnp.zeros((B,), jnp.bool_),
      tokens_BxN=jnp.full((B, N), settings.pad_id, jnp.int32),
      logprobs_BxN=jnp.zeros((B, N), jnp.float32),
      cache=models.init_cache(config, B, 0),
      rng=rng)
  state = _record(state, tokens_B, logprobs_B, settings)
  # Row b's completion token s sits at position prompt_len + s.
  position0_B = jnp.repeat(prompt_len_P, G)
  tables = models.rope_tables(config, prompt_tokens_PxT.shape[1] + N + 1)  # once, not per step

  def step_fn(state: SamplingState) -> SamplingState:
    tok_Bx1 = state.last_token_B[:, None]
    pos_Bx1 = (position0_B + state.step - 1)[:, None]
    logits_Bx1xV, cache = models.forward(params, config, tok_Bx1, pos_Bx1,
                                         jnp.ones_like(tok_Bx1), state.cache, prefix=prefix,
                                         rope_tables=tables)
    tokens_B, logprobs_B = sample_tokens(logits_Bx1xV[:, 0], draw(state.step), settings)
    return _record(state.replace(cache=cache), tokens_B, logprobs_B, settings)

  for end in block_ends(settings):
    state = state.replace(cache=grow_cache(state.cache, end))
    # The loop feeds tokens step-1 = cache.index .. end-1, i.e. generates up to step end.
    cond_fn = lambda s, end=end: (s.step <= end) & ~jnp.all(s.done_B)
    state = lax.while_loop(cond_fn, step_fn, state)

  return finish(state.tokens_BxN, state.logprobs_BxN, settings)


def finish(tokens_BxN, logprobs_BxN, settings: SamplingSettings) -> SampleOutput:
  """The output of decoded tokens (pad after each EOS) and their log-probs."""
  mask_BxN = _completion_mask(tokens_BxN, settings)
  return SampleOutput(tokens=tokens_BxN, logprobs=logprobs_BxN * mask_BxN, mask=mask_BxN,
                      lengths=jnp.sum(mask_BxN, axis=1),
                      truncated=~jnp.any(is_eos(tokens_BxN, settings.eos_ids), axis=1))


def is_eos(tokens, eos_ids: tuple[int, ...]) -> jax.Array:
  """Whether each token is one of `eos_ids` (bool, tokens' shape). A few ids: one compare each;
  many (a benchmark's 1500 stop ids, long stop lists): one lookup in a constant table, since
  a chain of thousands of compares in the decode loop took minutes to compile on a GPU."""
  if len(eos_ids) <= 8:
    out = jnp.zeros(jnp.shape(tokens), jnp.bool_)
    for eos in eos_ids:
      out = out | (tokens == eos)
    return out
  top = max(eos_ids)
  table = np.zeros(top + 1, np.bool_)
  table[list(eos_ids)] = True
  inside = (tokens >= 0) & (tokens <= top)
  return inside & jnp.asarray(table)[jnp.clip(tokens, 0, top)]


def _completion_mask(tokens_BxN, settings: SamplingSettings) -> jax.Array:
  """1 up to and including the first EOS, int32 [B, N]."""
  is_eos_BxN = is_eos(tokens_BxN, settings.eos_ids)
  eos_before_BxN = jnp.cumsum(is_eos_BxN, axis=1) - is_eos_BxN
  return (eos_before_BxN == 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sample_jit(params, config, settings, prompt_tokens, prompt_mask, rng):
  return sample_with_settings(params, config, settings, prompt_tokens, prompt_mask, rng)


def sample(params: Params, config: ModelConfig, prompt_tokens, prompt_mask, *, rng: jax.Array,
           num_samples: int, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None,
           min_p: Optional[float] = None, eos_ids: tuple[int, ...] = (), pad_id: int = 0,
           block_size: int = 32, continuous: bool = False,
           decode_slots: int = 0) -> SampleOutput:
  """G = num_samples completions of each left-padded prompt ([P, T] tokens and 0/1 mask).

  Jitted per (config, settings, shapes): repeated calls with new keys or prompts reuse the
  compilation. See the module docstring for the returned log-probs.
  """
  settings = SamplingSettings(
      num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=float(temperature),
      top_k=top_k, top_p=top_p, min_p=min_p, eos_ids=tuple(int(e) for e in eos_ids),
      pad_id=pad_id, block_size=block_size, continuous=continuous,
      decode_slots=decode_slots)
  return _sample_jit(params, config, settings, prompt_tokens, prompt_mask, rng)


def make_sampler(config: ModelConfig, settings: SamplingSettings, mesh: Optional[Mesh] = None):
  """fn(params, prompt_tokens_PxT, prompt_mask_PxT, rng) -> SampleOutput, jitted once.

  With a mesh, prompts and outputs are sharded over the batch axes ("data", "fsdp") and the key
  is replicated; params keep the shardings they were placed with (e.g. heads over "tensor").
  """
  fn = lambda params, tokens, mask, rng: sample_with_settings(  # noqa: E731
      params, config, settings, tokens, mask, rng)
  if mesh is None:
    return jax.jit(fn)
  rows2, out = output_shardings(mesh)
  return jax.jit(fn, in_shardings=(None, rows2, rows2, sharding.replicated(mesh)),
                 out_shardings=out)


def output_shardings(mesh: Mesh, versions: bool = False):
  """The [B, N] rows' sharding over the batch axes, and a SampleOutput's (with `versions`:
  in-flight updates' tags too)."""
  rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
  rows2 = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, None))
  return rows2, SampleOutput(tokens=rows2, logprobs=rows2, mask=rows2, lengths=rows,
                             truncated=rows, versions=rows2 if versions else None)
