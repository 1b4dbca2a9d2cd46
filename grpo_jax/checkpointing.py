"""Checkpoints: a thin wrapper over Orbax's CheckpointManager.

    ckpt = Checkpointer(f"{workdir}/checkpoints", keep=3)   # local or gs://
    ckpt.save(step, state, extra={"data": it.state, "metrics_lines": writer.num_lines})
    ...
    if ckpt.latest_step() is not None:
      state, extra = ckpt.restore(target=abstract_state)  # into abstract_state's shardings
    ckpt.close()

Each step directory holds two items: `state` (any pytree of arrays and Python scalars: params,
optimizer state, reference params, step, PRNG keys) and `extra` (a JSON dict: data-iterator
position, RNG seeds as ints, config). Typed PRNG keys (`jax.random.key`) are stored as their raw
uint32 `jax.random.key_data` and rebuilt on restore with the implementation the target names.
An optional third item, `host`, holds a nested dict of NumPy arrays that lives on the host and
changes shape between checkpoints (a reward model's replay history): saved by the same Orbax save
as the rest, so it is as atomic as the state and pruned with its step; read it with
`restore_host(step)`.

Resuming a run: `restore_latest(target_fn)` restores the newest checkpoint that can be read. A
step whose files are corrupted or truncated (a half-copied directory, a disk error) is logged and
skipped for the next older one, and once that one has been read, moved aside to
`<directory>.corrupt/<step>` (never deleted), so one bad copy costs `checkpoint.every` steps
instead of the run. Every process takes the same decision (one may fail on its own shards).

Saves are asynchronous by default (device arrays are copied to host before `save` returns; the
write continues in the background; `wait()` blocks until it is on disk) and atomic: Orbax writes
`<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` when complete, so a save killed at any
moment leaves the previous checkpoint intact and the half-written directory is never listed (it
is removed the next time a Checkpointer opens the directory). Multi-host: every process calls
`save` and `restore`; each writes and reads only its own shards and Orbax coordinates. State
arrays must then be global arrays (on a mesh), not per-process single-device ones: create the
RNG key with `jax.jit(..., out_shardings=NamedSharding(mesh, P()))`, not plain `jax.random.key`.

How pytrees map onto what Orbax stores (key paths, PRNG key data, restore targets, the host
item's flat encoding) lives in `grpo_jax.checkpoint_trees`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from grpo_jax import paths
from grpo_jax.checkpoint_trees import (
    abstract_target, decode_host, encode_host, first_mismatch, rebuild_prng_keys, split_prng_keys)

STATE, EXTRA, HOST = "state", "extra", "host"
_PRNG_IMPLS = "__prng_impls__"  # key in the saved extra JSON: {key path: PRNG implementation}
_HOST_SPEC = "__host__"  # key in the saved extra JSON: the host tree's layout (encode_host)
_RESERVED = (_PRNG_IMPLS, _HOST_SPEC)
# What reading a damaged step directory raises: Orbax/TensorStore report corrupted or truncated
# files (bad JSON, failed decompression, short reads) as ValueError, missing ones as OSError.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError)


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be read."""


class TargetMismatchError(ValueError):
  """A restore target's structure or shapes differ from the saved state's. A caller bug, not
  damaged files: never a reason to fall back to an older checkpoint."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore_latest` read: the step, its state, extra and host items, and the
  newer steps it skipped (newest first) because their files could not be read."""
  step: int
  state: Any
  extra: dict
  host: dict
  skipped: tuple[int, ...] = ()


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


class _Unreadable(Exception):
  """Internal: wraps an error that came from reading a step's files (see `_reading`)."""


