"""Sampler: greedy parity (transformers, no-cache loop), the sampling distribution and its filters,
EOS handling, padding invariance, log-probs == the trainer's, determinism, meshes, one compile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import draws, models, sampling, sharding, train_step

CONFIG = models.get_config("tiny_qwen2")


def _sharp_params(config, seed=0, scale=0.15):
  """Random weights of O(0.1) so the logits have clear maxima (greedy ties would be noise)."""
  params = models.init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  new = [jax.random.normal(k, x.shape) * scale + (1.0 if x.ndim == 1 else 0.0)
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, new)


PARAMS = _sharp_params(CONFIG)


def _prompts(lengths, T, seed=0, vocab=CONFIG.vocab_size):
  """Left-padded prompts [P, T] and mask (pad id 0)."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(T)[None] >= T - np.asarray(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(rng.integers(3, vocab, (len(lengths), T)) * mask), jnp.asarray(mask)


_compute_logits = jax.jit(models.compute_logits, static_argnums=0)


def _naive_greedy(params, config, prompt_1xT, n, width):
  """Full forward over the whole (right-padded, fixed-length `width`) sequence each step, no
  cache (one compile for every prompt length)."""
  T = prompt_1xT.shape[1]
  seq = np.zeros((1, width), np.int32)
  seq[:, :T] = prompt_1xT
  for i in range(n):
    mask = (np.arange(width) < T + i).astype(np.int32)[None]
    logits = _compute_logits(config, params, jnp.asarray(seq), jnp.asarray(mask))
    seq[0, T + i] = int(jnp.argmax(logits[0, T + i - 1]))
  return seq[0, T:T + n].tolist()


# ----------------------------------------------------------------------------- greedy parity


def test_greedy_equals_naive_no_cache_decode_and_padding_is_invisible():
  tokens, mask = _prompts([5, 3], 5)
  out = sampling.sample(PARAMS, CONFIG, tokens, mask, rng=jax.random.key(0), num_samples=2,
                        max_new_tokens=12, temperature=0.0, block_size=5)
  for p in range(2):
    prompt = np.asarray(tokens[p])[np.asarray(mask[p]) == 1][None]
    want = _naive_greedy(PARAMS, CONFIG, prompt, 12, width=5 + 12)
    np.testing.assert_array_equal(out.tokens[2 * p], want)
    np.testing.assert_array_equal(out.tokens[2 * p + 1], want)  # greedy: the group agrees
    # The same prompt without padding, alone (batch size 1): same completion.
    alone = sampling.sample(PARAMS, CONFIG, jnp.asarray(prompt), jnp.ones_like(prompt),
                            rng=jax.random.key(0), num_samples=1, max_new_tokens=12,
                            temperature=0.0, block_size=5)
    np.testing.assert_array_equal(alone.tokens[0], want)
    np.testing.assert_allclose(alone.logprobs[0], out.logprobs[2 * p], atol=1e-5)
  assert len(set(map(tuple, np.asarray(out.tokens[::2]).tolist()))) == 2  # prompts differ


