"""The run's programs on abstract inputs, for tools/memory_plan.py: bytes of trees, each compiled
program's memory, the buffers a GRPO step holds beside them, and the planner that compiles them
at full or reduced depth (see memory_plan.py's docstring for the method and its limits).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from grpo_jax import experiment, models, settings as settings_lib, sharding, tasks
from grpo_jax import train_step as ts
from grpo_jax.models import lora
from grpo_jax.models.hf_checkpoint import config_from_hf

EXACT_MAX_LAYERS = 4   # --layers=auto compiles deeper models at DEPTHS layers
# A 1-layer program is scheduled unlike deeper ones (a 7B sampler: +0.6 GiB in the first
# step); from 2 layers on each layer adds the same bytes (2 -> 3 -> 6 layers: equal steps).
DEPTHS = (2, 3)
_EOS, _PAD = (1,), 0   # token ids: no compiled program's memory depends on their values


class _NoTokenizer:
  """What the samplers read of a tokenizer when they are built: the pad id."""
  pad_id = _PAD
SAMPLERS = ("sample_train", "sample_greedy", "sample_eval_k")


# ----------------------------------------------------------------------------- bytes


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays / ShapeDtypeStructs, whole (unsharded)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_bytes(tree) -> int:
  """Bytes one device holds of a pytree whose leaves carry NamedShardings (on a Mesh or an
  AbstractMesh): the sum of each leaf's shard."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` placed with `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def as_dtype(tree, dtype):
  """The same abstract tree in `dtype` (the compute-dtype copies of the params)."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------- compiled memory


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Per-device bytes of one compiled program (XLA's buffer assignment)."""
  argument: int
  output: int
  alias: int  # outputs written into donated arguments (counted once)
  temp: int
  depth: str = "exact"  # or how it was extrapolated

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @classmethod
  def of(cls, compiled) -> "ProgramMemory":
    m = compiled.memory_analysis()
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
               m.temp_size_in_bytes)

  def _map(self, fn, other: Optional["ProgramMemory"] = None, depth: str = "") -> "ProgramMemory":
    fields = ("argument", "output", "alias", "temp")
    return ProgramMemory(*(round(fn(getattr(self, f), getattr(other or self, f)))
                           for f in fields), depth or self.depth)

  def plus(self, per_layer: "ProgramMemory", layers: int, depth: str) -> "ProgramMemory":
    """These bytes plus `layers` times `per_layer`'s."""
    return self._map(lambda a, b: a + layers * b, per_layer, depth)

  def minus(self, other: "ProgramMemory") -> "ProgramMemory":
    return self._map(lambda a, b: a - b, other, "difference")

  def scaled(self, factor: float) -> "ProgramMemory":
    return self._map(lambda a, _: a * factor)

  def lerp(self, other: "ProgramMemory", t: float) -> "ProgramMemory":
    """(1 - t) x these bytes + t x `other`'s (t outside [0, 1] extrapolates)."""
    return self._map(lambda a, b: a + t * (b - a), other)


def compile_memory(jitted, *args) -> ProgramMemory:
  return ProgramMemory.of(jitted.lower(*args).compile())


# ----------------------------------------------------------------------------- the run's programs


def model_config(s: settings_lib.Settings) -> models.ModelConfig:
  """The trained model's config as `tasks.build_model` makes it, without weights or tokenizer:
  the checkpoint's config.json, else the preset with the config's overrides (vocabulary: the
  overrides', else tokenizer.vocab_size when a tokenizer is trained, else the preset's)."""
  m = s.model
  fields = tasks.model_fields(m)
  if m.hf_checkpoint:
    with open(os.path.join(m.hf_checkpoint, "config.json")) as f:
      config = config_from_hf(json.load(f), dtype=m.param_dtype)
    return config.replace(dtype=m.dtype, **fields)
  if not m.preset:
    raise settings_lib.ConfigError("config.model: name config.model.preset (a models.PRESETS "
                                   "name) or config.model.hf_checkpoint to plan memory")
  overrides = dict(m.overrides)
  if s.tokenizer_vocab_size:  # a tokenizer trained to this size (tasks.build_model's default)
    overrides.setdefault("vocab_size", s.tokenizer_vocab_size)
  return models.get_config(m.preset, param_dtype=m.param_dtype, dtype=m.dtype, **fields,
                           **overrides)


