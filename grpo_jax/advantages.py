"""Group-relative advantages: the baseline of GRPO (DeepSeekMath, section 4.1).

GRPO has no value model. A prompt's G completions are scored, and each completion's
advantage is its reward measured against its own group:

  outcome supervision (eq. in 4.1.2):  A_i = (r_i - mean(r)) / std(r)
  process supervision (4.1.3):         A_{i,t} = sum_{steps j ending at or after t} r~_{i,j}

Shapes: P prompts, G completions per prompt, S steps per completion, T tokens, K reward functions.
Everything here is a pure, jittable function of arrays; the normalisation is `jax.vmap`-ed over
the P groups.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.rewards import scoring

Scale = Literal["group", "batch", "none"]
_SCALES = ("group", "batch", "none")


def combine_rewards(rewards_KxPxG: jax.Array, weights_K=None) -> jax.Array:
  """Weighted sum of K reward functions' scores, before any normalisation: [K, P, G] -> [P, G].

  `weights_K` defaults to ones (each reward function counts once). A NaN score (the reward
  returned None: it does not apply to that completion) is left out of the sum, TRL's nansum of
  weighted rewards.
  """
  rewards_KxPxG = jnp.asarray(rewards_KxPxG)
  if rewards_KxPxG.ndim != 3:
    raise ValueError(f"combine_rewards: rewards must be [K, P, G], got shape {rewards_KxPxG.shape}")
  num_fns = rewards_KxPxG.shape[0]
  if weights_K is None:
    weights_K = jnp.ones((num_fns,), rewards_KxPxG.dtype)
  weights_K = jnp.asarray(weights_K, rewards_KxPxG.dtype)
  if weights_K.shape != (num_fns,):
    raise ValueError(
        f"combine_rewards: {num_fns} reward functions but weights has shape {weights_K.shape}")
  applies = ~jnp.isnan(rewards_KxPxG)
  return jnp.einsum("kpg,k->pg", jnp.where(applies, rewards_KxPxG, 0), weights_K)


def _check_rewards(rewards, weights) -> jax.Array:
  rewards = jnp.asarray(rewards)
  if rewards.ndim == 3:
    rewards = combine_rewards(rewards, weights)
  elif weights is not None:
    raise ValueError("group_advantages: `weights` needs rewards of shape [K, P, G], "
                     f"got shape {rewards.shape}")
  if rewards.ndim != 2:
    raise ValueError(f"group_advantages: rewards must be [P, G] or [K, P, G], got shape {rewards.shape}")
  if rewards.shape[1] < 2:
    raise ValueError(
        f"group_advantages: a group needs G >= 2 completions for a baseline and an unbiased std, "
        f"got G = {rewards.shape[1]} (rewards shape {rewards.shape})")
  if not jnp.issubdtype(rewards.dtype, jnp.floating):
    rewards = rewards.astype(jnp.float32)
  return rewards


def _group_mean_std(r_G: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and unbiased (ddof=1) std of one group's rewards [G]."""
  return jnp.mean(r_G), jnp.std(r_G, ddof=1)


def group_advantages(rewards, *, scale: Scale = "group", eps: float = 1e-4,
                     weights=None) -> jax.Array:
  """Outcome-supervision advantages, [P, G] (or [K, P, G] with `weights`) -> [P, G].

  scale="group": (r - mean_group) / (std_group + eps)           (GRPO, DeepSeekMath)
  scale="batch": (r - mean_group) / (std over all P*G + eps)    (robust to zero-spread groups)
  scale="none":  r - mean_group                                 (Dr. GRPO)
  std is the unbiased sample std (ddof=1). A group whose rewards are all equal gets advantage 0
  under every scale (it carries no learning signal; see `zero_spread_fraction`).
  """
  if scale not in _SCALES:
    raise ValueError(f"group_advantages: unknown scale {scale!r}; expected one of {_SCALES}")
  rewards_PxG = _check_rewards(rewards, weights)
  mean_P, std_P = jax.vmap(_group_mean_std)(rewards_PxG)
  centred_PxG = rewards_PxG - mean_P[:, None]
  if scale == "group":
    return centred_PxG / (std_P[:, None] + eps)
  if scale == "batch":
    return centred_PxG / (jnp.std(rewards_PxG, ddof=1) + eps)
  return centred_PxG


