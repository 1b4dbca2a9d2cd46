"""Every check of the frozen settings: `check` raises a ConfigError naming the config field of
the first size or combination that cannot work; `precision_warnings` lists configs that would
silently lose their updates. `settings.from_config` runs both.
"""

from __future__ import annotations

import collections
import re

import jax

from grpo_jax.settings_types import ConfigError, RolloutSettings, Settings

# models.REMAT_POLICIES, spelled here: settings import no model code (tests check both agree).
REMAT_POLICIES = ("none", "layer", "matmuls")

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("qkv", "o", "gate_up", "down")  # models.LORA_TARGETS (no model import here)


def check(s: Settings, dp: int) -> None:
  """Sizes and combinations that cannot work, each naming its field."""
  _check_sizes(s, dp)
  _check_run(s)
  _check_lora(s)
  _check_data(s)
  if s.decode_layout not in ("auto", "replicated", "training"):
    raise ConfigError(f"config.mesh.decode_layout = {s.decode_layout!r}: 'auto', 'replicated' "
                      "(weights whole on every data / fsdp member while sampling) or 'training' "
                      "(sample with the update's fsdp-split weights)")
  _check_rewards(s.rollout)
  _check_tools(s, dp)
  if s.wandb.mode not in ("", "online", "offline", "disabled"):
    raise ConfigError(f"config.wandb.mode = {s.wandb.mode!r}: '' (off), online, offline or "
                      "disabled")
  _check_reward_model(s, dp)
  _check_staleness(s)
  _check_inflight(s)
  _check_rollout_devices(s)
  if (s.rollout.paradigm.coefficient == "teacher") != bool(s.distill_teacher):
    raise ConfigError("config.distill.teacher and config.grpo.algorithm = 'distill' go "
                      f"together: teacher {s.distill_teacher!r}, coefficient "
                      f"{s.rollout.paradigm.coefficient!r}")


def _check_sizes(s: Settings, dp: int) -> None:
  """Counts that must be positive, and batches the data-parallel size must divide."""
  r, g = s.rollout, s.grpo
  if r.num_samples < 2:
    raise ConfigError(f"config.grpo.num_samples = {r.num_samples}: GRPO needs G >= 2 samples per "
                      "prompt (the group baseline and std)")
  for name, value, low in (("steps", g.steps, 0), ("num_prompts", r.num_prompts, 1),
                           ("max_prompt_length", r.max_prompt_length, 1),
                           ("max_completion_length", r.max_completion_length, 1),
                           ("num_iterations", g.num_iterations, 1)):
    if value < low:
      raise ConfigError(f"config.grpo.{name} = {value} must be positive")
  if g.length_bucket < 0:
    raise ConfigError(f"config.grpo.length_bucket = {g.length_bucket} must be >= 0 (0: always "
                      "the whole completion budget)")
  if s.sft.steps < 0:
    raise ConfigError(f"config.sft.steps = {s.sft.steps} must be >= 0")
  if r.num_prompts % dp:
    raise ConfigError(f"config.grpo.num_prompts = {r.num_prompts} is not divisible by the "
                      f"data-parallel size data * fsdp = {dp} (prompts are sharded over it)")
  if s.eval.batch_size % dp:
    raise ConfigError(f"config.eval.batch_size = {s.eval.batch_size} is not divisible by the "
                      f"data-parallel size {dp}")
  if s.sft.steps and s.sft.batch_size % dp:
    raise ConfigError(f"config.sft.batch_size = {s.sft.batch_size} is not divisible by the "
                      f"data-parallel size {dp}")


