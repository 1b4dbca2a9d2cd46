"""Rollouts sampled ahead of the update (grpo.max_staleness = k): which policy samples which
rollout, the staleness and mismatch figures, the checkpointed queue, exact resume, bad configs."""

import jax
import numpy as np
import pytest

from experiments.configs import arithmetic
from grpo_jax import checkpointing, metrics, rollout, settings, staleness, trainer, updates
from grpo_jax.train_step import TrainBatch
from test_trainer import SMOKE, assert_kill_and_resume_is_exact, launch


def _config(k, steps=4):
  cfg = arithmetic.get_config("smoke")
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.eval.every = 8, steps, 0
  cfg.grpo.max_staleness = k
  cfg.eval.k = 1  # no pass@k sampler to compile: these tests read the training figures
  return cfg


@pytest.mark.parametrize("k, rollout_devices", [(1, 0), (1, 4), (0, 4)])  # k = 2: preemption
def test_rollout_j_is_sampled_by_version_j_minus_k(k, rollout_devices, tmp_path, monkeypatch):
  """Rollout j (trained at step j) comes from the policy after max(0, j - k) updates, and the
  update at step t trains rollout t: the figures say its staleness, and the sampler / trainer
  mismatch is ~0 for a fresh rollout (float32 sampler) and clearly not for a stale one. With
  mesh.rollout_devices = 4 of the 8, the samplers read weights on the first 4 devices only
  (sent there after every update) and the update runs on the other 4."""
  sampled_with, versions, trained, placed = [], [], [], set()
  real_collect, real_dispatch = rollout.collect, updates.dispatch_update
  first_leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0]).copy()  # noqa: E731

  def collect(data, sampler, r, params, *args, **kw):
    sampled_with.append(first_leaf(params))
    placed.add(("sampler", frozenset(jax.tree.leaves(params)[0].sharding.device_set)))
    return real_collect(data, sampler, r, params, *args, **kw)

  def dispatch(device, g, state, ready, frozen=None):
    versions.append(first_leaf(state.params))
    placed.add(("update", frozenset(jax.tree.leaves(state.params)[0].sharding.device_set)))
    trained.append(np.asarray(jax.device_get(ready.batch.completion_tokens)).copy())
    return real_dispatch(device, g, state, ready, frozen)

  monkeypatch.setattr(rollout, "collect", collect)
  monkeypatch.setattr(updates, "dispatch_update", dispatch)
  steps = 4
  cfg = _config(k, steps)
  cfg.mesh.rollout_devices = rollout_devices
  trainer.train(cfg, str(tmp_path))
  assert len(sampled_with) == len(versions) == steps  # no rollout sampled past the last step
  for j in range(steps):
    np.testing.assert_array_equal(sampled_with[j], versions[max(0, j - k)], err_msg=f"j={j}")
  assert not np.array_equal(versions[0], versions[-1])  # the policy moved: versions differ
  devices = jax.devices()
  if rollout_devices:
    assert placed == {("sampler", frozenset(devices[:4])), ("update", frozenset(devices[4:]))}
  else:
    assert {where for _, where in placed} == {frozenset(devices)}
  rows = [r for r in metrics.read_metrics(tmp_path) if r.get("phase") == "grpo" and "loss" in r]
  assert [r.get("staleness", 0) for r in rows] == [min(t, k) for t in range(steps)]
  assert all(r.get("dropped_stale", 0) == 0 for r in rows)
  fresh = [r["mismatch/kl"] for r in rows if r.get("staleness", 0) == 0]
  stale = [r["mismatch/kl"] for r in rows if r.get("staleness", 0) > 0]
  assert max(fresh) < 1e-6 and all(kl > 1e-6 for kl in stale), (fresh, stale)


def _pending(index, rng):
  B, P, C = 4, 3, 5
  batch = TrainBatch(rng.integers(0, 9, (B, P)).astype(np.int32), np.ones((B, P), np.int32),
                     rng.integers(0, 9, (B, C)).astype(np.int32), np.ones((B, C), np.int32),
                     rng.normal(size=B).astype(np.float32),
                     sampler_logprobs=-rng.uniform(size=(B, C)).astype(np.float32))
  return staleness.Pending(batch, index - 1, index, {"reward": 0.1 * index, "sample_s": 1.5},
                           [{"question": "1 + 1", "completion": "é #### 2", "reward": 1.0}],
                           {"lengths": rng.integers(0, 9, B).astype(np.float32)})


def test_the_queue_survives_a_checkpoint_exactly(tmp_path):
  rng = np.random.default_rng(0)
  queue = tuple(_pending(i, rng) for i in (3, 4))
  with checkpointing.Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
    ckpt.save(1, {"x": np.zeros(2)}, {}, host={"rollouts": staleness.to_host(queue)})
    back = staleness.from_host(ckpt.restore_host(1)["rollouts"])
    empty = staleness.from_host({})
  assert empty == ()
  assert len(back) == 2
  for a, b in zip(queue, back):
    assert (a.version, a.index, a.figures, a.samples) == (b.version, b.index, b.figures, b.samples)
    for x, y in zip(jax.tree.leaves(a.batch), jax.tree.leaves(b.batch)):
      np.testing.assert_array_equal(x, y)
      assert x.dtype == y.dtype
    np.testing.assert_array_equal(a.arrays["lengths"], b.arrays["lengths"])


