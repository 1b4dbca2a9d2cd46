"""Experiment set-up: everything built once per run, from frozen settings.

    exp = experiment.build(settings, workdir)

mesh -> task data -> tokenizer -> model -> reward rows -> optimizers and state shardings ->
jitted programs (update steps, log-prob pass, samplers, reward model). The result is a frozen
`Experiment` that rollout, evaluation, updates and the loop read; none of them reads the config.
Randomness: one base key; `exp.key(Stream.X, step)` = fold_in(fold_in(base, X), step), so a
step's draws never depend on how many draws came before (exact resume).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from grpo_jax import losses, models, multiturn, sampling, sharding, tasks
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


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted device functions, each compiled once per run (shapes are fixed)."""
  policy_update: Callable   # (TrainState, TrainBatch) -> (TrainState, metrics); the paradigm's
  logprobs: Callable        # (params, TrainBatch) -> [B, C]: the reference pass
  policy_logprobs: Callable  # (updates.update_params, TrainBatch) -> [B, C]: the old-policy
                             # pass, the update's forward (no LoRA: `logprobs` itself)
  sample_train: Callable    # (params, ids, mask, key) -> SampleOutput, G per prompt; with
                            # config.tools a multiturn.Programs (start / decode / inject)
  sample_greedy: Callable
  sample_eval_k: Optional[Callable]
  sft_update: Optional[Callable]
  rm_update: Optional[Callable]
  rm_score: Optional[Callable]
  merge: Optional[Callable]  # LoRA: (base, adapters) -> merged params in compute dtype
  to_decode: Callable       # params -> compute dtype, decode layout (`decode_params`)
  # grpo.length_bucket with micro-batches: the update and passes as pieces, each micro-batch
  # (rows of similar length) at its own width (train_step.bucketed_update)
  bucketed: Optional[ts.BucketedPrograms] = None


@dataclasses.dataclass(frozen=True)
class Experiment:
  settings: Settings
  workdir: str
  mesh: Mesh
  task: tasks.Task
  tokenizer: Any
  train_prompts: tasks.Prompts
  eval_prompts: tasks.Prompts
  teacher: Optional[tuple[tasks.Prompts, tasks.Targets]]  # SFT warm start / "sft" paradigm
  model_config: models.ModelConfig
  host_params: Any  # loaded checkpoint params, or None for a random init
  rewards: tasks.Rewards
  eos_ids: tuple[int, ...]
  optimizers: dict[str, optax.GradientTransformation]  # "sft", "grpo", "rm"
  state_sh: dict[str, ts.TrainState]                     # shardings, same keys
  programs: Programs
  base_key: jax.Array
  base_config: models.ModelConfig  # model_config without LoRA: sampling, log-prob passes, SFT
  params_sh: Any                   # shardings of the full (base) params tree
  decode_sh: Any                   # the sampler's layout of it (see `decode_params`)
  env: Any = None                  # multiturn.Environment with config.tools (else None)

  @property
  def lora(self) -> bool:
    return bool(self.model_config.lora_rank)

  def key(self, stream: Stream, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self.base_key, int(stream)), step)

  def shard(self, *arrays):
    return sharding.shard_batch(arrays, self.mesh)

  def num_params(self) -> int:
    shapes = jax.eval_shape(functools.partial(models.init_params, self.model_config),
                            self.base_key)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def tool_isolation(s: Settings, env) -> Optional[dict]:
  """The sandbox's `isolation()` report when the environment is the Python tool (None
  otherwise); raises sandbox.SandboxError where it cannot confine the code, unless
  config.tools.allow_unisolated."""
  from grpo_jax import python_tool, sandbox  # pylint: disable=import-outside-toplevel
  if not isinstance(env, python_tool.PythonTool):
    return None
  allow = s.tools is not None and s.tools.allow_unisolated
  return sandbox.require_isolation(allow_unisolated=allow, hidden_paths=env.hidden_paths)


