"""Export a run's policy as a Hugging Face checkpoint (transformers, vLLM, lm-eval load it).

  python -m tools.export_hf --workdir=/tmp/gsm8k_qwen --out=/tmp/gsm8k_qwen_hf
  python -m tools.export_hf --workdir=/tmp/arith --out=/tmp/arith_hf --step=200 --dtype=bfloat16

Writes into --out:
  config.json, model.safetensors  the policy of the latest (or --step) checkpoint; with LoRA the
                                  adapters merged into their base (models.save_hf_checkpoint);
                                  --dtype casts the weights (default: the run's model.param_dtype)
  tokenizer files                 copied from where the run read its tokenizer (tokenizer.json,
                                  tokenizer_config.json, special_tokens_map.json, tokenizer.model,
                                  ... of model.hf_checkpoint or tokenizer.path), or the workdir's
                                  trained SentencePiece `tokenizer.model` (the offline default),
                                  with a tokenizer_config.json for transformers' Llama tokenizer
                                  (legacy=False: the same ids as ours on the task's text; text
                                  with leading spaces or unseen characters may differ)
  generation_config.json          bos / pad ids, eos_token_id = the run's stop ids (the tokenizer's
                                  eos + config grpo.stop_tokens), and the eval decoding (eval.
                                  temperature / top_p / top_k / min_p, completion budget)

--out is a local path or a gs:// URL (workdirs too). It is written as `<out>.tmp` (on local
disk first when remote) and renamed (paths.write_dir): complete or absent. An existing --out
is replaced only when it holds a previous export (config.json + model.safetensors). A bad workdir
(missing, no config.json, no or an unreadable checkpoint) is a one-line error, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from grpo_jax import models, paths, runs
from grpo_jax.settings import FLOAT_DTYPES, ConfigError, Settings

# What a Hugging Face tokenizer directory may hold; each one present is copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class Exported:
  """What `export` wrote."""
  out: str
  step: int
  dtype: str
  files: tuple[str, ...]


def export(workdir: str, out: str, *, step: Optional[int] = None,
           dtype: Optional[str] = None) -> Exported:
  """Writes the HF checkpoint of `workdir`'s checkpoint `step` (default: latest) to `out`."""
  out = _check_out(out, workdir)
  if dtype is not None and dtype not in FLOAT_DTYPES:
    raise ConfigError(f"--dtype={dtype!r}: expected one of {FLOAT_DTYPES}")
  run = runs.load_run(workdir, step)
  dtype = dtype or run.model_config.param_dtype
  eos_ids = list(dict.fromkeys(int(i) for i in run.experiment.data.eos_ids))

  def write(local: str) -> None:
    models.save_hf_checkpoint(local, dataclasses.replace(run.model_config, param_dtype=dtype,
                                                         dtype=dtype), _cast(run.params, dtype))
    _add_token_ids(os.path.join(local, "config.json"), run.tokenizer, eos_ids[0])
    _copy_tokenizer(run, local)
    with open(os.path.join(local, GENERATION_CONFIG), "w") as f:
      json.dump(generation_config(run.settings, run.tokenizer, eos_ids), f, indent=2)

  paths.write_dir(out, write)  # <out>.tmp, then renamed: whole or absent
  logging.info("exported %s step %d (%s) to %s", run.workdir, run.step, dtype, out)
  return Exported(out=out, step=run.step, dtype=dtype,
                  files=tuple(sorted(p.name for p in paths.as_path(out).iterdir())))


def _check_out(out: str, workdir: str) -> str:
  """`out` as an absolute path (or URL). Refuses an --out that would replace the workdir (or a
  directory above it), or anything that is not a previous export: the final rename replaces
  --out."""
  out, work = runs.resolve(out), runs.resolve(workdir)
  if work == out or work.startswith(out.rstrip("/") + "/"):
    raise ConfigError(f"--out={out} is the workdir {work} or a directory above it; choose a new "
                      "directory")
  target = paths.as_path(out)
  if target.exists() and not all((target / name).exists()
                                 for name in ("config.json", "model.safetensors")):
    raise ConfigError(f"--out={out} exists and is not a Hugging Face checkpoint (no config.json "
                      "and model.safetensors); choose a new directory or remove it")
  return out


