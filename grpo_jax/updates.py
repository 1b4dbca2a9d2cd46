"""The device half of a GRPO step: log-prob passes, mu policy updates, the reference policy.

    params = weights.update_params(state, frozen)                     # the update's forward
    ready = updates.with_logprobs(device, g, params, reference, batch)  # ref, old log-probs
    state, figures = updates.update(device, g, state, ready, frozen)    # mu optimizer steps
    ref_params = updates.next_reference(device, g, ref_params, state.params, step)

or, overlapping host work (the trainer's step): `started = updates.start_logprobs(...)` as soon
as the tokens exist, `ready = updates.finish(device, started, advantages)` once rewards are
scored, `updates.dispatch_update` then the step's host bookkeeping, then its metrics.

The batch's layout is decided once, when the passes start (`Plan`): on the mesh, cut to the
completion width it needs, for the fused padded programs; or, with length buckets, on the host
whole with its micro-batches, each run at its own width. The programs are `device.programs`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from grpo_jax import buckets, covariance, losses, weights
from grpo_jax.experiment import Device
from grpo_jax.settings import GRPOSettings
from grpo_jax.train_step import TrainBatch, TrainState

# Length-bucketed micro-batches of a host batch (`buckets.microbatch_plan`: rows and width of each);
# None: one fused program over the whole (trimmed) batch on the mesh.
Plan = Optional[list]


class Started(NamedTuple):
  """`with_logprobs`' passes, dispatched and not awaited (`start_logprobs`)."""
  batch: TrainBatch  # on the mesh and trimmed (plan None), or on the host, whole
  ref: Any           # device log-probs, the bucketed parts (`buckets.dispatch_logprobs`), None
  old: Any
  plan: Plan = None


class Ready(NamedTuple):
  """The update's batch: advantages and log-probs in, laid out as `plan` says."""
  batch: TrainBatch
  plan: Plan = None


def bucket_width(mask_BxC, step: int) -> int:
  """The completion width a batch needs: its last real (mask 1) column + 1, rounded up to a
  multiple of `step` (a few widths, so a few compilations), at most C; step 0: C."""
  mask_BxC = np.asarray(mask_BxC)
  cols = np.flatnonzero(mask_BxC.any(axis=0))
  return buckets.bucket_width(int(cols[-1]) + 1 if cols.size else 1, step, mask_BxC.shape[1])


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
                       old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(batch.ref_logprobs),
                       sampler_logprobs=cut(batch.sampler_logprobs),
                       cov_selected=cut(batch.cov_selected))


def plan(device: Device, g: GRPOSettings, batch: TrainBatch) -> Plan:
  """The length-bucketed micro-batches of a host batch (rows sorted by length, each
  micro-batch's width), or None for the fused padded programs at the batch's width: without
  length buckets, and when every micro-batch would have the same width (fixed-length
  completions: one scanned program instead of a dispatch per micro-batch, which on a GPU cost
  the SPEC step 1.9x)."""
  if device.programs.bucketed is None:
    return None
  mbs = batch.completion_mask.shape[0] // g.num_microbatches
  micro = buckets.microbatch_plan(np.asarray(batch.completion_mask), mbs, g.length_bucket)
  return micro if len({width for _, width in micro}) > 1 else None


def place(device: Device, g: GRPOSettings, batch: TrainBatch, micro: Plan) -> TrainBatch:
  """A host batch where `micro` runs it: on the mesh at the width it needs (`bucket_width`,
  multiples of grpo.length_bucket: rows shorter than the budget cost less), or on the host."""
  if micro is not None:
    return batch
  return device.shard(trim(batch, bucket_width(batch.completion_mask, g.length_bucket)))[0]


def with_logprobs(device: Device, g: GRPOSettings, params, ref_params,
                  batch: TrainBatch) -> Ready:
  """`batch` placed (`plan`, `place`), with the reference policy's log-probs when the KL is on
  (beta > 0) and the sampling policy's when mu > 1 (for mu = 1 the loss uses the current ones,
  detached). `params`: `weights.update_params`, the sampling policy as the update computes it
  (the sampler itself may decode with a compute-dtype, merged copy: a sampling / training
  mismatch, not the ratio's). The non-GRPO objectives (advantage-weighted NLL) need neither."""
  return finish(device, start_logprobs(device, g, params, ref_params, batch), batch.advantages,
                loss=g.loss)


