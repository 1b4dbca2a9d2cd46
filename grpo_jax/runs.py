"""A run's workdir, read back without training: its config, tokenizer and a checkpoint's policy.

    run = runs.load_run("/tmp/arith")                 # the latest readable checkpoint
    run = runs.load_run("/tmp/arith", step=200, overrides={"eval.num_problems": 0})
    result = evaluation.evaluate(run.experiment, run.device_params(), run.phase_step)
    models.save_hf_checkpoint(out, run.model_config, run.params)

What `experiments/eval.py` and `tools/export_hf.py` start from. The experiment is rebuilt from
the workdir's config.json with `experiment.build` (task data, tokenizer, model config, mesh and
jitted programs, none compiled yet; with `model.hf_checkpoint` that also reads the base weights,
which a LoRA run's policy needs anyway), so a checkpoint is restored exactly as the trainer
resumes it. Restoring reads the whole checkpoint (optimiser moments and reference copy too: the
saved tree must match its target) and keeps only the policy.

Nothing in the workdir is written, moved or deleted: checkpoints are opened read-only (an
unreadable latest step is skipped with a warning, not quarantined), and a workdir without its
SentencePiece tokenizer is an error, not a reason to train a new one. Every problem with the
workdir (missing, no config.json, no checkpoint, an unreadable one) is a `RunError` naming the
path, raised before the model's programs compile. One host: the policy is gathered to host
memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import ml_collections
from absl import logging

from grpo_jax import checkpointing, experiment, models, paths, runstate, settings as settings_lib
from grpo_jax import defaults, weights
from grpo_jax.experiment import Experiment
from grpo_jax.models import lora
from grpo_jax.settings import ConfigError, Settings

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
# What reading a damaged step raises (checkpointing._UNREADABLE): corrupted or truncated files
# come out of Orbax / TensorStore as ValueError, missing ones as OSError.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError)


class RunError(ConfigError):
  """A workdir that cannot be read back: missing, no config.json, no (readable) checkpoint. A
  ConfigError, so launchers report it as one line and exit with code 2."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One checkpoint of a run, as the policy it holds."""
  workdir: str
  config: ml_collections.ConfigDict  # config.json as the run wrote it, overrides applied
  settings: Settings
  experiment: Experiment             # rebuilt from `settings`; its programs evaluate `params`
  model_config: models.ModelConfig   # of `params`: no LoRA (merged); param_dtype, compute dtype
  tokenizer: Any
  params: Any                        # host NumPy tree of the policy, in model.param_dtype
  step: int                          # the checkpoint's step: its directory name (SFT + GRPO steps)
  phase: str                         # "sft" | "grpo": the phase the checkpoint was saved in
  phase_step: int                    # steps done in that phase (eval figures are logged at it)
  skipped: tuple[int, ...] = ()      # newer steps that could not be read (step=None only)

  def device_params(self):
    """`params` on the experiment's mesh, sharded as the trainer places them."""
    return jax.device_put(self.params, self.experiment.device.params_sh)


