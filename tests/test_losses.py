"""The GRPO loss against an independent NumPy reference, hand cases, gradients, micro-batching."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import losses, microbatches
from grpo_jax import train_step as ts

# ----------------------------------------------------------------------------- NumPy reference


def np_kl(lp, ref, est):
  d = ref - lp
  return {"k1": -d, "k2": d * d / 2, "k3": np.exp(d) - d - 1}[est]


def np_policy_term(policy, r, a, lp, eps_low, eps_high, tau=(1.0, 1.05)):
  """One token's policy objective (to maximise) in float64: the clip, CISPO or SAPO."""
  clipped = min(max(r, 1 - eps_low), 1 + eps_high)
  if policy == "cispo":  # the ratio capped above (no lower bound), a constant weight on log pi
    return min(r, 1 + eps_high) * a * lp
  if policy == "sapo":
    t = tau[0] if a > 0 else tau[1]
    return 4.0 / t / (1.0 + np.exp(-t * (r - 1.0))) * a
  return min(r * a, clipped * a)


def np_grpo_loss(lp, old, adv, mask, ref, loss_type, eps_low, eps_high, beta, est, level, max_len,
                 policy="clip", tau=(1.0, 1.05)):
  """Sequence by sequence, token by token, in float64."""
  B, T = lp.shape
  eps_high = eps_low if eps_high is None else eps_high
  if adv.ndim == 1:
    adv = np.repeat(adv[:, None], T, axis=1)
  per_tok = np.zeros((B, T))
  for i in range(B):
    n = mask[i].sum()
    seq_log_ratio = sum((lp[i, t] - old[i, t]) * mask[i, t] for t in range(T)) / max(n, 1)
    for t in range(T):
      log_ratio = seq_log_ratio if level == "sequence" else lp[i, t] - old[i, t]
      r = np.exp(log_ratio)
      a = adv[i, t]
      obj = np_policy_term(policy, r, a, lp[i, t], eps_low, eps_high, tau)
      per_tok[i, t] = -obj + (beta * np_kl(lp[i, t], ref[i, t], est) if beta else 0.0)
  if loss_type == "grpo":
    return np.mean([(per_tok[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(B)])
  if loss_type == "dapo":
    return (per_tok * mask).sum() / max(mask.sum(), 1)
  L = T if max_len is None else max_len
  return (per_tok * mask).sum() / (B * L)


def random_inputs(seed, B=6, T=7, adv_2d=False):
  rng = np.random.default_rng(seed)
  lp = -rng.uniform(0.1, 3.0, size=(B, T))
  old = lp + rng.normal(scale=0.3, size=(B, T))  # ratios well outside [0.8, 1.2] sometimes
  ref = lp + rng.normal(scale=0.5, size=(B, T))
  adv = rng.normal(size=(B, T) if adv_2d else (B,))
  lengths = rng.integers(0, T + 1, size=B)
  lengths[0] = 0  # an all-masked row
  lengths[1] = T
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
  return lp, old, adv, mask, ref


CLIPS = [(0.2, None), (0.2, 0.28), (0.1, 0.5)]


@pytest.mark.parametrize(
    "loss_type, est, level, clip",
    list(itertools.product(losses.LOSS_TYPES, losses.KL_ESTIMATORS, losses.IS_LEVELS, CLIPS)))
def test_loss_matches_numpy_reference(loss_type, est, level, clip):
  for seed, adv_2d in ((0, False), (1, True)):
    lp, old, adv, mask, ref = random_inputs(seed, adv_2d=adv_2d)
    kw = dict(loss_type=loss_type, epsilon_low=clip[0], epsilon_high=clip[1], beta=0.04,
              kl_estimator=est, importance_sampling_level=level, max_completion_length=10)
    want = np_grpo_loss(lp, old, adv, mask, ref, loss_type, clip[0], clip[1], 0.04, est, level, 10)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got, metrics = losses.grpo_loss(f32(lp), f32(old), f32(adv), f32(mask), ref_logprobs=f32(ref),
                                    **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-6)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_loss_jits_and_beta_zero_needs_no_reference():
  lp, old, adv, mask, _ = random_inputs(3)
  f = jax.jit(lambda *a: losses.grpo_loss(*a, loss_type="dapo"))
  got, metrics = f(*(jnp.asarray(x, jnp.float32) for x in (lp, old, adv, mask)))
  want = np_grpo_loss(lp, old, adv, mask, None, "dapo", 0.2, None, 0.0, "k3", "token", None)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert "kl" not in metrics


# ----------------------------------------------------------------------------- hand cases


def test_clip_active_on_each_side():
  # One token per sequence, mask 1, grpo aggregation = mean over the 4 sequences.
  log = np.log
  lp = jnp.array([[log(1.5)], [log(1.5)], [log(0.5)], [log(0.5)]], jnp.float32)
  old = jnp.zeros((4, 1))
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  loss, m = losses.grpo_loss(lp, old, adv, jnp.ones((4, 1)))
  # ratio 1.5, A=+1: clipped to 1.2 -> 1.2.   ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5.
  # ratio 0.5, A=+1: min(0.5, 0.8) = 0.5.     ratio 0.5, A=-1: clipped, min(-0.5, -0.8) = -0.8.
  np.testing.assert_allclose(float(loss), -(1.2 - 1.5 + 0.5 - 0.8) / 4, rtol=1e-6)
  assert float(m["clip_frac_high"]) == pytest.approx(0.25)
  assert float(m["clip_frac_low"]) == pytest.approx(0.25)
  assert float(m["clip_frac"]) == pytest.approx(0.5)
  assert float(m["ratio_mean"]) == pytest.approx(1.0)
  # Asymmetric clipping (DAPO clip-higher): eps_high = 0.6 lets ratio 1.5 through.
  loss_hi, m = losses.grpo_loss(lp, old, adv, jnp.ones((4, 1)), epsilon_high=0.6)
  np.testing.assert_allclose(float(loss_hi), -(1.5 - 1.5 + 0.5 - 0.8) / 4, rtol=1e-6)
  assert float(m["clip_frac_high"]) == 0.0


def test_gradient_is_zero_where_clipped():
  lp = jnp.array([[np.log(1.5), np.log(1.1)]], jnp.float32)
  g = jax.grad(lambda x: losses.grpo_loss(x, jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)))[0])(lp)
  # token 0 clipped (ratio 1.5 > 1.2 with A > 0): no gradient. token 1: d(-r/2)/dlp = -1.1/2.
  np.testing.assert_allclose(g, [[0.0, -0.55]], rtol=1e-6)


