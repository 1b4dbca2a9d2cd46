"""Hugging Face config.json <-> ModelConfig, for the families of hf_checkpoint.py.

    config = config_from_hf(json.load(open("config.json")), dtype=jnp.bfloat16)
    hf = config_to_hf(config)   # the legacy keys, which every tool of the ecosystem reads

Both the legacy keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
`sliding_window_pattern`) and the transformers 5 `rope_parameters` are read; a value the model
cannot represent is a ValueError naming the field.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from grpo_jax.models.config import ModelConfig, gemma3_layer_types

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
}
_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "gemma3": "gemma3_text"}
_ACTIVATIONS = {"qwen2": "silu", "qwen3": "silu", "llama": "silu", "gemma3": "gelu_pytorch_tanh"}
_TIED_DEFAULT = {"qwen2": False, "qwen3": False, "llama": False, "gemma3": True}


def _unsupported(field: str, value, why: str = "") -> ValueError:
  return ValueError(f"config.json: unsupported value {field}={value!r}{': ' + why if why else ''}")


def _rope(params: dict | None, field: str) -> dict:
  """ModelConfig RoPE fields from a transformers rope dict (legacy `rope_scaling` or new)."""
  params = params or {}
  kind = params.get("rope_type", params.get("type", "default"))
  out: dict[str, Any] = {}
  if "rope_theta" in params:
    out["rope_theta"] = float(params["rope_theta"])
  if kind == "default":
    return out
  if kind == "linear":
    return out | dict(rope_scaling_type="linear", rope_scaling_factor=float(params["factor"]))
  if kind == "llama3":
    return out | dict(
        rope_scaling_type="llama3", rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_position=int(params["original_max_position_embeddings"]))
  raise _unsupported(f"{field}.rope_type", kind, "supported: default, linear, llama3")


def config_from_hf(hf: dict, *, dtype=jnp.float32) -> ModelConfig:
  """ModelConfig of a transformers config.json dict; raises ValueError naming a bad field."""
  family = _family(hf)
  num_layers = int(hf["num_hidden_layers"])
  num_heads = int(hf["num_attention_heads"])
  kw: dict[str, Any] = dict(
      family=family,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", _TIED_DEFAULT[family])),
      qkv_bias=family == "qwen2",
      qk_norm=family in ("qwen3", "gemma3"),
      param_dtype=jnp.dtype(dtype).name,
      dtype=jnp.dtype(dtype).name,
      hidden_act=_activation(hf, family),
  )
  _check_supported(hf, family)
  kw |= _gemma3_attention(hf, num_layers) if family == "gemma3" else _full_attention(hf, family)
  try:
    return ModelConfig(**kw)
  except ValueError as e:
    raise ValueError(f"config.json: {e}") from e


def _family(hf: dict) -> str:
  """The model family of config.json's architectures (else its model_type)."""
  archs = hf.get("architectures") or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if family is None:
    if archs:
      raise ValueError(f"config.json: unknown architecture {archs}; supported: "
                       f"{sorted(ARCHITECTURES)}")
    family = {v: k for k, v in _MODEL_TYPES.items()}.get(hf.get("model_type"))
    if family is None:
      raise ValueError(f"config.json: unknown model_type {hf.get('model_type')!r} and no "
                       f"architectures; supported: {sorted(ARCHITECTURES)}")
  return family


def _activation(hf: dict, family: str) -> str:
  act_field = "hidden_activation" if family == "gemma3" and "hidden_activation" in hf else (
      "hidden_act")
  act = hf.get(act_field, _ACTIVATIONS[family])
  if act != _ACTIVATIONS[family]:
    raise _unsupported(act_field, act, f"{family} uses {_ACTIVATIONS[family]}")
  return act