def test_greedy_equals_transformers_generate(tmp_path):
  import torch  # the test extra installs it: a missing one must fail, not skip
  import transformers
  torch.manual_seed(0)
  hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=True, rope_theta=1e4, bos_token_id=None, eos_token_id=None,
      pad_token_id=0)).to(torch.float32)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(0.15 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
  hf.eval().save_pretrained(str(tmp_path), safe_serialization=True)
  config, params = models.load_hf_checkpoint(str(tmp_path))
  tokens, mask = _prompts([7, 4, 6], 7, seed=3, vocab=128)
  n = 16
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(np.asarray(tokens)),
                      attention_mask=torch.tensor(np.asarray(mask)), do_sample=False,
                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
  ref = ref[:, tokens.shape[1]:].numpy()
  out = sampling.sample(params, config, tokens, mask, rng=jax.random.key(0), num_samples=1,
                        max_new_tokens=n, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


# ----------------------------------------------------------------------------- distribution

# Logits of a 10-token vocabulary with well separated probabilities (so filters have clear
# boundaries): sorted probabilities at T=1 ~ .39 .24 .14 .09 .05 .03 .02 .012 .007 .004
_LOGITS = np.array([0.0, 2.0, -1.5, 1.5, -0.5, 3.0, 1.0, -2.0, 2.5, 0.5], np.float32)


def _expected(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, *,
              top_p_excludes_boundary=False):
  """Reference: NumPy softmax(logits / T) after the filters (transformers' order and ties)."""
  z = logits / temperature
  keep = np.ones_like(z, bool)
  if top_k is not None:
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  if top_p is not None:
    zz = np.where(keep, z, -np.inf)
    p = np.exp(zz - zz.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    kept = before + (p[order] if top_p_excludes_boundary else 0) < top_p
    keep &= np.isin(np.arange(len(z)), order[kept])
  if min_p is not None:
    zz = np.where(keep, z, -np.inf)
    p = np.exp(zz - zz.max())
    keep &= p >= min_p
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  return p / p.sum()


def _chi2(counts, expected_p):
  """Pearson statistic; a token with expected 0 but counts > 0 gives infinity."""
  n = counts.sum()
  e = expected_p * n
  if np.any((e == 0) & (counts > 0)):
    return np.inf
  nz = e > 0
  return float(np.sum((counts[nz] - e[nz]) ** 2 / e[nz]))


_N_DRAWS = 200_000
_CHI2_OK = 35.0  # > the 0.9999 quantile of chi2 with 9 dof (33.7); the seed is fixed anyway

FILTER_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=3),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.5, top_k=6, top_p=0.8, min_p=0.1),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sample_tokens_follow_the_filtered_distribution(case):
  settings = sampling.SamplingSettings(num_samples=1, max_new_tokens=1, **case)
  logits = jnp.broadcast_to(jnp.asarray(_LOGITS), (_N_DRAWS, len(_LOGITS)))
  tokens, logprobs = jax.jit(lambda l, u: draws.sample_tokens(l, u, settings))(
      logits, jax.random.uniform(jax.random.key(7), (_N_DRAWS, 2)))
  counts = np.bincount(np.asarray(tokens), minlength=len(_LOGITS))
  assert _chi2(counts, _expected(_LOGITS, **case)) < _CHI2_OK
  # Log-probs: the unfiltered tempered distribution, whatever the filter.
  z = _LOGITS / case["temperature"]
  full = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
  np.testing.assert_allclose(np.asarray(logprobs), full[np.asarray(tokens)], atol=1e-6)


@pytest.mark.parametrize("case", [c for c in FILTER_CASES if c.get("top_p")],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_top_p_from_the_most_likely_candidates_draws_the_same_distribution(case, monkeypatch):
  """With 4 candidates instead of the whole (10-token) vocabulary: top-p's threshold from the
  candidates when they hold the mass, else from the full sort; the draws follow the same
  filtered distribution."""
  monkeypatch.setattr(draws, "TOP_P_CANDIDATES", 4)
  test_sample_tokens_follow_the_filtered_distribution(case)


def test_top_p_threshold_from_candidates_equals_the_full_sort():
  """Peaked rows (the candidates hold the mass) and flat rows (they do not: the full sort):
  the threshold is the full sort's, row for row."""
  rng = np.random.default_rng(0)
  peaked = rng.normal(size=(16, 5000)).astype(np.float32) * 4.0
  flat = rng.normal(size=(16, 5000)).astype(np.float32) * 0.01
  threshold = jax.jit(draws.top_p_threshold, static_argnums=(1, 2))
  for z in (peaked, flat, np.concatenate([peaked[:8], flat[:8]])):
    for top_p in (0.3, 0.9, 0.95):
      want = np.asarray(draws._top_p_threshold_sorted(jnp.asarray(z), top_p))  # pylint: disable=protected-access
      np.testing.assert_array_equal(np.asarray(threshold(jnp.asarray(z), top_p, 256)), want)
  p = np.exp(peaked * 1.0 - peaked.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  assert (np.sort(p, -1)[:, ::-1][:, :256].sum(-1) >= 0.95).all()  # the fast path ran there


@pytest.mark.parametrize("case,wrong", [
    (2, dict(temperature=2.0, top_k=2)), (2, dict(temperature=2.0, top_k=4)),  # off-by-one k
    (3, dict(temperature=1.0, top_p=0.7, top_p_excludes_boundary=True)),
    (4, dict(temperature=1.0, min_p=0.3)), (0, dict(temperature=0.9)),
])
def test_distribution_test_detects_wrong_filters(case, wrong):
  """The statistic above rejects near-miss filters (so the test can fail)."""
  settings = sampling.SamplingSettings(num_samples=1, max_new_tokens=1, **FILTER_CASES[case])
  logits = jnp.broadcast_to(jnp.asarray(_LOGITS), (_N_DRAWS, len(_LOGITS)))
  tokens, _ = jax.jit(lambda l, u: draws.sample_tokens(l, u, settings))(
      logits, jax.random.uniform(jax.random.key(7), (_N_DRAWS, 2)))
  counts = np.bincount(np.asarray(tokens), minlength=len(_LOGITS))
  assert _chi2(counts, _expected(_LOGITS, **wrong)) > 10 * _CHI2_OK


def test_inverse_cdf_is_exact_on_large_padded_vocabularies():
  """Two-level draw with a vocabulary that is not a multiple of the block width."""
  V = 1000
  w = np.zeros(V, np.float32)
  w[[0, 37, 500, 999]] = [1.0, 2.0, 3.0, 4.0]
  u = jax.random.uniform(jax.random.key(0), (100_000, 2))
  tokens = np.asarray(jax.jit(draws.inverse_cdf_sample)(
      jnp.broadcast_to(jnp.asarray(w), (100_000, V)), u))
  counts = np.bincount(tokens, minlength=V)
  assert counts.sum() == counts[[0, 37, 500, 999]].sum()
  assert _chi2(counts, w / w.sum()) < 25.0


def test_first_tokens_of_sample_follow_the_model_distribution():
  """End to end: G draws of one prompt's first token ~ softmax(logits / T) after top-k."""
  tokens, mask = _prompts([6], 6)
  G, T, k = 20_000, 0.8, 5
  out = sampling.sample(PARAMS, CONFIG, tokens, mask, rng=jax.random.key(1), num_samples=G,
                        max_new_tokens=1, temperature=T, top_k=k)
  logits = np.asarray(models.compute_logits(CONFIG, PARAMS, tokens, mask))[0, -1]
  counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=CONFIG.vocab_size)
  assert _chi2(counts, _expected(logits, T, top_k=k)) < 25.0  # 4 dof
  assert _chi2(counts, _expected(logits, T, top_k=k - 1)) > 250.0


# ----------------------------------------------------------------------------- EOS, masks


def test_eos_stops_rows_independently():
  tokens, mask = _prompts([4, 2, 4], 4, seed=1)
  kw = dict(rng=jax.random.key(3), num_samples=4, max_new_tokens=10, temperature=1.0,
            block_size=4, pad_id=0)
  free = sampling.sample(PARAMS, CONFIG, tokens, mask, **kw)
  free_tokens = np.asarray(free.tokens)
  assert int(free.mask.min()) == 1 and bool(free.truncated.all())
  # Two EOS ids that occur mid-way in some rows (same key: same streams until the EOS).
  eos = (int(free_tokens[0, 2]), int(free_tokens[5, 6]))
  out = sampling.sample(PARAMS, CONFIG, tokens, mask, eos_ids=eos, **kw)
  lengths = []
  for row in free_tokens:
    hits = np.flatnonzero(np.isin(row, eos))
    lengths.append(hits[0] + 1 if len(hits) else 10)
  lengths = np.array(lengths)
  assert 1 < len(set(lengths.tolist())) and (lengths < 10).any() and (lengths == 10).any()
  np.testing.assert_array_equal(out.lengths, lengths)
  np.testing.assert_array_equal(out.truncated, lengths == 10)
  steps = np.arange(10)[None]
  np.testing.assert_array_equal(out.mask, (steps < lengths[:, None]).astype(np.int32))
  np.testing.assert_array_equal(out.tokens, np.where(steps < lengths[:, None], free_tokens, 0))
  np.testing.assert_array_equal(np.asarray(out.logprobs)[steps >= lengths[:, None]], 0.0)
  np.testing.assert_allclose(out.logprobs, free.logprobs * np.asarray(out.mask), atol=1e-6)


def test_all_rows_done_exits_early_with_pads():
  tokens, mask = _prompts([3], 3)
  greedy = sampling.sample(PARAMS, CONFIG, tokens, mask, rng=jax.random.key(0), num_samples=1,
                           max_new_tokens=9, temperature=0.0, block_size=3)
  eos = int(greedy.tokens[0, 1])
  out = sampling.sample(PARAMS, CONFIG, tokens, mask, rng=jax.random.key(0), num_samples=1,
                        max_new_tokens=9, temperature=0.0, block_size=3, eos_ids=(eos,),
                        pad_id=CONFIG.vocab_size - 1)
  first = int(np.flatnonzero(np.asarray(greedy.tokens[0]) == eos)[0])
  assert int(out.lengths[0]) == first + 1 and not bool(out.truncated[0])
  assert (np.asarray(out.tokens[0, first + 1:]) == CONFIG.vocab_size - 1).all()


# ----------------------------------------------------------------------------- log-probs


# The trainer's teacher-forced log-probs, jitted once for all temperatures (a traced argument).
_sequence_logprobs = jax.jit(lambda params, batch, temperature: train_step.sequence_logprobs(
    params, batch, model_config=CONFIG, temperature=temperature))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                dict(temperature=1.3, top_p=0.9, min_p=0.05)])
