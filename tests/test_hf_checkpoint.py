"""Hugging Face checkpoints: logits parity with transformers, export round trip, clear errors."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (test extra: fail, never skip, when missing)
import transformers  # noqa: E402

from safetensors.numpy import load_file, save_file  # noqa: E402

from grpo_jax import models  # noqa: E402
from grpo_jax.models import hf_checkpoint  # noqa: E402

_SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _qwen2(tied):
  return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      **_SIZES, tie_word_embeddings=tied, rope_theta=1e4))


def _qwen3():
  return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      **_SIZES, head_dim=16, tie_word_embeddings=True))


def _llama():
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **_SIZES, head_dim=16, tie_word_embeddings=False, rope_theta=5e5, rope_scaling={
          "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))


def _gemma3():
  sizes = _SIZES | dict(num_hidden_layers=3, head_dim=8)
  return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
      **sizes, sliding_window=4, query_pre_attn_scalar=8, final_logit_softcapping=5.0,
      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))


HF_MODELS = {"qwen2_tied": lambda: _qwen2(True), "qwen2_untied": lambda: _qwen2(False),
             "qwen3": _qwen3, "llama3": _llama, "gemma3": _gemma3}


def _randomize(hf_model, seed=0):
  """Weights of O(0.1) (norm scales around their identity) so logits differences are visible."""
  g = torch.Generator().manual_seed(seed)
  gemma = "Gemma" in type(hf_model).__name__
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(0.2 * noise + (0.0 if gemma else 1.0))
      else:
        p.copy_(0.15 * noise)
  return hf_model.eval()


def _batch(vocab, lengths, T, seed=0):
  """Right-padded random tokens [B, T] and mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (len(lengths), T))
  mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return tokens * mask, mask


def _hf_logits(hf_model, tokens, mask):
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_dir(request, tmp_path_factory):
  """(name, saved directory, transformers model) for each family."""
  torch.manual_seed(0)
  hf_model = _randomize(HF_MODELS[request.param]().to(torch.float32))
  hf_model.config._attn_implementation = "eager"
  path = str(tmp_path_factory.mktemp(request.param))
  hf_model.save_pretrained(path, safe_serialization=True)
  return request.param, path, hf_model


