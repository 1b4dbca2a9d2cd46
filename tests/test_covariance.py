"""Clip-Cov and KL-Cov (covariance.py): the covariances and the tokens chosen against NumPy, the
losses' value and gradient against central differences of a NumPy loss, exact over
micro-batches through the trainer's update, a run that logs them, bad settings named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_worker as mw
from grpo_jax import covariance, losses
from grpo_jax import train_step as ts
from test_losses import random_inputs


def np_cov(lp, adv, mask):
  """Eq. 11 token by token in float64 over the batch's valid tokens."""
  B, T = mask.shape
  a = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
  tokens = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
  lp_mean = np.mean([lp[i, t] for i, t in tokens])
  adv_mean = np.mean([a[i, t] for i, t in tokens])
  out = np.zeros((B, T))
  for i, t in tokens:
    out[i, t] = (lp[i, t] - lp_mean) * (a[i, t] - adv_mean)
  return out


def _inputs(seed, adv_2d=False, B=16, T=12):
  lp, old, adv, mask, _ = random_inputs(seed, B=B, T=T, adv_2d=adv_2d)
  return lp, old, adv * 3, mask  # spread wide enough for covariances above 1


@pytest.mark.parametrize("adv_2d", [False, True])
def test_covariances_and_kl_covs_top_tokens_match_numpy(adv_2d):
  lp, _, adv, mask = _inputs(0, adv_2d)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  want = np_cov(lp, adv, mask)
  np.testing.assert_allclose(covariances := covariance.covariances(f32(lp), f32(adv), f32(mask)),
                             want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(covariances)[mask == 0] == 0)
  n = int(mask.sum())
  for fraction in (0.05, 0.2, 1e-6):
    sel = np.asarray(covariance.select(f32(lp), f32(adv), f32(mask), jax.random.key(0),
                                       kind="kl_cov", fraction=fraction, low=1.0, high=5.0))
    k = max(1, int(np.floor(fraction * n)))
    order = sorted(((want[i, t], (i, t)) for i in range(mask.shape[0])
                    for t in range(mask.shape[1]) if mask[i, t]), reverse=True)
    assert {tuple(x) for x in np.argwhere(sel)} == {pos for _, pos in order[:k]}


def test_clip_cov_draws_inside_the_band_with_its_key():
  lp, _, adv, mask = _inputs(1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  cov = np_cov(lp, adv, mask)
  inside = (mask > 0) & (cov > 0.5) & (cov < 3.0)
  draw = lambda key, fraction: np.asarray(covariance.select(  # noqa: E731
      f32(lp), f32(adv), f32(mask), jax.random.key(key), kind="clip_cov", fraction=fraction,
      low=0.5, high=3.0)) > 0
  k = int(np.floor(0.1 * mask.sum()))
  assert 1 < k < inside.sum(), (k, inside.sum())  # a draw among more tokens than it takes
  a, b, again = draw(0, 0.1), draw(1, 0.1), draw(0, 0.1)
  for sel in (a, b):
    assert sel.sum() == k and not (sel & ~inside).any()
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, b)
  assert draw(0, 1.0).sum() == inside.sum()  # more asked than inside: all of the band


