"""The experiment config, read once into frozen settings; every check of it lives here.

    settings = settings.from_config(cfg, jax.device_count())   # ConfigError names the field

`from_config` is the only place that reads the `ml_collections.ConfigDict` (big_vision style
config files in experiments/configs/). Everything downstream (set-up, rollout, evaluation,
updates, the loop) takes these dataclasses, so a default lives in one place, the config file,
and a bad value fails before anything compiles, naming `config.<field>`.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Optional

import jax
import ml_collections
from absl import logging

from grpo_jax import losses, paradigms, sharding
from grpo_jax.data import records
from grpo_jax.train_step import OptimConfig


class ConfigError(ValueError):
  """A bad experiment config or input path, reported before anything compiles."""


FLOAT_DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("qkv", "o", "gate_up", "down")  # models.LORA_TARGETS (no model import here)


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
  task: str                 # "arithmetic" (generated) | "records" (files or a HF dataset)
  seed: int
  num_train: int            # 0: all
  num_eval: int
  flaw_p: float             # arithmetic: the flawed teacher's error rate
  tool_p: float             # tool_arithmetic: how often the teacher uses the Python tool
  path: str                 # records: file, directory of splits, or "hf:name[:config]"
  train_split: str
  eval_split: str           # "" with a single file: the last num_eval records are held out
  fields: records.FieldMap
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

  @property
  def sft_steps(self) -> int:
    """SFT warm-start steps actually run (none when GRPO starts from another run)."""
    return 0 if self.init_from else self.sft.steps

  @property
  def use_reference(self) -> bool:
    """Whether the run keeps a second copy of the params: the KL reference, which also holds
    RFT's frozen sampling policy (the warm start)."""
    return self.grpo.loss.beta != 0.0 or self.rollout.paradigm.data == "frozen_policy"


# ----------------------------------------------------------------------------- reading


class _Fields:
  """Read access to a ConfigDict node whose missing field is a ConfigError naming its path."""

  def __init__(self, node, path: str):
    self._node, self._path = node, path

  def __getattr__(self, name: str):
    try:
      value = self._node[name]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"config.{self._path}{name} is missing (start a config file from "
                        "experiments/configs/arithmetic.py)") from None
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      return _Fields(value, f"{self._path}{name}.")
    return value

  def to_dict(self) -> dict:
    node = self._node
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node or {})


def _optim(node: _Fields, path: str) -> OptimConfig:
  fields = node.to_dict()
  known = {f.name for f in dataclasses.fields(OptimConfig)}
  if set(fields) - known:
    raise ConfigError(f"config.{path}: unknown fields {sorted(set(fields) - known)}; known: "
                      f"{sorted(known)}")
  return OptimConfig(**fields)


def _decoding(node: _Fields) -> Decoding:
  return Decoding(float(node.temperature), node.top_k or None, node.top_p or None,
                  node.min_p or None)


def _microbatches(rows: int, micro_batch_size: int, dp: int, path: str) -> int:
  mbs = micro_batch_size or rows
  if rows % mbs or mbs % dp:
    raise ConfigError(f"config.{path} = {mbs} must divide the {rows} rows and be divisible by "
                      f"the data-parallel size {dp}")
  return rows // mbs