def test_logprobs_equal_trainer_teacher_forced_logprobs(kw):
  tokens, mask = _prompts([6, 3, 5], 6, seed=2)
  G, N = 3, 11
  out = sampling.sample(PARAMS, CONFIG, tokens, mask, rng=jax.random.key(5), num_samples=G,
                        max_new_tokens=N, eos_ids=(7, 11), block_size=4, **kw)
  batch = train_step.TrainBatch(
      prompt_tokens=jnp.repeat(tokens, G, axis=0), prompt_mask=jnp.repeat(mask, G, axis=0),
      completion_tokens=out.tokens, completion_mask=out.mask,
      advantages=jnp.zeros((tokens.shape[0] * G,)))
  want = _sequence_logprobs(PARAMS, batch, kw["temperature"])
  valid = np.asarray(out.mask) == 1
  assert np.abs(np.asarray(want)[valid]).max() > 1.0  # sharp model: a meaningful comparison
  np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(want)[valid],
                             atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- keys, compiles


def test_keys_same_samples_same_key_fresh_randomness_per_token():
  tokens, mask = _prompts([4, 4], 4)
  flat = jax.tree.map(lambda x: x * 0.01, PARAMS)  # near-uniform next-token distribution
  run = lambda key: np.asarray(sampling.sample(
      flat, CONFIG, tokens, mask, rng=key, num_samples=4, max_new_tokens=16).tokens)
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.9
  assert len({tuple(r) for r in a.tolist()}) == a.shape[0]  # every row of a group differs
  # Near-uniform over 128 tokens: no stream repeats a token pattern step after step.
  assert (a[:, 1:] == a[:, :-1]).mean() < 0.1
  assert len(np.unique(a)) > 60


