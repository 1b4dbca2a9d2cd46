"""Layers as one lax.scan (`scan_layers`): the stacked model equals the unrolled one within 1e-6 in
float32 (logits, KV-cache decoding, loss gradients under every remat policy, the sampler), the
layouts convert exactly (params, abstract targets with shardings, logical axes), every per-layer
boundary (Hugging Face export, LoRA merge, PEFT export, fingerprint) gives the same result from
either layout, and a checkpoint written with one setting restores and resumes with the other."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import metrics, models, runs, sampling, settings, settings_checks, sharding, trainer
from grpo_jax.models import hf_checkpoint, lora, peft_export

FAMILIES = ["tiny_qwen2", "tiny_qwen3", "tiny_llama", "tiny_gemma3"]


def _pair(family, **overrides):
  config = models.get_config(family, **overrides)
  params = models.init_params(config, jax.random.key(0))
  return config, params, config.replace(scan_layers=True), models.to_layout(params, True)


def _batch(config, rows=3, length=9):
  tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, config.vocab_size)
  mask = jnp.ones_like(tokens).at[0, length - 2:].set(0).at[1, :2].set(0)
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  return tokens, positions, mask


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_forward_and_decode_equal_unrolled(family):
  config, params, scanned, stacked = _pair(family)
  tokens, positions, mask = _batch(config)
  full, _ = models.forward(params, config, tokens, positions, mask)
  np.testing.assert_allclose(models.forward(stacked, scanned, tokens, positions, mask)[0], full,
                             atol=1e-6, rtol=0)  # every position: the same masks, one key set
  # Prefill 5 tokens, then one at a time: the stacked cache gives the unrolled cache's logits.
  outs = {}
  for cfg, p in ((config, params), (scanned, stacked)):
    cache = models.init_cache(cfg, 3, 12)
    logits, cache = models.forward(p, cfg, tokens[:, :5], positions[:, :5], mask[:, :5], cache)
    steps = [logits]
    for t in range(5, 9):
      logits, cache = models.forward(p, cfg, tokens[:, t:t + 1], positions[:, t:t + 1],
                                     mask[:, t:t + 1], cache)
      steps.append(logits)
    outs[cfg.scan_layers] = (jnp.concatenate(steps, 1), cache)
  real = np.asarray(mask, bool)  # pad queries attend to nothing: their outputs are garbage
  np.testing.assert_allclose(np.asarray(outs[True][0])[real], np.asarray(outs[False][0])[real],
                             atol=1e-6, rtol=0)
  assert outs[True][1].k_BxKxDxS.shape[0] == config.num_layers  # one stacked array
  valid_BxS = np.asarray(outs[False][1].valid_BxS)  # pad slots hold pad queries' garbage
  np.testing.assert_array_equal(outs[True][1].valid_BxS, valid_BxS)
  k_LxBxKxDxS = np.where(valid_BxS[None, :, None, None], outs[True][1].k_BxKxDxS, 0)
  v_LxBxKxSxD = np.where(valid_BxS[None, :, None, :, None], outs[True][1].v_BxKxSxD, 0)
  np.testing.assert_allclose(k_LxBxKxDxS, np.where(valid_BxS[None, :, None, None], np.stack(
      outs[False][1].k_BxKxDxS), 0), atol=1e-6, rtol=1e-6)  # keys ~1.7 after Gemma's k norm
  np.testing.assert_allclose(v_LxBxKxSxD, np.where(valid_BxS[None, :, None, :, None], np.stack(
      outs[False][1].v_BxKxSxD), 0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["tiny_qwen2", "tiny_gemma3"])
@pytest.mark.parametrize("remat", ["none", "layer", "matmuls"])
def test_scanned_loss_and_gradients_equal_unrolled(family, remat):
  config, params, scanned, stacked = _pair(family, remat=remat, lora_rank=2)
  tokens, positions, mask = _batch(config)

  def loss(p, cfg):  # mean token log-likelihood of the batch
    logits, _ = models.forward(p, cfg, tokens, positions, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  want, grads = jax.value_and_grad(loss)(params, config)
  got, stacked_grads = jax.value_and_grad(loss)(stacked, scanned)
  assert abs(float(got - want)) < 1e-6
  assert _max_diff(models.to_layout(stacked_grads, False), grads) < 1e-6


@pytest.mark.parametrize("continuous", [False, True])
def test_scanned_sampler_draws_the_unrolled_samples(continuous):
  config, params, scanned, stacked = _pair("tiny_gemma3")  # sliding + global layers, a prefix
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (4, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  settings = sampling.SamplingSettings(
      num_samples=4, max_new_tokens=10, temperature=0.8, top_k=9, top_p=0.9, pad_id=0,
      eos_ids=tuple(range(120, 128)), continuous=continuous, decode_slots=8 if continuous else 0)
  want = sampling.make_sampler(config, settings)(params, ids * mask, mask, jax.random.key(3))
  got = sampling.make_sampler(scanned, settings)(stacked, ids * mask, mask, jax.random.key(3))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6, rtol=0)


def test_remat_policies_agree_and_bad_ones_are_config_errors():
  assert settings_checks.REMAT_POLICIES == models.REMAT_POLICIES
  cfg = arithmetic_config.get_config("smoke")
  cfg.model.remat = "sometimes"
  with pytest.raises(settings.ConfigError, match="config.model.remat"):
    settings.from_config(cfg, 1)
  cfg.model.remat = "matmuls"
  assert settings.from_config(cfg, 1).model.remat == "matmuls"


def test_layouts_convert_exactly_with_axes_and_shardings():
  config, params, scanned, stacked = _pair("tiny_gemma3")
  assert models.layout_of(params) is False and models.layout_of(stacked) is True
  assert models.layout_of({"x": np.zeros(2)}) is None
  # A scanned model's own init has the converted tree's structure, shapes and axes.
  fresh = models.init_params(scanned, jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(stacked)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, stacked)
  is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
  unrolled_axes = models.param_logical_axes(config)
  for path, axes in jax.tree_util.tree_flatten_with_path(
      models.param_logical_axes(scanned)["layers"], is_leaf=is_axes)[0]:
    want = unrolled_axes["layers_0"]
    for key in path:
      want = want[key.key]
    assert axes == ("layers", *want)
  # Exact round trip, NumPy and JAX leaves, and a tree that holds params twice (an optimizer).
  host = jax.device_get(params)
  np_stacked = models.to_layout(host, True)
  assert isinstance(np_stacked["layers"]["attn"]["qkv"], np.ndarray)
  for tree in (host, params, {"mu": params, "nu": host, "count": 3}):
    back = models.to_layout(models.to_layout(tree, True), False)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert _max_diff(back, tree) == 0.0
  assert models.to_layout(stacked, True) is not None  # already stacked: unchanged
  assert _max_diff(models.to_layout(stacked, True), stacked) == 0.0
  # Abstract restore targets keep their shardings, with a replicated layer axis.
  mesh = sharding.make_mesh(2, 2, 2)
  spec = P("fsdp", "tensor")
  target = {"layers_0": {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32,
                                                   sharding=NamedSharding(mesh, spec))},
            "layers_1": {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32,
                                                   sharding=NamedSharding(mesh, spec))}}
  stacked_target = models.to_layout(target, True)["layers"]["w"]
  assert stacked_target.shape == (2, 4, 6)
  assert stacked_target.sharding.spec == P(None, "fsdp", "tensor")
  assert models.to_layout({"layers": {"w": stacked_target}}, False)["layers_1"]["w"] == \
      target["layers_1"]["w"]


def test_export_lora_and_fingerprint_agree_across_layouts(tmp_path):
  config, params, scanned, stacked = _pair("tiny_qwen2", lora_rank=4)
  # Non-zero B so that the merge changes the weights.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.01 if str(path[-1].key).endswith("_lora_b") else x, params)
  stacked = models.to_layout(params, True)
  assert _max_diff(hf_checkpoint._to_hf(lora.base_config(config), lora.split(stacked)[1]),
                   hf_checkpoint._to_hf(lora.base_config(config), lora.split(params)[1])) == 0.0
  merged, base_config = lora.merge(params, config)
  merged_stacked, _ = lora.merge(stacked, scanned)
  assert models.layout_of(merged_stacked) is True
  assert _max_diff(models.to_layout(merged_stacked, False), merged) == 0.0
  want, got = peft_export.peft_tensors(config, params), peft_export.peft_tensors(scanned, stacked)
  assert sorted(want) == sorted(got) and _max_diff(got, want) == 0.0
  base, base_stacked = lora.split(params)[1], lora.split(stacked)[1]
  assert lora.fingerprint(base_config, base) == lora.fingerprint(
      lora.base_config(scanned), base_stacked)
  # A stacked model saved as a Hugging Face checkpoint loads back unrolled, value for value.
  models.save_hf_checkpoint(str(tmp_path / "hf"), lora.base_config(scanned), base_stacked)
  _, loaded = models.load_hf_checkpoint(str(tmp_path / "hf"))
  assert _max_diff(loaded, base) == 0.0


def _smoke(steps, scan_layers):
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.steps = steps
  cfg.model.scan_layers = scan_layers
  cfg.mesh.update(data=2, fsdp=2, tensor=2)  # the layer axis of a sharded stack
  return cfg


def test_checkpoint_restores_and_resumes_with_the_other_layout(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train(_smoke(1, False), workdir)  # checkpoints hold unrolled layers
  unrolled = runs.load_run(workdir)
  scanned = runs.load_run(workdir, overrides={"model.scan_layers": True})
  assert models.layout_of(unrolled.params) is False and models.layout_of(scanned.params) is True
  assert _max_diff(models.to_layout(scanned.params, False), unrolled.params) == 0.0
  # The run goes on scanned from the unrolled checkpoint, then back unrolled.
  trainer.train(_smoke(2, True), workdir)
  trainer.train(_smoke(3, False), workdir)
  rows = [r for r in metrics.read_metrics(workdir) if r.get("phase") == "grpo" and "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3], rows
  assert all(np.isfinite(r["loss"]) for r in rows)
  final = runs.load_run(workdir)
  assert final.step > unrolled.step and models.layout_of(final.params) is False
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))