def resolve(path: str) -> str:
  """`path` absolute when local (a `file://` URL becomes its path), else the URL as given: how
  a run or a model is named in results and errors."""
  return (os.path.abspath(str(paths.as_path(path))) if paths.is_local(path)
          else str(paths.as_path(path)).rstrip("/"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's config.json as a ConfigDict; RunError naming the path when absent or bad."""
  root = paths.as_path(workdir)
  if not root.is_dir():
    raise RunError(f"workdir {workdir} does not exist (or is not a directory)")
  path = root / CONFIG_FILE
  if not path.exists():
    raise RunError(f"{path} does not exist: {workdir} is not a grpo_jax workdir "
                   "(experiments/train.py writes config.json when a run starts)")
  try:
    data = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RunError(f"{path} cannot be read: {e}") from None
  if not isinstance(data, dict):
    raise RunError(f"{path}: expected a JSON object (the run's config), got "
                   f"{type(data).__name__}")
  added = _fill_defaults(data, _defaults())
  if added:
    logging.warning("%s predates config fields %s; reading it with their defaults", path, added)
  return ml_collections.ConfigDict(data)


def _defaults() -> dict:
  """The current config defaults: fields a run written by an older grpo_jax lacks."""
  return defaults.config().to_dict()


def _fill_defaults(data: dict, defaults: dict, prefix: str = "") -> list[str]:
  """Adds the fields of `defaults` missing from `data` (in place); their dotted names. Fields
  that are open mappings in the default (rewards, reward_fns, overrides) are not filled in."""
  added = []
  for key, value in defaults.items():
    if key not in data:
      data[key] = value
      added.append(prefix + key)
    elif isinstance(value, dict) and isinstance(data[key], dict) and key not in (
        "rewards", "reward_fns", "overrides", "chat_template_kwargs"):
      added += _fill_defaults(data[key], value, f"{prefix}{key}.")
  return added


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `cfg` with dotted fields set (`{"eval.k": 4}`); ConfigError naming an unknown
  field or a value of the wrong type."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for dotted, value in overrides.items():
    *parents, name = dotted.split(".")
    node = cfg
    try:
      for key in parents:
        node = node[key]
      if name not in node:
        raise KeyError(name)
      node[name] = value
    except (KeyError, TypeError, AttributeError) as e:
      raise ConfigError(f"config.{dotted} = {value!r}: cannot set it ({e})") from None
  return cfg


def load_run(workdir: str, step: Optional[int] = None, *,
             overrides: Mapping[str, Any] | None = None,
             reward_fns: Optional[Mapping[str, Callable]] = None) -> Run:
  """The policy of checkpoint `step` of `workdir` (default: the newest readable one).

  `overrides` (dotted config fields) change the rebuilt experiment, e.g. the evaluation's size;
  a change of the model or the optimiser makes the checkpoint unreadable (a RunError).
  `reward_fns`: the reward functions the run was given in-process (`trainer.train`'s), which
  config.json cannot name; the experiment is built with its rewards.
  """
  workdir = resolve(workdir)
  cfg = apply_overrides(read_config(workdir), overrides or {})
  config_path = os.path.join(workdir, CONFIG_FILE)
  try:
    s = settings_lib.from_config(cfg, jax.device_count())
  except ConfigError as e:
    raise RunError(f"{config_path}: {e}") from None
  ckpt = _open_checkpoints(workdir, step)
  try:
    _check_tokenizer(s, workdir)
    try:
      exp = experiment.build(s, workdir, reward_fns)
    except ConfigError as e:
      raise RunError(f"{config_path}: {e}") from None
    state, extra, step, skipped = _restore(exp, ckpt, step)
  finally:
    ckpt.close()
  loop = runstate.LoopState.from_json(extra)
  params = state["state"].params
  if exp.device.lora and loop.phase == "grpo":  # the state trains the adapters; the base is frozen
    params = _merge_lora(exp, loop, params)
  return Run(workdir=workdir, config=cfg, settings=s, experiment=exp,
             model_config=exp.device.base_config, tokenizer=exp.data.tokenizer,
             params=jax.device_get(params), step=step, phase=loop.phase,
             phase_step=loop.step, skipped=skipped)


def _open_checkpoints(workdir: str, step: Optional[int]) -> checkpointing.Checkpointer:
  """The workdir's checkpoints, read-only; RunError when there is none (or not `step`)."""
  directory = os.path.join(workdir, CHECKPOINTS)
  try:
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
  except (FileNotFoundError, OSError, ValueError) as e:
    raise RunError(f"no checkpoint in {workdir}: {e} (a run saves one every "
                   "config.checkpoint.every steps and at its end)") from None
  steps = ckpt.all_steps()
  if not steps or (step is not None and step not in steps):
    ckpt.close()
    wanted = "no checkpoint" if step is None else f"no checkpoint for step {step}"
    raise RunError(f"{wanted} in {directory} (steps there: {steps})")
  return ckpt


def _check_tokenizer(s: Settings, workdir: str) -> None:
  """The offline default's tokenizer is trained into the workdir at the start of a run; reading
  the run back needs that file (tasks.build_tokenizer would train a new, different one)."""
  if s.tokenizer_path or s.model.hf_checkpoint or s.init_from:
    return
  path = os.path.join(workdir, "tokenizer.model")
  if not paths.as_path(path).exists():
    raise RunError(f"{path} does not exist: the run's tokenizer (trained when it started) is "
                   "needed to read its checkpoints")


def _restore(exp: Experiment, ckpt: checkpointing.Checkpointer,
             step: Optional[int]) -> tuple[dict, dict, int, tuple[int, ...]]:
  """(state, extra, step, skipped): `step`, or the newest readable step."""
  mismatch = ("does not match the run's config.json (was the config edited, or an override "
              "given that changes the model or the optimiser?)")
  if step is None:
    try:
      restored = ckpt.restore_latest(lambda extra: runstate.restore_target(exp, extra))
    except checkpointing.TargetMismatchError as e:
      raise RunError(f"{e}; it {mismatch}") from None
    except checkpointing.CheckpointError as e:
      raise RunError(str(e)) from None
    if restored.skipped:
      logging.warning("checkpoint steps %s in %s cannot be read; using step %d",
                      list(restored.skipped), ckpt.directory, restored.step)
    state = runstate.in_run_layout(exp, restored.extra, restored.state)
    return state, restored.extra, restored.step, restored.skipped
  where = ckpt.step_directory(step)
  try:
    extra = ckpt.read_extra(step)
    state, extra = ckpt.restore(step, runstate.restore_target(exp, extra))
    state = runstate.in_run_layout(exp, extra, state)
  except checkpointing.TargetMismatchError as e:
    raise RunError(f"{e}; it {mismatch}") from None
  except _UNREADABLE as e:
    raise RunError(f"checkpoint {where} cannot be read: {_first_line(e)}") from None
  return state, extra, step, ()


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _merge_lora(exp: Experiment, loop: runstate.LoopState, adapters):
  """The LoRA policy as plain params: the frozen base the adapters were trained on (checked
  against the checkpoint's fingerprint, as a resume does), read in param_dtype, with
  W + (alpha / r) A B merged in float32 and stored in W's dtype."""
  path = runstate.lora_base_dir(exp.settings, exp.workdir)
  device = exp.device
  if not (paths.as_path(path) / CONFIG_FILE).exists():
    raise RunError(f"LoRA base model {path} is missing: the adapters in "
                   f"{exp.workdir}/{CHECKPOINTS} need the base they were trained on")
  if path == exp.settings.model.hf_checkpoint and device.host_params is not None:
    base = device.host_params  # experiment.build read it already, in param_dtype
  else:
    try:
      _, base = models.load_hf_checkpoint(paths.local_dir(path),
                                          dtype=device.model_config.param_dtype)
      base = models.to_layout(base, device.model_config.scan_layers)
    except (OSError, ValueError) as e:
      raise RunError(f"LoRA base model {path} cannot be read: {e}") from None
  if loop.lora_base:
    found = lora.fingerprint(device.base_config, weights.compute_params(device, base))
    if found != loop.lora_base:
      raise RunError(f"the adapters in {exp.workdir}/{CHECKPOINTS} were trained on a base with "
                     f"fingerprint {loop.lora_base}, but {path} has {found}: a different base")
  merged, _ = lora.merge(lora.combine(base, jax.device_get(adapters)), device.model_config)
  return merged


class QuietOrbax:
  """A log filter for tools that only read checkpoints: Orbax's INFO lines and read-only
  warnings are noise there; its errors still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 40 or "orbax" not in record.pathname