def test_stale_rollouts_are_dropped_and_counted():
  rng = np.random.default_rng(1)
  queue = tuple(_pending(i, rng) for i in (5, 6, 7))  # versions 4, 5, 6
  kept, dropped = staleness.drop_stale(queue, step=7, k=2)
  assert [p.version for p in kept] == [5, 6] and dropped == 1
  assert staleness.next_index(kept, 7) == 8 and staleness.next_index((), 7) == 7
  assert staleness.figures(7, kept[0], dropped)["staleness"] == 2.0


def test_resume_after_sigkill_is_exact_with_rollouts_ahead(tmp_path):
  """Killed mid-GRPO with a rollout waiting (k = 1): the resumed run trains that same rollout
  (from the checkpoint) and ends with the uninterrupted run's metrics, bit for bit. (k = 2:
  test_preemption's SIGTERM case.)"""
  k = 1
  flags = SMOKE + [f"--config.grpo.max_staleness={k}"]
  code, out = launch(tmp_path / "whole", *flags)
  assert code == 0, out[-4000:]
  rows = metrics.read_metrics(tmp_path / "whole")
  assert [r["staleness"] for r in rows if "staleness" in r] == [min(t, k) for t in range(4)]
  assert_kill_and_resume_is_exact(tmp_path / "whole", tmp_path / "killed", flags, 11)


@pytest.mark.parametrize("mesh, says", [
    (dict(rollout_devices=8), "rollout_devices = 8: 0 .* or fewer than the 8 devices"),
    (dict(rollout_devices=3, data=2), "the 5 devices left after mesh.rollout_devices = 3"),
    (dict(rollout_devices=6), "grpo.num_prompts = 8 is not divisible by config.mesh."
                              "rollout_devices = 6"),
])
def test_bad_rollout_sub_meshes_are_errors_before_any_compile(mesh, says):
  cfg = _config(0)
  for name, value in mesh.items():
    setattr(cfg.mesh, name, value)
  with pytest.raises(settings.ConfigError, match=says):
    settings.from_config(cfg, 8)


@pytest.mark.parametrize("change, says", [
    (dict(max_staleness=-1), "max_staleness = -1 must be >= 0"),
    (dict(algorithm="rft"), "algorithm other than 'grpo'"),
    (dict(ref_reset_every=2), "ref_reset_every = 2"),
    ("reward_model", "reward_model.enabled"),
])
def test_bad_staleness_combinations_name_their_fields(change, says):
  cfg = _config(1)
  if change == "reward_model":
    cfg.reward_model.enabled = True
  else:
    for name, value in change.items():
      setattr(cfg.grpo, name, value)
  with pytest.raises(settings.ConfigError, match=f"config.grpo.max_staleness.*{says}|{says}"):
    settings.from_config(cfg, 8)


def test_two_processes_give_the_samplers_two_devices_each(tmp_path):
  """2 local processes x 4 CPU devices (jax.distributed), mesh.rollout_devices = 4: each
  process lends 2 devices to the samplers and copies the weights to them itself (JAX moves
  arrays across device sets within a process only); the run's figures are the single-process
  run's on 8 devices split 4 + 4."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import multihost_worker as mw  # pylint: disable=import-outside-toplevel
  from test_trainer import ROOT  # pylint: disable=import-outside-toplevel
  cfg = _config(1, steps=3)
  cfg.mesh.rollout_devices = 4
  trainer.train(cfg, str(tmp_path / "one"))
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  flags = ["--config=experiments/configs/arithmetic.py:smoke", f"--workdir={tmp_path / 'two'}",
           "--config.grpo.num_prompts=8", "--config.grpo.steps=3", "--config.eval.every=0",
           "--config.eval.k=1",
           "--config.grpo.max_staleness=1", "--config.mesh.rollout_devices=4",
           f"--config.tokenizer.path={tmp_path / 'one' / 'tokenizer.model'}",
           "--config.distributed.enabled=True",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *flags,
                             f"--config.distributed.process_id={i}"], cwd=ROOT,
                            env=mw.subprocess_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  one = [r for r in metrics.read_metrics(tmp_path / "one") if "loss" in r and
         r.get("phase") == "grpo"]
  two = [r for r in metrics.read_metrics(tmp_path / "two") if "loss" in r and
         r.get("phase") == "grpo"]
  assert [r["staleness"] for r in two] == [r["staleness"] for r in one] == [0, 1, 1]
  for a, b in zip(one, two):
    assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]
    for name in ("loss", "mismatch/kl", "grad_norm"):
      np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-7, err_msg=name)
