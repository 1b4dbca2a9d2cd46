"""Rollouts sampled ahead of the update, with bounded staleness (`grpo.max_staleness = k`).

With k = 0 a step samples with the policy it then updates (the synchronous loop). With k > 0
the rollout trained at step t was sampled at step t - k by policy version t - k (versions count
GRPO steps; the first k rollouts all come from version 0), so while step t's update runs on the
device the host decodes and scores the rollout of step t + k:

    step t:  sample R[t+k] with version t  ->  queue R[t]'s log-prob passes and update  ->
             score R[t+k] on the host while the device updates  ->  R[t+k] joins the queue

Each rollout waits in the queue as `Pending`: its update batch with advantages and the
sampler's log-probs (the loss's mismatch correction, corrections.py, weighs the gap between
the sampling version and the trained one), the version that sampled it, and what the step logs
about it. A rollout more than k versions old is never trained on: it is dropped and counted
(`dropped_stale`; only a resume with a smaller k leaves such rollouts), and a fresh one is
sampled. The queue is host state, checkpointed with the run (`to_host` / `from_host`), so a
killed run resumes exactly; each rollout's key is its index in the run's sequence of rollouts (the step it trains at,
unless a resume dropped some).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from grpo_jax.train_step import TrainBatch

_BATCH_FIELDS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask",
                 "advantages", "sampler_logprobs")


@dataclasses.dataclass(frozen=True)
class Pending:
  """One scored rollout waiting for its update, NumPy on the host."""
  batch: TrainBatch  # the update's batch: advantages and the sampler's log-probs in
  version: int       # the policy version (GRPO steps taken) that sampled it
  index: int         # its place in the run's sequence of rollouts: its random key
  figures: dict      # its rollout figures (reward, lengths, sampling time, ...)
  samples: list      # its samples.jsonl rows
  arrays: dict       # its histograms


def staleness(step: int, pending: Pending) -> int:
  """Versions between the policy trained at `step` and the one that sampled `pending`."""
  return step - pending.version


def next_index(queue: Sequence[Pending], step: int) -> int:
  """The key index of the next rollout to sample: after the queue's last, else `step`."""
  return queue[-1].index + 1 if queue else step


def drop_stale(queue: Sequence[Pending], step: int, k: int) -> tuple[tuple[Pending, ...], int]:
  """The queue without rollouts more than `k` versions older than `step`, and how many went."""
  kept = tuple(p for p in queue if staleness(step, p) <= k)
  return kept, len(queue) - len(kept)


def updated_fraction(versions_NxC: np.ndarray, mask_NxC: np.ndarray) -> float:
  """In-flight updates: the fraction of completion tokens the update's weights drew (tag 1)."""
  return float((versions_NxC * mask_NxC).sum() / max(mask_NxC.sum(), 1))


def figures(step: int, pending: Pending, dropped: int) -> dict:
  """The step's figures about the rollout it trains on: its own, its staleness (in-flight
  updates: also per token, the tokens drawn after the switch one version fresher), the drops."""
  out = {**pending.figures, "staleness": float(staleness(step, pending)),
         "dropped_stale": float(dropped)}
  if "inflight/updated_tokens" in pending.figures:
    out["inflight/token_staleness"] = out["staleness"] - pending.figures["inflight/updated_tokens"]
  return out


def to_host(queue: Sequence[Pending]) -> dict:
  """The queue as the checkpoint's host tree: NumPy arrays, the rest as JSON bytes."""
  host = {}
  for i, p in enumerate(queue):
    batch = {name: np.asarray(getattr(p.batch, name)) for name in _BATCH_FIELDS
             if getattr(p.batch, name) is not None}
    meta = json.dumps({"version": p.version, "index": p.index, "figures": p.figures,
                       "samples": p.samples})
    host[f"{i:04d}"] = {"batch": batch, "arrays": dict(p.arrays),
                        "meta": np.frombuffer(meta.encode(), np.uint8).copy()}
  return host


def from_host(host: dict) -> tuple[Pending, ...]:
  """`to_host`'s tree back as the queue, in order."""
  queue = []
  for name in sorted(host):
    part = host[name]
    meta = json.loads(np.asarray(part["meta"], np.uint8).tobytes().decode())
    batch = TrainBatch(**{field: np.asarray(part["batch"][field])
                          for field in _BATCH_FIELDS if field in part["batch"]})
    queue.append(Pending(batch, meta["version"], meta["index"], meta["figures"], meta["samples"],
                         {k: np.asarray(v) for k, v in part.get("arrays", {}).items()}))
  return tuple(queue)
