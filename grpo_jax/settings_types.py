"""The frozen settings: the dataclasses that `settings.from_config` reads an experiment config into.

One dataclass per config section (data, model, sft, rollout, grpo, eval, reward_model, tools,
wandb) under `Settings`, and `ConfigError`, the error of every config check. The reader
(settings.py) and the checks (settings_checks.py) import them, as does a part configured
without the reader (`OptimConfig`: train_step.py's optimiser); grpo_jax.settings re-exports
every name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from grpo_jax import losses, paradigms
from grpo_jax.record_fields import FieldMap


class ConfigError(ValueError):
  """A bad experiment config or input path, reported before anything compiles."""


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


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How completions are drawn: temperature 0 = greedy; 0 / None switches a filter off."""
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  min_p: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where problems come from and how a record becomes a prompt (grpo_jax/data/records.py)."""
  task: str                 # "arithmetic" | "multistep" | "tool_arithmetic" (generated) |
                            # "records" (files or a HF dataset)
  seed: int
  num_train: int            # 0: all
  num_eval: int
  flaw_p: float             # arithmetic: the flawed teacher's error rate
  tool_p: float             # tool_arithmetic: how often the teacher uses the Python tool
  path: str                 # records: file, directory of splits, or "hf:name[:config]"
  train_split: str
  eval_split: str           # "" with a single file: the last num_eval records are held out
  fields: FieldMap
  prompt_template: str      # str.format over the record's columns: the user turn
  chat_template: str        # "" plain | "checkpoint" (its Jinja template) | qwen, gemma, llama3
  system_prompt: str
  chat_template_kwargs: tuple[tuple[str, Any], ...]  # e.g. enable_thinking=False (Qwen3)


@dataclasses.dataclass(frozen=True)
class WandbSettings:
  """Weights & Biases logging; mode "" = off, else "online" | "offline" | "disabled"."""
  project: str
  entity: str
  mode: str
  name: str


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  rank: int                  # 0: off (full fine-tuning)
  alpha: float
  targets: tuple[str, ...]   # of models.LORA_TARGETS
  dropout: float


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  preset: str
  hf_checkpoint: str
  param_dtype: str  # master weights and optimiser state
  dtype: str        # compute: forward, backward, sampling (softmax, norms, loss stay float32)
  overrides: tuple[tuple[str, Any], ...]  # ModelConfig fields over the preset's
  lora: LoraSettings
  scan_layers: bool = False  # one lax.scan over stacked layers (models.ModelConfig.scan_layers)
  remat: str = "none"        # models.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class SFTSettings:
  steps: int
  batch_size: int
  num_microbatches: int
  optim: OptimConfig


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """One rollout: P prompts x G completions, scored, turned into advantages (paradigm)."""
  paradigm: paradigms.Paradigm
  num_prompts: int
  num_samples: int
  max_prompt_length: int
  max_completion_length: int  # the sampler's budget is this + 1 (room for the EOS)
  prompt_truncation: str
  decoding: Decoding
  stop_tokens: str
  rewards: tuple[tuple[str, float], ...]  # (name, weight), weight > 0: the rule rewards on
  reward_fns: tuple[tuple[str, Any], ...]  # (name, "module:fn" | "path/file.py:fn" | callable)
  reward_timeout_s: float  # a reward call longer than this is an error (0: no limit)
  reward_errors: str       # "raise": stop the run | "zero": score the batch 0, count it
  overlong_cache_length: int
  advantage_scale: str
  mask_truncated_completions: bool
  dynamic_sampling: bool
  max_resample_rounds: int
  process_reward: str  # "verifier" | "prm": where process supervision's step rewards come from
  max_steps: int
  step_delimiter: str
  # Step boundaries and the verifier's step labels are computed: process supervision, or a
  # learned PRM (its training labels).
  step_rewards: bool = False
  batching: str = "static"  # single-turn sampler: "static" | "continuous" (slots.py)
  decode_slots: int = 0     # continuous: 0 = one per row


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  steps: int
  num_iterations: int  # mu: updates per rollout
  num_microbatches: int
  ref_reset_every: int
  ref_ema: float
  loss: losses.LossConfig
  optim: OptimConfig
  length_bucket: int = 0  # update / log-prob passes cut to the needed width, multiples of this
  max_staleness: int = 0  # k: rollouts sampled k steps ahead of their update (staleness.py)
  # in-flight weight updates: a rollout sampled ahead switches to the step's updated weights
  # after this many decode steps (0: one set of weights per rollout)
  inflight_after: int = 0


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  every: int
  num_problems: int
  batch_size: int
  k: int
  pass_k_problems: int
  decoding: Decoding
  log_samples: int


@dataclasses.dataclass(frozen=True)
class RewardModelSettings:
  enabled: bool
  kind: str  # "orm": its probability is a reward row; "prm": step rewards
  weight: float
  iteration_steps: int
  bootstrap_rollouts: int
  train_steps: int
  batch_size: int
  replay_fraction: float
  optim: OptimConfig


@dataclasses.dataclass(frozen=True)
class ToolSettings:
  """Tool-integrated (multi-turn) rollouts; env "" = single-turn sampling."""
  env: str                    # "" | "python" | "module:factory" | "path/file.py:factory"
  max_turns: int              # policy turns per episode
  max_observation_tokens: int
  slots: int                  # the episode timeline's capacity (0: 2 x the token budget)
  max_workers: int            # environment steps run concurrently
  timeout_s: float            # the Python tool's limits per call
  memory_mb: int
  stop_strings: tuple[str, ...]
  code_pattern: str
  observation_template: str
  hidden_paths: tuple[str, ...] = ()  # hidden from tool code besides home, cwd, /root, workdir
  allow_unisolated: bool = False  # run tool code even where the sandbox cannot confine it

  @property
  def enabled(self) -> bool:
    return bool(self.env)


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int
  init_from: str
  log_every: int
  max_nonfinite_streak: int
  data: DataSettings
  tokenizer_path: str
  tokenizer_vocab_size: int
  model: ModelSettings
  mesh: tuple[int, int, int]  # (data, fsdp, tensor) as configured (-1: the rest)
  decode_layout: str          # the sampler's params: "auto" | "replicated" | "training"
  sft: SFTSettings
  rollout: RolloutSettings
  grpo: GRPOSettings
  eval: EvalSettings
  reward_model: RewardModelSettings
  checkpoint_every: int
  checkpoint_keep: int
  wandb: WandbSettings
  tools: ToolSettings = None  # None only in hand-built Settings: tools off
  profile_steps: Optional[tuple[int, int]] = None  # jax.profiler trace of these GRPO steps
  rollout_devices: int = 0  # n > 0: the samplers on the first n devices, training on the rest
  distill_teacher: str = ""  # grpo.algorithm "distill": the teacher's HF checkpoint directory

  @property
  def sft_steps(self) -> int:
    """SFT warm-start steps actually run (none when GRPO starts from another run)."""
    return 0 if self.init_from else self.sft.steps

  @property
  def use_reference(self) -> bool:
    """Whether the run keeps a second copy of the params: the KL reference, which also holds
    RFT's frozen sampling policy (the warm start)."""
    return self.grpo.loss.beta != 0.0 or self.rollout.paradigm.data == "frozen_policy"