def _cast(params, dtype: str):
  np_dtype = np.dtype(jnp.dtype(dtype))
  return jax.tree.map(lambda x: np.asarray(x).astype(np_dtype), params)


def tokenizer_source(s: Settings, workdir: str) -> str:
  """Where the run read its tokenizer (tasks.build_tokenizer's order): a file or directory."""
  if s.tokenizer_path or s.model.hf_checkpoint:
    return s.tokenizer_path or s.model.hf_checkpoint
  if s.init_from:
    return str(paths.as_path(s.init_from) / "tokenizer.model")
  return str(paths.as_path(workdir) / "tokenizer.model")


def _copy_tokenizer(run: runs.Run, out: str) -> None:
  """The tokenizer's files into the local directory `out`; a SentencePiece model alone gets a
  tokenizer_config.json (special tokens, no chat template) so that AutoTokenizer loads it."""
  source = paths.as_path(tokenizer_source(run.settings, run.workdir))
  if source.is_dir():
    files = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
  elif source.name.endswith(".json"):  # a tokenizer.json file: its directory's config files too
    files = {name: source.parent / name for name in TOKENIZER_FILES[1:3]
             if (source.parent / name).is_file()}
    files["tokenizer.json"] = source
  else:
    files = {"tokenizer.model": source}
  if not files:
    raise ConfigError(f"no tokenizer files in {source}")
  for name, path in files.items():
    with open(os.path.join(out, name), "wb") as f:
      f.write(path.read_bytes())
  if "tokenizer_config.json" not in files:
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump(_tokenizer_config(run), f, indent=2)


def _tokenizer_config(run: runs.Run) -> dict:
  """tokenizer_config.json for a bare SentencePiece model: transformers' Llama tokenizer reads
  `tokenizer.model`; the special tokens are the model's own pieces."""
  tok = run.tokenizer
  piece = getattr(tok, "id_to_piece", None)
  if piece is None:  # an HF tokenizer.json without a config: the vocabulary names them
    return {"tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": run.model_config.max_position_embeddings}
  out = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_eos_token": False,
         "add_bos_token": tok.bos_id is not None, "clean_up_tokenization_spaces": False,
         "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id),
         "model_max_length": run.model_config.max_position_embeddings}
  if tok.bos_id is not None:
    out["bos_token"] = piece(tok.bos_id)
  return out


def _add_token_ids(path: str, tokenizer, eos_id: int) -> None:
  """config.json with the special-token ids too (tools that read only config.json)."""
  with open(path) as f:
    hf = json.load(f)
  hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_id)
  with open(path, "w") as f:
    json.dump(hf, f, indent=2)


def generation_config(s: Settings, tokenizer, eos_ids: list[int]) -> dict[str, Any]:
  """generation_config.json: the run's stop ids and its eval decoding. HF's defaults differ from
  ours (top_k 50), so every filter is written, switched off explicitly when unused."""
  d = s.eval.decoding
  out: dict[str, Any] = {
      "bos_token_id": tokenizer.bos_id, "eos_token_id": eos_ids, "pad_token_id": tokenizer.pad_id,
      "do_sample": d.temperature > 0, "temperature": d.temperature or 1.0,
      "top_p": d.top_p or 1.0, "top_k": d.top_k or 0,
      "max_new_tokens": s.rollout.max_completion_length + 1}
  if d.min_p:
    out["min_p"] = d.min_p
  return out


# ----------------------------------------------------------------------------- command line


def _define_flags() -> None:
  """Defined when run as a program only, so that tests can import this module beside others
  that define --workdir."""
  flags.DEFINE_string("workdir", None, "The run's workdir (config.json, checkpoints/).")
  flags.DEFINE_string("out", None, "The HF checkpoint directory to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
  flags.DEFINE_enum("dtype", None, list(FLOAT_DTYPES), "Weight dtype (default: the run's "
                    "model.param_dtype).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    done = export(f.workdir, f.out, step=f.step, dtype=f.dtype)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {done.step} ({done.dtype}) to {done.out}: {', '.join(done.files)}",
        flush=True)


if __name__ == "__main__":
  _define_flags()
  logging.get_absl_handler().addFilter(runs.QuietOrbax())
  app.run(main)
