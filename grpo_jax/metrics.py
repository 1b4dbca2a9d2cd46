"""Run metrics: JSON lines, TensorBoard event files, optional W&B, sample logs.

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, wandb=settings.wandb)
    writer.write(step, "grpo", {"reward": 0.62, "kl": 3e-3, "eval/accuracy": 0.71})
    writer.write_histograms(step, "grpo", {"rewards": rewards_N, "completion_length": len_N})
    writer.write_text(step, "grpo", {"sample": "Q: ... A: #### 42"})

`workdir/metrics.jsonl` holds one JSON object per line: `step`, `phase`, `time` (Unix seconds) and
the figures. Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity" (JSON has
no literal for them) and `read_metrics` turns them back into floats. On a local disk each line is
flushed as it is written, so a killed run loses nothing already logged.

`workdir/tb/events.out.tfevents.*` holds the same scalars for TensorBoard, tagged `phase/name`
(`grpo/reward`, `grpo/eval/accuracy`), plus histograms and text, encoded by `grpo_jax.tensorboard`
(no TensorFlow needed), which also reads them back (`tensorboard.read_tensorboard_scalars`).

W&B (`wandb=` settings with a mode): the same scalars under the same `phase/name` keys, each
phase plotted against its own `phase/step` (W&B's `_step` is the metrics.jsonl line number, which
a resumed run reproduces); the run id is kept in `workdir/wandb_run_id`, so a resumed run
continues the same W&B run.

Every file goes through `paths.as_path`: `workdir` may be a local path, a `file://` URL, or
`gs://...` where the cloud libraries are installed. Object stores cannot append and publish an
object only when it is closed, so there a growing file (`jsonl.GrowingFile`) is held in memory
and rewritten whole by the first write `jsonl.SYNC_S` seconds after the last rewrite, by
`MetricsWriter.flush()` (call it before a checkpoint) and at close.

Console progress (bars, printed or logged lines) is `grpo_jax/progress.py`.
"""

from __future__ import annotations

import html
import json
import numbers
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging
from etils import epath

from grpo_jax import paths, tensorboard
from grpo_jax.jsonl import (GrowingFile, complete_lines, from_json_value, json_line, read_jsonl,
                            to_json_value)
from grpo_jax.progress import format_number

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"
WANDB_RUN_ID_FILE = "wandb_run_id"
CONFIG_FILE = "config.json"       # written by trainer.train; W&B shows it as the run's config
RESERVED_KEYS = ("step", "phase", "time")
WANDB_MODES = ("", "online", "offline", "disabled")  # "" and "disabled": no W&B (no import)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`, in order, with "NaN"/"Infinity" strings as floats."""
  path = paths.as_path(workdir) / METRICS_FILE
  if not path.exists():
    raise FileNotFoundError(f"no metrics file: {path}")
  return [{k: (v if k in RESERVED_KEYS else from_json_value(v)) for k, v in row.items()}
          for row in read_jsonl(path)]


def _sample_lines(step: int, rows: Sequence[Mapping[str, Any]], phase: str | None) -> bytes:
  head = {"step": int(step)} if phase is None else {"step": int(step), "phase": phase}
  return b"".join(json_line(head | to_json_value(dict(row), f"samples[{i}]"))
                  for i, row in enumerate(rows))


def sample_text(row: Mapping[str, Any]) -> str:
  """A samples.jsonl row as text for `MetricsWriter.write_text`: its string fields in full (the
  prompt or question, the completion), then its number and bool fields on one line."""
  texts = [f"{k}:\n{v}" for k, v in row.items() if isinstance(v, str)]
  figures = [f"{k} {v}" if isinstance(v, (bool, np.bool_)) else f"{k} {format_number(v)}"
             for k, v in row.items() if isinstance(v, (numbers.Number, np.bool_))]
  return "\n\n".join(texts + ([", ".join(figures)] if figures else []))


def write_samples(workdir: str | os.PathLike, step: int, rows: Sequence[Mapping[str, Any]],
                  *, phase: str | None = None) -> None:
  """Append sample completions to `workdir/samples.jsonl`, one line each: `step` (and `phase`)
  plus the row's fields (prompt, completion, reward, ...). Call on one process only. On an object
  store each call rewrites the file; a `MetricsWriter`'s `write_samples` does not."""
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with GrowingFile(workdir / SAMPLES_FILE) as f:
    f.write(_sample_lines(step, rows, phase))


# ----------------------------------------------------------------------------------------------
# Weights & Biases (optional).


class WandbSettingsLike(Protocol):
  """What `MetricsWriter(wandb=...)` reads (`settings.WandbSettings`, or any such object)."""
  project: str
  entity: str
  mode: str   # "online" | "offline" | "disabled"; "" = off
  name: str


