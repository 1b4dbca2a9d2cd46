"""Host-side task data: records, tokenizer, model, encoded prompts / teacher targets, the episode
environment, and the loader of your own functions ("module:function" / "file.py:function").

Everything here runs once at set-up, on NumPy and Python, and errors name the config field or
the file at fault (ConfigError) before anything compiles. The reward table (which functions
score a rollout, what they receive, their check before training) is grpo_jax/reward_table.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from grpo_jax import models, paths
from grpo_jax import tokenizer as tokenizer_lib
from grpo_jax import tokenizer_training
from grpo_jax.data import arithmetic, chat, prompts, tool_arithmetic
from grpo_jax.data import records as records_lib
from grpo_jax.settings import ConfigError, RolloutSettings, Settings


@dataclasses.dataclass(frozen=True)
class Task:
  """Records: every source column as written, plus `question`, `solution` (worked solution) and
  `final_answer` (grpo_jax/data/records.py)."""
  train: list[dict]       # GRPO prompts
  sft: list[dict]         # warm-start targets (may hold a flawed teacher's solutions)
  eval: list[dict]        # held out
  prompt: Callable[[dict], str]  # record -> prompt text


class Prompts(NamedTuple):
  """Left-padded prompt tokens of a whole split, encoded once; rows picked by index."""
  ids_NxL: np.ndarray
  mask_NxL: np.ndarray
  num_truncated: int


class Targets(NamedTuple):
  """Right-padded teacher solutions + EOS, [N, C] (rows cut at C)."""
  ids_NxC: np.ndarray
  mask_NxC: np.ndarray


def load_task(s: Settings) -> Task:
  """The configured records (generated arithmetic, or your files / HF dataset) and prompt."""
  d = s.data
  if d.task in ("arithmetic", "multistep"):
    train, heldout = arithmetic.make_splits(
        d.num_train, d.num_eval, d.seed, flaw_p=d.flaw_p,
        config=arithmetic.MULTISTEP if d.task == "multistep" else arithmetic.ArithmeticConfig())
  elif d.task == "tool_arithmetic":
    train, heldout = tool_arithmetic.make_splits(d.num_train, d.num_eval, d.seed,
                                                 tool_p=d.tool_p)
  else:
    train, heldout = _load_records(d)
  if not train or not heldout:
    raise ConfigError("config.data: empty train or eval set")
  task = Task(train=train, sft=train, eval=heldout, prompt=prompt_fn(s))
  for name, rows in (("train", train), ("eval", heldout)):
    try:
      task.prompt(rows[0])
    except KeyError as e:
      raise ConfigError(f"config.data.prompt_template = {d.prompt_template!r} names column {e} "
                        f"that the {name} records lack; they have {sorted(rows[0])}") from None
  return task


def _load_records(d) -> tuple[list[dict], list[dict]]:
  try:
    train = records_lib.load_split(d.path, d.train_split, d.fields)
    if d.eval_split:
      heldout = records_lib.load_split(d.path, d.eval_split, d.fields)
    else:  # one file: its last num_eval records are held out
      if len(train) <= d.num_eval:
        raise ValueError(f"{d.path} has {len(train)} records, not more than config.data.num_eval"
                         f" = {d.num_eval} to hold out")
      train, heldout = train[:-d.num_eval], train[-d.num_eval:]
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise ConfigError(f"config.data.path: {e}") from None
  limit = lambda rows, n: rows[:n] if n else rows  # noqa: E731
  return limit(train, d.num_train), limit(heldout, d.num_eval)


def prompt_fn(s: Settings) -> Callable[[dict], str]:
  """record -> prompt text: `data.prompt_template` over the record's columns (the user turn),
  inside the chat template if one is configured ("checkpoint": the HF checkpoint's Jinja
  template from its tokenizer_config.json; a name of the built-in table: the fallback)."""
  d = s.data
  fill = lambda rec: d.prompt_template.format_map(rec)  # noqa: E731
  if not d.chat_template:
    return fill
  if d.chat_template in prompts.CHAT_TEMPLATES:
    template = prompts.CHAT_TEMPLATES[d.chat_template]
    system = d.system_prompt or prompts.DEFAULT_SYSTEM
    return lambda rec: prompts.chat_prompt(fill(rec), template, system=system)
  source = s.tokenizer_path or s.model.hf_checkpoint
  if d.chat_template == "checkpoint":
    if not source:
      raise ConfigError("config.data.chat_template = 'checkpoint' needs config.model.hf_checkpoint"
                        " (or config.tokenizer.path): the directory whose tokenizer_config.json "
                        "holds the template")
    source = str(paths.as_path(source) if paths.as_path(source).is_dir()
                 else paths.as_path(source).parent)
    try:
      template = chat.load_template(source)
    except ValueError as e:
      raise ConfigError(f"config.data.chat_template: {e}") from None
    if template is None:
      raise ConfigError(f"config.data.chat_template = 'checkpoint': {source} has no chat template"
                        " (tokenizer_config.json 'chat_template' or chat_template.jinja); use a "
                        f"built-in one: {sorted(prompts.CHAT_TEMPLATES)}, or '' for plain text")
  else:
    raise ConfigError(f"config.data.chat_template = {d.chat_template!r}: '' (plain prompt), "
                      f"'checkpoint', or one of {sorted(prompts.CHAT_TEMPLATES)}")
  try:
    render = chat.prompt_fn(template, system=d.system_prompt,
                            template_kwargs=dict(d.chat_template_kwargs))
    render("test")  # a template that cannot render fails here, naming the config field
  except ImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (jinja2's errors)
    raise ConfigError(f"config.data.chat_template: the template from {source} does not render: "
                      f"{type(e).__name__}: {e}") from None
  return lambda rec: render(fill(rec))


def build_tokenizer(s: Settings, workdir: str, task: Task) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, or a SentencePiece model trained on the task (offline default)."""
  path = s.tokenizer_path or s.model.hf_checkpoint
  if not path and s.init_from:
    path = str(paths.as_path(s.init_from) / "tokenizer.model")
  if path:
    if not paths.as_path(path).exists():
      raise ConfigError(f"config.tokenizer.path: {path} does not exist")
    try:
      if not paths.is_local(path) and paths.as_path(path).is_file():
        return tokenizer_lib.SentencePieceTokenizer(model_proto=paths.as_path(path).read_bytes())
      return tokenizer_lib.load_tokenizer(paths.local_dir(path))
    except (ValueError, FileNotFoundError, OSError) as e:
      raise ConfigError(f"config.tokenizer.path: cannot load a tokenizer from {path}: {e}") from None
  model_file = paths.as_path(workdir) / "tokenizer.model"
  if model_file.exists():  # resume: the same tokenizer, bit for bit
    return tokenizer_lib.SentencePieceTokenizer(model_proto=model_file.read_bytes())
  texts = [task.prompt(r) + " " + r["solution"] for r in task.train]
  if jax.process_index() != 0:
    raise ConfigError("multi-host runs need config.tokenizer.path (train it once beforehand)")
  tokenizer = tokenizer_training.train_sentencepiece(texts, vocab_size=s.tokenizer_vocab_size)
  model_file.parent.mkdir(parents=True, exist_ok=True)
  model_file.write_bytes(tokenizer.model_proto)
  return tokenizer


