"""What a run carries between steps and across restarts, and the checkpoint contract.

    loop, models = runstate.resume(exp, ckpt)          # (None, empty Models) for a fresh run
    loop = runstate.save(ckpt, writer, loop, models, settings)

`LoopState` (phase, step, data position, metrics-file length) is the checkpoint's JSON;
`Models` (TrainState, reference params, reward model) its state tree, the reward model's replay
data (`iterative.RMData`) and the rollouts sampled ahead (`staleness.Pending`) its host item.
`restore_target` is what a checkpoint holds, as abstract arrays: the trainer's resume and
`runs.load_run` read checkpoints through it. LoRA: the frozen base lives outside the checkpoint
(`lora_base_dir`), fingerprinted in the loop state; the trained adapters are exported for other
tools at the end (`export_lora`). `record_run` writes run.json: what the run really is (model,
dtypes, mesh, devices, the tool sandbox's report).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
from absl import logging

from grpo_jax import checkpointing, experiment, iterative, paths, progress, staleness
from grpo_jax import weights
from grpo_jax import models as models_lib
from grpo_jax.data import iterator
from grpo_jax.experiment import Experiment
from grpo_jax.models import lora
from grpo_jax.settings import ConfigError, Settings
from grpo_jax.train_step import TrainState


@dataclasses.dataclass(frozen=True)
class LoopState:
  """Where the run stands, saved as the checkpoint's JSON."""
  phase: str                   # "sft" | "grpo"
  step: int                    # steps done in the phase
  position: iterator.Position  # the phase's data iterator
  metrics_lines: int = 0       # metrics.jsonl lines written up to this state
  rm_trained: bool = False     # the checkpoint holds a reward model
  lora_base: str = ""          # LoRA: fingerprint of the frozen base the adapters belong to
  scan_layers: bool = False    # the saved params' layer layout (models.to_layout)

  def to_json(self) -> dict:
    return dict(phase=self.phase, step=self.step, position=self.position._asdict(),
                metrics_lines=self.metrics_lines, rm_trained=self.rm_trained,
                lora_base=self.lora_base, scan_layers=self.scan_layers)

  @classmethod
  def from_json(cls, d: dict) -> "LoopState":
    return cls(d["phase"], d["step"], iterator.Position(**d["position"]), d["metrics_lines"],
               d["rm_trained"], d.get("lora_base", ""), bool(d.get("scan_layers", False)))


@dataclasses.dataclass(frozen=True)
class Models:
  """The device state: policy (with optimizer), reference params, reward model. With LoRA,
  `state` trains the adapters, `base` is the frozen base (compute dtype), which is also the
  reference policy (no second copy) and is not in the checkpoint (see `lora_base_dir`)."""
  state: Optional[TrainState]
  ref_params: Any = None
  rm_state: Optional[TrainState] = None
  rm_data: iterative.RMData = iterative.RMData()
  base: Any = None
  base_fingerprint: str = ""  # lora.fingerprint(base), computed once per base
  rollouts: tuple = ()  # grpo.max_staleness > 0: staleness.Pending, sampled ahead (host)

  @property
  def reference(self):
    return self.ref_params if self.base is None else self.base


def resume(exp: Experiment, ckpt) -> tuple[Optional[LoopState], Models]:
  """The newest readable checkpoint's loop and device state (an unreadable newest one is moved
  aside and the one before is used); (None, empty) for a fresh run."""
  restored = ckpt.restore_latest(functools.partial(restore_target, exp))
  if restored is None:
    return None, Models(state=None)
  if restored.skipped:
    logging.warning("checkpoints %s in %s were unreadable (moved to %s.corrupt/); fell back to "
                    "step %d", list(restored.skipped), ckpt.directory, ckpt.directory,
                    restored.step)
  loop = LoopState.from_json(restored.extra)
  progress.announce(f"resumed from {ckpt.directory} step {restored.step} ({loop.phase} step "
                    f"{loop.step})")
  base, fingerprint = None, ""
  if exp.device.lora and loop.phase == "grpo":
    base, fingerprint = _load_lora_base(exp, loop)
  state = in_run_layout(exp, restored.extra, restored.state)
  return loop, Models(state["state"], state.get("ref_params"), state.get("rm_state"),
                      iterative.RMData.from_host(restored.host), base, fingerprint,
                      staleness.from_host(restored.host.get("rollouts", {})))


