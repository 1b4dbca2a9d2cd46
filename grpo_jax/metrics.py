"""Run metrics: JSON lines, TensorBoard event files, sample logs, console progress.

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(step, "grpo", {"reward": 0.62, "kl": 3e-3, "eval/accuracy": 0.71})
    progress = Progress(total_steps=200, phase="grpo", every=10)
    progress.update(step, reward=0.62, acc=0.71, sample_s=0.31, update_s=0.22, tok_per_s=1200.)

`workdir/metrics.jsonl` holds one JSON object per line: `step`, `phase`, `time` (Unix seconds) and
the figures. Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity" (JSON has
no literal for them) and `read_metrics` turns them back into floats. Each line is flushed as it is
written, so a killed run loses nothing already logged.

`workdir/tb/events.out.tfevents.*` holds the same scalars for TensorBoard, tagged `phase/name`
(`grpo/reward`, `grpo/eval/accuracy`), encoded by `grpo_jax.tensorboard` (no TensorFlow needed).
`read_tensorboard_scalars` is re-exported here so callers reading a run need one module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
from absl import logging

from grpo_jax import tensorboard
from grpo_jax.tensorboard import read_tensorboard_scalars  # noqa: F401  (re-export)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"
RESERVED_KEYS = ("step", "phase", "time")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# ----------------------------------------------------------------------------------------------
# JSON lines.


def to_json_value(value: Any, name: str = "value") -> Any:
  """A figure as a JSON-safe Python value: jax/numpy scalars and size-1 arrays -> int/float/bool,
  non-finite floats -> "NaN"/"Infinity"/"-Infinity"; strings and None pass through; nested lists
  and dicts are converted element-wise. Raises ValueError naming `name` for anything else."""
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return _finite_or_name(float(value))
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # jax.Array, np.ndarray
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(f"{name}: expected a scalar, got an array of shape {array.shape}")
    return to_json_value(array.reshape(()).item(), name)
  if isinstance(value, Mapping):
    return {str(k): to_json_value(v, f"{name}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v, f"{name}[{i}]") for i, v in enumerate(value)]
  raise ValueError(f"{name}: cannot log a {type(value).__name__} as JSON")


def _finite_or_name(x: float) -> float | str:
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "Infinity" if x > 0 else "-Infinity"
  return x


def _from_json_value(value: Any) -> Any:
  return _NONFINITE.get(value, value) if isinstance(value, str) else value


def _append_jsonl(path: str, row: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(row, allow_nan=False) + "\n")
    f.flush()


def read_jsonl(path: str) -> list[dict]:
  """Rows of a JSON-lines file; a malformed line raises ValueError naming the file and line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
  return rows


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`, in order, with "NaN"/"Infinity" strings as floats."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file: {path}")
  return [{k: (v if k in RESERVED_KEYS else _from_json_value(v)) for k, v in row.items()}
          for row in read_jsonl(path)]


def truncate_lines(path: str, num_lines: int) -> None:
  """Keep the first `num_lines` complete lines of `path` (a resumed run drops what it will redo,
  including a half-written last line)."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  complete = lines[:-1]  # the piece after the last newline is empty or half-written
  if num_lines > len(complete):
    raise ValueError(f"{path}: asked to keep {num_lines} lines but it has {len(complete)}")
  with open(path, "wb") as f:
    f.write(b"".join(line + b"\n" for line in complete[:num_lines]))


def count_lines(path: str) -> int:
  """Complete (newline-terminated) lines in `path`; 0 when it does not exist."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    return f.read().count(b"\n")


def write_samples(workdir: str, step: int, rows: Sequence[Mapping[str, Any]],
                  *, phase: str | None = None) -> None:
  """Append sample completions to `workdir/samples.jsonl`, one line each: `step` (and `phase`)
  plus the row's fields (prompt, completion, reward, ...). Call on one process only."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SAMPLES_FILE)
  with open(path, "a", encoding="utf-8") as f:
    for i, row in enumerate(rows):
      head = {"step": int(step)} if phase is None else {"step": int(step), "phase": phase}
      line = head | to_json_value(dict(row), f"samples[{i}]")
      f.write(json.dumps(line, allow_nan=False) + "\n")
    f.flush()


# ----------------------------------------------------------------------------------------------
# The writer.


class MetricsWriter:
  """Appends figures to `workdir/metrics.jsonl` and `workdir/tb/`; a no-op when `enabled=False`
  (non-zero processes of a multi-host run).

  `truncate_to=N` first cuts metrics.jsonl to its first N lines: a run resumed from a checkpoint
  that recorded `writer.num_lines` drops the lines it is about to write again, so the file ends
  up as an uninterrupted run would have left it. (TensorBoard files are never rewritten; each
  writer opens a new one, and TensorBoard shows the re-run steps twice.)
  """

  def __init__(self, workdir: str, *, enabled: bool = True, truncate_to: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb: BinaryIO | None = None
    if not enabled:
      return
    os.makedirs(os.path.join(workdir, TB_DIR), exist_ok=True)
    if truncate_to is not None and os.path.exists(self.path):
      truncate_lines(self.path, truncate_to)
    self._num_lines = count_lines(self.path)
    self._tb = open(os.path.join(workdir, TB_DIR, tensorboard.event_file_name()), "ab")
    self._write_event(tensorboard.encode_event(time.time(), 0,
                                               file_version=tensorboard.FILE_VERSION))

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
    _append_jsonl(self.path, row)
    self._num_lines += 1
    scalars = {f"{phase}/{name}": float(_from_json_value(value))
               for name, value in row.items() if name not in RESERVED_KEYS
               and isinstance(_from_json_value(value), (int, float))}
    if scalars:
      self._write_event(tensorboard.encode_event(now, int(step), scalars=scalars))
    return row

  def _write_event(self, payload: bytes) -> None:
    self._tb.write(tensorboard.tfrecord(payload))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------------------------
# Console progress.


def format_duration(seconds: float) -> str:
  """0:28, 1:52, 1:02:03 (h:mm:ss past an hour); "?" when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_number(x: Any) -> str:
  """Compact figure: 3 significant digits, k/M/G past a thousand (0.62, 0.003, 23.1, 1.2k)."""
  if isinstance(x, str):
    return x
  x = float(np.asarray(x))
  if not math.isfinite(x):
    return str(x)
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{suffix}"
  return f"{x:.3g}"


@dataclasses.dataclass
class Progress:
  """Console progress lines with ETA and the key figures.

      grpo  40/200 20% | 0:28<1:52 | reward 0.62 acc 0.71 | sample 0.31s update 0.22s | 1.2k tok/s

  `update(step, **figures)` after each step: names ending in `_s` are seconds (the step time
  split: `sample_s`, `score_s`, `update_s`) and `tok_per_s` is throughput; everything else prints
  as `name value` in the order given. Figures whose names are not identifiers go in `figures=`.
  A line is logged every `every` steps and at the last step. Step time is the mean over the steps
  this object has seen, so a resumed run's ETA ignores the steps it did not run.
  """

  total_steps: int
  phase: str
  every: int = 1
  print_fn: Any = logging.info

  def __post_init__(self):
    self._start_time: float | None = None
    self._start_step: int | None = None

  def update(self, step: int, figures: Mapping[str, Any] | None = None,
             **more: Any) -> str | None:
    """Record that `step` (1-based count of finished steps) is done; returns the line if logged."""
    now = time.time()
    if self._start_time is None:
      # The first call's step is already done: time from it on (the first step compiles).
      self._start_time, self._start_step = now, step
    if step % self.every and step != self.total_steps:
      return None
    line = self.format(step, now - self._start_time, step - self._start_step,
                       dict(figures or {}) | more)
    self.print_fn(line)
    return line

  def format(self, step: int, elapsed: float, steps_timed: int, figures: Mapping[str, Any]) -> str:
    """The progress line (pure: all inputs given)."""
    width = len(str(self.total_steps))
    percent = int(100 * step / self.total_steps) if self.total_steps else 100
    mean = elapsed / steps_timed if steps_timed > 0 else None
    eta = mean * max(self.total_steps - step, 0) if mean is not None else None
    parts = [f"{self.phase}  {step:>{width}}/{self.total_steps} {percent}%",
             f"{format_duration(elapsed)}<{format_duration(eta)}"]
    plain = " ".join(f"{k} {format_number(v)}" for k, v in figures.items()
                     if not k.endswith("_s") and k != "tok_per_s")
    timing = " ".join(f"{k[:-2]} {format_number(v)}s" for k, v in figures.items()
                      if k.endswith("_s") and k != "tok_per_s")
    parts += [p for p in (plain, timing) if p]
    if "tok_per_s" in figures:
      parts.append(f"{format_number(figures['tok_per_s'])} tok/s")
    return " | ".join(parts)
