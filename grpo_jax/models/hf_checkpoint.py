"""Hugging Face checkpoints <-> (ModelConfig, params): load and save safetensors directories.

    config, params = load_hf_checkpoint("/models/Qwen2.5-0.5B-Instruct")
    save_hf_checkpoint("/tmp/policy", config, params)   # loads in transformers, vLLM, lm-eval

Reads `config.json` and `model.safetensors` (or the shards of `model.safetensors.index.json`)
with the safetensors NumPy reader (never pickle). Supported architectures: Qwen2ForCausalLM,
Qwen3ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM (text). Both the legacy config keys
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and the
transformers 5 `rope_parameters` are understood; saving writes the legacy keys, which every
tool of the ecosystem reads.

Layout mapping (HF torch Linear weights are [out, in]):
    q/k/v_proj.weight [H*D|K*D, E]  -> attn/qkv [E, K, G+2, D] (grouped per KV head)
    q/k/v_proj.bias                 -> attn/qkv_bias [K, G+2, D]
    o_proj.weight [E, H*D]          -> attn/o [H, D, E]
    gate/up_proj.weight [M, E]      -> mlp/gate_up [E, 2, M]
    down_proj.weight [E, M]         -> mlp/down [M, E]
    lm_head.weight [V, E]           -> lm_head [E, V] (absent when embeddings are tied)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from grpo_jax.models.config import ModelConfig, gemma3_layer_types
from grpo_jax.models.transformer import param_logical_axes

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
}
_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "gemma3": "gemma3_text"}
_ACTIVATIONS = {"qwen2": "silu", "qwen3": "silu", "llama": "silu", "gemma3": "gelu_pytorch_tanh"}
_TIED_DEFAULT = {"qwen2": False, "qwen3": False, "llama": False, "gemma3": True}

# Our per-layer norm name -> HF name.
_NORMS = {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"pre_attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "pre_mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm"}


# ----------------------------------------------------------------------------- config.json


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
  )
  act_field = "hidden_activation" if family == "gemma3" and "hidden_activation" in hf else (
      "hidden_act")
  act = hf.get(act_field, _ACTIVATIONS[family])
  if act != _ACTIVATIONS[family]:
    raise _unsupported(act_field, act, f"{family} uses {_ACTIVATIONS[family]}")
  kw["hidden_act"] = act
  for field in ("attention_bias", "mlp_bias"):
    if family != "qwen2" and hf.get(field):
      raise _unsupported(field, hf[field])
  if hf.get("use_sliding_window") and family != "gemma3":
    raise _unsupported("use_sliding_window", hf["use_sliding_window"])
  if hf.get("use_bidirectional_attention"):
    raise _unsupported("use_bidirectional_attention", hf["use_bidirectional_attention"])

  rope = hf.get("rope_parameters")
  if family == "gemma3":
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
    kw |= dict(layer_types=tuple(layer_types), sliding_window=int(hf.get("sliding_window", 4096)),
               query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
               scale_embeddings=True,
               final_logit_softcap=hf.get("final_logit_softcapping"),
               attn_logit_softcap=hf.get("attn_logit_softcapping"))
  else:
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
      raise _unsupported("layer_types", hf["layer_types"], f"{family} has only full attention")
    kw["rope_theta"] = float(hf.get("rope_theta", 10_000.0))
    if rope is not None:
      kw |= _rope(rope, "rope_parameters")
    else:
      kw |= _rope(hf.get("rope_scaling"), "rope_scaling")
  try:
    return ModelConfig(**kw)
  except ValueError as e:
    raise ValueError(f"config.json: {e}") from e


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


# ----------------------------------------------------------------------------- tensor layouts


def _layer_names(config: ModelConfig, i: int) -> dict[str, str]:
  prefix = f"model.layers.{i}."
  norms = _GEMMA_NORMS if config.family == "gemma3" else _NORMS
  return {ours: prefix + hf + ".weight" for ours, hf in norms.items()}


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name the checkpoint must hold, with its HF shape."""
  c = config
  E, H, K, D, M = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  shapes = {"model.embed_tokens.weight": (c.vocab_size, E), "model.norm.weight": (E,)}
  if not c.tie_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, E)
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    shapes |= {name: (E,) for name in _layer_names(c, i).values()}
    shapes |= {p + "self_attn.q_proj.weight": (H * D, E), p + "self_attn.k_proj.weight": (K * D, E),
               p + "self_attn.v_proj.weight": (K * D, E), p + "self_attn.o_proj.weight": (E, H * D),
               p + "mlp.gate_proj.weight": (M, E), p + "mlp.up_proj.weight": (M, E),
               p + "mlp.down_proj.weight": (E, M)}
    if c.qkv_bias:
      shapes |= {p + "self_attn.q_proj.bias": (H * D,), p + "self_attn.k_proj.bias": (K * D,),
                 p + "self_attn.v_proj.bias": (K * D,)}
    if c.qk_norm:
      shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
  return shapes


