"""Attention core of the decoder: KV cache, RoPE, grouped-query attention and its masks.

Shape letters (as in `transformer`): B batch rows, T new tokens, S cache slots, K KV heads,
G = H / K query heads per KV head, D head_dim, L layers. Queries are grouped per KV head,
[B, T, K, G, D] (HF query head h = k * G + g), and so is the attention output. With a prompt
prefix shared by groups of rows (`attend_with_prefix`, `prefix_masks`): P prefix rows of R slots,
rows p*N .. p*N+N-1 (N = B / P) sharing prefix p.

Attention masking: key j is visible to query i iff key j is a real token (mask 1), j <= i in
slot order (causal), and, in Gemma 3 sliding layers, pos_i - pos_j < sliding_window in the
per-row `positions` RoPE uses (real tokens), not in slots: a multi-turn cache has holes (rows
that wait, padded observation blocks), and the window must hold the tokens it holds in the
trainer's compacted sequence. Without holes (left- or right-padded batches) both distances
agree, as in transformers. Pad queries produce finite garbage; mask them out.

KV cache (`KVCache`): pre-allocated, fixed shape, one array per layer (unrolled layers: a
stacked [L, ...] cache indexed per layer was 2x slower to decode) or one stacked [L, ...] array
scanned with the layers (`ModelConfig.scan_layers`), keys stored transposed [B, K, D, S] (Q.K^T 5x faster per decode step
on CPU), values [B, K, S, D], a validity mask [B, S], each slot's position [B, S] (the
window's distance) and one scalar write index shared by all rows (left-padded prompts align the
rows). A forward with a cache writes its T tokens at slots [index, index + T) and advances the
index; the caller keeps index + T <= S (out-of-range writes would be clamped by
`lax.dynamic_update_slice`). A ring cache (`ring=True`, continuous batching's) takes one token
per forward at the index its caller sets (step mod S); every valid slot counts as the past,
since a row's slots are invalidated when a new sample takes the row.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from grpo_jax.models.config import ModelConfig

_MASKED = -1e30  # finite: a row with no visible key gets uniform weights instead of NaN


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
  """Decoding state of every layer. Fields are pytree leaves. Keys and values: a tuple of one
  array per layer, or one array stacked on a leading L axis when `config.scan_layers` (map over
  either with `per_layer`)."""

  k_BxKxDxS: tuple[jax.Array, ...] | jax.Array
  v_BxKxSxD: tuple[jax.Array, ...] | jax.Array
  valid_BxS: jax.Array  # bool: slot holds a real token
  pos_BxS: jax.Array  # int32: RoPE position of the slot's token (sliding windows measure in it)
  index: jax.Array  # int32 scalar: next slot to write
  # A ring (continuous batching's per-slot completion cache): one token per forward, written at
  # `index` (the caller wraps it); every valid slot is in the past, whatever its place.
  ring: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def max_len(self) -> int:
    return self.valid_BxS.shape[1]


def per_layer(fn, keys_or_values, *more):
  """fn applied to each layer's array of a cache's keys or values (and of `more` such fields,
  laid out alike): a tuple in, a tuple out; a stacked [L, ...] array in, a stacked one out."""
  if isinstance(keys_or_values, (tuple, list)):
    return tuple(map(fn, keys_or_values, *more))
  return jax.vmap(fn)(keys_or_values, *more)


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots per row; `dtype` defaults to the activation dtype."""
  dtype = jnp.dtype(dtype or config.dtype)
  B, K, D, S, L = batch_size, config.num_kv_heads, config.head_dim, max_len, config.num_layers
  if config.scan_layers:  # one stacked array, scanned with the stacked layers
    k, v = jnp.zeros((L, B, K, D, S), dtype), jnp.zeros((L, B, K, S, D), dtype)
  else:
    k = tuple(jnp.zeros((B, K, D, S), dtype) for _ in range(L))
    v = tuple(jnp.zeros((B, K, S, D), dtype) for _ in range(L))
  return KVCache(
      k_BxKxDxS=k,
      v_BxKxSxD=v,
      valid_BxS=jnp.zeros((B, S), jnp.bool_),
      pos_BxS=jnp.zeros((B, S), jnp.int32),
      index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig, sliding: bool) -> np.ndarray:
  """Inverse frequencies [D/2] (float32, a trace-time constant), with Llama 3.1 / linear scaling.

  Sliding (Gemma 3 local) layers use `rope_local_theta` and no scaling; others `rope_theta`.
  Float32 arithmetic as in transformers, so positions up to the context length match exactly.
  """
  D = config.head_dim
  theta = np.float32(config.rope_local_theta if sliding else config.rope_theta)
  inv_freq = (1.0 / theta ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))
  inv_freq = inv_freq.astype(np.float32)
  if sliding or config.rope_scaling_type is None:
    return inv_freq
  factor = np.float32(config.rope_scaling_factor)
  if config.rope_scaling_type == "linear":
    return (inv_freq / factor).astype(np.float32)
  # "llama3": keep high frequencies, divide low ones by `factor`, interpolate in between.
  old_len = np.float32(config.rope_original_max_position)
  low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(config: ModelConfig, positions_BxT, sliding: bool):
  """(cos, sin), each [B, T, D/2] float32, of the rotation at each token's position."""
  inv_freq = jnp.asarray(rope_inv_freq(config, sliding))
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BxTxF), jnp.sin(angles_BxTxF)


