"""Rollout, advantages and evaluation on the host, with a stub sampler: no model, no compile.

Each host function takes the parts it reads (`experiment.Data`, a `samplers.Sampler`, its
settings), so a scripted sampler stands in for the decode loop and the figures are checked
against hand-computed values."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import evaluation, experiment, reward_table, rollout, samplers, settings, tasks
from grpo_jax.data import iterator

C = 4  # completion tokens per row


def _records(n: int, offset: int = 0) -> list[dict]:
  return [{"question": f"q{i}", "final_answer": str(i + 1), "id": i}
          for i in range(offset, offset + n)]


def _data(num_train: int = 8, num_eval: int = 6) -> experiment.Data:
  def prompts(n):
    ids = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    return tasks.Prompts(ids, np.ones_like(ids), 0)

  def right(completions, final_answer, **_):
    return [float(c == f"#### {a}") for c, a in zip(completions, final_answer)]

  task = tasks.Task(train=_records(num_train), sft=[], eval=_records(num_eval, 100),
                    prompt=lambda rec: rec["question"])
  return experiment.Data(task=task, tokenizer=None, train_prompts=prompts(num_train),
                         eval_prompts=prompts(num_eval), teacher=None,
                         rewards=reward_table.Rewards((right,), ("right",), (2.0,)), eos_ids=(1,))


@dataclasses.dataclass
class Scripted:
  """The sampler protocol: row g of prompt p answers right when `script(call, p, g)`."""
  script: callable
  num_samples: int
  mesh: Mesh = dataclasses.field(default_factory=lambda: Mesh(
      np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))
  calls: list = dataclasses.field(default_factory=list)

  def __call__(self, params, ids_PxL, mask_PxL, key, records) -> samplers.Drawn:
    call = len(self.calls)
    self.calls.append([rec["id"] for rec in records])
    G = self.num_samples
    texts = tuple(f"#### {rec['final_answer'] if self.script(call, p, g) else -1}"
                  for p, rec in enumerate(records) for g in range(G))
    B = len(records) * G
    return samplers.Drawn(np.full((B, C), 7, np.int32), np.ones((B, C), np.int32),
                          np.zeros(B, bool), np.full(B, C - 1), texts=texts)

  def compiles(self) -> int:
    return 0


def _rollout_settings(**changes) -> settings.RolloutSettings:
  r = settings.from_config(arithmetic_config.get_config("smoke"), 1).rollout
  return dataclasses.replace(r, **changes)


def test_collect_scores_selects_and_computes_advantages_without_a_model():
  data = _data()
  r = _rollout_settings(num_prompts=2, num_samples=4, dynamic_sampling=True,
                        max_resample_rounds=2)
  # Round 0: every row right (no spread); round 1: rows 0 and 1 of each group right.
  sampler = Scripted(lambda call, p, g: call == 0 or g < 2, num_samples=4)
  roll, position = rollout.collect(data, sampler, r, None, iterator.Position(0, 0, 0),
                                   jax.random.key(0))
  assert len(sampler.calls) == 2  # stopped once P groups had spread
  assert [rec["id"] for rec in roll.records] == sampler.calls[1]  # round 1's groups kept
  np.testing.assert_array_equal(roll.scores_KxPxG[0], [[1, 1, 0, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(roll.reward_PxG, 2.0 * roll.scores_KxPxG[0])  # weight 2
  assert roll.figures["reward"] == pytest.approx(1.0)
  assert roll.figures["zero_spread_fraction"] == 1.0 and roll.figures["sample_rounds"] == 2
  assert position.index == 4  # two rounds of two prompts drawn
  adv = rollout.coefficients(roll, r, data.rewards.weights)
  # (r - mean) / std per group, the sample std (as TRL): rewards 2, 2, 0, 0 -> mean 1, std
  # sqrt(4 / 3), so +-sqrt(3) / 2 (up to the denominator's epsilon)
  np.testing.assert_allclose(adv, np.tile([1, 1, -1, -1], 2) * np.sqrt(3) / 2, atol=1e-3)
  batch = rollout.train_batch(roll, adv, mask_truncated=False)
  assert batch.completion_tokens.shape == (8, C)


def test_collect_starts_device_work_on_the_tokens_before_scoring():
  events = []
  data = _data()
  rewards = data.rewards
  def scored(completions, **kw):
    events.append("score")
    return rewards.fns[0](completions, **kw)

  def start(batch):
    events.append("start")
    return batch.completion_tokens.shape

  data = dataclasses.replace(data, rewards=dataclasses.replace(rewards, fns=(scored,)))
  r = _rollout_settings(num_prompts=2, num_samples=2, dynamic_sampling=False)
  roll, _ = rollout.collect(data, Scripted(lambda *_: True, 2), r, None,
                            iterator.Position(0, 0, 0), jax.random.key(0),
                            start=start)
  assert events == ["start", "score"]
  assert roll.started == (4, C)


def test_evaluate_greedy_pass_and_majority_without_a_model():
  data = _data(num_eval=6)
  e = settings.from_config(arithmetic_config.get_config("smoke"), 1).eval
  e = dataclasses.replace(e, num_problems=6, batch_size=4, k=3, pass_k_problems=4, log_samples=2)
  greedy = Scripted(lambda call, p, g: (4 * call + p) % 2 == 0, num_samples=1)  # even problems
  # k = 3 samples: problem i has one right sample; the majority (2 of 3) only for i < 2.
  per_batch = max(1, e.batch_size // e.k)  # one device: prompts per batch of samples
  sample_k = Scripted(lambda call, p, g: g == 0 or (call * per_batch + p < 2 and g == 1), 3)
  programs = type("Programs", (), {"sample_greedy": greedy, "sample_eval_k": sample_k})
  result = evaluation.evaluate(data, programs, e, None, experiment.Keys(jax.random.key(0)), 0)
  assert result.accuracy == pytest.approx(0.5) and result.num_problems == 6
  assert sum(len(c) for c in greedy.calls) == 8  # two batches of 4, the last one wraps
  assert result.pass_at_k == 1.0 and result.maj_at_k == pytest.approx(0.5)
  assert [s["correct"] for s in result.samples] == [True, False]
