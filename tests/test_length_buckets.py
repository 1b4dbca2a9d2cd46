"""Variable-length batches: the update and log-prob passes on the width a batch needs
(`updates.bucket_width` / `updates.trim`) give the loss, metrics and gradient step of the padded
batch, for every loss type, with and without micro-batching, on a mesh of 8 devices."""

import functools

import jax
import numpy as np
import pytest

from grpo_jax import losses, models, sharding, train_step, updates
from grpo_jax.train_step import TrainBatch

B, TP, C = 16, 5, 24


def _batch(seed, process=False):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 13, size=B)  # every row shorter than 13 of C = 24
  mask = (np.arange(C)[None] < lengths[:, None]).astype(np.int32)
  adv = rng.normal(size=(B, C) if process else B).astype(np.float32)
  return TrainBatch(
      prompt_tokens=rng.integers(3, 60, size=(B, TP)).astype(np.int32),
      prompt_mask=np.ones((B, TP), np.int32),
      completion_tokens=np.where(mask > 0, rng.integers(3, 60, size=(B, C)), 0).astype(np.int32),
      completion_mask=mask, advantages=adv)


def test_bucket_width():
  mask = np.zeros((3, 40), np.int32)
  assert updates.bucket_width(mask, 16) == 16
  mask[1, :17] = 1
  assert updates.bucket_width(mask, 16) == 32
  mask[2, :39] = 1
  assert updates.bucket_width(mask, 16) == 40  # capped at C
  assert updates.bucket_width(mask[:, :5], 0) == 5  # off: the whole width


@pytest.mark.parametrize("loss_type, level, micro, process", [
    ("grpo", "token", 1, False), ("grpo", "token", 4, False), ("dapo", "token", 2, False),
    ("dr_grpo", "token", 4, False), ("grpo", "sequence", 2, False), ("dapo", "token", 2, True),
])
def test_trimmed_update_equals_the_padded_one_on_a_mesh(loss_type, level, micro, process):
  config = models.get_config("tiny_llama").replace(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
      num_kv_heads=2, head_dim=16, max_position_embeddings=64)
  mesh = sharding.make_mesh(data=8)
  # eps = 1: Adam's first step is lr * g / (|g| + 1), about the gradient itself (not its sign),
  # so comparing the stepped params compares gradients.
  optimizer = train_step.make_optimizer(train_step.OptimConfig(learning_rate=1.0, eps=1.0,
                                                               max_grad_norm=None))
  params = jax.device_get(models.init_params(config, jax.random.key(0)))  # host: never donated
  state_sh = train_step.state_shardings(mesh, config, optimizer, params)
  loss_cfg = losses.LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                               epsilon_low=0.2, epsilon_high=0.28, max_completion_length=C)
  update = train_step.make_update_fn(mesh, state_sh, model_config=config, optimizer=optimizer,
                                     loss_cfg=loss_cfg, num_microbatches=micro)
  logprobs = train_step.make_logprob_fn(mesh, state_sh.params, model_config=config,
                                        num_microbatches=micro)
  full = _batch(1, process)
  width = updates.bucket_width(full.completion_mask, 8)
  assert width == 16 < C
  short = updates.trim(full, width)
  results = []
  for batch in (full, short):
    state = jax.device_put(train_step.init_train_state(params, optimizer), state_sh)
    batch = sharding.shard_batch((batch,), mesh)[0]
    # a reference that differs from the policy, and old log-probs of a perturbed policy
    ref = logprobs(jax.tree.map(lambda x: x * 0.9, state.params), batch)
    old = logprobs(jax.tree.map(lambda x: x * 1.05, state.params), batch)
    batch = batch.replace(ref_logprobs=ref, old_logprobs=old)
    state, metrics = update(state, batch)
    results.append((jax.device_get(state.params), jax.device_get(metrics),
                    np.asarray(ref)))
  (p_full, m_full, ref_full), (p_short, m_short, ref_short) = results
  np.testing.assert_allclose(ref_short, ref_full[:, :width], atol=1e-6)
  assert np.all(ref_full[:, width:][full.completion_mask[:, width:] > 0] == 0)  # nothing cut
  for name in ("loss", "grad_norm", "kl", "clip_frac"):
    if name in m_full:
      np.testing.assert_allclose(m_short[name], m_full[name], rtol=2e-5, atol=1e-7, err_msg=name)
  delta = lambda p: jax.tree.map(lambda a, b: a - b, p, params)  # noqa: E731
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7),
               delta(p_short), delta(p_full))
  assert float(m_full["grad_norm"]) > 0
