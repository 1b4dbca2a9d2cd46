"""Variable-length batches: the update and log-prob passes on the width a batch needs
(`updates.bucket_width` / `updates.trim`) give the loss, metrics and gradient step of the padded
batch, for every loss type, with and without micro-batching, on a mesh of 8 devices."""

import functools

import jax
import numpy as np
import pytest

from grpo_jax import buckets, corrections, covariance, losses, models, sharding, train_step
from grpo_jax import updates
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
    ("grpo", "token", 1, False), ("dapo", "token", 2, False), ("dr_grpo", "token", 4, False),
    ("grpo", "sequence", 2, False), ("dapo", "token", 2, True),
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


def test_microbatch_plan_sorts_rows_and_sizes_each_micro_batch():
  mask = np.zeros((8, 40), np.int32)
  for row, n in enumerate([3, 40, 5, 17, 0, 33, 9, 16]):
    mask[row, :n] = 1
  plan = buckets.microbatch_plan(mask, 2, 16)
  assert [sorted(rows.tolist()) for rows, _ in plan] == [[1, 5], [3, 7], [2, 6], [0, 4]]
  assert [w for _, w in plan] == [40, 32, 16, 16]
  assert sorted(np.concatenate([r for r, _ in plan]).tolist()) == list(range(8))


@pytest.mark.parametrize("loss_type, level, micro, process, lora_rank, correction", [
    ("dapo", "token", 2, False, 0, None), ("dr_grpo", "token", 4, False, 0, None),
    ("grpo", "sequence", 2, False, 0, None), ("dapo", "token", 4, True, 0, None),
    ("grpo", "token", 2, False, 4, None),
    ("grpo", "token", 4, False, 0, "tis"),
])
def test_length_bucketed_micro_batches_equal_the_padded_update(loss_type, level, micro, process,
                                                              lora_rank, correction):
  """Micro-batches of similar lengths, each at its own width (separate jitted pieces), give the
  fused padded update's loss, metrics and step, and the padded log-prob pass; LoRA too; with
  the sampler's log-probs, the mismatch correction and figures (its maximum kept a maximum),
  with KL-Cov's tokens chosen over the whole batch."""
  from grpo_jax.models import lora
  config = models.get_config("tiny_llama").replace(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
      num_kv_heads=2, head_dim=16, max_position_embeddings=64, lora_rank=lora_rank,
      lora_alpha=8.0)
  mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])  # params split too
  optimizer = train_step.make_optimizer(train_step.OptimConfig(learning_rate=1.0, eps=1.0,
                                                               max_grad_norm=None))
  full_params = jax.device_get(models.init_params(config, jax.random.key(0)))
  if lora_rank:  # adapters trained, base frozen; B = 0 at init: perturb it so grads reach A
    trained, frozen = lora.split(full_params)
    trained = jax.tree.map(lambda x: x + 0.01, trained)
  else:
    trained, frozen = full_params, None
  base_config = lora.base_config(config)
  base = frozen if lora_rank else full_params
  state_sh = train_step.state_shardings(mesh, config, optimizer, trained)
  params_sh = train_step.state_shardings(mesh, base_config, optimizer, base).params
  frozen_sh = params_sh if lora_rank else None
  loss_cfg = losses.LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                               epsilon_low=0.2, epsilon_high=0.28, max_completion_length=C,
                               correction=corrections.Correction(correction or "none", cap=1.02),
                               policy_loss="kl_cov" if correction else "clip", cov_fraction=0.1)
  fused = train_step.make_update_fn(mesh, state_sh, model_config=config, optimizer=optimizer,
                                    loss_cfg=loss_cfg, num_microbatches=micro, frozen_sh=frozen_sh)
  logprobs = train_step.make_logprob_fn(mesh, params_sh, model_config=base_config,
                                        num_microbatches=micro)
  programs = buckets.make_bucketed_programs(
      mesh, state_sh, params_sh, model_config=config, optimizer=optimizer, loss_cfg=loss_cfg,
      frozen_sh=frozen_sh, base_config=base_config)
  batch = _batch(2, process)
  plan = buckets.microbatch_plan(batch.completion_mask, B // micro, 4)
  assert len({w for _, w in plan}) > 1  # micro-batches really differ in width
  ref_params = jax.tree.map(lambda x: x * 0.9, base)
  placed = sharding.shard_batch((batch,), mesh)[0]
  ref_full = np.asarray(logprobs(jax.device_put(ref_params, params_sh), placed))
  ref_bucketed = buckets.bucketed_logprobs(programs, jax.device_put(ref_params, params_sh),
                                           batch, plan, mesh)
  m = batch.completion_mask > 0
  np.testing.assert_allclose(ref_bucketed[m], ref_full[m], atol=2e-6)
  batch = batch.replace(ref_logprobs=ref_full * m, old_logprobs=ref_full * m * 1.01)
  if correction:  # a sampler a little off the trainer, row by row
    wobble = 1.0 + 0.05 * np.random.default_rng(0).normal(size=ref_full.shape)
    batch = batch.replace(sampler_logprobs=(ref_full * m * wobble).astype(np.float32))
    batch = batch.replace(cov_selected=np.asarray(covariance.select(
        batch.sampler_logprobs, batch.advantages, batch.completion_mask, jax.random.key(0),
        kind="kl_cov", fraction=0.1, low=1.0, high=5.0)))
  put_frozen = (lambda: (jax.device_put(frozen, frozen_sh),)) if lora_rank else (lambda: ())
  state = jax.device_put(train_step.init_train_state(trained, optimizer), state_sh)
  s_fused, m_fused = fused(state, sharding.shard_batch((batch,), mesh)[0], *put_frozen())
  state = jax.device_put(train_step.init_train_state(trained, optimizer), state_sh)
  s_buck, m_buck = buckets.bucketed_update(programs, state, batch, plan, mesh,
                                           frozen=put_frozen()[0] if lora_rank else None)
  m_fused, m_buck = jax.device_get((m_fused, m_buck))
  for name in m_fused:
    np.testing.assert_allclose(m_buck[name], m_fused[name], rtol=5e-5, atol=1e-7, err_msg=name)
  delta = lambda s: jax.tree.map(lambda a, b: a - b, jax.device_get(s.params), trained)  # noqa: E731
  # atol: one float32 ulp of a weight near 1 (the deltas are differences of weights)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=2.4e-7),
               delta(s_buck), delta(s_fused))
  assert float(m_fused["grad_norm"]) > 0
  if correction:
    assert 0 < m_fused["mismatch/clipped"] < 1 and m_fused["mismatch/ratio_max"] > 1.02
    assert 0 < m_fused["cov_selected"] <= 0.1


