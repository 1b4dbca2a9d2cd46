"""The reward-function API at its edges: the arguments of the pre-compile check match a real
call (`episodes` in multi-turn runs), and a reward may return None for rows it does not apply to
(TRL's semantic: the weighted sum skips it, per-reward means ignore it)."""


import numpy as np
import pytest

from experiments.configs import arithmetic as arithmetic_config
from experiments.configs import tool_arithmetic as tool_config
from grpo_jax import advantages, reward_table, rewards, rollout, settings, tasks
from grpo_jax.data import arithmetic, tool_arithmetic


def _tool_use(completions, episodes):
  return [float(ep["tool_calls"] > 0) for ep in episodes]


def test_the_check_gives_episodes_to_a_multi_turn_run():
  s = settings.from_config(tool_config.get_config("smoke"), 1)
  seen = []

  def tool_use(completions, episodes):
    seen.append((completions, episodes))
    return _tool_use(completions, episodes)

  train, _ = tool_arithmetic.make_splits(16, 1, 0)
  rows = [next(r for r in train if r["uses_tool"]), next(r for r in train if not r["uses_tool"])]
  task = tasks.Task(train=rows, sft=rows, eval=rows, prompt=lambda rec: rec["question"])
  rw = reward_table.reward_functions(s.rollout, s.reward_model, {"tool_use": tool_use})
  env = tasks.make_env(s)
  reward_table.check_rewards(rw, task, s.rollout, env=env)
  (completions, episodes), = seen
  # As in a rollout: completions are the policy's text, the episode holds the tool's output too.
  policy = ["".join(t for t, is_obs in env.teacher_segments(r["solution"]) if not is_obs)
            for r in rows]
  assert completions == policy and policy[0] != rows[0]["solution"] == rows[0]["answer"]
  assert [ep["tool_calls"] for ep in episodes] == [1, 0]
  first = episodes[0]["turns"][0]
  assert first["text"].endswith("```output") and first["observation"].strip("\n`") == (
      rows[0]["final_answer"])
  assert "".join(t["text"] + (t["observation"] or "") for t in episodes[0]["turns"]) == (
      rows[0]["solution"])


def test_a_single_turn_run_says_where_episodes_come_from():
  s = settings.from_config(arithmetic_config.get_config("smoke"), 1)
  rows = arithmetic.generate(2, seed=0)
  task = tasks.Task(train=rows, sft=rows, eval=rows, prompt=lambda rec: rec["question"])
  rw = reward_table.reward_functions(s.rollout, s.reward_model, {"tool_use": _tool_use})
  with pytest.raises(settings.ConfigError,
                     match=r"tool_use .*needs \['episodes'\].*only .*config\.tools\.env"):
    reward_table.check_rewards(rw, task, s.rollout)


# Two kinds of rows, a reward for each: None where a reward does not apply.
KINDS = ["math", "code", "math", "code", "code", "math"]


def _math(completions, kind):
  return [float("4" in c) if k == "math" else None for c, k in zip(completions, kind)]


def _code(completions, kind):
  return np.array([len(c) / 10 if k == "code" else None for c, k in zip(completions, kind)],
                  dtype=object)


COMPLETIONS = ["4", "print(1)", "5", "x", "def f(): pass", "2+2=4"]


def test_none_means_the_reward_does_not_apply():
  columns = {"kind": KINDS, "prompts": [f"prompt {i}" for i in range(6)]}
  scores = rewards.score([_math, _code], [1.0, 0.5], COMPLETIONS, columns)
  math = np.array([1, np.nan, 0, np.nan, np.nan, 1], np.float32)
  code = np.array([np.nan, 0.8, np.nan, 0.1, 1.3, np.nan], np.float32)
  np.testing.assert_array_equal(scores, [math, code])
  # The weighted sum of the rewards that apply (TRL: nansum of weighted rewards).
  want = np.where(np.isnan(math), 0, math) + 0.5 * np.where(np.isnan(code), 0, code)
  combined = advantages.combine_rewards(scores.reshape(2, 3, 2), [1.0, 0.5])
  np.testing.assert_allclose(np.asarray(combined).reshape(-1), want, rtol=1e-6)
  adv = advantages.coefficients("group", scores.reshape(2, 3, 2), [1.0, 0.5])
  assert np.all(np.isfinite(adv))
  np.testing.assert_allclose(adv, advantages.group_advantages(want.reshape(3, 2)).reshape(-1),
                             rtol=1e-5)
  correct = advantages.coefficients("correct", scores.reshape(2, 3, 2), [1.0, 0.5])
  np.testing.assert_array_equal(correct, (want > 0).astype(np.float32))


def test_a_row_no_reward_applies_to_is_named():
  kinds = ["math", "chat", "code"]
  columns = {"kind": kinds, "prompts": ["What is 2+2?", "Tell me a joke about cats", "Code"]}
  with pytest.raises(rewards.RewardFunctionError,
                     match=r"row 1 .*'Tell me a joke.*every reward function returned None"):
    rewards.score_rows([_math, _code], None, ["4", "ha", "x"], columns, on_error="zero")
  with pytest.raises(rewards.RewardFunctionError, match=r"_nan returned non-finite values"):
    rewards.score([_nan], None, ["x"], {})  # NaN is still an error: only None means "n/a"


def _nan(completions):
  return [float("nan")] * len(completions)


def test_per_reward_figures_ignore_missing_values():
  scores = rewards.score([_math, _code], None, COMPLETIONS, {"kind": KINDS})
  P, G = 3, 2
  roll = rollout.Rollout(
      prompt_ids_NxL=np.zeros((6, 1), np.int32), prompt_mask_NxL=np.ones((6, 1), np.int32),
      tokens_NxC=np.zeros((6, 2), np.int32), mask_NxC=np.ones((6, 2), np.int32),
      truncated_N=np.zeros(6, bool), scores_KxPxG=scores.reshape(2, P, G),
      reward_PxG=rewards.weighted_sum((1.0, 0.5), scores.reshape(2, P, G)),
      verified_N=np.zeros(6, np.float32), texts=tuple(COMPLETIONS), records=(), steps=None,
      figures={})
  figures = rollout._figures(roll, ("math", "code"), None)  # pylint: disable=protected-access
  assert figures["reward/math"] == pytest.approx(2 / 3)
  assert figures["reward/code"] == pytest.approx((0.8 + 0.1 + 1.3) / 3)
  assert figures["reward"] == pytest.approx((2 + 0.5 * 2.2) / 6)
  arrays = rollout.histograms(roll, ("math", "code"), np.zeros(6))
  assert np.all(np.isfinite(arrays["reward"]))


def test_none_passes_the_check_before_training():
  s = settings.from_config(arithmetic_config.get_config("smoke"), 1)
  rows = [{**rec, "kind": kind} for rec, kind in zip(arithmetic.generate(2, seed=0),
                                                     ["math", "code"])]
  task = tasks.Task(train=rows, sft=rows, eval=rows, prompt=lambda rec: rec["question"])
  both = reward_table.Rewards(fns=(_math, _code), names=("math", "code"), weights=(1.0, 1.0))
  reward_table.check_rewards(both, task, s.rollout)
  alone = reward_table.Rewards(fns=(_math,), names=("math",), weights=(1.0,))
  with pytest.raises(settings.ConfigError, match=r"row 1 .*every reward function returned None"):
    reward_table.check_rewards(alone, task, s.rollout)
