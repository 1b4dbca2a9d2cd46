"""Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models", section 4): the few tokens whose log-prob and advantage co-vary most
drive the policy's entropy down; these objectives restrain them only.

Over the N completion tokens of the whole update batch (token i: advantage A_i, log-prob lp_i),

    Cov_i = (lp_i - mean_j lp_j) * (A_i - mean_j A_j)                                   (eq. 11)

  "clip_cov": max(1, floor(r N)) tokens drawn at random among those with low < Cov_i < high get
              no gradient: l_i = max(-A r_i, -A clip(r_i)) * (1 - s_i)                  (eq. 12)
  "kl_cov":   the max(1, floor(r N)) tokens of largest Cov_i get a KL penalty, and no token is
              clipped: l_i = -A r_i + coef * |log r_i| * s_i                            (eq. 13)

with s_i = 1 on the chosen tokens (`select`), r the ratio pi / pi_old (losses.py), r N =
`cov_fraction` x N. The paper's settings: Clip-Cov r = 2e-4, [low, high] = [1, 5]; KL-Cov
r = 2e-3 (7B) / 2e-4 (32B), coef = 1.

The statistic is the whole batch's, chosen once before the update (`updates.finish`), so the
micro-batches and length buckets stay exact (they receive s as a per-token input); lp is the
sampler's log-prob of each token, which is the update's pi_old at its first of mu steps (up to the
sampler / trainer mismatch that corrections.py measures). verl computes Cov per micro-batch from
the current log-probs, and leaves out of Clip-Cov's draw the tokens the ratio clip already clips
(none at the first step, where r = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COV_LOSSES = ("clip_cov", "kl_cov")


def check(fraction: float, low: float, high: float, coef: float) -> None:
  """The settings' bounds (`losses.LossConfig`), each named."""
  if not 0 < fraction <= 1:
    raise ValueError(f"loss: cov_fraction = {fraction} must be in (0, 1]")
  if not low < high:
    raise ValueError(f"loss: Clip-Cov's band needs cov_low < cov_high, got {low}, {high}")
  if not coef >= 0:
    raise ValueError(f"loss: kl_cov_coef = {coef} must be >= 0")


def covariances(logprobs_BxT, advantages, mask_BxT) -> jax.Array:
  """Cov_i of every token [B, T] (eq. 11; 0 off the mask); advantages [B] or [B, T]."""
  valid = mask_BxT > 0
  adv = jnp.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages,
                         mask_BxT.shape).astype(jnp.float32)
  lp = jnp.where(valid, logprobs_BxT.astype(jnp.float32), 0.0)
  n = jnp.maximum(jnp.sum(valid), 1)
  centred = lambda x: x - jnp.sum(jnp.where(valid, x, 0.0)) / n  # noqa: E731
  return jnp.where(valid, centred(lp) * centred(adv), 0.0)


@jax.jit(static_argnames=("kind",))
def select(logprobs_BxT, advantages, mask_BxT, key, *, kind: str, fraction: float, low: float,
           high: float) -> jax.Array:
  """s [B, T] float32: the tokens `kind` restrains (module docstring); `key` draws Clip-Cov's."""
  cov = covariances(logprobs_BxT, advantages, mask_BxT).reshape(-1)
  valid = mask_BxT.reshape(-1) > 0
  count = jnp.maximum(1, jnp.floor(fraction * jnp.sum(valid)).astype(jnp.int32))
  if kind == "kl_cov":  # the largest Cov
    priority = jnp.where(valid, cov, -jnp.inf)
  else:  # a random order of the tokens inside the band
    inside = valid & (cov > low) & (cov < high)
    priority = jnp.where(inside, jax.random.uniform(key, cov.shape), -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-priority, stable=True), stable=True)
  chosen = (rank < count) & (priority > -jnp.inf)
  return chosen.reshape(mask_BxT.shape).astype(jnp.float32)


def policy_loss(kind: str, ratio, clipped, adv_BxT, log_ratio, selected, coef: float):
  """The per-token policy term of `kind` (eqs. 12, 13), `selected` = s."""
  if kind == "clip_cov":
    return -jnp.minimum(ratio * adv_BxT, clipped * adv_BxT) * (1.0 - selected)
  return -ratio * adv_BxT + coef * jnp.abs(log_ratio) * selected