def _check_run(s: Settings) -> None:
  """The rollout's and the run's named choices, and the dtypes."""
  r, g = s.rollout, s.grpo
  if r.batching not in ("static", "continuous"):
    raise ConfigError(f"config.grpo.batching = {r.batching!r}: expected static or continuous")
  if r.decode_slots < 0:
    raise ConfigError(f"config.grpo.decode_slots = {r.decode_slots} must be >= 0 (0: one per "
                      "row)")
  if r.advantage_scale not in ("group", "batch", "none"):
    raise ConfigError(f"config.grpo.advantage_scale = {r.advantage_scale!r}: expected group, "
                      "batch or none")
  if s.eval.every < 0 or s.checkpoint_every < 0:
    raise ConfigError("config.eval.every and config.checkpoint.every must be >= 0")
  if s.checkpoint_keep < 2:
    raise ConfigError(f"config.checkpoint.keep = {s.checkpoint_keep}: keep >= 2, so that a "
                      "corrupted latest checkpoint can fall back to the one before")
  if r.prompt_truncation not in ("left", "error"):
    raise ConfigError(f"config.grpo.prompt_truncation = {r.prompt_truncation!r}: 'left' or "
                      "'error'")
  if r.process_reward not in ("verifier", "prm"):
    raise ConfigError(f"config.grpo.process_reward = {r.process_reward!r}: 'verifier' or 'prm'")
  if r.paradigm.data == "frozen_policy" and (g.ref_reset_every or g.ref_ema):
    raise ConfigError(
        f"config.grpo.algorithm = 'rft' samples from the frozen warm start, kept in the "
        f"reference slot; config.grpo.ref_reset_every = {g.ref_reset_every} and "
        f"config.grpo.ref_ema = {g.ref_ema} would move it: set both to 0 for RFT")
  for name in ("param_dtype", "dtype"):
    if getattr(s.model, name) not in FLOAT_DTYPES:
      raise ConfigError(f"config.model.{name} = {getattr(s.model, name)!r}: expected one of "
                        f"{FLOAT_DTYPES}")
  if s.model.remat not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat = {s.model.remat!r}: expected one of {REMAT_POLICIES}")


def _check_reward_model(s: Settings, dp: int) -> None:
  """The learned reward model and what process supervision needs of the run."""
  r, rm = s.rollout, s.reward_model
  if rm.enabled and rm.kind not in ("orm", "prm"):
    raise ConfigError(f"config.reward_model.kind = {rm.kind!r}: 'orm' or 'prm' in the trainer")
  if r.process_reward == "prm" and r.paradigm.coefficient == "process" and not (
      rm.enabled and rm.kind == "prm"):
    raise ConfigError("config.grpo.process_reward = 'prm' needs config.reward_model.enabled = "
                      "True with kind = 'prm'")
  steps_needed = r.paradigm.coefficient == "process" or (rm.enabled and rm.kind == "prm")
  if steps_needed and s.data.task not in ("arithmetic", "multistep"):
    raise ConfigError(f"process supervision / a PRM needs step labels, which only the arithmetic "
                      f"tasks' verifier gives; config.data.task = {s.data.task!r}")
  if rm.enabled and rm.batch_size % dp:
    raise ConfigError(f"config.reward_model.batch_size = {rm.batch_size} is not divisible by the "
                      f"data-parallel size {dp}")
  if not 0.0 <= rm.replay_fraction < 1.0:
    raise ConfigError(f"config.reward_model.replay_fraction = {rm.replay_fraction} must be in "
                      "[0, 1)")


def _check_staleness(s: Settings) -> None:
  """Rollouts sampled ahead of their update: GRPO on the live policy, nothing that changes
  what a rollout is worth between its sampling and its update."""
  k = s.grpo.max_staleness
  if k < 0:
    raise ConfigError(f"config.grpo.max_staleness = {k} must be >= 0 (0: synchronous)")
  if not k:
    return
  p = s.rollout.paradigm
  clashes = [what for what, on in (
      (f"config.grpo.algorithm other than 'grpo' (this one: data {p.data!r}, objective "
       f"{p.objective!r}; RFT samples a frozen policy, SFT / Online RFT have no ratio to "
       "correct)",
       p.objective != "grpo" or p.data != "policy"),
      ("config.reward_model.enabled (a reward model retrained while rollouts wait)",
       s.reward_model.enabled),
      (f"config.grpo.ref_reset_every = {s.grpo.ref_reset_every} (a reference reset between a "
       "rollout's sampling and its update)", bool(s.grpo.ref_reset_every)))
      if on]
  if clashes:
    raise ConfigError(f"config.grpo.max_staleness = {k} cannot be combined with "
                      + "; ".join(clashes))


