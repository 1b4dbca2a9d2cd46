"""LoRA on the decoder (Hu et al. 2021), as pure functions over the params tree.

With `ModelConfig.lora_rank = r > 0` every layer's target weights (`lora_targets`: qkv, o,
gate_up, down) get two more leaves beside them, `<name>_lora_a` [in..., r] and `<name>_lora_b`
[r, out...], and the modules add (alpha / r) * (x @ A) @ B to the weight's output (unmerged: the
base weight is never rewritten during training). Here:

  adapters, base = split(params)          # the adapters (trained) and the base (frozen)
  params = combine(base, adapters)        # the tree `models.forward` takes
  merged, base_config = merge(params, config)   # W + (alpha / r) A @ B, a plain model again
  fingerprint(base)                       # identifies the base an adapter checkpoint belongs to

Why not qwix (Tunix's LoRA): it rewrites Flax modules by intercepting their ops; our model is
a few explicit einsums, so LoRA is one helper in `blocks.py` and this file, and the params
stay a plain tree that jit, sharding rules and Orbax handle like any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.layer_stack import to_layout

_SUFFIXES = ("_lora_a", "_lora_b")
# target -> (its module, the weight's einsum with A's input axes first: "in..., out...").
TARGETS = {"qkv": ("attn", 1), "o": ("attn", 2), "gate_up": ("mlp", 1), "down": ("mlp", 1)}


def is_adapter(path) -> bool:
  return str(getattr(path[-1], "key", path[-1])).endswith(_SUFFIXES)


def split(params) -> tuple[dict, dict]:
  """(adapters, base): the same nested dicts, each with only its own leaves."""
  adapters, base = {}, {}

  def visit(node, a, b):
    for key, value in node.items():
      if isinstance(value, dict):
        visit(value, a.setdefault(key, {}), b.setdefault(key, {}))
      else:
        (a if key.endswith(_SUFFIXES) else b)[key] = value

  visit(params, adapters, base)
  return _prune(adapters), _prune(base)


def _prune(tree: dict) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      value = _prune(value)
      if not value:
        continue
    out[key] = value
  return out


def combine(base, adapters):
  """The model's params tree: base leaves and adapter leaves side by side."""
  if not adapters:
    return base
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(base.get(key, {}), value) if isinstance(value, dict) else value
  return out


def base_config(config: ModelConfig) -> ModelConfig:
  return dataclasses.replace(config, lora_rank=0)


def merge(params, config: ModelConfig) -> tuple[dict, ModelConfig]:
  """(W + (alpha / r) A @ B for every adapted weight, in W's dtype and the config's layer
  layout; the config without LoRA)."""
  if not config.lora_rank:
    return params, config
  adapters, base = split(params)
  scale = config.lora_alpha / config.lora_rank
  # Stacked layers: A [L, in..., r] and B [L, r, out...] merge layer by layer (vmap), in place
  # of slicing the stack apart and back (this runs in the sampler's merge at every rollout).
  stacked = int(config.scan_layers)
  product = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
  product = jax.vmap(product) if stacked else product
  merged = jax.tree.map(lambda x: x, base)
  for layer, modules in adapters.items():
    for module, leaves in modules.items():
      for target in {k[:-len("_lora_a")] for k in leaves}:
        a, b = leaves[f"{target}_lora_a"], leaves[f"{target}_lora_b"]
        w = base[layer][module][target]
        n_in = TARGETS[target][1]
        delta = product(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        assert delta.shape == w.shape and a.ndim == n_in + 1 + stacked
        merged[layer][module][target] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return merged, base_config(config)


def adapter_targets(config: ModelConfig) -> list[tuple[str, str, str]]:
  """(layer, module, weight) of every adapted weight."""
  return [(f"layers_{i}", TARGETS[t][0], t) for i in range(config.num_layers)
          for t in config.lora_targets]


def fingerprint(config: ModelConfig, base) -> str:
  """A short digest of the base model: its config (without LoRA and dtypes) and, per leaf, the
  shape and the float32 sum and sum of squares rounded to 6 significant digits (robust to the
  summation order of a different mesh). An adapter checkpoint records it; resuming on another
  base is an error."""
  base = to_layout(base, False)  # the same digest whatever the stored layout
  stats = jax.tree.map(lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                            jnp.sum(jnp.square(x.astype(jnp.float32)))]), base)
  stats = jax.device_get(stats)
  leaves = [(jax.tree_util.keystr(path), list(np.shape(x)), [float(f"{v:.6g}") for v in s])
            for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                                    jax.tree.leaves(stats))]
  desc = dataclasses.asdict(base_config(config))
  for name in ("param_dtype", "dtype", "remat", "scan_layers", "lora_alpha", "lora_targets"):
    desc.pop(name)
  blob = json.dumps([desc, leaves], sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def num_params(tree: Any) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
