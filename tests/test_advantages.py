"""Advantages against NumPy references written independently, loop by loop, and hand cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import advantages as adv


def np_group_advantages(r, scale, eps):
  out = np.zeros_like(r, dtype=np.float64)
  all_std = np.std(r, ddof=1)
  for p in range(r.shape[0]):
    mean = r[p].mean()
    std = np.std(r[p], ddof=1)
    denom = {"group": std + eps, "batch": all_std + eps, "none": 1.0}[scale]
    out[p] = (r[p] - mean) / denom
  return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_matches_numpy(scale):
  rng = np.random.default_rng(0)
  r = rng.normal(size=(5, 8)).astype(np.float32)
  r[2] = 1.0  # a zero-spread group
  got = np.asarray(jax.jit(lambda x: adv.group_advantages(x, scale=scale))(r))
  np.testing.assert_allclose(got, np_group_advantages(r.astype(np.float64), scale, 1e-4),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)


def test_group_advantages_hand_case():
  # rewards 0, 0, 1, 1: mean 0.5, unbiased std sqrt(1/3) = 0.57735
  got = adv.group_advantages(jnp.array([[0.0, 0.0, 1.0, 1.0]]), eps=0.0)
  np.testing.assert_allclose(got, [[-0.8660254, -0.8660254, 0.8660254, 0.8660254]], rtol=1e-6)
  # Dr. GRPO: no scaling.
  got = adv.group_advantages(jnp.array([[1.0, 3.0]]), scale="none")
  np.testing.assert_allclose(got, [[-1.0, 1.0]])


def test_weighted_reward_functions():
  rng = np.random.default_rng(1)
  r = rng.uniform(size=(3, 4, 6)).astype(np.float32)
  w = np.array([1.0, 0.5, -2.0], np.float32)
  combined = (r * w[:, None, None]).sum(0)
  got = adv.group_advantages(r, weights=w)
  np.testing.assert_allclose(got, np_group_advantages(combined.astype(np.float64), "group", 1e-4),
                             rtol=1e-5, atol=1e-6)
  # default weights: a plain sum
  np.testing.assert_allclose(adv.combine_rewards(r), r.sum(0), rtol=1e-6)


def test_zero_spread_fraction():
  r = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.1]])
  assert float(adv.zero_spread_fraction(r)) == pytest.approx(0.5)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 1)), "G >= 2"),
    (np.zeros((4,)), r"\[P, G\]"),
])
def test_group_advantages_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    adv.group_advantages(bad)


def test_group_advantages_bad_scale_and_weights():
  with pytest.raises(ValueError, match="unknown scale"):
    adv.group_advantages(np.zeros((2, 2)), scale="median")
  with pytest.raises(ValueError, match="weights"):
    adv.group_advantages(np.zeros((3, 2, 4)), weights=np.ones(2))


def np_process_advantages(step_rewards, step_mask, step_end, num_tokens, eps):
  P, G, S = step_rewards.shape
  out = np.zeros((P, G, num_tokens))
  for p in range(P):
    vals = [step_rewards[p, g, s] for g in range(G) for s in range(S) if step_mask[p, g, s]]
    mean = np.mean(vals) if vals else 0.0
    std = np.std(vals, ddof=1) if len(vals) > 1 else 0.0
    for g in range(G):
      for s in range(S):
        if not step_mask[p, g, s]:
          continue
        norm = (step_rewards[p, g, s] - mean) / (std + eps)
        for t in range(num_tokens):
          if step_end[p, g, s] >= t:
            out[p, g, t] += norm
  return out


def test_process_advantages_matches_numpy():
  rng = np.random.default_rng(2)
  P, G, S, T = 3, 4, 5, 12
  r = rng.normal(size=(P, G, S)).astype(np.float32)
  m = (rng.uniform(size=(P, G, S)) < 0.7).astype(np.int32)
  m[1] = 0  # a prompt with no steps at all
  m[2] = 0
  m[2, 0, 0] = 1  # a prompt with a single step: no spread
  ends = np.sort(rng.integers(0, T, size=(P, G, S)), axis=-1).astype(np.int32)
  got = jax.jit(adv.process_advantages, static_argnums=3)(r, m, ends, T)
  assert got.shape == (P, G, T)
  np.testing.assert_allclose(got, np_process_advantages(r, m, ends, T, 1e-4), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1:], 0.0)


def test_process_advantages_hand_case():
  # One prompt, two completions, two steps each. Steps end at tokens 1 and 3.
  r = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)  # mean 0.25, std 0.5
  m = np.ones((1, 2, 2), np.int32)
  ends = np.array([[[1, 3], [1, 3]]], np.int32)
  got = np.asarray(adv.process_advantages(r, m, ends, 5, eps=0.0))
  a, b = 1.5, -0.5  # normalised rewards of 1 and 0
  np.testing.assert_allclose(got[0, 0], [a + b, a + b, b, b, 0.0], rtol=1e-6)
  np.testing.assert_allclose(got[0, 1], [2 * b, 2 * b, b, b, 0.0], rtol=1e-6)


def test_process_advantages_errors():
  with pytest.raises(ValueError, match="step_mask"):
    adv.process_advantages(np.zeros((1, 2, 3)), np.zeros((1, 2, 2)), np.zeros((1, 2, 3), int), 4)
  with pytest.raises(ValueError, match="G >= 2"):
    adv.process_advantages(np.zeros((1, 1, 3)), np.zeros((1, 1, 3)), np.zeros((1, 1, 3), int), 4)