def _check_inflight(s: Settings) -> None:
  """In-flight weight updates: the continuous single-turn sampler of a rollout sampled ahead,
  switching weights within its budget."""
  m, r = s.grpo.inflight_after, s.rollout
  if not m:
    return
  name = f"config.grpo.inflight_after = {m}"
  if not 0 < m < r.max_completion_length:
    raise ConfigError(f"{name} must be in [0, grpo.max_completion_length = "
                      f"{r.max_completion_length}): the decode steps before the switch")
  clashes = [what for what, on in (
      ("config.grpo.max_staleness = 0 (no rollout is sampled while an update runs)",
       not s.grpo.max_staleness),
      (f"config.grpo.batching = {r.batching!r} (needs 'continuous')",
       r.batching != "continuous"),
      ("config.tools.env (episodes)", s.tools.enabled),
      ("config.grpo.dynamic_sampling (resampled rounds after the switch)",
       r.dynamic_sampling))
      if on]
  if clashes:
    raise ConfigError(f"{name} cannot be combined with " + "; ".join(clashes))


def _check_rollout_devices(s: Settings) -> None:
  """The samplers' own devices: prompt rows split evenly over them, taken alike from every
  process (experiment.split_devices)."""
  n = s.rollout_devices
  if not n:
    return
  for name, rows in (("grpo.num_prompts", s.rollout.num_prompts),
                     ("eval.batch_size", s.eval.batch_size)):
    if rows % n:
      raise ConfigError(f"config.{name} = {rows} is not divisible by config.mesh."
                        f"rollout_devices = {n} (the samplers split prompts over their devices)")
  procs = jax.process_count()
  if n % procs or n // procs >= jax.local_device_count():
    raise ConfigError(f"config.mesh.rollout_devices = {n}: every one of the {procs} processes "
                      f"gives the samplers n / {procs} of its {jax.local_device_count()} devices "
                      "and keeps at least one for training")


def _check_lora(s: Settings) -> None:
  lo = s.model.lora
  if lo.rank < 0:
    raise ConfigError(f"config.model.lora.rank = {lo.rank}: 0 (off) or a positive rank")
  if not lo.rank:
    return
  unknown = [t for t in lo.targets if t not in LORA_TARGETS]
  if unknown or not lo.targets:
    raise ConfigError(f"config.model.lora.targets = {','.join(lo.targets)!r}: {unknown or 'empty'}"
                      f" names no layer weight; known: {','.join(LORA_TARGETS)}")
  if lo.dropout:
    raise ConfigError(f"config.model.lora.dropout = {lo.dropout}: LoRA dropout is not "
                      "implemented (GRPO recipes use 0); set it to 0")
  if not lo.alpha > 0:
    raise ConfigError(f"config.model.lora.alpha = {lo.alpha} must be > 0")
  g = s.grpo
  if g.ref_reset_every or g.ref_ema:
    raise ConfigError("config.grpo.ref_reset_every / ref_ema: with LoRA (config.model.lora.rank "
                      "> 0) the reference policy is the frozen base model; set both to 0")
  if s.reward_model.enabled:
    raise ConfigError("config.reward_model.enabled: iterative GRPO with a learned reward model "
                      "is not supported with LoRA yet (config.model.lora.rank > 0)")


def _check_data(s: Settings) -> None:
  d = s.data
  if d.task not in ("arithmetic", "multistep", "tool_arithmetic", "records"):
    raise ConfigError(f"config.data.task = {d.task!r}: 'arithmetic', 'multistep', "
                      "'tool_arithmetic' (generated) or 'records' (a jsonl / json / parquet "
                      "file or directory, or hf:<dataset name>)")
  if d.task == "records" and not d.path:
    raise ConfigError("config.data.path: the records task needs a file, a directory of "
                      "{train,test}.jsonl|json|parquet, or hf:<dataset name>")
  if d.task == "records" and not d.eval_split and not 0 < d.num_eval:
    raise ConfigError("config.data.num_eval: with config.data.eval_split = '' the last num_eval "
                      "records of the file are held out; set num_eval > 0")
  for role in ("question", "final_answer"):
    if not getattr(d.fields, role):
      raise ConfigError(f"config.data.fields.{role}: name the column that holds the {role}")
  if not d.fields.answer and (s.sft_steps or s.rollout.paradigm.data == "teacher"):
    raise ConfigError("config.data.fields.answer = '': SFT (config.sft.steps > 0) and the sft "
                      "paradigm train on worked solutions; map the column that holds them, or "
                      "set config.sft.steps = 0")
  try:
    d.prompt_template.format_map(collections.defaultdict(str))
  except (ValueError, IndexError) as e:
    raise ConfigError(f"config.data.prompt_template = {d.prompt_template!r}: {e} (a str.format "
                      "string over the record's columns, e.g. '{question}'; double literal "
                      "braces)") from None


