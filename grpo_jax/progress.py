"""Console progress: a tqdm bar, printed lines or absl log lines, wherever the user looks.

    with Progress(total_steps=200, phase="grpo", every=10) as progress:
      progress.update(step, reward=0.62, acc=0.71, sample_s=0.31, update_s=0.22, tok_per_s=1200.)
    evaluation.evaluate(exp, params, step, progress=progress_callback("eval"))  # per batch
    announce("resumed from step 40")   # a one-off line, on the same channel as the progress

Progress reaches the user where they are (see `progress_mode`): a tqdm bar in a notebook or a
terminal, plain printed lines where tqdm is missing or no absl logging is set up, one absl log
line every `every` steps in a launched job's logs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import flags, logging

PROGRESS_ENV = "GRPO_JAX_PROGRESS"  # "bar" | "print" | "log": overrides `progress_mode`'s guess


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
