"""Host-side task data: records, tokenizer, encoded prompts / teacher targets, reward functions.

Everything here runs once at set-up, on NumPy and Python, and errors name the config field or
the file at fault (ConfigError) before anything compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from grpo_jax import models
from grpo_jax import rewards as rewards_lib
from grpo_jax import tokenizer as tokenizer_lib
from grpo_jax.data import arithmetic, gsm8k, prompts
from grpo_jax.settings import ConfigError, RewardModelSettings, RolloutSettings, Settings


@dataclasses.dataclass(frozen=True)
class Task:
  """Records with `question`, `answer` (worked solution), `final_answer` (and task columns)."""
  train: list[dict]       # GRPO prompts
  sft: list[dict]         # warm-start targets (may hold a flawed teacher's solutions)
  eval: list[dict]        # held out
  prompt: Callable[[str], str]


class Prompts(NamedTuple):
  """Left-padded prompt tokens of a whole split, encoded once; rows picked by index."""
  ids_NxL: np.ndarray
  mask_NxL: np.ndarray
  num_truncated: int


class Targets(NamedTuple):
  """Right-padded teacher solutions + EOS, [N, C] (rows cut at C)."""
  ids_NxC: np.ndarray
  mask_NxC: np.ndarray


@dataclasses.dataclass(frozen=True)
class Rewards:
  """The reward rows of a rollout, [K, P, G]: rule functions first, then the learned ORM."""
  fns: tuple[Callable, ...]
  names: tuple[str, ...]
  weights: tuple[float, ...]


def load_task(s: Settings) -> Task:
  d = s.data
  template = d.chat_template
  prompt = (functools.partial(prompts.chat_prompt, template=prompts.CHAT_TEMPLATES.get(
      template, template)) if template else prompts.plain_prompt)
  if d.task == "arithmetic":
    train, heldout = arithmetic.make_splits(d.num_train, d.num_eval, d.seed, flaw_p=d.flaw_p)
    task = Task(train=train, sft=train, eval=heldout, prompt=prompt)
  elif d.task == "gsm8k":
    if not d.path:
      raise ConfigError("config.data.path: the GSM8K task needs a local directory with "
                        "train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)")
    if not os.path.exists(d.path):
      raise ConfigError(f"config.data.path: {d.path} does not exist")
    try:
      train = gsm8k.load_gsm8k(d.path, "train")
      test = gsm8k.load_gsm8k(d.path, "test")
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.data.path: {e}") from None
    limit = lambda rows, n: rows[:n] if n else rows  # noqa: E731
    task = Task(train=limit(train, d.num_train), sft=limit(train, d.num_train),
                eval=limit(test, d.num_eval), prompt=prompt)
  else:
    raise ConfigError(f"config.data.task = {d.task!r}: expected 'arithmetic' or 'gsm8k'")
  if not task.train or not task.eval:
    raise ConfigError("config.data: empty train or eval set")
  return task


def build_tokenizer(s: Settings, workdir: str, task: Task) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, or a SentencePiece model trained on the task (offline default)."""
  path = s.tokenizer_path or s.model.hf_checkpoint
  if not path and s.init_from:
    path = os.path.join(s.init_from, "tokenizer.model")
  if path:
    if not os.path.exists(path):
      raise ConfigError(f"config.tokenizer.path: {path} does not exist")
    try:
      return tokenizer_lib.load_tokenizer(path)
    except (ValueError, FileNotFoundError, OSError) as e:
      raise ConfigError(f"config.tokenizer.path: cannot load a tokenizer from {path}: {e}") from None
  prefix = os.path.join(workdir, "tokenizer")
  if os.path.exists(prefix + ".model"):  # resume: the same tokenizer, bit for bit
    return tokenizer_lib.SentencePieceTokenizer(prefix + ".model")
  texts = [task.prompt(r["question"]) + " " + r["answer"] for r in task.train]
  if jax.process_index() != 0:
    raise ConfigError("multi-host runs need config.tokenizer.path (train it once beforehand)")
  return tokenizer_lib.train_sentencepiece(texts, model_prefix=prefix,
                                           vocab_size=s.tokenizer_vocab_size)


