r"""Evaluate a run's checkpoint, or a Hugging Face model, on a task: greedy pass@1 (strict and
lenient), pass@k and maj@k, as a JSON file, a Markdown table beside it, and the table printed.

  python -m experiments.eval --workdir=/tmp/arith                    # its latest checkpoint
  python -m experiments.eval --workdir=/tmp/arith --step=200 --num_problems=0 --k=8 \
      --out=/tmp/arith_step200.json                                  # + /tmp/arith_step200.md
  python -m experiments.eval --hf_checkpoint=/models/Qwen2.5-0.5B-Instruct \
      --config=experiments/configs/gsm8k.py:qwen2.5-0.5b    # GSM8K: hf:openai/gsm8k:main

--workdir: the run's own config.json says the task, prompts, tokenizer, model and decoding, and
the figures are computed exactly as the trainer's eval (`grpo_jax.evaluation`, the same sampling
keys at the checkpoint's GRPO step), so with the run's eval settings they equal its last
`eval/*` row in metrics.jsonl. --hf_checkpoint with --config (any config of experiments/train.py,
`--config.key=value` overrides): that model (full weights, no LoRA) on the config's task.

Readings of an answer: strict counts only a number after `####` (the GSM8K protocol); lenient
also takes the last number of the text (`eval/accuracy`, the trainer's figure). --num_problems
(0: all) is capped by the eval split the config loads (config.data.num_eval). Progress is printed
per decoded batch. A bad workdir or config is a one-line error with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Optional

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax import evaluation, experiment, paths, runs, settings, weights
from grpo_jax import progress as progress_lib


@dataclasses.dataclass(frozen=True)
class Report:
  """One evaluation: what was evaluated, on what, and the figures."""
  model: str                  # the workdir, or the HF checkpoint directory
  step: Optional[int]         # the checkpoint's step (None: an HF model)
  task: str
  num_problems: int           # greedy problems
  accuracy_strict: float      # greedy pass@1, only "#### N" counts
  accuracy_lenient: float     # greedy pass@1, the last number as fallback (eval/accuracy)
  format: float               # greedy completions with a "#### N" line
  k: int
  pass_k_problems: int        # problems behind pass@k / maj@k (0: none)
  pass_at_k: Optional[float]
  pass_at_k_strict: Optional[float]
  maj_at_k: Optional[float]
  maj_at_k_strict: Optional[float]
  decoding: dict              # of the k samples (greedy pass@1 is argmax)
  curve: dict                 # K -> [pass@K, maj@K] (lenient) for K = 1, 2, 4, .. <= k
  figures: dict               # under metrics.jsonl's names (eval/accuracy, eval/pass_at_8, ...)
  samples: list               # the first eval.log_samples greedy completions, as samples.jsonl
  eval_s: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def markdown(self) -> str:
    """The result as a Markdown table: one row per figure, strict beside lenient."""
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    where = self.model if self.step is None else f"{self.model} (step {self.step})"
    lines = [f"**{where}** on {self.task}", "",
             "| figure | problems | strict | lenient |", "|---|---|---|---|",
             f"| greedy pass@1 | {self.num_problems} | {fmt(self.accuracy_strict)} | "
             f"{fmt(self.accuracy_lenient)} |"]
    if self.pass_k_problems:
      lines += [f"| pass@{self.k} | {self.pass_k_problems} | {fmt(self.pass_at_k_strict)} | "
                f"{fmt(self.pass_at_k)} |",
                f"| maj@{self.k} | {self.pass_k_problems} | {fmt(self.maj_at_k_strict)} | "
                f"{fmt(self.maj_at_k)} |"]
    lines.append(f"| format (#### N) | {self.num_problems} | {fmt(self.format)} | |")
    return "\n".join(lines) + "\n"


def eval_overrides(num_problems: Optional[int] = None, k: Optional[int] = None,
                   pass_k_problems: Optional[int] = None) -> dict[str, Any]:
  """The config fields the command-line sizes set (None: the config's own)."""
  out = {"eval.num_problems": num_problems, "eval.k": k, "eval.pass_k_problems": pass_k_problems}
  return {key: value for key, value in out.items() if value is not None}


def evaluate_workdir(workdir: str, step: Optional[int] = None, *,
                     overrides: Mapping[str, Any] | None = None, progress=None) -> Report:
  """The run's checkpoint `step` (default: latest) on its own task, at its GRPO step's keys."""
  run = runs.load_run(workdir, step, overrides=overrides)
  t0 = time.perf_counter()
  result = _evaluate(run.experiment, run.device_params(), run.phase_step, progress)
  return _report(run.experiment, result, run.workdir, run.step, time.perf_counter() - t0)


def evaluate_hf(hf_checkpoint: str, cfg, *, overrides: Mapping[str, Any] | None = None,
                progress=None) -> Report:
  """The HF model in `hf_checkpoint` on the task of config `cfg` (its model fields replaced)."""
  path = runs.resolve(hf_checkpoint)
  if not (paths.as_path(path) / "config.json").is_file():
    raise settings.ConfigError(f"--hf_checkpoint={path}: no config.json there (a Hugging Face "
                               "model directory holds config.json and model.safetensors)")
  model = {"model.hf_checkpoint": path, "model.lora.rank": 0, "init_from": "", "sft.steps": 0}
  cfg = runs.apply_overrides(cfg, {**model, **(overrides or {})})
  s = settings.from_config(cfg, jax.device_count())
  with tempfile.TemporaryDirectory() as scratch:  # build's workdir: nothing is written there
    exp = experiment.build(s, scratch)
  t0 = time.perf_counter()
  device = exp.device
  result = _evaluate(exp, jax.device_put(device.host_params, device.params_sh), 0, progress)
  return _report(exp, result, path, None, time.perf_counter() - t0)


def _evaluate(exp, params, step: int, progress) -> evaluation.EvalResult:
  """`evaluation.evaluate` of `params` (any dtype, on the mesh) at GRPO step `step`'s keys."""
  return evaluation.evaluate(exp.data, exp.device.programs, exp.settings.eval,
                             weights.decode_params(exp.device, params), exp.keys, step,
                             progress=progress)


def _report(exp, result, model: str, step: Optional[int], seconds: float) -> Report:
  e, r = exp.settings.eval, exp.settings.rollout
  decoding = dict(dataclasses.asdict(e.decoding), max_new_tokens=r.max_completion_length + 1)
  return Report(
      model=model, step=step, task=exp.settings.data.task, num_problems=result.num_problems,
      accuracy_strict=result.accuracy_strict, accuracy_lenient=result.accuracy,
      format=result.format, k=result.k, pass_k_problems=result.pass_k_problems,
      pass_at_k=result.pass_at_k, pass_at_k_strict=result.pass_at_k_strict,
      maj_at_k=result.maj_at_k, maj_at_k_strict=result.maj_at_k_strict, decoding=decoding,
      curve={int(K): list(v) for K, v in result.curve.items()},
      figures=result.figures(), samples=result.samples, eval_s=seconds)


def write_report(report: Report, out: str) -> tuple[str, str]:
  """`out` (.json) and the Markdown table beside it (.md); returns both paths."""
  md = os.path.splitext(out)[0] + ".md"
  paths.as_path(out).parent.mkdir(parents=True, exist_ok=True)
  paths.as_path(out).write_text(json.dumps(report.to_json(), indent=2) + "\n")
  paths.as_path(md).write_text(report.markdown())
  return out, md


def progress_printer(file=sys.stderr):
  """progress(what, done, total) for `evaluation.evaluate`: a line per decoded batch with the
  elapsed time and ETA, one counter per pass (greedy, samples)."""
  bars: dict[str, progress_lib.Progress] = {}

  def show(what: str, done: int, total: int) -> None:
    bar = bars.setdefault(what, progress_lib.Progress(
        total, f"eval {what} batch", print_fn=lambda line: print(line, file=file, flush=True)))
    bar.update(done)

  return show


# ----------------------------------------------------------------------------- command line


def _define_flags() -> None:
  """Defined when run as a program only (tests import this module beside other launchers)."""
  flags.DEFINE_string("workdir", None, "A run's workdir: evaluate its latest (or --step) "
                      "checkpoint with its own config.")
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
  flags.DEFINE_string("hf_checkpoint", None, "A Hugging Face model directory to evaluate on the "
                      "task of --config.")
  config_flags.DEFINE_config_file("config", None, "With --hf_checkpoint: an experiment config "
                                  "file[:arg] (experiments/configs/), --config.key=value "
                                  "overrides.", lock_config=True)
  flags.DEFINE_integer("num_problems", None, "Greedy problems (0: the whole eval split; "
                       "default: the config's eval.num_problems).")
  flags.DEFINE_integer("k", None, "Samples per problem for pass@k / maj@k (1: none; default: "
                       "the config's eval.k).")
  flags.DEFINE_integer("pass_k_problems", None, "Problems for pass@k / maj@k (default: the "
                       "config's eval.pass_k_problems).")
  flags.DEFINE_string("out", None, "Write the result to this .json file and the table to the "
                      ".md file beside it.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.hf_checkpoint):
    raise app.UsageError("give --workdir (a run) or --hf_checkpoint with --config (a model)")
  if f.workdir and f.config is not None:
    raise app.UsageError("--config goes with --hf_checkpoint; a workdir's config is its "
                         "config.json")
  if f.hf_checkpoint and (f.config is None or f.step is not None):
    raise app.UsageError("--hf_checkpoint needs --config (the task) and takes no --step")
  if f.out and not f.out.endswith(".json"):
    raise app.UsageError(f"--out={f.out}: name a .json file (the table goes beside it, .md)")
  overrides = eval_overrides(f.num_problems, f.k, f.pass_k_problems)
  try:
    if f.workdir:
      report = evaluate_workdir(f.workdir, f.step, overrides=overrides,
                                progress=progress_printer())
    else:
      report = evaluate_hf(f.hf_checkpoint, f.config, overrides=overrides,
                           progress=progress_printer())
  except settings.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report.markdown(), flush=True)
  if f.out:
    print("wrote " + " and ".join(write_report(report, f.out)), flush=True)


def _parse_flags(argv):
  """absl flag parsing, with a one-line error (not a traceback) for a bad config flag."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    print(f"error: bad flag or config override: {e}\n(see --help)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  logging.get_absl_handler().addFilter(runs.QuietOrbax())
  app.run(main, flags_parser=_parse_flags)
