"""Iterative GRPO (DeepSeekMath Algorithm 1): the learned reward model's outer iterations.

Before GRPO the RM (policy backbone + scalar head) trains on `bootstrap_rollouts` of the warm
start labelled by the verifier; every `iteration_steps` GRPO steps it continues training on the
policy's new samples mixed with `replay_fraction` of history, and the reference resets to the
policy. Host state: `RMData` (replay history + samples not yet trained on), saved as the
checkpoint's host item, so it is written atomically with, and pruned with, its checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from grpo_jax import rollout, samplers, weights
from grpo_jax.data import iterator
from grpo_jax.experiment import Data, Device, Keys, Stream
from grpo_jax.rewards import reward_model as rm_lib
from grpo_jax.rewards.replay import ReplayBuffer
from grpo_jax.settings import RewardModelSettings, RolloutSettings
from grpo_jax.train_step import TrainState

ProgressFn = Callable[[str, int, int], None]  # (what, done, total), e.g. progress.progress_callback

_FIELDS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "labels",
           "step_end", "step_mask")


@dataclasses.dataclass(frozen=True)
class RMData:
  history: ReplayBuffer = dataclasses.field(default_factory=ReplayBuffer)
  pending: tuple[dict, ...] = ()  # rollouts' examples since the last RM training

  def add(self, examples: dict) -> "RMData":
    return dataclasses.replace(self, pending=self.pending + (examples,))

  def to_host(self) -> dict:
    return {"history": self.history.state_dict()["columns"], "pending": _concat(self.pending)}

  @classmethod
  def from_host(cls, host: dict) -> "RMData":
    pending = dict(host.get("pending", {}))
    return cls(ReplayBuffer.from_state_dict({"columns": dict(host.get("history", {}))}),
               (pending,) if pending else ())


def iteration_due(rm: RewardModelSettings, step: int) -> bool:
  """An outer iteration runs before GRPO step `step`: at 0, then every `iteration_steps`."""
  return rm.enabled and (step == 0 or bool(rm.iteration_steps and step % rm.iteration_steps == 0))


def bootstrap(data: Data, device: Device, r: RolloutSettings, rc: RewardModelSettings,
              seed: int, keys: Keys, params, rm_data: RMData,
              progress: Optional[ProgressFn] = None) -> tuple[TrainState, RMData]:
  """A fresh RM on the policy's backbone (`params`, the master weights), and
  `bootstrap_rollouts` of the warm start's samples (own iterator and random stream) as its
  first training data."""
  position = iterator.Position(0, 0, seed + 2)
  n = rc.bootstrap_rollouts
  decoded = weights.decode_params(device, params)
  for b in range(n):
    roll, position = rollout.collect(data, device.programs.sample_train, r, decoded, position,
                                     keys(Stream.RM_BOOTSTRAP, b))
    rm_data = rm_data.add(rollout.rm_examples(roll, prm=rc.kind == "prm"))
    if progress is not None:
      progress("bootstrap", b + 1, n)
  rm_state, _ = rm_lib.init_sharded_rm_state(
      device.mesh, device.base_config, device.optimizers.rm, keys(Stream.RM_INIT, 0),
      backbone_params=params)
  return rm_state, rm_data


def train(device: Device, rc: RewardModelSettings, seed: int, rm_state: TrainState,
          data: RMData, iteration: int,
          progress: Optional[ProgressFn] = None) -> tuple[TrainState, RMData, dict]:
  """Continue training the RM on the pending samples plus a replayed fraction of history, then
  move the pending samples into history. Figures count the rows used from each source."""
  new = _concat(data.pending)
  mixed, source = data.history.mix(new, rc.replay_fraction, rng=seed * 7919 + iteration)
  n = len(source)
  order = np.random.default_rng(seed * 104729 + iteration).permutation(n)
  metrics = None
  for s in range(rc.train_steps):
    idx = order[(s * rc.batch_size + np.arange(rc.batch_size)) % n]
    batch = rm_lib.RMBatch(**{k: mixed[k][idx] for k in _FIELDS if k in mixed})
    rm_state, metrics = device.programs.rm_update(rm_state, device.shard(batch)[0])
    if progress is not None:
      progress("train", s + 1, rc.train_steps)
  history = ReplayBuffer.from_state_dict(data.history.state_dict())
  history.add(new)
  figures = ({f"rm/{k}": float(v) for k, v in metrics.items()} if metrics is not None else {})
  figures.update({"rm/iteration": iteration, "rm/new_rows": int((source < 0).sum()),
                  "rm/replayed_rows": int((source >= 0).sum()),
                  "rm/replayed_fraction": float((source >= 0).mean()) if n else 0.0,
                  "rm/history_rows": len(history),
                  "rm/label_mean": float(np.mean(new["labels"])) if n else 0.0})
  return rm_state, RMData(history, ()), figures


def _concat(examples: tuple[dict, ...]) -> dict:
  return {k: np.concatenate([e[k] for e in examples]) for k in examples[0]} if examples else {}


def rm_scorer(device: Device, rm_state: Optional[TrainState]) -> Optional[rollout.RMScorer]:
  """The learned reward model as rollout's scorer (tokens -> host scores), or None before it
  is trained."""
  if rm_state is None:
    return None
  params = rm_state.params
  return lambda batch: samplers.to_host(device.programs.rm_score(params, device.shard(batch)[0]))
