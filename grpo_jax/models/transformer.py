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

from grpo_jax.models.attention import (
    KVCache, apply_rope, attend, attend_with_prefix, attention_masks, prefix_masks, rope_angles)
from grpo_jax.models.config import ModelConfig

Params = Any  # nested dict of arrays, structure described in the module docstring


# ----------------------------------------------------------------------------- modules


def _kernel_init():
  return nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  """x / rms(x) * w (or * (1 + w) in Gemma), statistics in float32, output in x's dtype."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    plus_one = c.family == "gemma3"
    init = nn.initializers.zeros if plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                       jnp.dtype(c.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
    scale32 = scale.astype(jnp.float32)
    return (x32 * (1.0 + scale32 if plus_one else scale32)).astype(x.dtype)


def _lora(module: nn.Module, name: str, spec: str, x, w_shape, logical, n_in: int):
  """LoRA's update of weight `name` on input x: (alpha / r) * (x @ A) @ B, in compute dtype.

  `spec` is the weight's einsum "x,w->y"; A [in..., r] (in = the first n_in axes of the weight)
  is random, B [r, out...] zero, so a fresh adapter leaves the output unchanged. Adapters are
  float32 whatever the param dtype: they are what the optimiser trains."""
  c = module.config
  if not c.lora_rank or name not in c.lora_targets:
    return 0.0
  dtype = jnp.dtype(c.dtype)
  fan_in = math.prod(w_shape[:n_in])
  a = module.param(f"{name}_lora_a", nn.with_logical_partitioning(
      nn.initializers.normal(fan_in ** -0.5), (*logical[:n_in], None)),
      (*w_shape[:n_in], c.lora_rank), jnp.float32)
  b = module.param(f"{name}_lora_b", nn.with_logical_partitioning(
      nn.initializers.zeros, (None, *logical[n_in:])), (c.lora_rank, *w_shape[n_in:]),
      jnp.float32)
  x_spec, rest = spec.split(",")
  w_spec, y_spec = rest.split("->")
  r_spec = x_spec[:-n_in] + "r" if n_in else x_spec
  # alpha / r scales A (r columns), not the output (a [B, T, out] pass each way): the adapted
  # update step was 1.27x faster in an A/B on the SPEC model (CPU, 16.1 -> 12.7 s).
  h = jnp.einsum(f"{x_spec},{w_spec[:n_in]}r->{r_spec}", x,
                 (a * (c.lora_alpha / c.lora_rank)).astype(dtype))
  return jnp.einsum(f"{r_spec},r{w_spec[n_in:]}->{y_spec}", h, b.astype(dtype))


class Attention(nn.Module):
  """Fused-QKV grouped-query self-attention with RoPE, optional q/k norm and KV cache."""

  config: ModelConfig
  sliding: bool

  @nn.compact
  def __call__(self, x_BxTxE, cos_sin, mask_BxTxS, kv, index, prefix_kv=None, prefix_mask=None):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    B, T, E = x_BxTxE.shape
    K, G, D, H = c.num_kv_heads, c.num_groups, c.head_dim, c.num_heads
    w_qkv = self.param("qkv", nn.with_logical_partitioning(
        _kernel_init(), ("embed", "kv_heads", "qkv", "head_dim")), (E, K, G + 2, D), pdtype)
    qkv_BxTxKxCxD = jnp.einsum("bte,ekcd->btkcd", x_BxTxE, w_qkv.astype(dtype)) + _lora(
        self, "qkv", "bte,ekcd->btkcd", x_BxTxE, (E, K, G + 2, D),
        ("embed", "kv_heads", "qkv", "head_dim"), 1)
    if c.qkv_bias:
      b_qkv = self.param("qkv_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("kv_heads", "qkv", "head_dim")), (K, G + 2, D), pdtype)
      qkv_BxTxKxCxD = qkv_BxTxKxCxD + b_qkv.astype(dtype)
    q_BxTxKxGxD = qkv_BxTxKxCxD[:, :, :, :G]
    k_BxTxKxD = qkv_BxTxKxCxD[:, :, :, G]
    v_BxTxKxD = qkv_BxTxKxCxD[:, :, :, G + 1]
    if c.qk_norm:
      q_BxTxKxGxD = RMSNorm(c, name="q_norm")(q_BxTxKxGxD)
      k_BxTxKxD = RMSNorm(c, name="k_norm")(k_BxTxKxD)
    q_BxTxKxGxD = apply_rope(q_BxTxKxGxD, cos_sin)
    k_BxKxDxT = apply_rope(k_BxTxKxD, cos_sin).transpose(0, 2, 3, 1)
    v_BxKxTxD = v_BxTxKxD.transpose(0, 2, 1, 3)
    new = None
    if kv is None:
      k_BxKxDxS, v_BxKxSxD, new_kv = k_BxKxDxT, v_BxKxTxD, None
    elif c.scan_layers:
      # Scanned: the stacked cache is read as it is and the T new tokens are a second key set
      # (their mask: the cache mask's slots [index, index + T)); `ScannedBlock` writes them into
      # the cache after the layer. Written into the layer's slice first, the slice was copied
      # at every step (generation 1.7x slower than unrolled on CPU, against 1.2x).
      k_BxKxDxS, v_BxKxSxD = kv
      slot_S = jnp.arange(k_BxKxDxS.shape[-1])
      stale_S = (slot_S >= index) & (slot_S < index + T)
      new = (k_BxKxDxT.astype(dtype), v_BxKxTxD.astype(dtype),
             lax.dynamic_slice_in_dim(mask_BxTxS, index, T, axis=2))
      mask_BxTxS = mask_BxTxS & ~stale_S
      new_kv = (k_BxKxDxT, v_BxKxTxD)
    else:
      k_cache, v_cache = kv
      k_BxKxDxS = lax.dynamic_update_slice(k_cache, k_BxKxDxT.astype(k_cache.dtype),
                                           (0, 0, 0, index))
      v_BxKxSxD = lax.dynamic_update_slice(v_cache, v_BxKxTxD.astype(v_cache.dtype),
                                           (0, 0, index, 0))
      new_kv = (k_BxKxDxS, v_BxKxSxD)
    scale = (c.query_pre_attn_scalar or D) ** -0.5
    if prefix_kv is None:
      out_BxTxKxGxD = attend(q_BxTxKxGxD, k_BxKxDxS.astype(dtype), v_BxKxSxD.astype(dtype),
                             mask_BxTxS, scale=scale, softcap=c.attn_logit_softcap, new=new)
    else:
      pk, pv = prefix_kv
      out_BxTxKxGxD = attend_with_prefix(
          q_BxTxKxGxD, k_BxKxDxS.astype(dtype), v_BxKxSxD.astype(dtype), mask_BxTxS,
          pk.astype(dtype), pv.astype(dtype), prefix_mask, scale=scale,
          softcap=c.attn_logit_softcap, new=new)
    w_o = self.param("o", nn.with_logical_partitioning(
        _kernel_init(), ("heads", "head_dim", "embed")), (H, D, E), pdtype)
    o_BxTxHxD = out_BxTxKxGxD.reshape(B, T, H, D)
    out_BxTxE = jnp.einsum("bthd,hde->bte", o_BxTxHxD, w_o.astype(dtype)) + _lora(
        self, "o", "bthd,hde->bte", o_BxTxHxD, (H, D, E), ("heads", "head_dim", "embed"), 2)
    return out_BxTxE, new_kv


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    E, M = c.hidden_size, c.intermediate_size
    w_gate_up = self.param("gate_up", nn.with_logical_partitioning(
        _kernel_init(), ("embed", "gate_up", "mlp")), (E, 2, M), pdtype)
    w_down = self.param("down", nn.with_logical_partitioning(
        _kernel_init(), ("mlp", "embed")), (M, E), pdtype)
    h_BxTx2xM = jnp.einsum("bte,ecm->btcm", x_BxTxE, w_gate_up.astype(dtype)) + _lora(
        self, "gate_up", "bte,ecm->btcm", x_BxTxE, (E, 2, M), ("embed", "gate_up", "mlp"), 1)
    gate_BxTxM, up_BxTxM = h_BxTx2xM[:, :, 0], h_BxTx2xM[:, :, 1]
    if c.hidden_act == "silu":
      act_BxTxM = jax.nn.silu(gate_BxTxM)
    else:
      act_BxTxM = jax.nn.gelu(gate_BxTxM, approximate=True)
    h_BxTxM = act_BxTxM * up_BxTxM
    return jnp.einsum("btm,me->bte", h_BxTxM, w_down.astype(dtype)) + _lora(
        self, "down", "btm,me->bte", h_BxTxM, (M, E), ("mlp", "embed"), 1)


class Block(nn.Module):
  """Pre-norm residual layer; Gemma 3 also normalises each branch output (sandwich norm)."""

  config: ModelConfig
  sliding: bool

  @nn.compact
  def __call__(self, x_BxTxE, cos_sin, mask_BxTxS, kv, index, prefix_kv=None, prefix_mask=None,
               is_sliding=None):
    c = self.config
    if is_sliding is not None:  # a scanned stack: (global, local) pairs, the layer's flag picks
      pick = lambda pair: jax.tree.map(  # noqa: E731
          lambda g, s: jnp.where(is_sliding, s, g), pair[0], pair[1])
      cos_sin, mask_BxTxS = pick(cos_sin), pick(mask_BxTxS)
      prefix_mask = None if prefix_mask is None else pick(prefix_mask)
    sandwich = c.family == "gemma3"
    h = RMSNorm(c, name="pre_attn_norm")(x_BxTxE)
    h, new_kv = Attention(c, self.sliding, name="attn")(h, cos_sin, mask_BxTxS, kv, index,
                                                        prefix_kv, prefix_mask)
    if sandwich:
      h = RMSNorm(c, name="post_attn_norm")(h)
    x_BxTxE = x_BxTxE + h
    h = MLP(c, name="mlp")(RMSNorm(c, name="pre_mlp_norm")(x_BxTxE))
    if sandwich:
      h = RMSNorm(c, name="post_mlp_norm")(h)
    return x_BxTxE + h, new_kv


_REMAT_POLICIES = {"layer": None,  # save nothing but the layer's input
                   "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class ScannedBlock(Block):
  """One step of the scanned stack: a Block whose carry is (x, stacked keys, stacked values,
  layer index). The layer reads its cache rows from the stacked cache and writes its T new
  tokens back into it in place: a cache scanned in and out (xs / ys) was copied whole at every
  decode step (generation 2x slower on CPU)."""

  def __call__(self, carry, cos_sin, mask_BxTxS, index, prefix_kv=None, prefix_mask=None,
               is_sliding=None):
    x_BxTxE, k_LxBxKxDxS, v_LxBxKxSxD, layer = carry
    kv = None
    if k_LxBxKxDxS is not None:
      kv = (lax.dynamic_index_in_dim(k_LxBxKxDxS, layer, keepdims=False),
            lax.dynamic_index_in_dim(v_LxBxKxSxD, layer, keepdims=False))
    x_BxTxE, new_kv = super().__call__(x_BxTxE, cos_sin, mask_BxTxS, kv, index, prefix_kv,
                                       prefix_mask, is_sliding)
    return (x_BxTxE, k_LxBxKxDxS, v_LxBxKxSxD, layer + 1), new_kv


def _remat(config: ModelConfig, cls):
  """`cls` under `nn.remat` with the config's policy (`ModelConfig.remat`)."""
  if config.remat == "none":
    return cls
  return nn.remat(cls, policy=_REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)