def _import_wandb():
  """The wandb module, imported only when a run asks for it."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("config.wandb.mode is set, but the wandb package is not installed: "
                      "pip install 'grpo_jax[wandb]'") from e
  return wandb


def _start_wandb(workdir: epath.Path, settings: WandbSettingsLike, *, resume: bool):
  """The W&B run for `workdir`, or None when `settings.mode` is "" / "disabled".

  A resumed run (`resume`: it kept metrics lines) continues the run whose id is in
  `workdir/wandb_run_id`; otherwise a new id is drawn and stored there. The run's config is
  `workdir/config.json` where it exists. A local workdir also holds W&B's files (`wandb/`)
  unless WANDB_DIR says otherwise."""
  if settings.mode not in WANDB_MODES:
    raise ValueError(f"wandb mode {settings.mode!r}: expected one of {WANDB_MODES}")
  if settings.mode in ("", "disabled"):
    return None
  wandb = _import_wandb()
  id_file = workdir / WANDB_RUN_ID_FILE
  run_id = id_file.read_text().strip() if resume and id_file.exists() else ""
  if not run_id:
    run_id = secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
  config = None
  if (workdir / CONFIG_FILE).exists():
    try:
      config = json.loads((workdir / CONFIG_FILE).read_text())
    except json.JSONDecodeError:
      logging.warning("%s is not JSON; the W&B run gets no config", workdir / CONFIG_FILE)
  local_dir = str(workdir) if paths.is_local(workdir) and not os.environ.get("WANDB_DIR") else None
  return wandb.init(project=settings.project or None, entity=settings.entity or None,
                    name=settings.name or None, mode=settings.mode, id=run_id, resume="allow",
                    dir=local_dir, config=config)


def _numeric(row: Mapping[str, Any], phase: str) -> dict[str, float]:
  """The row's numbers as floats (non-finite included), tagged `phase/name`."""
  return {f"{phase}/{name}": float(from_json_value(value)) for name, value in row.items()
          if name not in RESERVED_KEYS and isinstance(from_json_value(value), (int, float))}


def _literal_markdown(text: str) -> str:
  """`text` as a Markdown code block (4-space indent), so TensorBoard shows it as written: a
  completion's "#### 42" line is not a heading."""
  return "\n".join("    " + line for line in text.split("\n"))


# ----------------------------------------------------------------------------------------------
# The writer.


