"""The GRPO experiment loop: an optional SFT warm start, then GRPO with evaluation and checkpoints.

    trainer.train(config, workdir)      # settings -> experiment.build -> run

One GRPO step (DeepSeekMath Algorithm 1, inner loop) is four calls, each into a module that
does one job:

    roll, position = rollout.collect(exp, policy, position, step, rm_params)  # sample + score
    adv = advantages.coefficients(paradigm.coefficient, roll.scores_KxPxG, ...)  # [N] / [N, C]
    params = updates.update_params(exp, state, base)                         # the update's view
    batch = updates.with_logprobs(exp, params, reference, rollout.train_batch(roll, adv, ...))
    state, figures = updates.update(exp, state, batch)                         # mu steps

(`grpo_step` spells it with host / device overlap: the log-prob passes start before the host
decodes and scores, the update before the step's host bookkeeping.)

Host state is typed and checkpointed with the device state: `LoopState` (phase, step, data
position, metrics-file length) in the checkpoint's JSON, the reward model's replay data
(`iterative.RMData`) as its host item. Every draw is `fold_in(named stream key, step)`, so a
killed run resumes to exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from grpo_jax import advantages, checkpointing, evaluation, experiment, iterative
from grpo_jax import models as models_lib
from grpo_jax import metrics as metrics_lib
from grpo_jax import paths, preemption, rollout, settings as settings_lib, updates
from grpo_jax import rewards as rewards_lib
from grpo_jax.data import iterator
from grpo_jax.experiment import Experiment
from grpo_jax.models import lora
from grpo_jax.settings import ConfigError  # noqa: F401  (raised by train; the launcher catches it)
from grpo_jax.train_step import TrainBatch, TrainState


@dataclasses.dataclass(frozen=True)
class LoopState:
  """Where the run stands, saved as the checkpoint's JSON."""
  phase: str                   # "sft" | "grpo"
  step: int                    # steps done in the phase
  position: iterator.Position  # the phase's data iterator
  metrics_lines: int = 0       # metrics.jsonl lines written up to this state
  rm_trained: bool = False     # the checkpoint holds a reward model
  lora_base: str = ""          # LoRA: fingerprint of the frozen base the adapters belong to

  def to_json(self) -> dict:
    return dict(phase=self.phase, step=self.step, position=self.position._asdict(),
                metrics_lines=self.metrics_lines, rm_trained=self.rm_trained,
                lora_base=self.lora_base)

  @classmethod
  def from_json(cls, d: dict) -> "LoopState":
    return cls(d["phase"], d["step"], iterator.Position(**d["position"]), d["metrics_lines"],
               d["rm_trained"], d.get("lora_base", ""))


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

  @property
  def reference(self):
    return self.ref_params if self.base is None else self.base


