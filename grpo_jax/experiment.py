"""Experiment set-up: everything built once per run, from frozen settings, as small frozen parts.

    exp = experiment.build(settings, workdir)
    exp.data      Data: task, tokenizer, encoded prompts, teacher targets, reward table, environment
    exp.device    Device: mesh, model configs, shardings, optimizers, the jitted `Programs`
    exp.keys      Keys: the named random streams

mesh -> task data -> tokenizer -> model -> reward rows -> optimizers and state shardings ->
jitted programs and samplers. Host functions take the parts and settings they read (e.g.
`rollout.collect(exp.data, sampler, settings.rollout, ...)`); only the loop holds `exp`.
Randomness: one base key; `exp.keys(Stream.X, step)` = fold_in(fold_in(base, X), step), so a
step's draws never depend on how many draws came before (exact resume).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from grpo_jax import buckets, distill, losses, models, multiturn, reward_table, samplers
from grpo_jax import sampling, sharding, slots, tasks, turn_programs, weights
from grpo_jax import train_step as ts
from grpo_jax.models import lora
from grpo_jax.rewards import reward_model as rm_lib
from grpo_jax.settings import Decoding, Settings


class Stream(enum.IntEnum):
  """The named random streams (the numbers are part of every saved run's results)."""
  INIT = 0          # random initial params
  ROLLOUT = 1       # GRPO sampling, folded with the step and the resample round
  EVAL_GREEDY = 2   # greedy evaluation (unused by argmax, kept for symmetry), with the batch
  EVAL_SAMPLES = 3  # pass@k / maj@k samples, folded with the step and the batch
  RM_BOOTSTRAP = 4  # the warm-start policy's samples that bootstrap the reward model
  RM_INIT = 5       # the reward model's head
  LORA_INIT = 6     # LoRA adapters (A random, B zero)
  COVARIANCE = 7    # Clip-Cov's draw of the tokens it restrains, folded with the step


@dataclasses.dataclass(frozen=True)
class Keys:
  """The run's random streams: `keys(Stream.X, step)`."""
  base: jax.Array

  def __call__(self, stream: Stream, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self.base, int(stream)), step)


class Phases(NamedTuple):
  """One thing per training phase: the SFT warm start, GRPO, the reward model (None if off)."""
  sft: Any
  grpo: Any
  rm: Any = None


class Teacher(NamedTuple):
  """The teacher's solutions (SFT warm start, the "sft" paradigm), row i for problem i."""
  prompts: tasks.Prompts
  targets: tasks.Targets