def test_logits_match_transformers(hf_dir):
  name, path, hf_model = hf_dir
  config, params = models.load_hf_checkpoint(path)
  assert config.tie_embeddings == ("lm_head" not in params)
  assert config.tie_embeddings == hf_model.config.tie_word_embeddings
  tokens, mask = _batch(config.vocab_size, [12, 9, 5], 12)  # 12 > gemma's window of 4
  ref = _hf_logits(hf_model, tokens, mask)
  ours = np.asarray(models.compute_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
  valid = mask.astype(bool)
  assert np.abs(ref[valid]).max() > 0.5, "logits too small for a meaningful comparison"
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_export_round_trip(hf_dir, tmp_path):
  """save(load(hf)) is bit-exact on reload and loads in transformers with the same logits."""
  name, path, hf_model = hf_dir
  config, params = models.load_hf_checkpoint(path)
  out = str(tmp_path / "export")
  models.save_hf_checkpoint(out, config, params)
  config2, params2 = models.load_hf_checkpoint(out)
  assert config2 == config
  chex.assert_trees_all_equal(params2, params)
  # The exported tensors are exactly the original ones.
  original, exported = load_file(os.path.join(path, "model.safetensors")), load_file(
      os.path.join(out, "model.safetensors"))
  for key, value in exported.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(reloaded) is type(hf_model)
  tokens, mask = _batch(config.vocab_size, [10, 7], 10, seed=1)
  np.testing.assert_allclose(_hf_logits(reloaded.float().eval(), tokens, mask),
                             _hf_logits(hf_model, tokens, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny_qwen3", "tiny_llama", "tiny_gemma3"])
def test_export_of_our_params_matches_transformers(preset, tmp_path):
  config = models.get_config(preset)
  params = models.init_params(config, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  models.save_hf_checkpoint(str(tmp_path), config, params)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").float().eval()
  tokens, mask = _batch(config.vocab_size, [11, 6], 11, seed=2)
  valid = mask.astype(bool)
  ours = np.asarray(models.compute_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
  np.testing.assert_allclose(ours[valid], _hf_logits(hf_model, tokens, mask)[valid], atol=1e-4,
                             rtol=0)
  config2, params2 = models.load_hf_checkpoint(str(tmp_path))
  assert config2 == config
  chex.assert_trees_all_equal(params2, params)


def test_sharded_index_and_sharding_argument(tmp_path):
  hf_model = _randomize(_qwen2(False))
  hf_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  config, params = models.load_hf_checkpoint(str(tmp_path))

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
  rules = {"vocab": "tensor", "mlp": "tensor"}

  def sharding_fn(logical_axes, shape):
    spec = [rules.get(a) for a in logical_axes]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

  _, sharded = models.load_hf_checkpoint(str(tmp_path), sharding=sharding_fn)
  chex.assert_trees_all_equal(jax.device_get(sharded), jax.device_get(params))
  assert sharded["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
  assert sharded["layers_0"]["mlp"]["down"].sharding.spec == jax.sharding.PartitionSpec(
      "tensor", None)
  # A pytree of shardings works too.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  _, placed = models.load_hf_checkpoint(str(tmp_path),
                                        sharding=jax.tree.map(lambda _: replicated, params))
  assert placed["lm_head"].sharding == replicated


def test_bfloat16_load(hf_dir):
  name, path, hf_model = hf_dir
  config, params = models.load_hf_checkpoint(path, dtype=jnp.bfloat16)
  assert config.dtype == config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens, mask = _batch(config.vocab_size, [8, 6], 8)
  ours = np.asarray(models.compute_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
  ref = _hf_logits(hf_model, tokens, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=0.15, rtol=0)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  config = models.get_config("tiny_qwen2")
  models.save_hf_checkpoint(str(path), config, models.init_params(config, jax.random.key(0)))
  return path


def _copy_with(good_dir, tmp_path, *, config_edit=None, tensor_edit=None):
  with open(good_dir / "config.json") as f:
    hf = json.load(f)
  if config_edit:
    config_edit(hf)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  tensors = load_file(str(good_dir / "model.safetensors"))
  if tensor_edit:
    tensor_edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return str(tmp_path)


def test_missing_files(good_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load_hf_checkpoint(str(tmp_path))
  (tmp_path / "config.json").write_text((good_dir / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    models.load_hf_checkpoint(str(tmp_path))


def test_unknown_architecture(good_dir, tmp_path):
  path = _copy_with(good_dir, tmp_path, config_edit=lambda hf: hf.update(
      architectures=["MistralForCausalLM"], model_type="mistral"))
  with pytest.raises(ValueError, match="MistralForCausalLM"):
    models.load_hf_checkpoint(path)


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type='yarn'"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_config_field(good_dir, tmp_path, field, value, match):
  path = _copy_with(good_dir, tmp_path, config_edit=lambda hf: hf.update({field: value}))
  with pytest.raises(ValueError, match=match):
    models.load_hf_checkpoint(path)


def test_wrong_tensor_shape_names_the_tensor(good_dir, tmp_path):
  name = "model.layers.1.mlp.down_proj.weight"

  def edit(tensors):
    tensors[name] = tensors[name][:, :-1].copy()

  path = _copy_with(good_dir, tmp_path, tensor_edit=edit)
  with pytest.raises(ValueError, match=rf"{name} has shape \(32, 63\), expected \(32, 64\)"):
    models.load_hf_checkpoint(path)


def test_missing_tensor_is_named(good_dir, tmp_path):
  name = "model.layers.0.self_attn.k_proj.bias"
  path = _copy_with(good_dir, tmp_path, tensor_edit=lambda t: t.pop(name))
  with pytest.raises(ValueError, match=name):
    models.load_hf_checkpoint(path)


def test_config_round_trip_of_real_presets():
  for name in ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen3-0.6b", "llama3.2-1b", "gemma3-1b"]:
    config = models.get_config(name)
    assert hf_checkpoint.config_from_hf(hf_checkpoint.config_to_hf(config)) == config, name
