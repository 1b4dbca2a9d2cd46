"""The GRPO objective (DeepSeekMath eq. 3), its variants, and exact gradient accumulation.

Per token t of completion i, with ratio r = pi(o_t) / pi_old(o_t) and advantage A:

  l_{i,t} = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t(pi || pi_ref)

and KL_t by the k3 estimator of DeepSeekMath eq. 4: pi_ref/pi - log(pi_ref/pi) - 1. The first
term is the policy loss of `policy_loss` ("clip" above), or:

  "cispo": -sg(min(r, 1 + eps_high)) * A * log pi(o_t)   (MiniMax-M1, eq. 4: the truncated
           ratio is a stop-gradient weight, so no token loses its gradient; no lower bound, as
           the paper sets none; TRL's cap is its `epsilon_high` itself, here 1 + eps_high)
  "sapo":  -(4 / tau) * sigmoid(tau * (r - 1)) * A,  tau = tau_pos if A > 0 else tau_neg
           (SAPO, Gao et al. 2025: a soft gate in place of the clip; its gradient weight
           4 s (1 - s) r, s = sigmoid(tau (r - 1)), is 1 on-policy and fades off-policy)
  "clip_cov", "kl_cov": the clip, or -r A, with the tokens of high covariance of log-prob and
           advantage in the whole batch restrained (covariance.py, Cui et al. 2025)
The loss is l aggregated over tokens and sequences (`loss_type`):

  "grpo":    mean_i  sum_t l * m / |o_i|        (DeepSeekMath; each sequence weighs 1/B)
  "dapo":    sum_{i,t} l * m / sum_{i,t} m      (DAPO; each token weighs the same)
  "dr_grpo": sum_{i,t} l * m / (B * L)          (Dr. GRPO; L = the completion budget, below)

Dr. GRPO's L: the sampler's budget, grpo.max_completion_length + 1 (README: against TRL's).

Every aggregation is a weighted token sum, sum_{i,t} l_{i,t} * w_{i,t}, with weights that depend
only on the mask of the *whole* optimizer batch (`loss_weights`). So a batch split into
micro-batches, each summing l * w with its slice of the full-batch weights, gives exactly the
full-batch loss and gradient (`microbatches.accumulate_gradients`). Metrics are accumulated the same way, as
weighted sums that are finalised once (`finalize_metrics`).

Shapes: B sequences, T completion tokens. All functions are pure and jittable.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import chex
import flax
import jax
import jax.numpy as jnp

from grpo_jax import corrections, covariance

LossType = Literal["grpo", "dapo", "dr_grpo"]
KLEstimator = Literal["k1", "k2", "k3"]
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
OBJECTIVES = ("grpo", "sft")
POLICY_LOSSES = ("clip", "cispo", "sapo") + covariance.COV_LOSSES
_ALLOWED = dict(loss_type=LOSS_TYPES, kl_estimator=KL_ESTIMATORS, importance_sampling_level=IS_LEVELS,
                objective=OBJECTIVES, policy_loss=POLICY_LOSSES)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the objective, checked when built (a bad value fails before a compile).

  objective "grpo": the clipped-ratio loss with the KL inside (`grpo_loss_terms`); "sft":
  advantage-weighted NLL (`sft_loss_terms`: SFT with advantages = 1, (Online) RFT with
  1[correct]), aggregated by `loss_type` too ("dapo" = per-token mean NLL, "grpo" = per-sequence
  mean as in DeepSeekMath's unified gradient, eq. 5). `temperature`: the log-probs are those of
  the sampling distribution softmax(z / T). `max_completion_length`: L of "dr_grpo" (from a
  config: grpo.max_completion_length + 1, see the module docstring); None: the batch's width T.
  """
  objective: str = "grpo"
  loss_type: str = "grpo"
  epsilon_low: float = 0.2
  epsilon_high: Optional[float] = None
  beta: float = 0.0
  kl_estimator: str = "k3"
  importance_sampling_level: str = "token"
  max_completion_length: Optional[int] = None
  temperature: float = 1.0
  policy_loss: str = "clip"  # POLICY_LOSSES (module docstring)
  sapo_tau_pos: float = 1.0  # SAPO's gate temperatures (the paper's defaults)
  sapo_tau_neg: float = 1.05
  entropy_coef: float = 0.0  # a bonus: loss -= entropy_coef x the policy's token entropy
  cov_fraction: float = 2e-4  # Clip-Cov / KL-Cov (covariance.py): the tokens restrained,
  cov_low: float = 1.0        # Clip-Cov's covariance band,
  cov_high: float = 5.0
  kl_cov_coef: float = 1.0    # KL-Cov's penalty
  correction: corrections.Correction = corrections.Correction()  # sampler / trainer mismatch

  def __post_init__(self):
    if not (self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0):
      raise ValueError(f"loss: sapo_tau_pos = {self.sapo_tau_pos} and sapo_tau_neg = "
                       f"{self.sapo_tau_neg} must be > 0")
    _check_names("loss", objective=self.objective, policy_loss=self.policy_loss,
                 loss_type=self.loss_type, kl_estimator=self.kl_estimator,
                 importance_sampling_level=self.importance_sampling_level)
    if not self.beta >= 0:
      raise ValueError(f"loss: beta = {self.beta} must be >= 0")
    if self.epsilon_low < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
      raise ValueError(f"loss: clip epsilons must be >= 0, got low={self.epsilon_low}, "
                       f"high={self.epsilon_high}")
    if not self.temperature > 0:
      raise ValueError(f"loss: temperature = {self.temperature} must be > 0")
    if not self.entropy_coef >= 0:
      raise ValueError(f"loss: entropy_coef = {self.entropy_coef} must be >= 0")
    covariance.check(self.cov_fraction, self.cov_low, self.cov_high, self.kl_cov_coef)