def zero_spread_fraction(rewards, *, weights=None) -> jax.Array:
  """Fraction of the P groups whose G rewards are all equal (no learning signal). Scalar."""
  rewards_PxG = _check_rewards(rewards, weights)
  all_equal_P = jnp.all(rewards_PxG == rewards_PxG[:, :1], axis=1)
  return jnp.mean(all_equal_P.astype(jnp.float32))


def process_advantages(step_rewards, step_mask, step_end, num_tokens: int, *,
                       eps: float = 1e-4) -> jax.Array:
  """Process-supervision advantages (DeepSeekMath 4.1.3), [P, G, S] x3 -> [P, G, num_tokens].

  step_rewards[p, g, s]: reward of step s of completion g of prompt p (e.g. from a PRM);
  step_mask[p, g, s]:    1 where that step exists;
  step_end[p, g, s]:     index of the completion token that ends the step.
  Rewards are normalised by the mean and unbiased std over all existing steps of the G
  completions of the same prompt: r~ = (r - mean) / (std + eps). The advantage of token t is the
  sum of the normalised rewards of the existing steps whose end index is >= t. Tokens after the
  last step get 0. A prompt with a single existing step gets 0 (no spread to learn from).
  """
  step_rewards = jnp.asarray(step_rewards)
  if not jnp.issubdtype(step_rewards.dtype, jnp.floating):
    step_rewards = step_rewards.astype(jnp.float32)
  step_mask = jnp.asarray(step_mask)
  step_end = jnp.asarray(step_end)
  if step_rewards.ndim != 3:
    raise ValueError(f"process_advantages: step_rewards must be [P, G, S], got {step_rewards.shape}")
  for name, arr in (("step_mask", step_mask), ("step_end", step_end)):
    if arr.shape != step_rewards.shape:
      raise ValueError(f"process_advantages: {name} has shape {arr.shape}, "
                       f"step_rewards has shape {step_rewards.shape}")
  if step_rewards.shape[1] < 2:
    raise ValueError(f"process_advantages: needs G >= 2 completions per prompt, got "
                     f"G = {step_rewards.shape[1]}")
  chex.assert_type(step_end, int)

  def normalise_prompt(r_GxS, m_GxS):
    m_GxS = m_GxS.astype(r_GxS.dtype)
    n = jnp.sum(m_GxS)
    mean = jnp.sum(r_GxS * m_GxS) / jnp.maximum(n, 1.0)
    var = jnp.sum(m_GxS * (r_GxS - mean) ** 2) / jnp.maximum(n - 1.0, 1.0)
    return m_GxS * (r_GxS - mean) / (jnp.sqrt(var) + eps)

  norm_PxGxS = jax.vmap(normalise_prompt)(step_rewards, step_mask)
  t_T = jnp.arange(num_tokens)
  covers_PxGxSxT = step_end[..., None] >= t_T
  return jnp.einsum("pgs,pgst->pgt", norm_PxGxS, covers_PxGxSxT.astype(norm_PxGxS.dtype))


def coefficients(coefficient: str, scores_KxPxG, weights_K, *, scale: Scale = "group",
                 steps=None, num_tokens: int | None = None) -> np.ndarray:
  """The gradient coefficient of each completion, the paradigm table's middle column
  (`paradigms.py`), host float32: [P * G] (outcome) or [P * G, num_tokens] (process).

  "one": 1 (SFT on teacher data); "correct": 1[weighted reward > 0] (RFT, Online RFT);
  "group": `group_advantages` (GRPO); "process": `process_advantages` of `steps` = (step_end,
  step_mask, step_rewards), each [P * G, S] (GRPO with process supervision).
  """
  K, P, G = np.shape(scores_KxPxG)
  if coefficient == "one":
    return np.ones((P * G,), np.float32)
  if coefficient == "correct":
    combined_PxG = scoring.weighted_sum(weights_K, scores_KxPxG)
    return (combined_PxG > 0).astype(np.float32).reshape(P * G)
  if coefficient == "group":
    adv_PxG = group_advantages(scores_KxPxG, scale=scale, weights=weights_K)
    return np.asarray(adv_PxG, np.float32).reshape(P * G)
  if coefficient == "process":
    end, mask, rewards = (np.asarray(x).reshape(P, G, -1) for x in steps)
    adv = process_advantages(rewards, mask, end, num_tokens)
    return np.asarray(adv, np.float32).reshape(P * G, num_tokens)
  raise ValueError(f"coefficients: unknown coefficient {coefficient!r}")
