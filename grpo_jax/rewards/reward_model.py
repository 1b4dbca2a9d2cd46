"""Learned reward models: outcome (ORM) and process (PRM) scoring heads on the decoder, their
losses, a jitted sharded training step, and a reward-function adapter.

  params = {"backbone": decoder params, "head": {"w": [E], "b": []}}
  ORM:  score_B   = head(hidden at the last real token of prompt + completion)
  PRM:  score_BxS = head(hidden at the completion token that ends step s)
  reward = sigmoid(score) (probability "correct"), or the raw logit.

A batch is an `RMBatch`: left-padded prompts [B, P] followed by right-padded completions [B, C],
the same layout as `train_step.TrainBatch`, so the GRPO trainer can score the token arrays it
already holds. Losses (all pure, jittable):

  orm_bce:      mean_i  BCE(score_i, y_i)                  y_i in {0, 1} from the verifier
  orm_pairwise: mean_i -log sigmoid(s_chosen - s_rejected) (Bradley-Terry)
  prm_bce:      sum_{i,s} m_is BCE(score_is, y_is) / sum m (mean over existing steps)

Training (`rm_update_step`) mirrors `train_step.update_step`: the per-row weights are fixed by
the whole optimizer batch, so micro-batches (`microbatches.accumulate_gradients`) give exactly the
full-batch gradient; `make_rm_update_fn` jits it over a Mesh (params by logical axes, rows over
("data", "fsdp"), state donated).

Elsewhere: where a completion's steps end (`rewards.steps`), the arithmetic task's step labels
(`data.arithmetic.step_labels`), and the replay of RM training data (`rewards.replay`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from grpo_jax import microbatches, models, sharding
from grpo_jax import train_step as ts

KINDS = ("orm", "orm_pairwise", "prm")
RMTrainState = ts.TrainState  # params = {"backbone", "head"}; same optimizer plumbing


# ----------------------------------------------------------------------------- params


def init_head(model_config) -> dict:
  """The scalar head {"w": [E], "b": []}, zero-initialised: every input starts at score 0
  (p = 0.5, BCE = log 2), and the backbone's features are not disturbed at the first step."""
  return {"w": jnp.zeros((model_config.hidden_size,), jnp.float32),
          "b": jnp.zeros((), jnp.float32)}


def init_reward_model(model_config, rng: jax.Array, backbone_params=None) -> dict:
  """Reward-model params {"backbone", "head"}; the backbone is `backbone_params` (e.g. the
  policy's or an SFT checkpoint's params; DeepSeekMath initialises its RM from the SFT model)
  when given, else random. The backbone's unembedding is kept (so a policy checkpoint loads
  unchanged) but unused: it gets zero gradients."""
  backbone = models.init_params(model_config, rng) if backbone_params is None else backbone_params
  return {"backbone": backbone, "head": init_head(model_config)}


def reward_model_logical_axes(model_config) -> dict:
  """Logical axes of the params: the decoder's, and ("embed",) / () for the head."""
  return {"backbone": models.param_logical_axes(model_config),
          "head": {"w": ("embed",), "b": ()}}


# ----------------------------------------------------------------------------- batches


@flax.struct.dataclass
class RMBatch:
  """B examples for the reward model (rows are independent).

  prompt_tokens, prompt_mask:         [B, P] left-padded prompts (mask 1 = real token).
  completion_tokens, completion_mask: [B, C] right-padded completions (mask 1 up to and
                                      including EOS).
  labels:    [B] 0/1 outcome labels (ORM), or [B, S] 0/1 step labels (PRM); None to score only.
  step_end:  [B, S] int32 completion-token index ending each step (PRM), see
             `rewards.steps.step_boundaries`.
  step_mask: [B, S] 1 where the step exists (PRM).
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_mask: jax.Array
  labels: Optional[jax.Array] = None
  step_end: Optional[jax.Array] = None
  step_mask: Optional[jax.Array] = None


@flax.struct.dataclass
class PairBatch:
  """B preference pairs for `orm_pairwise`: row i of `chosen` is preferred to row i of
  `rejected` (labels unused). Both have the same shapes, so micro-batches keep pairs together."""
  chosen: RMBatch
  rejected: RMBatch


# ----------------------------------------------------------------------------- scoring


def _hidden(params, batch, model_config) -> jax.Array:
  """Final-normed hidden states [B, P + C, E] of prompt + completion (positions as the policy's)."""
  tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], axis=1)
  # As in `train_step.sequence_logprobs`: completion padding is causally after every scored
  # position, so it may be attended as real tokens; positions then continue the prompt's.
  attn = jnp.concatenate([batch.prompt_mask, jnp.ones_like(batch.completion_mask)],
                         axis=1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0)
  hidden_BxTxE, _ = models.forward(params["backbone"], model_config, tokens, positions, attn,
                                   None, return_hidden=True)
  return hidden_BxTxE


