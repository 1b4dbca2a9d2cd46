"""Mixed precision: float32 master weights and optimiser state, a bfloat16 compute dtype.

The failure this guards against: at the GSM8K learning rate (1e-6) an Adam step moves a weight of
magnitude ~0.02 by far less than half a bfloat16 ulp (~6e-5), so bfloat16 weights do not move.
"""

import dataclasses
import json
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_worker as mw
from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import checkpointing, losses, models, settings, tasks
from grpo_jax import train_step as ts


def _changed_fraction(param_dtype: str, steps: int = 3) -> float:
  """Fraction of the decoder-layer weights that change in `steps` GRPO updates at lr 1e-6 (one
  decoder layer: what happens to a weight does not depend on the depth; a smaller compile)."""
  config = models.get_config("tiny_qwen2", param_dtype=param_dtype, dtype="bfloat16",
                             num_layers=1)
  params = models.init_params(config, jax.random.key(0))
  optimizer = ts.make_optimizer(ts.OptimConfig(learning_rate=1e-6, max_grad_norm=1.0))
  state = ts.init_train_state(params, optimizer)
  step = jax.jit(lambda s, b: ts.update_step(s, b, model_config=config, optimizer=optimizer,
                                             loss_cfg=losses.LossConfig()))
  for seed in range(steps):
    state, metrics = step(state, jax.tree.map(jnp.asarray, mw.make_batch(seed)))
    assert metrics["skipped"] == 0
  layers = lambda p: [x for k, v in p.items() if k.startswith("layers_")  # noqa: E731
                      for x in jax.tree.leaves(v)]
  before, after = layers(params), layers(state.params)
  changed = sum(int(jnp.sum(a != b)) for a, b in zip(after, before))
  return changed / sum(a.size for a in before)


def test_float32_masters_with_bf16_compute_move_at_lr_1e_6():
  assert _changed_fraction("float32") >= 0.99
  # The failure mode the master weights fix: bfloat16 weights barely move at this rate.
  assert _changed_fraction("bfloat16") < 0.2


def _dots(fn, *args) -> tuple[int, int, int]:
  """dot_generals in the jaxpr of fn(*args): (both operands bfloat16, none bfloat16, all)."""
  eqns = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        eqns.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  bf16 = [[v.aval.dtype == jnp.bfloat16 for v in e.invars] for e in eqns]
  return sum(map(all, bf16)), sum(not any(b) for b in bf16), len(eqns)


def _settings(**model):
  cfg = arithmetic_config.get_config("smoke")
  cfg.model.update(model)
  return settings.from_config(cfg, 1)


@pytest.mark.parametrize("source", ["preset", "hf"])
def test_model_dtype_bfloat16_really_computes_in_bfloat16(source, tmp_path):
  """`model.dtype = bfloat16` reaches preset and Hugging Face models alike: float32 params, and
  no matmul of the training step's forward and backward runs on two float32 operands (the
  float32 ones are the cotangents of the float32 softmax and log-probs, as intended)."""
  s = _settings(dtype="bfloat16")
  tok = type("Tok", (), {"vocab_size": 128})()
  if source == "hf":
    config = models.get_config("tiny_qwen2", vocab_size=128)
    models.save_hf_checkpoint(str(tmp_path), config, models.init_params(config, jax.random.key(0)))
    s = _settings(dtype="bfloat16", preset="", hf_checkpoint=str(tmp_path))
  config, params = tasks.build_model(s, tok)
  assert (config.param_dtype, config.dtype) == ("float32", "bfloat16")
  if params is None:
    params = models.init_params(config, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  batch = batch.replace(prompt_tokens=batch.prompt_tokens % 128,
                        completion_tokens=batch.completion_tokens % 128)
  loss = lambda p: ts.loss_and_grads(p, batch, model_config=config,  # noqa: E731
                                     loss_cfg=losses.LossConfig())[2]
  bf16, f32, total = _dots(loss, params)
  assert total > 10 and f32 == 0 and bf16 >= 0.8 * total
  config32 = dataclasses.replace(config, dtype="float32")  # the same count says all float32
  loss32 = lambda p: ts.loss_and_grads(p, batch, model_config=config32,  # noqa: E731
                                       loss_cfg=losses.LossConfig())[2]
  assert _dots(loss32, params) == (0, total, total)


def test_a_config_that_would_lose_its_updates_warns():
  warnings = settings.precision_warnings(_settings(param_dtype="bfloat16", dtype="bfloat16"))
  assert warnings and "config.model.param_dtype" in warnings[0] and "float32" in warnings[0]
  assert not settings.precision_warnings(_settings(dtype="bfloat16"))
  with pytest.raises(settings.ConfigError, match="config.model.dtype = 'float8'"):
    _settings(dtype="float8")


def test_bf16_run_records_its_dtypes_and_keeps_the_reference_in_compute_dtype(tmp_path):
  from grpo_jax import trainer
  cfg = arithmetic_config.get_config("smoke")
  cfg.model.dtype, cfg.grpo.loss.beta = "bfloat16", 0.04
  cfg.grpo.steps, cfg.eval.every, cfg.grpo.num_prompts = 2, 0, 8
  cfg.model.overrides.num_layers = 1  # the dtypes do not depend on the depth: smaller compiles
  trainer.train(cfg, str(tmp_path))
  info = json.load(open(tmp_path / "run.json"))
  assert info["precision"] == {"params": "float32", "compute": "bfloat16",
                               "optimizer_state": "float32", "reference": "bfloat16"}
  with checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
    tree, _ = ckpt.restore()
  assert {x.dtype for x in jax.tree.leaves(tree["ref_params"])} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(tree["state"]["params"])} == {np.dtype("float32")}
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(r["loss"]) for r in rows if r["phase"] == "grpo" and "loss" in r)


