"""Rewards: hand-checked answer extraction and normalisation, format and length penalties, and the
reward-function interface's error messages."""

import functools

import numpy as np
import pytest

from grpo_jax import rewards
from grpo_jax.rewards import verifiable


@pytest.mark.parametrize("completion, truth, reward", [
    ("19+4=23. 23-9=14. #### 14", "14", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### 1000.0", "1000", 1.0),
    ("#### 1000.00", "1,000", 1.0),
    ("#### $1,000", "1000", 1.0),
    ("#### -5", "-5", 1.0),
    ("#### 5", "-5", 0.0),
    ("#### 2.50", "2.5", 1.0),
    ("#### 13", "13.5", 0.0),
    ("#### 12,34", "1234", 0.0),          # not a valid thousands separator: reads 12
    ("#### 1,0000", "10000", 0.0),
    ("#### 1,234,567", "1234567", 1.0),
    ("it costs 1,000, I think", "1000", 1.0),
    ("no number here", "3", 0.0),
    ("", "0", 0.0),
    ("so the total is 42.", "42", 1.0),     # last-number fallback, sentence period ignored
    ("3 apples and 4 pears: 7 in all", "7", 1.0),
    ("3 apples and 4 pears: 7 in all", "4", 0.0),
    ("#### 7 and later 8", "7", 1.0),       # the anchored answer wins over the last number
    ("it is 7, #### unsure", "7", 1.0),     # marker without a number: fallback
    ("19-4", "-4", 0.0),                    # a minus glued to a digit is subtraction
    ("__import__('os').system('x') #### 2", "2", 1.0),
    ("1e3", "1000", 0.0),                   # only decimal notation counts; nothing is evaluated
])
def test_exact_answer_reward_cases(completion, truth, reward):
  assert rewards.exact_answer_reward([completion], final_answer=[truth]) == [reward]


def test_exact_answer_without_fallback_needs_marker():
  strict = functools.partial(rewards.exact_answer_reward, fallback=False)
  assert strict(["answer is 42", "#### 42"], final_answer=["42", "42"]) == [0.0, 1.0]


@pytest.mark.parametrize("text, number", [
    ("1,000", 1000), ("1000.0", 1000), ("-2.5", -2.5), (".5", 0.5), ("$18", 18), ("7.", 7),
    ("abc", None), ("1,0", None), ("1,0000", None), ("12,345,678", 12345678), ("inf", None), ("nan", None), ("", None), ("1/2", None),
])
def test_parse_number(text, number):
  got = verifiable.parse_number(text)
  assert (got is None) if number is None else got == pytest.approx(number)


@pytest.mark.parametrize("completion, reward", [
    ("13-3=10. #### 10", 1.0), ("#### -2.5", 1.0), ("####10", 1.0), ("####", 0.0),
    ("the answer is 10", 0.0), ("#### ten", 0.0),
])
def test_format_reward(completion, reward):
  assert rewards.format_reward([completion]) == [reward]


def test_soft_overlong_penalty_values():
  # DAPO eq. 13 with L_max = 20, L_cache = 5: zero up to 15, a linear ramp to -1 at 20, then -1.
  got = rewards.soft_overlong_penalty([0, 15, 16, 18, 20, 21, 100], max_length=20, cache_length=5)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0], atol=1e-7)
  assert got.dtype == np.float32
  with pytest.raises(ValueError, match="cache_length"):
    rewards.soft_overlong_penalty([1], max_length=4, cache_length=5)
  fn = functools.partial(rewards.overlong_penalty_reward, max_length=20, cache_length=5)
  scores = rewards.score([fn], None, ["a", "b"], {"completion_length": [16, 30]})
  np.testing.assert_allclose(scores, [[-0.2, -1.0]], atol=1e-7)


def test_length_penalty_values():
  np.testing.assert_allclose(rewards.length_penalty([0, 10, 20], max_length=20, coef=0.5),
                             [0.0, -0.25, -0.5])


def test_score_passes_columns_by_name_and_returns_raw_KxN():
  completions = ["#### 3", "#### 4", "it is 4", "nothing"]
  columns = rewards.expand_columns({"final_answer": ["3", "4"]}, group_size=2)
  assert columns == {"final_answer": ["3", "3", "4", "4"]}
  scores = rewards.score([rewards.exact_answer_reward, rewards.format_reward], [1.0, 0.1],
                         completions, columns)
  assert scores.shape == (2, 4) and scores.dtype == np.float32
  np.testing.assert_array_equal(scores, [[1, 0, 1, 0], [1, 1, 0, 0]])  # unweighted


def _wrong_length(completions, **_):
  return [1.0]


def _nan(completions, **_):
  return [float("nan")] * len(completions)


def _raises(completions, **_):
  raise RuntimeError("boom")


def _needs_column(completions, solution):
  return [0.0] * len(completions)


def _not_numbers(completions, **_):
  return ["yes"] * len(completions)


@pytest.mark.parametrize("fn, message", [
    (_wrong_length, r"_wrong_length returned shape \(1,\) for 2 completions"),
    (_nan, r"_nan returned non-finite values at rows \[0, 1\]"),
    (_raises, r"_raises raised RuntimeError: boom"),
    (_needs_column, r"_needs_column failed: .*columns passed: \['final_answer'\]"),
    (_not_numbers, r"_not_numbers returned values that are not numbers"),
    (functools.partial(_raises), r"partial\(_raises\) raised"),
])
def test_bad_reward_functions_are_named(fn, message):
  with pytest.raises(rewards.RewardFunctionError, match=message):
    rewards.score([rewards.format_reward, fn], None, ["#### 1", "x"], {"final_answer": ["1", "2"]})


def test_score_validates_config():
  with pytest.raises(ValueError, match="weights has shape"):
    rewards.score([rewards.format_reward], [1.0, 2.0], ["x"], {})
  with pytest.raises(ValueError, match="finite"):
    rewards.score([rewards.format_reward], [float("inf")], ["x"], {})
  with pytest.raises(ValueError, match="column 'final_answer' has 1 values for 2"):
    rewards.score([rewards.format_reward], None, ["x", "y"], {"final_answer": ["1"]})
  with pytest.raises(ValueError, match="at least one"):
    rewards.score([], None, ["x"], {})


def test_score_rows_zero_mode_timeout_and_argument_selection():
  import time

  def slow(completions, **_):
    time.sleep(5)
    return [1.0] * len(completions)

  def picky(completions, final_answer):  # no **kwargs: gets only what it names
    return [float(c == a) for c, a in zip(completions, final_answer)]

  columns = {"final_answer": ["1", "2"], "prompts": ["p", "q"]}
  out = rewards.score_rows([picky, _raises, slow], None, ["1", "x"], columns,
                           names=["picky", "boom", "slow"], timeout_s=0.2, on_error="zero")
  np.testing.assert_array_equal(out.scores_KxN, [[1, 0], [0, 0], [0, 0]])
  assert out.failed_K.tolist() == [False, True, True]
  assert "boom raised RuntimeError" in out.messages[0] and "slow took longer than 0.2 s" in (
      out.messages[1])
  with pytest.raises(rewards.RewardFunctionError, match="slow took longer"):
    rewards.score_rows([slow], None, ["1", "x"], columns, names=["slow"], timeout_s=0.2)