def restore_target(exp: Experiment, extra: dict) -> dict:
  """What a checkpoint whose loop state is `extra` holds, as abstract restore targets, in the
  layer layout it was written with (`in_run_layout` converts the restored tree)."""
  loop = LoopState.from_json(extra)
  return models_lib.to_layout(_run_target(exp, loop), loop.scan_layers)


def in_run_layout(exp: Experiment, extra: dict, restored: dict) -> dict:
  """A tree restored with `restore_target` in this run's layer layout: a checkpoint written
  with the other `model.scan_layers` has its layers (params, optimizer moments, reference)
  stacked or sliced, then placed on this run's shardings."""
  loop = LoopState.from_json(extra)
  scan = exp.device.model_config.scan_layers
  if loop.scan_layers == scan:
    return restored
  shardings = jax.tree.map(lambda t: t.sharding, _run_target(exp, loop))
  return jax.device_put(models_lib.to_layout(restored, scan), shardings)


def _run_target(exp: Experiment, loop: LoopState) -> dict:
  device, keys = exp.device, exp.keys
  tree = {"state": experiment.abstract_state(device, keys, loop.phase)}
  if loop.phase == "grpo" and stores_reference(exp.settings, device):
    tree["ref_params"] = weights.abstract_reference(device, tree["state"].params,
                                                    ema=bool(exp.settings.grpo.ref_ema))
  if loop.rm_trained:
    tree["rm_state"] = experiment.abstract_rm_state(device, keys)
  return tree


def stores_reference(s: Settings, device: experiment.Device) -> bool:
  """A reference copy is kept (and checkpointed) for the KL or RFT, except with LoRA, whose
  reference is the frozen base."""
  return s.use_reference and not device.lora


def save(ckpt, writer, loop: LoopState, models: Models, s: Settings) -> LoopState:
  """Checkpoint `models` with `loop` (its metrics position set to the writer's) at the global
  step: SFT steps, then SFT steps + GRPO steps."""
  loop = dataclasses.replace(loop, metrics_lines=writer.num_lines,
                             rm_trained=models.rm_state is not None,
                             lora_base=models.base_fingerprint,
                             scan_layers=s.model.scan_layers)
  writer.flush()  # gs://: publish the metrics lines this checkpoint counts before it exists
  tree = {"state": models.state}
  if models.ref_params is not None:
    tree["ref_params"] = models.ref_params
  if models.rm_state is not None:
    tree["rm_state"] = models.rm_state
  host = models.rm_data.to_host() if s.reward_model.enabled else {}
  if s.grpo.max_staleness:  # the rollouts sampled ahead: trained after the resume
    host["rollouts"] = staleness.to_host(models.rollouts)
  offset = s.sft_steps if loop.phase == "grpo" else 0
  ckpt.save(offset + loop.step, tree, loop.to_json(), host=host or None)
  return loop


def initial_grpo_models(exp: Experiment, params=None) -> Models:
  """GRPO's start: a fresh optimizer on `params` (the warm start, init_from, the loaded
  checkpoint or a random init) and the reference = that policy; with LoRA, fresh adapters on
  the frozen base, written once to `lora_base_dir` unless it is the HF checkpoint itself."""
  device, keys = exp.device, exp.keys
  if device.lora:
    base = weights.reference_copy(device, experiment.initial_params(device, keys, params))
    path = lora_base_dir(exp.settings, exp.workdir)
    if path != exp.settings.model.hf_checkpoint and jax.process_index() == 0:
      host = jax.device_get(base)
      paths.write_dir(path, lambda d: models_lib.save_hf_checkpoint(d, device.base_config, host))
    return Models(experiment.init_state(device, keys, "grpo"), base=base,
                  base_fingerprint=lora.fingerprint(device.base_config, base))
  state = experiment.init_state(device, keys, "grpo", params=params)
  if not stores_reference(exp.settings, device):
    return Models(state)
  return Models(state, weights.reference_copy(device, state.params,
                                              ema=bool(exp.settings.grpo.ref_ema)))


def lora_base_dir(s: Settings, workdir: str) -> str:
  """Where a LoRA run's base lives: the HF checkpoint it started from, or (SFT warm start,
  init_from or a random init) `<workdir>/lora_base`, written once at the start of GRPO."""
  if s.model.hf_checkpoint and not s.sft_steps and not s.init_from:
    return s.model.hf_checkpoint
  return str(paths.as_path(workdir) / "lora_base")


