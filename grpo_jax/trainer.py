"""The GRPO experiment loop: an optional SFT warm start, then GRPO with evaluation and checkpoints.

    trainer.train(config, workdir)      # settings -> experiment.build -> run

One GRPO step (DeepSeekMath Algorithm 1, inner loop), `grpo_step`, in four labelled blocks:

    roll, position = rollout.collect(data, sampler, r, params, position, key)  # 1. sample + score
    adv = rollout.coefficients(roll, r, rewards.weights)                       # 2. advantages
    ready = updates.with_logprobs(device, g, params, reference, batch)         # 3. log-prob passes
    state, figures = updates.update(device, g, state, ready, frozen)           # 4. mu updates

(spelled with host / device overlap: the passes start before the host decodes and scores, the
update before the step's host bookkeeping). With grpo.max_staleness = k > 0, `stale_step` runs
blocks 3-4 on the rollout sampled k steps earlier while 1-2 make the one of step + k (with
grpo.inflight_after, its samples switching to the update's weights as they decode). Host state
is typed and checkpointed with the device state (`runstate`). Every draw is
`fold_in(named stream key, step)`, so a killed run resumes to exactly the metrics of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from grpo_jax import checkpointing, distill, evaluation, experiment, iterative, metrics, paths
from grpo_jax import preemption, process, progress, rollout, runstate, samplers, staleness
from grpo_jax import updates, weights
from grpo_jax import settings as settings_lib
from grpo_jax.data import iterator
from grpo_jax.experiment import Experiment, Stream
from grpo_jax.runstate import LoopState, Models
from grpo_jax.train_step import TrainBatch


class StepOutput(NamedTuple):
  """What one GRPO step reports: scalar figures, samples.jsonl rows, histograms."""
  figures: dict
  samples: list
  arrays: dict


def train(cfg: ml_collections.ConfigDict, workdir: str,
          reward_fns: Optional[Mapping[str, Callable]] = None, env=None) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last eval figures.

  `reward_fns`: your reward functions by name, `fn(completions=..., prompts=..., **columns)`
  (the weight is config.grpo.rewards.<name>, 1.0 if absent); config.grpo.reward_fns names them
  by import path instead. `env`: a `multiturn.Environment` for tool-integrated rollouts (with
  config.tools.env set; "python" builds the sandboxed Python tool). Pass both again to resume.
  """
  process.limit_malloc_arenas()
  process.enable_compile_cache()
  s = settings_lib.from_config(cfg, jax.device_count())
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  exp = experiment.build(s, workdir, reward_fns, env)  # every input error is raised here
  if jax.process_index() == 0:
    (paths.as_path(workdir) / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  return run(exp)


def run(exp: Experiment) -> dict:
  """Resume, then the SFT and GRPO phases that remain; the metrics writer and the checkpointer
  close either way (a failing run still finishes its pending asynchronous save)."""
  s, device = exp.settings, exp.device
  runstate.record_run(exp)
  ckpt = checkpointing.Checkpointer(str(paths.as_path(exp.workdir) / "checkpoints"),
                                    keep=s.checkpoint_keep)
  try:
    with preemption.Watcher() as watcher:  # SIGTERM / SIGINT: stop at a step, checkpoint
      loop, models = runstate.resume(exp, ckpt)
      writer = metrics.MetricsWriter(exp.workdir, enabled=jax.process_index() == 0,
                                     truncate_to=loop.metrics_lines if loop else 0,
                                     wandb=s.wandb)
      try:
        if loop is None or loop.phase == "sft":
          loop, models = sft_phase(exp, ckpt, writer, loop, models, watcher)
        final, models = grpo_phase(exp, ckpt, writer, loop, models, watcher)
        if device.lora:
          runstate.export_lora(exp, models)
      finally:
        writer.close()
  finally:
    ckpt.close()
  programs = device.programs
  logging.info("compiles: update %d, sampler %d",
               programs.policy_update._cache_size(),  # pylint: disable=protected-access
               programs.sample_train.compiles())
  return final


# ----------------------------------------------------------------------------- SFT warm start


def sft_phase(exp: Experiment, ckpt, writer, loop: Optional[LoopState], models: Models,
              watcher: preemption.Watcher) -> tuple[LoopState, Models]:
  """SFT on the teacher's solutions (skipped with init_from), then the GRPO start: a fresh
  optimizer, and the reference = the warm-started policy."""
  s = exp.settings
  if not s.sft_steps:
    return LoopState("grpo", 0, iterator.Position(0, 0, s.seed + 1)), models
  loop = loop or LoopState("sft", 0, iterator.Position(0, 0, s.seed))
  state = models.state or experiment.init_state(exp.device, exp.keys, "sft")
  prompts, targets = exp.data.teacher
  with progress.Progress(s.sft_steps, "sft", every=s.log_every) as bar:
    t_last, step_last = time.perf_counter(), loop.step
    for step in range(loop.step, s.sft_steps):
      idx, position = iterator.next_indices(loop.position, len(exp.data.task.sft),
                                            s.sft.batch_size)
      loop = dataclasses.replace(loop, step=step + 1, position=position)
      batch = TrainBatch(prompts.ids_NxL[idx], prompts.mask_NxL[idx], targets.ids_NxC[idx],
                         targets.mask_NxC[idx], np.ones(len(idx), np.float32))
      batch = updates.trim(batch, updates.bucket_width(batch.completion_mask,
                                                       s.grpo.length_bucket))
      state, m = exp.device.programs.sft_update(state, exp.device.shard(batch)[0])
      if (step + 1) % s.log_every == 0 or step + 1 == s.sft_steps:
        figures = {k: float(v) for k, v in jax.device_get(m).items()}  # waits for queued steps
        now = time.perf_counter()
        figures["update_s"] = (now - t_last) / (step + 1 - step_last)
        t_last, step_last = now, step + 1
        writer.write(step + 1, "sft", figures)
        bar.update(step + 1, nll=figures["nll"], update_s=figures["update_s"])
      loop = _checkpoint(exp, ckpt, writer, loop, Models(state), watcher, step + 1, s.sft_steps)
  models = runstate.initial_grpo_models(exp, params=state.params)
  loop = runstate.save(ckpt, writer, LoopState("grpo", 0, iterator.Position(0, 0, s.seed + 1)),
                       models, s)
  return loop, models


def _checkpoint(exp: Experiment, ckpt, writer, loop: LoopState, models: Models,
                watcher: preemption.Watcher, done: int, total: int) -> LoopState:
  """After step `done` of a phase of `total`: a checkpoint every config.checkpoint.every steps,
  at the phase's end (GRPO; SFT's end is GRPO's start) and when a stop was requested, which then
  raises Preempted."""
  s = exp.settings
  stop = watcher.stop_requested(done) and done < total
  last = done == total and loop.phase == "grpo"
  if stop or last or (s.checkpoint_every and done % s.checkpoint_every == 0 and (
      done < total or loop.phase == "grpo")):
    loop = runstate.save(ckpt, writer, loop, models, s)
  if stop:
    raise preemption.Preempted((s.sft_steps if loop.phase == "grpo" else 0) + done,
                               ckpt.directory)
  return loop


# ----------------------------------------------------------------------------- GRPO


def grpo_phase(exp: Experiment, ckpt, writer, loop: LoopState, models: Models,
               watcher: preemption.Watcher) -> tuple[dict, Models]:
  """GRPO steps with evaluation at step 0, every eval.every steps and at the end, and the
  reward model's outer iterations (iterative GRPO) when due."""
  s = exp.settings
  if models.state is None:
    params = runstate.warm_start(exp) if s.init_from else None
    models = runstate.initial_grpo_models(exp, params=params)
  nan_streak, last_eval = 0, {}
  with progress.Progress(s.grpo.steps, "grpo", every=s.log_every) as bar:
    for step in range(loop.step, s.grpo.steps + 1):
      if step == 0 or step == s.grpo.steps or (s.eval.every and step % s.eval.every == 0):
        last_eval = _evaluate(exp, writer, models, step)
      if step == s.grpo.steps:
        break
      if iterative.iteration_due(s.reward_model, step):
        models = _outer_iteration(exp, writer, models, step)
      with process.profiled(s.profile_steps, exp.workdir, step + 1):
        loop, models, out = grpo_step(exp, loop, models, step)
      nan_streak = nan_streak + 1 if out.figures["skipped"] else 0
      if nan_streak >= s.max_nonfinite_streak:
        raise FloatingPointError(
            f"{nan_streak} consecutive GRPO steps had a non-finite loss or gradient (last at "
            f"step {step + 1}); stopping. Metrics are in {exp.workdir}/metrics.jsonl, the last "
            f"good checkpoint in {ckpt.directory}")
      _log_step(writer, bar, step + 1, out, last_eval, s.log_every)
      loop = _checkpoint(exp, ckpt, writer, loop, models, watcher, step + 1, s.grpo.steps)
  ckpt.wait()
  return last_eval, models


def grpo_step(exp: Experiment, loop: LoopState, models: Models,
              step: int) -> tuple[LoopState, Models, StepOutput]:
  """rollout -> advantages -> log-prob passes -> update; the reference follows the policy.

  Host and device overlap: the log-prob passes are queued as soon as the tokens are on the host
  (`collect(start=...)`), so they run while the host decodes and scores; the update is queued
  before the step's host bookkeeping, and its metrics are read last. `wait_s`: how long the
  host then waited for the device; `step_s`: the whole step."""
  if exp.settings.grpo.max_staleness:
    return stale_step(exp, loop, models, step)
  s, data, device = exp.settings, exp.data, exp.device
  r, g = s.rollout, s.grpo
  t_step = time.perf_counter()
  # 1. Rollout: the policy in the compute dtype (LoRA merged) and the sampler's layout, made
  #    once; the old-policy pass reads the update's own weights, so the ratio starts at 1.
  start = functools.partial(updates.start_logprobs, device, g,
                            weights.update_params(models.state, models.base), models.reference)
  roll, position = rollout.collect(
      data, device.programs.sample_train, r, _sampling_params(exp, models), loop.position,
      exp.keys(Stream.ROLLOUT, step), rm=iterative.rm_scorer(device, models.rm_state),
      start=start)
  # 2. Advantages (the paradigm's gradient coefficient).
  adv, roll = _coefficients(exp, roll)
  # 3. Log-prob passes: started on the tokens, unless the rows were chosen after scoring.
  t0 = time.perf_counter()
  started = roll.started or start(
      rollout.train_batch(roll, adv, mask_truncated=r.mask_truncated_completions))
  ready = updates.finish(device, started, adv, loss=g.loss, key=exp.keys(Stream.COVARIANCE, step))
  del start, started
  roll = dataclasses.replace(roll, started=None)
  # 4. The mu updates, queued; the step's host work runs while the device updates.
  state, step_metrics = updates.dispatch_update(device, g, models.state, ready,
                                                frozen=models.base)
  del ready
  out = StepOutput({}, rollout.samples(data.tokenizer, roll, adv),
                   rollout.histograms(roll, data.rewards.names, adv))
  rm_data = (models.rm_data.add(rollout.rm_examples(roll, prm=s.reward_model.kind == "prm"))
             if s.reward_model.enabled else models.rm_data)
  t_wait = time.perf_counter()
  figures = {**updates.aggregate(jax.device_get(step_metrics)), **roll.figures}
  now = time.perf_counter()
  figures.update(update_s=now - t0, wait_s=now - t_wait, step_s=now - t_step)
  models = dataclasses.replace(
      models, state=state, rm_data=rm_data,
      ref_params=updates.next_reference(device, g, models.ref_params, state.params, step + 1))
  loop = dataclasses.replace(loop, step=step + 1, position=position)
  return loop, models, out._replace(figures=figures)


def stale_step(exp: Experiment, loop: LoopState, models: Models,
               step: int) -> tuple[LoopState, Models, StepOutput]:
  """`grpo_step` on a rollout sampled k = grpo.max_staleness steps earlier (staleness.py):
  sample the rollout of step + k with this policy; once its tokens are on the host, queue the
  oldest rollout's log-prob passes and update; score the new one while the device updates."""
  s, device, k = exp.settings, exp.device, exp.settings.grpo.max_staleness
  t_step = time.perf_counter()
  queue, dropped = staleness.drop_stale(models.rollouts, step, k)
  position = loop.position
  inflight = bool(s.grpo.inflight_after)
  while len(queue) < min(k, s.grpo.steps - step):  # the first steps, or after drops
    params = _sampling_params(exp, models)  # (in-flight: no update to switch to)
    pending, position, _ = _sample_ahead(exp, samplers.Swap(params, lambda p=params: p)
                                         if inflight else params, position, step,
                                         staleness.next_index(queue, step))
    queue += (pending,)
  index = staleness.next_index(queue, step)  # the rollout sampled during this step's update
  head, queue, t0 = queue[0], queue[1:], []

  def update(_=None):  # the oldest rollout's passes and mu updates, queued on the device
    t0.append(time.perf_counter())
    ready = updates.finish(device, updates.start_logprobs(
        device, s.grpo, weights.update_params(models.state, models.base), models.reference,
        head.batch), head.batch.advantages, loss=s.grpo.loss,
        key=exp.keys(Stream.COVARIANCE, step))
    return updates.dispatch_update(device, s.grpo, models.state, ready, frozen=models.base)

  ahead = len(queue) < min(k, s.grpo.steps - step - 1)  # sample step + k's rollout
  params = _sampling_params(exp, models) if ahead else None  # copied before the donation
  # The samplers on their own devices: the update first, both run at once. Sharing the mesh:
  # the update once the new rollout's tokens are on the host, while the host scores them.
  apart = device.programs.sample_train.mesh is not device.mesh
  dispatched = [update()] if apart else []
  if ahead and inflight:  # the update queued after the first decode steps, its weights after
    def then():
      if not dispatched:
        dispatched.append(update())
      return _sampling_params(exp, dataclasses.replace(models, state=dispatched[0][0]))
    params = samplers.Swap(params, then)
  if ahead:
    pending, position, started = _sample_ahead(exp, params, position, step, index,
                                                None if apart or inflight else update,
                                                updated=inflight)
    dispatched, queue = dispatched or [started] * (started is not None), queue + (pending,)
  state, step_metrics = dispatched[0] if dispatched else update()
  t_wait = time.perf_counter()
  figures = {**updates.aggregate(jax.device_get(step_metrics)),
             **staleness.figures(step, head, dropped)}
  now = time.perf_counter()
  figures.update(update_s=now - t0[0], wait_s=now - t_wait, step_s=now - t_step)
  arrays = dict(head.arrays, staleness=np.full(len(head.batch.advantages),
                                               staleness.staleness(step, head), np.float32))
  models = dataclasses.replace(
      models, state=state, rollouts=queue,
      ref_params=updates.next_reference(device, s.grpo, models.ref_params, state.params,
                                        step + 1))
  loop = dataclasses.replace(loop, step=step + 1, position=position)
  return loop, models, StepOutput(figures, head.samples, arrays)


def _sample_ahead(exp: Experiment, params, position, version: int, index: int,
                  start=None, updated: bool = False
                  ) -> tuple[staleness.Pending, iterator.Position, object]:
  """Rollout `index` (its key), sampled by policy `version` (`params`, `_sampling_params`; a
  `samplers.Swap` for in-flight updates, to version + 1 when `updated`), scored, as a
  `staleness.Pending`; `start` runs when its tokens are on the host (`rollout.collect`) and its
  result comes back third."""
  s, data = exp.settings, exp.data
  roll, position = rollout.collect(
      data, exp.device.programs.sample_train, s.rollout, params, position,
      exp.keys(Stream.ROLLOUT, index), start=start)
  if roll.versions_NxC is not None:  # the tokens the update's weights drew
    roll = dataclasses.replace(roll, figures={**roll.figures, "inflight/updated_tokens": (
        staleness.updated_fraction(roll.versions_NxC, roll.mask_NxC) if updated else 0.0)})
  adv, roll = _coefficients(exp, roll)
  batch = rollout.train_batch(roll, adv, mask_truncated=s.rollout.mask_truncated_completions)
  pending = staleness.Pending(batch, version, index, roll.figures,
                              rollout.samples(data.tokenizer, roll, adv),
                              rollout.histograms(roll, data.rewards.names, adv))
  return pending, position, roll.started


def _coefficients(exp: Experiment, roll: rollout.Rollout):
  """The paradigm's advantages of `roll` (`rollout.coefficients`); for on-policy distillation
  the teacher's log-prob pass over its tokens first (distill.py), its figure added to the
  rollout's."""
  device = exp.device
  if device.teacher is None:
    return rollout.coefficients(roll, exp.settings.rollout, exp.data.rewards.weights), roll
  tokens = rollout.train_batch(roll, np.zeros(len(roll.mask_NxC)), mask_truncated=False)
  teacher_lp = device.teacher(device.shard(tokens.replace(sampler_logprobs=None))[0])
  adv = distill.advantages(teacher_lp, roll.sampler_logprobs_NxC, roll.mask_NxC)
  return adv, dataclasses.replace(roll, figures={**roll.figures,
                                                 **distill.figures(adv, roll.mask_NxC)})


def _sampling_params(exp: Experiment, models: Models):
  """What the paradigm samples from, in the sampler's layout: the live policy, or RFT's frozen
  warm start (the reference slot); nothing for teacher data."""
  data_source = exp.settings.rollout.paradigm.data
  if data_source == "teacher":
    return None
  params = (models.reference if data_source == "frozen_policy"
            else weights.policy_params(exp.device, models.state, models.base))
  return weights.decode_params(exp.device, params)


def _log_step(writer, bar, step: int, out: StepOutput, last_eval: dict, log_every: int) -> None:
  """metrics.jsonl every step; samples, histograms and a sample's text every log_every steps
  (no-ops off process 0); the progress line."""
  f = out.figures
  writer.write(step, "grpo", f)
  if step % log_every == 0:
    writer.write_samples(step, out.samples, phase="grpo")
    writer.write_histograms(step, "grpo", out.arrays)
    if out.samples:
      writer.write_text(step, "grpo", {"sample": metrics.sample_text(out.samples[0])})
  shown = dict(reward=f.get("reward"), nll=f.get("nll"), acc=last_eval.get("eval/accuracy"),
               kl=f.get("kl"), clip=f.get("clip_frac"), len=f.get("completion_length"),
               tools=f.get("episode/tool_calls"), tool_s=f.get("episode/tool_s"),
               sample_s=f["sample_s"], score_s=f["score_s"], update_s=f["update_s"],
               tok_per_s=f["tok_per_s"])
  bar.update(step, **{k: v for k, v in shown.items() if v is not None})


def _evaluate(exp: Experiment, writer, models: Models, step: int) -> dict:
  t0 = time.perf_counter()
  params = weights.decode_params(exp.device, weights.policy_params(exp.device, models.state,
                                                                   models.base))
  result = evaluation.evaluate(exp.data, exp.device.programs, exp.settings.eval, params,
                               exp.keys, step, progress=progress.progress_callback("eval"))
  figures = dict(result.figures(), eval_s=time.perf_counter() - t0)
  writer.write(step, "grpo", figures)
  writer.write_samples(step, result.samples, phase="eval")
  if result.samples:
    writer.write_text(step, "grpo", {"eval/sample": metrics.sample_text(result.samples[0])})
  progress.announce(f"eval @ grpo step {step}: "
                    + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
  return figures


def _outer_iteration(exp: Experiment, writer, models: Models, step: int) -> Models:
  """Iterative GRPO: (bootstrap and) retrain the RM, then reset the reference to the policy
  (except RFT's, which is the frozen sampling policy)."""
  s, device = exp.settings, exp.device
  rm_state, rm_data = models.rm_state, models.rm_data
  callback = progress.progress_callback("rm")
  if step == 0:
    rm_state, rm_data = iterative.bootstrap(exp.data, device, s.rollout, s.reward_model, s.seed,
                                            exp.keys, models.state.params, rm_data, callback)
  every = s.reward_model.iteration_steps
  rm_state, rm_data, figures = iterative.train(device, s.reward_model, s.seed, rm_state,
                                               rm_data, step // every if every else 0, callback)
  writer.write(step, "rm", figures)
  progress.announce(f"reward model, iteration {figures['rm/iteration']}: "
                    + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
  ref = models.ref_params
  if step > 0 and ref is not None and s.rollout.paradigm.data != "frozen_policy":
    ref = weights.reference_copy(device, models.state.params, ema=bool(s.grpo.ref_ema))
  return dataclasses.replace(models, rm_state=rm_state, rm_data=rm_data, ref_params=ref)
