"""The sampler protocol: prompts in, G completions (or tool-using episodes) each out, on the host.

    drawn = sampler(params, ids_PxL, mask_PxL, key, records_P)   # -> Drawn, B = P * G rows

Two implementations, so the loop and evaluation never ask which one they hold:
  SingleTurn  the jitted decode loop (`sampling.make_sampler`): one completion per row;
  MultiTurn   tool-integrated episodes (`multiturn.rollout`): decode until a stop string, step
              the environment, inject its observation into the same KV cache, continue.
`params` are the policy in the compute dtype and the sampler's layout (`weights.decode_params`),
or a `Swap` for in-flight weight updates: the first weights for the first decode steps, then
the update's (`slots.make_inflight`; each token's weights tagged in `Drawn.versions_BxC`).
A single-turn batch leaves `texts` to the caller (`texts_of`), which decodes them after it has
queued device work on the tokens; an episode brings the policy's text it was stopped on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from grpo_jax import multiturn, sharding, turn_programs


@dataclasses.dataclass(frozen=True)
class Drawn:
  """B = P * G rows, prompt-major (row p * G + g), NumPy on the host."""
  tokens_BxC: np.ndarray     # int32: the policy's tokens (episodes: and observation tokens)
  mask_BxC: np.ndarray       # int32 1 on the policy's tokens through the EOS: the loss mask
  truncated_B: np.ndarray    # bool: no EOS within the budget (episodes: a budget ran out)
  lengths_B: np.ndarray      # int32 the policy's tokens before the EOS (completion_length)
  logprobs_BxC: Optional[np.ndarray] = None  # float32 the sampler's log-probs, 0 off the mask
  texts: Optional[tuple[str, ...]] = None  # the policy's text; None: `texts_of` decodes it
  episodes: Optional[multiturn.Episodes] = None  # tools: the whole episodes
  # in-flight updates: 1 where the update's weights drew the token, 0 the first's (and off
  # the mask); None: one set of weights drew the batch
  versions_BxC: Optional[np.ndarray] = None

  def whole_texts(self, texts: Sequence[str]) -> tuple[str, ...]:
    """What the model read and wrote: the episodes (tool output included), else `texts`."""
    return tuple(self.episodes.texts) if self.episodes is not None else tuple(texts)


class Sampler(Protocol):
  """G samples for each of P prompts (`num_samples` = G), keyed by `key` alone."""
  mesh: Mesh
  num_samples: int

  def __call__(self, params, ids_PxL: np.ndarray, mask_PxL: np.ndarray, key: jax.Array,
               records: Sequence[dict]) -> Drawn: ...

  def compiles(self) -> int:
    """Programs compiled so far (a fixed batch shape compiles once)."""


def texts_of(drawn: Drawn, tokenizer) -> tuple[str, ...]:
  """The policy's text of every row: the episode's, else the tokens decoded up to the EOS."""
  if drawn.texts is not None:
    return drawn.texts
  return tuple(tokenizer.decode_batch(drawn.tokens_BxC, drawn.mask_BxC))


def completion_lengths(mask_BxC, truncated_B) -> np.ndarray:
  """Tokens of each single-turn completion before its EOS: the mask counts the EOS of every
  completion that was not truncated. (An episode can end without an EOS and not truncated, by
  its environment: `multiturn.Episodes` counts its own lengths.)"""
  return np.asarray(mask_BxC).sum(1) - (~np.asarray(truncated_B, bool))


@dataclasses.dataclass(frozen=True)
class Swap:
  """In-flight weight update: `first` draws the first decode steps; `then()`, called once they
  are queued, gives the weights the rest draws with (in the sampler's layout)."""
  first: Any
  then: Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class SingleTurn:
  """`sampling.make_sampler`'s program: (params, ids, mask, key) -> SampleOutput; with
  `inflight`, `slots.make_inflight`'s two halves for `Swap` weights."""
  program: Any
  mesh: Mesh
  num_samples: int
  inflight: Any = None  # slots.InFlight

  def __call__(self, params, ids_PxL, mask_PxL, key, records=()) -> Drawn:
    del records  # one completion per row: nothing to reset
    ids, mask = sharding.shard_batch((ids_PxL, mask_PxL), self.mesh)
    if isinstance(params, Swap):
      paused = self.inflight.first(params.first, ids, mask, key)
      out = self.inflight.rest(params.then(), paused, key)
    else:
      out = self.program(params, ids, mask, key)
    tokens, mask = to_host(out.tokens), to_host(out.mask)
    truncated = to_host(out.truncated).astype(bool)
    return Drawn(tokens, mask, truncated, completion_lengths(mask, truncated),
                 to_host(out.logprobs),
                 versions_BxC=None if out.versions is None else to_host(out.versions))

  def compiles(self) -> int:
    return self.program._cache_size()  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class MultiTurn:
  """`turn_programs.make_programs`' start / decode / inject programs with the run's environment."""
  programs: turn_programs.Programs
  mesh: Mesh
  num_samples: int
  env: Any
  tokenizer: Any
  max_workers: int

  def __call__(self, params, ids_PxL, mask_PxL, key, records) -> Drawn:
    ep = multiturn.rollout(self.programs, params,
                           *sharding.shard_batch((ids_PxL, mask_PxL), self.mesh), key, self.env,
                           records, self.tokenizer, max_workers=self.max_workers,
                           to_host=to_host)
    # Rewards score the policy's text; the episode (tool output included) is their
    # `episodes` argument.
    return Drawn(ep.tokens_BxC, ep.policy_mask_BxC, ep.truncated_B, ep.policy_lengths_B,
                 ep.logprobs_BxC, tuple(ep.policy_texts), ep)

  def compiles(self) -> int:
    return self.programs.decode._cache_size()  # pylint: disable=protected-access


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as a NumPy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
