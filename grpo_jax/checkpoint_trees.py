"""How pytrees become what Orbax stores and back: key paths, typed PRNG keys as key data, restore
targets on a mesh, mismatch messages, the host item's flat encoding.

The plumbing under `grpo_jax.checkpointing.Checkpointer`:

  - `key_path_str`: a pytree key path as Orbax names it (`opt.0.mu.w`).
  - `split_prng_keys` / `rebuild_prng_keys`: typed PRNG keys (`jax.random.key`) are stored as
    their raw uint32 `jax.random.key_data`, with a {key path: implementation} map saved beside
    them, and wrapped back into typed keys on restore.
  - `abstract_target` (with `concrete_sharding`): a restore target of ShapeDtypeStructs carrying
    the shardings the restored arrays land on, abstract-mesh shardings rebound to a concrete mesh.
  - `first_mismatch`: the message naming the first key whose presence or shape differs between
    a saved tree and a restore target.
  - `encode_host` / `decode_host`: a nested dict of host NumPy arrays as flat arrays `a<i>` (what
    Orbax can store) plus a JSON layout, and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding


def key_path_str(path: tuple) -> str:
  """A pytree key path as Orbax names it: `opt.0.mu.w` (dict keys, attributes, sequence indices)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return ".".join(parts)


def is_prng_key(x: Any) -> bool:
  """True for typed PRNG key arrays and their abstract (ShapeDtypeStruct) versions."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def split_prng_keys(tree: Any) -> tuple[Any, dict[str, str]]:
  """Replace typed PRNG keys by their uint32 key data; returns (tree, {path: impl name})."""
  impls = {}

  def to_data(path, x):
    if is_prng_key(x):
      impls[key_path_str(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(to_data, tree), impls


def concrete_sharding(sharding: Any, mesh: Mesh | None, name: str) -> Any:
  """`sharding`, with a NamedSharding over an AbstractMesh (what `jax.eval_shape` returns for
  sharded values) rebound to the concrete `mesh`; ValueError naming the leaf if that cannot be."""
  if not (isinstance(sharding, NamedSharding)
          and isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
    return sharding
  if mesh is None:
    raise ValueError(f"restore target '{name}' is sharded over an AbstractMesh (as jax.eval_shape "
                     "returns); pass mesh= to restore onto concrete devices")
  if dict(mesh.shape) != dict(sharding.mesh.shape):
    raise ValueError(f"restore target '{name}': its abstract mesh {dict(sharding.mesh.shape)} "
                     f"differs from mesh= {dict(mesh.shape)}")
  return NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def abstract_target(tree: Any, mesh: Mesh | None = None) -> Any:
  """Restore target for `tree`: arrays -> ShapeDtypeStruct with their sharding (so restored
  arrays land there); ShapeDtypeStructs keep theirs (abstract-mesh ones rebound to `mesh`);
  Python scalars pass through. Typed PRNG keys become the ShapeDtypeStruct of their uint32 key
  data with the same sharding (a NamedSharding partitions the leading, key-shaped dims)."""

  def leaf(path, x):
    if not hasattr(x, "dtype") or isinstance(x, (np.ndarray, np.generic)):
      return x  # Python and NumPy values restore as such
    sharding = concrete_sharding(getattr(x, "sharding", None), mesh, key_path_str(path))
    if is_prng_key(x):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def rebuild_prng_keys(restored: Any, target: Any | None, impls: Mapping[str, str]) -> Any:
  """Wrap uint32 key data back into typed keys: at the target's key leaves (with the saved
  implementation, else the target's), or without a target at the paths recorded in `impls`."""
  if target is None:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.wrap_key_data(x, impl=impls[key_path_str(p)])
        if key_path_str(p) in impls else x, restored)

  def wrap(path, t, x):
    if not is_prng_key(t):
      return x
    # ShapeDtypeStruct has no public accessor for its key implementation; its dtype holds it.
    impl = impls.get(key_path_str(path), t.dtype._impl)  # pylint: disable=protected-access
    return jax.random.wrap_key_data(x, impl=impl)

  return jax.tree_util.tree_map_with_path(wrap, target, restored)