def _scanned_blocks(config: ModelConfig):
  """The L blocks as one `nn.scan`: params stacked on a leading "layers" axis, the prompt
  prefix scanned with them, the KV cache in the carry, everything else broadcast."""
  return nn.scan(_remat(config, ScannedBlock), variable_axes={"params": 0},
                 split_rngs={"params": True}, length=config.num_layers,
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                 metadata_params={nn.PARTITION_NAME: "layers"})


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
        _kernel_init(), ("vocab", "embed")), (c.vocab_size, c.hidden_size), pdtype)
    lm_head = None
    if not c.tie_embeddings:
      lm_head = self.param("lm_head", nn.with_logical_partitioning(
          _kernel_init(), ("embed", "vocab")), (c.hidden_size, c.vocab_size), pdtype)

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
    if c.scan_layers:
      flags = None
      if c.has_sliding_layers:  # both variants go in; each layer's flag picks its own
        flags = jnp.asarray([c.layer_is_sliding(i) for i in range(c.num_layers)])
        if prefix is not None:  # the full mask per row, as the sliding one is
          prefix_full = jnp.repeat(prefix_full, prefix_sliding.shape[0] // prefix_full.shape[0],
                                   axis=0)
        global_rope, full_mask = (global_rope, local_rope), (full_mask, sliding_mask)
        prefix_full = None if prefix is None else (prefix_full, prefix_sliding)
      carry = (x_BxTxE, *(kv or (None, None)), jnp.zeros((), jnp.int32))
      (x_BxTxE, k_all, v_all, _), new_kv = _scanned_blocks(c)(c, False, name="layers")(
          carry, global_rope, full_mask, index, prefix_kv, prefix_full, flags)
      if cache is not None:
        new_kv = (lax.dynamic_update_slice(k_all, new_kv[0].astype(k_all.dtype), (0, 0, 0, 0, index)),
                  lax.dynamic_update_slice(v_all, new_kv[1].astype(v_all.dtype), (0, 0, 0, index, 0)))
    else:
      block_cls, new_k, new_v = _remat(c, Block), [], []
      for i in range(c.num_layers):
        sliding = c.layer_is_sliding(i)
        x_BxTxE, layer_kv = block_cls(c, sliding, name=f"layers_{i}")(
            x_BxTxE, local_rope if sliding else global_rope,
            sliding_mask if sliding else full_mask, None if kv is None else (kv[0][i], kv[1][i]),
            index, None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i]),
            prefix_sliding if sliding else prefix_full)
        if cache is not None:
          new_k.append(layer_kv[0])
          new_v.append(layer_kv[1])
      new_kv = (tuple(new_k), tuple(new_v))

    x_BxTxE = RMSNorm(c, name="final_norm")(x_BxTxE)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k_BxKxDxS=new_kv[0], v_BxKxSxD=new_kv[1], valid_BxS=valid_BxS,
                          pos_BxS=pos_BxS, index=cache.index + tokens_BxT.shape[1],
                          ring=cache.ring)
    if return_hidden:
      return x_BxTxE, new_cache
    return _unembed(c, embedding, lm_head, x_BxTxE), new_cache


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