def test_all_masked_and_zero_spread():
  # An all-masked row must not give NaN and still counts among the B sequences.
  lp = jnp.full((2, 3), -1.0)
  mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  loss, m = losses.grpo_loss(lp, lp, jnp.array([2.0, 5.0]), mask)
  np.testing.assert_allclose(float(loss), -2.0 / 2, rtol=1e-6)  # row 0 gives -2, row 1 gives 0
  g = jax.grad(lambda x: losses.grpo_loss(x, lp, jnp.array([2.0, 5.0]), mask)[0])(lp)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1] == 0)
  # Zero advantages (a zero-spread group) and no KL: loss and gradient are exactly zero.
  loss, _ = losses.grpo_loss(lp, lp, jnp.zeros(2), mask)
  assert float(loss) == 0.0
  # Everything masked: finite and zero under every loss type.
  for lt in losses.LOSS_TYPES:
    loss, m = losses.grpo_loss(lp, lp, jnp.ones(2), jnp.zeros((2, 3)), loss_type=lt)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())


def test_negative_advantage_dapo_and_dr_grpo_hand_values():
  lp = jnp.zeros((2, 4))
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.float32)
  adv = jnp.array([-1.0, 3.0])
  # ratio 1 everywhere, l = -A per token.  token sums: row0 = 4, row1 = -6.
  for lt, want in (("grpo", (4 / 4 - 6 / 2) / 2), ("dapo", (4 - 6) / 6),
                   ("dr_grpo", (4 - 6) / (2 * 4))):
    loss, m = losses.grpo_loss(lp, lp, adv, mask, loss_type=lt)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, err_msg=lt)
  loss, _ = losses.grpo_loss(lp, lp, adv, mask, loss_type="dr_grpo", max_completion_length=8)
  np.testing.assert_allclose(float(loss), -2 / 16, rtol=1e-6)
  assert float(m["advantage_mean"]) == pytest.approx(1.0)
  assert float(m["advantage_std"]) == pytest.approx(2.0)
  assert float(m["completion_length"]) == pytest.approx(3.0)


