"""Sliding windows count real tokens: a cache with holes (rows that wait, padded blocks), the
single-turn sampler on left-padded prompts and multi-turn episodes with tool calls all give the
log-probs of the trainer's teacher-forced, compacted sequence, on every model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, multiturn, sampling, train_step, turn_programs
from grpo_jax.multiturn import EnvStep
from grpo_jax.sampling import SamplingSettings

import test_multiturn  # tests/ is on sys.path (rootdir-less import mode), as test_tools does

FAMILIES = ["tiny_qwen2", "tiny_qwen3", "tiny_llama", "tiny_gemma3"]


def _config(name, **overrides):
  """The preset; Gemma 3's window of 3 is exceeded many times over by these short sequences."""
  if name == "tiny_gemma3":
    overrides.setdefault("sliding_window", 3)
  return models.get_config(name, max_position_embeddings=512, **overrides)


def _sharp_params(config, seed=0, scale=0.3):
  """Weights of O(0.3), not the init's 0.02: peaked attention, so that one key wrongly inside
  or outside a window moves the log-probs far beyond the tolerance."""
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(seed)  # numpy: no compile per parameter shape
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype), shapes)


_sequence_logprobs = jax.jit(
    lambda params, batch, config: train_step.sequence_logprobs(params, batch, model_config=config),
    static_argnums=2)


