"""Checkpointing: bit-exact round trips, keep-N, sharded restore, killed saves, clear errors,
host arrays, falling back past damaged checkpoints."""

import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import multihost_worker as mw
from grpo_jax.checkpoint_trees import is_prng_key
from grpo_jax.checkpointing import Checkpointer, CheckpointError, TargetMismatchError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class State:
  params: dict
  opt_state: optax.OptState
  ref_params: dict
  rng: jax.Array
  step: int


def make_state(seed: int = 0) -> State:
  k_w, k_b, k_rng = jax.random.split(jax.random.key(seed), 3)
  params = {"w_DxF": jax.random.normal(k_w, (8, 4)), "b_F": jax.random.normal(k_b, (4,)),
            "emb_VxD": jnp.arange(64, dtype=jnp.bfloat16).reshape(8, 8)}
  opt = optax.adamw(1e-2)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)  # non-trivial mu / nu / count
  return State(params=params, opt_state=opt_state, ref_params=jax.tree.map(jnp.copy, params),
               rng=k_rng, step=seed + 7)


def assert_bit_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if isinstance(x, int) or isinstance(y, int):
      assert type(x) is type(y) and x == y
      continue
    if is_prng_key(x):
      assert is_prng_key(y) and jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def test_round_trip_is_bit_exact(tmp_path):
  state = make_state()
  extra = {"data": {"epoch": 1, "index": 48, "seed": 3}, "rng_seed": 12345, "config": {"lr": 0.01}}
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, extra)
    assert not ckpt.save(7, state, extra)  # exists: no-op unless forced
    ckpt.wait()
    assert ckpt.latest_step() == 7
    restored, restored_extra = ckpt.restore(target=jax.eval_shape(lambda: state).replace(step=0))
  assert isinstance(restored, State)
  assert_bit_equal(restored, state)
  assert restored_extra == extra
  # The restored key is a usable typed key, not raw data.
  np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)),
                                jax.random.uniform(state.rng, (3,)))


def test_restore_without_target_rebuilds_keys(tmp_path):
  state = {"rng": jax.random.key(3, impl="rbg"), "legacy": jax.random.PRNGKey(4), "x": jnp.ones(3)}
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state)
  restored, extra = ckpt.restore()
  assert extra == {}
  assert str(jax.random.key_impl(restored["rng"])) == "rbg"
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(state["rng"]))
  assert restored["legacy"].dtype == jnp.uint32  # raw uint32 keys stay raw
  # ...unless the target asks for a typed key: the target's implementation wraps the raw data.
  target = {"rng": jax.eval_shape(lambda: state["rng"]), "x": jnp.zeros(3),
            "legacy": jax.eval_shape(lambda: jax.random.key(0))}
  typed, _ = ckpt.restore(target=target)
  assert is_prng_key(typed["legacy"]) and is_prng_key(typed["rng"])
  np.testing.assert_array_equal(jax.random.normal(typed["legacy"], (2,)),
                                jax.random.normal(jax.random.PRNGKey(4), (2,)))
  ckpt.close()


def test_force_overwrites_and_keep_n(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for step in range(1, 5):
    ckpt.save(step, {"x": jnp.full((2,), step)}, {"step": step})
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]
  ckpt.save(4, {"x": jnp.full((2,), 40)}, {"step": 40}, force=True)
  state, extra = ckpt.restore(4, target={"x": jax.ShapeDtypeStruct((2,), jnp.int32)})
  assert extra == {"step": 40} and state["x"].tolist() == [40, 40]
  older, _ = ckpt.restore(3)
  assert older["x"].tolist() == [3, 3]
  ckpt.close()


