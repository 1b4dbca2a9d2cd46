"""Host / device overlap in the trainer's GRPO step: the log-prob passes are queued before the
host decodes texts and scores rewards, the update before the step's host bookkeeping, and the
batch the update gets is exactly `updates.with_logprobs`' of the same rollout (the unoverlapped
step), with and without length buckets, with per-token advantages, and under dynamic sampling
(where the rows are only known after scoring)."""

import jax
import numpy as np
import pytest

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import (advantages, experiment, metrics, reward_table, rollout, settings, trainer,
                      updates, weights)


@pytest.mark.parametrize("variant", ["process_supervision", "length_buckets_dynamic_sampling"])
def test_step_overlaps_host_work_and_updates_on_the_unoverlapped_batch(tmp_path, variant):
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.num_iterations, cfg.grpo.loss.beta = 2, 0.04  # both passes: ref and old
  cfg.grpo.mask_truncated_completions, cfg.grpo.steps, cfg.grpo.num_prompts = True, 2, 8
  cfg.model.overrides.num_layers = 1
  cfg.eval.every = 0
  if variant == "process_supervision":  # [N, C] advantages, cut to the batch's width
    cfg.grpo.supervision = "process"
  else:
    cfg.grpo.length_bucket, cfg.grpo.micro_batch_size = 8, 8
    cfg.grpo.dynamic_sampling, cfg.grpo.max_resample_rounds = True, 1
  events, checked = [], []
  seen = {}
  with pytest.MonkeyPatch.context() as mp:
    alternate = lambda completions, **_: (events.append("score"),  # noqa: E731
                                          [float(i % 2) for i in range(len(completions))])[1]
    mp.setattr(reward_table, "reward_functions",
               lambda r, rm, extra=None: reward_table.Rewards((alternate,), ("alt",), (1.0,)))
    exp = experiment.build(settings.from_config(cfg, jax.device_count()), str(tmp_path))
    decode = exp.data.tokenizer.decode_batch
    mp.setattr(exp.data.tokenizer, "decode_batch",
               lambda *a, **k: (events.append("decode"), decode(*a, **k))[1])
    real_start, real_collect = updates.start_logprobs, rollout.collect
    real_coefficients, real_dispatch = advantages.coefficients, updates.dispatch_update

    def start(device, g, policy, ref, batch):
      events.append("start")
      seen.update(policy=policy, ref=ref)
      return real_start(device, g, policy, ref, batch)

    def collect(*a, **k):
      events.append("collect")
      roll, position = real_collect(*a, **k)
      seen["roll"] = roll
      return roll, position

    def coefficients(*a, **k):
      seen["adv"] = real_coefficients(*a, **k)
      return seen["adv"]

    def dispatch(device, g, state, ready, frozen=None):
      events.append("update")
      roll = seen["roll"]
      expected = updates.finish(device, real_start(device, g, seen["policy"], seen["ref"],
                                                   rollout.train_batch(
          roll, seen["adv"], mask_truncated=True)), seen["adv"])  # = updates.with_logprobs
      assert (ready.plan is None) == (expected.plan is None)
      got, expected = jax.device_get((ready.batch, expected.batch))
      for field in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask",
                    "advantages", "ref_logprobs", "old_logprobs"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field),
                                      err_msg=field)
      checked.append(got.completion_tokens.shape)
      return real_dispatch(device, g, state, ready, frozen)

    mp.setattr(updates, "start_logprobs", start)
    mp.setattr(rollout, "collect", collect)
    mp.setattr(advantages, "coefficients", coefficients)
    mp.setattr(updates, "dispatch_update", dispatch)
    trainer.run(exp)

  assert len(checked) == 2  # both steps compared
  # a step's events: from its rollout to its update (evaluation decodes outside them)
  steps, current = [], None
  for e in events:
    if e == "collect":
      current = []
    elif current is not None:
      current.append(e)
      if e == "update":
        steps.append(current)
        current = None
  assert len(steps) == 2
  for step_events in steps:
    first_start = step_events.index("start")
    if variant == "process_supervision":
      # queued before the texts were decoded and scored
      assert first_start < step_events.index("decode") < step_events.index("score"), step_events
    else:  # dynamic sampling: the kept rows are known only after scoring
      assert step_events.index("score") < first_start, step_events
  if variant == "process_supervision":
    assert seen["adv"].ndim == 2
  rows = [r for r in metrics.read_metrics(str(tmp_path)) if r["phase"] == "grpo"
          and "step_s" in r]
  assert len(rows) == 2
  for r in rows:
    assert 0 <= r["wait_s"] <= r["update_s"] <= r["step_s"]
    assert r["sample_s"] + r["score_s"] <= r["step_s"]


def test_fixed_length_batches_take_the_fused_programs_even_with_length_buckets(tmp_path):
  """With length buckets on, a batch whose micro-batches would all have one width (fixed-length
  completions) runs the fused padded programs (one scanned call, not a dispatch per
  micro-batch); a batch of varied lengths runs the bucketed ones (which equal the fused ones:
  tests/test_length_buckets.py)."""
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.length_bucket, cfg.grpo.micro_batch_size, cfg.grpo.loss.beta = 8, 8, 0.04
  cfg.grpo.num_prompts = 8
  cfg.model.overrides.num_layers = 1
  exp = experiment.build(settings.from_config(cfg, jax.device_count()), str(tmp_path))
  N, C = 32, exp.settings.rollout.max_completion_length + 1
  rng = np.random.default_rng(0)
  prompts = exp.data.train_prompts
  device, g = exp.device, exp.settings.grpo
  lengths = {"fixed": np.full(N, C), "varied": rng.integers(1, C + 1, N)}
  for name, length in lengths.items():
    mask = (np.arange(C)[None] < length[:, None]).astype(np.int32)
    batch = updates.TrainBatch(
        prompt_tokens=prompts.ids_NxL[:N], prompt_mask=prompts.mask_NxL[:N],
        completion_tokens=rng.integers(3, 50, (N, C)).astype(np.int32) * mask,
        completion_mask=mask, advantages=rng.normal(size=N).astype(np.float32))
    plan = updates.plan(device, g, batch)
    assert (plan is None) == (name == "fixed")
    state = experiment.init_state(device, exp.keys, "grpo")
    ref = weights.reference_copy(device, state.params)
    ready = updates.with_logprobs(device, g, weights.update_params(state), ref, batch)
    assert (ready.plan is not None) == (name == "varied")
    assert isinstance(ready.batch.completion_mask, np.ndarray) == (name == "varied")  # host
    _, figures = updates.update(device, g, state, ready)
    bucketed_calls = device.programs.bucketed.grads._cache_size()  # pylint: disable=protected-access
    assert (bucketed_calls > 0) == (name == "varied")
    assert np.isfinite(figures["loss"]) and figures["grad_norm"] > 0
  assert device.programs.policy_update._cache_size() == 1  # pylint: disable=protected-access