def _teacher_forced(params, config, prompt_ids, prompt_mask, G, tokens_BxC, mask_BxC):
  batch = train_step.TrainBatch(
      prompt_tokens=np.repeat(prompt_ids, G, 0), prompt_mask=np.repeat(prompt_mask, G, 0),
      completion_tokens=tokens_BxC, completion_mask=mask_BxC,
      advantages=np.zeros(tokens_BxC.shape[0], np.float32))
  return np.asarray(_sequence_logprobs(params, batch, config))


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_with_holes_equals_the_compacted_forward(name):
  """Left-padded prompts prefilled, then one-token steps and a padded block written into a
  cache with holes (mask 0 slots, different per row), with and without a shared prefix: the
  logits of real tokens equal one forward over the compacted sequence."""
  config = _config(name)
  params = _sharp_params(config)
  R, S, N = 6, 11, 2                  # prompt slots, own cache slots, rows per prompt
  lengths_P = np.array([6, 3])
  P, B = len(lengths_P), len(lengths_P) * N
  rng = np.random.default_rng(0)
  prompt_mask = (np.arange(R)[None] >= R - lengths_P[:, None]).astype(np.int32)
  prompt = rng.integers(1, config.vocab_size, (P, R)) * prompt_mask
  prompt_pos = np.maximum(np.cumsum(prompt_mask, 1) - 1, 0)
  lengths = np.repeat(lengths_P, N)
  # Writes: 3 one-token steps, a block of 5 (pending slot, then left-aligned tokens), 3 steps.
  feed_BxS = np.array([[1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1],   # a group's rows differ
                       [0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1],
                       [1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1],
                       [0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0]], np.int32)
  assert feed_BxS.shape == (B, S)
  tokens_BxS = rng.integers(1, config.vocab_size, (B, S)) * feed_BxS
  pos_BxS = lengths[:, None] + np.cumsum(feed_BxS, 1) - feed_BxS

  def decode(params, cache, prefix):
    def write(cache, sl):  # one forward of the slots `sl`
      logits, cache = models.forward(params, config, tokens_BxS[:, sl], pos_BxS[:, sl],
                                     feed_BxS[:, sl], cache, prefix=prefix)
      return cache, logits

    def steps(cache, start, n):  # n one-token forwards, traced once
      xs = tuple(jnp.asarray(x[:, start:start + n].T[..., None])
                 for x in (tokens_BxS, pos_BxS, feed_BxS))
      cache, logits_NxBx1xV = jax.lax.scan(
          lambda c, x: models.forward(params, config, *x, c, prefix=prefix)[::-1], cache, xs)
      return cache, jnp.swapaxes(logits_NxBx1xV[:, :, 0], 0, 1)

    cache, a = steps(cache, 0, 3)
    cache, b = write(cache, slice(3, 8))
    cache, c = steps(cache, 8, 3)
    return jnp.concatenate([a, b, c], 1)

  @jax.jit
  def in_one_cache_and_over_a_prefix(params):
    rep = lambda x: np.repeat(x, N, axis=0)  # noqa: E731
    cache = models.init_cache(config, B, R + S)
    _, cache = models.forward(params, config, rep(prompt), rep(prompt_pos), rep(prompt_mask),
                              cache)
    prefix = models.init_cache(config, P, R)
    _, prefix = models.forward(params, config, prompt, prompt_pos, prompt_mask, prefix)
    return decode(params, cache, None), decode(params, models.init_cache(config, B, S), prefix)

  n_B = feed_BxS.sum(1)
  compact = np.zeros((B, R + S), np.int32)
  compact_mask = np.zeros((B, R + S), np.int32)
  for b in range(B):
    compact[b, :R] = prompt[b // N]
    compact[b, R:R + n_B[b]] = tokens_BxS[b, feed_BxS[b] > 0]
    compact_mask[b, :R + n_B[b]] = prompt_mask[b // N].tolist() + [1] * n_B[b]
  compact_pos = np.maximum(np.cumsum(compact_mask, 1) - 1, 0)
  want, _ = jax.jit(lambda p: models.forward(p, config, compact, compact_pos, compact_mask))(
      params)
  want = np.asarray(want)
  for got in map(np.asarray, in_one_cache_and_over_a_prefix(params)):
    for b in range(B):
      real = got[b, feed_BxS[b] > 0]
      np.testing.assert_allclose(real, want[b, R:R + n_B[b]], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- single turn


def test_sampler_on_left_padded_prompts_gives_the_teacher_forced_logprobs():
  """Gemma 3 only: the families without a window are pinned by tests/test_sampling.py."""
  config = _config("tiny_gemma3")
  params = _sharp_params(config)
  T, G, N = 7, 2, 12
  lengths = np.array([7, 2, 4])
  mask = (np.arange(T)[None] >= T - lengths[:, None]).astype(np.int32)
  ids = np.random.default_rng(1).integers(3, config.vocab_size, (len(lengths), T)) * mask
  out = sampling.sample(params, config, jnp.asarray(ids), jnp.asarray(mask),
                        rng=jax.random.key(2), num_samples=G, max_new_tokens=N, block_size=5)
  want = _teacher_forced(params, config, ids, mask, G, np.asarray(out.tokens),
                         np.asarray(out.mask))
  valid = np.asarray(out.mask) == 1
  assert valid.sum() > 0.8 * valid.size
  np.testing.assert_allclose(np.asarray(out.logprobs)[valid], want[valid], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- multi turn


CHARS, CharTokenizer = test_multiturn.CHARS, test_multiturn.CharTokenizer


class FrequentToolEnv:
  """Every "a" calls the tool: many short turns, rows stop at different steps and wait while
  others generate, and each observation ("<t>\\n", 4 tokens) is padded to a block of 16."""
  stop_strings = ("a",)

  def reset(self, record):
    return 0

  def step(self, state, text):
    return state + 1, EnvStep(f"<{state + 1}>\n")


@pytest.mark.parametrize("name", FAMILIES)
def test_multiturn_logprobs_with_holes_equal_the_teacher_forced_logprobs(name):
  """Episodes of up to 40 real tokens (Gemma 3's window: 3) whose timelines have holes."""
  tok = CharTokenizer()
  config = _config(name, vocab_size=tok.vocab_size)
  params = _sharp_params(config, scale=0.15)
  G, C = 4, 32
  settings = turn_programs.TurnSettings(
      sampling=SamplingSettings(num_samples=G, max_new_tokens=C, pad_id=0),
      stop_seqs=multiturn.stop_sequences(tok, FrequentToolEnv.stop_strings), max_turns=4,
      slots=96, max_observation_tokens=8)
  prompts = ["12", "2<<1 3"]
  ids, mask = tok.encode_batch(prompts, max_length=8)
  ep = multiturn.rollout(turn_programs.make_programs(config, settings), params, ids, mask,
                         jax.random.key(0), FrequentToolEnv(), [{} for _ in prompts], tok,
                         max_workers=2)
  calls = [sum(t.observation is not None for t in row) for row in ep.turns]
  assert sum(calls) >= 4 and min(calls) < max(calls), calls  # holes, and rows out of step
  want = _teacher_forced(params, config, ids, mask, G, ep.tokens_BxC, ep.policy_mask_BxC)
  m = ep.policy_mask_BxC > 0
  np.testing.assert_allclose(ep.logprobs_BxC[m], want[m], atol=2e-5, rtol=1e-5)