def test_restore_into_sharded_target(tmp_path):
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  state = make_state(1)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state)  # saved from a single device

  def with_sharding(x):
    if isinstance(x, int):
      return x
    if is_prng_key(x) or not x.shape:
      spec = P()
    else:
      spec = P("fsdp", None) if len(x.shape) == 2 else P("data")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  target = jax.tree.map(with_sharding, jax.eval_shape(lambda: state).replace(step=0))
  with Checkpointer(str(tmp_path)) as ckpt:
    restored, _ = ckpt.restore(target=target)
  assert_bit_equal(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    if isinstance(want, int):
      continue
    assert got.sharding == want.sharding, (got.sharding, want.sharding)
  w = restored.params["w_DxF"]
  assert w.sharding.spec == P("fsdp", None)
  assert {s.data.shape for s in w.addressable_shards} == {(2, 4)}
  assert restored.rng.sharding == NamedSharding(mesh, P())

  # Shapes and shardings from jax.eval_shape (big_vision style) name an AbstractMesh: mesh= binds
  # them to devices. Here the mesh is laid out differently from the one the state was saved from.
  other = jax.make_mesh((4, 2), ("data", "fsdp"))
  placed = jax.tree.map(lambda x, t: x if isinstance(x, int) else jax.device_put(
      x, NamedSharding(other, t.sharding.spec)), state, target)
  from_eval_shape = jax.eval_shape(lambda: placed).replace(step=0)
  assert isinstance(from_eval_shape.params["w_DxF"].sharding.mesh, jax.sharding.AbstractMesh)
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ValueError, match="'params.b_F' is sharded over an AbstractMesh"):
      ckpt.restore(target=from_eval_shape)
    restored, _ = ckpt.restore(target=from_eval_shape, mesh=other)
  assert_bit_equal(restored, state)
  assert restored.params["w_DxF"].sharding == NamedSharding(other, P("fsdp", None))
  assert restored.rng.sharding == NamedSharding(other, P())