def test_a_runs_dr_grpo_length_is_the_samplers_budget_at_any_batch_width():
  """L = grpo.max_completion_length + 1 (the sampler's budget, room for the EOS), where TRL
  divides by its max_completion_length (losses.py's docstring), also for a batch trimmed to
  fewer columns (`updates.trim`)."""
  from experiments.configs import arithmetic as arithmetic_config
  from grpo_jax import settings
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.loss.update(loss_type="dr_grpo", beta=0.04)
  loss_cfg = settings.from_config(cfg, 1).grpo.loss
  budget = cfg.grpo.max_completion_length + 1
  assert loss_cfg.max_completion_length == budget == 25
  lp, old, adv, mask, ref = random_inputs(5, T=7)
  weights = losses.loss_weights(mask, loss_type="dr_grpo",
                                max_completion_length=loss_cfg.max_completion_length)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  loss, _ = losses.loss_terms(loss_cfg, f32(lp), f32(mask), f32(adv), weights,
                              old_logprobs=f32(old), ref_logprobs=f32(ref))
  want = np_grpo_loss(lp, old, adv, mask, ref, "dr_grpo", loss_cfg.epsilon_low,
                      loss_cfg.epsilon_high, 0.04, "k3", "token", budget)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # TRL's constant for the same config number would be 25 / 24 of this loss.
  assert abs(want * budget / (budget - 1) - float(loss)) > 1e-3 * abs(want)


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("est", losses.KL_ESTIMATORS)
def test_kl_values(est):
  lp, ref = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -1.0, -0.5])
  np.testing.assert_allclose(losses.kl_penalty(jnp.asarray(lp), jnp.asarray(ref), est),
                             np_kl(lp, ref, est), rtol=1e-6)


def test_k3_zero_value_and_gradient_at_reference():
  lp = jnp.asarray(-np.random.default_rng(0).uniform(0.1, 3, size=(3, 5)), jnp.float32)
  mask = jnp.ones((3, 5))
  f = lambda x: losses.grpo_loss(x, jax.lax.stop_gradient(x), jnp.zeros(3), mask,
                                 ref_logprobs=lp, beta=0.5)
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
  assert float(loss) == 0.0 and float(m["kl"]) == 0.0
  np.testing.assert_array_equal(g, 0.0)


def test_kl_gradient_matches_analytic():
  # k3 = exp(d) - d - 1, d = ref - lp: d k3 / d lp = 1 - exp(ref - lp).  grpo mean over 1 seq of 2.
  lp = jnp.array([[-1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.0]])
  g = jax.grad(lambda x: losses.grpo_loss(x, jax.lax.stop_gradient(x), jnp.zeros(1), jnp.ones((1, 2)),
                                          ref_logprobs=ref, beta=0.1)[0])(lp)
  np.testing.assert_allclose(g, 0.1 * (1 - np.exp(ref - lp)) / 2, rtol=1e-6)


