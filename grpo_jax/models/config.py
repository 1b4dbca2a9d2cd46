"""Model configuration: one frozen, hashable dataclass for every decoder family, and named presets.

`ModelConfig` is hashable so it can be a static argument of `jax.jit`. It holds only what the
checkpoint defines (no derived values); helpers such as `layer_is_sliding` derive the rest.

Families and what distinguishes them:
- "qwen2":  GQA, bias on q/k/v, SwiGLU, RMSNorm (x * w).
- "qwen3":  like qwen2 without the bias, plus RMSNorm on q and k per head (before RoPE).
- "llama":  like qwen3 without q/k norm; Llama 3.1+ RoPE scaling (`rope_scaling_type="llama3"`).
- "gemma3": GeGLU (tanh GELU), RMSNorm as x * (1 + w), norms before AND after attention and MLP,
            q/k norm, embeddings scaled by sqrt(hidden_size), attention scale
            query_pre_attn_scalar**-0.5, interleaved sliding-window ("sliding_attention", RoPE base
            `rope_local_theta`) and global ("full_attention", RoPE base `rope_theta` with optional
            linear scaling) layers.

Usage:
    config = get_config("tiny_qwen2")
    config = get_config("qwen2.5-0.5b", dtype="bfloat16", remat="layer")
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

FAMILIES = ("qwen2", "qwen3", "llama", "gemma3")
ROPE_SCALING_TYPES = (None, "llama3", "linear")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT_POLICIES = ("none", "layer", "matmuls")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder-only transformer (hashable: a valid `jax.jit` static arg)."""

  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False
  hidden_act: str = "silu"
  # RoPE of global ("full_attention") layers. `rope_scaling_type`: None, "llama3" (uses the
  # factor, low/high frequency factors and original context length) or "linear" (factor only).
  rope_theta: float = 10_000.0
  rope_scaling_type: str | None = None
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  # Gemma 3. `layer_types`: one of LAYER_TYPES per layer, None = all "full_attention".
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  rope_local_theta: float = 10_000.0
  query_pre_attn_scalar: float | None = None  # None: scale scores by head_dim**-0.5
  scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size)
  final_logit_softcap: float | None = None
  attn_logit_softcap: float | None = None
  # Numerics and memory.
  param_dtype: str = "float32"
  dtype: str = "float32"  # activations; softmax and norm statistics are always float32
  # Layers as one `lax.scan` over stacked parameters (params["layers"], leading axis L):
  # compile time independent of depth. Off: one `layers_{i}` subtree per layer, unrolled.
  scan_layers: bool = False
  # What each layer keeps for the backward pass (REMAT_POLICIES): "none" keeps everything;
  # "layer" only its input (jax.checkpoint, all recomputed, weights re-gathered); "matmuls" its
  # matmul outputs without a batch dimension of the weights (recomputes norms, activations and
  # attention's softmax, re-gathers weights). True / False read as "layer" / "none".
  remat: str = "none"
  # LoRA (models/lora.py): rank 0 = off. Adapters on the named weights of every layer
  # (LORA_TARGETS), delta W = (alpha / rank) * A @ B, A [in..., r] random, B [r, out...] zero.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("qkv", "o", "gate_up", "down")

  def __post_init__(self):
    _check(self.family in FAMILIES, "family", self.family, FAMILIES)
    _check(self.rope_scaling_type in ROPE_SCALING_TYPES, "rope_scaling_type",
           self.rope_scaling_type, ROPE_SCALING_TYPES)
    _check(self.hidden_act in HIDDEN_ACTS, "hidden_act", self.hidden_act, HIDDEN_ACTS)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.layer_types is not None:
      if not isinstance(self.layer_types, tuple):
        raise ValueError("ModelConfig: layer_types must be a tuple (hashable), got "
                         f"{type(self.layer_types).__name__}")
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"ModelConfig: layer_types has {len(self.layer_types)} entries, "
                         f"num_layers={self.num_layers}")
      for t in self.layer_types:
        _check(t in LAYER_TYPES, "layer_types entry", t, LAYER_TYPES)
      if "sliding_attention" in self.layer_types and not self.sliding_window:
        raise ValueError("ModelConfig: sliding_attention layers need sliding_window > 0")
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "layer" if self.remat else "none")
    _check(self.remat in REMAT_POLICIES, "remat", self.remat, REMAT_POLICIES)
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # fails loudly on an unknown dtype name
    if self.lora_rank < 0:
      raise ValueError(f"ModelConfig: lora_rank={self.lora_rank} must be >= 0")
    if not isinstance(self.lora_targets, tuple):
      raise ValueError("ModelConfig: lora_targets must be a tuple (hashable)")
    for t in self.lora_targets:
      _check(t in LORA_TARGETS, "lora_targets entry", t, LORA_TARGETS)

  @property
  def num_groups(self) -> int:
    """Query heads per KV head (G in `q_BxTxKxGxD`)."""
    return self.num_heads // self.num_kv_heads

  def layer_is_sliding(self, layer: int) -> bool:
    return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

  @property
  def has_sliding_layers(self) -> bool:
    """Any Gemma 3 local (sliding-window) layer: they need their own mask and RoPE."""
    return self.layer_types is not None and "sliding_attention" in self.layer_types

  def replace(self, **overrides) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)