def from_config(cfg: ml_collections.ConfigDict, num_devices: int) -> Settings:
  """The frozen settings of `cfg`; ConfigError naming the field on anything that cannot work."""
  c = _Fields(cfg, "")
  try:
    mesh_shape = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  dp = mesh_shape[0] * mesh_shape[1]
  g = c.grpo
  P, G = g.num_prompts, g.num_samples
  rollout = RolloutSettings(
      paradigm=_paradigm(g.algorithm, g.supervision), num_prompts=P, num_samples=G,
      max_prompt_length=g.max_prompt_length, max_completion_length=g.max_completion_length,
      prompt_truncation=g.prompt_truncation, decoding=_decoding(g), stop_tokens=g.stop_tokens,
      rewards=tuple((k, float(w)) for k, w in g.rewards.to_dict().items()),
      reward_fns=tuple(sorted(g.reward_fns.to_dict().items())),
      reward_timeout_s=float(g.reward_timeout_s), reward_errors=g.reward_errors,
      overlong_cache_length=g.overlong_cache_length, advantage_scale=g.advantage_scale,
      mask_truncated_completions=bool(g.mask_truncated_completions),
      dynamic_sampling=bool(g.dynamic_sampling), max_resample_rounds=g.max_resample_rounds,
      process_reward=g.process_reward, max_steps=g.max_steps, step_delimiter=g.step_delimiter)
  try:
    loss = losses.LossConfig(temperature=float(g.temperature),
                             max_completion_length=g.max_completion_length + 1,
                             **g.loss.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.grpo.loss: {e}") from None
  grpo = GRPOSettings(
      steps=g.steps, num_iterations=g.num_iterations,
      num_microbatches=_microbatches(P * G, g.micro_batch_size, dp, "grpo.micro_batch_size"),
      ref_reset_every=g.ref_reset_every, ref_ema=float(g.ref_ema), loss=loss,
      optim=_optim(g.optim, "grpo.optim"), length_bucket=g.length_bucket)
  s = c.sft
  sft = SFTSettings(steps=s.steps, batch_size=s.batch_size,
                    num_microbatches=(_microbatches(s.batch_size, s.micro_batch_size, dp,
                                                    "sft.micro_batch_size") if s.steps else 1),
                    optim=_optim(s.optim, "sft.optim"))
  e = c.eval
  ev = EvalSettings(every=e.every, num_problems=e.num_problems, batch_size=e.batch_size, k=e.k,
                    pass_k_problems=e.pass_k_problems, decoding=_decoding(e),
                    log_samples=e.log_samples)
  r = c.reward_model
  rm = RewardModelSettings(
      enabled=bool(r.enabled), kind=r.kind, weight=float(r.weight),
      iteration_steps=r.iteration_steps, bootstrap_rollouts=r.bootstrap_rollouts,
      train_steps=r.train_steps, batch_size=r.batch_size,
      replay_fraction=float(r.replay_fraction), optim=_optim(r.optim, "reward_model.optim"))
  d, m = c.data, c.model
  out = Settings(
      seed=c.seed, init_from=c.init_from, log_every=c.log_every,
      max_nonfinite_streak=c.max_nonfinite_streak,
      data=_data(d),
      tokenizer_path=c.tokenizer.path, tokenizer_vocab_size=c.tokenizer.vocab_size,
      model=ModelSettings(m.preset, m.hf_checkpoint, m.param_dtype, m.dtype,
                          tuple(sorted(m.overrides.to_dict().items())),
                          LoraSettings(m.lora.rank, float(m.lora.alpha),
                                       tuple(t.strip() for t in m.lora.targets.split(",")
                                             if t.strip()),
                                       float(m.lora.dropout))),
      mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor), decode_layout=c.mesh.decode_layout,
      sft=sft, rollout=rollout, grpo=grpo,
      eval=ev, reward_model=rm, checkpoint_every=c.checkpoint.every,
      checkpoint_keep=c.checkpoint.keep,
      wandb=WandbSettings(c.wandb.project, c.wandb.entity, c.wandb.mode, c.wandb.name),
      tools=_tools(cfg), profile_steps=_profile_steps(cfg))
  check(out, dp)
  for warning in precision_warnings(out):
    logging.warning("%s", warning)
  return out


TOOLS_OFF = dict(env="", max_turns=3, max_observation_tokens=48, slots=0, max_workers=4,
                 timeout_s=5.0, memory_mb=512, stop_strings="```output",
                 code_pattern=r"```python\n(.*?)```", observation_template="\n{output}\n```\n",
                 hidden_paths="", allow_unisolated=False)


def _tools(cfg) -> ToolSettings:
  """config.tools (absent in configs written before tools existed: off)."""
  node = cfg.get("tools") if hasattr(cfg, "get") else None
  t = _Fields(node if node is not None else TOOLS_OFF, "tools.")
  return ToolSettings(
      env=t.env, max_turns=t.max_turns, max_observation_tokens=t.max_observation_tokens,
      slots=t.slots, max_workers=t.max_workers, timeout_s=float(t.timeout_s),
      memory_mb=t.memory_mb,
      stop_strings=tuple(x for x in t.stop_strings.split(",") if x.strip()),
      code_pattern=t.code_pattern, observation_template=t.observation_template,
      # Both came after the first tool configs: absent means none / False.
      hidden_paths=tuple(x.strip() for x in str(_get(t, "hidden_paths", "")).split(",")
                         if x.strip()),
      allow_unisolated=_get(t, "allow_unisolated", False))