def _head(head, hidden_BxNxE) -> jax.Array:
  return jnp.einsum("bne,e->bn", hidden_BxNxE.astype(jnp.float32), head["w"]) + head["b"]


def _gather_scores(params, batch, index_BxN, model_config) -> jax.Array:
  hidden_BxTxE = _hidden(params, batch, model_config)
  hidden_BxNxE = jnp.take_along_axis(hidden_BxTxE, index_BxN[..., None], axis=1)
  return _head(params["head"], hidden_BxNxE)


def orm_scores(params, batch, *, model_config) -> jax.Array:
  """Outcome scores (logits) [B] float32: the head at the last real token of prompt +
  completion (the last prompt token when the completion is empty).

  `batch` is anything with the four token fields (`RMBatch`, `train_step.TrainBatch`).
  """
  P = batch.prompt_tokens.shape[1]
  last_B = P - 1 + jnp.sum(batch.completion_mask, axis=1).astype(jnp.int32)
  return _gather_scores(params, batch, last_B[:, None], model_config)[:, 0]


def prm_step_scores(params, batch, step_end_BxS, step_mask_BxS, *, model_config) -> jax.Array:
  """Process scores (logits) [B, S] float32: the head at completion token step_end[b, s];
  0 where step_mask is 0."""
  P = batch.prompt_tokens.shape[1]
  index_BxS = P + jnp.clip(step_end_BxS.astype(jnp.int32), 0, batch.completion_tokens.shape[1] - 1)
  scores_BxS = _gather_scores(params, batch, index_BxS, model_config)
  return jnp.where(step_mask_BxS > 0, scores_BxS, 0.0)


# ----------------------------------------------------------------------------- losses


def _bce_BxN(logits, labels) -> jax.Array:
  """Binary cross-entropy with logits, elementwise: softplus(z) - y z (stable)."""
  return jax.nn.softplus(logits) - labels.astype(jnp.float32) * logits


def orm_bce(logits_B, labels_B) -> jax.Array:
  """Mean binary cross-entropy of outcome logits [B] against 0/1 labels [B]. Scalar."""
  return jnp.mean(_bce_BxN(logits_B, labels_B))


def orm_pairwise(chosen_B, rejected_B) -> jax.Array:
  """Bradley-Terry loss, mean_i -log sigmoid(chosen_i - rejected_i). Scalar."""
  return jnp.mean(jax.nn.softplus(rejected_B - chosen_B))


def prm_bce(logits_BxS, labels_BxS, mask_BxS) -> jax.Array:
  """Binary cross-entropy averaged over existing steps (mask 1). Scalar; 0 with no steps."""
  m = mask_BxS.astype(jnp.float32)
  return jnp.sum(_bce_BxN(logits_BxS, labels_BxS) * m) / jnp.maximum(jnp.sum(m), 1.0)


def _loss_weights(batch, kind: str) -> jax.Array:
  """Per-row (ORM, [B]) or per-step (PRM, [B, S]) weights of the *whole* optimizer batch, so
  that the loss is a weighted sum and micro-batches add up exactly."""
  if kind == "prm":
    m = batch.step_mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)
  rows = batch.chosen if kind == "orm_pairwise" else batch
  B = rows.prompt_tokens.shape[0]
  return jnp.full((B,), 1.0 / B, jnp.float32)


def _rm_loss_terms(params, mb: dict, *, model_config, kind: str):
  """(weighted loss sum, metric sums) of one micro-batch; additive over rows."""
  batch, w = mb["batch"], mb["weights"]
  if kind == "orm":
    z, y = orm_scores(params, batch, model_config=model_config), batch.labels
    per, correct = _bce_BxN(z, y), ((z > 0) == (y > 0.5))
  elif kind == "orm_pairwise":
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), batch.chosen, batch.rejected)
    z = orm_scores(params, both, model_config=model_config)
    zc, zr = jnp.split(z, 2)
    per, correct = jax.nn.softplus(zr - zc), zc > zr
  else:
    z = prm_step_scores(params, batch, batch.step_end, batch.step_mask, model_config=model_config)
    per, correct = _bce_BxN(z, batch.labels), ((z > 0) == (batch.labels > 0.5))
  loss = jnp.sum(per * w)
  return loss, {"rm_accuracy": jnp.sum(correct.astype(jnp.float32) * w)}