def build_model(s: Settings, tokenizer) -> tuple[models.ModelConfig, object]:
  """(model config, host params, or None to initialise randomly)."""
  m = s.model
  if m.hf_checkpoint:
    if not paths.as_path(m.hf_checkpoint).exists():
      raise ConfigError(f"config.model.hf_checkpoint: {m.hf_checkpoint} does not exist")
    model_config, params = models.load_hf_checkpoint(paths.local_dir(m.hf_checkpoint),
                                                     dtype=m.param_dtype)
    model_config = dataclasses.replace(model_config, dtype=m.dtype, **model_fields(m))
    return model_config, models.to_layout(params, model_config.scan_layers)
  overrides = dict(m.overrides)
  overrides.setdefault("vocab_size", tokenizer.vocab_size)
  for name in ("param_dtype", "dtype", "scan_layers", "remat"):
    if name in overrides:
      raise ConfigError(f"config.model.overrides.{name}: set config.model.{name} instead")
  model_config = models.get_config(m.preset, param_dtype=m.param_dtype, dtype=m.dtype,
                                   **model_fields(m), **overrides)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model: vocab_size {model_config.vocab_size} < the tokenizer's "
                      f"{tokenizer.vocab_size}")
  return model_config, None


def model_fields(m) -> dict:
  """The ModelConfig fields that config.model sets whatever the weights' source."""
  return dict(lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_targets=m.lora.targets,
              scan_layers=m.scan_layers, remat=m.remat)