def test_gradient_against_finite_differences():
  lp, old, adv, mask, ref = random_inputs(5, B=3, T=4, adv_2d=True)
  kw = dict(ref_logprobs=ref, beta=0.1, kl_estimator="k3", loss_type="dapo",
            importance_sampling_level="sequence")
  x64 = jnp.asarray(lp, jnp.float32)
  g = np.asarray(jax.grad(lambda x: losses.grpo_loss(x, old, adv, mask, **kw)[0])(x64))
  h = 1e-6
  for i, t in itertools.product(range(3), range(4)):
    e = np.zeros_like(lp)
    e[i, t] = h
    num = (np_grpo_loss(lp + e, old, adv, mask, ref, "dapo", 0.2, None, 0.1, "k3", "sequence", None)
           - np_grpo_loss(lp - e, old, adv, mask, ref, "dapo", 0.2, None, 0.1, "k3", "sequence",
                          None)) / (2 * h)
    np.testing.assert_allclose(g[i, t], num, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_and_entropy_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3, size=(2, 3, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(2, 3))
  for temp in (1.0, 0.7):
    z = logits.astype(np.float64) / temp
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ts.token_logprobs(logits, targets, temperature=temp), want,
                               rtol=1e-5, atol=1e-6)
    want_h = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(ts.token_entropy(logits, temperature=temp), want_h, rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match="targets"):
    ts.token_logprobs(logits, targets[:, :2])


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
    losses.grpo_loss(x, x, jnp.zeros(2), x, loss_type="ppo")
  with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
    losses.grpo_loss(x, x, jnp.zeros(2), x, kl_estimator="k4")
  with pytest.raises(ValueError, match="importance_sampling_level"):
    losses.grpo_loss(x, x, jnp.zeros(2), x, importance_sampling_level="group")
  with pytest.raises(ValueError, match="old_logprobs has shape"):
    losses.grpo_loss(x, jnp.zeros((2, 4)), jnp.zeros(2), x)
  with pytest.raises(ValueError, match="advantages must be"):
    losses.grpo_loss(x, x, jnp.zeros(3), x)
  with pytest.raises(ValueError, match="needs ref_logprobs"):
    losses.grpo_loss(x, x, jnp.zeros(2), x, beta=0.04)
  with pytest.raises(ValueError, match="not divisible"):
    microbatches.split_microbatches({"a": jnp.zeros((6, 2))}, 4)


