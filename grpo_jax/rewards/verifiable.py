"""Verifiable math rewards: exact answer, format, and length penalties. Model output is only
ever matched with regular expressions and parsed as a number, never evaluated.

Reward functions follow the interface of `grpo_jax.rewards`: `fn(completions, **columns)`. In a
multi-turn run `completions` is the policy's text alone, so the answer is read from what the
policy wrote, never from a tool's printout; the over-long penalty reads the episode's length
(policy and tool tokens: what the token budget counts and truncates).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

# A number: optional minus (not one glued to a preceding digit, as in "23-3"), an integer part with
# or without valid thousands separators, an optional fraction part.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:" + _UNSIGNED + ")")
_ANCHORED_RE = re.compile(r"####\s*\$?\s*(-?(?:" + _UNSIGNED + "))")
_FULL_RE = re.compile(r"-?(?:" + _UNSIGNED + ")")


def parse_number(text: str) -> Fraction | None:
  """Parses one number exactly: "1,000", "1000.0", "$1000", "-3", ".5" -> Fraction; else None."""
  text = text.strip().replace("$", "", 1).rstrip(".")
  if not _FULL_RE.fullmatch(text):
    return None
  return Fraction(text.replace(",", ""))


def numbers_equal(a: str, b: str) -> bool:
  """Numeric equality after normalisation: "1,000" == "1000.0" == "1000"."""
  x, y = parse_number(a), parse_number(b)
  return x is not None and x == y


def extract_answer(completion: str, *, fallback: bool = True) -> str | None:
  """The answer a completion gives, as written.

  The first number after a `####` marker; failing that (and with `fallback`), the last number in
  the text; None if there is none.
  """
  match = _ANCHORED_RE.search(completion)
  if match:
    return match.group(1)
  if fallback:
    numbers = _NUMBER_RE.findall(completion)
    if numbers:
      return numbers[-1]
  return None


def exact_answer_reward(completions: Sequence[str], final_answer: Sequence[str], *,
                        fallback: bool = True, **_) -> list[float]:
  """1.0 where the extracted answer equals `final_answer` numerically, else 0.0.

  Use `functools.partial(exact_answer_reward, fallback=False)` to require the `####` marker.
  """
  return [
      float(pred is not None and numbers_equal(pred, str(truth)))
      for pred, truth in zip(
          (extract_answer(c, fallback=fallback) for c in completions), final_answer, strict=True)
  ]


def format_reward(completions: Sequence[str], **_) -> list[float]:
  """1.0 where the completion contains `#### <number>`, else 0.0."""
  return [float(_ANCHORED_RE.search(c) is not None) for c in completions]


def soft_overlong_penalty(lengths_N, max_length: int, cache_length: int) -> np.ndarray:
  """DAPO's soft over-long punishment (Yu et al. 2025, eq. 13), float32 [N]:

      0                                  if |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
      -1                                 if |y| > L_max

  `lengths_N` in tokens; `max_length` = L_max, `cache_length` = L_cache (the ramp's width).
  """
  if not 0 < cache_length <= max_length:
    raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
  lengths_N = np.asarray(lengths_N, dtype=np.float64)
  start = max_length - cache_length
  ramp = (start - lengths_N) / cache_length
  out = np.where(lengths_N <= start, 0.0, np.where(lengths_N <= max_length, ramp, -1.0))
  return out.astype(np.float32)


def length_penalty(lengths_N, max_length: int, coef: float = 1.0) -> np.ndarray:
  """Linear penalty `-coef * |y| / max_length`, float32 [N] (lengths in tokens)."""
  if max_length <= 0:
    raise ValueError(f"max_length must be > 0, got {max_length}")
  return (-coef * np.asarray(lengths_N, np.float64) / max_length).astype(np.float32)


def overlong_penalty_reward(completions: Sequence[str], completion_length: Sequence[int], *,
                            max_length: int, cache_length: int, episodes=None,
                            **_) -> np.ndarray:
  """`soft_overlong_penalty` as a reward function; bind the lengths with `functools.partial`.

  Reads the length the token budget counts, so that a completion cut at the budget gets -1:
  `completion_length` (tokens per completion, eos excluded), or with `episodes` (multi-turn
  runs) each episode's "length" (policy and tool tokens, eos excluded). The trainer supplies
  both.
  """
  lengths = completion_length if episodes is None else [e["length"] for e in episodes]
  if len(lengths) != len(completions):
    raise ValueError(f"{len(lengths)} lengths for {len(completions)} completions")
  return soft_overlong_penalty(lengths, max_length, cache_length)