def _get(node: _Fields, name: str, default):
  try:
    return getattr(node, name)
  except ConfigError:
    return default


def _profile_steps(cfg) -> Optional[tuple[int, int]]:
  """config.profile_steps: "" (off), "N" or "first-last" (GRPO steps, 1-based)."""
  text = str(cfg.get("profile_steps", "") if hasattr(cfg, "get") else "").strip()
  if not text:
    return None
  try:
    first, _, last = text.partition("-")
    steps = (int(first), int(last or first))
  except ValueError:
    raise ConfigError(f"config.profile_steps = {text!r}: 'N' or 'first-last' (GRPO steps, "
                      "1-based), '' = off") from None
  if not 1 <= steps[0] <= steps[1]:
    raise ConfigError(f"config.profile_steps = {text!r}: need 1 <= first <= last")
  return steps


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


def _data(d: _Fields) -> DataSettings:
  f = d.fields
  fields = records.FieldMap(question=f.question, answer=f.answer, final_answer=f.final_answer,
                            marker=f.marker, cleanup=f.cleanup)
  return DataSettings(
      task=d.task, seed=d.seed, num_train=d.num_train, num_eval=d.num_eval, flaw_p=d.flaw_p,
      tool_p=float(d.tool_p),
      path=d.path, train_split=d.train_split, eval_split=d.eval_split, fields=fields,
      prompt_template=d.prompt_template, chat_template=d.chat_template,
      system_prompt=d.system_prompt,
      chat_template_kwargs=tuple(sorted(d.chat_template_kwargs.to_dict().items())))


def _check_data(s: Settings) -> None:
  d = s.data
  if d.task not in ("arithmetic", "tool_arithmetic", "records"):
    raise ConfigError(f"config.data.task = {d.task!r}: 'arithmetic', 'tool_arithmetic' (generated) or 'records' "
                      "(a jsonl / json / parquet file or directory, or hf:<dataset name>)")
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


def _paradigm(algorithm: str, supervision: str) -> paradigms.Paradigm:
  try:
    return paradigms.lookup(algorithm, supervision)
  except ValueError as e:
    raise ConfigError(f"config.grpo.algorithm / config.grpo.supervision: {e}") from None


# ----------------------------------------------------------------------------- checks


def check(s: Settings, dp: int) -> None:
  """Sizes and combinations that cannot work, each naming its field."""
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
  _check_lora(s)
  _check_data(s)
  if s.decode_layout not in ("auto", "replicated", "training"):
    raise ConfigError(f"config.mesh.decode_layout = {s.decode_layout!r}: 'auto', 'replicated' "
                      "(weights whole on every data / fsdp member while sampling) or 'training' "
                      "(sample with the update's fsdp-split weights)")
  _check_rewards(r)
  _check_tools(s, dp)
  if s.wandb.mode not in ("", "online", "offline", "disabled"):
    raise ConfigError(f"config.wandb.mode = {s.wandb.mode!r}: '' (off), online, offline or "
                      "disabled")
  rm = s.reward_model
  if rm.enabled and rm.kind not in ("orm", "prm"):
    raise ConfigError(f"config.reward_model.kind = {rm.kind!r}: 'orm' or 'prm' in the trainer")
  if r.process_reward == "prm" and r.paradigm.coefficient == "process" and not (
      rm.enabled and rm.kind == "prm"):
    raise ConfigError("config.grpo.process_reward = 'prm' needs config.reward_model.enabled = "
                      "True with kind = 'prm'")
  steps_needed = r.paradigm.coefficient == "process" or (rm.enabled and rm.kind == "prm")
  if steps_needed and s.data.task != "arithmetic":
    raise ConfigError(f"process supervision / a PRM needs step labels, which only the arithmetic "
                      f"task's verifier gives; config.data.task = {s.data.task!r}")
  if rm.enabled and rm.batch_size % dp:
    raise ConfigError(f"config.reward_model.batch_size = {rm.batch_size} is not divisible by the "
                      f"data-parallel size {dp}")
  if not 0.0 <= rm.replay_fraction < 1.0:
    raise ConfigError(f"config.reward_model.replay_fraction = {rm.replay_fraction} must be in "
                      "[0, 1)")
