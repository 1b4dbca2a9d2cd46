"""Device mesh, logical-axis rules, and placement of params / optimizer state / batches.

The mesh has three named axes:
  data:   pure data parallelism (params replicated across it);
  fsdp:   data parallelism whose members also shard the params and optimizer state (ZeRO-3);
  tensor: model parallelism over heads / MLP / vocab.
The batch is sharded over ("data", "fsdp"). Parameters carry logical axis names (see
`grpo_jax.models`), mapped onto mesh axes by `rules`, an ordered tuple of (logical, mesh axes)
pairs that a config can override. A dimension whose size the mesh axis does not divide stays
replicated (e.g. 2 KV heads on a tensor axis of 4), so every rule set is valid for every model.

Multi-host: call `initialize_distributed()` first (flag-controlled in the launcher); every process
then builds the same global mesh, and `host_local_to_global` assembles each process's share of
the batch into one global array.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical axis, mesh axis or axes). The first rule that names a logical axis wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

# The sampler's layout (`mesh.decode_layout = "replicated"`): parameters whole on every member of
# the batch axes, split over "tensor" only, so a decoded token gathers no weights; the training
# layout's "fsdp" split would re-gather every layer at every token.
DECODE_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, None if name == "embed" else target) for name, target in DEFAULT_RULES)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize` for multi-host runs (TPU pods and multi-GPU clusters auto-detect
  their arguments; on CPU or custom clusters pass all three). Call before touching any device."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> tuple[int, int, int]:
  """Resolve the (data, fsdp, tensor) sizes; at most one may be -1 (= the rest of the devices)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {tuple(sizes)}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {tuple(sizes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"{tuple(sizes)} (product {known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} for sizes {tuple(sizes)}, "
                     f"but there are {num_devices} devices")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all global devices).

  Uses `jax.make_mesh` (topology-aware: tensor-parallel groups on neighbouring chips) when the
  mesh covers all devices, a plain reshape otherwise (e.g. a single device in tests).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, num_devices=len(devices))
  # Auto axes: the compiler propagates shardings from the annotated inputs/outputs (GSPMD).
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (TypeError, ValueError, NotImplementedError):
      pass
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=DEFAULT_RULES) -> P:
  """Map a tuple of logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array; with `shape` and `mesh` given, a dimension that
  the mesh axes do not divide stays replicated.
  """
  rule_map: dict[str, Any] = {}
  for name, target in rules:
    rule_map.setdefault(name, target)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    target = rule_map.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


def _is_axes_leaf(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh: Mesh, logical_axes_tree, shapes_tree, rules=DEFAULT_RULES):
  """NamedShardings for a pytree, from its logical axes and its shapes (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      logical_axes_tree, shapes_tree, is_leaf=_is_axes_leaf)


def optimizer_shardings(mesh: Mesh, optimizer, params_shapes, param_shardings):
  """Shardings for `optimizer.init(params)`: param-shaped leaves (Adam's mu, nu) follow their
  params; everything else (step counts, schedules' state) is replicated."""
  import optax  # local: sharding.py stays usable without the optimizer stack
  state_shapes = jax.eval_shape(optimizer.init, params_shapes)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, state_shapes)
  return optax.tree_map_params(optimizer, lambda _, s: s, shardings, param_shardings,
                               transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a [B, ...] batch array: rows over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def host_local_to_global(tree, mesh: Mesh):
  """Assemble each process's rows [B_local, ...] into global arrays [B_local * processes, ...]
  sharded over the batch axes (the multi-host input path; a plain `device_put` on one host)."""
  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(place, tree)


def shard_batch(tree, mesh: Mesh):
  """Place a global host batch (identical on every process) onto the mesh, rows over the batch axes."""
  if jax.process_count() > 1:
    # Each process contributes its own contiguous slice of the global rows.
    def local_slice(x):
      x = np.asarray(x)
      n = x.shape[0] // jax.process_count()
      return x[jax.process_index() * n:(jax.process_index() + 1) * n]
    return host_local_to_global(jax.tree.map(local_slice, tree), mesh)
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)