def with_depth(config: models.ModelConfig, layers: int) -> models.ModelConfig:
  types = config.layer_types[:layers] if config.layer_types else None
  return config.replace(num_layers=layers, layer_types=types)


def resolve_decode_layout(s: settings_lib.Settings, config: models.ModelConfig, tensor: int,
                          chip_bytes: float) -> str:
  """config.mesh.decode_layout on a device of `chip_bytes` (experiment._decode_shardings' "auto"
  rule: replicated when the compute-dtype weights take at most a quarter of its memory)."""
  if s.decode_layout != "auto":
    return s.decode_layout
  shapes = jax.eval_shape(functools.partial(models.init_params, lora.base_config(config)),
                          jax.random.key(0))
  weights = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) * (
      jnp.dtype(config.dtype).itemsize) / tensor
  return "replicated" if weights <= chip_bytes / 4 else "training"


@dataclasses.dataclass(frozen=True)
class Setup:
  """The run's programs and abstract buffers (shapes, dtypes, shardings; no data)."""
  settings: settings_lib.Settings
  config: models.ModelConfig  # the trained model (LoRA fields included)
  mesh: Any
  programs: experiment.Programs
  state: ts.TrainState   # the GRPO TrainState (LoRA: adapters + their optimiser state)
  params: Any            # base params in the compute dtype, training layout
  decode: Any            # the same in the sampler's layout
  reference: Any         # the reference policy (None without one; LoRA: the frozen base)


def build_setup(s: settings_lib.Settings, config: models.ModelConfig, mesh,
                decode_layout: str) -> Setup:
  """`experiment.build` without data, tokenizer or weights: `experiment.make_device` itself (the
  same optimizers, shardings and programs), so the plan is of the programs a run compiles."""
  keys = experiment.Keys(jax.random.key(s.seed))
  data = experiment.Data(task=None, tokenizer=_NoTokenizer(), train_prompts=None,
                         eval_prompts=None, teacher=None, rewards=None, eos_ids=_EOS)
  device = experiment.make_device(dataclasses.replace(s, decode_layout=decode_layout), mesh,
                                  data, config, None, keys)
  programs, optimizers, state_sh = device.programs, device.optimizers, device.state_sh
  base_config, params_sh, decode_sh = device.base_config, device.params_sh, device.decode_sh
  params_shapes = jax.eval_shape(functools.partial(models.init_params, base_config), keys.base)
  trained_shapes = (lora.split(jax.eval_shape(functools.partial(models.init_params, config),
                                              keys.base))[0] if config.lora_rank else params_shapes)
  state_shapes = jax.eval_shape(functools.partial(ts.init_train_state,
                                                  optimizer=optimizers.grpo), trained_shapes)
  params = as_dtype(with_shardings(params_shapes, params_sh), config.dtype)
  reference = None
  if config.lora_rank:
    reference = params
  elif s.use_reference:  # weights.reference_copy: compute dtype; the master's for an EMA
    reference = as_dtype(params, config.param_dtype) if s.grpo.ref_ema else params
  return Setup(settings=s, config=config, mesh=mesh, programs=programs,
               state=with_shardings(state_shapes, state_sh.grpo), params=params,
               decode=as_dtype(with_shardings(params_shapes, decode_sh), config.dtype),
               reference=reference)