def _from_hf(config: ModelConfig, read: Callable[[str], np.ndarray]
             ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yields (params path, array in our layout) one tensor at a time (bounded host memory)."""
  c = config
  E, K, G, D = c.hidden_size, c.num_kv_heads, c.num_groups, c.head_dim
  yield ("embedding",), read("model.embed_tokens.weight")
  if not c.tie_embeddings:
    yield ("lm_head",), read("lm_head.weight").T
  yield ("final_norm", "scale"), read("model.norm.weight")
  for i in range(c.num_layers):
    layer, p = f"layers_{i}", f"model.layers.{i}."
    for ours, hf in _layer_names(c, i).items():
      yield (layer, ours, "scale"), read(hf)
    q = read(p + "self_attn.q_proj.weight").reshape(K, G, D, E)
    k = read(p + "self_attn.k_proj.weight").reshape(K, 1, D, E)
    v = read(p + "self_attn.v_proj.weight").reshape(K, 1, D, E)
    yield (layer, "attn", "qkv"), np.concatenate([q, k, v], axis=1).transpose(3, 0, 1, 2)
    if c.qkv_bias:
      yield (layer, "attn", "qkv_bias"), np.concatenate([
          read(p + "self_attn.q_proj.bias").reshape(K, G, D),
          read(p + "self_attn.k_proj.bias").reshape(K, 1, D),
          read(p + "self_attn.v_proj.bias").reshape(K, 1, D)], axis=1)
    if c.qk_norm:
      yield (layer, "attn", "q_norm", "scale"), read(p + "self_attn.q_norm.weight")
      yield (layer, "attn", "k_norm", "scale"), read(p + "self_attn.k_norm.weight")
    yield (layer, "attn", "o"), read(p + "self_attn.o_proj.weight").T.reshape(c.num_heads, D, E)
    gate, up = read(p + "mlp.gate_proj.weight"), read(p + "mlp.up_proj.weight")
    yield (layer, "mlp", "gate_up"), np.stack([gate, up], axis=0).transpose(2, 0, 1)
    yield (layer, "mlp", "down"), read(p + "mlp.down_proj.weight").T


def _to_hf(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """HF tensor name -> array, the exact inverse of `_from_hf`."""
  c = config
  E, H, K, G, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.num_groups, c.head_dim
  get = lambda x: np.asarray(jax.device_get(x))
  out = {"model.embed_tokens.weight": get(params["embedding"]),
         "model.norm.weight": get(params["final_norm"]["scale"])}
  if not c.tie_embeddings:
    out["lm_head.weight"] = get(params["lm_head"]).T
  for i in range(c.num_layers):
    layer, p = params[f"layers_{i}"], f"model.layers.{i}."
    for ours, hf in _layer_names(c, i).items():
      out[hf] = get(layer[ours]["scale"])
    qkv = get(layer["attn"]["qkv"]).transpose(1, 2, 3, 0)  # [K, G+2, D, E]
    out[p + "self_attn.q_proj.weight"] = qkv[:, :G].reshape(H * D, E)
    out[p + "self_attn.k_proj.weight"] = qkv[:, G].reshape(K * D, E)
    out[p + "self_attn.v_proj.weight"] = qkv[:, G + 1].reshape(K * D, E)
    if c.qkv_bias:
      bias = get(layer["attn"]["qkv_bias"])
      out[p + "self_attn.q_proj.bias"] = bias[:, :G].reshape(H * D)
      out[p + "self_attn.k_proj.bias"] = bias[:, G].reshape(K * D)
      out[p + "self_attn.v_proj.bias"] = bias[:, G + 1].reshape(K * D)
    if c.qk_norm:
      out[p + "self_attn.q_norm.weight"] = get(layer["attn"]["q_norm"]["scale"])
      out[p + "self_attn.k_norm.weight"] = get(layer["attn"]["k_norm"]["scale"])
    out[p + "self_attn.o_proj.weight"] = get(layer["attn"]["o"]).reshape(H * D, E).T
    gate_up = get(layer["mlp"]["gate_up"])
    out[p + "mlp.gate_proj.weight"] = gate_up[:, 0].T
    out[p + "mlp.up_proj.weight"] = gate_up[:, 1].T
    out[p + "mlp.down_proj.weight"] = get(layer["mlp"]["down"]).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- load / save


def _tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file that holds it."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
      if not os.path.exists(file):
        raise FileNotFoundError(f"{file} (listed in {index}) does not exist")
    return files
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                            "model.safetensors.index.json")
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def _place(host: np.ndarray, sharding, logical_axes: tuple[str, ...]):
  """Device array from a host array, built shard by shard when a sharding is given."""
  if sharding is None:
    return jnp.asarray(host)
  if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
    sharding = sharding(logical_axes, host.shape)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def load_hf_checkpoint(path: str, *, dtype=jnp.float32, sharding=None):
  """Loads a local Hugging Face model directory.

  Args:
    path: directory with config.json and model.safetensors (or model.safetensors.index.json).
    dtype: parameter and activation dtype of the returned config and params.
    sharding: None (default device), a pytree of `jax.sharding.Sharding` shaped like params, or a
      callable `(logical_axes: tuple[str, ...], shape) -> Sharding`; each array is then built
      with `jax.make_array_from_callback`, so it is only ever materialised shard by shard on
      devices (the host holds one tensor at a time).

  Returns:
    (ModelConfig, params).
  """
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{config_file} does not exist")
  with open(config_file) as f:
    config = config_from_hf(json.load(f), dtype=dtype)
  files = _tensor_files(path)
  expected = expected_hf_shapes(config)
  missing = [name for name in expected if name not in files]
  if missing:
    raise ValueError(f"{path}: checkpoint lacks tensor(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} that the {config.family} config needs")

  handles: dict[str, Any] = {}
  np_dtype = np.dtype(jnp.dtype(dtype))

  def read(name: str) -> np.ndarray:
    file = files[name]
    if file not in handles:
      handles[file] = safe_open(file, framework="numpy")
    array = handles[file].get_tensor(name)
    if tuple(array.shape) != expected[name]:
      raise ValueError(f"{file}: tensor {name} has shape {tuple(array.shape)}, expected "
                       f"{expected[name]} from config.json")
    return array.astype(np_dtype, copy=False)

  axes = param_logical_axes(config) if sharding is not None else None
  params: dict[str, Any] = {}
  for key_path, host in _from_hf(config, read):
    target = None
    if sharding is not None:
      target = sharding if callable(sharding) and not isinstance(
          sharding, (dict, jax.sharding.Sharding)) else _get(sharding, key_path)
    node = params
    for key in key_path[:-1]:
      node = node.setdefault(key, {})
    node[key_path[-1]] = _place(np.ascontiguousarray(host), target,
                                _get(axes, key_path) if axes is not None else ())
  return config, params


def save_hf_checkpoint(path: str, config: ModelConfig, params) -> None:
  """Writes config.json and model.safetensors (params' dtype) that transformers can load."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  save_file(_to_hf(config, params), os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