LORA_TARGETS = ("qkv", "o", "gate_up", "down")


def _check(ok: bool, field: str, value, allowed) -> None:
  if not ok:
    raise ValueError(f"ModelConfig: unsupported {field}={value!r}; expected one of {allowed}")


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Gemma 3 interleaving: every `pattern`-th layer is global, the others slide."""
  return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
               for i in range(num_layers))


def _qwen2(**kw) -> ModelConfig:
  return ModelConfig(family="qwen2", qkv_bias=True, **kw)


def _qwen3(**kw) -> ModelConfig:
  return ModelConfig(family="qwen3", qk_norm=True, **kw)


def _llama(**kw) -> ModelConfig:
  return ModelConfig(family="llama", **kw)


def _gemma3(num_layers: int, **kw) -> ModelConfig:
  return ModelConfig(family="gemma3", num_layers=num_layers, qk_norm=True,
                     hidden_act="gelu_pytorch_tanh", scale_embeddings=True,
                     layer_types=gemma3_layer_types(num_layers), **kw)


_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
             head_dim=8, max_position_embeddings=128)

PRESETS = {
    # Tiny: tests and CPU experiments.
    "tiny_qwen2": lambda: _qwen2(num_layers=2, **_TINY),
    "tiny_qwen3": lambda: _qwen3(num_layers=2, rope_theta=1e6, **_TINY),
    "tiny_llama": lambda: _llama(
        num_layers=2, rope_theta=5e5, rms_norm_eps=1e-5, rope_scaling_type="llama3",
        rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_position=16, **_TINY),
    "tiny_gemma3": lambda: ModelConfig(
        family="gemma3", num_layers=3, qk_norm=True, hidden_act="gelu_pytorch_tanh",
        scale_embeddings=True, layer_types=gemma3_layer_types(3, pattern=3), sliding_window=4,
        rope_theta=1e6, rope_local_theta=1e4, query_pre_attn_scalar=8, **_TINY),
    # The benchmark model of bench/SPEC.md.
    "bench_qwen2": lambda: _qwen2(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=64, rope_theta=1e4, rms_norm_eps=1e-6,
        max_position_embeddings=512),
    # Published sizes.
    "qwen2.5-0.5b": lambda: _qwen2(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2.5-1.5b": lambda: _qwen2(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2.5-3b": lambda: _qwen2(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
        num_kv_heads=2, head_dim=128, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2.5-7b": lambda: _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
        tie_embeddings=False),
    "qwen3-0.6b": lambda: _qwen3(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=40960),
    "llama3.2-1b": lambda: _llama(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=5e5, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_scaling_type="llama3", rope_scaling_factor=32.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192),
    "gemma3-1b": lambda: _gemma3(
        num_layers=26, vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_heads=4,
        num_kv_heads=1, head_dim=256, rope_theta=1e6, rope_local_theta=1e4, sliding_window=512,
        query_pre_attn_scalar=256, max_position_embeddings=32768),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name` with `overrides` applied (e.g. dtype="bfloat16", scan_layers=True)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name](), **overrides)
