"""The experiment config, read once into frozen settings, and checked.

    settings = settings.from_config(cfg, jax.device_count())   # ConfigError names the field

`from_config` is the only place that reads the `ml_collections.ConfigDict` (big_vision style
config files in experiments/configs/). Everything downstream (set-up, rollout, evaluation,
updates, the loop) takes these dataclasses, so a default lives in one place, the config file,
and a bad value fails before anything compiles, naming `config.<field>`.

The dataclasses and ConfigError are defined in settings_types.py, the checks in
settings_checks.py; every public name of both is importable from here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections
from absl import logging

from grpo_jax import corrections, losses, paradigms, sharding
from grpo_jax.record_fields import FieldMap
from grpo_jax.settings_checks import (  # noqa: F401  (public names of the settings)
    FLOAT_DTYPES, LORA_TARGETS, check, precision_warnings)
from grpo_jax.settings_types import (  # noqa: F401  (public names of the settings)
    ConfigError, DataSettings, Decoding, EvalSettings, GRPOSettings, LoraSettings, ModelSettings,
    OptimConfig, RewardModelSettings, RolloutSettings, Settings, SFTSettings, ToolSettings,
    WandbSettings)


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
  n = c.mesh.rollout_devices
  if not 0 <= n < num_devices:
    raise ConfigError(f"config.mesh.rollout_devices = {n}: 0 (the samplers share the training "
                      f"mesh) or fewer than the {num_devices} devices, so training keeps some")
  try:
    mesh_shape = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices - n)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}" + (f" (the {num_devices - n} devices left after "
                                             f"mesh.rollout_devices = {n})" if n else "")
                      ) from None
  dp = mesh_shape[0] * mesh_shape[1]
  rollout = _rollout(c.grpo, c.reward_model)
  grpo = _grpo(c.grpo, rollout.num_prompts * rollout.num_samples, dp)
  sft = _sft(c.sft, dp)
  ev = _eval(c.eval)
  rm = _reward_model(c.reward_model)
  d, m = c.data, c.model
  out = Settings(
      seed=c.seed, init_from=c.init_from, log_every=c.log_every,
      max_nonfinite_streak=c.max_nonfinite_streak,
      data=_data(d),
      tokenizer_path=c.tokenizer.path, tokenizer_vocab_size=c.tokenizer.vocab_size,
      model=_model(m),
      mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor), decode_layout=c.mesh.decode_layout,
      sft=sft, rollout=rollout, grpo=grpo,
      eval=ev, reward_model=rm, checkpoint_every=c.checkpoint.every,
      checkpoint_keep=c.checkpoint.keep,
      wandb=WandbSettings(c.wandb.project, c.wandb.entity, c.wandb.mode, c.wandb.name),
      tools=_tools(cfg), profile_steps=_profile_steps(cfg), rollout_devices=n,
      distill_teacher=c.distill.teacher)
  check(out, dp)
  for warning in precision_warnings(out):
    logging.warning("%s", warning)
  return out


def _rollout(g: _Fields, rm: _Fields) -> RolloutSettings:
  P, G = g.num_prompts, g.num_samples
  paradigm = _paradigm(g.algorithm, g.supervision)
  prm = bool(rm.enabled) and rm.kind == "prm"
  return RolloutSettings(
      paradigm=paradigm, num_prompts=P, num_samples=G,
      max_prompt_length=g.max_prompt_length, max_completion_length=g.max_completion_length,
      prompt_truncation=g.prompt_truncation, decoding=_decoding(g), stop_tokens=g.stop_tokens,
      rewards=tuple((k, float(w)) for k, w in g.rewards.to_dict().items()),
      reward_fns=tuple(sorted(g.reward_fns.to_dict().items())),
      reward_timeout_s=float(g.reward_timeout_s), reward_errors=g.reward_errors,
      overlong_cache_length=g.overlong_cache_length, advantage_scale=g.advantage_scale,
      mask_truncated_completions=bool(g.mask_truncated_completions),
      dynamic_sampling=bool(g.dynamic_sampling), max_resample_rounds=g.max_resample_rounds,
      process_reward=g.process_reward, max_steps=g.max_steps, step_delimiter=g.step_delimiter,
      step_rewards=paradigm.coefficient == "process" or prm, batching=g.batching,
      decode_slots=g.decode_slots)


def _grpo(g: _Fields, rows: int, dp: int) -> GRPOSettings:
  """config.grpo's update settings: the loss, micro-batches of the `rows` of a rollout."""
  fields = g.loss.to_dict()
  try:
    correction = corrections.Correction(
        kind=fields.pop("correction"), cap=fields.pop("correction_cap"),
        low=fields.pop("correction_low"), high=fields.pop("correction_high"))
    loss = losses.LossConfig(temperature=float(g.temperature),
                             max_completion_length=g.max_completion_length + 1,
                             correction=correction, **fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.grpo.loss: {e}") from None
  return GRPOSettings(
      steps=g.steps, num_iterations=g.num_iterations,
      num_microbatches=_microbatches(rows, g.micro_batch_size, dp, "grpo.micro_batch_size"),
      ref_reset_every=g.ref_reset_every, ref_ema=float(g.ref_ema), loss=loss,
      optim=_optim(g.optim, "grpo.optim"), length_bucket=g.length_bucket,
      max_staleness=g.max_staleness, inflight_after=g.inflight_after)


def _sft(s: _Fields, dp: int) -> SFTSettings:
  return SFTSettings(steps=s.steps, batch_size=s.batch_size,
                     num_microbatches=(_microbatches(s.batch_size, s.micro_batch_size, dp,
                                                     "sft.micro_batch_size") if s.steps else 1),
                     optim=_optim(s.optim, "sft.optim"))


def _eval(e: _Fields) -> EvalSettings:
  return EvalSettings(every=e.every, num_problems=e.num_problems, batch_size=e.batch_size, k=e.k,
                      pass_k_problems=e.pass_k_problems, decoding=_decoding(e),
                      log_samples=e.log_samples)


def _reward_model(r: _Fields) -> RewardModelSettings:
  return RewardModelSettings(
      enabled=bool(r.enabled), kind=r.kind, weight=float(r.weight),
      iteration_steps=r.iteration_steps, bootstrap_rollouts=r.bootstrap_rollouts,
      train_steps=r.train_steps, batch_size=r.batch_size,
      replay_fraction=float(r.replay_fraction), optim=_optim(r.optim, "reward_model.optim"))


def _model(m: _Fields) -> ModelSettings:
  return ModelSettings(m.preset, m.hf_checkpoint, m.param_dtype, m.dtype,
                       tuple(sorted(m.overrides.to_dict().items())),
                       LoraSettings(m.lora.rank, float(m.lora.alpha),
                                    tuple(t.strip() for t in m.lora.targets.split(",")
                                          if t.strip()),
                                    float(m.lora.dropout)),
                       scan_layers=bool(m.scan_layers), remat=m.remat)


def _data(d: _Fields) -> DataSettings:
  f = d.fields
  fields = FieldMap(question=f.question, answer=f.answer, final_answer=f.final_answer,
                    marker=f.marker, cleanup=f.cleanup)
  return DataSettings(
      task=d.task, seed=d.seed, num_train=d.num_train, num_eval=d.num_eval, flaw_p=d.flaw_p,
      tool_p=float(d.tool_p),
      path=d.path, train_split=d.train_split, eval_split=d.eval_split, fields=fields,
      prompt_template=d.prompt_template, chat_template=d.chat_template,
      system_prompt=d.system_prompt,
      chat_template_kwargs=tuple(sorted(d.chat_template_kwargs.to_dict().items())))


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


def _paradigm(algorithm: str, supervision: str) -> paradigms.Paradigm:
  try:
    return paradigms.lookup(algorithm, supervision)
  except ValueError as e:
    raise ConfigError(f"config.grpo.algorithm / config.grpo.supervision: {e}") from None