def test_pad_ids_outside_the_vocabulary_do_not_poison_the_loss():
  """A tokenizer whose pad id is >= the model's vocabulary (bench_step's): the padding after
  each EOS used to embed to NaN and turn every loss into NaN (every step skipped)."""
  config = models.get_config("tiny_llama").replace(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
      num_kv_heads=2, head_dim=16, max_position_embeddings=64)
  params = models.init_params(config, jax.random.key(0))
  batch = _batch(3)
  batch = batch.replace(completion_tokens=np.where(batch.completion_mask > 0,
                                                   batch.completion_tokens, 64 + 1))
  ref = train_step.sequence_logprobs(params, batch, model_config=config)
  loss_cfg = losses.LossConfig(beta=0.04, max_completion_length=C)
  loss, metrics, grads = train_step.loss_and_grads(
      params, batch.replace(ref_logprobs=ref), model_config=config, loss_cfg=loss_cfg,
      num_microbatches=2)
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["grad_norm"]) > 0


def test_new_widths_compile_ahead_and_together_and_the_calls_reuse_them():
  """`compile_new`: a step's new micro-batch shapes are compiled ahead in threads, once; the
  jitted programs' calls then compile nothing (each width's executable is reused)."""
  import logging
  config = models.get_config("tiny_llama").replace(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
      num_kv_heads=2, head_dim=16, max_position_embeddings=64)
  mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
  optimizer = train_step.make_optimizer(train_step.OptimConfig(learning_rate=1e-3))
  params = jax.device_get(models.init_params(config, jax.random.key(1)))
  state_sh = train_step.state_shardings(mesh, config, optimizer, params)
  programs = buckets.make_bucketed_programs(
      mesh, state_sh, state_sh.params, model_config=config, optimizer=optimizer,
      loss_cfg=losses.LossConfig(max_completion_length=C))
  batch = _batch(2)
  plan = buckets.microbatch_plan(batch.completion_mask, 4, 4)
  widths = {w for _, w in plan}
  assert len(widths) >= 3
  compiled, calls = [], []

  class Log(logging.Handler):
    def emit(self, record):
      if "Finished XLA compilation" in record.getMessage() and "jit(" in record.getMessage():
        compiled.append(record.getMessage())

  real_compile_new = buckets.compile_new

  def spy(programs, name, args_list):
    real_compile_new(programs, name, args_list)
    calls.append((name, len(compiled)))  # compiles done ahead, before any call

  handler = Log()
  logging.getLogger("jax").addHandler(handler)
  placed = jax.device_put(params, state_sh.params)
  jax.config.update("jax_log_compiles", True)  # global: a context is thread-local
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(buckets, "compile_new", spy)
      first = buckets.bucketed_logprobs(programs, placed, batch, plan, mesh)
      after_first = len(compiled)
      again = buckets.bucketed_logprobs(programs, placed, batch, plan, mesh)
  finally:
    jax.config.update("jax_log_compiles", False)
    logging.getLogger("jax").removeHandler(handler)
  ahead = [m for m in compiled[:calls[0][1]] if "sequence_logprobs" in m]
  assert len(ahead) == len(widths), compiled  # one per width, all before the first call
  assert not [m for m in compiled[calls[0][1]:] if "sequence_logprobs" in m]  # calls reuse them
  assert len(compiled) == after_first  # the second step compiles nothing
  assert {k[0] for k in programs.compiled} == {"logprobs"} and len(programs.compiled) == len(widths)
  np.testing.assert_array_equal(first, again)
