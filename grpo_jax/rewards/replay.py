"""The reward model's replay of historical training data (DeepSeekMath Algorithm 1).

Iterative GRPO retrains the RM as the policy drifts; replay keeps earlier policies' samples in
its training data, so each outer iteration trains on the new policy samples plus a fraction
replayed from history (10% in the paper), then adds the new samples to the history. The buffer
holds plain NumPy columns with a leading row axis (e.g. the `RMBatch` fields), so it knows
nothing of the model and checkpoints as a dict of arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


def _num_rows(examples: Mapping[str, np.ndarray]) -> int:
  sizes = {k: np.shape(v)[0] for k, v in examples.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"replay examples: columns have different numbers of rows: {sizes}")
  return next(iter(sizes.values()), 0)


def num_replayed(num_new: int, replay_fraction: float) -> int:
  """Rows to replay so that they are `replay_fraction` of the mixed set: round(f / (1 - f) * n)."""
  if not 0.0 <= replay_fraction < 1.0:
    raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
  return int(round(replay_fraction / (1.0 - replay_fraction) * num_new))


@dataclasses.dataclass
class ReplayBuffer:
  """The reward model's historical training data (DeepSeekMath Algorithm 1), as plain NumPy
  columns with a leading row axis, e.g. the `RMBatch` fields or pair fields.

  Per outer iteration: `train = buf.mix(new, replay_fraction, rng)` (new rows + rows replayed
  from history only), train the RM on `train`, then `buf.add(new)`.
  `state_dict()` / `from_state_dict()` round-trip exactly (checkpointing).
  """
  columns: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return _num_rows(self.columns)

  def add(self, examples: Mapping[str, np.ndarray]) -> None:
    """Append rows; every call must give the same columns with the same trailing shapes."""
    examples = {k: np.asarray(v) for k, v in examples.items()}
    _num_rows(examples)
    if not self.columns:
      self.columns = {k: v.copy() for k, v in examples.items()}
      return
    if set(examples) != set(self.columns):
      raise ValueError(f"replay add: columns {sorted(examples)} != buffer {sorted(self.columns)}")
    for k, v in examples.items():
      if v.shape[1:] != self.columns[k].shape[1:]:
        raise ValueError(f"replay add: column {k!r} rows have shape {v.shape[1:]}, the buffer's "
                         f"{self.columns[k].shape[1:]}")
    self.columns = {k: np.concatenate([self.columns[k], examples[k].astype(self.columns[k].dtype)])
                    for k in self.columns}

  def mix(self, new_examples: Mapping[str, np.ndarray], replay_fraction: float,
          rng: np.random.Generator | int) -> tuple[dict, np.ndarray]:
    """(training set, source [N]): the new rows plus `num_replayed(len(new), replay_fraction)`
    rows drawn from history without replacement (all of history if it is smaller), shuffled.
    source[i] = -1 for a new row, else the history row replayed. Deterministic given the rng
    (seed or Generator); the buffer is not modified."""
    rng = np.random.default_rng(rng)
    new = {k: np.asarray(v) for k, v in new_examples.items()}
    n_new = _num_rows(new)
    n_rep = min(num_replayed(n_new, replay_fraction), len(self))
    picked = np.sort(rng.choice(len(self), size=n_rep, replace=False)) if n_rep else \
        np.zeros((0,), np.int64)
    if n_rep and set(new) != set(self.columns):
      raise ValueError(f"replay mix: columns {sorted(new)} != buffer {sorted(self.columns)}")
    source = np.concatenate([np.full((n_new,), -1, np.int64), picked])
    order = rng.permutation(len(source))
    mixed = {k: np.concatenate([new[k], self.columns[k][picked]] if n_rep else [new[k]])[order]
             for k in new}
    return mixed, source[order]

  def state_dict(self) -> dict:
    return {"columns": {k: v.copy() for k, v in self.columns.items()}}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "ReplayBuffer":
    return cls({k: np.array(v) for k, v in state["columns"].items()})