def encode_prompts(tokenizer, task: Task, records: Sequence[dict], r: RolloutSettings) -> Prompts:
  texts = [task.prompt(rec) for rec in records]
  try:
    out = tokenizer.encode_batch_padded(texts, max_length=r.max_prompt_length,
                                        truncate=r.prompt_truncation)
  except ValueError as e:
    raise ConfigError(f"config.grpo.max_prompt_length = {r.max_prompt_length}: {e}") from None
  return Prompts(out.ids_NxL, out.mask_NxL, out.num_truncated)


def encode_targets(tokenizer, records: Sequence[dict], max_len: int, env=None) -> Targets:
  """Teacher solutions + EOS. With an environment that splits solutions into policy and
  observation parts (`teacher_segments`, e.g. the Python tool's), each part is encoded on its own
  (as a rollout encodes observations) and observations get mask 0: no loss on the tool's text."""
  ids = np.full((len(records), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(records), max_len), np.int32)
  split = getattr(env, "teacher_segments", None)
  for i, rec in enumerate(records):
    parts = split(rec["solution"]) if split else [(rec["solution"], False)]
    seq, weight = [], []
    for n, (text, is_obs) in enumerate(parts):
      enc = tokenizer.encode((" " if n == 0 else "") + text)
      seq += enc
      weight += [0 if is_obs else 1] * len(enc)
    seq, weight = (seq + [tokenizer.eos_id])[:max_len], (weight + [1])[:max_len]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = weight
  return Targets(ids, mask)


def make_env(s: Settings, env=None, workdir: str = ""):
  """The episode environment of config.tools (None: single-turn sampling): `env` given from
  Python, the sandboxed Python tool ("python"; `workdir`, the run's directory, is hidden from
  the code besides tools.hidden_paths), or "module:factory" / "file.py:factory" called with
  the ToolSettings."""
  t = s.tools
  if env is not None:
    return env
  if t is None or not t.enabled:
    return None
  if t.env == "python":
    from grpo_jax import python_tool
    local = [os.path.abspath(workdir)] if workdir and "://" not in workdir else []
    return python_tool.PythonTool(
        stop_strings=t.stop_strings, code_pattern=t.code_pattern,
        observation_template=t.observation_template, timeout_s=t.timeout_s,
        memory_mb=t.memory_mb, hidden_paths=tuple(local) + t.hidden_paths)
  factory = load_reward_fn(t.env, "config.tools.env")
  made = factory(t)
  for name in ("reset", "step", "stop_strings"):
    if not hasattr(made, name):
      raise ConfigError(f"config.tools.env = {t.env!r} returned {type(made).__name__}, which has "
                        f"no {name!r} (see grpo_jax/multiturn.py Environment)")
  return made


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


def load_reward_fn(spec: str, field: str) -> Callable:
  """"package.module:function" (importable) or "path/to/file.py:function" -> the function."""
  target, _, attr = spec.rpartition(":")
  if not target or not attr:
    raise ConfigError(f"{field} = {spec!r}: expected 'module:function' or 'file.py:function'")
  try:
    if target.endswith(".py"):
      if not os.path.isfile(target):
        raise ConfigError(f"{field} = {spec!r}: file {target} does not exist")
      name = "grpo_jax_user_rewards." + os.path.splitext(os.path.basename(target))[0]
      module_spec = importlib.util.spec_from_file_location(name, target)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(target)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the user's module failed to import)
    raise ConfigError(f"{field} = {spec!r}: cannot import {target}: {type(e).__name__}: {e}"
                      ) from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ConfigError(f"{field} = {spec!r}: {target} has no function {attr!r}")
  return fn