@dataclasses.dataclass(frozen=True)
class Data:
  """The host data side: what rollout, evaluation and the SFT steps read."""
  task: tasks.Task
  tokenizer: Any
  train_prompts: tasks.Prompts
  eval_prompts: tasks.Prompts
  teacher: Optional[Teacher]
  rewards: reward_table.Rewards
  eos_ids: tuple[int, ...]  # tokens that end a completion: the tokenizer's EOS + stop tokens
  env: Any = None  # multiturn.Environment with config.tools (else None)


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted device functions and samplers, each compiled once per shape."""
  objective: str            # what `policy_update` optimises: "grpo" | "sft" (weighted NLL)
  policy_update: Callable   # (TrainState, TrainBatch[, frozen]) -> (TrainState, metrics)
  logprobs: Callable        # (params, TrainBatch) -> [B, C]: the reference pass
  policy_logprobs: Callable  # (weights.update_params, TrainBatch) -> [B, C]: the old-policy
                             # pass, the update's forward (no LoRA: `logprobs` itself)
  sample_train: samplers.Sampler  # G per prompt (single-turn, or episodes with config.tools)
  sample_greedy: samplers.Sampler
  sample_eval_k: Optional[samplers.Sampler]
  sft_update: Optional[Callable]
  rm_update: Optional[Callable]
  rm_score: Optional[Callable]
  merge: Optional[Callable]  # LoRA: (base, adapters) -> merged params in compute dtype
  to_decode: Callable       # params -> compute dtype, decode layout (`weights.decode_params`)
  # grpo.length_bucket with micro-batches: the update and passes as pieces, each micro-batch
  # (rows of similar length) at its own width (buckets.bucketed_update)
  bucketed: Optional[buckets.BucketedPrograms] = None


@dataclasses.dataclass(frozen=True)
class Device:
  """The program side: mesh, model configs, shardings, optimizers, programs."""
  mesh: Mesh
  model_config: models.ModelConfig  # as trained (LoRA adapters if any)
  base_config: models.ModelConfig   # without LoRA: sampling, log-prob passes, SFT
  host_params: Any                  # loaded checkpoint params, or None for a random init
  params_sh: Any                    # shardings of the full (base) params tree
  decode_sh: Any                    # the sampler's layout of it (`weights.decode_params`)
  state_sh: Phases                  # TrainState shardings
  optimizers: Phases
  programs: Programs
  teacher: Any = None               # on-policy distillation: a `distill.Teacher`, else None

  @property
  def lora(self) -> bool:
    return bool(self.model_config.lora_rank)

  def shard(self, *arrays):
    return sharding.shard_batch(arrays, self.mesh)

  def num_params(self) -> int:
    shapes = jax.eval_shape(functools.partial(models.init_params, self.model_config),
                            jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@dataclasses.dataclass(frozen=True)
class Experiment:
  settings: Settings
  workdir: str
  data: Data
  device: Device
  keys: Keys


def tool_isolation(s: Settings, env) -> Optional[dict]:
  """The sandbox's `isolation()` report when the environment is the Python tool (None
  otherwise); raises sandbox.SandboxError where it cannot confine the code, unless
  config.tools.allow_unisolated."""
  from grpo_jax import python_tool, sandbox_isolation  # pylint: disable=import-outside-toplevel
  if not isinstance(env, python_tool.PythonTool):
    return None
  allow = s.tools is not None and s.tools.allow_unisolated
  return sandbox_isolation.require_isolation(allow_unisolated=allow,
                                             hidden_paths=env.hidden_paths)


def build(s: Settings, workdir: str, reward_fns: Optional[Mapping[str, Callable]] = None,
          env=None) -> Experiment:
  """Every input error is raised here, before anything compiles."""
  mesh = sharding.make_mesh(*s.mesh, devices=split_devices(s.rollout_devices)[1])
  task = tasks.load_task(s)
  env = tasks.make_env(s, env, workdir)
  tool_isolation(s, env)  # before any compile: model-written code must be confined
  rewards = reward_table.reward_functions(s.rollout, s.reward_model, reward_fns)
  reward_table.check_rewards(rewards, task, s.rollout, env)  # your functions fail here, not mid-run
  if env is not None:  # a malformed environment fails here, before anything compiles
    multiturn.check_environment(env)
  tokenizer = tasks.build_tokenizer(s, workdir, task)
  encode = functools.partial(tasks.encode_prompts, tokenizer, task, r=s.rollout)
  teacher = None
  if s.sft_steps or s.rollout.paradigm.data == "teacher":
    teacher = Teacher(encode(task.sft), tasks.encode_targets(
        tokenizer, task.sft, s.rollout.max_completion_length + 1, env))
  data = Data(task=task, tokenizer=tokenizer, train_prompts=encode(task.train),
              eval_prompts=encode(task.eval), teacher=teacher, rewards=rewards, env=env,
              eos_ids=(tokenizer.eos_id,) + tasks.stop_token_ids(tokenizer, s.rollout.stop_tokens))
  keys = Keys(jax.random.key(s.seed))
  model_config, host_params = tasks.build_model(s, tokenizer)
  device = make_device(s, mesh, data, model_config, host_params, keys)
  if s.distill_teacher:  # its weights read now: a bad teacher fails before any compile
    device = dataclasses.replace(device, teacher=distill.load(s, mesh, tokenizer.vocab_size))
  return Experiment(settings=s, workdir=workdir, data=data, device=device, keys=keys)


def make_device(s: Settings, mesh: Mesh, data: Data, model_config: models.ModelConfig,
                host_params, keys: Keys) -> Device:
  """Optimizers, shardings (shapes from eval_shape) and the programs of `model_config`;
  `host_params`: loaded weights or None (tools.memory_plan: abstract only, no data read)."""
  base_config = lora.base_config(model_config)
  shapes = lambda c: jax.eval_shape(functools.partial(models.init_params, c), keys.base)  # noqa: E731
  params_shapes = shapes(base_config)
  trained_shapes = lora.split(shapes(model_config))[0] if model_config.lora_rank else params_shapes
  rm_on = s.reward_model.enabled
  optimizers = Phases(ts.make_optimizer(s.sft.optim), ts.make_optimizer(s.grpo.optim),
                      ts.make_optimizer(s.reward_model.optim) if rm_on else None)
  rm_sh = None
  if rm_on:
    rm_shapes = jax.eval_shape(lambda r: rm_lib.init_reward_model(base_config, r), keys.base)
    rm_sh = rm_lib.rm_state_shardings(mesh, base_config, optimizers.rm, rm_shapes)
  state_sh = Phases(ts.state_shardings(mesh, base_config, optimizers.sft, params_shapes),
                    ts.state_shardings(mesh, model_config, optimizers.grpo, trained_shapes), rm_sh)
  params_sh = state_sh.sft.params
  sample_mesh = rollout_mesh(s) or mesh
  decode_sh = _decode_shardings(s, sample_mesh, base_config, params_sh, params_shapes)
  programs = _programs(s, mesh, sample_mesh, data, model_config, optimizers, state_sh,
                       decode_sh)
  return Device(mesh=mesh, model_config=model_config, base_config=base_config,
                host_params=host_params, params_sh=params_sh, decode_sh=decode_sh,
                state_sh=state_sh, optimizers=optimizers, programs=programs)


def split_devices(n: int) -> tuple[list, list]:
  """(the samplers' devices, the training devices): the first n / P local devices of each of
  the P processes, process by process, and the rest (n = 0: none, and all)."""
  local = n // jax.process_count()
  by_process = [[d for d in jax.devices() if d.process_index == p]
                for p in range(jax.process_count())]
  return ([d for ds in by_process for d in ds[:local]],
          [d for ds in by_process for d in ds[local:]])


def rollout_mesh(s: Settings) -> Optional[Mesh]:
  """config.mesh.rollout_devices = n: the samplers' own mesh, data-parallel over their n
  devices (`split_devices`; the training mesh has the rest); None: they share it."""
  n = s.rollout_devices
  return sharding.make_mesh(n, 1, 1, devices=split_devices(n)[0]) if n else None


def _decode_shardings(s: Settings, mesh, config, params_sh, params_shapes):
  """The sampler's parameter layout (config.mesh.decode_layout): "training" = the update's
  (fsdp-split), "replicated" = whole over the batch axes, split over "tensor" only; "auto" =
  replicated when the compute-dtype weights take at most a quarter of a device's memory (or
  the device does not say, as a CPU)."""
  layout = s.decode_layout
  if layout == "auto":
    tensor = mesh.shape["tensor"]
    weight_bytes = sum(math.prod(x.shape) for x in jax.tree.leaves(params_shapes)) * (
        jnp.dtype(config.dtype).itemsize) / tensor
    # a local device: another process's cannot say (every process decides alike)
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    layout = "replicated" if not limit or weight_bytes <= limit / 4 else "training"
  if layout == "training" and jax.tree.leaves(params_sh)[0].mesh == mesh:
    return params_sh  # (the samplers' own mesh holds whole weights: the rules below)
  return sharding.tree_shardings(mesh, models.param_logical_axes(config), params_shapes,
                                 rules=sharding.DECODE_RULES)


def _programs(s: Settings, mesh, sample_mesh, data: Data, train_config, optimizers: Phases,
              state_sh: Phases, decode_sh) -> Programs:
  r, g = s.rollout, s.grpo
  model_config = lora.base_config(train_config)
  lora_on = bool(train_config.lora_rank)
  params_sh = state_sh.sft.params
  # The paradigm's objective: the GRPO loss, or the per-sequence NLL weighted by the gradient
  # coefficient (DeepSeekMath eq. 5) for SFT / RFT / Online RFT.
  loss_cfg = g.loss if r.paradigm.objective == "grpo" else losses.LossConfig(
      objective="sft", loss_type="grpo", temperature=g.loss.temperature)
  policy_update = ts.make_update_fn(mesh, state_sh.grpo, model_config=train_config,
                                    optimizer=optimizers.grpo, loss_cfg=loss_cfg,
                                    num_microbatches=g.num_microbatches,
                                    frozen_sh=params_sh if lora_on else None)
  logprobs = ts.make_logprob_fn(mesh, params_sh, model_config=model_config,
                                temperature=g.loss.temperature,
                                num_microbatches=g.num_microbatches)
  policy_logprobs = logprobs if not lora_on else ts.make_logprob_fn(
      mesh, ts.update_params(state_sh.grpo.params, params_sh), model_config=train_config,
      temperature=g.loss.temperature, num_microbatches=g.num_microbatches)
  sft_update = None
  if s.sft_steps:
    sft_update = ts.make_update_fn(
        mesh, state_sh.sft, model_config=model_config, optimizer=optimizers.sft,
        loss_cfg=losses.LossConfig(objective="sft", loss_type="dapo"),
        num_microbatches=s.sft.num_microbatches)
  rm_update = rm_score = None
  if s.reward_model.enabled:
    kind = s.reward_model.kind
    rm_update = rm_lib.make_rm_update_fn(mesh, state_sh.rm, model_config=model_config,
                                         optimizer=optimizers.rm, kind=kind)
    rm_score = rm_lib.make_rm_scorer(mesh, state_sh.rm.params, model_config=model_config,
                                     kind=kind)
  bucketed = None
  if g.length_bucket and g.num_microbatches > 1:
    bucketed = buckets.make_bucketed_programs(
        mesh, state_sh.grpo, params_sh, model_config=train_config, optimizer=optimizers.grpo,
        loss_cfg=loss_cfg, frozen_sh=params_sh if lora_on else None, base_config=model_config)
  sampler = functools.partial(_sampler, s, sample_mesh, data, model_config)
  e = s.eval
  return Programs(
      objective=loss_cfg.objective, bucketed=bucketed,
      policy_update=policy_update, logprobs=logprobs, policy_logprobs=policy_logprobs,
      sample_train=sampler(r.decoding, r.num_samples, inflight=g.inflight_after),
      sample_greedy=sampler(Decoding(0.0), 1),
      sample_eval_k=sampler(e.decoding, e.k) if e.k > 1 else None,
      sft_update=sft_update, rm_update=rm_update, rm_score=rm_score,
      merge=_merge_program(train_config, params_sh, state_sh.grpo.params) if lora_on else None,
      to_decode=_to_decode(model_config, params_sh, decode_sh, sample_mesh is not mesh))


def _to_decode(config, params_sh, decode_sh, apart: bool) -> Callable:
  """params -> the compute dtype in the sampler's layout: one jitted cast and reshard; with
  the samplers on their own devices (`apart`), the cast on the training mesh, then a
  device-to-device copy onto the samplers' (no host round trip). Several processes: JAX
  moves arrays between device sets within a process only, so the cast gathers the weights
  whole on the training devices and each process copies them to its own sampler devices."""
  cast = functools.partial(weights.cast, dtype=jnp.dtype(config.dtype))
  if not apart:
    return jax.jit(cast, out_shardings=decode_sh)
  if jax.process_count() == 1:
    cast = jax.jit(cast, out_shardings=params_sh)
    return lambda params: jax.device_put(cast(params), decode_sh)
  mesh = jax.tree.leaves(params_sh)[0].mesh
  whole = jax.jit(cast, out_shardings=sharding.replicated(mesh))

  def local_copies(x, sh):  # the sampler layout is whole on every sampler device
    src = x.addressable_shards[0].data
    return jax.make_array_from_single_device_arrays(
        x.shape, sh, [jax.device_put(src, d) for d in sh.addressable_devices_indices_map(
            x.shape)])

  return lambda params: jax.tree.map(local_copies, whole(params), decode_sh)


def _sampler(s: Settings, mesh, data: Data, model_config, d: Decoding, num_samples: int,
             inflight: int = 0) -> samplers.Sampler:
  """G = `num_samples` completions per prompt with decoding `d`: single-turn (`inflight` > 0:
  with the halves of an in-flight weight update after that many decode steps), or episodes
  with the run's environment (config.tools)."""
  tokenizer = data.tokenizer
  settings = sampling.SamplingSettings(
      num_samples=num_samples, max_new_tokens=s.rollout.max_completion_length + 1,
      temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p,
      eos_ids=data.eos_ids, pad_id=tokenizer.pad_id,
      continuous=s.rollout.batching == "continuous", decode_slots=s.rollout.decode_slots)
  if data.env is None:
    return samplers.SingleTurn(
        sampling.make_sampler(model_config, settings, mesh), mesh, num_samples,
        slots.make_inflight(model_config, settings, inflight, mesh) if inflight else None)
  t = s.tools
  programs = turn_programs.make_programs(model_config, turn_programs.TurnSettings(
      sampling=settings, stop_seqs=multiturn.stop_sequences(tokenizer, data.env.stop_strings),
      max_turns=t.max_turns, slots=t.slots or 2 * settings.max_new_tokens,
      max_observation_tokens=t.max_observation_tokens))
  return samplers.MultiTurn(programs, mesh, num_samples, data.env, tokenizer, t.max_workers)