def _load_lora_base(exp: Experiment, loop: LoopState):
  device = exp.device
  path = lora_base_dir(exp.settings, exp.workdir)
  if not (paths.as_path(path) / "config.json").exists():
    raise ConfigError(f"LoRA base model {path} is missing: the adapter checkpoint in "
                      f"{exp.workdir}/checkpoints needs the base it was trained on")
  _, host = models_lib.load_hf_checkpoint(paths.local_dir(path),
                                          dtype=device.model_config.param_dtype)
  host = models_lib.to_layout(host, device.model_config.scan_layers)
  base = weights.reference_copy(device, jax.device_put(host, device.params_sh))
  found = lora.fingerprint(device.base_config, base)
  if loop.lora_base and found != loop.lora_base:
    raise ConfigError(f"config.model: the adapter checkpoint in {exp.workdir}/checkpoints was "
                      f"trained on a base with fingerprint {loop.lora_base}, but {path} has "
                      f"{found}: a different base model")
  return base, found


def warm_start(exp: Experiment):
  """The policy params of another run's last checkpoint (config.init_from)."""
  src = checkpointing.Checkpointer(str(paths.as_path(exp.settings.init_from) / "checkpoints"),
                                   read_only=True)
  params = models_lib.to_layout(src.restore()[0]["state"]["params"],
                                exp.device.model_config.scan_layers)  # either layout
  params = jax.device_put(params, exp.device.state_sh.grpo.params)
  src.close()
  progress.announce(f"initialised from {exp.settings.init_from}")
  return params


def export_lora(exp: Experiment, models: Models) -> None:
  """The trained policy for other tools: `lora_adapter/` (PEFT: adapter_config.json +
  adapter_model.safetensors, loads onto the transformers base) and `merged_hf/` (a plain HF
  checkpoint), each written to a temporary directory and renamed."""
  if jax.process_index() != 0:
    return
  params = jax.device_get(lora.combine(models.base, models.state.params))
  base = lora_base_dir(exp.settings, exp.workdir)
  base_path = os.path.abspath(base) if paths.is_local(base) else base
  for name, write in (("lora_adapter", functools.partial(
      models_lib.save_peft_adapter, base_model_name_or_path=base_path)),
                      ("merged_hf", models_lib.save_merged_hf)):
    paths.write_dir(paths.as_path(exp.workdir) / name,
                    lambda d, write=write: write(d, exp.device.model_config, params))
  logging.info("LoRA policy exported to %s/lora_adapter (PEFT) and %s/merged_hf", exp.workdir,
               exp.workdir)


def record_run(exp: Experiment) -> None:
  """run.json: what the run really is (model config, dtypes, devices), beside config.json."""
  s, device, data = exp.settings, exp.device, exp.data
  c, num_params = device.model_config, device.num_params()
  logging.info("model: %s, %.2fM params; mesh %s; %d train / %d eval problems", c.family,
               num_params / 1e6, dict(device.mesh.shape), len(data.task.train),
               len(data.task.eval))
  if data.train_prompts.num_truncated:
    logging.warning("%d of %d training prompts were truncated on the left to %d tokens",
                    data.train_prompts.num_truncated, len(data.task.train),
                    s.rollout.max_prompt_length)
  info = {"model": dataclasses.asdict(c), "num_params": num_params,
          "precision": {"params": c.param_dtype, "compute": c.dtype,
                        "optimizer_state": c.param_dtype,
                        "reference": (c.param_dtype if s.grpo.ref_ema else c.dtype)
                        if s.use_reference else None},
          "mesh": dict(device.mesh.shape),
          "decode_layout": "training" if device.decode_sh is device.params_sh else "replicated",
          "devices": [str(d) for d in jax.devices()][:8],
          "jax": jax.__version__}
  logging.info("precision: %s", info["precision"])
  report = experiment.tool_isolation(s, data.env)
  if report is not None:  # cached by the check in experiment.build
    info["tool_isolation"] = report
    logging.info("tool sandbox: confined=%s user=%s landlock=%s seccomp=%s hidden=%s; not "
                 "blocked: %s", report["confined"], report["user"], report["landlock"],
                 report["seccomp"], report["hidden"], "; ".join(report["not_blocked"]))
  if jax.process_index() == 0:
    (paths.as_path(exp.workdir) / "run.json").write_text(json.dumps(info, indent=2))