def start_logprobs(device: Device, g: GRPOSettings, params, ref_params,
                   batch: TrainBatch) -> Started:
  """`with_logprobs`' device work, queued and not awaited: the passes read only tokens, so
  the trainer starts them before the host decodes texts and scores rewards
  (`rollout.collect(start=...)`), and the advantages come later (`finish`)."""
  programs = device.programs
  batch = jax.tree.map(np.asarray, batch)
  micro = plan(device, g, batch)
  batch = place(device, g, batch, micro)
  if programs.objective != "grpo":
    return Started(batch, None, None, micro)
  if micro is not None:
    logprobs = lambda p, name: buckets.dispatch_logprobs(  # noqa: E731
        programs.bucketed, p, batch, micro, device.mesh, name)
  else:
    logprobs = lambda p, name: getattr(programs, name)(p, batch)  # noqa: E731
  ref = (logprobs(weights.compute_params(device, ref_params), "logprobs")
         if g.loss.beta != 0.0 else None)
  # `params` uncast: the update casts the master weights inside the model, so this pass does.
  old = logprobs(params, "policy_logprobs") if g.num_iterations > 1 else None
  return Started(batch, ref, old, micro)


def finish(device: Device, started: Started, advantages, *,
           loss: Optional[losses.LossConfig] = None, key: Optional[jax.Array] = None) -> Ready:
  """The update's batch: `start_logprobs`' with its `advantages` ([N] or [N, C]) and
  log-probs (bucketed: gathered to the host, which waits for those passes only); for
  Clip-Cov / KL-Cov (`loss.policy_loss`) the tokens they restrain, chosen over the whole batch
  (covariance.py; `key` draws Clip-Cov's)."""
  batch = started.batch
  advantages = np.asarray(advantages, np.float32)
  if started.plan is not None:
    shape = batch.completion_tokens.shape
    get = lambda p: None if p is None else buckets.gather_logprobs(p, shape)  # noqa: E731
    ready = Ready(batch.replace(advantages=advantages, ref_logprobs=get(started.ref),
                                old_logprobs=get(started.old)), started.plan)
  else:
    if advantages.ndim == 2:  # per-token (process supervision): the batch's width
      advantages = advantages[:, :batch.completion_tokens.shape[1]]
    ready = Ready(batch.replace(advantages=device.shard(advantages)[0], ref_logprobs=started.ref,
                                old_logprobs=started.old))
  if (loss is None or loss.policy_loss not in covariance.COV_LOSSES
      or device.programs.objective != "grpo"):
    return ready
  b = ready.batch
  selected = covariance.select(b.sampler_logprobs, b.advantages, b.completion_mask,
                               jax.random.key(0) if key is None else key, kind=loss.policy_loss,
                               fraction=loss.cov_fraction, low=loss.cov_low, high=loss.cov_high)
  return ready._replace(batch=b.replace(
      cov_selected=selected if ready.plan is None else np.asarray(selected)))


def update(device: Device, g: GRPOSettings, state: TrainState, ready: Ready,
           frozen=None) -> tuple[TrainState, dict]:
  """mu = grpo.num_iterations optimizer steps on one rollout batch (one for the NLL objectives);
  `frozen`: LoRA's base, beside the adapters in `state`.

  Figures: each metric's mean over the mu steps, with `<name>/first` and `<name>/last` when
  mu > 1, and `skipped`, the number of steps a non-finite loss or gradient skipped."""
  state, metrics = dispatch_update(device, g, state, ready, frozen)
  return state, aggregate(jax.device_get(metrics))


def dispatch_update(device: Device, g: GRPOSettings, state: TrainState, ready: Ready,
                    frozen=None):
  """`update`, queued and not awaited: (state, the mu steps' device metrics). The trainer does
  its host work for the step before reading them (`aggregate(jax.device_get(metrics))`)."""
  programs = device.programs
  mu = g.num_iterations if programs.objective == "grpo" else 1
  metrics = []
  for _ in range(mu):
    if ready.plan is not None:
      state, m = buckets.bucketed_update(programs.bucketed, state, ready.batch, ready.plan,
                                    device.mesh, frozen=frozen)
    else:
      state, m = (programs.policy_update(state, ready.batch) if frozen is None
                  else programs.policy_update(state, ready.batch, frozen))
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


def next_reference(device: Device, g: GRPOSettings, ref_params, params, step: int):
  """Reference policy after `step` updates: frozen, reset to the policy every
  `ref_reset_every` steps, or an EMA of it (`ref_ema`); untouched without a KL term. A copy
  (`weights.reference_copy`) survives the donation of `params` to the next update."""
  if g.loss.beta == 0.0:
    return ref_params
  if g.ref_reset_every and step % g.ref_reset_every == 0:
    return weights.reference_copy(device, params, ema=bool(g.ref_ema))
  if g.ref_ema:
    return _ema(ref_params, params, g.ref_ema)
  return ref_params


@jax.jit
def _ema(ref_params, params, rate):
  """ref <- (1 - rate) * ref + rate * policy, one fused program (not one dispatch per leaf)."""
  return jax.tree.map(lambda r, p: (1 - rate) * r + rate * p, ref_params, params)