def _check_supported(hf: dict, family: str) -> None:
  for field in ("attention_bias", "mlp_bias"):
    if family != "qwen2" and hf.get(field):
      raise _unsupported(field, hf[field])
  if hf.get("use_sliding_window") and family != "gemma3":
    raise _unsupported("use_sliding_window", hf["use_sliding_window"])
  if hf.get("use_bidirectional_attention"):
    raise _unsupported("use_bidirectional_attention", hf["use_bidirectional_attention"])


def _gemma3_attention(hf: dict, num_layers: int) -> dict[str, Any]:
  """Gemma 3's RoPE (global and local), sliding / global layer pattern, softcaps."""
  kw: dict[str, Any] = {}
  rope = hf.get("rope_parameters")
  if rope and "full_attention" in rope:
    kw |= _rope(rope["full_attention"], "rope_parameters.full_attention")
    local = _rope(rope.get("sliding_attention"), "rope_parameters.sliding_attention")
    if "rope_scaling_type" in local:
      raise _unsupported("rope_parameters.sliding_attention.rope_type",
                         local["rope_scaling_type"], "local layers use plain RoPE")
    kw["rope_local_theta"] = local.get("rope_theta", 10_000.0)
  else:
    kw["rope_theta"] = float(hf.get("rope_theta", 1_000_000.0))
    kw |= _rope(hf.get("rope_scaling"), "rope_scaling")
    kw["rope_local_theta"] = float(hf.get("rope_local_base_freq", 10_000.0))
  layer_types = hf.get("layer_types") or gemma3_layer_types(
      num_layers, int(hf.get("sliding_window_pattern", 6)))
  return kw | dict(layer_types=tuple(layer_types),
                   sliding_window=int(hf.get("sliding_window", 4096)),
                   query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                   scale_embeddings=True,
                   final_logit_softcap=hf.get("final_logit_softcapping"),
                   attn_logit_softcap=hf.get("attn_logit_softcapping"))


def _full_attention(hf: dict, family: str) -> dict[str, Any]:
  """RoPE of the families with full attention only (Qwen, Llama)."""
  if any(t != "full_attention" for t in hf.get("layer_types") or []):
    raise _unsupported("layer_types", hf["layer_types"], f"{family} has only full attention")
  kw: dict[str, Any] = {"rope_theta": float(hf.get("rope_theta", 10_000.0))}
  rope = hf.get("rope_parameters")
  if rope is not None:
    return kw | _rope(rope, "rope_parameters")
  return kw | _rope(hf.get("rope_scaling"), "rope_scaling")


def _int_if_integral(x: float):
  return int(x) if float(x).is_integer() else x  # transformers types some fields as int


def config_to_hf(config: ModelConfig) -> dict:
  """A config.json dict that transformers' AutoModelForCausalLM (and vLLM) can load."""
  c = config
  arch = {v: k for k, v in ARCHITECTURES.items()}[c.family]
  hf: dict[str, Any] = dict(
      architectures=[arch], model_type=_MODEL_TYPES[c.family], vocab_size=c.vocab_size,
      hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_embeddings,
      rope_theta=c.rope_theta, torch_dtype=c.param_dtype)
  if c.rope_scaling_type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_scaling_factor}
  elif c.rope_scaling_type == "llama3":
    hf["rope_scaling"] = {
        "rope_type": "llama3", "factor": c.rope_scaling_factor,
        "low_freq_factor": c.rope_low_freq_factor, "high_freq_factor": c.rope_high_freq_factor,
        "original_max_position_embeddings": c.rope_original_max_position}
  if c.family == "gemma3":
    hf |= dict(hidden_activation=c.hidden_act, rope_local_base_freq=c.rope_local_theta,
               sliding_window=c.sliding_window, layer_types=list(c.layer_types or ()),
               query_pre_attn_scalar=_int_if_integral(c.query_pre_attn_scalar or c.head_dim),
               final_logit_softcapping=c.final_logit_softcap,
               attn_logit_softcapping=c.attn_logit_softcap)
  else:
    hf["hidden_act"] = c.hidden_act
  if c.family in ("llama", "qwen3"):
    hf["attention_bias"] = False
  return hf
