"""Runs K reward functions on N completions and checks every result.

A reward function is called as in TRL: `fn(completions=..., prompts=..., **columns)`, with
every column of the dataset record (one value per completion); it receives the arguments it
names, or all of them if it takes `**kwargs`.

As in TRL, a reward returns None for a row it does not apply to (several rewards, each for its
own kind of row): that score is NaN, the row's weighted sum is over the rewards that apply
(`weighted_sum`, `grpo_jax.advantages.combine_rewards`: TRL's nansum of weighted rewards) and
per-reward means skip it (`reward_means`). A row that no reward applies to is an error naming
it. A NaN returned as a number is still an error.

`score` returns the raw, unweighted scores `[K, N]` so per-function means can be logged; weights
are checked here (so a bad config fails before any sampling) and applied by
`grpo_jax.advantages.combine_rewards` / `group_advantages(..., weights=...)` on `[K, P, G]`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

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


class Scored(NamedTuple):
  """Scores of K reward functions on N completions, and which failed (reward_errors="zero")."""
  scores_KxN: np.ndarray   # float32, unweighted; NaN: returned None; a failed function's row is 0
  failed_K: np.ndarray     # bool
  messages: tuple[str, ...]  # why each failed function failed


def accepted_arguments(fn: Callable) -> frozenset[str] | None:
  """The keyword arguments `fn` accepts, or None if it takes **kwargs (then it gets them all)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # a builtin without a signature: give it everything
    return None
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return None
  return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def required_arguments(fn: Callable) -> frozenset[str]:
  """Parameters without a default, which the caller must supply."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return frozenset()
  return frozenset(p.name for p in params if p.default is p.empty and p.kind in (
      p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def call_reward(fn: RewardFn, name: str, completions: Sequence[str],
                columns: Mapping[str, Sequence], timeout_s: float = 0.0) -> np.ndarray:
  """`fn(completions=..., **columns)` (the columns it names, or all if it takes **kwargs), checked:
  float64 [N], NaN where it returned None (the reward does not apply to that row).
  RewardFunctionError naming `name` on anything else, or after `timeout_s` seconds (0: no limit;
  the call is left running in a daemon thread, it cannot be killed)."""
  accepted = accepted_arguments(fn)
  kwargs = {"completions": list(completions), **columns}
  missing = sorted(required_arguments(fn) - set(kwargs))
  if missing:
    only_multi_turn = (" (`episodes` is passed only in multi-turn runs: config.tools.env set)"
                       if "episodes" in missing else "")
    raise RewardFunctionError(
        f"reward function {name} failed: it needs {missing}, which no column provides (columns "
        f"passed: {sorted(columns)}; a reward function is called as fn(completions=..., "
        f"**columns), as in TRL){only_multi_turn}")
  if accepted is not None:
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
  out = _call_with_timeout(fn, kwargs, timeout_s, name)
  n = len(completions)
  try:
    out = np.asarray(out)
    none_N = (np.frompyfunc(lambda v: v is None, 1, 1)(out).astype(bool) if out.dtype == object
              else np.zeros(out.shape, bool))
    out = np.where(none_N, np.nan, out).astype(np.float64)
  except (TypeError, ValueError) as e:
    raise RewardFunctionError(
        f"reward function {name} returned values that are not numbers: {e}") from e
  if out.shape != (n,):
    raise RewardFunctionError(
        f"reward function {name} returned shape {out.shape} for {n} completions; expected ({n},)")
  bad = np.flatnonzero(~np.isfinite(out) & ~none_N)
  if bad.size:
    raise RewardFunctionError(
        f"reward function {name} returned non-finite values at rows {bad[:10].tolist()}")
  return out


def _call_with_timeout(fn: RewardFn, kwargs: dict, timeout_s: float, name: str):
  def call():
    try:
      return fn(**kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e

  if not timeout_s:
    return call()
  box = {}

  def target():
    try:
      box["out"] = call()
    except BaseException as e:  # pylint: disable=broad-except
      box["error"] = e

  thread = threading.Thread(target=target, name=f"reward:{name}", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise RewardFunctionError(f"reward function {name} took longer than {timeout_s:g} s "
                              "(config.grpo.reward_timeout_s)")
  if "error" in box:
    raise box["error"]
  return box["out"]


def score_rows(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None,
               completions: Sequence[str], columns: Mapping[str, Sequence], *,
               names: Sequence[str] | None = None, timeout_s: float = 0.0,
               on_error: str = "raise") -> Scored:
  """Scores N completions with K reward functions.

  Args:
    reward_fns: K callables `fn(completions=..., **columns) -> N numbers` (or None where a
      function does not apply: NaN in `scores_KxN`; a row no function applies to is an error).
    weights: K finite weights (validated here, applied by the advantage code), or None.
    completions: N decoded completions.
    columns: by name, each of length N (see `expand_columns`): the record's columns, the
      prompts, token ids and lengths; each function gets the ones it names (all with **kwargs).
    names: K names for messages (default: the functions' own).
    timeout_s: per call, 0 = no limit.
    on_error: "raise" a RewardFunctionError naming the function; "zero": its row scores 0 and
      `failed_K` says so.
  """
  if not reward_fns:
    raise ValueError("score needs at least one reward function")
  if weights is not None:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(reward_fns),):
      raise ValueError(f"{len(reward_fns)} reward functions but weights has shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
      raise ValueError(f"reward weights must be finite, got {weights.tolist()}")
  if on_error not in ("raise", "zero"):
    raise ValueError(f"on_error = {on_error!r}: 'raise' or 'zero'")
  n = len(completions)
  for key, col in columns.items():
    if len(col) != n:
      raise ValueError(f"column {key!r} has {len(col)} values for {n} completions")
  names = names or [fn_name(fn) for fn in reward_fns]
  scores_KxN = np.zeros((len(reward_fns), n), dtype=np.float32)
  failed_K = np.zeros(len(reward_fns), bool)
  messages = []
  for k, fn in enumerate(reward_fns):
    try:
      scores_KxN[k] = call_reward(fn, names[k], completions, columns, timeout_s)
    except RewardFunctionError as e:
      if on_error == "raise":
        raise
      failed_K[k] = True
      messages.append(str(e))
  check_rows_rewarded(scores_KxN, columns.get("prompts"))
  return Scored(scores_KxN, failed_K, tuple(messages))


def check_rows_rewarded(scores_KxN, prompts_N: Sequence[str] | None = None) -> None:
  """RewardFunctionError naming the first row every reward returned None for (its weighted sum
  would be an empty sum, its advantage meaningless; TRL only warns), with its prompt's start."""
  none_N = np.all(np.isnan(scores_KxN), axis=0)
  if not none_N.any():
    return
  rows = np.flatnonzero(none_N)
  i = int(rows[0])
  prompt = f" (prompt {str(prompts_N[i])[:60]!r}...)" if prompts_N is not None else ""
  more = f"; {rows.size - 1} more such rows" if rows.size > 1 else ""
  raise RewardFunctionError(
      f"row {i}{prompt}: every reward function returned None, so no reward applies to it{more}; "
      "a reward returns None only where another reward scores the row")


def weighted_sum(weights_K, scores_Kx) -> np.ndarray:
  """sum_k w_k r_k over the rewards that apply to each row (NaN: returned None), [K, ...] ->
  [...]: TRL's nansum of weighted rewards."""
  scores_Kx = np.asarray(scores_Kx)
  return np.einsum("k,k...->...", np.asarray(weights_K),
                   np.where(np.isnan(scores_Kx), 0, scores_Kx).astype(scores_Kx.dtype))


def reward_means(scores_Kx) -> list[float]:
  """Each reward's mean over the rows it applies to (NaN where it applies to none), [K, ...]."""
  means = []
  for row in np.asarray(scores_Kx):
    applies = ~np.isnan(row)
    means.append(float(row[applies].mean()) if applies.any() else float("nan"))
  return means


def score(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None,
          completions: Sequence[str], columns: Mapping[str, Sequence]) -> np.ndarray:
  """`score_rows(...)` that raises on any failure: float32 `[K, N]`, unweighted, NaN where a
  function returned None.

  Raises:
    RewardFunctionError naming the function that raised, needs a missing column, or returned the
    wrong length / non-numbers / NaN / Inf; or naming a row that every function returned None for.
  """
  return score_rows(reward_fns, weights, completions, columns).scores_KxN
