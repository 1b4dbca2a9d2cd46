"""Runs K reward functions on N completions and checks every result.

`score` returns the raw, unweighted scores `[K, N]` so per-function means can be logged; weights
are checked here (so a bad config fails before any sampling) and applied by
`grpo_jax.advantages.combine_rewards` / `group_advantages(..., weights=...)` on `[K, P, G]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]


class RewardFunctionError(ValueError):
  """A reward function raised, or returned something other than N finite numbers."""


def fn_name(fn: Callable) -> str:
  """A readable name, seeing through functools.partial."""
  if isinstance(fn, functools.partial):
    return f"partial({fn_name(fn.func)})"
  return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def expand_columns(columns_P: Mapping[str, Sequence], group_size: int) -> dict[str, list]:
  """Repeats each per-prompt column G times, prompt-major: [P] -> [P * G] (row p*G + g)."""
  return {k: [v for v in col for _ in range(group_size)] for k, col in columns_P.items()}


def score(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None,
          completions: Sequence[str], columns: Mapping[str, Sequence]) -> np.ndarray:
  """Scores N completions with K reward functions: float32 `[K, N]`, unweighted.

  Args:
    reward_fns: K callables `fn(completions, **columns) -> N floats`.
    weights: K finite weights (validated here, applied by the advantage code), or None.
    completions: N decoded completions.
    columns: dataset columns by name, each of length N (see `expand_columns`).

  Raises:
    RewardFunctionError naming the function that raised, needs a missing column, or returned the
    wrong length / non-numbers / NaN / Inf.
  """
  if not reward_fns:
    raise ValueError("score needs at least one reward function")
  if weights is not None:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(reward_fns),):
      raise ValueError(f"{len(reward_fns)} reward functions but weights has shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
      raise ValueError(f"reward weights must be finite, got {weights.tolist()}")
  n = len(completions)
  for key, col in columns.items():
    if len(col) != n:
      raise ValueError(f"column {key!r} has {len(col)} values for {n} completions")
  completions = list(completions)
  scores_KxN = np.zeros((len(reward_fns), n), dtype=np.float32)
  for k, fn in enumerate(reward_fns):
    name = fn_name(fn)
    try:
      out = fn(completions, **columns)
    except TypeError as e:
      raise RewardFunctionError(
          f"reward function {name} failed: {e} (columns passed: {sorted(columns)}; "
          "a reward function should accept **kwargs for columns it does not use)") from e
    except Exception as e:
      raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    try:
      out = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise RewardFunctionError(
          f"reward function {name} returned values that are not numbers: {e}") from e
    if out.shape != (n,):
      raise RewardFunctionError(
          f"reward function {name} returned shape {out.shape} for {n} completions; expected ({n},)")
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
      raise RewardFunctionError(
          f"reward function {name} returned non-finite values at rows {bad[:10].tolist()}")
    scores_KxN[k] = out
  return scores_KxN