def _check_names(where: str, **values: str) -> None:
  for name, value in values.items():
    allowed = _ALLOWED[name]
    if value not in allowed:
      raise ValueError(f"{where}: unknown {name} {value!r}; expected one of {allowed}")


# ----------------------------------------------------------------------------- KL


def kl_penalty(logprobs, ref_logprobs, estimator: KLEstimator = "k3") -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

  With d = log pi_ref - log pi:  k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1  (>= 0, unbiased).
  """
  d = ref_logprobs - logprobs
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d * d
  if estimator == "k3":
    return jnp.expm1(d) - d
  raise ValueError(f"kl_penalty: unknown kl_estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


# ----------------------------------------------------------------------------- weights


@flax.struct.dataclass
class LossWeights:
  """Per-token weights fixed by the whole optimizer batch, so that sums over micro-batches are exact.

  loss_BxT:  the loss is sum(l * loss_BxT) (depends on loss_type).
  token_BxT: mask / (number of valid tokens in the batch), for token-mean metrics.
  seq_B:     1 / B, for sequence-mean metrics.
  """
  loss_BxT: jax.Array
  token_BxT: jax.Array
  seq_B: jax.Array


def loss_weights(mask, *, loss_type: LossType = "grpo",
                 max_completion_length: int | None = None) -> LossWeights:
  """The token weights of `loss_type` for a full optimizer batch, mask [B, T] -> LossWeights.

  An empty sequence (mask all zero) contributes 0 tokens, its length counts as 1, and it still
  counts among the B sequences (TRL's convention), so nothing divides by zero.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  mask = jnp.asarray(mask, jnp.float32)
  num_seqs, num_steps = mask.shape
  num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
  if loss_type == "grpo":
    seq_len_B = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    w = mask / (seq_len_B[:, None] * num_seqs)
  elif loss_type == "dapo":
    w = mask / num_tokens
  else:  # dr_grpo
    length = num_steps if max_completion_length is None else max_completion_length
    w = mask / (num_seqs * length)
  return LossWeights(loss_BxT=w, token_BxT=mask / num_tokens,
                     seq_B=jnp.full((num_seqs,), 1.0 / num_seqs, jnp.float32))


# ----------------------------------------------------------------------------- the loss


def check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, loss_type, kl_estimator,
                 importance_sampling_level, beta, epsilon_low, epsilon_high, policy_loss="clip",
                 cov_selected=None):
  _check_names("grpo_loss", loss_type=loss_type, kl_estimator=kl_estimator,
               importance_sampling_level=importance_sampling_level, policy_loss=policy_loss)
  if logprobs.ndim != 2:
    raise ValueError(f"grpo_loss: logprobs must be [B, T], got shape {logprobs.shape}")
  shape = logprobs.shape
  named = {"old_logprobs": old_logprobs, "mask": mask}
  if ref_logprobs is not None:
    named["ref_logprobs"] = ref_logprobs
  for name, arr in named.items():
    if arr.shape != shape:
      raise ValueError(f"grpo_loss: {name} has shape {arr.shape}, logprobs has shape {shape}")
  if advantages.shape not in (shape[:1], shape):
    raise ValueError(f"grpo_loss: advantages must be [B] = {shape[:1]} or [B, T] = {shape}, "
                     f"got {advantages.shape}")
  if policy_loss in covariance.COV_LOSSES and cov_selected is None:
    raise ValueError(f"grpo_loss: policy_loss {policy_loss!r} needs cov_selected, the tokens "
                     "covariance.select chose over the whole batch")
  if beta != 0.0 and ref_logprobs is None:
    raise ValueError(f"grpo_loss: beta = {beta} > 0 needs ref_logprobs (the reference policy's "
                     "log-probs); pass them or set beta = 0")
  if epsilon_low < 0 or (epsilon_high is not None and epsilon_high < 0):
    raise ValueError(f"grpo_loss: clip epsilons must be >= 0, got low={epsilon_low}, "
                     f"high={epsilon_high}")
  chex.assert_type([logprobs, old_logprobs], float)