@contextlib.contextmanager
def _reading() -> Iterator[None]:
  """Marks errors raised inside as damaged-files errors, so that `restore_latest` tells them
  from errors of the caller's own making (target_fn, shardings), which must propagate."""
  try:
    yield
  except TargetMismatchError:
    raise
  except _UNREADABLE as e:
    raise _Unreadable(e) from e


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` on every process: all processes must fall back to the same step (one may
  fail reading its own shards while the others succeed)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _user_extra(raw: Mapping[str, Any]) -> dict:
  """The extra dict as the caller saved it: without this module's internal keys."""
  return {k: v for k, v in raw.items() if k not in _RESERVED}


class Checkpointer:
  """Save / restore (state pytree, extra JSON dict, optional host arrays) by step, keeping the
  last `keep` steps.

  `read_only=True` opens an existing directory without creating it (FileNotFoundError naming
  the path when it does not exist) and never saves or moves anything.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    path = paths.as_path(directory)  # local, file:// or gs://
    self.directory = os.path.abspath(str(path)) if paths.is_local(path) else str(path)
    if read_only and not paths.as_path(self.directory).is_dir():
      raise FileNotFoundError(f"checkpoint directory does not exist: {self.directory}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self._read_only = read_only
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only)
    # Handlers named up front so that a fresh process can read metadata and restore, whether or
    # not a step has the (optional) host item.
    handlers = {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler(),
                HOST: ocp.StandardCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                          options=options)

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *,
           host: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Save `state` (pytree), `extra` (JSON-serialisable dict) and `host` (nested dict of NumPy
    arrays, identical on every process; any shapes, empty dicts allowed) as `step`, all in one
    atomic save. Returns whether a save started (False when the step exists already, unless
    `force`). Call on every process. The host arrays are copied before an async save returns."""
    extra = dict(extra or {})
    for key in _RESERVED:
      if key in extra:
        raise ValueError(f"extra key {key!r} is reserved")
    try:
      json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"checkpoint extra must be JSON-serialisable (ints, not arrays): {e}") from None
    internal = {}
    items = {}
    if host is not None:
      arrays, internal[_HOST_SPEC] = encode_host(host)
      if arrays:  # Orbax refuses an empty item: a host tree of empty parts lives in the layout.
        items[HOST] = ocp.args.StandardSave(arrays)
    if step in self._manager.all_steps():
      if not force:
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    data, internal[_PRNG_IMPLS] = split_prng_keys(state)
    items[STATE] = ocp.args.StandardSave(data)
    items[EXTRA] = ocp.args.JsonSave(extra | internal)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def step_directory(self, step: int) -> str:
    """Where `step`'s checkpoint lives (or would)."""
    return str(paths.as_path(self.directory) / str(step))

  def _resolve(self, step: int | None) -> int:
    """`step`, or the latest one when None; FileNotFoundError naming the directory if absent."""
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps there: {self.all_steps()})")
    return step

  def read_extra(self, step: int) -> dict:
    """The JSON `extra` saved with `step` (the caller's keys): what a restore target depends
    on, read without the state."""
    return _user_extra(self._read_extra(self._resolve(step)))

  def _read_extra(self, step: int) -> dict:
    """The extra item as saved, internal keys included."""
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        EXTRA: ocp.args.JsonRestore()}))
    return dict(restored[EXTRA])

  def _read_state(self, step: int, target: Any | None, abstract: Any | None,
                  impls: Mapping[str, str]) -> Any:
    if abstract is not None:
      saved = self._manager.item_metadata(step)[STATE]
      saved_tree = getattr(saved, "tree", saved)
      mismatch = first_mismatch(saved_tree, abstract)
      if mismatch:
        raise TargetMismatchError(f"checkpoint {self.step_directory(step)} does not match the "
                                  f"restore target: {mismatch}")
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract)}))
    return rebuild_prng_keys(restored[STATE], target, impls)

  def _read_host(self, step: int, spec: list[dict] | None) -> dict:
    if not spec:  # saved without host (or an older checkpoint), or host={}
      return {}
    arrays = {}
    if any("dtype" in e and np.prod(e["shape"], dtype=np.int64) for e in spec):
      arrays = self._manager.restore(step, args=ocp.args.Composite(**{
          HOST: ocp.args.StandardRestore()}))[HOST]
    return decode_host(spec, arrays, f"{self.step_directory(step)}/{HOST}")

  def restore(self, step: int | None = None, target: Any | None = None, *,
              mesh: Mesh | None = None) -> tuple[Any, dict]:
    """(state, extra) of `step` (default: the latest).

    `target` is a pytree like the saved state whose leaves are `jax.ShapeDtypeStruct(shape,
    dtype, sharding=...)` (or concrete arrays, whose shardings are used): arrays are read
    straight into those shardings, each process reading only its shards. Typed PRNG key leaves
    come back as typed keys. Targets from `jax.eval_shape` carry shardings over an AbstractMesh:
    pass the concrete `mesh` to place them. Without a target the state comes back as saved
    (nested dicts and lists, arrays on the saved sharding where possible).
    TargetMismatchError (a ValueError) naming the first differing key when the target's
    structure or shapes differ from the checkpoint's.
    """
    step = self._resolve(step)
    abstract = None if target is None else abstract_target(target, mesh)
    raw = self._read_extra(step)
    state = self._read_state(step, target, abstract, raw.get(_PRNG_IMPLS, {}))
    return state, _user_extra(raw)

  def restore_host(self, step: int | None = None) -> dict:
    """The host tree saved with `step` (default: the latest) as NumPy arrays with their saved
    dtypes and shapes; {} when that checkpoint was saved without one."""
    step = self._resolve(step)
    return self._read_host(step, self._read_extra(step).get(_HOST_SPEC))

  def restore_latest(self, target_fn: Callable[[dict], Any] | None = None, *,
                     mesh: Mesh | None = None) -> Restored | None:
    """The newest checkpoint that can be read, falling back past damaged ones; None when there
    is no checkpoint. Call on every process.

    For each step, newest first: its extra is read, `target_fn(extra)` gives the restore target
    (see `restore`; None restores as saved), then the state and host items are read. A step whose
    files cannot be read (corrupted or truncated, missing) is logged and skipped; once an older
    step has been read, the skipped step directories are moved to `<directory>.corrupt/<step>`
    (kept for inspection; not when read-only), so a new save of their step numbers works.
    When no step can be read nothing is moved (a failure on every step more likely means an
    environment problem than that many damaged copies) and CheckpointError names each step.
    TargetMismatchError, and errors from `target_fn` or the target's shardings, propagate at
    once: they are bugs in the caller, not damage.
    """
    self._manager.wait_until_finished()
    self._manager.reload()  # the directory may have changed since this Checkpointer opened it
    steps = self.all_steps()
    if not steps:
      return None
    failed: dict[int, str] = {}
    for step in reversed(steps):
      error = None
      try:
        state, extra, host = self._read_step(step, target_fn, mesh)
      except _Unreadable as e:
        error = _first_line(e.__cause__)
      if _all_processes_ok(error is None):
        self._move_aside(list(failed))
        return Restored(step=step, state=state, extra=extra, host=host, skipped=tuple(failed))
      failed[step] = error or "unreadable on another process"
      logging.warning("checkpoint step %d at %s cannot be read, trying an older one: %s",
                      step, self.step_directory(step), failed[step])
    details = "; ".join(f"step {s} ({self.step_directory(s)}): {e}" for s, e in failed.items())
    raise CheckpointError(f"no readable checkpoint in {self.directory}: {details}")

  def _read_step(self, step: int, target_fn: Callable[[dict], Any] | None,
                 mesh: Mesh | None) -> tuple[Any, dict, dict]:
    """(state, extra, host) of `step`; file errors come out as _Unreadable, others as such."""
    with _reading():
      raw = self._read_extra(step)
    extra = _user_extra(raw)
    target = None if target_fn is None else target_fn(dict(extra))
    abstract = None if target is None else abstract_target(target, mesh)
    with _reading():
      state = self._read_state(step, target, abstract, raw.get(_PRNG_IMPLS, {}))
      host = self._read_host(step, raw.get(_HOST_SPEC))
    return state, extra, host

  def _move_aside(self, steps: list[int]) -> None:
    """Move damaged step directories to `<directory>.corrupt/<step>` (`<step>.<n>` if taken)
    and make the manager forget them. The primary process moves; every process reloads."""
    if not steps:
      return
    if self._read_only:
      logging.warning("read-only checkpoint directory %s: leaving unreadable steps %s in place",
                      self.directory, steps)
      return
    if jax.process_index() == 0:
      quarantine = paths.as_path(self.directory + ".corrupt")
      quarantine.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest, n = quarantine / str(step), 0
        while dest.exists():
          n += 1
          dest = quarantine / f"{step}.{n}"
        paths.as_path(self.step_directory(step)).rename(dest)
        logging.warning("moved unreadable checkpoint step %d from %s to %s", step,
                        self.step_directory(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("grpo_jax checkpoint quarantine")
    self._manager.reload()

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