def build(s: Settings, workdir: str, reward_fns: Optional[Mapping[str, Callable]] = None,
          env=None) -> Experiment:
  mesh = sharding.make_mesh(*s.mesh)
  task = tasks.load_task(s)
  env = tasks.make_env(s, env, workdir)
  tool_isolation(s, env)  # before any compile: model-written code must be confined
  rewards = tasks.reward_functions(s.rollout, s.reward_model, reward_fns)
  tasks.check_rewards(rewards, task, s.rollout, env)  # your reward functions fail here, not mid-run
  tokenizer = tasks.build_tokenizer(s, workdir, task)
  encode = functools.partial(tasks.encode_prompts, tokenizer, task, r=s.rollout)
  teacher = None
  if s.sft_steps or s.rollout.paradigm.data == "teacher":
    teacher = (encode(task.sft), tasks.encode_targets(tokenizer, task.sft,
                                                      s.rollout.max_completion_length + 1, env))
  model_config, host_params = tasks.build_model(s, tokenizer)
  eos_ids = (tokenizer.eos_id,) + tasks.stop_token_ids(tokenizer, s.rollout.stop_tokens)
  base_key = jax.random.key(s.seed)
  optimizers = {"sft": ts.make_optimizer(s.sft.optim), "grpo": ts.make_optimizer(s.grpo.optim)}
  base_config = lora.base_config(model_config)
  params_shapes = jax.eval_shape(functools.partial(models.init_params, base_config), base_key)
  trained_shapes = (lora.split(jax.eval_shape(functools.partial(
      models.init_params, model_config), base_key))[0] if model_config.lora_rank else params_shapes)
  state_sh = {"sft": ts.state_shardings(mesh, base_config, optimizers["sft"], params_shapes),
              "grpo": ts.state_shardings(mesh, model_config, optimizers["grpo"], trained_shapes)}
  params_sh = state_sh["sft"].params
  if s.reward_model.enabled:
    optimizers["rm"] = ts.make_optimizer(s.reward_model.optim)
    rm_shapes = jax.eval_shape(lambda r: rm_lib.init_reward_model(base_config, r), base_key)
    state_sh["rm"] = rm_lib.rm_state_shardings(mesh, base_config, optimizers["rm"], rm_shapes)
  decode_sh = _decode_shardings(s, mesh, base_config, params_sh, params_shapes)
  if env is not None:  # a malformed environment fails here, before anything compiles
    multiturn.check_environment(env)
  stop_seqs = multiturn.stop_sequences(tokenizer, env.stop_strings) if env is not None else None
  programs = _programs(s, mesh, model_config, optimizers, state_sh, params_sh, eos_ids,
                       tokenizer.pad_id, decode_sh, stop_seqs)
  return Experiment(
      settings=s, workdir=workdir, mesh=mesh, task=task, tokenizer=tokenizer,
      train_prompts=encode(task.train), eval_prompts=encode(task.eval), teacher=teacher,
      model_config=model_config, host_params=host_params,
      rewards=rewards, eos_ids=eos_ids,
      optimizers=optimizers, state_sh=state_sh, programs=programs, base_key=base_key,
      base_config=base_config, params_sh=params_sh, decode_sh=decode_sh, env=env)


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
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    layout = "replicated" if not limit or weight_bytes <= limit / 4 else "training"
  if layout == "training":
    return params_sh
  return sharding.tree_shardings(mesh, models.param_logical_axes(config), params_shapes,
                                 rules=sharding.DECODE_RULES)


