"""Length-bucketed updates: each micro-batch of rows at the width its completions need.

    plan = microbatch_plan(mask_BxC, micro_batch_size, step)   # [(rows, width)], longest first
    programs = make_bucketed_programs(mesh, state_sh, params_sh, model_config=..., ...)
    state, metrics = bucketed_update(programs, state, host_batch, plan, mesh)
    logprobs_BxC = bucketed_logprobs(programs, params, host_batch, plan, mesh)

Rows are sorted by length and cut into micro-batches, each cut to its longest row's width
rounded up to a multiple of the bucket step (`bucket_width`), so a batch of short completions
does not pay for the whole budget. The update's loss weights come from the whole padded batch,
so the step is train_step.update_step's. Each program compiles once per width; a step that
meets several new widths compiles them concurrently (`compile_new`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from grpo_jax import losses, microbatches, sharding
from grpo_jax import train_step as ts
from grpo_jax.train_step import TrainBatch, TrainState


@dataclasses.dataclass(frozen=True)
class BucketedPrograms:
  """The update as separate jitted pieces, so that each micro-batch runs at its own width:
  `grads(params, micro_batch, weights[, frozen]) -> (loss, sums, grads)`, `add` (sums two
  such triples), `apply(state, loss, sums, grads) -> (state, metrics)`, `logprobs(params,
  micro_batch) -> [b, w]` (the reference pass), `policy_logprobs(update_params, micro_batch)`
  (the old-policy pass). Each compiles once per width (a few: widths are bucketed); a step
  that meets several new widths compiles them concurrently (`compile_new`)."""
  grads: Any
  add: Any
  apply: Any
  logprobs: Any
  policy_logprobs: Any  # `grads`' own forward (see `make_bucketed_programs`): the old pass
  loss_cfg: losses.LossConfig  # the objective they compute (its weights: `bucketed_update`)
  # (program name, micro-batch shapes) already compiled in this process: a host-side cache
  compiled: set = dataclasses.field(default_factory=set, compare=False, repr=False)


def make_bucketed_programs(mesh: Mesh, state_sh: TrainState, params_sh, *, model_config,
                           optimizer, loss_cfg: losses.LossConfig, vocab_chunk: int = 32,
                           frozen_sh=None, base_config=None) -> BucketedPrograms:
  """`BucketedPrograms` over `mesh` (micro-batch rows over the batch axes). `params_sh`: the
  reference pass's params (the full model, `base_config`); `state_sh.params`: the trained ones
  (LoRA: the adapters, beside `frozen_sh`), which the old-policy pass reads as the update does
  (`train_step.update_params`)."""
  rows, rep = ts.row_sharding(mesh), sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def grads(params, batch, weights, frozen=None):
    terms = functools.partial(ts.microbatch_loss_terms, model_config=model_config,
                              loss_cfg=loss_cfg, vocab_chunk=vocab_chunk, frozen=frozen,
                              rows=rows)
    (loss, sums), g = jax.value_and_grad(terms, has_aux=True)(
        params, {"batch": batch, "weights": weights})
    return loss, sums, g

  def apply(state, loss, sums, g):
    metrics = losses.finalize_metrics(sums)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(g))
    return ts.apply_gradients(state, loss, g, metrics, optimizer)

  in_sh = (state_sh.params, batch_sh, batch_sh) + (() if frozen_sh is None else (frozen_sh,))
  triple_sh = (rep, rep, state_sh.params)
  logprobs = functools.partial(ts.sequence_logprobs, model_config=base_config or model_config,
                               temperature=loss_cfg.temperature, vocab_chunk=vocab_chunk,
                               rows=rows)
  out_sh = sharding.batch_sharding(mesh, 2)
  reference = jax.jit(logprobs, in_shardings=(params_sh, batch_sh), out_shardings=out_sh)
  policy = reference
  if frozen_sh is not None:
    policy = jax.jit(functools.partial(logprobs, model_config=model_config),
                     in_shardings=(ts.update_params(state_sh.params, frozen_sh), batch_sh),
                     out_shardings=out_sh)
  return BucketedPrograms(
      grads=jax.jit(grads, in_shardings=in_sh, out_shardings=triple_sh),
      add=jax.jit(microbatches.add_terms, out_shardings=triple_sh, donate_argnums=0),
      apply=jax.jit(apply, in_shardings=(state_sh, rep, rep, state_sh.params),
                    out_shardings=(state_sh, rep), donate_argnums=0),
      logprobs=reference, policy_logprobs=policy, loss_cfg=loss_cfg)


def bucket_width(needed: int, step: int, limit: int) -> int:
  """`needed` columns rounded up to a multiple of `step`, at most `limit` (step 0: limit)."""
  return limit if not step else min(limit, -(-max(needed, 1) // step) * step)


def microbatch_plan(mask_BxC, micro_batch_size: int, step: int) -> list[tuple[Any, int]]:
  """Rows sorted by length (the last mask-1 column), cut into micro-batches of
  `micro_batch_size` rows, each with the width it needs (`bucket_width`): [(rows, width)]."""
  mask_BxC = np.asarray(mask_BxC)
  B, C = mask_BxC.shape
  needed_B = np.where(mask_BxC.any(1), C - np.argmax(mask_BxC[:, ::-1] > 0, axis=1), 1)
  order = np.argsort(-needed_B, kind="stable")
  return [(order[i:i + micro_batch_size],
           bucket_width(int(needed_B[order[i:i + micro_batch_size]].max()), step, C))
          for i in range(0, B, micro_batch_size)]


def _rows_of(batch: TrainBatch, rows, width: int) -> TrainBatch:
  cut = lambda x: None if x is None else x[rows, :width]  # noqa: E731
  adv = batch.advantages
  return TrainBatch(prompt_tokens=batch.prompt_tokens[rows], prompt_mask=batch.prompt_mask[rows],
                    completion_tokens=cut(batch.completion_tokens),
                    completion_mask=cut(batch.completion_mask),
                    advantages=adv[rows, :width] if adv.ndim == 2 else adv[rows],
                    old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(batch.ref_logprobs),
                    sampler_logprobs=cut(batch.sampler_logprobs),
                    cov_selected=cut(batch.cov_selected))


def bucketed_logprobs(programs: BucketedPrograms, params, batch: TrainBatch, plan, mesh,
                      name: str = "logprobs"):
  """[B, C] log-probs (NumPy) of a host batch, each micro-batch of `plan` at its own width;
  0 past a micro-batch's width (where its rows have no tokens). `name`: "logprobs" (the
  reference pass) or "policy_logprobs" (the old-policy pass, on `update_params`)."""
  return gather_logprobs(dispatch_logprobs(programs, params, batch, plan, mesh, name),
                         batch.completion_tokens.shape)


def compile_new(programs: BucketedPrograms, name: str, calls: list[tuple]) -> None:
  """Compiles `programs.<name>` ahead of time for the argument tuples in `calls` whose
  micro-batch shapes it has not met yet, all at once in threads (XLA compiles release the GIL:
  a first step meeting 4 widths waits for about one compile on a many-core host, not 4); the
  jitted program's calls then reuse these executables (its in-memory cache)."""
  fn, new = getattr(programs, name), {}
  for args in calls:
    # the micro-batch (and its weights) set the shapes; params and frozen base never change
    key = (name,) + tuple(np.shape(x) for x in jax.tree.leaves(args[1:3]))
    if key not in programs.compiled:
      new.setdefault(key, args)
  if len(new) > 1:
    with concurrent.futures.ThreadPoolExecutor(len(new)) as pool:
      list(pool.map(lambda a: fn.lower(*a).compile(), new.values()))
  programs.compiled.update(new)