def test_a_samples_tokens_depend_on_its_key_id_and_position_only():
  """Token t of sample i is drawn with the uniforms of fold_in(fold_in(key, i), t), whatever
  slot or step it runs in: recomputed here for the first two tokens of every sample from the
  model's logits; prompt [a]'s samples are the same alone and as the first group of [a, b]."""
  flat = jax.tree.map(lambda x: x * 0.01, PARAMS)  # near-uniform next-token distribution
  both, mask_both = _prompts([4, 4], 4)
  key, G = jax.random.key(3), 3
  run = lambda ids, mask, n=12: sampling.sample(  # noqa: E731
      flat, CONFIG, ids, mask, rng=key, num_samples=G, max_new_tokens=n)
  pair = run(both, mask_both)
  np.testing.assert_array_equal(np.asarray(pair.tokens)[:G],
                                np.asarray(run(both[:1], mask_both[:1]).tokens))
  out = run(both, mask_both, n=2)
  for t in range(2):  # the logits of token t: the prompt, then the sampled tokens before it
    seq = jnp.concatenate([jnp.repeat(both, G, axis=0), out.tokens[:, :t]], axis=1)
    logits = models.compute_logits(CONFIG, flat, seq)[:, -1]
    for i in range(2 * G):
      u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), t), (1, 2))
      weights = jnp.exp(logits[i:i + 1] - jnp.max(logits[i]))
      assert int(draws.inverse_cdf_sample(weights, u)[0]) == int(out.tokens[i, t]), (i, t)


