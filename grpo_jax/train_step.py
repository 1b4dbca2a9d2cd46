"""The GRPO update step and the rollout-side log-prob passes, jitted over a device mesh.

  state = TrainState(params, opt_state, step)
  batch = TrainBatch(prompt tokens [B, P], completion tokens [B, C], advantages, old / ref log-probs)
  update_step(state, batch) -> (state, metrics)    one optimizer step (pure)
  sequence_logprobs(params, batch) -> [B, C]       the teacher-forced log-probs of the completions

Memory and speed: rows are processed in micro-batches inside a `lax.scan` (the gradient of the
whole batch is their exact sum, `losses.accumulate_gradients`), and within a micro-batch the
[b, C, V] logits are produced chunk by chunk over the sequence under `jax.checkpoint`, so the
full [B, T, V] float32 logits never exist, neither in the forward nor in the backward pass.

Sharding: `make_update_fn` / `make_logprob_fn` jit these with explicit in/out shardings over a
`Mesh` (params by logical-axis rules, batch rows over ("data", "fsdp")) and donate the state.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import losses, sharding
from grpo_jax import models
from grpo_jax.models import lora


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""
  learning_rate: float = 1e-6
  warmup_steps: int = 0
  decay_steps: int = 0  # 0: constant after warmup
  end_lr_factor: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: Optional[float] = 1.0


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  if cfg.decay_steps > 0:
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_factor)
  if cfg.warmup_steps > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                 optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  parts = [] if cfg.max_grad_norm is None else [optax.clip_by_global_norm(cfg.max_grad_norm)]
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: optimizer steps taken


@flax.struct.dataclass
class TrainBatch:
  """One optimizer batch of B completions (rows prompt-major: a prompt's G completions adjacent).

  prompt_tokens, prompt_mask:         [B, P] left-padded prompts (mask 1 = real token).
  completion_tokens, completion_mask: [B, C] (mask 1 up to and including EOS).
  advantages:                         [B] (outcome) or [B, C] (process supervision).
  old_logprobs:                       [B, C] under the sampling policy, or None (mu = 1: the
                                      current policy's, detached; no extra pass).
  ref_logprobs:                       [B, C] under the reference policy, or None when beta = 0.
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_mask: jax.Array
  advantages: jax.Array
  old_logprobs: Optional[jax.Array] = None
  ref_logprobs: Optional[jax.Array] = None


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- log-probs


def _chunked_logprobs(params, model_config, hidden_BxCxE, targets_BxC, temperature, chunk):
  """Log-probs of targets from hidden states, `chunk` positions at a time, rematerialised."""
  B, C, E = hidden_BxCxE.shape
  chunk = min(chunk, C)
  n = -(-C // chunk)
  if n * chunk > C:  # pad to whole chunks (never the full [B, C, V] logits); padding dropped
    hidden_BxCxE = jnp.pad(hidden_BxCxE, ((0, 0), (0, n * chunk - C), (0, 0)))
    targets_BxC = jnp.pad(targets_BxC, ((0, 0), (0, n * chunk - C)))

  @jax.checkpoint
  def one(h_BxcxE, t_Bxc):
    logits = models.unembed(params, model_config, h_BxcxE)
    return losses.token_logprobs(logits, t_Bxc, temperature=temperature)

  h = hidden_BxCxE.reshape(B, n, chunk, E).swapaxes(0, 1)
  t = targets_BxC.reshape(B, n, chunk).swapaxes(0, 1)
  lp_nxBxc = jax.lax.map(lambda xs: one(*xs), (h, t))
  return lp_nxBxc.swapaxes(0, 1).reshape(B, n * chunk)[:, :C]


def sequence_logprobs(params, batch: TrainBatch, *, model_config, temperature: float = 1.0,
                      vocab_chunk: int = 32, rows=None) -> jax.Array:
  """Teacher-forced log-probs of the completion tokens, [B, C] float32.

  The sequence is prompt (left-padded) + completion; positions count real tokens only, so they
  match the sampler's. The hidden state at position P - 1 + c predicts completion token c.
  `rows`: the batch axes' sharding, held on the tokens and hidden states: with fsdp-split
  weights GSPMD would otherwise compute every row of a micro-batch on every device.
  """
  prompt_len = batch.prompt_tokens.shape[1]
  # A tokenizer's pad id may lie outside the model's vocabulary (padding after the EOS): an
  # out-of-range id would embed to NaN (jnp.take fills) and leak NaN into masked positions.
  V = model_config.vocab_size
  in_vocab = lambda t: jnp.where((t >= 0) & (t < V), t, 0)  # noqa: E731
  batch = batch.replace(prompt_tokens=in_vocab(batch.prompt_tokens),
                        completion_tokens=in_vocab(batch.completion_tokens))
  tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], axis=1)
  # Completion tokens after EOS are padding: they attend to nothing that matters and are masked.
  comp_valid = jnp.ones_like(batch.completion_mask)
  attn = jnp.concatenate([batch.prompt_mask, comp_valid], axis=1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0)
  if rows is not None and tokens.shape[0] % sharding.data_parallel_size(rows.mesh):
    rows = None  # a micro-batch smaller than the data-parallel size: leave it to GSPMD
  if rows is not None:
    tokens, positions, attn = (jax.lax.with_sharding_constraint(x, rows)
                               for x in (tokens, positions, attn))
  hidden, _ = models.forward(params, model_config, tokens, positions, attn, None,
                             return_hidden=True)
  if rows is not None:
    hidden = jax.lax.with_sharding_constraint(hidden, rows)
  hidden_BxCxE = hidden[:, prompt_len - 1:-1]
  return _chunked_logprobs(params, model_config, hidden_BxCxE, batch.completion_tokens,
                           temperature, vocab_chunk)


# ----------------------------------------------------------------------------- update


def update_params(params, frozen=None):
  """The params tree the update's forward reads: the trained params (master dtype, cast to the
  compute dtype inside the model), or LoRA's frozen base beside the adapters, unmerged. The
  old-policy pass reads this same tree with the update's model config, so that before the first
  step its log-probs are the update's and the ratio is exactly 1; a compute-dtype copy (a
  merged W + (alpha / r) A B, or norm scales rounded to bfloat16) is a different function."""
  return params if frozen is None else lora.combine(frozen, params)


def _loss_terms(params, mb: dict, *, model_config, loss_cfg: losses.LossConfig,
                vocab_chunk: int, frozen=None, rows=None):
  batch: TrainBatch = mb["batch"]
  params = update_params(params, frozen)
  logprobs = sequence_logprobs(params, batch, model_config=model_config,
                               temperature=loss_cfg.temperature, vocab_chunk=vocab_chunk,
                               rows=rows)
  return losses.loss_terms(loss_cfg, logprobs, batch.completion_mask, batch.advantages,
                           mb["weights"], old_logprobs=batch.old_logprobs,
                           ref_logprobs=batch.ref_logprobs)


def loss_and_grads(params, batch: TrainBatch, *, model_config, loss_cfg: losses.LossConfig,
                   num_microbatches: int = 1, vocab_chunk: int = 32, frozen=None, rows=None):
  """(loss, metrics, grads) of the whole batch, accumulated exactly over micro-batches.
  `frozen`: params that take part in the forward pass but get no gradient (LoRA's base)."""
  weights = losses.loss_weights(batch.completion_mask, loss_type=loss_cfg.loss_type,
                                max_completion_length=loss_cfg.max_completion_length)
  terms = functools.partial(_loss_terms, model_config=model_config, loss_cfg=loss_cfg,
                            vocab_chunk=vocab_chunk, frozen=frozen, rows=rows)
  loss, sums, grads = losses.accumulate_gradients(
      terms, params, {"batch": batch, "weights": weights}, num_microbatches)
  metrics = losses.finalize_metrics(sums)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
  return loss, metrics, grads


def update_step(state: TrainState, batch: TrainBatch, frozen=None, *, model_config, optimizer,
                loss_cfg: losses.LossConfig, num_microbatches: int = 1,
                vocab_chunk: int = 32, rows=None) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`: GRPO loss, exact accumulated gradients, optax update.

  With LoRA, `state.params` are the adapters and `frozen` the base model: the optimiser (and its
  state) sees only the adapters. A non-finite loss or gradient skips the update (state
  unchanged, `skipped` = 1 in the metrics; the driver counts the streak). Returns the new state
  and metrics (loss, grad_norm, skipped and the loss metrics).
  """
  loss, metrics, grads = loss_and_grads(state.params, batch, model_config=model_config,
                                        loss_cfg=loss_cfg, num_microbatches=num_microbatches,
                                        vocab_chunk=vocab_chunk, frozen=frozen, rows=rows)
  return apply_gradients(state, loss, grads, metrics, optimizer)


def apply_gradients(state: TrainState, loss, grads, metrics: dict,
                    optimizer) -> tuple[TrainState, dict]:
  """The optax step, skipped (state unchanged, `skipped` = 1 in the metrics) when the loss or
  the gradient norm is not finite. Shared by the policy's and the reward model's updates."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new = TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                   step=state.step + 1)
  ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
  new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
  return new, dict(metrics, skipped=1.0 - ok.astype(jnp.float32))


def batched_logprobs(params, batch: TrainBatch, *, model_config, temperature: float = 1.0,
                     num_microbatches: int = 1, vocab_chunk: int = 32, rows=None) -> jax.Array:
  """`sequence_logprobs` over micro-batches of rows (`lax.map`): the reference / old pass."""
  if num_microbatches == 1:
    return sequence_logprobs(params, batch, model_config=model_config, temperature=temperature,
                             vocab_chunk=vocab_chunk, rows=rows)
  micro = losses.split_microbatches(batch, num_microbatches)
  lp_MxbxC = jax.lax.map(lambda mb: sequence_logprobs(
      params, mb, model_config=model_config, temperature=temperature, vocab_chunk=vocab_chunk,
      rows=rows), micro)
  # Undo the strided split: row r of the batch is row r // M of micro-batch r % M.
  return lp_MxbxC.swapaxes(0, 1).reshape(-1, lp_MxbxC.shape[-1])


# ----------------------------------------------------------------------------- jit over a mesh


def state_shardings(mesh: Mesh, model_config, optimizer, params_shapes, rules=sharding.DEFAULT_RULES):
  """NamedShardings of a TrainState, from the model's logical axes and the rules. With LoRA and
  `params_shapes` holding only the adapters, the adapters' shardings."""
  axes = _restrict(models.param_logical_axes(model_config), params_shapes)
  param_sh = sharding.tree_shardings(mesh, axes, params_shapes, rules)
  opt_sh = sharding.optimizer_shardings(mesh, optimizer, params_shapes, param_sh)
  return TrainState(params=param_sh, opt_state=opt_sh, step=sharding.replicated(mesh))


def _restrict(axes: dict, shapes: dict) -> dict:
  """The logical-axes tree cut to the keys of `shapes` (e.g. LoRA's adapters only)."""
  return {k: _restrict(axes[k], v) if isinstance(v, dict) else axes[k] for k, v in shapes.items()}


def init_sharded_state(mesh: Mesh, model_config, optimizer, rng, rules=sharding.DEFAULT_RULES):
  """A fresh TrainState created directly in its shards (no host copy of the full params), and
  its shardings. Works unchanged on one device, a multi-device host and several hosts."""
  params_shapes = jax.eval_shape(functools.partial(models.init_params, model_config), rng)
  state_sh = state_shardings(mesh, model_config, optimizer, params_shapes, rules)
  init = lambda r: init_train_state(models.init_params(model_config, r), optimizer)
  return jax.jit(init, out_shardings=state_sh)(rng), state_sh


def _rows(mesh: Mesh) -> NamedSharding:
  """Rows over the batch axes, the rest whole: what every micro-batch's activations keep."""
  return NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))


def make_update_fn(mesh: Mesh, state_sh: TrainState, *, model_config, optimizer,
                   loss_cfg: losses.LossConfig, num_microbatches: int = 1, vocab_chunk: int = 32,
                   frozen_sh=None):
  """`update_step` jitted over `mesh`: state in/out with `state_sh`, batch rows over the data
  axes, metrics replicated, the input state donated. With `frozen_sh` (LoRA's base params'
  shardings) the function takes `(state, batch, frozen)`."""
  fn = functools.partial(update_step, model_config=model_config, optimizer=optimizer,
                         loss_cfg=loss_cfg, num_microbatches=num_microbatches,
                         vocab_chunk=vocab_chunk, rows=_rows(mesh))
  batch_sh = sharding.batch_sharding(mesh)  # a prefix: applies to every leaf's leading axis
  in_sh = (state_sh, batch_sh) if frozen_sh is None else (state_sh, batch_sh, frozen_sh)
  return jax.jit(fn, in_shardings=in_sh,
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def make_logprob_fn(mesh: Mesh, params_sh, *, model_config, temperature: float = 1.0,
                    num_microbatches: int = 1, vocab_chunk: int = 32):
  """`batched_logprobs` jitted over `mesh`: the reference pass, and the old-policy pass with
  the update's `model_config` and `params_sh` those of `update_params`."""
  fn = functools.partial(batched_logprobs, model_config=model_config, temperature=temperature,
                         num_microbatches=num_microbatches, vocab_chunk=vocab_chunk,
                         rows=_rows(mesh))
  return jax.jit(fn, in_shardings=(params_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh, 2))


# ----------------------------------------------------------------------------- variable lengths


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
  (`update_params`)."""
  rows, rep = _rows(mesh), sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def grads(params, batch, weights, frozen=None):
    terms = functools.partial(_loss_terms, model_config=model_config, loss_cfg=loss_cfg,
                              vocab_chunk=vocab_chunk, frozen=frozen, rows=rows)
    (loss, sums), g = jax.value_and_grad(terms, has_aux=True)(
        params, {"batch": batch, "weights": weights})
    return loss, sums, g

  def apply(state, loss, sums, g):
    metrics = losses.finalize_metrics(sums)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(g))
    return apply_gradients(state, loss, g, metrics, optimizer)

  in_sh = (state_sh.params, batch_sh, batch_sh) + (() if frozen_sh is None else (frozen_sh,))
  triple_sh = (rep, rep, state_sh.params)
  logprobs = functools.partial(sequence_logprobs, model_config=base_config or model_config,
                               temperature=loss_cfg.temperature, vocab_chunk=vocab_chunk,
                               rows=rows)
  out_sh = sharding.batch_sharding(mesh, 2)
  reference = jax.jit(logprobs, in_shardings=(params_sh, batch_sh), out_shardings=out_sh)
  policy = reference
  if frozen_sh is not None:
    policy = jax.jit(functools.partial(logprobs, model_config=model_config),
                     in_shardings=(update_params(state_sh.params, frozen_sh), batch_sh),
                     out_shardings=out_sh)
  return BucketedPrograms(
      grads=jax.jit(grads, in_shardings=in_sh, out_shardings=triple_sh),
      add=jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), out_shardings=triple_sh,
                  donate_argnums=0),
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
                    old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(batch.ref_logprobs))


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