def dispatch_logprobs(programs: BucketedPrograms, params, batch: TrainBatch, plan, mesh,
                      name: str = "logprobs") -> list:
  """`bucketed_logprobs` dispatched, not awaited: [(rows, width, device log-probs)]."""
  parts = [(rows, width, sharding.shard_batch((_rows_of(batch, rows, width),), mesh)[0])
           for rows, width in plan]
  compile_new(programs, name, [(params, mb) for _, _, mb in parts])
  fn = getattr(programs, name)
  return [(rows, width, fn(params, mb)) for rows, width, mb in parts]


def gather_logprobs(parts: list, shape) -> np.ndarray:
  """The [B, C] NumPy log-probs of `dispatch_logprobs`'s parts (waits for them)."""
  out = np.zeros(shape, np.float32)
  for rows, width, lp in parts:
    out[rows, :width] = np.asarray(jax.device_get(lp))
  return out


def bucketed_update(programs: BucketedPrograms, state: TrainState, batch: TrainBatch, plan,
                    mesh, *, frozen=None):
  """One optimizer step on a host batch whose micro-batches run at their own widths; the loss
  weights come from the whole padded batch, so the step is `update_step`'s (tested)."""
  loss_cfg = programs.loss_cfg
  weights = jax.device_get(losses.loss_weights(
      batch.completion_mask, loss_type=loss_cfg.loss_type,
      max_completion_length=loss_cfg.max_completion_length))
  calls = []
  for rows, width in plan:
    mb = _rows_of(batch, rows, width)
    w = losses.LossWeights(loss_BxT=np.asarray(weights.loss_BxT)[rows, :width],
                           token_BxT=np.asarray(weights.token_BxT)[rows, :width],
                           seq_B=np.asarray(weights.seq_B)[rows])
    mb, w = sharding.shard_batch((mb, w), mesh)
    calls.append((state.params, mb, w) if frozen is None else (state.params, mb, w, frozen))
  compile_new(programs, "grads", calls)
  total = None
  for args in calls:
    triple = programs.grads(*args)
    total = triple if total is None else programs.add(total, triple)
  return programs.apply(state, *total)