def rope_tables(config: ModelConfig, n: int):
  """The (cos, sin) tables, each [n, D/2] float32, of positions 0 .. n-1: global layers', and
  sliding layers' (None without them). A decode loop builds them once, outside the loop, and
  each step gathers its rows (`forward(rope_tables=...)`): computed per step, XLA recomputed
  cos / sin inside every q and k fusion of every layer (generation 13-20% slower on the CPU
  SPEC workload, BENCHMARKS.md)."""
  positions_1xN = jnp.arange(n, dtype=jnp.int32)[None]
  table = lambda sliding: tuple(a[0] for a in rope_angles(config, positions_1xN, sliding))  # noqa: E731
  return table(False), (table(True) if config.has_sliding_layers else None)


def apply_rope(x_BxTx___xD, cos_sin):
  """Rotates the halves (x1, x2) of the last axis (transformers' `rotate_half` convention)."""
  cos, sin = cos_sin
  extra = x_BxTx___xD.ndim - 3  # head axes between T and D
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
  x = x_BxTx___xD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTx___xD.dtype)


# ----------------------------------------------------------------------------- attention core


def attention_logits(q_BxTxKxGxD, k_BxKxDxS, *, scale: float, softcap: float | None):
  """Scaled (and optionally soft-capped) scores [B, K, G, T, S], float32.

  Written as a batched matmul over [B, K] of [G*T, D] @ [D, S]: an einsum with T and G in the
  output made XLA CPU pick a layout 3-8x slower per decode step.
  """
  B, T, K, G, D = q_BxTxKxGxD.shape
  q_BxKxGTxD = q_BxTxKxGxD.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
  s = jnp.matmul(q_BxKxGTxD, k_BxKxDxS, preferred_element_type=jnp.float32) * scale
  if softcap:
    s = jnp.tanh(s / softcap) * softcap
  return s.reshape(B, K, G, T, -1)


def _own_scores(q_BxTxKxGxD, k_BxKxDxS, mask_BxTxS, scale, softcap):
  s_BxKxGxTxS = attention_logits(q_BxTxKxGxD, k_BxKxDxS, scale=scale, softcap=softcap)
  return jnp.where(mask_BxTxS[:, None, None], s_BxKxGxTxS, _MASKED)


def _own_out(e_BxKxGxTxS, v_BxKxSxD):
  B, K, G, T, S = e_BxKxGxTxS.shape
  out = jnp.matmul(e_BxKxGxTxS.astype(v_BxKxSxD.dtype).reshape(B, K, G * T, S), v_BxKxSxD,
                   preferred_element_type=jnp.float32)
  return out.reshape(B, K, G, T, -1)


