"""Rollout-mismatch corrections (TIS, MIS, IcePop) against a NumPy oracle, through the loss, the
update (exact over micro-batches and length buckets), and a rollout's own sampler log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_worker as mw
from grpo_jax import corrections, losses
from grpo_jax import train_step as ts
from test_losses import random_inputs

KINDS = corrections.CORRECTIONS


def np_weights(old, sampler, mask, kind, cap, low, high):
  """Token by token (and sequence by sequence for MIS) in float64: weights, masked, clipped."""
  B, T = old.shape
  w, masked, clipped = np.ones((B, T)), np.zeros((B, T)), np.zeros((B, T))
  for i in range(B):
    rho_seq = np.exp(sum(old[i, t] - sampler[i, t] for t in range(T) if mask[i, t]))
    for t in range(T):
      if not mask[i, t]:
        continue
      rho = np.exp(old[i, t] - sampler[i, t])
      if kind == "tis":
        w[i, t], clipped[i, t] = min(rho, cap), rho > cap
      elif kind == "mis":
        keep = low <= rho_seq <= high
        w[i, t], masked[i, t] = (rho_seq if keep else 0.0), not keep
      elif kind == "icepop":
        keep = low <= rho <= high
        w[i, t], masked[i, t] = (rho if keep else 0.0), not keep
  return w, masked, clipped


def mismatched(seed, B=8, T=6):
  """Random inputs whose sampler log-probs differ from the old ones by up to ~2x per token, and
  rows short enough that some sequences fall inside the MIS band and some outside."""
  lp, old, adv, mask, ref = random_inputs(seed, B=B, T=T)
  rng = np.random.default_rng(seed + 100)
  sampler = old + rng.normal(scale=0.4, size=old.shape)
  return lp, old, adv, mask, ref, sampler


@pytest.mark.parametrize("kind", KINDS)
def test_weights_and_figures_match_numpy(kind):
  _, old, _, mask, _, sampler = mismatched(0)
  c = corrections.Correction(kind, cap=1.3, low=0.6, high=1.5)
  w, tokens = corrections.mismatch_weights(jnp.asarray(old, jnp.float32),
                                           jnp.asarray(sampler, jnp.float32),
                                           jnp.asarray(mask, jnp.float32), c)
  want_w, want_masked, want_clipped = np_weights(old, sampler, mask, kind, 1.3, 0.6, 1.5)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
  sums = corrections.token_sums(tokens, jnp.asarray(mask / mask.sum(), jnp.float32))
  log_rho = (old - sampler)[mask > 0]
  want = {"mismatch/kl": np.mean(np.expm1(log_rho) - log_rho),
          "mismatch/ratio_mean": np.mean(np.exp(log_rho)),
          "mismatch/ratio_max": np.exp(log_rho).max()}
  if kind == "tis":
    want["mismatch/clipped"] = want_clipped[mask > 0].mean()
    assert 0 < want["mismatch/clipped"] < 1  # the inputs exercise both sides of the cap
  if kind in ("mis", "icepop"):
    want["mismatch/masked"] = want_masked[mask > 0].mean()
    assert 0 < want["mismatch/masked"] < 1
  assert sums.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_allclose(sums[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_corrected_loss_and_gradient_match_numpy(kind, loss_type):
  """The policy term weighted by the NumPy weights, the KL term not: value, and the gradient
  w.r.t. the log-probs by central differences of the NumPy loss."""
  lp, old, adv, mask, ref, sampler = mismatched(1)
  c = corrections.Correction(kind, cap=1.3, low=0.6, high=1.5)
  w, _, _ = np_weights(old, sampler, mask, kind, 1.3, 0.6, 1.5)
  beta = 0.05

  def np_loss(lp):  # the clipped policy term per token, weighted; the KL term unweighted
    B, T = lp.shape
    total = np.zeros((B, T))
    for i in range(B):
      for t in range(T):
        r = np.exp(lp[i, t] - old[i, t])
        clip = min(max(r, 0.8), 1.28)
        kl = np.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
        total[i, t] = -min(r * adv[i], clip * adv[i]) * w[i, t] + beta * kl
    if loss_type == "dapo":
      return (total * mask).sum() / max(mask.sum(), 1)
    return np.mean([(total[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(B)])

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  loss_fn = lambda lp: losses.grpo_loss(  # noqa: E731
      lp, f32(old), f32(adv), f32(mask), ref_logprobs=f32(ref), loss_type=loss_type,
      epsilon_high=0.28, beta=beta, sampler_logprobs=f32(sampler), correction=c)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(lp))
  np.testing.assert_allclose(loss, np_loss(lp), rtol=1e-5, atol=1e-6)
  eps = 1e-6
  for i, t in [(1, 0), (1, 5), (2, 1), (3, 0), (5, 2)]:
    up, down = lp.copy(), lp.copy()
    up[i, t] += eps
    down[i, t] -= eps
    want = (np_loss(up) - np_loss(down)) / (2 * eps) if mask[i, t] else 0.0
    np.testing.assert_allclose(grad[i, t], want, rtol=1e-3, atol=1e-6, err_msg=f"{i},{t}")
  assert "mismatch/kl" in metrics


def test_no_sampler_logprobs_no_correction_and_none_leaves_the_loss_alone():
  lp, old, adv, mask, ref, sampler = (jnp.asarray(x, jnp.float32) for x in mismatched(2))
  plain, m0 = losses.grpo_loss(lp, old, adv, mask)
  measured, m1 = losses.grpo_loss(lp, old, adv, mask, sampler_logprobs=sampler)
  np.testing.assert_array_equal(plain, measured)
  assert not any(k.startswith("mismatch/") for k in m0)
  assert {"mismatch/kl", "mismatch/ratio_mean", "mismatch/ratio_max"} <= m1.keys()
  # Sampler = trainer: weights 1 whatever the kind, KL 0, ratio 1.
  for kind in KINDS:
    same, m = losses.grpo_loss(lp, old, adv, mask, sampler_logprobs=old,
                               correction=corrections.Correction(kind, low=0.9, high=1.1))
    np.testing.assert_allclose(same, plain, rtol=1e-6)
    np.testing.assert_allclose(m["mismatch/kl"], 0.0, atol=1e-7)
    np.testing.assert_allclose(m["mismatch/ratio_max"], 1.0, rtol=1e-6)


def test_extreme_sequence_ratios_drop_without_nans():
  """A long sequence whose product of ratios overflows float32 is dropped by MIS, with a finite
  loss and gradient."""
  T = 400
  old = jnp.zeros((2, T))
  sampler = jnp.full((2, T), -1.0).at[1].set(0.0)  # row 0: rho_seq = e^400 (inf in float32)
  mask, adv = jnp.ones((2, T)), jnp.array([1.0, -1.0])
  loss_fn = lambda lp: losses.grpo_loss(  # noqa: E731
      lp, old, adv, mask, sampler_logprobs=sampler,
      correction=corrections.Correction("mis"))[0]
  loss, grad = jax.value_and_grad(loss_fn)(jnp.zeros((2, T)))
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0], 0.0)
  assert np.all(grad[1] != 0.0)


@pytest.mark.parametrize("kind", ["tis"])  # the weights of every kind: the NumPy tests above
def test_update_step_exact_over_microbatches_with_the_max_kept(kind):
  """Through the trainer's update: micro-batches sum to the full batch (ratio_max combined by
  its maximum, not summed), and the loss is `grpo_loss`'s on the step's own log-probs."""
  cfg = losses.LossConfig(beta=0.04, correction=corrections.Correction(kind, cap=1.2,
                                                                       low=0.8, high=1.3))
  optimizer = ts.make_optimizer(mw.OPTIM)
  params = mw.init_params()
  batch = jax.tree.map(jnp.asarray, mw.make_batch())
  rng = np.random.default_rng(0)
  sampler = batch.old_logprobs + rng.normal(scale=0.3, size=batch.old_logprobs.shape)
  batch = batch.replace(ref_logprobs=batch.old_logprobs + 0.1,
                        sampler_logprobs=jnp.asarray(sampler, jnp.float32))
  results = [jax.jit(lambda s, b, m=m: ts.update_step(
      s, b, model_config=mw.MODEL, optimizer=optimizer, loss_cfg=cfg,
      num_microbatches=m))(ts.init_train_state(params, optimizer), batch) for m in (1, 4)]
  for name, value in results[0][1].items():
    np.testing.assert_allclose(results[1][1][name], value, rtol=2e-5, atol=1e-6, err_msg=name)
  mask = np.asarray(batch.completion_mask) > 0
  np.testing.assert_allclose(results[0][1]["mismatch/ratio_max"],
                             np.exp(np.asarray(batch.old_logprobs - batch.sampler_logprobs))[
                                 mask].max(), rtol=1e-5)
  logprobs = ts.sequence_logprobs(params, batch, model_config=mw.MODEL)
  want, _ = losses.grpo_loss(logprobs, batch.old_logprobs, batch.advantages,
                             batch.completion_mask, ref_logprobs=batch.ref_logprobs, beta=0.04,
                             sampler_logprobs=batch.sampler_logprobs, correction=cfg.correction)
  np.testing.assert_allclose(results[0][1]["loss"], want, rtol=2e-5, atol=1e-6)


def test_settings_read_the_correction_and_name_a_bad_one():
  from experiments.configs import arithmetic  # pylint: disable=import-outside-toplevel
  from grpo_jax import settings  # pylint: disable=import-outside-toplevel
  cfg = arithmetic.get_config("smoke")
  cfg.grpo.loss.correction, cfg.grpo.loss.correction_cap = "tis", 3.0
  got = settings.from_config(cfg, 1).grpo.loss.correction
  assert got == corrections.Correction("tis", cap=3.0, low=0.5, high=2.0)
  for field, value, says in (("correction", "ips", "unknown kind 'ips'"),
                             ("correction_low", 2.5, "low < high")):
    bad = arithmetic.get_config("smoke")
    setattr(bad.grpo.loss, field, value)
    with pytest.raises(settings.ConfigError, match=f"config.grpo.loss: .*{says}"):
      settings.from_config(bad, 1)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """Two GRPO steps of the smoke run with TIS, the sampler in float32 and in bfloat16 (the
  trainer's master weights and update in float32 both times)."""
  from experiments.configs import arithmetic  # pylint: disable=import-outside-toplevel
  from grpo_jax import metrics, trainer  # pylint: disable=import-outside-toplevel
  rows = {}
  for dtype in ("float32", "bfloat16"):
    cfg = arithmetic.get_config("smoke")
    cfg.grpo.steps, cfg.eval.every, cfg.model.dtype = 2, 0, dtype
    cfg.grpo.num_prompts, cfg.eval.k = 8, 1  # over the 8 simulated devices; no pass@k
    cfg.grpo.loss.correction = "tis"
    workdir = tmp_path_factory.mktemp(dtype)
    trainer.train(cfg, str(workdir))
    rows[dtype] = [r for r in metrics.read_metrics(workdir)
                   if r.get("phase") == "grpo" and "loss" in r]
  return rows


def test_a_run_measures_the_samplers_own_logprobs(smoke_runs):
  """The sampler's log-probs reach the update aligned with its tokens: with the sampler in
  float32 they are the trainer's up to float rounding (a shifted or wrong row would be off by
  nats); a bfloat16 sampler is measurably different, and TIS weighs it."""
  f32, bf16 = smoke_runs["float32"], smoke_runs["bfloat16"]
  assert len(f32) == len(bf16) == 2
  for row in f32:
    assert 0 <= row["mismatch/kl"] < 1e-6, row
    assert abs(row["mismatch/ratio_mean"] - 1) < 1e-3 and row["mismatch/ratio_max"] < 1.01
    assert row["mismatch/clipped"] == 0
  for row in bf16:
    assert np.isfinite(row["loss"]) and row["mismatch/kl"] > 0
    assert row["mismatch/ratio_max"] > max(r["mismatch/ratio_max"] for r in f32)
  assert (np.mean([r["mismatch/kl"] for r in bf16])
          > 100 * max(np.mean([r["mismatch/kl"] for r in f32]), 1e-9))
