"""Hugging Face checkpoints <-> (ModelConfig, params): load and save safetensors directories.

    config, params = load_hf_checkpoint("/models/Qwen2.5-0.5B-Instruct")
    save_hf_checkpoint("/tmp/policy", config, params)   # loads in transformers, vLLM, lm-eval

Reads `config.json` and `model.safetensors` (or the shards of `model.safetensors.index.json`)
with the safetensors NumPy reader (never pickle). Supported architectures: Qwen2ForCausalLM,
Qwen3ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM (text); config.json is read and written
by hf_config.py.

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

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.hf_config import config_from_hf, config_to_hf
from grpo_jax.models.layer_stack import to_layout
from grpo_jax.models.transformer import param_logical_axes

# Our per-layer norm name -> HF name.
_NORMS = {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"pre_attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "pre_mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm"}


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
  params = to_layout(params, False)  # stacked layers: sliced per layer
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