def attend(q_BxTxKxGxD, k_BxKxDxS, v_BxKxSxD, mask_BxTxS, *, scale: float,
           softcap: float | None = None, new=None):
  """Grouped-query attention of T queries over S keys -> [B, T, K, G, D] in v's dtype.

  Kept separate from the layer so that a sampler can attend over a prompt prefix shared by a
  group plus a per-row cache (compute `attention_logits` on both, concatenate along S).
  `new`: None, or (k_BxKxDxT', v_BxKxT'xD, mask_BxTxT'), a second key set of each row (a
  scanned layer's new tokens, not written into the cache it reads), one softmax over both.
  """
  if new is not None:
    return _attend_parts(q_BxTxKxGxD, [(k_BxKxDxS, v_BxKxSxD, mask_BxTxS), new], None,
                         scale=scale, softcap=softcap)
  B, T, K, G, D = q_BxTxKxGxD.shape
  s_BxKxGxTxS = _own_scores(q_BxTxKxGxD, k_BxKxDxS, mask_BxTxS, scale, softcap)
  p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxKxSxD.dtype)
  out_BxKxGTxD = jnp.matmul(p_BxKxGxTxS.reshape(B, K, G * T, -1), v_BxKxSxD)
  return out_BxKxGTxD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4)


def attend_with_prefix(q_BxTxKxGxD, k_BxKxDxS, v_BxKxSxD, mask_BxTxS, pk_PxKxDxR, pv_PxKxRxD,
                       pmask_XxTxR, *, scale: float, softcap: float | None = None, new=None):
  """`attend` over a prefix shared by groups of rows plus each row's own keys -> [B, T, K, G, D].

  Rows are prefix-major: rows p*N .. p*N+N-1 (N = B / P) share prefix p (a GRPO group shares
  its prompt's KV, kept once instead of N times). `pmask_XxTxR` is the group's mask (X = P) or
  each row's (X = B: a sliding window, whose query positions differ between a group's rows).
  The softmax runs over the concatenation of the key sets, computed in parts with shared row
  statistics so that the prefix scores stay in the layout of their [P, K, N*G*T, D] x [D, R]
  matmul (only [B, K, G, T] stats move). `new`: a second own key set, as in `attend`.
  """
  own = [(k_BxKxDxS, v_BxKxSxD, mask_BxTxS)] + ([new] if new is not None else [])
  return _attend_parts(q_BxTxKxGxD, own, (pk_PxKxDxR, pv_PxKxRxD, pmask_XxTxR), scale=scale,
                       softcap=softcap)


def _attend_parts(q_BxTxKxGxD, own, prefix, *, scale, softcap):
  """One softmax over each row's own key sets `own` [(k, v, mask), ...] and, when given, a
  `prefix` (pk, pv, pmask) shared by groups of rows (`attend_with_prefix`)."""
  B, T, K, G, D = q_BxTxKxGxD.shape
  scores = [_own_scores(q_BxTxKxGxD, k, mask, scale, softcap) for k, _, mask in own]
  m_BxKxGxT = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1) for s in scores])
  if prefix is not None:
    pk_PxKxDxR, pv_PxKxRxD, pmask_XxTxR = prefix
    P = pk_PxKxDxR.shape[0]
    N = B // P
    # Prefix keys: queries of a group stacked along the matmul rows, [P, K, N*G*T, R].
    q_PxKxNGTxD = q_BxTxKxGxD.reshape(P, N, T, K, G, D).transpose(0, 3, 1, 4, 2, 5).reshape(
        P, K, N * G * T, D)
    s_pre = jnp.matmul(q_PxKxNGTxD, pk_PxKxDxR, preferred_element_type=jnp.float32) * scale
    if softcap:
      s_pre = jnp.tanh(s_pre / softcap) * softcap
    R = pk_PxKxDxR.shape[-1]
    pmask = pmask_XxTxR.reshape(P, -1, T, R)[:, None, :, None]  # [P, 1, 1 or N, 1, T, R]
    pmask = jnp.broadcast_to(pmask, (P, 1, N, G, T, R))
    s_pre = jnp.where(pmask.reshape(P, 1, N * G * T, R), s_pre, _MASKED)

    def to_rows(x_PxKxNGT):  # [P, K, N*G*T] -> [B, K, G, T]
      return x_PxKxNGT.reshape(P, K, N, G, T).transpose(0, 2, 1, 3, 4).reshape(B, K, G, T)

    def to_prefix(x_BxKxGxT):  # inverse of to_rows
      return x_BxKxGxT.reshape(P, N, K, G, T).transpose(0, 2, 1, 3, 4).reshape(P, K, N * G * T)

    m_BxKxGxT = jnp.maximum(to_rows(jnp.max(s_pre, axis=-1)), m_BxKxGxT)
  exps = [jnp.exp(s - m_BxKxGxT[..., None]) for s in scores]
  l_BxKxGxT = functools.reduce(jnp.add, [jnp.sum(e, axis=-1) for e in exps])
  out_BxKxGxTxD = functools.reduce(jnp.add, [_own_out(e, v) for e, (_, v, _) in zip(exps, own)])
  dtype = own[0][1].dtype
  if prefix is not None:
    e_pre = jnp.exp(s_pre - to_prefix(m_BxKxGxT)[..., None])
    l_BxKxGxT = l_BxKxGxT + to_rows(jnp.sum(e_pre, axis=-1))
    out_pre = jnp.matmul(e_pre.astype(dtype), pv_PxKxRxD, preferred_element_type=jnp.float32)
    out_BxKxGxTxD = out_BxKxGxTxD + out_pre.reshape(P, K, N, G, T, D).transpose(
        0, 2, 1, 3, 4, 5).reshape(B, K, G, T, D)
  out_BxKxGxTxD = out_BxKxGxTxD / l_BxKxGxT[..., None]
  return out_BxKxGxTxD.astype(dtype).transpose(0, 3, 1, 2, 4)