def grpo_loss_terms(logprobs, old_logprobs, advantages, mask, weights: LossWeights, *,
                    ref_logprobs=None, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                    beta: float = 0.0, kl_estimator: KLEstimator = "k3",
                    importance_sampling_level: str = "token", policy_loss: str = "clip",
                    sapo_tau: tuple[float, float] = (1.0, 1.05), sampler_logprobs=None,
                    correction: corrections.Correction = corrections.Correction(),
                    cov_selected=None, kl_cov_coef: float = 1.0) -> tuple[jax.Array, dict]:
  """The loss as a weighted token sum, and metrics as weighted sums (both additive over batches:
  `combine_sums`). With `sampler_logprobs` ([B, T], the sampler's own), the policy term is
  weighted by `correction` (corrections.py) and the mismatch is logged. `cov_selected`: the
  tokens Clip-Cov / KL-Cov restrain ([B, T], `covariance.select` over the whole batch).

  Use this directly for micro-batching (with the full batch's `weights` sliced); otherwise use
  `grpo_loss`. Returns (loss, sums) where `finalize_metrics(sums)` gives the metrics.
  """
  if epsilon_high is None:
    epsilon_high = epsilon_low
  mask, logprobs, old_logprobs = (x.astype(jnp.float32) for x in (mask, logprobs, old_logprobs))
  adv_BxT = jnp.broadcast_to(
      advantages[:, None] if advantages.ndim == 1 else advantages, logprobs.shape
  ).astype(jnp.float32)
  log_ratio_BxT = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
  if importance_sampling_level == "sequence":  # GSPO: length-normalised sequence ratio
    seq_len_B = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    log_ratio_B = jnp.sum(log_ratio_BxT * mask, axis=1) / seq_len_B
    log_ratio_BxT = jnp.broadcast_to(log_ratio_B[:, None], logprobs.shape)
  valid = mask > 0  # masked positions may hold anything (NaN * 0 weight would still be NaN)
  ratio = jnp.where(valid, jnp.exp(log_ratio_BxT), 1.0)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  per_token = jnp.where(valid, _policy_loss(
      policy_loss, ratio, clipped, adv_BxT, jnp.where(valid, logprobs, 0.0), 1.0 + epsilon_high,
      sapo_tau, log_ratio_BxT, cov_selected, kl_cov_coef), 0.0)
  sums = {} if cov_selected is None else {"cov_selected": jnp.sum(cov_selected * weights.token_BxT)}
  if sampler_logprobs is not None:  # the sampler's draw vs the trainer's sampling policy
    w_BxT, tokens = corrections.mismatch_weights(old_logprobs, sampler_logprobs, mask, correction)
    if correction.kind != "none":  # "none": measured only
      per_token = per_token * w_BxT
    sums.update(corrections.token_sums(tokens, weights.token_BxT))
  if ref_logprobs is not None:
    kl = jnp.where(valid, kl_penalty(logprobs, ref_logprobs.astype(jnp.float32), kl_estimator),
                   0.0)
    if beta != 0.0:
      per_token = per_token + beta * kl
    sums["kl"] = jnp.sum(kl * weights.token_BxT)

  loss = jnp.sum(per_token * weights.loss_BxT)
  w_tok = weights.token_BxT
  clip_low = ((ratio < 1.0 - epsilon_low) & (adv_BxT < 0)).astype(jnp.float32)
  clip_high = ((ratio > 1.0 + epsilon_high) & (adv_BxT > 0)).astype(jnp.float32)
  adv_B = advantages if advantages.ndim == 1 else (
      jnp.sum(adv_BxT * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0))
  sums.update(
      ratio_mean=jnp.sum(ratio * w_tok),
      clip_frac_low=jnp.sum(clip_low * w_tok),
      clip_frac_high=jnp.sum(clip_high * w_tok),
      advantage_mean=jnp.sum(adv_B * weights.seq_B),
      advantage_sq_mean=jnp.sum(adv_B ** 2 * weights.seq_B),
      completion_length=jnp.sum(jnp.sum(mask, 1) * weights.seq_B),
  )
  return loss, sums


