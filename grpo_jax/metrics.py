"""Run metrics: JSON lines, TensorBoard event files, optional W&B, sample logs, console progress.

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, wandb=settings.wandb)
    writer.write(step, "grpo", {"reward": 0.62, "kl": 3e-3, "eval/accuracy": 0.71})
    writer.write_histograms(step, "grpo", {"rewards": rewards_N, "completion_length": len_N})
    writer.write_text(step, "grpo", {"sample": "Q: ... A: #### 42"})
    with Progress(total_steps=200, phase="grpo", every=10) as progress:
      progress.update(step, reward=0.62, acc=0.71, sample_s=0.31, update_s=0.22, tok_per_s=1200.)
    evaluation.evaluate(exp, params, step, progress=progress_callback("eval"))  # per batch
    announce("resumed from step 40")   # a one-off line, on the same channel as the progress

`workdir/metrics.jsonl` holds one JSON object per line: `step`, `phase`, `time` (Unix seconds) and
the figures. Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity" (JSON has
no literal for them) and `read_metrics` turns them back into floats. On a local disk each line is
flushed as it is written, so a killed run loses nothing already logged.

`workdir/tb/events.out.tfevents.*` holds the same scalars for TensorBoard, tagged `phase/name`
(`grpo/reward`, `grpo/eval/accuracy`), plus histograms and text, encoded by `grpo_jax.tensorboard`
(no TensorFlow needed). `read_tensorboard_scalars` is re-exported here so callers reading a run
need one module.

W&B (`wandb=` settings with a mode): the same scalars under the same `phase/name` keys, each
phase plotted against its own `phase/step` (W&B's `_step` is the metrics.jsonl line number, which
a resumed run reproduces); the run id is kept in `workdir/wandb_run_id`, so a resumed run
continues the same W&B run.

Every file goes through `paths.as_path`: `workdir` may be a local path, a `file://` URL, or
`gs://...` where the cloud libraries are installed. Object stores cannot append and publish an
object only when it is closed, so there a growing file is held in memory and rewritten whole by
the first write `SYNC_S` seconds after the last rewrite, by `MetricsWriter.flush()` (call it
before a checkpoint) and at close.

Progress reaches the user where they are (see `progress_mode`): a tqdm bar in a notebook or a
terminal, plain printed lines where tqdm is missing or no absl logging is set up, one absl log
line every `every` steps in a launched job's logs.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import numbers
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from absl import flags, logging
from etils import epath

from grpo_jax import paths, tensorboard
from grpo_jax.tensorboard import read_tensorboard_scalars  # noqa: F401  (re-export)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"
WANDB_RUN_ID_FILE = "wandb_run_id"
CONFIG_FILE = "config.json"       # written by trainer.train; W&B shows it as the run's config
RESERVED_KEYS = ("step", "phase", "time")
WANDB_MODES = ("", "online", "offline", "disabled")  # "" and "disabled": no W&B (no import)
SYNC_S = 60.0                     # object stores: the longest a written line stays unpublished
PROGRESS_ENV = "GRPO_JAX_PROGRESS"  # "bar" | "print" | "log": overrides `progress_mode`'s guess
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


def _json_line(row: Mapping[str, Any]) -> bytes:
  return (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Rows of a JSON-lines file; a malformed line raises ValueError naming the file and line."""
  rows = []
  text = paths.as_path(path).read_text(encoding="utf-8")
  for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
  return rows


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`, in order, with "NaN"/"Infinity" strings as floats."""
  path = paths.as_path(workdir) / METRICS_FILE
  if not path.exists():
    raise FileNotFoundError(f"no metrics file: {path}")
  return [{k: (v if k in RESERVED_KEYS else _from_json_value(v)) for k, v in row.items()}
          for row in read_jsonl(path)]


def _complete_lines(path: epath.Path, keep: int | None = None) -> bytes:
  """The first `keep` complete lines of `path` (all of them when None; b"" when it does not
  exist): what a resumed run keeps. A half-written last line is always dropped. Raises
  ValueError when `keep` is more than the file has."""
  if not path.exists():
    return b""
  lines = path.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is partial
  if keep is not None:
    if keep > len(lines):
      raise ValueError(f"{path}: asked to keep {keep} lines but it has {len(lines)}")
    lines = lines[:keep]
  return b"".join(line + b"\n" for line in lines)


def truncate_lines(path: str | os.PathLike, num_lines: int) -> None:
  """Keep the first `num_lines` complete lines of `path` (a resumed run drops what it will redo,
  including a half-written last line)."""
  path = paths.as_path(path)
  path.write_bytes(_complete_lines(path, num_lines))


def count_lines(path: str | os.PathLike) -> int:
  """Complete (newline-terminated) lines in `path`; 0 when it does not exist."""
  path = paths.as_path(path)
  return path.read_bytes().count(b"\n") if path.exists() else 0


def _sample_lines(step: int, rows: Sequence[Mapping[str, Any]], phase: str | None) -> bytes:
  head = {"step": int(step)} if phase is None else {"step": int(step), "phase": phase}
  return b"".join(_json_line(head | to_json_value(dict(row), f"samples[{i}]"))
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
  with _GrowingFile(workdir / SAMPLES_FILE) as f:
    f.write(_sample_lines(step, rows, phase))


class _GrowingFile:
  """A file that only grows (metrics.jsonl, samples.jsonl, an event file), starting from `head`
  (what a resumed run keeps of it) or, when None, from what it holds (its complete lines).

  On a local disk: opened for appending (after cutting it to `head`) and flushed at every write,
  so a killed run loses nothing written. On an object store (no append; an object appears when
  closed): the content is held in memory and the object rewritten whole when `sync_s` seconds
  have passed since the last rewrite, and at close.
  """

  def __init__(self, path: epath.Path, head: bytes | None = None, *, local: bool | None = None,
               sync_s: float = SYNC_S):
    self.path = path
    self.sync_s = sync_s
    self._buffer: bytearray | None = None
    self._file = None
    if local if local is not None else paths.is_local(path):
      if head is not None and head != (path.read_bytes() if path.exists() else b""):
        path.write_bytes(head)
      self._file = path.open("ab")
    else:
      self._buffer = bytearray(_complete_lines(path) if head is None else head)
      self.sync()

  def write(self, data: bytes) -> None:
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
    elif self._buffer is not None:
      self._buffer += data
      if time.monotonic() - self._synced >= self.sync_s:
        self.sync()

  def sync(self) -> None:
    """Publish what is written (object stores; local files are always up to date)."""
    if self._buffer is not None:
      self.path.write_bytes(bytes(self._buffer))
      self._synced = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._buffer is not None:
      self.sync()
      self._buffer = None

  def __enter__(self) -> _GrowingFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
  return {f"{phase}/{name}": float(_from_json_value(value)) for name, value in row.items()
          if name not in RESERVED_KEYS and isinstance(_from_json_value(value), (int, float))}


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
    self._tb: _GrowingFile | None = None
    self._lines: _GrowingFile | None = None
    self._samples: _GrowingFile | None = None
    self._wandb = None
    self._wandb_phases: set[str] = set()
    self._wandb_first_line = 0
    if not enabled:
      return
    (self.workdir / TB_DIR).mkdir(parents=True, exist_ok=True)
    try:
      kept = _complete_lines(self.path, truncate_to)
    except ValueError:
      if paths.is_local(self.path):
        raise
      # An object store holds what was published before the run was killed: fewer lines than
      # the checkpoint counted. Keep them all; the lost ones leave a gap.
      logging.warning("%s has fewer than the %d lines the checkpoint recorded (lines written "
                      "after the last upload were lost); keeping all it has", self.path,
                      truncate_to)
      kept = _complete_lines(self.path)
    self._num_lines = kept.count(b"\n")
    self._lines = _GrowingFile(self.path, kept)
    self._tb = _GrowingFile(self.workdir / TB_DIR / tensorboard.event_file_name(), b"")
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
    self._lines.write(_json_line(row))
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
      self._samples = _GrowingFile(self.workdir / SAMPLES_FILE)
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


# ----------------------------------------------------------------------------------------------
# Console progress.


def _in_kernel() -> bool:
  """A Jupyter / Colab kernel runs this code (an IPython shell with a kernel)."""
  ipython = sys.modules.get("IPython")
  shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
  return getattr(shell, "kernel", None) is not None


def _stderr_is_tty() -> bool:
  try:
    return sys.stderr is not None and sys.stderr.isatty()
  except (AttributeError, ValueError):  # replaced or closed stream
    return False


def _tqdm_class():
  """tqdm.auto's bar class (a widget in notebooks, text elsewhere), or None without tqdm."""
  try:
    with warnings.catch_warnings():
      # "IProgress not found" in a notebook without ipywidgets: its text bar serves as well.
      warnings.simplefilter("ignore")
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return tqdm


class _AboveBars:
  """A text stream that writes through tqdm.write: the line goes above the open bars, which
  are redrawn below it instead of being broken by it."""

  def __init__(self, tqdm, stream):
    self._tqdm, self._stream = tqdm, stream

  def write(self, text: str) -> int:
    self._tqdm.write(text, file=self._stream, end="")
    return len(text)

  def flush(self) -> None:
    self._stream.flush()


def _log_above_bars(tqdm) -> Callable[[], None]:
  """Route absl's console handler through tqdm.write while a bar is open (a launcher in a
  terminal logs to the bar's stream); returns the function that undoes it."""
  handler = getattr(logging.get_absl_handler(), "python_handler", None)
  stream = getattr(handler, "stream", None)
  if stream is None or stream not in (sys.stderr, sys.stdout):  # a log file, or routed already
    return lambda: None
  handler.stream = _AboveBars(tqdm, stream)

  def undo():
    if isinstance(handler.stream, _AboveBars):
      handler.stream = stream
  return undo


def progress_mode() -> str:
  """Where progress goes in this process, so that it reaches whoever runs it.

  "bar" (tqdm.auto) when someone watches: a Jupyter / Colab kernel, or stderr is a terminal;
  "print" there when tqdm is not installed. Otherwise "log" (absl, one line per `every` steps)
  when absl logging is set up (its flags parsed: a launcher under app.run), else "print": absl
  drops INFO lines until its flags are parsed, so a script or an executed notebook would show
  nothing. The environment variable GRPO_JAX_PROGRESS=bar|print|log overrides the guess."""
  forced = os.environ.get(PROGRESS_ENV, "")
  if forced in ("print", "log"):
    return forced
  if forced == "bar" or _in_kernel() or _stderr_is_tty():
    return "bar" if _tqdm_class() is not None else "print"
  return "log" if flags.FLAGS.is_parsed() else "print"


def announce(text: str) -> None:
  """One line for the user (a phase starting, a checkpoint restored, eval results) on the same
  channel as `Progress`: above any open bar, printed, or logged (see `progress_mode`)."""
  mode = progress_mode()
  if mode == "bar":
    _tqdm_class().write(text)  # keeps an open bar intact below the line
  elif mode == "print":
    print(text, flush=True)
  else:
    logging.info(text)


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


def format_figures(figures: Mapping[str, Any]) -> str:
  """The figures part of a progress line (a bar's postfix): `name value` in the order given,
  then the `_s` timings as `name 0.31s`, then `tok_per_s` as throughput."""
  plain = " ".join(f"{k} {format_number(v)}" for k, v in figures.items()
                   if not k.endswith("_s") and k != "tok_per_s")
  timing = " ".join(f"{k[:-2]} {format_number(v)}s" for k, v in figures.items()
                    if k.endswith("_s") and k != "tok_per_s")
  parts = [p for p in (plain, timing) if p]
  if "tok_per_s" in figures:
    parts.append(f"{format_number(figures['tok_per_s'])} tok/s")
  return " | ".join(parts)


@dataclasses.dataclass
class Progress:
  """Progress of a long phase (SFT or GRPO steps, eval batches, reward-model steps) with ETA and
  the key figures, shown where the user looks (`progress_mode`):

      grpo  40/200 20% | 0:28<1:52 | reward 0.62 acc 0.71 | sample 0.31s update 0.22s | 1.2k tok/s

  `update(step, **figures)` after each step: names ending in `_s` are seconds (the step time
  split: `sample_s`, `score_s`, `update_s`) and `tok_per_s` is throughput; everything else prints
  as `name value` in the order given. Figures whose names are not identifiers go in `figures=`.
  A line goes out every `every` steps and at the last step (to `print_fn` when given); a bar
  (tqdm) moves at every update, with the latest figures as its postfix, and closes at the last
  step, so a loop that fetches figures only every `every` steps may still update every step.
  Step time is the mean over the steps this object has seen, so a resumed run's ETA ignores the
  steps it did not run. `leave=False` clears a finished bar (eval batches inside GRPO).
  """

  total_steps: int
  phase: str
  every: int = 1
  print_fn: Callable[[str], Any] | None = None  # None: the channel of `progress_mode()`
  leave: bool = True
  unit: str = "step"

  def __post_init__(self):
    self._start_time: float | None = None
    self._start_step: int | None = None
    self._mode = "print_fn" if self.print_fn is not None else progress_mode()
    self._bar = None
    self._undo_logs: Callable[[], None] = lambda: None

  def update(self, step: int, figures: Mapping[str, Any] | None = None,
             **more: Any) -> str | None:
    """Record that `step` (1-based count of finished steps) is done; returns the line on the
    steps a line goes out."""
    now = time.time()
    if self._start_time is None:
      # The first call's step is already done: time from it on (the first step compiles).
      self._start_time, self._start_step = now, step
    figures = dict(figures or {}) | more
    if self._mode == "bar":
      self._move_bar(step, format_figures(figures))
    if step % self.every and step != self.total_steps:
      return None
    line = self.format(step, now - self._start_time, step - self._start_step, figures)
    if self._mode == "print_fn":
      self.print_fn(line)
    elif self._mode == "print":
      print(line, flush=True)
    elif self._mode == "log":
      logging.info(line)
    return line

  def _move_bar(self, step: int, postfix: str) -> None:
    if self._bar is None:
      tqdm = _tqdm_class()
      self._bar = tqdm(total=self.total_steps, initial=step, desc=self.phase, unit=self.unit,
                       leave=self.leave, postfix=postfix, dynamic_ncols=True)
      self._undo_logs = _log_above_bars(tqdm)
    else:
      if postfix:  # an update without figures (between logged steps) keeps the last ones
        self._bar.set_postfix_str(postfix, refresh=False)
      self._bar.update(step - self._bar.n)
    if step >= self.total_steps:
      self.close()

  def format(self, step: int, elapsed: float, steps_timed: int, figures: Mapping[str, Any]) -> str:
    """The progress line (pure: all inputs given)."""
    width = len(str(self.total_steps))
    percent = int(100 * step / self.total_steps) if self.total_steps else 100
    mean = elapsed / steps_timed if steps_timed > 0 else None
    eta = mean * max(self.total_steps - step, 0) if mean is not None else None
    parts = [f"{self.phase}  {step:>{width}}/{self.total_steps} {percent}%",
             f"{format_duration(elapsed)}<{format_duration(eta)}"]
    shown = format_figures(figures)
    return " | ".join(parts + ([shown] if shown else []))

  def close(self) -> None:
    """Close the bar (a phase that stops early, or fails); lines need no closing."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
      self._undo_logs()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress_callback(phase: str, *, every: int = 0,
                      leave: bool = False) -> Callable[[str, int, int], None]:
  """`fn(what, done, total)`: the callback `evaluation.evaluate(progress=...)` calls after each
  batch, shown as one `Progress` per pass named "`phase` `what`" (eval greedy, eval samples),
  closed when `done == total`. `every=0`: about ten lines a pass where lines are shown."""
  passes: dict[str, Progress] = {}

  def update(what: str, done: int, total: int) -> None:
    progress = passes.get(what)
    if progress is None or progress.total_steps != total:
      progress = passes[what] = Progress(total, f"{phase} {what}".strip(),
                                         every=every or max(1, total // 10), leave=leave,
                                         unit="batch")
    progress.update(done)
    if done >= total:
      passes.pop(what).close()
  return update