@pytest.mark.parametrize("kind", covariance.COV_LOSSES)
def test_the_losses_and_their_gradients_match_numpy(kind):
  """Eqs. 12 and 13 on given tokens, with the KL term inside: the value, and the gradient
  w.r.t. the log-probs by central differences of the NumPy loss."""
  lp, old, adv, mask = _inputs(2, B=6, T=7)
  ref = lp + 0.3
  rng = np.random.default_rng(3)
  sel = ((rng.uniform(size=mask.shape) < 0.4) & (mask > 0)).astype(np.float64)
  beta, coef = 0.05, 0.7

  def np_loss(lp):
    B, T = lp.shape
    total = np.zeros((B, T))
    for i in range(B):
      for t in range(T):
        r = np.exp(lp[i, t] - old[i, t])
        kl = np.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
        if kind == "clip_cov":
          term = -min(r * adv[i], min(max(r, 0.8), 1.2) * adv[i]) * (1 - sel[i, t])
        else:
          term = -r * adv[i] + coef * abs(lp[i, t] - old[i, t]) * sel[i, t]
        total[i, t] = term + beta * kl
    return np.mean([(total[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(B)])

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  cfg = losses.LossConfig(policy_loss=kind, beta=beta, kl_cov_coef=coef)
  weights = losses.loss_weights(f32(mask))
  loss_fn = lambda x: losses.loss_terms(  # noqa: E731
      cfg, x, f32(mask), f32(adv), weights, old_logprobs=f32(old), ref_logprobs=f32(ref),
      cov_selected=f32(sel))
  (loss, sums), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(lp))
  np.testing.assert_allclose(loss, np_loss(lp), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sums["cov_selected"], sel[mask > 0].mean(), rtol=1e-6)
  eps = 1e-6
  for i, t in [(1, 0), (1, 5), (2, 1), (3, 0), (5, 2), (4, 3)]:
    up, down = lp.copy(), lp.copy()
    up[i, t] += eps
    down[i, t] -= eps
    want = (np_loss(up) - np_loss(down)) / (2 * eps) if mask[i, t] else 0.0
    np.testing.assert_allclose(grad[i, t], want, rtol=1e-3, atol=1e-6, err_msg=f"{i},{t}")
  with pytest.raises(ValueError, match="needs cov_selected"):
    losses.loss_terms(cfg, f32(lp), f32(mask), f32(adv), weights, old_logprobs=f32(old),
                      ref_logprobs=f32(ref))


def test_update_step_exact_over_microbatches():
  cfg = losses.LossConfig(policy_loss="kl_cov", beta=0.04)
  optimizer = ts.make_optimizer(mw.OPTIM)
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  selected = covariance.select(batch.old_logprobs, batch.advantages, batch.completion_mask,
                               jax.random.key(0), kind="kl_cov", fraction=0.1, low=1.0, high=5.0)
  batch = batch.replace(ref_logprobs=batch.old_logprobs + 0.1, cov_selected=selected)
  results = [jax.jit(lambda s, b, m=m: ts.update_step(
      s, b, model_config=mw.MODEL, optimizer=optimizer, loss_cfg=cfg,
      num_microbatches=m))(ts.init_train_state(mw.init_params(), optimizer), batch)
      for m in (1, 4)]
  assert 0 < results[0][1]["cov_selected"] <= 0.2
  for name, value in results[0][1].items():
    np.testing.assert_allclose(results[1][1][name], value, rtol=2e-5, atol=1e-6, err_msg=name)


def test_settings_name_bad_values():
  from experiments.configs import arithmetic  # pylint: disable=import-outside-toplevel
  from grpo_jax import settings  # pylint: disable=import-outside-toplevel
  for field, value, says in (("cov_fraction", 0.0, "cov_fraction = 0.0 must be in"),
                             ("cov_low", 6.0, "cov_low < cov_high"),
                             ("kl_cov_coef", -1.0, "kl_cov_coef = -1.0")):
    cfg = arithmetic.get_config("smoke")
    cfg.grpo.loss.policy_loss = "clip_cov"
    setattr(cfg.grpo.loss, field, value)
    with pytest.raises(settings.ConfigError, match=f"config.grpo.loss: .*{says}"):
      settings.from_config(cfg, 1)


def test_a_run_restrains_the_tokens_it_chose(tmp_path):
  """Two GRPO steps with KL-Cov and length-bucketed micro-batches (the host's plan): the
  trainer chooses a cov_fraction of the batch's tokens and the update logs that share."""
  from experiments.configs import arithmetic  # pylint: disable=import-outside-toplevel
  from grpo_jax import metrics, trainer  # pylint: disable=import-outside-toplevel
  cfg = arithmetic.get_config("smoke")
  cfg.grpo.steps, cfg.eval.every, cfg.eval.k, cfg.grpo.num_prompts = 2, 0, 1, 8
  cfg.grpo.loss.policy_loss, cfg.grpo.loss.cov_fraction = "kl_cov", 0.05
  cfg.grpo.length_bucket, cfg.grpo.micro_batch_size = 8, 8
  trainer.train(cfg, str(tmp_path))
  rows = [r for r in metrics.read_metrics(tmp_path) if r.get("phase") == "grpo" and "loss" in r]
  assert len(rows) == 2
  for row in rows:
    assert np.isfinite(row["loss"]) and 0.03 < row["cov_selected"] <= 0.05, row
