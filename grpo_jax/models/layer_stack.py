"""The two stored layouts of the decoder's layers, and the conversion between them.

    unrolled (`scan_layers=False`):  params["layers_0"], ..., params["layers_{L-1}"]
    stacked  (`scan_layers=True`):   params["layers"], every leaf with a leading L axis

The same `Block` parameters either way, so a model converts losslessly. Every boundary that
speaks per layer (Hugging Face import / export, the PEFT export, LoRA's merge, the base
fingerprint) works on the unrolled layout and converts at its door; checkpoints convert on
restore when they were written with the other setting (`to_layout` handles any tree that holds
params-shaped subtrees: optimizer moments, a reference copy, abstract restore targets).

    stacked = to_layout(params, scan_layers=True)
    params == to_layout(stacked, scan_layers=False)   # value for value
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

STACKED = "layers"
_UNROLLED = re.compile(r"layers_(\d+)$")


def _is_unrolled(node: Any) -> bool:
  return isinstance(node, dict) and "layers_0" in node


def _is_stacked(node: Any) -> bool:
  return isinstance(node, dict) and isinstance(node.get(STACKED), dict) and "layers_0" not in node


def layout_of(tree: Any) -> bool | None:
  """True when `tree` holds stacked layers, False unrolled ones, None neither (no layers)."""
  found: list[bool] = []

  def visit(node):
    if _is_unrolled(node) or _is_stacked(node):
      found.append(_is_stacked(node))
      return None
    return node

  jax.tree.map(visit, tree, is_leaf=lambda x: _is_unrolled(x) or _is_stacked(x))
  return found[0] if found else None


def _stack_leaves(*leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  if isinstance(first, np.ndarray) or np.isscalar(first):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _unstack_leaf(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[i]


def _stack(node: dict) -> dict:
  layers = sorted((int(m.group(1)), k) for k in node if (m := _UNROLLED.match(k)))
  if [i for i, _ in layers] != list(range(len(layers))):
    raise ValueError(f"layers {[k for _, k in layers]} are not numbered 0 .. {len(layers) - 1}")
  out = {k: v for k, v in node.items() if not _UNROLLED.match(k)}
  out[STACKED] = jax.tree.map(_stack_leaves, *[node[k] for _, k in layers])
  return out


def _unstack(node: dict) -> dict:
  stacked = node[STACKED]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in node.items() if k != STACKED}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: _unstack_leaf(x, i), stacked)
  return out


def to_layout(tree: Any, scan_layers: bool) -> Any:
  """`tree` with every params-shaped subtree in the stacked (True) or unrolled (False) layout.

  Leaves may be NumPy or JAX arrays (stacked with np.stack / jnp.stack, sliced back), or
  `jax.ShapeDtypeStruct`s, whose NamedSharding gains or loses a leading replicated axis. A
  subtree already in the asked layout, and a tree without layers, come back unchanged."""
  convert, match = (_stack, _is_unrolled) if scan_layers else (_unstack, _is_stacked)
  return jax.tree.map(lambda node: convert(node) if match(node) else node, tree,
                      is_leaf=match)
