"""Continuous batching (slots.py): every sample's tokens equal the static batch's and its log-probs
within 1e-6, whatever the slot count, on every family, with each decoding; refills, the ring's
wrap and the tail's compaction exercised; meshes; the settings' checks."""

import jax
import numpy as np
import pytest

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import models, sampling, settings, sharding, slots

FAMILIES = ["tiny_qwen2", "tiny_qwen3", "tiny_llama", "tiny_gemma3"]
DECODINGS = {
    "greedy": dict(temperature=0.0),
    "filtered": dict(temperature=0.8, top_k=9, top_p=0.9, min_p=0.05),
}


def _case(family):
  config = models.get_config(family, dtype="float32")
  params = models.init_params(config, jax.random.key(1))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config.vocab_size, (4, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0  # a left-padded prompt
  ids = ids * mask
  # 8 stop ids of 128: lengths spread over the budget, some rows at it.
  eos = tuple(range(config.vocab_size - 8, config.vocab_size))
  return config, params, ids, mask, eos


def _assert_same(want, got):
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_array_equal(got.truncated, want.truncated)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6, rtol=0)


# Every family with the filters (Gemma 3: its sliding windows too), and greedy.
CASES = [(f, "filtered") for f in FAMILIES] + [("tiny_gemma3", "greedy")]


@pytest.mark.parametrize("family, decoding", CASES)
def test_continuous_gives_the_static_samples(family, decoding):
  """W = 2 slots (refills; the ring wraps: more tokens than 2 x the budget) and 0 (one per row
  of 32: the tail compacted to 16) against the static batch."""
  config, params, ids, mask, eos = _case(family)
  N = 20
  kw = dict(num_samples=8, max_new_tokens=N, eos_ids=eos, pad_id=0, rng=jax.random.key(3),
            **DECODINGS[decoding])
  want = sampling.sample(params, config, ids, mask, **kw)
  lengths = np.asarray(want.lengths)
  if decoding != "greedy":  # a greedy group decodes its prompt's one completion G times
    assert lengths.sum() > 2 * N and len(set(lengths.tolist())) > 3, lengths
  for width in (2, 0):
    got = sampling.sample(params, config, ids, mask, continuous=True, decode_slots=width, **kw)
    _assert_same(want, got)


def test_refills_and_compaction_with_rows_at_the_budget():
  """W = 32 of 40 rows: refills, then compaction to 16, with rows that end early and rows that
  reach the budget."""
  config, params, ids, mask, eos = _case("tiny_qwen2")
  kw = dict(num_samples=10, max_new_tokens=24, eos_ids=eos, pad_id=0, rng=jax.random.key(7))
  want = sampling.sample(params, config, ids, mask, **kw)
  lengths = np.asarray(want.lengths)
  assert np.any(want.truncated) and lengths.min() < 24, lengths
  _assert_same(want, sampling.sample(params, config, ids, mask, continuous=True,
                                     decode_slots=32, **kw))


def test_samples_ending_at_their_first_token_and_a_budget_of_one():
  """A stop id as every first token (each sample ends at its prefill's draw: its slot is
  freed without decoding), and N = 1 (no decode step at all)."""
  config, params, ids, mask, _ = _case("tiny_qwen2")
  kw = dict(num_samples=4, temperature=0.0, pad_id=0, rng=jax.random.key(0))
  firsts = np.asarray(sampling.sample(params, config, ids, mask, max_new_tokens=1, **kw).tokens)
  eos = tuple(sorted(set(firsts[:4, 0].tolist())))  # prompt 0's greedy first token
  for n in (1, 6):
    want = sampling.sample(params, config, ids, mask, max_new_tokens=n, eos_ids=eos, **kw)
    assert np.asarray(want.lengths)[:4].tolist() == [1] * 4
    got = sampling.sample(params, config, ids, mask, max_new_tokens=n, eos_ids=eos,
                          continuous=True, decode_slots=3, **kw)
    _assert_same(want, got)


def test_widths_halve_down_to_a_quarter_and_sixteen_slots():
  s = lambda w: sampling.SamplingSettings(num_samples=2, max_new_tokens=4, continuous=True,  # noqa: E731
                                          decode_slots=w)
  assert slots.widths(s(0), 128) == [128, 64, 32]
  assert slots.widths(s(48), 128) == [48, 24]
  assert slots.widths(s(500), 32) == [32, 16]
  assert slots.widths(s(40), 48) == [40, 20]
  assert slots.widths(s(0), 24) == [24]
  assert slots.widths(s(3), 16) == [3]


def test_mesh_gives_the_single_device_samples():
  assert jax.device_count() == 8
  config, params, _, _, eos = _case("tiny_qwen2")
  rng = np.random.default_rng(5)
  ids = rng.integers(3, config.vocab_size, (8, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  base = dict(num_samples=2, max_new_tokens=9, temperature=1.0, eos_ids=eos)
  want = sampling.make_sampler(config, sampling.SamplingSettings(**base))(
      params, ids, mask, jax.random.key(4))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = jax.device_put(params, sharding.tree_shardings(
      mesh, models.param_logical_axes(config), params))
  for width in (0, 4):  # one slot per row; 4 slots, refilled
    got = sampling.make_sampler(config, sampling.SamplingSettings(
        **base, continuous=True, decode_slots=width), mesh)(
            sharded, *sharding.shard_batch((ids, mask), mesh), jax.random.key(4))
    assert got.tokens.sharding.spec[0] == sharding.BATCH_AXES
    _assert_same(jax.device_get(want), jax.device_get(got))


@pytest.mark.parametrize("field, value, message", [
    ("batching", "dynamic", "config.grpo.batching = 'dynamic'"),
    ("decode_slots", -1, "config.grpo.decode_slots = -1"),
])
def test_bad_batching_settings_name_the_field(field, value, message):
  cfg = arithmetic_config.get_config("smoke")
  setattr(cfg.grpo, field, value)
  with pytest.raises(settings.ConfigError, match=message):
    settings.from_config(cfg, 1)


def test_the_config_reaches_the_sampler():
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.decode_slots = 16
  r = settings.from_config(cfg, 1).rollout
  assert (r.batching, r.decode_slots) == ("continuous", 16)
