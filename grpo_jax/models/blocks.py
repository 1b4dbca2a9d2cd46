"""The decoder's layer modules (Flax Linen): RMSNorm, LoRA's low-rank update, attention, the
gated MLP, a residual Block, and the scanned stack's step (`ScannedBlock`, `scanned_blocks`)
with the remat policies (`remat_class`). Parameter names, shapes and axes: `transformer`'s
docstring; `transformer.Decoder` assembles them and `transformer.forward` runs them."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from grpo_jax.models.attention import apply_rope, attend, attend_with_prefix
from grpo_jax.models.config import ModelConfig


def kernel_init():
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


def _new_tokens_apart(mask_BxTxS, index, k_BxKxDxT, v_BxKxTxD):
  """A scanned layer's cache mask without its new slots [index, index + T), and the new tokens
  as a second key set with those slots' mask: the stacked cache is read as it is and the
  tokens are written after the layer (`ScannedBlock`). Written into the layer's slice first,
  the slice was copied at every step (generation 1.7x slower than unrolled on CPU, not 1.1x)."""
  T, S = k_BxKxDxT.shape[-1], mask_BxTxS.shape[-1]
  slot_S = jnp.arange(S)
  stale_S = (slot_S >= index) & (slot_S < index + T)
  new = (k_BxKxDxT, v_BxKxTxD, lax.dynamic_slice_in_dim(mask_BxTxS, index, T, axis=2))
  return mask_BxTxS & ~stale_S, new


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
        kernel_init(), ("embed", "kv_heads", "qkv", "head_dim")), (E, K, G + 2, D), pdtype)
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
      k_BxKxDxS, v_BxKxSxD = kv
      mask_BxTxS, new = _new_tokens_apart(mask_BxTxS, index, k_BxKxDxT.astype(dtype),
                                          v_BxKxTxD.astype(dtype))
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
        kernel_init(), ("heads", "head_dim", "embed")), (H, D, E), pdtype)
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
        kernel_init(), ("embed", "gate_up", "mlp")), (E, 2, M), pdtype)
    w_down = self.param("down", nn.with_logical_partitioning(
        kernel_init(), ("mlp", "embed")), (M, E), pdtype)
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


def remat_class(config: ModelConfig, cls):
  """`cls` under `nn.remat` with the config's policy (`ModelConfig.remat`)."""
  if config.remat == "none":
    return cls
  return nn.remat(cls, policy=_REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)


def scanned_blocks(config: ModelConfig):
  """The L blocks as one `nn.scan`: params stacked on a leading "layers" axis, the prompt
  prefix scanned with them, the KV cache in the carry, everything else broadcast."""
  return nn.scan(remat_class(config, ScannedBlock), variable_axes={"params": 0},
                 split_rngs={"params": True}, length=config.num_layers,
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                 metadata_params={nn.PARTITION_NAME: "layers"})