def _programs(s: Settings, mesh, model_config, optimizers, state_sh, params_sh, eos_ids,
              pad_id, decode_sh, stop_seqs=None) -> Programs:
  r, g = s.rollout, s.grpo
  train_config, model_config = model_config, lora.base_config(model_config)
  lora_on = bool(train_config.lora_rank)
  # The paradigm's objective: the GRPO loss, or the per-sequence NLL weighted by the gradient
  # coefficient (DeepSeekMath eq. 5) for SFT / RFT / Online RFT.
  loss_cfg = g.loss if r.paradigm.objective == "grpo" else losses.LossConfig(
      objective="sft", loss_type="grpo", temperature=g.loss.temperature)
  policy_update = ts.make_update_fn(mesh, state_sh["grpo"], model_config=train_config,
                                    optimizer=optimizers["grpo"], loss_cfg=loss_cfg,
                                    num_microbatches=g.num_microbatches,
                                    frozen_sh=params_sh if lora_on else None)
  logprobs = ts.make_logprob_fn(mesh, params_sh, model_config=model_config,
                                temperature=g.loss.temperature,
                                num_microbatches=g.num_microbatches)
  policy_logprobs = logprobs if not lora_on else ts.make_logprob_fn(
      mesh, ts.update_params(state_sh["grpo"].params, params_sh), model_config=train_config,
      temperature=g.loss.temperature, num_microbatches=g.num_microbatches)
  sft_update = None
  if s.sft_steps:
    sft_update = ts.make_update_fn(
        mesh, state_sh["sft"], model_config=model_config, optimizer=optimizers["sft"],
        loss_cfg=losses.LossConfig(objective="sft", loss_type="dapo"),
        num_microbatches=s.sft.num_microbatches)

  def sampler(d: Decoding, num_samples: int):
    settings = sampling.SamplingSettings(
        num_samples=num_samples, max_new_tokens=r.max_completion_length + 1,
        temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p,
        eos_ids=eos_ids, pad_id=pad_id)
    if stop_seqs is not None:  # tools: the multi-turn programs (multiturn.Programs)
      t = s.tools
      return multiturn.make_programs(model_config, multiturn.TurnSettings(
          sampling=settings, stop_seqs=stop_seqs, max_turns=t.max_turns,
          slots=t.slots or 2 * settings.max_new_tokens,
          max_observation_tokens=t.max_observation_tokens))
    return sampling.make_sampler(model_config, settings, mesh)

  e = s.eval
  rm_update = rm_score = None
  if s.reward_model.enabled:
    kind = s.reward_model.kind
    rm_update = rm_lib.make_rm_update_fn(mesh, state_sh["rm"], model_config=model_config,
                                         optimizer=optimizers["rm"], kind=kind)
    rm_score = rm_lib.make_rm_scorer(mesh, state_sh["rm"].params, model_config=model_config,
                                     kind=kind)
  bucketed = None
  if g.length_bucket and g.num_microbatches > 1:
    bucketed = ts.make_bucketed_programs(
        mesh, state_sh["grpo"], params_sh, model_config=train_config, optimizer=optimizers["grpo"],
        loss_cfg=loss_cfg, frozen_sh=params_sh if lora_on else None, base_config=model_config)
  return Programs(
      bucketed=bucketed,
      policy_update=policy_update, logprobs=logprobs, policy_logprobs=policy_logprobs,
      sample_train=sampler(r.decoding, r.num_samples),
      sample_greedy=sampler(Decoding(0.0), 1),
      sample_eval_k=sampler(e.decoding, e.k) if e.k > 1 else None,
      sft_update=sft_update, rm_update=rm_update, rm_score=rm_score,
      merge=_merge_program(train_config, params_sh, state_sh["grpo"].params) if lora_on else None,
      to_decode=jax.jit(functools.partial(_astype, dtype=jnp.dtype(model_config.dtype)),
                        out_shardings=decode_sh))


def _astype(params, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), params)


def _merge_program(config, params_sh, adapters_sh):
  dtype = jnp.dtype(config.dtype)

  def merge(base, adapters):
    merged, _ = lora.merge(lora.combine(base, adapters), config)
    return jax.tree.map(lambda x: x.astype(dtype), merged)

  return jax.jit(merge, in_shardings=(params_sh, adapters_sh), out_shardings=params_sh)


def init_state(exp: Experiment, phase: str, params=None) -> ts.TrainState:
  """A fresh TrainState of `phase` ("sft" | "grpo") built in its shards: from `params`, else
  the loaded checkpoint, else a random init from Stream.INIT. With LoRA, GRPO's state holds
  fresh adapters (Stream.LORA_INIT) and their optimiser state; the base is `lora_base`."""
  optimizer, sh = exp.optimizers[phase], exp.state_sh[phase]
  if phase == "grpo" and exp.lora:
    init = lambda r: ts.init_train_state(  # noqa: E731
        lora.split(models.init_params(exp.model_config, r))[0], optimizer)
    return jax.jit(init, out_shardings=sh)(exp.key(Stream.LORA_INIT, 0))
  if params is None and exp.host_params is None:
    init = lambda r: ts.init_train_state(models.init_params(exp.base_config, r), optimizer)  # noqa: E731
    return jax.jit(init, out_shardings=sh)(exp.key(Stream.INIT, 0))
  if params is None:
    params = jax.device_put(exp.host_params, sh.params)
  return jax.jit(functools.partial(ts.init_train_state, optimizer=optimizer),
                 out_shardings=sh)(params)


