"""The device half of a GRPO step: log-prob passes, mu policy updates, the reference policy.

    params = updates.update_params(exp, state, frozen)            # what the update's forward reads
    batch = updates.with_logprobs(exp, params, reference, batch)  # ref (beta > 0), old (mu > 1)
    state, figures = updates.update(exp, state, batch, frozen)    # mu optimizer steps
    ref_params = updates.next_reference(exp, ref_params, state.params, step)

or, overlapping host work (the trainer's step): `started = updates.start_logprobs(...)` as soon
as the tokens exist, `batch = updates.finish(exp, started, advantages)` once rewards are scored,
`updates.dispatch_update` then the step's host bookkeeping, then its metrics.

The batch moves to the mesh once; the passes and updates are the jitted `exp.programs`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from grpo_jax import experiment
from grpo_jax import train_step as ts
from grpo_jax.experiment import Experiment
from grpo_jax.train_step import TrainBatch, TrainState


def bucket_width(mask_BxC, step: int) -> int:
  """The completion width a batch needs: its last real (mask 1) column + 1, rounded up to a
  multiple of `step` (a few widths, so a few compilations), at most C; step 0: C."""
  mask_BxC = np.asarray(mask_BxC)
  cols = np.flatnonzero(mask_BxC.any(axis=0))
  return ts.bucket_width(int(cols[-1]) + 1 if cols.size else 1, step, mask_BxC.shape[1])


def trim(batch: TrainBatch, width: int) -> TrainBatch:
  """The batch cut to its first `width` completion columns. Exact: the columns cut hold no loss
  (mask 0) and come after every kept token, which a causal model never lets them influence;
  the loss's constants (dr_grpo's length) come from the config, not from the width."""
  if width == batch.completion_tokens.shape[1]:
    return batch
  cut = lambda x: None if x is None else x[:, :width]  # noqa: E731
  adv = batch.advantages
  return batch.replace(completion_tokens=cut(batch.completion_tokens),
                       completion_mask=cut(batch.completion_mask),
                       advantages=adv[:, :width] if np.ndim(adv) == 2 else adv,
                       old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(batch.ref_logprobs))


def update_params(exp: Experiment, state: TrainState, frozen=None):
  """The policy as the update's forward reads it (`ts.update_params`): the master weights, or
  LoRA's base beside the adapters. The old-policy pass takes this, not the sampler's
  compute-dtype (merged) copy: the ratio's two log-probs must come from one function of the
  same weights, and a merged bfloat16 copy's log-probs differ from the update's by up to ~1e-2."""
  return ts.update_params(state.params, frozen)


def with_logprobs(exp: Experiment, params, ref_params, batch: TrainBatch) -> TrainBatch:
  """`batch` on the mesh, cut to the completion width it needs (`bucket_width`: rows shorter
  than the budget cost less), with the reference policy's log-probs when the KL is on
  (beta > 0) and the sampling policy's when mu > 1 (for mu = 1 the loss uses the current ones,
  detached). `params`: `update_params`, the sampling policy as the update computes it (the
  sampler itself may decode with a compute-dtype, merged copy: a sampling / training mismatch,
  not the ratio's). The non-GRPO objectives (advantage-weighted NLL) need neither pass.
  With length buckets (`exp.programs.bucketed`) the batch stays on the host and each
  micro-batch runs at its own width (`update` places them)."""
  return finish(exp, start_logprobs(exp, params, ref_params, batch), batch.advantages)


class Started(NamedTuple):
  """`with_logprobs`'s passes, dispatched and not awaited (`start_logprobs`)."""
  batch: TrainBatch  # on the mesh and trimmed (length-bucketed: on the host, whole)
  ref: Any           # device log-probs, or the bucketed parts (`ts.dispatch_logprobs`), or None
  old: Any
  bucketed: bool = False


def start_logprobs(exp: Experiment, params, ref_params, batch: TrainBatch) -> Started:
  """`with_logprobs`'s device work, queued and not awaited: the passes read only tokens, so
  the trainer starts them before the host decodes texts and scores rewards
  (`rollout.collect(start=...)`), and the advantages come later (`finish`)."""
  s = exp.settings
  batch = jax.tree.map(np.asarray, batch)
  buckets = bucketed_plan(exp, batch)
  if buckets is None:
    batch = exp.shard(trim(batch, bucket_width(batch.completion_mask, length_step(exp))))[0]
  if s.rollout.paradigm.objective != "grpo":
    return Started(batch, None, None, buckets is not None)
  if buckets is not None:
    logprobs = lambda p, name: ts.dispatch_logprobs(  # noqa: E731
        exp.programs.bucketed, p, batch, buckets, exp.mesh, name)
  else:
    logprobs = lambda p, name: getattr(exp.programs, name)(p, batch)  # noqa: E731
  ref = (logprobs(experiment.compute_params(exp, ref_params), "logprobs")
         if s.grpo.loss.beta != 0.0 else None)
  # `params` uncast: the update casts the master weights inside the model, so this pass does.
  old = logprobs(params, "policy_logprobs") if s.grpo.num_iterations > 1 else None
  return Started(batch, ref, old, buckets is not None)


def finish(exp: Experiment, started: Started, advantages) -> TrainBatch:
  """The update's batch: `start_logprobs`'s with its `advantages` ([N] or [N, C]) and
  log-probs (bucketed: gathered to the host, which waits for those passes only)."""
  batch = started.batch
  if started.bucketed:
    shape = batch.completion_tokens.shape
    get = lambda parts: None if parts is None else ts.gather_logprobs(parts, shape)  # noqa: E731
    return batch.replace(advantages=np.asarray(advantages, np.float32),
                         ref_logprobs=get(started.ref), old_logprobs=get(started.old))
  advantages = np.asarray(advantages, np.float32)
  if advantages.ndim == 2:  # per-token (process supervision): the batch's width
    advantages = advantages[:, :batch.completion_tokens.shape[1]]
  return batch.replace(advantages=exp.shard(advantages)[0], ref_logprobs=started.ref,
                       old_logprobs=started.old)


def bucketed_plan(exp: Experiment, batch: TrainBatch):
  """The length-bucketed micro-batches of a host batch (`plan`), or None for the fused padded
  programs at the batch's width: without length buckets, and when every micro-batch would
  have the same width (fixed-length completions: one scanned program instead of a dispatch
  per micro-batch, which on a GPU cost the SPEC step 1.9x)."""
  if exp.programs.bucketed is None or not isinstance(batch.completion_mask, np.ndarray):
    return None
  p = plan(exp, batch)
  return p if len({width for _, width in p}) > 1 else None


def plan(exp: Experiment, batch: TrainBatch):
  """The micro-batches of a host batch: rows sorted by length, each micro-batch's width."""
  mbs = batch.completion_mask.shape[0] // exp.settings.grpo.num_microbatches
  return ts.microbatch_plan(batch.completion_mask, mbs, length_step(exp))


def length_step(exp: Experiment) -> int:
  """Width step of `bucket_width` (config.grpo.length_bucket; 0 = always the whole budget):
  multiples of it up to C = max_completion_length + 1."""
  return exp.settings.grpo.length_bucket


def update(exp: Experiment, state: TrainState, batch: TrainBatch,
           frozen=None) -> tuple[TrainState, dict]:
  """mu = grpo.num_iterations optimizer steps on one rollout batch (one for the NLL objectives);
  `frozen`: LoRA's base, beside the adapters in `state`.

  Figures: each metric's mean over the mu steps, with `<name>/first` and `<name>/last` when
  mu > 1, and `skipped`, the number of steps a non-finite loss or gradient skipped."""
  state, metrics = dispatch_update(exp, state, batch, frozen)
  return state, aggregate(jax.device_get(metrics))


def dispatch_update(exp: Experiment, state: TrainState, batch: TrainBatch, frozen=None):
  """`update`, queued and not awaited: (state, the mu steps' device metrics). The trainer does
  its host work for the step before reading them (`aggregate(jax.device_get(metrics))`)."""
  mu = exp.settings.grpo.num_iterations if exp.settings.rollout.paradigm.objective == "grpo" else 1
  metrics = []
  buckets = bucketed_plan(exp, batch)  # a host batch (`finish` of a bucketed `start_logprobs`)
  if buckets is None and isinstance(batch.completion_mask, np.ndarray):
    batch = exp.shard(trim(batch, bucket_width(batch.completion_mask, length_step(exp))))[0]
  for _ in range(mu):
    if buckets is not None:
      state, m = ts.bucketed_update(exp.programs.bucketed, state, batch, buckets, exp.mesh,
                                    frozen=frozen)
    else:
      state, m = (exp.programs.policy_update(state, batch) if frozen is None
                  else exp.programs.policy_update(state, batch, frozen))
    metrics.append(m)
  return state, metrics


def aggregate(metrics: list[dict]) -> dict:
  """Per-step metric dicts of one rollout -> figures (see `update`)."""
  figures = {}
  for name in metrics[0]:
    values = [float(m[name]) for m in metrics]
    if name == "skipped":
      figures[name] = sum(values)
      continue
    figures[name] = values[0] if len(values) == 1 else float(np.mean(values))
    if len(values) > 1:
      figures[f"{name}/first"], figures[f"{name}/last"] = values[0], values[-1]
  return figures


def next_reference(exp: Experiment, ref_params, params, step: int):
  """Reference policy after `step` updates: frozen, reset to the policy every
  `ref_reset_every` steps, or an EMA of it (`ref_ema`); untouched without a KL term. A copy
  (`experiment.reference_copy`) survives the donation of `params` to the next update."""
  g = exp.settings.grpo
  if g.loss.beta == 0.0:
    return ref_params
  if g.ref_reset_every and step % g.ref_reset_every == 0:
    return experiment.reference_copy(exp, params)
  if g.ref_ema:
    return _ema(ref_params, params, g.ref_ema)
  return ref_params


@jax.jit
def _ema(ref_params, params, rate):
  """ref <- (1 - rate) * ref + rate * policy, one fused program (not one dispatch per leaf)."""
  return jax.tree.map(lambda r, p: (1 - rate) * r + rate * p, ref_params, params)
