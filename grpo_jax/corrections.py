"""Rollout-mismatch corrections: the sampler's probabilities are not the trainer's.

The tokens were drawn by the sampler's policy pi_s (a bf16, LoRA-merged decode program, or an
older policy version when rollouts run ahead of the update), while the loss's ratio
r = pi / pi_old assumes they came from pi_old, the trainer's own computation of the sampling
policy. The gap is the per-token importance ratio

    rho_t = pi_old(o_t) / pi_s(o_t) = exp(old_logprob_t - sampler_logprob_t)

and a correction multiplies each token's policy loss by a detached weight w_t (the KL term is
left as it is, as TRL and verl do):

  "none":   w = 1 (the ratio is still measured and logged)
  "tis":    w = min(rho_t, C)                          token-level truncated importance sampling
            (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
            training"; TRL's token_truncate, verl's rollout_is token level, Tunix / MaxText)
  "mis":    w = rho_seq * 1[lo <= rho_seq <= hi],  rho_seq = prod_t rho_t over the sequence's
            tokens: sequence-level masked importance sampling (Liu et al. 2025, "When speed kills
            stability"; TRL's sequence_mask): a sequence the sampler drew too far from the
            trainer's policy is dropped whole
  "icepop": w = rho_t * 1[lo <= rho_t <= hi]           token-level masking of extreme ratios
            (IcePop, Ring-1T, Ling Team 2025: tokens outside the band get no gradient)

C = `cap`, [lo, hi] = `low`, `high` (`Correction`). Figures, as weighted sums the micro-batches
add up (`losses.combine_sums`; `*_max` keys combine by max):

  mismatch/kl          KL(pi_s || pi_old), k3 estimate over the sampled tokens (token mean)
  mismatch/ratio_mean  token mean of rho;  mismatch/ratio_max: its largest value
  mismatch/clipped     fraction of tokens whose weight was truncated (tis)
  mismatch/masked      fraction of tokens given weight 0 (mis, icepop)

Shapes: B sequences, T completion tokens; `mask` 1 on the tokens the loss counts. Pure, jittable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CORRECTIONS = ("none", "tis", "mis", "icepop")


@dataclasses.dataclass(frozen=True)
class Correction:
  """Which correction (CORRECTIONS) and its bounds: TIS's cap C, the band [low, high] of MIS
  (on the sequence's ratio) and IcePop (on each token's)."""
  kind: str = "none"
  cap: float = 2.0
  low: float = 0.5
  high: float = 2.0

  def __post_init__(self):
    if self.kind not in CORRECTIONS:
      raise ValueError(f"correction: unknown kind {self.kind!r}; expected one of {CORRECTIONS}")
    if not self.cap > 0:
      raise ValueError(f"correction: cap = {self.cap} must be > 0")
    if not 0 <= self.low < self.high:
      raise ValueError(f"correction: the band needs 0 <= low < high, got low = {self.low}, "
                       f"high = {self.high}")


def mismatch_weights(old_logprobs, sampler_logprobs, mask,
                     correction: Correction) -> tuple[jax.Array, dict]:
  """The detached per-token weights [B, T] of `correction` (1 off the mask), and per-token
  figures [B, T] that `losses` turns into weighted sums (module docstring)."""
  valid = mask > 0
  log_rho = jnp.where(valid, old_logprobs.astype(jnp.float32)
                      - sampler_logprobs.astype(jnp.float32), 0.0)
  log_rho = jax.lax.stop_gradient(log_rho)
  rho = jnp.exp(log_rho)
  kind = correction.kind
  kept = jnp.ones_like(rho, bool)
  weight = jnp.ones_like(rho)
  if kind == "tis":
    weight = jnp.minimum(rho, correction.cap)
  elif kind == "mis":
    rho_B = jnp.exp(jnp.sum(log_rho, axis=1))
    kept = jnp.broadcast_to(((rho_B >= correction.low) & (rho_B <= correction.high))[:, None],
                            rho.shape)
    weight = jnp.where(kept, jnp.broadcast_to(rho_B[:, None], rho.shape), 0.0)
  elif kind == "icepop":
    kept = (rho >= correction.low) & (rho <= correction.high)
    weight = jnp.where(kept, rho, 0.0)
  weight = jnp.where(valid, weight, 1.0)
  tokens = {"mismatch/kl": jnp.expm1(log_rho) - log_rho, "mismatch/ratio_mean": rho,
            "mismatch/ratio_max": jnp.where(valid, rho, 0.0)}
  if kind == "tis":
    tokens["mismatch/clipped"] = (rho > correction.cap).astype(jnp.float32)
  if kind in ("mis", "icepop"):
    tokens["mismatch/masked"] = (~kept).astype(jnp.float32)
  return weight, tokens


def token_sums(tokens: dict, token_weights) -> dict:
  """`mismatch_weights`' per-token figures as sums weighted by `token_weights` (the batch's
  token-mean weights), and the largest ratio as a `*_max` figure."""
  return {name: (jnp.max(value) if name.endswith("_max") else jnp.sum(value * token_weights))
          for name, value in tokens.items()}