def _check_kind(kind: str, batch) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown reward-model kind {kind!r}; expected one of {KINDS}")
  if kind == "orm_pairwise":
    if not isinstance(batch, PairBatch):
      raise ValueError("kind 'orm_pairwise' needs a PairBatch(chosen, rejected)")
    return
  if batch.labels is None:
    raise ValueError(f"kind {kind!r} needs batch.labels")
  if kind == "orm" and batch.labels.ndim != 1:
    raise ValueError(f"ORM labels must be [B], got shape {batch.labels.shape}")
  if kind == "prm":
    if batch.step_end is None or batch.step_mask is None:
      raise ValueError("kind 'prm' needs batch.step_end and batch.step_mask")
    if not batch.labels.shape == batch.step_end.shape == batch.step_mask.shape:
      raise ValueError(f"PRM labels {batch.labels.shape}, step_end {batch.step_end.shape} and "
                       f"step_mask {batch.step_mask.shape} must all be [B, S]")


def rm_loss_and_grads(params, batch, *, model_config, kind: str = "orm",
                      num_microbatches: int = 1):
  """(loss, metrics, grads) of the whole batch, accumulated exactly over micro-batches.
  Metrics: loss, rm_accuracy (weighted like the loss), grad_norm."""
  _check_kind(kind, batch)
  terms = functools.partial(_rm_loss_terms, model_config=model_config, kind=kind)
  loss, sums, grads = microbatches.accumulate_gradients(
      terms, params, {"batch": batch, "weights": _loss_weights(batch, kind)}, num_microbatches)
  metrics = dict(sums, loss=loss, grad_norm=optax.tree.norm(grads))
  return loss, metrics, grads


def rm_update_step(state: RMTrainState, batch, *, model_config, optimizer, kind: str = "orm",
                   num_microbatches: int = 1) -> tuple[RMTrainState, dict]:
  """One optimizer step of the reward model (pure). A non-finite loss or gradient skips the
  update (state unchanged, `skipped` = 1), as in `train_step.update_step`."""
  loss, metrics, grads = rm_loss_and_grads(state.params, batch, model_config=model_config,
                                           kind=kind, num_microbatches=num_microbatches)
  return ts.apply_gradients(state, loss, grads, metrics, optimizer)


# ----------------------------------------------------------------------------- jit over a mesh


def rm_state_shardings(mesh: Mesh, model_config, optimizer, params_shapes,
                       rules=sharding.DEFAULT_RULES) -> RMTrainState:
  """NamedShardings of an RMTrainState from `reward_model_logical_axes` and the rules."""
  param_sh = sharding.tree_shardings(mesh, reward_model_logical_axes(model_config), params_shapes,
                                     rules)
  opt_sh = sharding.optimizer_shardings(mesh, optimizer, params_shapes, param_sh)
  return RMTrainState(params=param_sh, opt_state=opt_sh, step=sharding.replicated(mesh))


def init_sharded_rm_state(mesh: Mesh, model_config, optimizer, rng, *, backbone_params=None,
                          rules=sharding.DEFAULT_RULES):
  """A fresh RMTrainState created in its shards, and its shardings. With `backbone_params`
  (already placed, e.g. the policy's), the backbone is copied from them."""
  init = lambda r, bb: ts.init_train_state(init_reward_model(model_config, r, bb), optimizer)
  params_shapes = jax.eval_shape(lambda r, bb: init_reward_model(model_config, r, bb), rng,
                                 backbone_params)
  state_sh = rm_state_shardings(mesh, model_config, optimizer, params_shapes, rules)
  return jax.jit(init, out_shardings=state_sh)(rng, backbone_params), state_sh


