"""The policy's weights as each reader needs them: one cast, merge or reshard per use.

    weights.policy_params(device, state, base)   compute dtype, LoRA merged: sampling, evaluation
    weights.decode_params(device, params)        ... and in the sampler's layout
    weights.update_params(state, base)           what the update's forward reads: the old pass
    weights.reference_copy(device, params, ema)  a reference policy that survives donation

`model.param_dtype` is the trained weights' dtype, `model.dtype` the compute dtype; the reference
is kept in the compute dtype (an EMA reference in the master dtype: it accumulates small steps).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from grpo_jax import train_step as ts

if TYPE_CHECKING:
  from grpo_jax.experiment import Device


def cast(params, dtype):
  """Every leaf of `params` as `dtype` (traced inside a program, or by `_cast`)."""
  return jax.tree.map(lambda x: x.astype(dtype), params)


@functools.partial(jax.jit, static_argnums=1)
def _cast(params, dtype):
  """One program for the whole tree; elementwise, so every shard stays on its device."""
  return cast(params, dtype)


def compute_params(device: Device, params):
  """`params` in the compute dtype (`model.dtype`): one cast per rollout, evaluation or log-prob
  pass, so the decode loop never casts master weights per token. `params` itself when every
  leaf has that dtype already (float32 compute, or the reference, stored in compute dtype)."""
  dtype = jnp.dtype(device.model_config.dtype)
  if all(x.dtype == dtype for x in jax.tree.leaves(params)):
    return params
  return _cast(params, dtype)


def policy_params(device: Device, state: ts.TrainState, base=None):
  """The policy as one plain params tree in the compute dtype, for sampling and evaluation:
  LoRA's adapters merged into the base once, or the master weights cast. Not for the
  old-policy pass, which reads the update's own tree (`update_params`)."""
  if device.lora:
    return device.programs.merge(base, state.params)
  return compute_params(device, state.params)


def decode_params(device: Device, params):
  """`params` in the compute dtype and the sampler's layout (`device.decode_sh`): one jitted
  cast and reshard per rollout or evaluation (an all-gather over "fsdp" when the layouts
  differ), so the decode loop gathers no weights. `compute_params` when the layouts agree."""
  params = compute_params(device, params)
  if all(x.sharding.is_equivalent_to(sh, x.ndim) for x, sh in zip(
      jax.tree.leaves(params), jax.tree.leaves(device.decode_sh))):
    return params
  return device.programs.to_decode(params)


def update_params(state: ts.TrainState, frozen=None):
  """The policy as the update's forward reads it (`ts.update_params`): the master weights, or
  LoRA's base beside the adapters. The old-policy pass takes this, not the sampler's
  compute-dtype (merged) copy: the ratio's two log-probs must come from one function of the
  same weights, and a merged bfloat16 copy's log-probs differ from the update's by up to ~1e-2."""
  return ts.update_params(state.params, frozen)


def reference_copy(device: Device, params, ema: bool = False):
  """A reference policy (or LoRA's frozen base) from `params`: a copy in the compute dtype (it
  is never trained), except for an EMA reference (`ema`, grpo.ref_ema), which accumulates
  small steps in the master dtype. A copy: it survives the donation of `params`."""
  copied = params if ema else compute_params(device, params)
  return jax.tree.map(jnp.copy, params) if copied is params else copied


def abstract_reference(device: Device, abstract_params, ema: bool = False):
  """Restore target of the reference params (see `reference_copy`)."""
  if ema:
    return abstract_params
  dtype = jnp.dtype(device.model_config.dtype)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding),
                      abstract_params)
