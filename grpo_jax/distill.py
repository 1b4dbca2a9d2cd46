"""On-policy distillation: the student samples, a teacher scores every token it drew.

The per-token signal is the reverse KL of the student's sampling policy pi_S from the teacher
pi_T, estimated on the student's own tokens (Agarwal et al. 2024, GKD; Thinking Machines 2025,
"On-policy distillation"):

    A_{i,t} = log pi_T(o_{i,t}) - log pi_S(o_{i,t})      (0 off the loss mask)

and the GRPO loss (clipped ratio, per-token advantages, as process supervision uses them)
climbs it: the student raises the tokens the teacher likes more than it does. pi_S is the
sampler's own log-probs (the rollout carries them); both at the sampling temperature.

The teacher is a Hugging Face checkpoint directory (`distill.teacher`: any supported family,
larger than the student if you like, or a grpo_jax run exported with `tools/export_hf.py`),
held in the compute dtype on the training mesh, never trained and not checkpointed (a resume
reads it again). It must read the student's tokens: its vocabulary covers the tokenizer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from grpo_jax import models, paths, sharding
from grpo_jax import train_step as ts
from grpo_jax.models.hf_config import config_from_hf
from grpo_jax.settings import ConfigError, Settings


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The teacher's weights on the training mesh and its jitted log-prob pass."""
  path: str
  config: models.ModelConfig
  params: Any
  logprobs: Callable  # (params, TrainBatch on the mesh) -> [B, C]

  def __call__(self, batch_on_mesh) -> np.ndarray:
    return np.asarray(jax.device_get(self.logprobs(self.params, batch_on_mesh)), np.float32)


def load(s: Settings, mesh, vocab_size: int) -> Teacher:
  """`distill.teacher` read onto `mesh` in the run's compute dtype, with its log-prob pass;
  a ConfigError naming the field for a missing directory, an unreadable or unsupported
  checkpoint, or a vocabulary that does not cover the tokenizer's `vocab_size`, before
  anything compiles."""
  path = s.distill_teacher
  if not paths.as_path(path).exists():
    raise ConfigError(f"config.distill.teacher: {path} does not exist (a Hugging Face "
                      "checkpoint directory; export a run with tools/export_hf.py)")
  local = paths.local_dir(path)
  try:  # config.json first: a teacher that cannot score the student's tokens reads no weights
    with open(os.path.join(local, "config.json")) as f:
      config = config_from_hf(json.load(f))
    if config.vocab_size < vocab_size:
      raise ValueError(f"{path} has vocab_size {config.vocab_size}, fewer than the student's "
                       f"tokenizer ({vocab_size}): it cannot score the student's tokens")
    shardings = lambda axes, shape: jax.sharding.NamedSharding(  # noqa: E731
        mesh, sharding.logical_to_spec(axes, shape, mesh))
    config, params = models.load_hf_checkpoint(local, dtype=s.model.dtype, sharding=shardings)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f"config.distill.teacher: {e}") from None
  params_sh = jax.tree.map(lambda x: x.sharding, params)
  program = ts.make_logprob_fn(mesh, params_sh, model_config=config,
                               temperature=s.grpo.loss.temperature,
                               num_microbatches=s.grpo.num_microbatches)
  return Teacher(path, config, params, program)


def advantages(teacher_logprobs_NxC, sampler_logprobs_NxC, mask_NxC) -> np.ndarray:
  """A = log pi_T - log pi_S on the loss mask, 0 elsewhere: [N, C] float32 (module doc)."""
  mask = np.asarray(mask_NxC) > 0
  diff = np.asarray(teacher_logprobs_NxC, np.float32) - np.asarray(sampler_logprobs_NxC,
                                                                     np.float32)
  return np.where(mask, diff, 0.0).astype(np.float32)


def figures(adv_NxC, mask_NxC) -> dict:
  """The token-mean reverse KL estimate E_S[log pi_S - log pi_T]: what distillation lowers."""
  mask = np.asarray(mask_NxC) > 0
  return {"distill/reverse_kl": float(-np.asarray(adv_NxC)[mask].mean()) if mask.any()
          else 0.0}
