"""The sharded update step: same numbers on 1 device, 8-device meshes and 2 processes; exact
micro-batching; real sharding of params and optimizer state.

Tolerances: the meshes only change float32 summation order (a psum over shards instead of one
reduction). Losses and gradients agree to ~1e-7 relative; we assert rtol 2e-5 / atol 1e-6. New
params after one AdamW step agree to atol 1e-5. Adam's first step is lr * g / (|g| + eps), which
scales a gradient's rounding noise by lr / (|g| + eps): the test optimizer uses lr = eps = 1e-3 so
that the factor is at most 1 (with eps = 1e-8 a near-zero gradient entry can flip its update).
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import multihost_worker as mw
from grpo_jax import losses, models, sharding
from grpo_jax import train_step as ts

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
LOSS = mw.LOSS  # dapo, beta 0.04, epsilon_high 0.28


def assert_close_tree(a, b, rtol, atol, what):
  fa, fb = mw.flat(a), mw.flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=f"{what}{k}")


@pytest.fixture(scope="module")
def single_device():
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return mw.run(mesh, LOSS)


def test_sequence_logprobs_match_full_logits():
  params = mw.init_params()
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  lp = ts.sequence_logprobs(params, batch, model_config=mw.MODEL, temperature=0.7, vocab_chunk=2)
  tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], 1)
  mask = jnp.concatenate([batch.prompt_mask, jnp.ones_like(batch.completion_tokens)], 1)
  logits, _ = models.forward(params, mw.MODEL, tokens, jnp.maximum(jnp.cumsum(mask, 1) - 1, 0),
                             mask)
  want = ts.token_logprobs(logits[:, mw.TP - 1:-1], batch.completion_tokens, temperature=0.7)
  np.testing.assert_allclose(lp, want, atol=1e-5)
  lp3 = ts.sequence_logprobs(params, batch, model_config=mw.MODEL, temperature=0.7, vocab_chunk=3)
  np.testing.assert_allclose(lp3, want, atol=1e-5)  # C = 8: chunks of 3, the last one padded
  # The micro-batched reference pass returns rows in their original order.
  lp4 = ts.batched_logprobs(params, batch, model_config=mw.MODEL, temperature=0.7,
                            num_microbatches=4, vocab_chunk=4)
  np.testing.assert_allclose(lp4, want, atol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_meshes_agree_with_one_device(shape, single_device):
  got = mw.run(sharding.make_mesh(*shape), LOSS)
  np.testing.assert_allclose(got["ref"], single_device["ref"], atol=1e-5)
  assert_close_tree(got["metrics"], single_device["metrics"], 2e-5, 1e-6, "metrics")
  assert_close_tree(got["grads"], single_device["grads"], 2e-5, 1e-6, "grads")
  assert_close_tree(got["params"], single_device["params"], 0, 1e-5, "params")


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_update_step_microbatch_invariance(loss_type):
  loss_cfg = losses.LossConfig(beta=0.04, loss_type=loss_type, importance_sampling_level="token")
  optimizer = ts.make_optimizer(mw.OPTIM)
  params = mw.init_params()
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  batch = batch.replace(ref_logprobs=batch.old_logprobs + 0.1)
  results = []
  for m in (1, 4):
    step = jax.jit(lambda s, b, m=m: ts.update_step(s, b, model_config=mw.MODEL,
                                                     optimizer=optimizer, loss_cfg=loss_cfg,
                                                     num_microbatches=m))
    results.append(step(ts.init_train_state(params, optimizer), batch))
  (s1, m1) = results[0]
  for s, m in results[1:]:
    assert_close_tree(m, m1, 2e-5, 1e-6, "metrics")
    assert_close_tree(s.params, s1.params, 0, 1e-5, "params")
    assert int(s.step) == 1


@pytest.mark.parametrize("policy_loss", ["cispo", "sapo"])
def test_cispo_and_sapo_update_steps_are_microbatch_invariant(policy_loss):
  """The objectives peers ship, through the trainer's update: exact over micro-batches, and
  the loss equal to `losses.grpo_loss` on the step's own log-probs."""
  loss_cfg = losses.LossConfig(beta=0.04, policy_loss=policy_loss, sapo_tau_pos=0.9)
  optimizer = ts.make_optimizer(mw.OPTIM)
  params = mw.init_params()
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  batch = batch.replace(ref_logprobs=batch.old_logprobs + 0.1)
  results = [jax.jit(lambda s, b, m=m: ts.update_step(
      s, b, model_config=mw.MODEL, optimizer=optimizer, loss_cfg=loss_cfg,
      num_microbatches=m))(ts.init_train_state(params, optimizer), batch) for m in (1, 2)]
  assert_close_tree(results[1][1], results[0][1], 2e-5, 1e-6, "metrics")
  assert_close_tree(results[1][0].params, results[0][0].params, 0, 1e-5, "params")
  logprobs = ts.sequence_logprobs(params, batch, model_config=mw.MODEL)
  want, _ = losses.grpo_loss(logprobs, batch.old_logprobs, batch.advantages,
                             batch.completion_mask, ref_logprobs=batch.ref_logprobs, beta=0.04,
                             policy_loss=policy_loss, sapo_tau=(0.9, 1.05))
  np.testing.assert_allclose(results[0][1]["loss"], want, rtol=2e-5, atol=1e-6)


