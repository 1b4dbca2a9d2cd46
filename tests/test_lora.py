"""LoRA: exact base logits at init, adapters the only trained state, merged == unmerged, exact
micro-batching and meshes, an exact resume after a kill, and clear errors for bad input."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_worker as mw
from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import losses, metrics, models, settings, sharding
from grpo_jax import train_step as ts
from grpo_jax.models import lora

CONFIG = models.get_config("tiny_qwen2", lora_rank=4, lora_alpha=8.0)
LOSS = losses.LossConfig(beta=0.0, loss_type="dapo")
_forward = jax.jit(models.forward, static_argnums=1)  # one compile per config, shared


def _tokens():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 9)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(9), (3, 9))
  return tokens, positions, jnp.ones((3, 9), jnp.int32)


def _perturbed(params, scale=0.1):
  adapters, base = lora.split(params)
  keys = iter(jax.random.split(jax.random.key(7), 64))
  adapters = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), adapters)
  return lora.combine(base, adapters)


def test_fresh_adapters_give_exactly_the_base_logits():
  params = models.init_params(CONFIG, jax.random.key(0))
  adapters, base = lora.split(params)
  assert adapters and all(k.endswith(("_lora_a", "_lora_b")) for layer in adapters.values()
                          for module in layer.values() for k in module)
  want, _ = _forward(base, lora.base_config(CONFIG), *_tokens())
  got, _ = _forward(params, CONFIG, *_tokens())
  np.testing.assert_array_equal(got, want)


def test_merged_equals_unmerged():
  params = _perturbed_params()
  unmerged, _ = _forward(params, CONFIG, *_tokens())
  merged_params, merged_config = lora.merge(params, CONFIG)
  assert merged_config.lora_rank == 0 and not lora.split(merged_params)[0]
  merged, _ = _forward(merged_params, merged_config, *_tokens())
  base, _ = _forward(lora.split(params)[1], merged_config, *_tokens())
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)
  assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapters do change the model


@functools.lru_cache(maxsize=1)
def _perturbed_params():
  """Fresh params with perturbed (nonzero) adapters, on the host: computed once."""
  return jax.device_get(_perturbed(models.init_params(CONFIG, jax.random.key(0))))


def _state_and_batch():
  adapters, base = lora.split(_perturbed_params())
  optimizer = ts.make_optimizer(mw.OPTIM)
  return ts.init_train_state(adapters, optimizer), base, optimizer, mw.make_batch()


def test_only_adapters_are_trained():
  state, base, optimizer, batch = _state_and_batch()
  step = jax.jit(lambda s, b, f: ts.update_step(s, b, f, model_config=CONFIG,
                                                optimizer=optimizer, loss_cfg=LOSS))
  new, m = step(state, jax.tree.map(jnp.asarray, batch), base)
  assert m["skipped"] == 0 and float(m["grad_norm"]) > 0
  # The optimiser state mirrors the adapters only: its leaves are adapter-shaped.
  adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
  opt_shapes = {x.shape for x in jax.tree.leaves(new.opt_state) if x.ndim}
  assert opt_shapes <= adapter_shapes
  assert lora.num_params(new.params) == lora.num_params(state.params) < lora.num_params(base) / 4
  changed = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new.params),
                                                   jax.tree.leaves(state.params))]
  assert all(changed)


def _update(state, base, optimizer, batch, mesh, num_microbatches):
  adapters_sh = ts.state_shardings(mesh, CONFIG, optimizer, jax.eval_shape(lambda: state.params))
  params_sh = ts.state_shardings(mesh, lora.base_config(CONFIG), optimizer,
                                 jax.eval_shape(lambda: base)).params
  fn = ts.make_update_fn(mesh, adapters_sh, model_config=CONFIG, optimizer=optimizer,
                         loss_cfg=LOSS, num_microbatches=num_microbatches, frozen_sh=params_sh)
  state = jax.device_put(jax.tree.map(jnp.copy, state), adapters_sh)
  new, m = fn(state, sharding.shard_batch(batch, mesh), jax.device_put(base, params_sh))
  return jax.device_get(new.params), float(m["loss"])


@functools.lru_cache(maxsize=1)
def _one_device_update():
  """The update on one device, no micro-batching: what every mesh and micro-batching must give."""
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return _update(*_state_and_batch(), one, 1)


@pytest.mark.parametrize("mesh_shape, num_microbatches", [((1, 1, 1), 2), ((2, 2, 2), 1),
                                                          ((8, 1, 1), 2)])
def test_microbatches_and_meshes_match_one_device(mesh_shape, num_microbatches):
  state, base, optimizer, batch = _state_and_batch()
  want, want_loss = _one_device_update()
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  got, loss = _update(state, base, optimizer, batch, mesh, num_microbatches)
  assert loss == pytest.approx(want_loss, rel=2e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _settings(**lora_fields):
  cfg = arithmetic_config.get_config("lora,smoke")
  cfg.model.lora.update(lora_fields)
  return settings.from_config(cfg, 1)


@pytest.mark.parametrize("fields, message", [
    (dict(targets="qkv,q_proj"), "config.model.lora.targets = 'qkv,q_proj'"),
    (dict(targets=""), "config.model.lora.targets"),
    (dict(rank=-2), "config.model.lora.rank = -2"),
    (dict(dropout=0.1), "config.model.lora.dropout"),
])
def test_bad_lora_config_names_the_field(fields, message):
  with pytest.raises(settings.ConfigError, match=message):
    _settings(**fields)


def test_lora_rejects_a_moving_reference():
  cfg = arithmetic_config.get_config("lora,smoke")
  cfg.grpo.loss.beta, cfg.grpo.ref_reset_every = 0.04, 2
  with pytest.raises(settings.ConfigError, match="frozen base"):
    settings.from_config(cfg, 1)


# ----------------------------------------------------------------------------- end to end

from test_trainer import assert_kill_and_resume_is_exact, launch  # noqa: E402

# mu = 2: the old-policy pass on the base beside the adapters (the update's forward), resumed too
LORA_SMOKE = ["--config=experiments/configs/arithmetic.py:lora,smoke",
              "--config.grpo.loss.beta=0.04", "--config.grpo.num_iterations=2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora")
  code, out = launch(workdir, *LORA_SMOKE)
  assert code == 0, out[-4000:]
  return workdir


def test_lora_run_checkpoints_adapters_and_the_base_fingerprint(lora_run):
  rows = metrics.read_metrics(lora_run)
  grpo = [r for r in rows if r["phase"] == "grpo" and "loss" in r]
  assert [r["step"] for r in grpo] == [1, 2, 3, 4] and grpo[0]["kl/first"] == 0.0
  assert os.path.exists(lora_run / "lora_base" / "model.safetensors")  # the SFT warm start
  from grpo_jax import checkpointing
  with checkpointing.Checkpointer(lora_run / "checkpoints", read_only=True) as ckpt:
    tree, extra = ckpt.restore()
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      tree["state"]["params"])[0]}
  assert names and all("_lora_" in n for n in names)  # adapters only, no base, no reference
  assert "ref_params" not in tree and len(extra["lora_base"]) == 16
  # The end of the run exports the policy for other tools: a PEFT adapter and merged weights.
  assert json.load(open(lora_run / "lora_adapter" / "adapter_config.json"))["r"] == 8
  assert os.path.exists(lora_run / "merged_hf" / "model.safetensors")


def test_lora_resume_after_sigkill_is_exact(lora_run, tmp_path):
  assert_kill_and_resume_is_exact(lora_run, tmp_path / "killed", LORA_SMOKE, 12)


def test_adapters_on_a_different_base_is_a_clear_error(lora_run, tmp_path):
  workdir = tmp_path / "other_base"
  shutil.copytree(lora_run, workdir)
  base = workdir / "lora_base"
  config = json.load(open(base / "config.json"))
  other = models.get_config("tiny_llama", vocab_size=config["vocab_size"],
                            hidden_size=config["hidden_size"],
                            intermediate_size=config["intermediate_size"],
                            num_heads=config["num_attention_heads"],
                            num_kv_heads=config["num_key_value_heads"],
                            head_dim=config.get("head_dim", 16), num_layers=2,
                            rope_scaling_type=None, rope_theta=config["rope_theta"],
                            max_position_embeddings=config["max_position_embeddings"])
  models.save_hf_checkpoint(str(base), other, models.init_params(other, jax.random.key(99)))
  code, out = launch(workdir, *LORA_SMOKE)
  assert code == 2, out[-3000:]
  assert "different base model" in out and str(base) in out and "Traceback" not in out