def abstract_batch(setup: Setup, rows: int, *, logprob_pass: bool = False) -> ts.TrainBatch:
  """The TrainBatch of `rows` completions (`rollout.train_batch`, with `updates.with_logprobs`'
  reference / old log-probs unless `logprob_pass`), rows over the batch axes."""
  s, mesh = setup.settings, setup.mesh
  r, g = s.rollout, s.grpo
  T, C = r.max_prompt_length, r.max_completion_length + 1
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  passes = r.paradigm.objective == "grpo" and not logprob_pass
  return ts.TrainBatch(
      prompt_tokens=sds((rows, T), jnp.int32), prompt_mask=sds((rows, T), jnp.int32),
      completion_tokens=sds((rows, C), jnp.int32), completion_mask=sds((rows, C), jnp.int32),
      advantages=sds((rows, C) if r.paradigm.coefficient == "process" else (rows,), jnp.float32),
      old_logprobs=sds((rows, C), jnp.float32) if passes and g.num_iterations > 1 else None,
      ref_logprobs=sds((rows, C), jnp.float32) if passes and g.loss.beta != 0.0 else None)


def abstract_prompts(setup: Setup, prompts: int):
  """(ids, mask, key) of a sampler call on `prompts` left-padded prompts."""
  ids = jax.ShapeDtypeStruct((prompts, setup.settings.rollout.max_prompt_length), jnp.int32,
                             sharding=sharding.batch_sharding(setup.mesh, 2))
  key = jax.eval_shape(lambda: jax.random.key(0))
  return ids, ids, jax.ShapeDtypeStruct(key.shape, key.dtype,
                                        sharding=sharding.replicated(setup.mesh))


def program_args(setup: Setup, program: str, size: int) -> tuple[Callable, tuple]:
  """(jitted function, abstract arguments) of `program`; `size`: the batch's rows (update,
  logprobs) or a sampler's prompts."""
  p = setup.programs
  if program == "update":
    args = (setup.state, abstract_batch(setup, size))
    return p.policy_update, args + ((setup.params,) if setup.config.lora_rank else ())
  if program == "logprobs":
    return p.logprobs, (setup.params, abstract_batch(setup, size, logprob_pass=True))
  if program == "to_decode":
    return p.to_decode, (setup.params,)
  if program in SAMPLERS:
    return getattr(p, program).program, (setup.decode,) + abstract_prompts(setup, size)
  raise ValueError(f"unknown program {program!r}")


# ----------------------------------------------------------------------------- what is held


def state_bytes(setup: Setup) -> dict[str, int]:
  """Per-device bytes of the buffers a GRPO step keeps on the devices (exact)."""
  st, c = setup.state, setup.config
  policy = 0 if (c.dtype == c.param_dtype and not c.lora_rank) else device_bytes(setup.params)
  same_layout = all(a.sharding.is_equivalent_to(b.sharding, len(a.shape)) for a, b in zip(
      jax.tree.leaves(setup.params), jax.tree.leaves(setup.decode)))
  return dict(params=device_bytes(st.params), optimizer=device_bytes(st.opt_state),
              step=device_bytes(st.step), gradients=device_bytes(st.params),
              reference=0 if setup.reference is None else device_bytes(setup.reference),
              policy_copy=policy, decode_copy=0 if same_layout else device_bytes(setup.decode))


def phase_peaks(setup: Setup, b: dict[str, int], mem: dict[str, ProgramMemory]) -> dict:
  """Per device, each program's peak plus the buffers the driver holds beside it without
  passing them (trainer.grpo_step's lifetimes): the train state, the reference and the policy's
  compute-dtype copy live through the rollout and the log-prob passes (dropped before the
  update), the decode copy through the rollout
  (`rollout.collect`). A program's params argument is one of those held buffers: counted
  once, inside the program. LoRA: the base is the reference and the update's `frozen`."""
  s = setup.settings
  state = b["params"] + b["optimizer"] + b["step"]
  ref, policy, decode = b["reference"], b["policy_copy"], b["decode_copy"]
  held = state + ref + policy
  policy_arg = policy or b["params"]  # no copy (float32 compute): the master weights themselves
  out = {}
  if "update" in mem:
    # grpo_step drops the policy copy before the update (the peak phase)
    out["update"] = (held - state - policy - (ref if setup.config.lora_rank else 0)
                     + mem["update"].peak)
  if "logprobs" in mem:  # the reference pass (beta > 0) and / or the old-policy pass (mu > 1)
    args = ([ref] if s.grpo.loss.beta != 0.0 else []) + (
        [policy_arg] if s.grpo.num_iterations > 1 else [])
    out["logprobs"] = held - min(args) + mem["logprobs"].peak
  if "to_decode" in mem:
    out["to_decode"] = held - policy_arg + mem["to_decode"].peak
  for name in SAMPLERS:
    if name in mem:
      out[name] = held + decode - (decode or policy_arg) + mem[name].peak
  return out