def test_half_written_checkpoint_is_ignored(tmp_path):
  state = make_state()
  target = jax.eval_shape(lambda: state).replace(step=0)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, {"at": 1})
  # What a save killed before its final rename leaves behind: a tmp dir with partial contents.
  partial = tmp_path / "2.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "1", partial)
  shutil.rmtree(partial / "state")
  (partial / "commit_success.txt").unlink(missing_ok=True)
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  restored, extra = ckpt.restore(target=target)
  assert extra == {"at": 1}
  assert_bit_equal(restored, state)
  ckpt.close()
  # A writable Checkpointer removes the leftover, and the next save of step 2 works.
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, state, {"at": 2})
  assert not partial.exists() and sorted(os.listdir(tmp_path)) == ["1", "2"]
  assert Checkpointer(str(tmp_path), read_only=True).latest_step() == 2


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from grpo_jax.checkpointing import Checkpointer, CheckpointError, TargetMismatchError
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"x": jnp.ones((4,)), "big": jnp.zeros((1024, 1024))}, {"at": 1})
    ckpt.wait()
    ckpt.save(2, {"x": jnp.full((4,), 2.0), "big": jnp.ones((1024, 1024))}, {"at": 2})
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the async write of step 2 is in flight
""")


def test_sigkill_during_async_save_keeps_previous(tmp_path):
  env = dict(mw.subprocess_env(1), PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == -9, result.stderr[-2000:]
  assert (tmp_path / "1").is_dir()
  killed_mid_save = (tmp_path / "2.orbax-checkpoint-tmp").exists()  # the usual outcome
  target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32),
            "big": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
  with Checkpointer(str(tmp_path)) as ckpt:
    step = ckpt.latest_step()
    state, extra = ckpt.restore(target=target)
  # The kill beat step 2's write (no temporary directory yet) or its final rename (step 2
  # ignored), or step 2 was complete: never a mix.
  assert extra == {"at": step} and step in (1, 2)
  assert not (killed_mid_save and step == 2)
  np.testing.assert_array_equal(state["x"], np.full((4,), float(step)))
  assert float(state["big"].sum()) == (0.0 if step == 1 else 1024.0 * 1024)
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]  # leftovers removed on open


_MULTIHOST = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from grpo_jax.checkpointing import Checkpointer, CheckpointError, TargetMismatchError
    process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    mesh = jax.make_mesh((4,), ("fsdp",))  # 2 processes x 2 devices
    value = np.arange(24, dtype=np.float32).reshape(8, 3)
    x = jax.make_array_from_callback((8, 3), NamedSharding(mesh, P("fsdp")), lambda i: value[i])
    key = jax.jit(lambda: jax.random.key(5), out_shardings=NamedSharding(mesh, P()))()
    host = {"h": np.arange(5, dtype=np.int16), "e": {}}
    with Checkpointer(directory) as ckpt:
      ckpt.save(1, {"x": x, "rng": key, "step": 1}, {"pos": 3}, host=host)
    with Checkpointer(directory) as ckpt:
      target = dict(jax.eval_shape(lambda: {"x": x, "rng": key}), step=0)
      state, extra = ckpt.restore(target=target, mesh=mesh)
      latest = ckpt.restore_latest(lambda e: target, mesh=mesh)
    assert latest.step == 1 and latest.skipped == () and latest.extra == {"pos": 3}
    assert latest.host["e"] == {} and latest.host["h"].dtype == np.int16
    np.testing.assert_array_equal(latest.host["h"], host["h"])
    assert extra == {"pos": 3} and state["step"] == 1, (extra, state["step"])
    assert state["x"].sharding.is_equivalent_to(x.sharding, 2)
    assert len(state["x"].addressable_shards) == 2
    for shard in state["x"].addressable_shards:
      np.testing.assert_array_equal(shard.data, value[shard.index])
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]), [0, 5])
    print("ok", process_id)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_save_and_restore_shards(tmp_path):
  """2 local processes x 2 CPU devices with jax.distributed: each writes and reads its shards."""
  env = dict(mw.subprocess_env(2), PYTHONPATH=REPO)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _MULTIHOST, str(i), port, str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f"ok {i}" in out, err[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["1"]


def test_missing_checkpoint_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist: .*nowhere"):
    Checkpointer(str(tmp_path / "nowhere"), read_only=True)
  empty = tmp_path / "empty"
  with Checkpointer(str(empty)) as ckpt:
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {empty}"):
      ckpt.restore()
    ckpt.save(3, {"x": jnp.ones(2)})
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 .*steps there: \[3\]"):
      ckpt.restore(5)


def test_mismatched_target_names_first_key(tmp_path):
  state = make_state()
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
    ckpt.wait()
    abstract = jax.eval_shape(lambda: state).replace(step=0)
    wrong_shape = abstract.replace(
        params=dict(abstract.params, w_DxF=jax.ShapeDtypeStruct((8, 5), jnp.float32)))
    with pytest.raises(ValueError, match=r"'params.w_DxF' has shape \(8, 4\) in the checkpoint "
                                         r"but \(8, 5\) in the target"):
      ckpt.restore(target=wrong_shape)
    new_leaf = jax.ShapeDtypeStruct((2,), jnp.float32)
    extra_key = abstract.replace(params=dict(abstract.params, new_H=new_leaf))
    with pytest.raises(ValueError, match=r"does not match.*'params.new_H' is in the target but "
                                         "not in the checkpoint"):
      ckpt.restore(target=extra_key)
    with pytest.raises(ValueError, match=r"'opt_state.0.count' is in the checkpoint but not"):
      ckpt.restore(target=abstract.replace(opt_state=()))


def test_extra_must_be_json(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ValueError, match="JSON-serialisable"):
      ckpt.save(1, {"x": jnp.ones(2)}, {"rng": jnp.ones(2)})


# --- host item

def host_tree(rows: int) -> dict:
  """A replay-history-like host tree whose shapes grow with `rows`, with awkward leaves: NaN
  payloads and -0.0, bool, bfloat16, 0-d, zero-size arrays and an empty sub-dict."""
  weird = np.array([0x7fc00001, 0x80000000, 0x3f800000], np.uint32).view(np.float32)
  return {"replay": {"tokens": np.arange(rows * 3, dtype=np.int32).reshape(rows, 3),
                     "reward": np.linspace(-1, 1, rows, dtype=np.float32),
                     "valid": np.arange(rows) % 2 == 0,
                     "pending": np.zeros((0, 3), np.int32)},
          "weird": weird, "bf16": np.arange(rows, dtype=jnp.bfloat16), "count": np.int64(rows),
          "empty": {}}


def assert_host_equal(got: dict, want: dict):
  assert isinstance(got, dict) and list(got) == list(want)  # same keys, same order
  for key, w in want.items():
    if isinstance(w, dict):
      assert_host_equal(got[key], w)
      continue
    g = got[key]
    assert isinstance(g, np.ndarray), (key, type(g))
    assert g.dtype == w.dtype and g.shape == np.shape(w), (key, g.dtype, g.shape)
    assert g.tobytes() == np.asarray(w).tobytes(), key


def test_host_item_round_trip_and_pruning(tmp_path):
  small, grown = host_tree(2), host_tree(5)
  with Checkpointer(str(tmp_path), keep=2, async_save=False) as ckpt:
    ckpt.save(1, {"x": jnp.ones(2)}, {"at": 1}, host=small)
    ckpt.save(2, {"x": jnp.ones(2)}, {"at": 2}, host=grown)
  with Checkpointer(str(tmp_path), keep=2, async_save=False) as ckpt:  # as a fresh process
    assert_host_equal(ckpt.restore_host(1), small)
    assert_host_equal(ckpt.restore_host(2), grown)
    assert ckpt.restore(2)[1] == {"at": 2}  # the host layout stays out of extra
    assert (tmp_path / "2" / "host").is_dir()
    ckpt.save(3, {"x": jnp.ones(2)}, {"at": 3})  # without host: step 1 and its host data go
    assert ckpt.restore_host(3) == {} and ckpt.restore_host() == {}
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    assert_host_equal(ckpt.restore_host(2), grown)
    with pytest.raises(FileNotFoundError, match=r"step 1 .*steps there: \[2, 3\]"):
      ckpt.restore_host(1)
    # Host trees with nothing for Orbax to store (only empty parts) still round-trip.
    ckpt.save(4, {"x": jnp.ones(2)}, host={"buffer": {}, "rows": np.zeros((0, 4), np.float32)})
    ckpt.save(5, {"x": jnp.ones(2)}, host={})
    assert not (tmp_path / "4" / "host").exists()
    assert_host_equal(ckpt.restore_host(4),
                      {"buffer": {}, "rows": np.zeros((0, 4), np.float32)})
    assert ckpt.restore_host(5) == {}


def test_checkpoint_written_without_host_handler_restores(tmp_path):
  """Checkpoints from before the host item (a manager with only state and extra) still load."""
  old = ocp.CheckpointManager(str(tmp_path), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})
  old.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.arange(3)}),
                                      extra=ocp.args.JsonSave({"at": 4})))
  old.wait_until_finished()
  old.close()
  with Checkpointer(str(tmp_path), read_only=True) as ckpt:
    state, extra = ckpt.restore()
    assert extra == {"at": 4} and state["x"].tolist() == [0, 1, 2]
    assert ckpt.restore_host(4) == {}
    restored = ckpt.restore_latest()
  assert restored.step == 4 and restored.host == {} and restored.extra == {"at": 4}


def test_host_rejects_what_it_cannot_store(tmp_path):
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    with pytest.raises(TypeError, match="'a/b' must be a NumPy array, got list"):
      ckpt.save(1, {"x": jnp.ones(2)}, host={"a": {"b": [1, 2]}})
    with pytest.raises(ValueError, match="'names' has dtype <U3"):
      ckpt.save(1, {"x": jnp.ones(2)}, host={"names": np.array(["abc"])})
    with pytest.raises(ValueError, match="'__host__' is reserved"):
      ckpt.save(1, {"x": jnp.ones(2)}, {"__host__": 1})
    assert ckpt.all_steps() == []


# --- restore_latest

TARGET = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32), "rng": jax.eval_shape(
    lambda: jax.random.key(0)), "step": 0}


def step_state(step: int) -> dict:
  return {"w": jnp.full((4, 4), float(step)), "rng": jax.random.key(step), "step": step}


def save_steps(ckpt: Checkpointer, steps) -> None:
  for step in steps:
    ckpt.save(step, step_state(step), {"at": step}, host=host_tree(step))


def test_restore_latest_without_damage(tmp_path):
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    assert ckpt.restore_latest() is None
    save_steps(ckpt, [1, 2])
    seen = []
    restored = ckpt.restore_latest(lambda extra: seen.append(extra) or TARGET)
  assert seen == [{"at": 2}]  # target_fn sees the newest step's extra, without internal keys
  assert restored.step == 2 and restored.skipped == () and restored.extra == {"at": 2}
  assert_bit_equal(restored.state, step_state(2))
  assert_host_equal(restored.host, host_tree(2))
  assert not os.path.exists(f"{tmp_path}.corrupt")


def _truncate(path, keep=lambda p: True):
  """Truncate every regular file under `path` that `keep` selects to half its length."""
  hit = 0
  for root, _, files in os.walk(path):
    for name in files:
      file = os.path.join(root, name)
      if keep(file):
        os.truncate(file, os.path.getsize(file) // 2)
        hit += 1
  assert hit, f"nothing to damage under {path}"


def damage(step_dir: str, kind: str) -> None:
  if kind == "extra_garbage":  # the extra item's JSON overwritten
    for root, _, files in os.walk(os.path.join(step_dir, "extra")):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00not json{")
  elif kind == "state_data_truncated":  # the state's array data files only (metadata intact)
    _truncate(os.path.join(step_dir, "state"),
              lambda f: os.path.basename(os.path.dirname(f)) == "d")
  elif kind == "state_all_truncated":  # every file of the state item, as a half-finished copy
    _truncate(os.path.join(step_dir, "state"))
  elif kind == "host_missing":
    shutil.rmtree(os.path.join(step_dir, "host"))
  else:
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["extra_garbage", "state_data_truncated", "state_all_truncated",
                                  "host_missing"])
def test_restore_latest_falls_back_past_damage(tmp_path, caplog, kind):
  directory = tmp_path / "ckpt"
  with Checkpointer(str(directory), async_save=False) as ckpt:
    save_steps(ckpt, [1, 2, 3])
    damage(str(directory / "3"), kind)
    with caplog.at_level(logging.WARNING):
      restored = ckpt.restore_latest(lambda extra: TARGET)
    assert restored.step == 2 and restored.skipped == (3,) and restored.extra == {"at": 2}
    assert_bit_equal(restored.state, step_state(2))
    assert_host_equal(restored.host, host_tree(2))
    # Moved aside, not deleted, and forgotten by the manager.
    assert (tmp_path / "ckpt.corrupt" / "3" / "state").is_dir()
    assert sorted(os.listdir(directory)) == ["1", "2"] and ckpt.all_steps() == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"step 3 at {directory / '3'} cannot be read" in w for w in warnings), warnings
    # The run goes on from step 2 and saves step 3 again.
    assert ckpt.save(3, step_state(30), {"at": 30}, host={"h": np.ones(2, np.int8)})
    again = ckpt.restore_latest(lambda extra: TARGET)
  assert again.step == 3 and again.skipped == () and again.extra == {"at": 30}
  assert_bit_equal(again.state, step_state(30))
  assert_host_equal(again.host, {"h": np.ones(2, np.int8)})


def test_restore_latest_when_every_step_is_damaged(tmp_path):
  directory = tmp_path / "ckpt"
  with Checkpointer(str(directory), async_save=False) as ckpt:
    save_steps(ckpt, [1, 2])
    damage(str(directory / "2"), "extra_garbage")
    damage(str(directory / "1"), "state_all_truncated")
    with pytest.raises(CheckpointError, match=rf"no readable checkpoint in {directory}: "
                                              rf"step 2 \({directory / '2'}\): .*; "
                                              rf"step 1 \({directory / '1'}\): "):
      ckpt.restore_latest(lambda extra: TARGET)
  # Nothing moved: a failure everywhere is left for a person to look at.
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert not (tmp_path / "ckpt.corrupt").exists()


def test_restore_latest_target_mismatch_is_not_damage(tmp_path):
  directory = tmp_path / "ckpt"
  with Checkpointer(str(directory), async_save=False) as ckpt:
    save_steps(ckpt, [1, 2])
    wrong = dict(TARGET, w=jax.ShapeDtypeStruct((4, 5), jnp.float32))
    with pytest.raises(TargetMismatchError,
                       match=r"ckpt/2 does not match the restore target: key 'w'"):
      ckpt.restore_latest(lambda extra: wrong)
    with pytest.raises(ValueError, match="does not match"):  # still a ValueError for restore
      ckpt.restore(1, target=wrong)
    # Errors of the caller's own making propagate too, untouched.
    with pytest.raises(KeyError, match="missing"):
      ckpt.restore_latest(lambda extra: extra["missing"])
    assert ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert not (tmp_path / "ckpt.corrupt").exists()
