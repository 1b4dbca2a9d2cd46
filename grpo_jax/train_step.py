"""The GRPO update step and the rollout-side log-prob passes, jitted over a device mesh.

  state = TrainState(params, opt_state, step)
  batch = TrainBatch(prompt tokens [B, P], completion tokens [B, C], advantages, old / ref log-probs)
  update_step(state, batch) -> (state, metrics)    one optimizer step (pure)
  sequence_logprobs(params, batch) -> [B, C]       the teacher-forced log-probs of the completions

Memory and speed: rows are processed in micro-batches inside a `lax.scan` (the gradient of the
whole batch is their exact sum, `microbatches.accumulate_gradients`), and within a micro-batch the
[b, C, V] logits are produced chunk by chunk over the sequence under `jax.checkpoint`, so the
full [B, T, V] float32 logits never exist, neither in the forward nor in the backward pass.

Sharding: `make_update_fn` / `make_logprob_fn` jit these with explicit in/out shardings over a
`Mesh` (params by logical-axis rules, batch rows over ("data", "fsdp")) and donate the state.
The optimiser is `make_optimizer(OptimConfig)` (the config's `optim`, settings_types.py).
Micro-batches run at their own widths (a length-bucketed update): grpo_jax/buckets.py.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import losses, microbatches, sharding
from grpo_jax import models
from grpo_jax.models import lora
from grpo_jax.settings_types import OptimConfig


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
  sampler_logprobs:                   [B, C] the sampler's own (0 off the mask), for the
                                      mismatch correction and figures (corrections.py); None
                                      for teacher data.
  cov_selected:                       [B, C] Clip-Cov's / KL-Cov's tokens (covariance.py),
                                      chosen over the whole batch; None for the other losses.
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_mask: jax.Array
  advantages: jax.Array
  old_logprobs: Optional[jax.Array] = None
  ref_logprobs: Optional[jax.Array] = None
  sampler_logprobs: Optional[jax.Array] = None
  cov_selected: Optional[jax.Array] = None


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(logits, targets, *, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[targets]: [B, T, V], [B, T] -> [B, T] float32.

  Computed as z[target] - logsumexp(z): XLA fuses the scaling into the reduction, so no
  [B, T, V] log-softmax copy is materialised.
  """
  if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
    raise ValueError(f"token_logprobs: logits {logits.shape} and targets {targets.shape} "
                     "must be [..., V] and [...]")
  z = logits.astype(jnp.float32) / temperature
  target_z = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target_z - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits, *, temperature: float = 1.0) -> jax.Array:
  """Entropy of softmax(logits / temperature) per position: [..., V] -> [...] float32 (nats)."""
  z = logits.astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  p = jnp.exp(z - lse)
  return lse[..., 0] - jnp.sum(p * z, axis=-1)


def _chunked_logprobs(params, model_config, hidden_BxCxE, targets_BxC, temperature, chunk,
                      entropy: bool = False):
  """Log-probs of targets from hidden states, `chunk` positions at a time, rematerialised;
  with `entropy`, (log-probs, the policy's token entropies) from the same logits."""
  B, C, E = hidden_BxCxE.shape
  chunk = min(chunk, C)
  n = -(-C // chunk)
  if n * chunk > C:  # pad to whole chunks (never the full [B, C, V] logits); padding dropped
    hidden_BxCxE = jnp.pad(hidden_BxCxE, ((0, 0), (0, n * chunk - C), (0, 0)))
    targets_BxC = jnp.pad(targets_BxC, ((0, 0), (0, n * chunk - C)))

  @jax.checkpoint
  def one(h_BxcxE, t_Bxc):
    logits = models.unembed(params, model_config, h_BxcxE)
    lp = token_logprobs(logits, t_Bxc, temperature=temperature)
    return (lp, token_entropy(logits, temperature=temperature)) if entropy else lp

  h = hidden_BxCxE.reshape(B, n, chunk, E).swapaxes(0, 1)
  t = targets_BxC.reshape(B, n, chunk).swapaxes(0, 1)
  out_nxBxc = jax.lax.map(lambda xs: one(*xs), (h, t))
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :C], out_nxBxc)


def sequence_logprobs(params, batch: TrainBatch, *, model_config, temperature: float = 1.0,
                      vocab_chunk: int = 32, rows=None, entropy: bool = False) -> jax.Array:
  """Teacher-forced log-probs of the completion tokens, [B, C] float32 (with `entropy`: and
  the policy's entropy at each completion position, [B, C], from the same logits).

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
                           temperature, vocab_chunk, entropy)


# ----------------------------------------------------------------------------- update


def update_params(params, frozen=None):
  """The params tree the update's forward reads: the trained params (master dtype, cast to the
  compute dtype inside the model), or LoRA's frozen base beside the adapters, unmerged. The
  old-policy pass reads this same tree with the update's model config, so that before the first
  step its log-probs are the update's and the ratio is exactly 1; a compute-dtype copy (a
  merged W + (alpha / r) A B, or norm scales rounded to bfloat16) is a different function."""
  return params if frozen is None else lora.combine(frozen, params)


def microbatch_loss_terms(params, mb: dict, *, model_config, loss_cfg: losses.LossConfig,
                          vocab_chunk: int, frozen=None, rows=None):
  """`losses.loss_terms` of one micro-batch, mb = {"batch": its rows, "weights": its slice of
  the whole batch's loss weights}: what the gradient passes differentiate."""
  batch: TrainBatch = mb["batch"]
  params = update_params(params, frozen)
  logprobs, entropy = sequence_logprobs(params, batch, model_config=model_config,
                                        temperature=loss_cfg.temperature,
                                        vocab_chunk=vocab_chunk, rows=rows, entropy=True)
  return losses.loss_terms(loss_cfg, logprobs, batch.completion_mask, batch.advantages,
                           mb["weights"], old_logprobs=batch.old_logprobs,
                           ref_logprobs=batch.ref_logprobs, entropy=entropy,
                           sampler_logprobs=batch.sampler_logprobs,
                           cov_selected=batch.cov_selected)


def loss_and_grads(params, batch: TrainBatch, *, model_config, loss_cfg: losses.LossConfig,
                   num_microbatches: int = 1, vocab_chunk: int = 32, frozen=None, rows=None):
  """(loss, metrics, grads) of the whole batch, accumulated exactly over micro-batches.
  `frozen`: params that take part in the forward pass but get no gradient (LoRA's base)."""
  weights = losses.loss_weights(batch.completion_mask, loss_type=loss_cfg.loss_type,
                                max_completion_length=loss_cfg.max_completion_length)
  terms = functools.partial(microbatch_loss_terms, model_config=model_config,
                            loss_cfg=loss_cfg, vocab_chunk=vocab_chunk, frozen=frozen, rows=rows)
  loss, sums, grads = microbatches.accumulate_gradients(
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
  micro = microbatches.split_microbatches(batch, num_microbatches)
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


def row_sharding(mesh: Mesh) -> NamedSharding:
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
                         vocab_chunk=vocab_chunk, rows=row_sharding(mesh))
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
                         rows=row_sharding(mesh))
  return jax.jit(fn, in_shardings=(params_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh, 2))
