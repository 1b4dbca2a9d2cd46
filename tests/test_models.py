"""Decoder behaviour without transformers: cache == full pass, padding, remat, bf16, axes, config."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models
from grpo_jax.models import attention

FAMILIES = ["tiny_qwen2", "tiny_qwen3", "tiny_llama", "tiny_gemma3"]

# One jitted function per purpose, shared by all tests (config is static).
_forward = jax.jit(models.forward, static_argnums=1, static_argnames="return_hidden")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
  config = models.get_config(request.param)
  return config, models.init_params(config, jax.random.key(0))


def _left_padded_batch(config, rng, lengths, prompt_len, completion_len=0):
  """Row b: prompt_len - lengths[b] pads, lengths[b] prompt tokens, completion_len tokens."""
  B, total = len(lengths), prompt_len + completion_len
  tokens = np.asarray(jax.random.randint(rng, (B, total), 1, config.vocab_size))
  mask = np.zeros((B, total), np.int32)
  for b, n in enumerate(lengths):
    mask[b, prompt_len - n:] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return jnp.asarray(tokens * mask), jnp.asarray(positions), jnp.asarray(mask)


def _make_decode_loop(config):
  """Jitted: feeds tokens_BxN one at a time through a lax.while_loop, returns logits [B, N, V]."""

  @jax.jit
  def run(params, tokens_BxN, positions_BxN, cache):
    B, N = tokens_BxN.shape

    def body(carry):
      i, cache, out_BxNxV = carry
      tok = lax_slice(tokens_BxN, i)
      pos = lax_slice(positions_BxN, i)
      logits, cache = models.forward(params, config, tok, pos, jnp.ones_like(tok), cache)
      return i + 1, cache, jax.lax.dynamic_update_slice(out_BxNxV, logits, (0, i, 0))

    out = jnp.zeros((B, N, config.vocab_size), jnp.float32)
    _, cache, out = jax.lax.while_loop(lambda c: c[0] < N, body, (0, cache, out))
    return out, cache

  return run


def lax_slice(x_BxN, i):
  return jax.lax.dynamic_slice_in_dim(x_BxN, i, 1, axis=1)


def test_init_shapes_and_logical_axes(model):
  config, params = model
  axes = models.param_logical_axes(config)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_axes)
  jax.tree.map(lambda p, a: chex.assert_rank(p, len(a)), params, axes)
  assert axes["embedding"] == ("vocab", "embed")
  E, K, G, D = config.hidden_size, config.num_kv_heads, config.num_groups, config.head_dim
  chex.assert_shape(params["layers_0"]["attn"]["qkv"], (E, K, G + 2, D))
  assert ("lm_head" in params) == (not config.tie_embeddings)
  chex.assert_tree_all_finite(params)


def test_prefill_then_decode_equals_full_forward(model):
  """Left-padded prompts, prefill, then one token per while_loop step == one full pass."""
  config, params = model
  P, N, S = 5, 8, 16  # prompt slots, decoded tokens, cache slots (> P + N: unused slots masked)
  tokens, positions, mask = _left_padded_batch(config, jax.random.key(1), [5, 2, 4], P, N)
  full, _ = _forward(params, config, tokens, positions, mask)

  cache = models.init_cache(config, batch_size=3, max_len=S)
  prefill, cache = _forward(params, config, tokens[:, :P], positions[:, :P], mask[:, :P], cache)
  decoded, cache = _make_decode_loop(config)(params, tokens[:, P:], positions[:, P:], cache)
  assert int(cache.index) == P + N
  np.testing.assert_array_equal(cache.valid_BxS[:, :P + N], mask.astype(bool))
  assert not cache.valid_BxS[:, P + N:].any()

  incremental = jnp.concatenate([prefill, decoded], axis=1)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(incremental)[valid], np.asarray(full)[valid], atol=1e-5)


def test_rope_tables_give_the_computed_rotation(model):
  """`forward(rope_tables=...)` (the decode loops' gathered cos / sin) equals the forward that
  computes them, global and sliding layers alike (Gemma 3), at positions far from 0."""
  config, params = model
  tokens, positions, mask = _left_padded_batch(config, jax.random.key(3), [6, 3], 6)
  positions = positions + 50
  tables = models.rope_tables(config, 64)
  assert (tables[1] is not None) == (config.layer_types is not None
                                     and "sliding_attention" in config.layer_types)
  chex.assert_shape(tables[0], [(64, config.head_dim // 2)] * 2)
  computed, _ = _forward(params, config, tokens, positions, mask)
  from_tables = jax.jit(lambda p, t, q, m, r: models.forward(p, config, t, q, m,
                                                              rope_tables=r)[0])
  gathered = from_tables(params, tokens, positions, mask, tables)
  np.testing.assert_allclose(np.asarray(gathered), np.asarray(computed), rtol=1e-6, atol=1e-6)
  shifted = from_tables(params, tokens, positions.at[:, -1].add(3), mask, tables)  # relative
  assert not np.allclose(np.asarray(shifted), np.asarray(computed), atol=1e-4)  # positions used


def test_padding_does_not_change_valid_logits(model):
  """Right padding (training) and left padding (sampling) give the unpadded logits."""
  config, params = model
  T = 9  # > gemma's sliding window of 4
  tokens, positions, mask = _left_padded_batch(config, jax.random.key(2), [T], T)
  ref, _ = _forward(params, config, tokens, positions, mask)
  pad = jnp.zeros((1, 3), jnp.int32)
  right, _ = _forward(params, config, jnp.concatenate([tokens, pad + 7], 1),
                      jnp.concatenate([positions, pad], 1), jnp.concatenate([mask, pad], 1))
  left, _ = _forward(params, config, jnp.concatenate([pad + 7, tokens], 1),
                     jnp.concatenate([pad, positions], 1), jnp.concatenate([pad, mask], 1))
  np.testing.assert_allclose(right[:, :T], ref, atol=1e-5)
  np.testing.assert_allclose(left[:, 3:], ref, atol=1e-5)


def test_hidden_then_unembed_equals_logits(model):
  config, params = model
  tokens, positions, mask = _left_padded_batch(config, jax.random.key(3), [6, 4], 6)
  logits, _ = _forward(params, config, tokens, positions, mask)
  hidden, _ = _forward(params, config, tokens, positions, mask, return_hidden=True)
  chex.assert_shape(hidden, (2, 6, config.hidden_size))
  np.testing.assert_allclose(models.unembed(params, config, hidden), logits, atol=1e-6)


def test_compute_logits_right_padded():
  config = models.get_config("tiny_qwen2")
  params = models.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, config.vocab_size)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
  logits = models.compute_logits(config, params, tokens, mask)
  chex.assert_shape(logits, (2, 7, config.vocab_size))
  ref = models.compute_logits(config, params, tokens[1:, :4])
  np.testing.assert_allclose(logits[1, :4], ref[0], atol=1e-5)


def test_sliding_window_limits_context():
  """In a sliding-only Gemma model, tokens further back than the window have no influence."""
  config = models.get_config("tiny_gemma3", num_layers=1, layer_types=("sliding_attention",))
  params = models.init_params(config, jax.random.key(0))
  W = config.sliding_window
  tokens = jax.random.randint(jax.random.key(5), (1, 10), 0, config.vocab_size)
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % config.vocab_size)
  a = models.compute_logits(config, params, tokens)
  b = models.compute_logits(config, params, changed)
  np.testing.assert_array_equal(a[0, W:], b[0, W:])  # one layer: receptive field = W
  assert not np.allclose(a[0, W - 1], b[0, W - 1])


def test_remat_same_values_and_grads():
  config = models.get_config("tiny_qwen3")
  params = models.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(6), (2, 6), 0, config.vocab_size)

  def loss(p, c):
    return jnp.mean(models.compute_logits(c, p, tokens) ** 2)

  g0 = jax.grad(loss)(params, config)
  g1 = jax.grad(loss)(params, config.replace(remat=True))
  chex.assert_trees_all_close(g0, g1, atol=1e-6)


def test_bfloat16_close_to_float32():
  config = models.get_config("tiny_gemma3")
  params = models.init_params(config, jax.random.key(0))
  bf16 = config.replace(param_dtype="bfloat16", dtype="bfloat16")
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jax.random.randint(jax.random.key(7), (2, 8), 0, config.vocab_size)
  ref = models.compute_logits(config, params, tokens)
  out = models.compute_logits(bf16, params_bf16, tokens)
  assert out.dtype == jnp.float32
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(out, ref, atol=2e-2)
  # bf16 parameters straight from init, and a bf16 cache.
  p = models.init_params(bf16, jax.random.key(0))
  assert p["embedding"].dtype == jnp.bfloat16
  cache = models.init_cache(bf16, 2, 8)
  assert cache.k_BxKxDxS[0].dtype == jnp.bfloat16


def test_llama3_rope_scaling_changes_low_frequencies_only():
  config = models.get_config("tiny_llama", rope_original_max_position=8192)
  scaled = attention.rope_inv_freq(config, sliding=False)
  plain = attention.rope_inv_freq(config.replace(rope_scaling_type=None), sliding=False)
  assert scaled[0] == plain[0]  # highest frequency kept
  np.testing.assert_allclose(scaled[-1], plain[-1] / config.rope_scaling_factor, rtol=1e-6)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="family"):
    models.get_config("tiny_qwen2", family="mistral")
  with pytest.raises(ValueError, match="rope_scaling_type"):
    models.get_config("tiny_llama", rope_scaling_type="yarn")
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.get_config("tiny_qwen2", num_kv_heads=3)
  with pytest.raises(ValueError, match="preset"):
    models.get_config("qwen9")
  hash(models.get_config("gemma3-1b"))


def test_bench_preset_matches_spec():
  c = models.get_config("bench_qwen2")
  assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
          c.num_kv_heads, c.head_dim, c.tie_embeddings, c.qkv_bias) == (
              4096, 256, 704, 4, 4, 2, 64, True, True)
