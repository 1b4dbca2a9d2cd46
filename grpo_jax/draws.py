"""The token draw of the samplers: logit filters (top-k, top-p, min-p), an exact inverse-CDF
draw over the vocabulary, and the keys of each sample's draws.

    u_Bx2 = row_uniforms(sample_keys(rng, sample_ids_B, position))  # token t of sample i
    tokens_B, logprobs_B = sample_tokens(logits_BxV, u_Bx2, settings)

Log-probs are those of the unfiltered tempered distribution (see sampling.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if TYPE_CHECKING:
  from grpo_jax.sampling import SamplingSettings


def filter_logits(z_BxV: jax.Array, settings: SamplingSettings) -> jax.Array:
  """Tempered logits with tokens outside top-k / top-p / min-p set to -inf (kept ties stay).

  top-p keeps the smallest set of most likely tokens whose mass reaches top_p, the boundary
  token included (transformers' TopPLogitsWarper); min-p keeps p >= min_p * max p.
  """
  neg_inf = jnp.asarray(-jnp.inf, z_BxV.dtype)
  if settings.top_k is not None and settings.top_k < z_BxV.shape[-1]:
    kth_Bx1 = lax.top_k(z_BxV, settings.top_k)[0][:, -1:]
    z_BxV = jnp.where(z_BxV < kth_Bx1, neg_inf, z_BxV)
  if settings.top_p is not None and settings.top_p < 1:
    z_BxV = jnp.where(z_BxV < top_p_threshold(z_BxV, settings.top_p), neg_inf, z_BxV)
  if settings.min_p:
    thr_Bx1 = jnp.max(z_BxV, axis=-1, keepdims=True) + np.log(settings.min_p)
    z_BxV = jnp.where(z_BxV < thr_Bx1, neg_inf, z_BxV)
  return z_BxV


TOP_P_CANDIDATES = 1024  # tokens sorted per row for top-p before falling back to the vocabulary


def top_p_threshold(z_BxV: jax.Array, top_p: float,
                    candidates: Optional[int] = None) -> jax.Array:
  """The smallest logit top-p keeps, [B, 1]: that of the token whose mass, with the mass of
  every more likely token, first reaches `top_p`. From the `candidates` most likely tokens
  (`lax.top_k`, with the probabilities normalised over the whole vocabulary) when, in every row,
  they hold that mass (a trained model's distribution, nearly always); else from the whole
  vocabulary sorted. A full sort of a 150k vocabulary at every decode step cost more than the
  rest of the step on CPU (BENCHMARKS.md, "Rollout")."""
  candidates = candidates or TOP_P_CANDIDATES
  if candidates >= z_BxV.shape[-1]:
    return _top_p_threshold_sorted(z_BxV, top_p)
  top_BxK = lax.top_k(z_BxV, candidates)[0]
  p_BxK = jnp.exp(top_BxK - jax.nn.logsumexp(z_BxV, axis=-1, keepdims=True))
  mass_BxK = jnp.cumsum(p_BxK, axis=-1)
  n_keep_B = jnp.sum(mass_BxK - p_BxK < top_p, axis=-1)
  thr_Bx1 = jnp.take_along_axis(top_BxK, jnp.maximum(n_keep_B - 1, 0)[:, None], axis=-1)
  return lax.cond(jnp.all(mass_BxK[:, -1] >= top_p), lambda: thr_Bx1,
                  lambda: _top_p_threshold_sorted(z_BxV, top_p))


def _top_p_threshold_sorted(z_BxV: jax.Array, top_p: float) -> jax.Array:
  sorted_BxV = -jnp.sort(-z_BxV, axis=-1)
  p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV
  n_keep_B = jnp.sum(mass_before_BxV < top_p, axis=-1)
  return jnp.take_along_axis(sorted_BxV, jnp.maximum(n_keep_B - 1, 0)[:, None], axis=-1)


def _upper_ones(n: int) -> np.ndarray:
  """[n, n] with ones on and above the diagonal: x @ U is the inclusive cumsum of x's rows."""
  return np.triu(np.ones((n, n), np.float32))


def _pick(weights_BxC: jax.Array, u_B: jax.Array) -> jax.Array:
  """Index i with probability weights[i] / sum(weights) for u ~ U[0, 1): inverse CDF.

  i = #{j : cum_j <= u * total}; zero-weight entries are never picked (the clamp to the last
  non-zero entry only matters when rounding puts u * total on the total).
  """
  C = weights_BxC.shape[-1]
  cum_BxC = jnp.matmul(weights_BxC, _upper_ones(C), precision=lax.Precision.HIGHEST)
  target_Bx1 = u_B[:, None] * cum_BxC[:, -1:]
  count_B = jnp.sum((cum_BxC <= target_Bx1).astype(jnp.int32), axis=-1)
  last_nonzero_B = jnp.max(jnp.where(weights_BxC > 0, jnp.arange(C), 0), axis=-1)
  return jnp.minimum(count_B, last_nonzero_B)


def _block_shape(vocab: int) -> tuple[int, int]:
  """(blocks, block width) of the two-level draw, blocks * width >= vocab, both ~sqrt(vocab)."""
  width = max(8, int(np.ceil(np.sqrt(vocab) / 8)) * 8)
  return -(-vocab // width), width


def inverse_cdf_sample(weights_BxV: jax.Array, u_Bx2: jax.Array) -> jax.Array:
  """Exact draw of token i with probability weights[i] / sum (non-negative weights), [B] int32.

  Two levels: a block by the block sums (uniform u[:, 0]), then a token inside it (u[:, 1]).
  """
  B, V = weights_BxV.shape
  nb, width = _block_shape(V)
  if nb * width != V:
    weights_BxV = jnp.pad(weights_BxV, ((0, 0), (0, nb * width - V)))
  w_BxNxW = weights_BxV.reshape(B, nb, width)
  block_B = _pick(jnp.sum(w_BxNxW, axis=-1), u_Bx2[:, 0])
  row_BxW = jnp.take_along_axis(w_BxNxW, block_B[:, None, None], axis=1)[:, 0]
  return (block_B * width + _pick(row_BxW, u_Bx2[:, 1])).astype(jnp.int32)


def sample_keys(rng: jax.Array, sample_ids_B: jax.Array, position) -> jax.Array:
  """The keys of token `position` (a scalar or [B]) of samples `sample_ids_B`:
  fold_in(fold_in(rng, id), position), one per row."""
  position_B = jnp.broadcast_to(jnp.asarray(position, jnp.int32), sample_ids_B.shape)
  return jax.vmap(lambda i, t: jax.random.fold_in(jax.random.fold_in(rng, i), t))(
      sample_ids_B, position_B)


def row_uniforms(keys_B: jax.Array) -> jax.Array:
  """Two uniforms in [0, 1) per row, from the row's own key: [B, 2] float32."""
  return jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys_B)


def sample_tokens(logits_BxV: jax.Array, u_Bx2: jax.Array, settings: SamplingSettings):
  """One token per row (drawn with the row's uniforms `u_Bx2`, [B, 2] in [0, 1)) and its
  log-prob under the unfiltered tempered distribution.

  Returns (tokens_B int32, logprobs_B float32). Greedy (temperature 0): argmax, log-prob at T=1.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if settings.greedy:
    tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    z_BxV = logits_BxV
  else:
    z_BxV = logits_BxV / settings.temperature
    drawn_BxV = filter_logits(z_BxV, settings) if settings.filtered else z_BxV
    max_Bx1 = jnp.max(drawn_BxV, axis=-1, keepdims=True)
    weights_BxV = jnp.exp(drawn_BxV - max_Bx1)
    tokens_B = inverse_cdf_sample(weights_BxV, u_Bx2)
    if not settings.filtered:  # reuse the exponentials: one pass over the logits, not two
      z_tok_B = jnp.take_along_axis(z_BxV, tokens_B[:, None], axis=-1)[:, 0]
      lse_B = max_Bx1[:, 0] + jnp.log(jnp.sum(weights_BxV, axis=-1))
      return tokens_B, z_tok_B - lse_B
  z_tok_B = jnp.take_along_axis(z_BxV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, z_tok_B - jax.nn.logsumexp(z_BxV, axis=-1)
