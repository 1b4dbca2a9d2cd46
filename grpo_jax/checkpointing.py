"""Checkpoints: a thin wrapper over Orbax's CheckpointManager.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    ckpt.save(step, state, extra={"data": it.state, "metrics_lines": writer.num_lines})
    ...
    if ckpt.latest_step() is not None:
      state, extra = ckpt.restore(target=abstract_state)  # into abstract_state's shardings
    ckpt.close()

Each step directory holds two items: `state` (any pytree of arrays and Python scalars: params,
optimizer state, reference params, step, PRNG keys) and `extra` (a JSON dict: data-iterator
position, RNG seeds as ints, config). Typed PRNG keys (`jax.random.key`) are stored as their raw
uint32 `jax.random.key_data` and rebuilt on restore with the implementation the target names.

Saves are asynchronous by default (device arrays are copied to host before `save` returns; the
write continues in the background; `wait()` blocks until it is on disk) and atomic: Orbax writes
`<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` when complete, so a save killed at any
moment leaves the previous checkpoint intact and the half-written directory is never listed (it
is removed the next time a Checkpointer opens the directory). Multi-host: every process calls
`save` and `restore`; each writes and reads only its own shards and Orbax coordinates. State
arrays must then be global arrays (on a mesh), not per-process single-device ones: create the
RNG key with `jax.jit(..., out_shardings=NamedSharding(mesh, P()))`, not plain `jax.random.key`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding

STATE, EXTRA = "state", "extra"
_PRNG_IMPLS = "__prng_impls__"  # key in the saved extra JSON: {key path: PRNG implementation}


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


class Checkpointer:
  """Save / restore (state pytree, extra JSON dict) by step, keeping the last `keep` steps.

  `read_only=True` opens an existing directory without creating it (FileNotFoundError naming
  the path when it does not exist) and never saves.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"checkpoint directory does not exist: {self.directory}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only)
    # Handlers named up front so that a fresh process can read metadata and restore.
    handlers = {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                          options=options)

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Save `state` (pytree) and `extra` (JSON-serialisable dict) as `step`. Returns whether a
    save started (False when the step exists already, unless `force`). Call on every process."""
    extra = dict(extra or {})
    if _PRNG_IMPLS in extra:
      raise ValueError(f"extra key {_PRNG_IMPLS!r} is reserved")
    try:
      json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"checkpoint extra must be JSON-serialisable (ints, not arrays): {e}") from None
    if step in self._manager.all_steps():
      if not force:
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    data, impls = split_prng_keys(state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(data),
                                 EXTRA: ocp.args.JsonSave(extra | {_PRNG_IMPLS: impls})})
    return self._manager.save(int(step), args=args, force=True)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, target: Any | None = None, *,
              mesh: Mesh | None = None) -> tuple[Any, dict]:
    """(state, extra) of `step` (default: the latest).

    `target` is a pytree like the saved state whose leaves are `jax.ShapeDtypeStruct(shape,
    dtype, sharding=...)` (or concrete arrays, whose shardings are used): arrays are read
    straight into those shardings, each process reading only its shards. Typed PRNG key leaves
    come back as typed keys. Targets from `jax.eval_shape` carry shardings over an AbstractMesh:
    pass the concrete `mesh` to place them. Without a target the state comes back as saved
    (nested dicts and lists, arrays on the saved sharding where possible).
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps there: {self.all_steps()})")
    abstract = None
    if target is not None:
      abstract = abstract_target(target, mesh)
      saved = self._manager.item_metadata(step)[STATE]
      saved_tree = getattr(saved, "tree", saved)
      mismatch = first_mismatch(saved_tree, abstract)
      if mismatch:
        raise ValueError(f"checkpoint {os.path.join(self.directory, str(step))} does not match "
                         f"the restore target: {mismatch}")
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract), EXTRA: ocp.args.JsonRestore()}))
    extra = dict(restored[EXTRA])
    impls = extra.pop(_PRNG_IMPLS, {})
    return rebuild_prng_keys(restored[STATE], target, impls), extra

  def wait(self) -> None:
    """Block until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finish pending saves and release Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