def _check_rewards(r: RolloutSettings) -> None:
  if r.reward_errors not in ("raise", "zero"):
    raise ConfigError(f"config.grpo.reward_errors = {r.reward_errors!r}: 'raise' (stop the run) "
                      "or 'zero' (score the failed batch 0 and count it)")
  if r.reward_timeout_s < 0:
    raise ConfigError(f"config.grpo.reward_timeout_s = {r.reward_timeout_s} must be >= 0 "
                      "(0: no limit)")
  for name, spec in r.reward_fns:
    if not callable(spec) and (not isinstance(spec, str) or ":" not in spec):
      raise ConfigError(f"config.grpo.reward_fns.{name} = {spec!r}: expected 'module:function' "
                        "or 'path/to/file.py:function'")


def _check_tools(s: Settings, dp: int) -> None:
  t = s.tools
  if t is None or not t.enabled:
    return
  for name in ("max_turns", "max_observation_tokens", "max_workers", "memory_mb"):
    if getattr(t, name) < 1:
      raise ConfigError(f"config.tools.{name} = {getattr(t, name)} must be >= 1")
  if t.timeout_s <= 0:
    raise ConfigError(f"config.tools.timeout_s = {t.timeout_s} must be > 0")
  if t.slots and t.slots < s.rollout.max_completion_length + 1:
    raise ConfigError(f"config.tools.slots = {t.slots} must be 0 or >= the episode's token "
                      f"budget config.grpo.max_completion_length + 1 = "
                      f"{s.rollout.max_completion_length + 1}")
  if not t.stop_strings:
    raise ConfigError("config.tools.stop_strings: at least one string ends a tool call")
  relative = [p for p in t.hidden_paths if not p.startswith("/")]
  if relative:
    raise ConfigError(f"config.tools.hidden_paths: {relative} are not absolute paths "
                      "(comma-separated absolute paths, e.g. '/data/private,/scratch/ckpt')")
  if not isinstance(t.allow_unisolated, bool):
    raise ConfigError(f"config.tools.allow_unisolated = {t.allow_unisolated!r} must be True or "
                      "False")
  if "{output}" not in t.observation_template:
    raise ConfigError(f"config.tools.observation_template = {t.observation_template!r} has no "
                      "{output}")
  try:
    re.compile(t.code_pattern)
  except re.error as e:
    raise ConfigError(f"config.tools.code_pattern = {t.code_pattern!r}: {e}") from None
  if s.reward_model.enabled or s.rollout.paradigm.coefficient == "process":
    raise ConfigError("config.tools: tool-integrated rollouts with a learned reward model or "
                      "process supervision are not supported (step boundaries and the RM read "
                      "single-turn completions)")
  if s.rollout.dynamic_sampling:
    raise ConfigError("config.tools with config.grpo.dynamic_sampling = True is not supported")
  if jax.process_count() > 1:
    raise ConfigError("config.tools: multi-turn rollouts run on one process (the tools run on "
                      "the host that samples); this run has "
                      f"{jax.process_count()} processes")


def precision_warnings(s: Settings) -> list[str]:
  """Configs that would silently lose their updates: Adam moves a weight by about the learning
  rate per step, which rounds away in a 16-bit weight w unless lr > half an ulp of w, i.e.
  |w| < lr * 2^8 (bfloat16) or lr * 2^11 (float16)."""
  out = []
  bits = {"bfloat16": 8, "float16": 11}.get(s.model.param_dtype)
  if bits is None:
    return out
  for name, optim, steps in (("grpo", s.grpo.optim, s.grpo.steps),
                             ("sft", s.sft.optim, s.sft_steps)):
    if steps:
      out.append(
          f"config.model.param_dtype = {s.model.param_dtype!r} with config.{name}.optim."
          f"learning_rate = {optim.learning_rate:g}: a step changes only weights with |w| < "
          f"{optim.learning_rate * 2 ** bits:.2g}; typical weights (~0.02) will not move. Use "
          "config.model.param_dtype = 'float32' (master weights) with config.model.dtype = "
          f"{s.model.param_dtype!r} (compute)")
  return out