def _policy_loss(name: str, ratio, clipped, adv_BxT, logprobs, cap: float, sapo_tau, log_ratio,
                 cov_selected, kl_cov_coef: float):
  """Per-token policy loss of `name` (module docstring), before the KL term. `clipped`: the
  ratio in [1 - eps_low, 1 + eps_high]; CISPO's weight has the upper bound `cap` only;
  Clip-Cov / KL-Cov restrain the tokens `cov_selected` (covariance.py)."""
  if name in covariance.COV_LOSSES:
    return covariance.policy_loss(name, ratio, clipped, adv_BxT, log_ratio,
                                  cov_selected.astype(jnp.float32), kl_cov_coef)
  if name == "cispo":
    return -jax.lax.stop_gradient(jnp.minimum(ratio, cap)) * adv_BxT * logprobs
  if name == "sapo":
    tau = jnp.where(adv_BxT > 0, sapo_tau[0], sapo_tau[1])
    return -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv_BxT
  return -jnp.minimum(ratio * adv_BxT, clipped * adv_BxT)


def sft_loss_terms(logprobs, mask, advantages, weights: LossWeights) -> tuple[jax.Array, dict]:
  """Weighted negative log-likelihood: the "gradient coefficient" view of DeepSeekMath 5.2.1.

  loss = -sum_{i,t} A_i * log pi(o_{i,t}) * w_{i,t}. With A = 1 on teacher data this is SFT; with
  A = 1[answer correct] on sampled data it is RFT (offline samples) or Online RFT (live policy).
  Use token-mean weights (`loss_weights(mask, loss_type="dapo")`) for the usual per-token NLL.
  """
  mask = mask.astype(jnp.float32)
  adv_BxT = jnp.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages,
                             logprobs.shape).astype(jnp.float32)
  logprobs = jnp.where(mask > 0, logprobs, 0.0)
  loss = -jnp.sum(adv_BxT * logprobs * weights.loss_BxT)
  nll = -jnp.sum(logprobs * weights.token_BxT)
  sums = dict(nll=nll, completion_length=jnp.sum(jnp.sum(mask, 1) * weights.seq_B))
  return loss, sums


def loss_terms(cfg: LossConfig, logprobs, mask, advantages, weights: LossWeights, *,
               old_logprobs=None, ref_logprobs=None, entropy=None, sampler_logprobs=None,
               cov_selected=None) -> tuple[jax.Array, dict]:
  """The training path's loss: `cfg.objective` on one (micro-)batch, inputs checked first.

  `old_logprobs` None means mu = 1 (one update per rollout): the ratio's denominator is the
  current policy's log-probs, detached, so the ratio is 1 with the PPO gradient. `entropy`:
  the policy's token entropies [B, T]: logged (token mean), and `cfg.entropy_coef` x entropy
  is subtracted from the loss (a bonus: 0 by default). `sampler_logprobs`: the sampler's own,
  for `cfg.correction` (None: no correction, nothing logged). `cov_selected`: Clip-Cov's /
  KL-Cov's tokens.
  """
  loss, sums = _loss_terms(cfg, logprobs, mask, advantages, weights, old_logprobs, ref_logprobs,
                           sampler_logprobs, cov_selected)
  if entropy is not None:
    valid_entropy = jnp.where(mask > 0, entropy, 0.0)
    sums["entropy"] = jnp.sum(jax.lax.stop_gradient(valid_entropy) * weights.token_BxT)
    if cfg.entropy_coef:
      loss = loss - cfg.entropy_coef * jnp.sum(valid_entropy * weights.loss_BxT)
  return loss, sums


