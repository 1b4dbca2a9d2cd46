"""Group-shared prompt prefix (`forward(..., prefix=)`) == the prompt's KV replicated per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models

FAMILIES = ["tiny_qwen2", "tiny_qwen3", "tiny_llama", "tiny_gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_shared_decode_equals_replicated_cache(name):
  """P left-padded prompts, N rows each, decode T tokens: shared prefix vs replicated prompt KV."""
  config = models.get_config(name)
  params = models.init_params(config, jax.random.key(0))
  P, N, R, T = 3, 4, 6, 5  # prompts, rows per prompt, prompt slots, decoded tokens
  B = P * N
  rng = np.random.default_rng(0)
  lengths = np.array([6, 2, 4])
  prompt_mask = (np.arange(R)[None] >= R - lengths[:, None]).astype(np.int32)
  prompt = rng.integers(1, config.vocab_size, (P, R)) * prompt_mask
  prompt_pos = np.maximum(np.cumsum(prompt_mask, 1) - 1, 0)
  new_tokens = jnp.asarray(rng.integers(1, config.vocab_size, (B, T)))
  new_pos = jnp.asarray(np.repeat(lengths, N)[:, None] + np.arange(T)[None])

  @jax.jit
  def replicated(params):
    cache = models.init_cache(config, B, R + T)
    rep = lambda x: jnp.repeat(jnp.asarray(x), N, axis=0)
    _, cache = models.forward(params, config, rep(prompt), rep(prompt_pos), rep(prompt_mask),
                              cache)
    out = []
    for t in range(T):
      tok = new_tokens[:, t:t + 1]
      logits, cache = models.forward(params, config, tok, new_pos[:, t:t + 1],
                                     jnp.ones_like(tok), cache)
      out.append(logits)
    return jnp.concatenate(out, 1)

  @jax.jit
  def shared(params):
    prefix = models.init_cache(config, P, R)
    _, prefix = models.forward(params, config, jnp.asarray(prompt), jnp.asarray(prompt_pos),
                               jnp.asarray(prompt_mask), prefix)
    cache = models.init_cache(config, B, T)
    out = []
    for t in range(T):
      tok = new_tokens[:, t:t + 1]
      logits, cache = models.forward(params, config, tok, new_pos[:, t:t + 1],
                                     jnp.ones_like(tok), cache, prefix=prefix)
      out.append(logits)
    # Several tokens at once over the prefix (no own cache) == the step-by-step logits.
    multi, _ = models.forward(params, config, new_tokens, new_pos, jnp.ones_like(new_tokens),
                              prefix=prefix)
    return jnp.concatenate(out, 1), multi

  want = replicated(params)
  got, multi = shared(params)
  assert float(jnp.max(jnp.abs(want))) > 1e-3  # not trivially zero
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  np.testing.assert_allclose(multi, want, atol=2e-6, rtol=0)