def cpu_upcast_bound(setup: Setup, program: str, temp: int) -> int:
  """At most how much of a program's CPU temp can be float32 copies of 16-bit weights: XLA:CPU
  runs bf16 / fp16 matmuls and collectives in float32 (2 x the weights a program reads, whole
  over "fsdp"); a GPU or TPU does not need them. 0 for the update (float32 master weights)."""
  if jnp.dtype(setup.config.dtype).itemsize != 2 or program == "update":
    return 0
  whole = tree_bytes(setup.params) // setup.mesh.shape["tensor"]
  return min(temp, 2 * whole)


def sampler_prompts(s: settings_lib.Settings, dp: int) -> dict[str, int]:
  """Prompts per call of each sampler that a run uses (rollout: grpo.num_prompts;
  evaluation.evaluate: the greedy batch and the pass@k batch)."""
  e = s.eval
  out = {} if s.rollout.paradigm.data == "teacher" else {"sample_train": s.rollout.num_prompts}
  if e.every or e.num_problems:
    out["sample_greedy"] = e.batch_size
    if e.k > 1 and e.pass_k_problems:
      out["sample_eval_k"] = max(dp, (e.batch_size // e.k) // dp * dp)
  return out


def kv_tokens(s: settings_lib.Settings, program: str, prompts: int) -> int:
  """Cached tokens of a sampler call (prompts once + every row's completion): what its memory
  grows with, used to skip compiling samplers dominated by another."""
  samples = {"sample_train": s.rollout.num_samples, "sample_greedy": 1,
             "sample_eval_k": s.eval.k}[program]
  r = s.rollout
  return prompts * (r.max_prompt_length + samples * (r.max_completion_length + 1))


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class Probe:
  """One variant of the run to compile: its settings, the model, the sampler's layout."""
  settings: settings_lib.Settings
  config: models.ModelConfig
  decode_layout: str


class Planner:
  """Compiles the run's programs on abstract inputs, at full or reduced depth; every compile is
  cached, so searches re-use the plan's."""

  def __init__(self, mesh, layers: str = "auto", log: Callable[[str], None] = lambda _: None):
    if layers not in ("auto", "exact", "extrapolate"):
      raise ValueError(f"layers = {layers!r}: auto, exact or extrapolate")
    self.mesh, self.layers, self.log = mesh, layers, log
    self._setups: dict = {}
    self._compiled: dict = {}
    self.compiles, self.compile_s = 0, 0.0

  def setup(self, probe: Probe) -> Setup:
    if probe not in self._setups:
      self._setups[probe] = build_setup(probe.settings, probe.config, self.mesh,
                                        probe.decode_layout)
    return self._setups[probe]

  def exact(self, config: models.ModelConfig) -> bool:
    # Scanned layers compile in the same time at any depth: exact whatever their number.
    return config.num_layers <= DEPTHS[1] or self.layers == "exact" or (
        self.layers == "auto" and (config.num_layers <= EXACT_MAX_LAYERS or config.scan_layers))

  def compiled(self, probe: Probe, program: str, size: int, depth: int) -> ProgramMemory:
    """`program` of `probe` with the model cut to `depth` layers."""
    sub = dataclasses.replace(probe, config=with_depth(probe.config, depth))
    key = (sub, program, size)
    if key not in self._compiled:
      fn, args = program_args(self.setup(sub), program, size)
      t0 = time.perf_counter()
      self._compiled[key] = compile_memory(fn, *args)
      dt = time.perf_counter() - t0
      self.compiles, self.compile_s = self.compiles + 1, self.compile_s + dt
      self.log(f"  compiled {program} (size {size}, {depth} layers): {dt:.1f} s")
    return self._compiled[key]

  def per_layer(self, probe: Probe, program: str, size: int) -> ProgramMemory:
    """Bytes one more layer adds (the step from DEPTHS[0] to DEPTHS[1] layers)."""
    lo, hi = DEPTHS
    return self.compiled(probe, program, size, hi).minus(
        self.compiled(probe, program, size, lo)).scaled(1 / (hi - lo))

  def memory(self, probe: Probe, program: str, size: int = 0,
             slope_sizes: tuple[int, ...] = ()) -> ProgramMemory:
    """`program` at the model's depth: compiled, or extrapolated linearly from DEPTHS layers.
    With `slope_sizes` (sizes whose per-layer bytes are known or worth two compiles), one
    compile at DEPTHS[0] and the per-layer bytes interpolated linearly in the size between
    them (a sampler's grow by ~1 MB per prompt and layer)."""
    L = probe.config.num_layers
    if self.exact(probe.config):
      return self.compiled(probe, program, size, L)
    lo = DEPTHS[0]
    if not slope_sizes or size in slope_sizes:
      return self.compiled(probe, program, size, lo).plus(
          self.per_layer(probe, program, size), L - lo, f"extrapolated from {lo} and "
          f"{DEPTHS[1]} layers")
    (a, b) = sorted(slope_sizes)[:2] if len(slope_sizes) > 1 else (slope_sizes[0],) * 2
    pa, pb = self.per_layer(probe, program, a), self.per_layer(probe, program, b)
    t = 0.0 if a == b else (size - a) / (b - a)
    slope = pa.lerp(pb, t)
    return self.compiled(probe, program, size, lo).plus(
        slope, L - lo, f"{lo} layers + per-layer bytes interpolated from sizes {a}, {b}")


  def sampler_memory(self, probe: Probe, program: str, size: int,
                     slope_sizes: tuple[int, ...] = (), prefill: bool = True) -> ProgramMemory:
    """A sampler at the model's depth: the larger of its two phases. At a few layers a sampler
    peaks while prefilling (the prompts' activations), a deep one while decoding (every layer
    adds its completion KV cache), so one line through two shallow depths misses the switch.
    The decode phase's line is the same program's with 1-token prompts (nothing to prefill),
    plus what the prompts themselves take (their ids and their cache in every layer).
    `prefill=False`: the decode phase only (the search's probes: it dominates deep models)."""
    if self.exact(probe.config):
      return self.memory(probe, program, size)
    short = dataclasses.replace(probe, settings=_with_prompt_length(probe.settings, 1))
    decode = self.memory(short, program, size, slope_sizes).plus(
        _prompt_bytes(self.setup(probe), size), 1, "decode phase: 1-token prompts, "
        f"extrapolated from {DEPTHS[0]} and {DEPTHS[1]} layers, + the prompts' cache")
    if not prefill:
      return decode
    return max((self.memory(probe, program, size, slope_sizes), decode), key=lambda m: m.peak)


def _with_prompt_length(s: settings_lib.Settings, n: int) -> settings_lib.Settings:
  return dataclasses.replace(s, rollout=dataclasses.replace(s.rollout, max_prompt_length=n))


def _prompt_bytes(setup: Setup, prompts: int) -> ProgramMemory:
  """Per device, what prompts of the configured length take beyond 1-token ones in a sampler:
  ids and mask (arguments) and the prefix KV cache of every layer (temp)."""
  c, mesh = setup.config, setup.mesh
  local = -(-prompts // sharding.data_parallel_size(mesh))  # prompts are split over the rows
  extra = setup.settings.rollout.max_prompt_length - 1
  kv_heads = c.num_kv_heads // mesh.shape["tensor"] if not c.num_kv_heads % mesh.shape[
      "tensor"] else c.num_kv_heads
  cache = c.num_layers * local * kv_heads * c.head_dim * extra * 2 * jnp.dtype(c.dtype).itemsize
  return ProgramMemory(argument=2 * local * extra * 4, output=0, alias=0,
                       temp=cache + local * extra)  # + the cache's valid mask (bool)