def _loss_terms(cfg, logprobs, mask, advantages, weights, old_logprobs, ref_logprobs,
                sampler_logprobs, cov_selected):
  if cfg.objective == "sft":
    return sft_loss_terms(logprobs, mask, advantages, weights)
  old = jax.lax.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
  check_inputs(logprobs, old, advantages, mask, ref_logprobs, cfg.loss_type, cfg.kl_estimator,
               cfg.importance_sampling_level, cfg.beta, cfg.epsilon_low, cfg.epsilon_high,
               cfg.policy_loss, cov_selected)
  return grpo_loss_terms(
      logprobs, old, advantages, mask, weights, ref_logprobs=ref_logprobs,
      epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
      kl_estimator=cfg.kl_estimator, importance_sampling_level=cfg.importance_sampling_level,
      policy_loss=cfg.policy_loss, sapo_tau=(cfg.sapo_tau_pos, cfg.sapo_tau_neg),
      sampler_logprobs=sampler_logprobs, correction=cfg.correction, cov_selected=cov_selected,
      kl_cov_coef=cfg.kl_cov_coef)


def combine_sums(a: dict, b: dict) -> dict:
  """Two micro-batches' metric sums as one: added, and `*_max` figures by their maximum."""
  return {k: jnp.maximum(a[k], b[k]) if k.endswith("_max") else a[k] + b[k] for k in a}


def finalize_metrics(sums: dict) -> dict:
  """Weighted sums from `grpo_loss_terms` (possibly summed over micro-batches) -> metrics."""
  metrics = dict(sums)
  if "clip_frac_low" in sums:
    metrics["clip_frac"] = sums["clip_frac_low"] + sums["clip_frac_high"]
  if "advantage_sq_mean" in sums:
    metrics["advantage_std"] = jnp.sqrt(
        jnp.maximum(sums["advantage_sq_mean"] - sums["advantage_mean"] ** 2, 0.0))
    del metrics["advantage_sq_mean"]
  return metrics


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None,
              loss_type: LossType = "grpo", epsilon_low: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0,
              kl_estimator: KLEstimator = "k3", importance_sampling_level: str = "token",
              max_completion_length: int | None = None, policy_loss: str = "clip",
              sapo_tau: tuple[float, float] = (1.0, 1.05), sampler_logprobs=None,
              correction: corrections.Correction = corrections.Correction(),
              cov_selected=None) -> tuple[jax.Array, dict]:
  """The negative GRPO objective (to minimise) and its metrics.

  Args:
    logprobs, old_logprobs: [B, T] log pi(o_t) under the current and the sampling policy;
      advantages: [B] (outcome) or [B, T] (process); mask: [B, T], 1 through the EOS.
    ref_logprobs: [B, T] under the reference policy; required when beta (inside the loss) != 0.
    loss_type, policy_loss (sapo_tau: (tau_pos, tau_neg)): the module docstring's names.
    epsilon_low, epsilon_high: clip range [1 - low, 1 + high]; high=None means high=low.
    kl_estimator: "k1" | "k2" | "k3" (DeepSeekMath: k3); importance_sampling_level: "token"
      (GRPO) or "sequence" (GSPO); max_completion_length: L of "dr_grpo" (None: T).
    sampler_logprobs, correction: [B, T] under the sampler, the policy term's mismatch
      correction (corrections.py); cov_selected: Clip-Cov's / KL-Cov's tokens (covariance.py).
  Returns:
    (loss, metrics): kl (with ref), ratio_mean, clip_frac(_low/_high), advantage_mean/std, ...
  """
  logprobs, old_logprobs = jnp.asarray(logprobs), jnp.asarray(old_logprobs)
  advantages, mask = jnp.asarray(advantages), jnp.asarray(mask)
  check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, loss_type, kl_estimator,
               importance_sampling_level, beta, epsilon_low, epsilon_high, policy_loss,
               cov_selected)
  weights = loss_weights(mask, loss_type=loss_type, max_completion_length=max_completion_length)
  loss, sums = grpo_loss_terms(
      logprobs, old_logprobs, advantages, mask, weights, ref_logprobs=ref_logprobs,
      epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, kl_estimator=kl_estimator,
      importance_sampling_level=importance_sampling_level, policy_loss=policy_loss,
      sapo_tau=sapo_tau, sampler_logprobs=sampler_logprobs, correction=correction,
      cov_selected=cov_selected)
  return loss, finalize_metrics(sums)