def _merge_program(config, params_sh, adapters_sh):
  dtype = jnp.dtype(config.dtype)

  def merge(base, adapters):
    merged, _ = lora.merge(lora.combine(base, adapters), config)
    return weights.cast(merged, dtype)

  return jax.jit(merge, in_shardings=(params_sh, adapters_sh), out_shardings=params_sh)


def init_state(device: Device, keys: Keys, phase: str, params=None) -> ts.TrainState:
  """A fresh TrainState of `phase` ("sft" | "grpo") built in its shards: from `params`, else
  the loaded checkpoint, else a random init from Stream.INIT. With LoRA, GRPO's state holds
  fresh adapters (Stream.LORA_INIT) and their optimiser state; the base is `lora_base`."""
  optimizer, sh = getattr(device.optimizers, phase), getattr(device.state_sh, phase)
  if phase == "grpo" and device.lora:
    init = lambda r: ts.init_train_state(  # noqa: E731
        lora.split(models.init_params(device.model_config, r))[0], optimizer)
    return jax.jit(init, out_shardings=sh)(keys(Stream.LORA_INIT, 0))
  if params is None and device.host_params is None:
    init = lambda r: ts.init_train_state(  # noqa: E731
        models.init_params(device.base_config, r), optimizer)
    return jax.jit(init, out_shardings=sh)(keys(Stream.INIT, 0))
  if params is None:
    params = jax.device_put(device.host_params, sh.params)
  return jax.jit(functools.partial(ts.init_train_state, optimizer=optimizer),
                 out_shardings=sh)(params)


def initial_params(device: Device, keys: Keys, params=None):
  """The full params tree on the mesh: `params`, else the loaded checkpoint, else a random
  init (Stream.INIT)."""
  if params is None and device.host_params is None:
    return jax.jit(functools.partial(models.init_params, device.base_config),
                   out_shardings=device.params_sh)(keys(Stream.INIT, 0))
  if params is None:
    return jax.device_put(device.host_params, device.params_sh)
  return params


def abstract_state(device: Device, keys: Keys, phase: str) -> ts.TrainState:
  """Shapes, dtypes and shardings of `phase`'s TrainState: a restore target."""
  shapes = jax.eval_shape(lambda: init_state(device, keys, phase))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, getattr(device.state_sh, phase))


def abstract_rm_state(device: Device, keys: Keys) -> ts.TrainState:
  shapes = jax.eval_shape(lambda: ts.init_train_state(
      rm_lib.init_reward_model(device.base_config, keys.base), device.optimizers.rm))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, device.state_sh.rm)
