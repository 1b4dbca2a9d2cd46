"""LoRA export: the PEFT adapter and the merged checkpoint against transformers + peft (CPU)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (test extra: fail, never skip, when missing)
import transformers  # noqa: E402
import peft  # noqa: E402

from safetensors.numpy import load_file  # noqa: E402

from grpo_jax import models  # noqa: E402
from grpo_jax.models import hf_checkpoint, lora, peft_export  # noqa: E402

PRESETS = ["tiny_qwen2", "tiny_llama", "tiny_gemma3"]


@functools.lru_cache(maxsize=None)
def _lora_model(preset, **overrides):
  """(config, base, adapters): random O(0.1) base weights (norm scales around their identity)
  and random nonzero A and B. Filled in NumPy from `init_params`' shapes (no init compile)."""
  config = models.get_config(preset, lora_rank=4, lora_alpha=8.0, **overrides)
  shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(0))
  rng = np.random.default_rng(0)
  identity = 0.0 if config.family == "gemma3" else 1.0

  def fill(path, x):
    key = jax.tree_util.keystr(path)
    offset = identity if key.endswith("['scale']") else 0.0
    std = 0.2 if key.endswith("_lora_a']") else 0.1
    return jnp.asarray(offset + std * rng.standard_normal(x.shape), x.dtype)

  adapters, base = lora.split(jax.tree_util.tree_map_with_path(fill, shapes))
  return config, base, adapters


def _batch(vocab, lengths, T, seed=0):
  """Right-padded random tokens [B, T] and mask (T > gemma's window of 4)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (len(lengths), T))
  mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return tokens * mask, mask


def _ours(config, params, tokens, mask):
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  logits, _ = models.forward(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                             jnp.asarray(mask, jnp.int32))
  return np.asarray(logits)


def _hf_logits(hf_model, tokens, mask):
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  return out.logits.float().numpy()


def _load_hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()


def _check_peft_parity(config, base, adapters, tmp_path):
  """Exports base + adapter, loads them with transformers + peft, compares logits; returns the
  adapter directory's (adapter_config, tensors)."""
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  models.save_hf_checkpoint(base_dir, lora.base_config(config), base)
  params = lora.combine(base, adapters)
  models.save_peft_adapter(adapter_dir, config, params, base_model_name_or_path=base_dir)
  hf_base = _load_hf(base_dir)
  tokens, mask = _batch(config.vocab_size, [11, 7, 3], 11)
  valid = mask.astype(bool)
  base_logits = _hf_logits(hf_base, tokens, mask)
  peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    adapter_config = json.load(f)
  tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  # Every exported tensor was loaded (no missing or unexpected key), unchanged.
  loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(peft_model).items()}
  assert sorted(loaded) == sorted(tensors)
  for key, value in tensors.items():
    assert value.dtype == np.float32, key
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  ref = _hf_logits(peft_model, tokens, mask)
  ours = _ours(config, params, tokens, mask)
  assert np.abs(ref[valid] - base_logits[valid]).max() > 0.05, "the adapter changes too little"
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
  return adapter_config, tensors


@pytest.mark.parametrize("preset", PRESETS)
def test_peft_adapter_matches_transformers_peft(preset, tmp_path):
  config, base, adapters = _lora_model(preset)
  adapter_config, tensors = _check_peft_parity(config, base, adapters, tmp_path)
  assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
  assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
  assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")
  assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"]
  E, H, K, D, M = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.intermediate_size)
  p = "base_model.model.model.layers.1."
  expect = {"self_attn.q_proj": (E, H * D), "self_attn.k_proj": (E, K * D),
            "self_attn.v_proj": (E, K * D), "self_attn.o_proj": (H * D, E),
            "mlp.gate_proj": (E, M), "mlp.up_proj": (E, M), "mlp.down_proj": (M, E)}
  for module, (n_in, n_out) in expect.items():
    assert tensors[f"{p}{module}.lora_A.weight"].shape == (4, n_in)
    assert tensors[f"{p}{module}.lora_B.weight"].shape == (n_out, 4)
  assert len(tensors) == 14 * config.num_layers

  # The adapter is written in exactly `_to_hf`'s layout: HF(W) + (alpha/r) B_hf @ A_hf = HF(merged).
  base_hf = hf_checkpoint._to_hf(lora.base_config(config), base)
  merged, merged_config = lora.merge(lora.combine(base, adapters), config)
  merged_hf = hf_checkpoint._to_hf(merged_config, merged)
  for i in range(config.num_layers):
    for module in expect:
      key = f"model.layers.{i}.{module}"
      a, b = (tensors[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
      np.testing.assert_allclose(base_hf[key + ".weight"] + 2.0 * b @ a, merged_hf[key + ".weight"],
                                 atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_checkpoint_matches_transformers(preset, tmp_path):
  config, base, adapters = _lora_model(preset)
  params = lora.combine(base, adapters)
  models.save_merged_hf(str(tmp_path), config, params)
  with open(tmp_path / "config.json") as f:
    assert f.read() == json.dumps(hf_checkpoint.config_to_hf(lora.base_config(config)), indent=2)
  tokens, mask = _batch(config.vocab_size, [10, 6], 10, seed=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(_ours(config, params, tokens, mask)[valid],
                             _hf_logits(_load_hf(str(tmp_path)), tokens, mask)[valid],
                             atol=1e-4, rtol=0)


def test_single_target_exports_only_its_modules(tmp_path):
  config, base, adapters = _lora_model("tiny_qwen2", lora_targets=("o",))
  assert {k for layer in adapters.values() for m in layer.values() for k in m} == {
      "o_lora_a", "o_lora_b"}
  adapter_config, tensors = _check_peft_parity(config, base, adapters, tmp_path)
  assert adapter_config["target_modules"] == ["o_proj"]
  assert sorted(tensors) == sorted(
      f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_{x}.weight"
      for i in range(config.num_layers) for x in "AB")


def test_errors(tmp_path):
  lora_config, base, adapters = _lora_model("tiny_qwen2")
  config, params = lora.base_config(lora_config), base
  for save in (models.save_peft_adapter, models.save_merged_hf):
    with pytest.raises(ValueError, match="lora_rank=0"):
      save(str(tmp_path / "out"), config, params)
  assert not os.path.exists(tmp_path / "out")
  # A LoRA config with params that lack its adapters: the missing leaf is named.
  with pytest.raises(ValueError, match="layers_0/attn/qkv_lora_a"):
    models.save_peft_adapter(str(tmp_path / "out"), config.replace(lora_rank=4), params)
  # Adapters of another rank than the config's.
  with pytest.raises(ValueError, match="not rank 8"):
    peft_export.peft_tensors(config.replace(lora_rank=8), lora.combine(base, adapters))
