"""Exact gradient accumulation over micro-batches (with `lax.scan`).

`losses` writes every loss as a weighted token sum whose weights come from the whole optimizer
batch (`losses.loss_weights`), so the sum of the micro-batches' losses, metric sums and
gradients is the full batch's, up to summation order:

    loss, sums, grads = accumulate_gradients(loss_terms_fn, params, batch, num_microbatches)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from grpo_jax import losses


def split_microbatches(tree: Any, num_microbatches: int) -> Any:
  """Reshape every leaf [B, ...] -> [M, B / M, ...]; micro-batch m holds rows m, m + M, ...

  Strided rather than contiguous, so that a batch sharded over the data axes stays evenly
  sharded inside every micro-batch (no device idles, no resharding).
  """
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"split_microbatches: batch size {x.shape[0]} is not divisible by "
                       f"num_microbatches = {num_microbatches}")
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  return jax.tree.map(split, tree)


def accumulate_gradients(loss_terms_fn: Callable[[Any, Any], tuple[jax.Array, dict]], params,
                         batch, num_microbatches: int = 1):
  """Sum of (loss, metric sums, grads) of `loss_terms_fn` over micro-batches, with `lax.scan`.

  `loss_terms_fn(params, microbatch) -> (loss, sums)` must be additive over rows: build it from
  `grpo_loss_terms` with LossWeights computed on the *full* batch and carried inside `batch`
  (then slicing the batch slices the weights). The result equals the full-batch gradient up to
  floating-point summation order. Returns (loss, sums, grads); call `finalize_metrics(sums)`.
  """
  grad_fn = jax.value_and_grad(loss_terms_fn, has_aux=True)
  if num_microbatches == 1:
    (loss, sums), grads = grad_fn(params, batch)
    return loss, sums, grads
  micro = split_microbatches(batch, num_microbatches)

  def body(carry, mb):
    return add_terms(carry, _flat(grad_fn(params, mb))), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: _flat(grad_fn(params, first)))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (loss, sums, grads), _ = jax.lax.scan(body, zeros, micro)
  return loss, sums, grads


def add_terms(a, b):
  """Two (loss, sums, grads) triples as one: sums combined by `losses.combine_sums` (maxima
  stay maxima), the rest added."""
  (loss_a, sums_a, grads_a), (loss_b, sums_b, grads_b) = a, b
  return (loss_a + loss_b, losses.combine_sums(sums_a, sums_b),
          jax.tree.map(jnp.add, grads_a, grads_b))


def _flat(out):
  (loss, sums), grads = out
  return loss, sums, grads
