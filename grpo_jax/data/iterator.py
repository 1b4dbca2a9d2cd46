"""A deterministic batch iterator whose whole position is three integers, so it checkpoints.

    it = BatchIterator(records, batch_size=16, seed=0)
    batch = next(it)                  # list of 16 records
    state = it.state                  # {"epoch": 0, "index": 16, "seed": 0}: save with the model
    it2 = BatchIterator(records, 16, seed=0, state=state)   # continues exactly where it left off

Each epoch visits a fresh permutation `epoch_permutation(seed, epoch, n)`; `index` counts records
already taken from it. Batches never straddle an epoch: the last `n % batch_size` records of an
epoch's permutation are skipped (they come up in other epochs' permutations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Position(NamedTuple):
  """Where an iterator stands: records already taken from epoch `epoch`'s permutation of
  `seed`. Three ints: `position._asdict()` goes into a checkpoint's JSON, `Position(**d)` back."""
  epoch: int
  index: int
  seed: int


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of range(n), int64 [n], a pure function."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def next_indices(position: Position, n: int, batch_size: int) -> tuple[np.ndarray, Position]:
  """Pure step: (position) -> (indices [batch_size], next position)."""
  epoch, index = position.epoch, position.index
  if index + batch_size > n:
    epoch, index = epoch + 1, 0
  indices = epoch_permutation(position.seed, epoch, n)[index:index + batch_size]
  return indices, Position(epoch, index + batch_size, position.seed)


def collate(records: Sequence[dict]) -> dict[str, list]:
  """Records -> columns: `[{"q": a}, {"q": b}]` -> `{"q": [a, b]}` (keys of the first record)."""
  if not records:
    return {}
  return {key: [r[key] for r in records] for key in records[0]}


class BatchIterator:
  """Yields lists of `batch_size` records forever, in a seed-determined order."""

  def __init__(self, records: Sequence[dict], batch_size: int, seed: int = 0, *,
               state: dict | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(records) < batch_size:
      raise ValueError(f"dataset has {len(records)} records, fewer than batch_size={batch_size}")
    self.records = records
    self.batch_size = batch_size
    self._state = {"epoch": 0, "index": 0, "seed": int(seed)}
    if state is not None:
      self.state = state

  @property
  def state(self) -> dict:
    """A copy of the position: {"epoch", "index", "seed"}, plain ints (JSON/orbax friendly)."""
    return dict(self._state)

  @state.setter
  def state(self, state: dict) -> None:
    missing = {"epoch", "index", "seed"} - set(state)
    if missing:
      raise ValueError(f"iterator state lacks {sorted(missing)}: {state}")
    state = {k: int(state[k]) for k in ("epoch", "index", "seed")}
    if state["epoch"] < 0 or not 0 <= state["index"] <= len(self.records):
      raise ValueError(f"iterator state {state} does not fit a dataset of {len(self.records)}")
    self._state = state

  def __iter__(self):
    return self

  def __next__(self) -> list[dict]:
    indices, position = next_indices(Position(**self._state), len(self.records),
                                     self.batch_size)
    self._state = position._asdict()
    return [self.records[i] for i in indices]
