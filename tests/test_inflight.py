"""In-flight weight updates (slots.decode_first / decode_rest, grpo.inflight_after): the samples
in progress go on under the new weights, each token tagged with the weights that drew it. An
oracle independent of the slots replays every sample token by token through the model with the
weights its tags name; the corrections on such mixed-version rows equal the NumPy oracle's; in
a run the switch reads the update's own weights; bad combinations name their fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import arithmetic
from grpo_jax import corrections, metrics, models, rollout, sampling, settings, slots, trainer
from grpo_jax import updates
from grpo_jax import train_step as ts
from grpo_jax.draws import row_uniforms, sample_keys, sample_tokens
from grpo_jax.train_step import TrainBatch
from test_corrections import np_weights
from test_slots import _assert_same, _case

N = 20


def _settings(width, eos):
  return sampling.SamplingSettings(num_samples=8, max_new_tokens=N, eos_ids=eos, pad_id=0,
                                   continuous=True, decode_slots=width, block_size=8)


def _inflight(params_a, params_b, config, st, ids, mask, key, after):
  program = slots.make_inflight(config, st, after)
  return program.rest(params_b, program.first(params_a, ids, mask, key), key)


@pytest.mark.parametrize("width, after", [(0, 5)])  # refills: the oracle test below
def test_the_same_weights_give_the_plain_decode(width, after):
  """One slot per row (the tail compacted): the tokens and log-probs of `decode`. With a slot
  per row, token p is drawn at decode step p - 1: tagged 1 from p = after + 1."""
  config, params, ids, mask, eos = _case("tiny_qwen2")
  st, key = _settings(width, eos), jax.random.key(3)
  out = _inflight(params, params, config, st, ids, mask, key, after)
  _assert_same(slots.decode(params, config, st, ids, mask, key), out)
  tags, on = np.asarray(out.versions), np.asarray(out.mask) > 0
  assert 0 < tags[on].sum() < on.sum()
  assert not tags[~on].any()
  if width == 0:
    np.testing.assert_array_equal(tags, (np.arange(N)[None] > after) & on)


def _pick(use_B, a, b):
  """Rows of `b` where use_B, else of `a` (leaves with a batch axis; the rest from `a`)."""
  B = use_B.shape[0]
  def one(x, y):
    if jnp.ndim(x) and x.shape[0] == B:
      return jnp.where(use_B.reshape((B,) + (1,) * (x.ndim - 1)), y, x)
    return x
  return jax.tree.map(one, a, b)


def _replay(params_a, params_b, config, st, ids, mask, key, tags_BxN, tokens_BxN):
  """Each sample on a cache of its own: its prompt and token 0 from `params_a`; then token
  p - 1 fed (and cached) with the weights tag p names, token p drawn from those logits with
  its own uniforms. Returns the tokens and log-probs drawn."""
  G = st.num_samples
  B, T = ids.shape[0] * G, ids.shape[1]
  ids_B, mask_B = np.repeat(ids, G, 0), np.repeat(mask, G, 0)
  cache = models.init_cache(config, B, T + N)
  logits, cache = models.forward(params_a, config, ids_B, np.maximum(mask_B.cumsum(1) - 1, 0),
                                 mask_B, cache)
  draw = lambda logits, p: sample_tokens(  # noqa: E731
      logits, row_uniforms(sample_keys(key, jnp.arange(B, dtype=jnp.int32), p)), st)
  tok, lp = draw(logits[:, -1], 0)
  got_tokens, got_lp = [tok], [lp]

  @jax.jit
  def step(cache, fed_B, pos_B, use_B, p):
    one = lambda params: models.forward(params, config, fed_B[:, None], pos_B[:, None],  # noqa: E731
                                        jnp.ones((B, 1), jnp.int32), cache)
    (la, ca), (lb, cb) = one(params_a), one(params_b)
    logits = jnp.where(use_B[:, None], lb[:, 0], la[:, 0])
    return _pick(use_B, ca, cb), draw(logits, p)

  length_B = mask_B.sum(1)
  for p in range(1, N):
    cache, (tok, lp) = step(cache, tokens_BxN[:, p - 1], length_B + p - 1, tags_BxN[:, p] > 0,
                            p)
    got_tokens.append(tok)
    got_lp.append(lp)
  return np.stack(got_tokens, 1), np.stack(got_lp, 1)


@pytest.mark.parametrize("width", [0, 2])
def test_tokens_follow_the_weights_their_tags_name(width):
  """Two unrelated sets of weights: every drawn token and its log-prob are those the replay
  gets from the weights of its tag; the first weights' log-probs of the tokens tagged 1 differ
  (the oracle can fail)."""
  config, params_a, ids, mask, eos = _case("tiny_qwen2")
  params_b = models.init_params(config, jax.random.key(2))
  st, key = _settings(width, eos), jax.random.key(3)
  out = _inflight(params_a, params_b, config, st, ids, mask, key, after=6)
  tokens, lp = np.asarray(out.tokens), np.asarray(out.logprobs)
  tags, on = np.asarray(out.versions), np.asarray(out.mask) > 0
  assert (tags[on] == 1).sum() > 20 and (tags[on] == 0).sum() > 20
  want_tokens, want_lp = _replay(params_a, params_b, config, st, ids, mask, key, tags, tokens)
  np.testing.assert_array_equal(tokens[on], want_tokens[on])
  np.testing.assert_allclose(lp[on], want_lp[on], atol=2e-5, rtol=0)
  _, wrong_lp = _replay(params_a, params_a, config, st, ids, mask, key, tags, tokens)
  assert np.abs(wrong_lp - lp)[on & (tags == 1)].mean() > 0.05


@pytest.mark.parametrize("kind", corrections.CORRECTIONS[1:])
def test_corrections_on_mixed_version_rows_match_numpy(kind):
  """The trainer's log-probs (the update's weights, teacher-forced) against the sampler's of
  a mixed-version batch: the loss's weights equal the NumPy oracle's, and the tokens the update's
  weights drew are nearer the trainer's (their caches still hold the first weights' keys)."""
  config, params_a, ids, mask, eos = _case("tiny_qwen2")
  params_b = jax.tree.map(lambda x: x * 1.3, params_a)  # a large step of the same policy
  st, key = _settings(2, eos), jax.random.key(5)
  out = _inflight(params_a, params_b, config, st, ids, mask, key, after=6)
  cmask = np.asarray(out.mask)
  batch = TrainBatch(np.repeat(ids, 8, 0), np.repeat(mask, 8, 0), np.asarray(out.tokens), cmask,
                     np.zeros(len(cmask), np.float32))
  trainer_lp = np.asarray(ts.sequence_logprobs(params_b, batch, model_config=config))
  sampler_lp, tags = np.asarray(out.logprobs), np.asarray(out.versions)
  c = corrections.Correction(kind, cap=1.5, low=0.7, high=1.4)
  w, _ = corrections.mismatch_weights(jnp.asarray(trainer_lp), jnp.asarray(sampler_lp),
                                      jnp.asarray(cmask, jnp.float32), c)
  want, _, _ = np_weights(trainer_lp.astype(np.float64), sampler_lp.astype(np.float64), cmask,
                          kind, 1.5, 0.7, 1.4)
  np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
  gap = np.abs(trainer_lp - sampler_lp)
  on = cmask > 0
  assert gap[on & (tags == 1)].mean() < 0.5 * gap[on & (tags == 0)].mean()


def _config(**grpo):
  cfg = arithmetic.get_config("smoke")
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.eval.every, cfg.eval.k = 8, 3, 0, 1
  cfg.grpo.max_staleness, cfg.grpo.inflight_after = 1, 4
  for name, value in grpo.items():
    setattr(cfg.grpo, name, value)
  return cfg


def test_a_run_switches_to_the_update_it_waited_for(tmp_path, monkeypatch):
  """k = 1: the rollout sampled during step t's update starts with the weights step t
  updates and goes on with those the update makes (the next step's); the figures say which
  fraction of its tokens came after the switch, and their staleness."""
  firsts, thens, versions = [], [], []
  real_collect, real_dispatch = rollout.collect, updates.dispatch_update
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0]).copy()  # noqa: E731

  def collect(data, sampler, r, params, *args, **kw):
    firsts.append(leaf(params.first))
    then = params.then
    params = type(params)(params.first, lambda: thens.append(leaf(then())) or then())
    return real_collect(data, sampler, r, params, *args, **kw)

  def dispatch(device, g, state, ready, frozen=None):
    versions.append(leaf(state.params))
    return real_dispatch(device, g, state, ready, frozen)

  monkeypatch.setattr(rollout, "collect", collect)
  monkeypatch.setattr(updates, "dispatch_update", dispatch)
  trainer.train(_config(), str(tmp_path))
  assert len(firsts) == len(thens) == len(versions) == 3
  np.testing.assert_array_equal(firsts[0], versions[0])  # rollout 0: version 0, no switch
  np.testing.assert_array_equal(thens[0], versions[0])
  for j in (1, 2):  # sampled at step j - 1: version j - 1, then j
    np.testing.assert_array_equal(firsts[j], versions[j - 1])
    np.testing.assert_array_equal(thens[j], versions[j])
  rows = [r for r in metrics.read_metrics(tmp_path) if r.get("phase") == "grpo" and "loss" in r]
  assert rows[0]["inflight/updated_tokens"] == 0 and rows[0]["staleness"] == 0
  for row in rows[1:]:
    assert 0 < row["inflight/updated_tokens"] < 1 and row["staleness"] == 1
    assert row["inflight/token_staleness"] == pytest.approx(1 - row["inflight/updated_tokens"])


@pytest.mark.parametrize("change, says", [
    (dict(inflight_after=-1), "must be in \\[0, grpo.max_completion_length"),
    (dict(inflight_after=64), "must be in \\[0, grpo.max_completion_length"),
    (dict(max_staleness=0), "max_staleness = 0"),
    (dict(batching="static"), "batching = 'static'"),
    (dict(dynamic_sampling=True), "dynamic_sampling"),
])
def test_bad_inflight_combinations_name_their_fields(change, says):
  cfg = _config(**change)
  cfg.grpo.max_completion_length = 64
  with pytest.raises(settings.ConfigError, match=f"config.grpo.inflight_after = .*{says}"):
    settings.from_config(cfg, 8)
