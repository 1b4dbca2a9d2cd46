"""Decoder-only transformer (Qwen2/2.5, Qwen3, Llama 3.x, Gemma 3 text) as pure functions.

The network is written as Flax Linen modules but used only through pure functions whose
parameters are a plain pytree (nested dicts of arrays):

    params = init_params(config, rng)
    logits_BxTxV, _ = forward(params, config, tokens_BxT, positions_BxT, mask_BxT)
    cache = init_cache(config, batch_size=B, max_len=S)
    logits_BxTxV, cache = forward(params, config, tokens_BxT, positions_BxT, mask_BxT, cache)

Shape letters: B batch rows, T new tokens, S cache slots, E hidden_size, V vocab, H query heads,
K KV heads, G = H / K query heads per KV head, D head_dim, M intermediate_size, L layers.

Parameter layout (`params[...]`, shapes, logical axis names):
    embedding                       [V, E]          ("vocab", "embed")
    lm_head                         [E, V]          ("embed", "vocab")       untied only
    final_norm/scale                [E]             ("norm",)
    layers_{i}/pre_attn_norm/scale  [E]             ("norm",)
    layers_{i}/attn/qkv             [E, K, G+2, D]  ("embed", "kv_heads", "qkv", "head_dim")
    layers_{i}/attn/qkv_bias        [K, G+2, D]     ("kv_heads", "qkv", "head_dim")  qwen2
    layers_{i}/attn/q_norm/scale    [D]             ("norm",)                 qwen3, gemma3
    layers_{i}/attn/k_norm/scale    [D]             ("norm",)                 qwen3, gemma3
    layers_{i}/attn/o               [H, D, E]       ("heads", "head_dim", "embed")
    layers_{i}/post_attn_norm/scale [E]             ("norm",)                 gemma3
    layers_{i}/pre_mlp_norm/scale   [E]             ("norm",)
    layers_{i}/mlp/gate_up          [E, 2, M]       ("embed", "gate_up", "mlp")
    layers_{i}/mlp/down             [M, E]          ("mlp", "embed")
    layers_{i}/post_mlp_norm/scale  [E]             ("norm",)                 gemma3
With `config.scan_layers` the layers are stored stacked: `layers/...` with a leading L axis on
every leaf (logical axis "layers" first) and run as one `nn.scan` (`ScannedBlock`); the KV
cache is then one [L, ...] array per keys / values (`models.layer_stack` converts layouts).
The q/k/v projections are fused and grouped per KV head: `qkv[:, k, :G]` are the G query heads
that share KV head k (HF query head h = k * G + g), `qkv[:, k, G]` is key head k and
`qkv[:, k, G + 1]` value head k. Gate and up projections are fused likewise. Fused weights were
~10% faster on CPU (PERF_NOTES.md), and grouping per KV head keeps "kv_heads" shardable.
"qkv", "gate_up" and "norm" are small axes meant to stay replicated; a sharding module maps
"vocab", "embed", "heads", "kv_heads", "head_dim" and "mlp" onto mesh axes.

Attention masking, RoPE and the KV cache layout (`KVCache`, `init_cache`) are described in
`grpo_jax.models.attention`, which holds them and the attention core.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from grpo_jax.models.attention import KVCache, attention_masks, prefix_masks, rope_angles
from grpo_jax.models.blocks import Block, RMSNorm, kernel_init, remat_class, scanned_blocks
from grpo_jax.models.config import ModelConfig

Params = Any  # nested dict of arrays, structure described in the module docstring


def _unembed(config: ModelConfig, embedding_VxE, lm_head_ExV, hidden_BxTxE):
  """Float32 logits [B, T, V] (soft-capped when the config says so)."""
  dtype = jnp.dtype(config.dtype)
  if lm_head_ExV is None:
    logits = jnp.einsum("bte,ve->btv", hidden_BxTxE, embedding_VxE.astype(dtype),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("bte,ev->btv", hidden_BxTxE, lm_head_ExV.astype(dtype),
                        preferred_element_type=jnp.float32)
  if config.final_logit_softcap:
    logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
  return logits


class Decoder(nn.Module):
  """Embedding -> L blocks -> final norm -> (optionally) unembedding."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, attention_mask_BxT, cache, return_hidden,
               prefix=None, tables=None):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    embedding = self.param("embedding", nn.with_logical_partitioning(
        kernel_init(), ("vocab", "embed")), (c.vocab_size, c.hidden_size), pdtype)
    lm_head = None
    if not c.tie_embeddings:
      lm_head = self.param("lm_head", nn.with_logical_partitioning(
          kernel_init(), ("embed", "vocab")), (c.hidden_size, c.vocab_size), pdtype)

    x_BxTxE = jnp.take(embedding, tokens_BxT, axis=0).astype(dtype)
    if c.scale_embeddings:  # rounded to the parameter dtype, as in transformers
      x_BxTxE = x_BxTxE * jnp.asarray(math.sqrt(c.hidden_size), pdtype).astype(dtype)

    full_mask, sliding_mask, valid_BxS, pos_BxS = attention_masks(
        c, positions_BxT, attention_mask_BxT, cache)
    prefix_full = prefix_sliding = None
    if prefix is not None:
      prefix_full, prefix_sliding = prefix_masks(c, prefix, positions_BxT)
    if tables is None:
      global_rope = rope_angles(c, positions_BxT, sliding=False)
      local_rope = rope_angles(c, positions_BxT, sliding=True) if sliding_mask is not None else None
    else:  # `rope_tables` rows at the positions
      rows = lambda t: None if t is None else tuple(jnp.take(x, positions_BxT, axis=0) for x in t)  # noqa: E731
      global_rope, local_rope = rows(tables[0]), rows(tables[1])
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index

    kv = None if cache is None else (cache.k_BxKxDxS, cache.v_BxKxSxD)
    prefix_kv = None if prefix is None else (prefix.k_BxKxDxS, prefix.v_BxKxSxD)
    run = _scanned_layers if c.scan_layers else _unrolled_layers
    x_BxTxE, new_kv = run(c, x_BxTxE, (global_rope, local_rope), (full_mask, sliding_mask),
                          (prefix_full, prefix_sliding), kv, index, prefix_kv)

    x_BxTxE = RMSNorm(c, name="final_norm")(x_BxTxE)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k_BxKxDxS=new_kv[0], v_BxKxSxD=new_kv[1], valid_BxS=valid_BxS,
                          pos_BxS=pos_BxS, index=cache.index + tokens_BxT.shape[1],
                          ring=cache.ring)
    if return_hidden:
      return x_BxTxE, new_cache
    return _unembed(c, embedding, lm_head, x_BxTxE), new_cache