# ----------------------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("level", losses.IS_LEVELS)
def test_microbatched_gradient_equals_full_batch(loss_type, level):
  """A tiny log-linear policy; the loss's gradient w.r.t. its weights over 1, 2, 4 micro-batches."""
  B, T, F, V = 8, 5, 3, 7
  rng = np.random.default_rng(7)
  feats = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
  params = {"w": jnp.asarray(rng.normal(size=(F, V)), jnp.float32)}
  lengths = np.array([0, 5, 3, 1, 5, 2, 4, 5])  # ragged, with an empty row
  mask = jnp.asarray(np.arange(T)[None] < lengths[:, None], jnp.float32)
  old = jnp.asarray(-rng.uniform(1, 3, size=(B, T)), jnp.float32)
  ref = jnp.asarray(-rng.uniform(1, 3, size=(B, T)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=B), jnp.float32)
  weights = losses.loss_weights(mask, loss_type=loss_type, max_completion_length=6)
  batch = dict(feats=feats, targets=targets, mask=mask, old=old, ref=ref, adv=adv, weights=weights)

  def terms(p, mb):
    lp = ts.token_logprobs(mb["feats"] @ p["w"], mb["targets"])
    return losses.grpo_loss_terms(lp, mb["old"], mb["adv"], mb["mask"], mb["weights"],
                                  ref_logprobs=mb["ref"], beta=0.04,
                                  importance_sampling_level=level)

  def full(p):
    lp = ts.token_logprobs(feats @ p["w"], targets)
    return losses.grpo_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
                            importance_sampling_level=level, max_completion_length=6)

  (want_loss, want_m), want_g = jax.value_and_grad(full, has_aux=True)(params)
  for m in (1, 2, 4):
    loss, sums, g = jax.jit(microbatches.accumulate_gradients, static_argnums=(0, 3))(
        terms, params, batch, m)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["w"], want_g["w"], rtol=1e-5, atol=1e-7)
    got_m = losses.finalize_metrics(sums)
    for k, v in want_m.items():
      np.testing.assert_allclose(got_m[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_split_microbatches_is_strided():
  x = jnp.arange(8)
  np.testing.assert_array_equal(microbatches.split_microbatches(x, 2), [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_sft_loss_is_advantage_weighted_nll():
  rng = np.random.default_rng(3)
  lp = jnp.asarray(-rng.uniform(0.1, 3, size=(3, 4)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
  adv = jnp.asarray([1.0, 0.0, 1.0])  # RFT: only the correct samples carry gradient
  w = losses.loss_weights(mask, loss_type="dapo")
  loss, sums = losses.sft_loss_terms(lp, mask, adv, w)
  want = -(np.asarray(lp)[0, :3].sum()) / 4  # row 1 has A = 0, row 2 is empty; 4 valid tokens
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(sums["nll"]), -(np.asarray(lp) * np.asarray(mask)).sum() / 4,
                             rtol=1e-6)


@pytest.mark.parametrize("policy", ["cispo", "sapo"])
@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("level", losses.IS_LEVELS)
def test_cispo_and_sapo_match_numpy_reference(policy, loss_type, level):
  lp, old, adv, mask, ref = random_inputs(3, adv_2d=loss_type == "dapo")
  tau = (0.7, 1.3)
  want = np_grpo_loss(lp, old, adv, mask, ref, loss_type, 0.2, 0.28, 0.04, "k3", level, None,
                      policy=policy, tau=tau)
  got, metrics = losses.grpo_loss(
      jnp.asarray(lp, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
      jnp.asarray(mask, jnp.float32), ref_logprobs=jnp.asarray(ref, jnp.float32),
      loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
      importance_sampling_level=level, policy_loss=policy, sapo_tau=tau)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["kl"]))


@pytest.mark.parametrize("policy", ["cispo", "sapo"])
def test_cispo_and_sapo_gradients_match_their_equations(policy):
  """d loss / d log pi per token, token-level ratios, dapo weights w = mask / sum(mask):
  CISPO -w min(r, 1 + eps_high) A (never zero: no token is dropped); SAPO -w 4 s (1 - s) r A with
  s = sigmoid(tau (r - 1)), which is -w A on-policy (r = 1)."""
  lp, old, adv, mask, _ = random_inputs(4, adv_2d=True)
  fn = lambda x, o: losses.grpo_loss(  # noqa: E731
      x, o, jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32), loss_type="dapo",
      epsilon_low=0.2, epsilon_high=0.28, policy_loss=policy, sapo_tau=(1.0, 1.05))[0]
  w = mask / mask.sum()
  for old_lp in (old, lp):  # off-policy, then on-policy (r = 1)
    got = np.asarray(jax.grad(fn)(jnp.asarray(lp, jnp.float32), jnp.asarray(old_lp, jnp.float32)))
    r = np.exp(lp - old_lp)
    if policy == "cispo":
      want = -w * np.minimum(r, 1.28) * adv
    else:
      tau = np.where(adv > 0, 1.0, 1.05)
      s = 1.0 / (1.0 + np.exp(-tau * (r - 1.0)))
      want = -w * 4.0 * s * (1.0 - s) * r * adv
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got, -w * adv, rtol=1e-5, atol=1e-7)  # on-policy: the plain PG
  if policy == "cispo":  # ratios far outside the band keep a (clipped) gradient
    far = np.asarray(jax.grad(fn)(jnp.asarray(lp, jnp.float32), jnp.asarray(lp - 2.0, jnp.float32)))
    assert np.all(np.abs(far[mask > 0]) > 0)


def test_policy_loss_settings_are_checked():
  with pytest.raises(ValueError, match="policy_loss"):
    losses.LossConfig(policy_loss="ppo2")
  with pytest.raises(ValueError, match="sapo_tau_pos"):
    losses.LossConfig(policy_loss="sapo", sapo_tau_pos=0.0)
  with pytest.raises(ValueError, match="policy_loss"):
    losses.grpo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                     policy_loss="clipp")


def test_entropy_is_logged_as_a_token_mean_and_its_bonus_follows_the_loss_weights():
  lp, old, adv, mask, _ = random_inputs(5)
  ent = np.random.default_rng(5).uniform(0.0, 3.0, size=lp.shape)
  args = [jnp.asarray(x, jnp.float32) for x in (lp, mask, adv)]
  weights = losses.loss_weights(args[1], loss_type="grpo")
  base, sums = losses.loss_terms(losses.LossConfig(), *args, weights,
                                 old_logprobs=jnp.asarray(old, jnp.float32),
                                 entropy=jnp.asarray(ent, jnp.float32))
  np.testing.assert_allclose(float(sums["entropy"]), (ent * mask).sum() / mask.sum(), rtol=1e-6)
  bonus, _ = losses.loss_terms(losses.LossConfig(entropy_coef=0.1), *args, weights,
                               old_logprobs=jnp.asarray(old, jnp.float32),
                               entropy=jnp.asarray(ent, jnp.float32))
  per_seq = [(ent[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(len(mask))]
  np.testing.assert_allclose(float(bonus), float(base) - 0.1 * np.mean(per_seq), rtol=1e-5)
  with pytest.raises(ValueError, match="entropy_coef"):
    losses.LossConfig(entropy_coef=-1.0)