def test_make_sampler_compiles_once():
  settings = sampling.SamplingSettings(num_samples=2, max_new_tokens=5, eos_ids=(3,))
  fn = sampling.make_sampler(CONFIG, settings)
  for seed in range(3):
    tokens, mask = _prompts([4, 2], 4, seed=seed)
    out = fn(PARAMS, tokens, mask, jax.random.key(seed))
  jax.block_until_ready(out)
  assert fn._cache_size() == 1
  assert out.tokens.shape == (4, 5) and out.tokens.dtype == jnp.int32


def test_settings_reject_bad_values():
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplingSettings(num_samples=1, max_new_tokens=1, temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingSettings(num_samples=1, max_new_tokens=1, top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampling.SamplingSettings(num_samples=1, max_new_tokens=1, top_k=0)
  with pytest.raises(ValueError, match="eos_ids"):
    sampling.SamplingSettings(num_samples=1, max_new_tokens=1, eos_ids=[1])
  with pytest.raises(ValueError, match="num_samples"):
    sampling.SamplingSettings(num_samples=0, max_new_tokens=1)


# ----------------------------------------------------------------------------- meshes


@functools.lru_cache(maxsize=None)
def _single_device_samples(settings):
  """The unsharded sampler's output for the mesh tests' prompts (computed once per settings)."""
  tokens, mask = _prompts([5, 3, 4, 5, 2, 5, 1, 4], 5)
  return jax.device_get(sampling.make_sampler(CONFIG, settings)(PARAMS, tokens, mask,
                                                                jax.random.key(4)))


@pytest.mark.parametrize("shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_mesh_gives_the_single_device_samples(shape):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(**shape)
  axes = models.param_logical_axes(CONFIG)
  params = jax.device_put(PARAMS, sharding.tree_shardings(mesh, axes, PARAMS))
  tokens, mask = _prompts([5, 3, 4, 5, 2, 5, 1, 4], 5)
  for temperature in (0.0, 1.0):
    settings = sampling.SamplingSettings(num_samples=2, max_new_tokens=7, block_size=3,
                                         temperature=temperature, eos_ids=(5,))
    want = _single_device_samples(settings)
    got = sampling.make_sampler(CONFIG, settings, mesh)(params, tokens, mask, jax.random.key(4))
    assert got.tokens.sharding.spec[0] == sharding.BATCH_AXES
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


@pytest.mark.parametrize("num_ids", [1, 3, 8, 9, 1500])
def test_is_eos_matches_numpy_isin_for_short_and_long_stop_lists(num_ids):
  """Up to 8 ids: one compare each; more: a constant lookup table (a chain of 1500 compares in
  the decode loop took minutes to compile on a GPU). Ids out of the table's range, negative
  pads included, are never EOS."""
  rng = np.random.default_rng(num_ids)
  tokens = rng.integers(-3, 5000, size=(16, 40))
  eos_ids = tuple(int(i) for i in rng.choice(np.arange(4, 4000), num_ids, replace=False))
  tokens[0, :num_ids] = eos_ids[:40]  # every row of the test sees some EOS
  got = np.asarray(sampling.is_eos(jnp.asarray(tokens), eos_ids))
  np.testing.assert_array_equal(got, np.isin(tokens, eos_ids))
  assert got.any()