def lora_base(exp: Experiment, params=None):
  """LoRA's frozen base in the compute dtype, on the mesh: `params` (the SFT warm start), else
  the loaded checkpoint, else a random init (Stream.INIT)."""
  if params is None and exp.host_params is None:
    params = jax.jit(functools.partial(models.init_params, exp.base_config),
                     out_shardings=exp.params_sh)(exp.key(Stream.INIT, 0))
  elif params is None:
    params = jax.device_put(exp.host_params, exp.params_sh)
  copied = compute_params(exp, params)
  return jax.tree.map(jnp.copy, params) if copied is params else copied


def policy_params(exp: Experiment, state: ts.TrainState, base=None):
  """The policy as one plain params tree in the compute dtype, for sampling and evaluation:
  LoRA's adapters merged into the base once, or the master weights cast. Not for the
  old-policy pass, which reads the update's own tree (`updates.update_params`)."""
  if exp.lora:
    return exp.programs.merge(base, state.params)
  return compute_params(exp, state.params)


def decode_params(exp: Experiment, params):
  """`params` in the compute dtype and the sampler's layout (`exp.decode_sh`): one jitted cast
  and reshard per rollout or evaluation (an all-gather over "fsdp" when the layouts differ), so
  the decode loop gathers no weights. `compute_params` when the layouts are equivalent."""
  params = compute_params(exp, params)
  if all(x.sharding.is_equivalent_to(sh, x.ndim) for x, sh in zip(
      jax.tree.leaves(params), jax.tree.leaves(exp.decode_sh))):
    return params
  return exp.programs.to_decode(params)


def compute_params(exp: Experiment, params):
  """`params` in the compute dtype (`model.dtype`): one cast per rollout, evaluation or log-prob
  pass, so the decode loop never casts master weights per token. `params` itself when every
  leaf has that dtype already (float32 compute, or the reference, stored in compute dtype)."""
  dtype = jnp.dtype(exp.model_config.dtype)
  if all(x.dtype == dtype for x in jax.tree.leaves(params)):
    return params
  return _cast(params, dtype)


@functools.partial(jax.jit, static_argnums=1)
def _cast(params, dtype):
  """One program for the whole tree; elementwise, so every shard stays on its device."""
  return jax.tree.map(lambda x: x.astype(dtype), params)


def reference_copy(exp: Experiment, params):
  """A reference policy from the policy's params: in the compute dtype (it is never trained),
  except for an EMA reference (grpo.ref_ema), which accumulates small steps in the master dtype."""
  if exp.settings.grpo.ref_ema:
    return jax.tree.map(jnp.copy, params)
  copied = compute_params(exp, params)
  return jax.tree.map(jnp.copy, params) if copied is params else copied


def abstract_reference(exp: Experiment, abstract_params):
  """Restore target of the reference params (see `reference_copy`)."""
  if exp.settings.grpo.ref_ema:
    return abstract_params
  dtype = jnp.dtype(exp.model_config.dtype)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding),
                      abstract_params)


def abstract_state(exp: Experiment, phase: str) -> ts.TrainState:
  """Shapes, dtypes and shardings of `phase`'s TrainState: a restore target."""
  shapes = jax.eval_shape(lambda: init_state(exp, phase))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, exp.state_sh[phase])


def abstract_rm_state(exp: Experiment) -> ts.TrainState:
  shapes = jax.eval_shape(lambda: ts.init_train_state(
      rm_lib.init_reward_model(exp.base_config, exp.base_key), exp.optimizers["rm"]))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, exp.state_sh["rm"])