def prefix_masks(config: ModelConfig, prefix: KVCache, positions_BxT):
  """(full_mask_PxTxR, sliding_mask_BxTxR or None) of T new tokens over a shared prefix.

  The prefix's R slots precede the rows' own slots, so every valid prefix slot is causally
  visible; the sliding window compares the new tokens' positions with the prefix's, per row
  (rows of a group reach different positions at the same slot when their timelines have holes).
  """
  P, R = prefix.valid_BxS.shape
  B, T = positions_BxT.shape
  full_PxTxR = jnp.broadcast_to(prefix.valid_BxS[:, None, :], (P, T, R))
  sliding_BxTxR = None
  if config.has_sliding_layers:
    pos_BxR = jnp.repeat(prefix.pos_BxS, B // P, axis=0)
    valid_BxR = jnp.repeat(prefix.valid_BxS, B // P, axis=0)
    near_BxTxR = positions_BxT[:, :, None] - pos_BxR[:, None, :] < config.sliding_window
    sliding_BxTxR = valid_BxR[:, None, :] & near_BxTxR
  return full_PxTxR, sliding_BxTxR


def attention_masks(config: ModelConfig, positions_BxT, attention_mask_BxT,
                    cache: KVCache | None):
  """(full_mask_BxTxS, sliding_mask_BxTxS or None, valid_BxS and pos_BxS after writing the new
  tokens): causal in slots, the window in positions (module docstring)."""
  new_valid_BxT = attention_mask_BxT.astype(jnp.bool_)
  positions_BxT = positions_BxT.astype(jnp.int32)
  T = new_valid_BxT.shape[1]
  if cache is None:
    valid_BxS, pos_BxS = new_valid_BxT, positions_BxT
    q_slot_T, k_slot_S = jnp.arange(T), jnp.arange(T)
  else:
    valid_BxS = lax.dynamic_update_slice(cache.valid_BxS, new_valid_BxT, (0, cache.index))
    pos_BxS = lax.dynamic_update_slice(cache.pos_BxS, positions_BxT, (0, cache.index))
    q_slot_T, k_slot_S = cache.index + jnp.arange(T), jnp.arange(cache.max_len)
  if cache is not None and cache.ring:
    if T != 1:
      raise ValueError(f"a ring cache takes one token per forward, got {T}")
    causal_TxS = jnp.ones((T, cache.max_len), jnp.bool_)
  else:
    causal_TxS = q_slot_T[:, None] >= k_slot_S[None, :]
  full_BxTxS = valid_BxS[:, None, :] & causal_TxS[None]
  sliding_BxTxS = None
  if config.has_sliding_layers:
    near_BxTxS = positions_BxT[:, :, None] - pos_BxS[:, None, :] < config.sliding_window
    sliding_BxTxS = full_BxTxS & near_BxTxS
  return full_BxTxS, sliding_BxTxS, valid_BxS, pos_BxS