def _unrolled_layers(c: ModelConfig, x_BxTxE, ropes, masks, prefix_masks_, kv, index, prefix_kv):
  """The L blocks one after another (`layers_{i}`), each picking its (global, local) variant."""
  block_cls, new_k, new_v = remat_class(c, Block), [], []
  for i in range(c.num_layers):
    s = int(c.layer_is_sliding(i))
    x_BxTxE, layer_kv = block_cls(c, bool(s), name=f"layers_{i}")(
        x_BxTxE, ropes[s], masks[s], None if kv is None else (kv[0][i], kv[1][i]), index,
        None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i]), prefix_masks_[s])
    if kv is not None:
      new_k.append(layer_kv[0])
      new_v.append(layer_kv[1])
  return x_BxTxE, (tuple(new_k), tuple(new_v))


def _scanned_layers(c: ModelConfig, x_BxTxE, ropes, masks, prefix_masks_, kv, index, prefix_kv):
  """The L blocks as one scan (`layers`): the KV cache in the carry, the new tokens written
  into it after the scan; with sliding layers both variants go in and a per-layer flag picks."""
  rope, mask, prefix_mask, flags = ropes[0], masks[0], prefix_masks_[0], None
  if c.has_sliding_layers:
    flags = jnp.asarray([c.layer_is_sliding(i) for i in range(c.num_layers)])
    rope, mask = ropes, masks
    if prefix_kv is not None:  # the full mask per row, as the sliding one is
      full, sliding = prefix_masks_
      prefix_mask = (jnp.repeat(full, sliding.shape[0] // full.shape[0], axis=0), sliding)
  carry = (x_BxTxE, *(kv or (None, None)), jnp.zeros((), jnp.int32))
  (x_BxTxE, k_all, v_all, _), new_kv = scanned_blocks(c)(c, False, name="layers")(
      carry, rope, mask, index, prefix_kv, prefix_mask, flags)
  if kv is None:
    return x_BxTxE, None
  return x_BxTxE, (
      lax.dynamic_update_slice(k_all, new_kv[0].astype(k_all.dtype), (0, 0, 0, 0, index)),
      lax.dynamic_update_slice(v_all, new_kv[1].astype(v_all.dtype), (0, 0, 0, index, 0)))


# ----------------------------------------------------------------------------- pure API


def _dummy_inputs():
  ones = jnp.ones((1, 1), jnp.int32)
  return ones, ones * 0, ones


@functools.partial(jax.jit, static_argnums=0)
def _init_boxed(config: ModelConfig, rng):
  return Decoder(config).init(rng, *_dummy_inputs(), None, True)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters (normal(0.02) kernels, zero biases, identity norms) in `param_dtype`.

  Jittable: wrap in `jax.jit(..., static_argnums=0, out_shardings=...)` to create them sharded.
  """
  return flax.core.meta.unbox(_init_boxed(config, rng))


def param_logical_axes(config: ModelConfig) -> Params:
  """The params pytree with a tuple of logical axis names in place of each array.

  Tuples are pytree nodes: map over it with `is_leaf=lambda x: isinstance(x, tuple)`.
  """
  boxed = jax.eval_shape(lambda: Decoder(config).init(
      jax.random.key(0), *_dummy_inputs(), None, True)["params"])
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(lambda s: tuple(s), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def forward(params: Params, config: ModelConfig, tokens_BxT, positions_BxT, attention_mask_BxT,
            cache: KVCache | None = None, *, return_hidden: bool = False,
            prefix: KVCache | None = None, rope_tables=None):
  """Runs the decoder on T tokens per row.

  Args:
    params: from `init_params` or `load_hf_checkpoint`.
    config: the static model description.
    tokens_BxT: int token ids.
    positions_BxT: int RoPE positions (cumsum(mask) - 1 for right or left padding); sliding
      windows measure distance in them too (a cache keeps them per slot), so slots left empty
      between tokens (mask 0) do not narrow the window.
    attention_mask_BxT: 1 for real tokens, 0 for padding.
    cache: None for a full-sequence pass; else a `KVCache` whose slots [index, index + T) receive
      the new tokens (which attend to every valid earlier slot and causally among themselves).
    return_hidden: return the final-normed hidden states [B, T, E] (activation dtype) instead of
      logits, to be projected in chunks with `unembed`.
    prefix: None, or a filled `KVCache` of P = B / N rows (e.g. a prefilled prompt per GRPO
      group) that rows p*N .. p*N+N-1 all attend to before their own keys, as if it were
      replicated in front of each row's cache (its `index` is ignored; its valid slots count).
      Positions stay the caller's: continue them from the prefix's real tokens.
    rope_tables: None, or `rope_tables(config, n)` with every position < n: RoPE's cos / sin
      are then gathered from them, not computed (a decode loop's steps).

  Returns:
    (logits_BxTxV float32 or hidden_BxTxE, new cache or None).
  """
  return Decoder(config).apply({"params": params}, tokens_BxT, positions_BxT, attention_mask_BxT,
                               cache, return_hidden, prefix, rope_tables)


def unembed(params: Params, config: ModelConfig, hidden_BxTxE) -> jax.Array:
  """Float32 logits [B, T, V] from `forward(..., return_hidden=True)` hidden states."""
  return _unembed(config, params["embedding"], params.get("lm_head"), hidden_BxTxE)


@functools.partial(jax.jit, static_argnums=0)
def compute_logits(config: ModelConfig, params: Params, tokens_BxT, attention_mask_BxT=None):
  """Float32 logits [B, T, V] of a right-padded batch; positions from the mask (notebooks)."""
  if attention_mask_BxT is None:
    attention_mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
  attention_mask_BxT = attention_mask_BxT.astype(jnp.int32)
  positions_BxT = jnp.maximum(jnp.cumsum(attention_mask_BxT, axis=-1) - 1, 0)
  logits_BxTxV, _ = forward(params, config, tokens_BxT, positions_BxT, attention_mask_BxT)
  return logits_BxTxV