def train(cfg: ml_collections.ConfigDict, workdir: str,
          reward_fns: Optional[Mapping[str, Callable]] = None, env=None) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last eval figures.

  `reward_fns`: your reward functions by name, `fn(completions=..., prompts=..., **columns)`
  (the weight is config.grpo.rewards.<name>, 1.0 if absent); config.grpo.reward_fns names them
  by import path instead. `env`: a `multiturn.Environment` for tool-integrated rollouts (with
  config.tools.env set; "python" builds the sandboxed Python tool). Pass both again to resume.
  """
  limit_malloc_arenas()
  enable_compile_cache()
  s = settings_lib.from_config(cfg, jax.device_count())
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  exp = experiment.build(s, workdir, reward_fns, env)  # every input error is raised here
  if jax.process_index() == 0:
    (paths.as_path(workdir) / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  return run(exp)


def compile_cache_dir() -> Optional[str]:
  """Where compiled programs are kept across launches: $GRPO_JAX_COMPILE_CACHE ("off" / "0":
  none), else JAX's own setting (JAX_COMPILATION_CACHE_DIR), else
  $XDG_CACHE_HOME/grpo_jax/xla (~/.cache/grpo_jax/xla)."""
  setting = os.environ.get("GRPO_JAX_COMPILE_CACHE", "")
  if setting.lower() in ("off", "0", "false", "none"):
    return None
  if setting:
    return setting
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "grpo_jax", "xla")


def enable_compile_cache() -> Optional[str]:
  """The persistent compilation cache, on by default: a second launch of the same config loads
  its programs instead of compiling them (every program, however quick to compile)."""
  directory = compile_cache_dir()
  if directory is None:
    return None
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def limit_malloc_arenas() -> Optional[int]:
  """At most $GRPO_JAX_MALLOC_ARENAS glibc malloc arenas (default: one per CPU core, at least 2;
  "0": untouched; glibc's own default is 8 per core). XLA's threads otherwise each grow their
  own arena, which keeps freed buffers: on the 2-core CPU bench_step's SPEC step peaked at
  0.75-0.76 GB with glibc's default (0.98 GB in one probe) and 0.73 GB with 2 arenas, at the
  same step time (BENCHMARKS.md). Per core, not a fixed 2: a many-core GPU host compiles with
  many threads, which a couple of arenas would serialise on malloc's locks. A no-op without
  glibc (macOS) and for a process that set MALLOC_ARENA_MAX itself."""
  arenas = int(os.environ.get("GRPO_JAX_MALLOC_ARENAS") or max(2, os.cpu_count() or 2))
  if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return None
  M_ARENA_MAX = -8  # glibc's malloc.h
  return arenas if libc.mallopt(M_ARENA_MAX, arenas) == 1 else None


def run(exp: Experiment) -> dict:
  s = exp.settings
  logging.info("model: %s, %.2fM params; mesh %s; %d train / %d eval problems",
               exp.model_config.family, exp.num_params() / 1e6, dict(exp.mesh.shape),
               len(exp.task.train), len(exp.task.eval))
  if exp.train_prompts.num_truncated:
    logging.warning("%d of %d training prompts were truncated on the left to %d tokens",
                    exp.train_prompts.num_truncated, len(exp.task.train),
                    s.rollout.max_prompt_length)
  _record_run(exp)
  ckpt = checkpointing.Checkpointer(str(paths.as_path(exp.workdir) / "checkpoints"),
                                    keep=s.checkpoint_keep)
  try:  # a failing run still finishes its pending asynchronous save: no checkpoint is lost
    with preemption.Watcher() as watcher:  # SIGTERM / SIGINT: stop at a step, checkpoint
      final = _phases(exp, ckpt, watcher)
  finally:
    ckpt.close()
  sampler = exp.programs.sample_train
  logging.info("compiles: update %d, sampler %d", exp.programs.policy_update._cache_size(),  # pylint: disable=protected-access
               (sampler.decode if exp.env is not None else sampler)._cache_size())  # pylint: disable=protected-access
  return final


def _phases(exp: Experiment, ckpt, watcher: preemption.Watcher) -> dict:
  """Resume, then the SFT and GRPO phases that remain; the metrics writer closes either way."""
  loop, models = resume(exp, ckpt)
  writer = metrics_lib.MetricsWriter(exp.workdir, enabled=jax.process_index() == 0,
                                     truncate_to=loop.metrics_lines if loop else 0,
                                     wandb=exp.settings.wandb)
  try:
    if loop is None or loop.phase == "sft":
      loop, models = sft_phase(exp, ckpt, writer, loop, models, watcher)
    final, models = grpo_phase(exp, ckpt, writer, loop, models, watcher)
    if exp.lora:
      _export_lora(exp, models)
  finally:
    writer.close()
  return final


def _record_run(exp: Experiment) -> None:
  """run.json: what the run really is (model config, dtypes, devices), beside config.json."""
  c = exp.model_config
  info = {"model": dataclasses.asdict(c), "num_params": exp.num_params(),
          "precision": {"params": c.param_dtype, "compute": c.dtype,
                        "optimizer_state": c.param_dtype,
                        "reference": (c.param_dtype if exp.settings.grpo.ref_ema else c.dtype)
                        if exp.settings.use_reference else None},
          "mesh": dict(exp.mesh.shape),
          "decode_layout": "training" if exp.decode_sh is exp.params_sh else "replicated",
          "devices": [str(d) for d in jax.devices()][:8],
          "jax": jax.__version__}
  logging.info("precision: %s", info["precision"])
  report = experiment.tool_isolation(exp.settings, exp.env)
  if report is not None:  # cached by the check in experiment.build
    info["tool_isolation"] = report
    logging.info("tool sandbox: confined=%s user=%s landlock=%s seccomp=%s hidden=%s; not "
                 "blocked: %s", report["confined"], report["user"], report["landlock"],
                 report["seccomp"], report["hidden"], "; ".join(report["not_blocked"]))
  if jax.process_index() == 0:
    (paths.as_path(exp.workdir) / "run.json").write_text(json.dumps(info, indent=2))


# ----------------------------------------------------------------------------- checkpoints


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
  metrics_lib.announce(f"resumed from {ckpt.directory} step {restored.step} ({loop.phase} step "
                       f"{loop.step})")
  base, fingerprint = None, ""
  if exp.lora and loop.phase == "grpo":
    base, fingerprint = _load_lora_base(exp, loop)
  return loop, Models(restored.state["state"], restored.state.get("ref_params"),
                      restored.state.get("rm_state"), iterative.RMData.from_host(restored.host),
                      base, fingerprint)


def restore_target(exp: Experiment, extra: dict) -> dict:
  """What a checkpoint whose loop state is `extra` holds, as abstract restore targets."""
  loop = LoopState.from_json(extra)
  tree = {"state": experiment.abstract_state(exp, loop.phase)}
  if loop.phase == "grpo" and stores_reference(exp):
    tree["ref_params"] = experiment.abstract_reference(exp, tree["state"].params)
  if loop.rm_trained:
    tree["rm_state"] = experiment.abstract_rm_state(exp)
  return tree


def stores_reference(exp: Experiment) -> bool:
  """A reference copy is kept (and checkpointed) for the KL or RFT, except with LoRA, whose
  reference is the frozen base."""
  return exp.settings.use_reference and not exp.lora


def lora_base_dir(exp: Experiment) -> str:
  """Where a LoRA run's base lives: the HF checkpoint it started from, or (SFT warm start,
  init_from or a random init) `<workdir>/lora_base`, written once at the start of GRPO."""
  if exp.settings.model.hf_checkpoint and not exp.settings.sft_steps and not exp.settings.init_from:
    return exp.settings.model.hf_checkpoint
  return str(paths.as_path(exp.workdir) / "lora_base")


def _load_lora_base(exp: Experiment, loop: LoopState):
  path = lora_base_dir(exp)
  if not (paths.as_path(path) / "config.json").exists():
    raise ConfigError(f"LoRA base model {path} is missing: the adapter checkpoint in "
                      f"{exp.workdir}/checkpoints needs the base it was trained on")
  _, host = models_lib.load_hf_checkpoint(paths.local_dir(path),
                                          dtype=exp.model_config.param_dtype)
  base = experiment.lora_base(exp, jax.device_put(host, exp.params_sh))
  found = lora.fingerprint(exp.base_config, base)
  if loop.lora_base and found != loop.lora_base:
    raise ConfigError(f"config.model: the adapter checkpoint in {exp.workdir}/checkpoints was "
                      f"trained on a base with fingerprint {loop.lora_base}, but {path} has "
                      f"{found}: a different base model")
  return base, found


def save(exp: Experiment, ckpt, writer, loop: LoopState, models: Models) -> LoopState:
  """Checkpoint `models` with `loop` (its metrics position set to the writer's) at the global
  step: SFT steps, then SFT steps + GRPO steps."""
  loop = dataclasses.replace(loop, metrics_lines=writer.num_lines,
                             rm_trained=models.rm_state is not None,
                             lora_base=models.base_fingerprint)
  writer.flush()  # gs://: publish the metrics lines this checkpoint counts before it exists
  tree = {"state": models.state}
  if models.ref_params is not None:
    tree["ref_params"] = models.ref_params
  if models.rm_state is not None:
    tree["rm_state"] = models.rm_state
  host = models.rm_data.to_host() if exp.settings.reward_model.enabled else None
  offset = exp.settings.sft_steps if loop.phase == "grpo" else 0
  ckpt.save(offset + loop.step, tree, loop.to_json(), host=host)
  return loop


def _initial_grpo_models(exp: Experiment, params=None) -> Models:
  if exp.lora:  # fresh adapters on a frozen base (the warm start, init_from, or the checkpoint)
    base = experiment.lora_base(exp, params)
    path = lora_base_dir(exp)
    if path != exp.settings.model.hf_checkpoint and jax.process_index() == 0:
      host = jax.device_get(base)
      paths.write_dir(path, lambda d: models_lib.save_hf_checkpoint(d, exp.base_config, host))
    return Models(experiment.init_state(exp, "grpo"), base=base,
                  base_fingerprint=lora.fingerprint(exp.base_config, base))
  state = experiment.init_state(exp, "grpo", params=params)
  return Models(state, experiment.reference_copy(exp, state.params)
                if stores_reference(exp) else None)


# ----------------------------------------------------------------------------- SFT warm start


def sft_phase(exp: Experiment, ckpt, writer, loop: Optional[LoopState], models: Models,
              watcher: preemption.Watcher) -> tuple[LoopState, Models]:
  """SFT on the teacher's solutions (skipped with init_from), then the GRPO start: a fresh
  optimizer, and the reference = the warm-started policy."""
  s = exp.settings
  if not s.sft_steps:
    return LoopState("grpo", 0, iterator.Position(0, 0, s.seed + 1)), models
  loop = loop or LoopState("sft", 0, iterator.Position(0, 0, s.seed))
  state = models.state or experiment.init_state(exp, "sft")
  with metrics_lib.Progress(s.sft_steps, "sft", every=s.log_every) as progress:
    loop, state = _sft_steps(exp, ckpt, writer, loop, state, progress, watcher)
  models = _initial_grpo_models(exp, params=state.params)
  loop = save(exp, ckpt, writer, LoopState("grpo", 0, iterator.Position(0, 0, s.seed + 1)),
              models)
  return loop, models


def _sft_steps(exp: Experiment, ckpt, writer, loop: LoopState, state: TrainState, progress,
               watcher: preemption.Watcher):
  s = exp.settings
  prompts, targets = exp.teacher
  t_last, step_last = time.perf_counter(), loop.step
  for step in range(loop.step, s.sft_steps):
    idx, position = iterator.next_indices(loop.position, len(exp.task.sft), s.sft.batch_size)
    loop = dataclasses.replace(loop, step=step + 1, position=position)
    batch = TrainBatch(prompts.ids_NxL[idx], prompts.mask_NxL[idx], targets.ids_NxC[idx],
                       targets.mask_NxC[idx], np.ones(len(idx), np.float32))
    batch = updates.trim(batch, updates.bucket_width(batch.completion_mask,
                                                     updates.length_step(exp)))
    state, m = exp.programs.sft_update(state, exp.shard(batch)[0])
    if (step + 1) % s.log_every == 0 or step + 1 == s.sft_steps:
      figures = {k: float(v) for k, v in jax.device_get(m).items()}  # waits for queued steps
      now = time.perf_counter()
      figures["update_s"] = (now - t_last) / (step + 1 - step_last)
      t_last, step_last = now, step + 1
      writer.write(step + 1, "sft", figures)
      progress.update(step + 1, nll=figures["nll"], update_s=figures["update_s"])
    stop = watcher.stop_requested(step + 1) and step + 1 < s.sft_steps
    if stop or (s.checkpoint_every and (step + 1) % s.checkpoint_every == 0
                and step + 1 < s.sft_steps):
      loop = save(exp, ckpt, writer, loop, Models(state))
    if stop:
      raise preemption.Preempted(step + 1, ckpt.directory)
  return loop, state


# ----------------------------------------------------------------------------- GRPO


def grpo_phase(exp: Experiment, ckpt, writer, loop: LoopState, models: Models,
               watcher: preemption.Watcher) -> tuple[dict, Models]:
  s = exp.settings
  if models.state is None:
    params = _warm_start(exp) if s.init_from else None
    models = _initial_grpo_models(exp, params=params)
  with metrics_lib.Progress(s.grpo.steps, "grpo", every=s.log_every) as progress:
    last_eval, models = _grpo_steps(exp, ckpt, writer, loop, models, progress, watcher)
  ckpt.wait()
  return last_eval, models


@contextlib.contextmanager
def _profiled(exp: Experiment, step: int):
  """A jax.profiler trace of GRPO steps config.profile_steps = "first-last" (1-based), written
  to <workdir>/profile (TensorBoard's profile plugin or Perfetto read it)."""
  steps = exp.settings.profile_steps
  if not steps or not steps[0] <= step <= steps[1]:
    yield
    return
  if step == steps[0]:
    jax.profiler.start_trace(str(paths.as_path(exp.workdir) / "profile"))
  try:
    with jax.profiler.StepTraceAnnotation("grpo_step", step_num=step):
      yield
  finally:
    if step == steps[1]:
      jax.effects_barrier()
      jax.profiler.stop_trace()
      logging.info("profile of GRPO steps %d-%d: %s/profile", steps[0], steps[1], exp.workdir)


def _grpo_steps(exp: Experiment, ckpt, writer, loop: LoopState, models: Models, progress,
                watcher: preemption.Watcher):
  s = exp.settings
  nan_streak, last_eval = 0, {}
  for step in range(loop.step, s.grpo.steps + 1):
    if step == 0 or step == s.grpo.steps or (s.eval.every and step % s.eval.every == 0):
      last_eval = _evaluate(exp, writer,
                            experiment.policy_params(exp, models.state, models.base), step)
    if step == s.grpo.steps:
      break
    if iterative.iteration_due(exp, step):
      models = _outer_iteration(exp, writer, models, step)
    with _profiled(exp, step + 1):
      loop, models, figures = grpo_step(exp, loop, models, step)
    nan_streak = nan_streak + 1 if figures["skipped"] else 0
    if nan_streak >= s.max_nonfinite_streak:
      raise FloatingPointError(f"{nan_streak} consecutive GRPO steps had a non-finite loss or "
                               f"gradient (last at step {step + 1}); stopping. Metrics are in "
                               f"{exp.workdir}/metrics.jsonl, the last good checkpoint in "
                               f"{ckpt.directory}")
    writer.write(step + 1, "grpo", {k: v for k, v in figures.items()
                                    if k not in ("samples", "arrays")})
    if (step + 1) % s.log_every == 0:  # the writer's methods are no-ops off process 0
      writer.write_samples(step + 1, figures["samples"], phase="grpo")
      writer.write_histograms(step + 1, "grpo", figures["arrays"])
      if figures["samples"]:
        writer.write_text(step + 1, "grpo",
                          {"sample": metrics_lib.sample_text(figures["samples"][0])})
    shown = dict(reward=figures.get("reward"), nll=figures.get("nll"),
                 acc=last_eval.get("eval/accuracy"), kl=figures.get("kl"),
                 clip=figures.get("clip_frac"), len=figures.get("completion_length"),
                 tools=figures.get("episode/tool_calls"), tool_s=figures.get("episode/tool_s"),
                 sample_s=figures["sample_s"], score_s=figures["score_s"],
                 update_s=figures["update_s"], tok_per_s=figures["tok_per_s"])
    progress.update(step + 1, **{k: v for k, v in shown.items() if v is not None})
    stop = watcher.stop_requested(step + 1) and step + 1 < s.grpo.steps
    if stop or (s.checkpoint_every and (step + 1) % s.checkpoint_every == 0) or (
        step + 1 == s.grpo.steps):
      loop = save(exp, ckpt, writer, loop, models)
    if stop:
      raise preemption.Preempted(s.sft_steps + step + 1, ckpt.directory)
  return last_eval, models


def _export_lora(exp: Experiment, models: Models) -> None:
  """The trained policy for other tools: `lora_adapter/` (PEFT: adapter_config.json +
  adapter_model.safetensors, loads onto the transformers base) and `merged_hf/` (a plain HF
  checkpoint), each written to a temporary directory and renamed."""
  if jax.process_index() != 0:
    return
  params = jax.device_get(lora.combine(models.base, models.state.params))
  base = lora_base_dir(exp)
  base_path = os.path.abspath(base) if paths.is_local(base) else base
  for name, write in (("lora_adapter", functools.partial(
      models_lib.save_peft_adapter, base_model_name_or_path=base_path)),
                      ("merged_hf", models_lib.save_merged_hf)):
    paths.write_dir(paths.as_path(exp.workdir) / name,
                    lambda d, write=write: write(d, exp.model_config, params))
  logging.info("LoRA policy exported to %s/lora_adapter (PEFT) and %s/merged_hf", exp.workdir,
               exp.workdir)


def grpo_step(exp: Experiment, loop: LoopState, models: Models,
              step: int) -> tuple[LoopState, Models, dict]:
  """rollout -> advantages -> log-prob passes -> update; the reference follows the policy.

  Host and device overlap: the log-prob passes are queued as soon as the tokens are on the host
  (`collect(start=...)`), so they run while the host decodes and scores; the update is queued
  before the step's host bookkeeping, and its metrics are read last. `wait_s`: how long the
  host then waited for the device; `step_s`: the whole step."""
  s = exp.settings
  r = s.rollout
  t_step = time.perf_counter()
  # The policy in the compute dtype (LoRA merged), made once, for the sampler; the old-policy
  # pass reads the update's own weights (`updates.update_params`), so the ratio starts at 1.
  policy = experiment.policy_params(exp, models.state, models.base)
  sampler = models.reference if r.paradigm.data == "frozen_policy" else policy
  start = functools.partial(updates.start_logprobs, exp,
                            updates.update_params(exp, models.state, models.base),
                            models.reference)
  roll, position = rollout.collect(exp, sampler, loop.position, step,
                                   iterative.rm_params(models.rm_state), start=start)
  adv = advantages.coefficients(r.paradigm.coefficient, roll.scores_KxPxG, exp.rewards.weights,
                                scale=r.advantage_scale,
                                steps=roll.steps[:3] if roll.steps else None,
                                num_tokens=roll.tokens_NxC.shape[1])
  t0 = time.perf_counter()
  started = roll.started or start(  # teacher data / dynamic sampling: the rows are known now
      rollout.train_batch(roll, adv, mask_truncated=r.mask_truncated_completions))
  batch = updates.finish(exp, started, adv)
  del policy, sampler, start, started  # the compute-dtype copy is not needed by the update
  roll = dataclasses.replace(roll, started=None)
  state, metrics = updates.dispatch_update(exp, models.state, batch, frozen=models.base)
  del batch
  # Host work while the device updates.
  figures = {**roll.figures, "samples": rollout.samples(exp, roll, adv),
             "arrays": _histograms(exp, roll, adv)}
  rm_data = (models.rm_data.add(rollout.rm_examples(exp, roll)) if s.reward_model.enabled
             else models.rm_data)
  t_wait = time.perf_counter()
  figures = {**updates.aggregate(jax.device_get(metrics)), **figures}  # the rollout's lengths win
  now = time.perf_counter()
  figures.update(update_s=now - t0, wait_s=now - t_wait, step_s=now - t_step)
  models = dataclasses.replace(
      models, state=state, rm_data=rm_data,
      ref_params=updates.next_reference(exp, models.ref_params, state.params, step + 1))
  return dataclasses.replace(loop, step=step + 1, position=position), models, figures


def _histograms(exp: Experiment, roll: rollout.Rollout, adv) -> dict:
  """TensorBoard histograms of one rollout: completion lengths, advantages (per completion),
  rewards (weighted sum and each row)."""
  adv_N = np.asarray(adv).reshape(roll.tokens_NxC.shape[0], -1)
  arrays = {"completion_length": roll.mask_NxC.sum(-1),
            "advantage": adv_N.sum(-1) / np.maximum((adv_N != 0).sum(-1), 1)}
  if roll.scores_KxPxG.shape[0]:
    arrays["reward"] = rewards_lib.weighted_sum(exp.rewards.weights,
                                                roll.scores_KxPxG).reshape(-1)
    arrays.update({f"reward/{name}": roll.scores_KxPxG[k].reshape(-1)
                   for k, name in enumerate(exp.rewards.names)})
  return arrays


def _evaluate(exp: Experiment, writer, params, step: int) -> dict:
  t0 = time.perf_counter()
  result = evaluation.evaluate(exp, params, step, progress=metrics_lib.progress_callback("eval"))
  figures = dict(result.figures(), eval_s=time.perf_counter() - t0)
  writer.write(step, "grpo", figures)
  writer.write_samples(step, result.samples, phase="eval")
  if result.samples:
    writer.write_text(step, "grpo", {"eval/sample": metrics_lib.sample_text(result.samples[0])})
  metrics_lib.announce(f"eval @ grpo step {step}: "
                       + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
  return figures


def _outer_iteration(exp: Experiment, writer, models: Models, step: int) -> Models:
  """Iterative GRPO: (bootstrap and) retrain the RM, then reset the reference to the policy
  (except RFT's, which is the frozen sampling policy)."""
  rm_state, rm_data = models.rm_state, models.rm_data
  progress = metrics_lib.progress_callback("rm")
  if step == 0:
    rm_state, rm_data = iterative.bootstrap(exp, models.state.params, rm_data, progress)
  every = exp.settings.reward_model.iteration_steps
  rm_state, rm_data, figures = iterative.train(exp, rm_state, rm_data,
                                               step // every if every else 0, progress)
  writer.write(step, "rm", figures)
  metrics_lib.announce(f"reward model, iteration {figures['rm/iteration']}: "
                       + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
  ref = models.ref_params
  if step > 0 and ref is not None and exp.settings.rollout.paradigm.data != "frozen_policy":
    ref = experiment.reference_copy(exp, models.state.params)
  return dataclasses.replace(models, rm_state=rm_state, rm_data=rm_data, ref_params=ref)


def _warm_start(exp: Experiment):
  """The policy params of another run's last checkpoint (config.init_from)."""
  src = checkpointing.Checkpointer(str(paths.as_path(exp.settings.init_from) / "checkpoints"),
                                   read_only=True)
  params = jax.device_put(src.restore()[0]["state"]["params"], exp.state_sh["grpo"].params)
  src.close()
  metrics_lib.announce(f"initialised from {exp.settings.init_from}")
  return params
