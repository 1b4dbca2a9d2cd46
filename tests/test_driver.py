"""The driver's pieces: settings checks, the paradigm table, rollout lengths, evaluation keys,
per-rollout metric aggregation, and one compile per jitted program across a run."""

import dataclasses

import jax
import numpy as np
import pytest

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import (evaluation, experiment, metrics, paradigms, reward_table, rollout,
                      samplers, settings, trainer, updates)
from grpo_jax.rewards import overlong_penalty_reward


def _settings(cfg, num_devices=1):
  return settings.from_config(cfg, num_devices)


def test_paradigm_table_is_the_only_switch():
  assert paradigms.lookup("grpo", "process") == ("policy", "process", "grpo")
  assert paradigms.lookup("rft", "outcome").data == "frozen_policy"
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.algorithm, cfg.grpo.supervision = "online_rft", "process"
  with pytest.raises(settings.ConfigError, match="grpo/process"):  # lists the known rows
    _settings(cfg)


@pytest.mark.parametrize("field, value", [("ref_ema", 0.1), ("ref_reset_every", 2)])
def test_rft_with_a_moving_reference_is_rejected(field, value):
  """RFT's frozen sampling policy lives in the reference slot: nothing may move it."""
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.algorithm, cfg.grpo.loss.beta = "rft", 0.04
  cfg.grpo[field] = value
  with pytest.raises(settings.ConfigError, match=f"config.grpo.{field}"):
    _settings(cfg)
  cfg.grpo.algorithm = "online_rft"  # the live policy samples: the reference may move
  _settings(cfg)


def test_bad_fields_name_themselves():
  cfg = arithmetic_config.get_config("smoke")
  cfg.checkpoint.keep = 1
  with pytest.raises(settings.ConfigError, match="config.checkpoint.keep = 1"):
    _settings(cfg)
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.loss.kl_estimator = "k9"
  with pytest.raises(settings.ConfigError, match="config.grpo.loss.*k9"):
    _settings(cfg)
  cfg = arithmetic_config.get_config("smoke")
  del cfg.eval["k"]
  with pytest.raises(settings.ConfigError, match="config.eval.k is missing"):
    _settings(cfg)


def test_overlong_penalty_does_not_count_the_eos():
  """L = 10, L_cache = 4: a completion of L - L_cache = 6 tokens + EOS is not penalised; one of
  exactly L tokens + EOS gets the ramp's end (-1); a truncated one (no EOS, L + 1 tokens) -1."""
  C = 11  # the sampler's budget: L + 1
  real = [6, 7, 10, 11]
  truncated = np.array([False, False, False, True])
  mask = np.zeros((4, C), np.int32)
  for i, n in enumerate(real):
    mask[i, :n + (not truncated[i])] = 1  # the EOS is in the mask
  lengths = samplers.completion_lengths(mask, truncated)
  np.testing.assert_array_equal(lengths, real)
  penalty = overlong_penalty_reward([""] * 4, completion_length=lengths.tolist(), max_length=10,
                                    cache_length=4)
  np.testing.assert_allclose(penalty, [0.0, -0.25, -1.0, -1.0])


def test_aggregate_reports_mean_first_and_last_of_mu_updates():
  one = updates.aggregate([{"loss": 1.5, "kl": 0.1, "skipped": 0.0}])
  assert one == {"loss": 1.5, "kl": 0.1, "skipped": 0.0}  # mu = 1: the values themselves
  three = updates.aggregate([{"loss": 1.0, "skipped": 0.0}, {"loss": 2.0, "skipped": 1.0},
                             {"loss": 6.0, "skipped": 1.0}])
  assert three == {"loss": 3.0, "loss/first": 1.0, "loss/last": 6.0, "skipped": 2.0}


@pytest.fixture(scope="module")
def driver_run(tmp_path_factory):
  """One in-process smoke run with mu = 2, a KL, truncation masking and a tight length budget
  (most completions truncated), recording every rollout."""
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.num_iterations, cfg.grpo.loss.beta = 2, 0.04
  cfg.grpo.mask_truncated_completions, cfg.grpo.max_completion_length = True, 6
  cfg.grpo.num_prompts = 8
  cfg.model.overrides.num_layers = 1  # nothing here depends on the depth: smaller compiles
  workdir = str(tmp_path_factory.mktemp("driver"))
  rollouts, real = [], rollout.collect
  with pytest.MonkeyPatch.context() as mp:
    # Every other completion rewarded: advantages with spread, so the policy moves.
    alternate = lambda completions, **_: [float(i % 2) for i in range(len(completions))]  # noqa: E731
    mp.setattr(reward_table, "reward_functions",
               lambda r, rm, extra=None: reward_table.Rewards((alternate,), ("alt",), (1.0,)))
    exp = experiment.build(_settings(cfg, jax.device_count()), workdir)
    mp.setattr(rollout, "collect", lambda *a, **k: (lambda out: (rollouts.append(out[0]), out)[1])(
        real(*a, **k)))
    trainer.run(exp)
  return exp, rollouts, metrics.read_metrics(workdir)


def test_each_program_compiles_once_per_run(driver_run):
  exp, _, _ = driver_run
  p = exp.device.programs
  for name in ("policy_update", "logprobs", "sft_update"):
    assert getattr(p, name)._cache_size() == 1, name  # pylint: disable=protected-access
  for name in ("sample_train", "sample_greedy", "sample_eval_k"):
    assert getattr(p, name).compiles() == 1, name


def test_logged_lengths_count_truncated_completions(driver_run):
  _, rollouts, rows = driver_run
  grpo = [r for r in rows if r["phase"] == "grpo" and "reward" in r]
  assert len(grpo) == len(rollouts) == 4
  for row, roll in zip(grpo, rollouts):
    assert row["truncated_fraction"] == pytest.approx(roll.truncated_N.mean())
    # the real mean length, not the loss's (where masked truncated rows count 0 tokens)
    assert row["completion_length"] == pytest.approx(roll.mask_NxC.sum(1).mean())
  assert any(0 < r["truncated_fraction"] for r in grpo)
  assert all(r["completion_length"] > 0 for r in grpo)


def test_mu_updates_log_mean_first_and_last(driver_run):
  _, _, rows = driver_run
  for row in (r for r in rows if r["phase"] == "grpo" and "reward" in r):
    for name in ("loss", "kl", "clip_frac"):
      assert row[name] == pytest.approx((row[f"{name}/first"] + row[f"{name}/last"]) / 2)
    if row["step"] == 1:  # step 1's first update: the policy is the reference, bit for bit
      assert row["kl/first"] == 0.0


def test_eval_batches_draw_different_keys(driver_run):
  exp, _, _ = driver_run
  keys, real = [], exp.device.programs.sample_eval_k

  class Recording:  # the sampler protocol, recording the keys it is given
    mesh, num_samples = real.mesh, real.num_samples

    def __call__(self, params, ids, mask, key, records):
      keys.append(np.asarray(jax.random.key_data(key)).tobytes())
      return real(params, ids, mask, key, records)

  e = dataclasses.replace(exp.settings.eval, num_problems=32, pass_k_problems=32)
  programs = dataclasses.replace(exp.device.programs, sample_eval_k=Recording())
  params = experiment.init_state(exp.device, exp.keys, "grpo").params
  result = evaluation.evaluate(exp.data, programs, e, params, exp.keys, step=3)
  # 32 problems, 8 per batch (one per device of the 8 simulated): 4 batches, 4 distinct keys
  assert len(keys) == 4 and len(set(keys)) == 4
  assert 0.0 <= result.pass_at_k <= 1.0