def _rollout_batch(exp, seed: int) -> ts.TrainBatch:
  """A rollout's batch without sampling: the task's prompts, random ragged completions."""
  rng = np.random.default_rng(seed)
  r = exp.settings.rollout
  N, C = r.num_prompts * r.num_samples, r.max_completion_length + 1
  mask = (np.arange(C)[None] < rng.integers(1, C + 1, N)[:, None]).astype(np.int32)
  return ts.TrainBatch(prompt_tokens=exp.data.train_prompts.ids_NxL[:N],
                       prompt_mask=exp.data.train_prompts.mask_NxL[:N],
                       completion_tokens=rng.integers(3, 50, (N, C)).astype(np.int32) * mask,
                       completion_mask=mask, advantages=rng.normal(size=N).astype(np.float32))


@pytest.mark.parametrize("dtype,lora_rank,length_bucket", [
    ("float32", 0, 0), ("bfloat16", 0, 0), ("float32", 4, 0), ("bfloat16", 4, 0),
    ("bfloat16", 4, 8)])
def test_ratio_is_exactly_1_before_the_first_of_mu_steps_and_kl_0_at_init(
    dtype, lora_rank, length_bucket, tmp_path):
  """The old-policy pass and the update's forward are one function of the same weights, so the
  first of mu > 1 steps sees a ratio of exactly 1, after the weights have moved too (norm scales
  off the bfloat16 grid, nonzero adapters); the reference pass gives KL exactly 0 at init (LoRA:
  the base, zero adapters). With a zero-width clip range, a ratio off 1 in the direction its
  advantage favours counts as clipped (clip_frac)."""
  from grpo_jax import experiment, runstate, updates, weights
  cfg = arithmetic_config.get_config("smoke")
  cfg.model.dtype, cfg.model.lora.rank = dtype, lora_rank
  cfg.model.overrides.num_layers = 1
  cfg.grpo.num_iterations, cfg.grpo.loss.beta = 2, 0.04
  cfg.grpo.loss.epsilon_low = cfg.grpo.loss.epsilon_high = 0.0
  cfg.grpo.num_prompts, cfg.grpo.micro_batch_size = 8, 16  # 2 micro-batches in both passes
  cfg.grpo.length_bucket = length_bucket
  cfg.grpo.optim.learning_rate = 1e-2
  exp = experiment.build(settings.from_config(cfg, jax.device_count()), str(tmp_path))
  device, g = exp.device, exp.settings.grpo
  models = runstate.initial_grpo_models(exp)
  base, state = models.base, models.state
  reference = models.reference
  for step in range(2):  # step 1 starts from the weights step 0's two updates moved
    batch = _rollout_batch(exp, step)
    assert (updates.plan(device, g, batch) is not None) == bool(length_bucket)
    ready = updates.with_logprobs(device, g, weights.update_params(state, base), reference, batch)
    state, figures = updates.update(device, g, state, ready, frozen=base)
    assert figures["clip_frac/first"] == 0.0, (step, figures["clip_frac/first"])
    if step == 0:
      assert figures["kl/first"] == 0.0
  assert figures["kl/first"] > 1e-4 and figures["clip_frac/last"] > 0  # the weights did move