def _leaf_shape(x: Any) -> tuple | None:
  shape = getattr(x, "shape", None)
  return tuple(shape) if shape is not None else None


def first_mismatch(saved: Any, target: Any) -> str | None:
  """Compare a saved tree's metadata with a restore target by key path and shape; returns a
  message naming the first (in path order) key that differs, or None when they match."""
  saved_leaves = {key_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
  target_leaves = {key_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  for path in sorted(saved_leaves.keys() | target_leaves.keys()):
    if path not in target_leaves:
      return f"key '{path}' is in the checkpoint but not in the target"
    if path not in saved_leaves:
      return f"key '{path}' is in the target but not in the checkpoint"
    s, t = _leaf_shape(saved_leaves[path]), _leaf_shape(target_leaves[path])
    if s is not None and t is not None and s != t:
      return f"key '{path}' has shape {s} in the checkpoint but {t} in the target"
  return None


def _host_dtype_ok(dtype: np.dtype) -> bool:
  """Whether TensorStore stores `dtype` and its name rebuilds it: numeric kinds and the
  ml_dtypes extensions (bfloat16, float8, int4), not strings, objects, dates or records."""
  if dtype.kind in "biufc":
    return True
  return dtype.kind == "V" and dtype.names is None and dtype.type.__module__ == "ml_dtypes"


def encode_host(host: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[dict]]:
  """Split a nested dict of NumPy arrays into (arrays Orbax can store, JSON layout).

  Orbax refuses empty trees and zero-size arrays, and its key naming is ambiguous for keys with
  dots or slashes, so the arrays are stored flat under `a<i>` and the layout is recorded apart:
  one entry per array, `{"path": [keys], "dtype": name, "shape": [...]}` (zero-size arrays are
  rebuilt from it alone), and one `{"path": [keys]}` per empty dict, in insertion order.
  """
  arrays, spec = {}, []

  def visit(node: Mapping[str, Any], path: list[str]) -> None:
    if not node and path:
      spec.append({"path": path})
    for key, value in node.items():
      where = "/".join(path + [str(key)])
      if not isinstance(key, str):
        raise TypeError(f"host tree keys must be strings: {key!r} at '{where}'")
      if isinstance(value, Mapping):
        visit(value, path + [key])
        continue
      if not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(f"host tree leaf '{where}' must be a NumPy array, got "
                        f"{type(value).__name__}")
      value = np.asarray(value)
      if not _host_dtype_ok(value.dtype):
        raise ValueError(f"host tree leaf '{where}' has dtype {value.dtype}, which cannot be "
                         "checkpointed (numeric and ml_dtypes dtypes only)")
      if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
      entry = {"path": path + [key], "dtype": value.dtype.name, "shape": list(value.shape)}
      if value.size:
        arrays[f"a{len(spec)}"] = value
      spec.append(entry)

  if not isinstance(host, Mapping):
    raise TypeError(f"host must be a dict of NumPy arrays, got {type(host).__name__}")
  visit(host, [])
  return arrays, spec


def decode_host(spec: list[dict], arrays: Mapping[str, Any], where: str = "") -> dict:
  """Inverse of `encode_host`. ValueError naming `where` when a stored array is missing or its
  dtype or shape differs from the layout (a damaged checkpoint)."""
  tree: dict = {}
  for i, entry in enumerate(spec):
    *parents, last = entry["path"]
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    if "dtype" not in entry:
      node.setdefault(last, {})
      continue
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    name = "/".join(entry["path"])
    if not np.prod(shape, dtype=np.int64):
      node[last] = np.zeros(shape, dtype)
      continue
    if f"a{i}" not in arrays:
      raise ValueError(f"host array '{name}' is missing from {where}")
    value = np.asarray(arrays[f"a{i}"])
    if value.dtype != dtype or value.shape != shape:
      raise ValueError(f"host array '{name}' in {where} is {value.dtype}{list(value.shape)}, "
                       f"the checkpoint recorded {dtype}{list(shape)}")
    node[last] = value
  return tree