def build_model(s: Settings, tokenizer) -> tuple[models.ModelConfig, object]:
  """(model config, host params, or None to initialise randomly)."""
  m = s.model
  if m.hf_checkpoint:
    if not os.path.exists(m.hf_checkpoint):
      raise ConfigError(f"config.model.hf_checkpoint: {m.hf_checkpoint} does not exist")
    model_config, params = models.load_hf_checkpoint(m.hf_checkpoint, dtype=m.param_dtype)
    return dataclasses.replace(model_config, dtype=m.dtype, **_lora_fields(m)), params
  overrides = dict(m.overrides)
  overrides.setdefault("vocab_size", tokenizer.vocab_size)
  for name in ("param_dtype", "dtype"):
    if name in overrides:
      raise ConfigError(f"config.model.overrides.{name}: set config.model.{name} instead")
  model_config = models.get_config(m.preset, param_dtype=m.param_dtype, dtype=m.dtype,
                                   **_lora_fields(m), **overrides)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model: vocab_size {model_config.vocab_size} < the tokenizer's "
                      f"{tokenizer.vocab_size}")
  return model_config, None


def _lora_fields(m) -> dict:
  return dict(lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_targets=m.lora.targets)


def encode_prompts(tokenizer, task: Task, records: Sequence[dict], r: RolloutSettings) -> Prompts:
  texts = [task.prompt(rec["question"]) for rec in records]
  try:
    out = tokenizer.encode_batch_padded(texts, max_length=r.max_prompt_length,
                                        truncate=r.prompt_truncation)
  except ValueError as e:
    raise ConfigError(f"config.grpo.max_prompt_length = {r.max_prompt_length}: {e}") from None
  return Prompts(out.ids_NxL, out.mask_NxL, out.num_truncated)


def encode_targets(tokenizer, records: Sequence[dict], max_len: int) -> Targets:
  ids = np.full((len(records), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(records), max_len), np.int32)
  for i, rec in enumerate(records):
    seq = (tokenizer.encode(" " + rec["answer"]) + [tokenizer.eos_id])[:max_len]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return Targets(ids, mask)


def stop_token_ids(tokenizer, stop_tokens: str) -> tuple[int, ...]:
  """Extra EOS ids from a comma-separated list of single-token strings (e.g. a chat template's
  end-of-turn "<|im_end|>"); a string that is not one token is a config error."""
  ids = []
  for text in filter(None, (t.strip() for t in stop_tokens.split(","))):
    enc = tokenizer.encode(text)
    while len(enc) > 1 and not tokenizer.decode(enc[:1]).strip():
      enc = enc[1:]  # SentencePiece's word-boundary piece before the token
    if len(enc) != 1:
      raise ConfigError(f"config.grpo.stop_tokens: {text!r} is {len(enc)} tokens for this "
                        "tokenizer, not one")
    ids.append(int(enc[0]))
  return tuple(ids)


def reward_functions(r: RolloutSettings, rm: RewardModelSettings) -> Rewards:
  """The configured reward rows (config: grpo.rewards, weight 0 = off; reward_model)."""
  table = {
      "exact_answer": rewards_lib.exact_answer_reward,
      "format": rewards_lib.format_reward,
      "overlong": functools.partial(
          rewards_lib.overlong_penalty_reward, max_length=r.max_completion_length,
          cache_length=r.overlong_cache_length),
  }
  fns, names, weights = [], [], []
  for name, weight in r.rewards:
    if name not in table:
      raise ConfigError(f"config.grpo.rewards: unknown reward {name!r}; known: {sorted(table)} "
                        "(add a function to grpo_jax/rewards and to tasks.reward_functions)")
    if weight:  # listed with weight 0: off (so that a flag can switch it on)
      fns.append(table[name])
      names.append(name)
      weights.append(weight)
  if rm.enabled and rm.kind == "orm" and rm.weight:
    names.append("reward_model")
    weights.append(rm.weight)
  learned = rm.enabled and (rm.kind == "prm" or rm.weight)
  if not fns and not learned and r.paradigm.coefficient != "process":
    raise ConfigError("config.grpo.rewards: all weights are 0; GRPO needs at least one reward")
  return Rewards(tuple(fns), tuple(names), tuple(weights))