class MetricsWriter:
  """Appends figures to `workdir/metrics.jsonl`, `workdir/tb/` and (optionally) W&B; a no-op
  when `enabled=False` (non-zero processes of a multi-host run).

  `truncate_to=N` keeps the first N lines of metrics.jsonl: a run resumed from a checkpoint
  that recorded `writer.num_lines` drops the lines it is about to write again, so the file ends
  up as an uninterrupted run would have left it. A half-written last line is always dropped.
  (TensorBoard files are never rewritten; each writer opens a new one, and TensorBoard shows the
  re-run steps twice. W&B ignores the re-run lines it already has: its step is the line number.)

  `wandb`: settings with `project`, `entity`, `mode`, `name`; W&B is imported only when `mode`
  is "online" or "offline". A writer that keeps no metrics line starts a new W&B run; one that
  keeps some continues the run named in `workdir/wandb_run_id`.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               truncate_to: int | None = None, wandb: WandbSettingsLike | None = None):
    self.workdir = paths.as_path(workdir)
    self.enabled = enabled
    self.path = self.workdir / METRICS_FILE
    self._num_lines = 0
    self._tb: GrowingFile | None = None
    self._lines: GrowingFile | None = None
    self._samples: GrowingFile | None = None
    self._wandb = None
    self._wandb_phases: set[str] = set()
    self._wandb_first_line = 0
    if not enabled:
      return
    (self.workdir / TB_DIR).mkdir(parents=True, exist_ok=True)
    try:
      kept = complete_lines(self.path, truncate_to)
    except ValueError:
      if paths.is_local(self.path):
        raise
      # An object store holds what was published before the run was killed: fewer lines than
      # the checkpoint counted. Keep them all; the lost ones leave a gap.
      logging.warning("%s has fewer than the %d lines the checkpoint recorded (lines written "
                      "after the last upload were lost); keeping all it has", self.path,
                      truncate_to)
      kept = complete_lines(self.path)
    self._num_lines = kept.count(b"\n")
    self._lines = GrowingFile(self.path, kept)
    self._tb = GrowingFile(self.workdir / TB_DIR / tensorboard.event_file_name(), b"")
    self._write_event(tensorboard.encode_event(time.time(), 0,
                                               file_version=tensorboard.FILE_VERSION))
    if wandb is not None:
      self._wandb = _start_wandb(self.workdir, wandb, resume=self._num_lines > 0)
      # Lines below a resumed run's first step are in W&B already (a re-run repeats them).
      self._wandb_first_line = getattr(self._wandb, "starting_step", 0) or 0

  @property
  def num_lines(self) -> int:
    """Lines in metrics.jsonl so far (store it in a checkpoint to truncate on resume)."""
    return self._num_lines if self.enabled else 0

  def write(self, step: int, phase: str, metrics: Mapping[str, Any]) -> dict:
    """Log `metrics` at `step` of `phase`; returns the JSON row written (or that would be)."""
    clash = [k for k in metrics if k in RESERVED_KEYS]
    if clash:
      raise ValueError(f"metric names {clash} are reserved (step, phase, time)")
    now = time.time()
    row = {"step": int(step), "phase": phase, "time": now}
    row |= {name: to_json_value(value, name) for name, value in metrics.items()}
    if not self.enabled:
      return row
    self._lines.write(json_line(row))
    self._num_lines += 1
    scalars = _numeric(row, phase)
    if scalars:
      self._write_event(tensorboard.encode_event(now, int(step), scalars=scalars))
    self._log_wandb(step, phase, scalars)
    return row

  def write_histograms(self, step: int, phase: str, arrays: Mapping[str, Any]) -> None:
    """Histograms of arrays (any shape; non-finite entries left out) at `step` of `phase`, tagged
    `phase/name`: rewards, advantages, completion lengths. TensorBoard and W&B only."""
    finite = {f"{phase}/{name}": _finite(array) for name, array in arrays.items()}
    finite = {tag: x for tag, x in finite.items() if x.size}
    if not self.enabled or not finite:
      return
    self._write_event(tensorboard.encode_event(time.time(), int(step), histograms=finite))
    if self._wandb is not None:
      wandb = _import_wandb()
      self._log_wandb(step, phase, {tag: wandb.Histogram(x, num_bins=tensorboard.HISTOGRAM_BUCKETS)
                                    for tag, x in finite.items()})

  def write_text(self, step: int, phase: str, texts: Mapping[str, str], *,
                 markdown: bool = False) -> None:
    """Text at `step` of `phase` (sample completions), tagged `phase/name`; shown as written
    unless `markdown`. TensorBoard and W&B only (samples.jsonl keeps the full records)."""
    if not self.enabled or not texts:
      return
    shown = {f"{phase}/{name}": (text if markdown else _literal_markdown(text))
             for name, text in texts.items()}
    self._write_event(tensorboard.encode_event(time.time(), int(step), texts=shown))
    if self._wandb is not None:
      wandb = _import_wandb()
      self._log_wandb(step, phase, {f"{phase}/{name}": wandb.Html(
          f"<pre>{html.escape(text)}</pre>") for name, text in texts.items()})

  def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]], *,
                    phase: str | None = None) -> None:
    """`write_samples(workdir, ...)` through a file kept open (no rewrite per call on gs://)."""
    if not self.enabled:
      return
    if self._samples is None:
      self._samples = GrowingFile(self.workdir / SAMPLES_FILE)
    self._samples.write(_sample_lines(step, rows, phase))

  def _write_event(self, payload: bytes) -> None:
    self._tb.write(tensorboard.tfrecord(payload))

  def _log_wandb(self, step: int, phase: str, data: Mapping[str, Any]) -> None:
    """`data` into the W&B row of the last metrics line (W&B's `_step` is the line number, so
    histograms and text join their step's scalars), with `phase/step` as the phase's x axis."""
    if self._wandb is None or not data:
      return
    line = max(self._num_lines - 1, 0)
    if line < self._wandb_first_line:
      return
    if phase not in self._wandb_phases:
      self._wandb.define_metric(f"{phase}/step")
      self._wandb.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
      self._wandb_phases.add(phase)
    self._wandb.log({**data, f"{phase}/step": int(step)}, step=line)

  def flush(self) -> None:
    """Publish every file now (object stores; local files are always current). Call it before
    a checkpoint records `num_lines`, so a killed run's resume finds all the lines it counts."""
    for f in (self._lines, self._tb, self._samples):
      if f is not None:
        f.sync()

  def close(self) -> None:
    for f in (self._lines, self._tb, self._samples):
      if f is not None:
        f.close()
    self._lines = self._tb = self._samples = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _finite(array: Any) -> np.ndarray:
  x = np.asarray(array, np.float64).ravel()
  return x[np.isfinite(x)]