def make_rm_update_fn(mesh: Mesh, state_sh: RMTrainState, *, model_config, optimizer,
                      kind: str = "orm", num_microbatches: int = 1):
  """`rm_update_step` jitted over `mesh`: state in/out with `state_sh`, batch rows over the data
  axes (for a PairBatch, the pairs), metrics replicated, the input state donated."""
  fn = functools.partial(rm_update_step, model_config=model_config, optimizer=optimizer,
                         kind=kind, num_microbatches=num_microbatches)
  return jax.jit(fn, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def _microbatched(fn, batch, num_microbatches: int):
  """fn over strided micro-batches of rows with `lax.map`, rows returned in original order."""
  if num_microbatches == 1:
    return fn(batch)
  out_Mxb = jax.lax.map(fn, microbatches.split_microbatches(batch, num_microbatches))
  return out_Mxb.swapaxes(0, 1).reshape(-1, *out_Mxb.shape[2:])


def rm_rewards(params, batch, *, model_config, kind: str = "orm", transform: str = "sigmoid",
               num_microbatches: int = 1) -> jax.Array:
  """Rewards of a scoring batch: ORM [B] or PRM [B, S] (`batch.step_end` / `step_mask` set),
  as sigmoid(score) in (0, 1) or the raw logit (`transform="logit"`); PRM rewards are 0 where
  there is no step. Micro-batched over rows to bound memory."""
  if transform not in ("sigmoid", "logit"):
    raise ValueError(f"transform must be 'sigmoid' or 'logit', got {transform!r}")
  if kind not in ("orm", "prm"):
    raise ValueError(f"rm_rewards: kind must be 'orm' or 'prm' (a pairwise-trained ORM scores "
                     f"as 'orm'), got {kind!r}")
  post = jax.nn.sigmoid if transform == "sigmoid" else (lambda z: z)

  def one(b):
    if kind == "orm":
      return post(orm_scores(params, b, model_config=model_config))
    z = prm_step_scores(params, b, b.step_end, b.step_mask, model_config=model_config)
    return jnp.where(b.step_mask > 0, post(z), 0.0)
  fields = dict(prompt_tokens=batch.prompt_tokens, prompt_mask=batch.prompt_mask,
                completion_tokens=batch.completion_tokens, completion_mask=batch.completion_mask)
  if kind == "prm":
    fields.update(step_end=batch.step_end, step_mask=batch.step_mask)
  return _microbatched(one, RMBatch(**fields), num_microbatches)


def make_rm_scorer(mesh: Mesh, params_sh, *, model_config, kind: str = "orm",
                   transform: str = "sigmoid", num_microbatches: int = 1):
  """`rm_rewards` jitted over `mesh`: scorer(params, batch) -> [B] (ORM) or [B, S] (PRM),
  rows over the data axes. `batch` is an `RMBatch` (labels ignored; PRM needs step_end and
  step_mask) — build one from a `TrainBatch`'s token arrays with `rm_batch_from(...)`."""
  fn = functools.partial(rm_rewards, model_config=model_config, kind=kind, transform=transform,
                         num_microbatches=num_microbatches)
  return jax.jit(fn, in_shardings=(params_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh, 1 if kind == "orm" else 2))


def rm_batch_from(batch, step_end=None, step_mask=None) -> RMBatch:
  """An `RMBatch` with the token arrays of `batch` (e.g. a `train_step.TrainBatch`)."""
  return RMBatch(batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                 batch.completion_mask, step_end=step_end, step_mask=step_mask)


# ----------------------------------------------------------------------------- reward function


def encode_for_rm(tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                  max_prompt_length: int, max_completion_length: int) -> RMBatch:
  """Host-side NumPy RMBatch: left-padded prompts (bos as `encode_batch` adds it) and
  right-padded completions ending in EOS, truncated to `max_completion_length` (the policy's
  sampler layout)."""
  prompt_ids, prompt_mask = tokenizer.encode_batch(list(prompts), max_length=max_prompt_length)
  C = max_completion_length
  comp = np.full((len(completions), C), tokenizer.pad_id, np.int32)
  cmask = np.zeros((len(completions), C), np.int32)
  for n, text in enumerate(completions):
    ids = (tokenizer.encode(text) + [tokenizer.eos_id])[:C]
    comp[n, :len(ids)] = ids
    cmask[n, :len(ids)] = 1
  return RMBatch(prompt_ids.astype(np.int32), prompt_mask.astype(np.int32), comp, cmask)


def _pad_rows(batch: RMBatch, rows: int) -> RMBatch:
  def pad(x):
    if x is None or x.shape[0] == rows:
      return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
  return jax.tree.map(pad, batch)


def orm_reward_fn(scorer, params, tokenizer, *, prompt_column: str = "prompt",
                  batch_size: int, max_prompt_length: int, max_completion_length: int,
                  ) -> Callable[..., list[float]]:
  """A rule-style reward function `fn(completions, **columns) -> list[float]` from an ORM.

  `scorer` is `make_rm_scorer(..., kind="orm")` (or any jitted `(params, RMBatch) -> [B]`);
  `columns[prompt_column]` holds each completion's prompt text (as the policy saw it). Text is
  re-encoded and scored in fixed-size batches of `batch_size` rows (the last one zero-padded),
  so the scorer compiles once. Rebuild the fn when the RM params change (cheap: no recompile).

  Preferred in the trainer: call `scorer(params, rm_batch_from(train_batch))` on the token
  arrays the sampler produced, which avoids the decode -> re-encode round trip and any
  tokenisation mismatch; this adapter is for mixing with rule rewards through `rewards.score`.
  """
  def fn(completions: Sequence[str], **columns) -> list[float]:
    if prompt_column not in columns:
      raise ValueError(f"orm_reward_fn needs the prompt text in column {prompt_column!r}; "
                       f"got columns {sorted(columns)}")
    prompts = columns[prompt_column]
    out = []
    for lo in range(0, len(completions), batch_size):
      batch = encode_for_rm(tokenizer, prompts[lo:lo + batch_size],
                            completions[lo:lo + batch_size], max_prompt_length=max_prompt_length,
                            max_completion_length=max_completion_length)
      n = batch.prompt_tokens.shape[0]
      out.extend(np.asarray(scorer(params, _pad_rows(batch, batch_size)))[:n].tolist())
    return [float(x) for x in out]
  return fn