def test_update_logs_the_policy_entropy_and_applies_the_bonus():
  """metrics["entropy"]: the token mean over completion tokens of the policy's entropy, as a
  NumPy computation from the full logits gives it; entropy_coef c lowers the loss by c times
  it (dapo weights: the loss and the metric share the token mean) and changes the gradient."""
  params = mw.init_params()
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  tokens = np.concatenate([batch.prompt_tokens, batch.completion_tokens], 1)
  attn = np.concatenate([batch.prompt_mask, np.ones_like(batch.completion_mask)], 1)
  positions = np.maximum(np.cumsum(attn, 1) - 1, 0)
  logits, _ = models.forward(params, mw.MODEL, tokens, positions, attn)
  P = batch.prompt_tokens.shape[1]
  z = np.asarray(logits, np.float64)[:, P - 1:-1]
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  m = np.asarray(batch.completion_mask, np.float64)
  want = (ent * m).sum() / m.sum()
  out = {}
  for coef in (0.0, 0.5):
    cfg = losses.LossConfig(loss_type="dapo", entropy_coef=coef)
    out[coef] = ts.loss_and_grads(params, batch, model_config=mw.MODEL, loss_cfg=cfg,
                                  num_microbatches=2)
  np.testing.assert_allclose(out[0.0][1]["entropy"], want, rtol=1e-5)
  np.testing.assert_allclose(out[0.5][0], out[0.0][0] - 0.5 * want, rtol=1e-5, atol=1e-6)
  diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[0.5][2]),
                                                         jax.tree.leaves(out[0.0][2])))
  assert diff > 1e-6  # the bonus has a gradient


def test_params_and_optimizer_state_are_sharded_by_the_rules():
  mesh = sharding.make_mesh(2, 2, 2)
  optimizer = ts.make_optimizer(mw.OPTIM)
  state, _ = ts.init_sharded_state(mesh, mw.MODEL, optimizer, jax.random.key(0))
  axes = models.param_logical_axes(mw.MODEL)
  adam = state.opt_state[1][0]
  flat_axes = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
  checked = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    key = jax.tree_util.keystr(path)
    want = sharding.logical_to_spec(flat_axes[key], x.shape, mesh)
    assert x.sharding.spec == want, key
    # Shards really are smaller when a dimension is split.
    shard = x.addressable_shards[0].data.shape
    for dim, axis in enumerate(want):
      if axis is not None:
        assert shard[dim] == x.shape[dim] // 2, (key, shard)
        checked += 1
  assert checked > 0
  mu = mw.flat(adam.mu)
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    assert mu[jax.tree_util.keystr(path)].sharding.spec == x.sharding.spec
  # The embedding is split over vocab (tensor) and embed (fsdp) under the default rules.
  assert state.params["embedding"].sharding.spec == P("tensor", "fsdp")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one_device(tmp_path, single_device):
  """2 local processes x 4 CPU devices, jax.distributed, one global (2, 2, 2) mesh, 2
  micro-batches: the same numbers as the whole batch on one device."""
  port, out = _free_port(), tmp_path / "mh.npz"
  env = mw.subprocess_env(4)
  worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, f"--process_id={i}", "--num_processes=2",
                             f"--port={port}", f"--out={out}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = dict(np.load(out))
  want = mw.flat({g: single_device[g] for g in ("ref", "metrics", "grads", "params")})
  assert got.keys() == want.keys()
  for k in want:
    tol = dict(rtol=0, atol=1e-5) if "params" in k else dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got[k], want[k], err_msg=k, **tol)


def test_nonfinite_loss_skips_the_update():
  optimizer = ts.make_optimizer(mw.OPTIM)
  params = mw.init_params()
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  row = int(np.argmax(np.asarray(batch.completion_mask).sum(1) > 0))  # a row with tokens: an
  batch = batch.replace(advantages=batch.advantages.at[row].set(jnp.nan))  # empty one adds 0
  state = ts.init_train_state(params, optimizer)
  new, metrics = jax.jit(lambda s, b: ts.update_step(
      s, b, model_config=mw.MODEL, optimizer=optimizer, loss_cfg=losses.LossConfig()))(state, batch)
  assert float(metrics["skipped"]) == 1.0 and int(new.step) == 0
  assert_close_tree(new.params, params, 0, 0, "params")
