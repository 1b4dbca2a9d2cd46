"""Files a run only appends to: JSON lines (metrics.jsonl, samples.jsonl) and event files.

`to_json_value` turns a figure into a JSON-safe value: non-finite floats are written as the
strings "NaN", "Infinity", "-Infinity" (JSON has no literal for them) and `from_json_value`
turns them back. `GrowingFile` appends on a local disk, flushing each write, so a killed run
loses nothing written; on an object store (no append; an object appears when closed) it holds
the content in memory and rewrites the object whole at most every `SYNC_S` seconds and at
close. A resumed run keeps the first complete lines it counted (`complete_lines`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from grpo_jax import paths

SYNC_S = 60.0                     # object stores: the longest a written line stays unpublished
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


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


def from_json_value(value: Any) -> Any:
  """A value read back: "NaN"/"Infinity"/"-Infinity" as floats, anything else as it is."""
  return _NONFINITE.get(value, value) if isinstance(value, str) else value


def json_line(row: Mapping[str, Any]) -> bytes:
  """One line of a JSON-lines file (values from `to_json_value`: no NaN literal)."""
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

def complete_lines(path: epath.Path, keep: int | None = None) -> bytes:
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
  path.write_bytes(complete_lines(path, num_lines))


def count_lines(path: str | os.PathLike) -> int:
  """Complete (newline-terminated) lines in `path`; 0 when it does not exist."""
  path = paths.as_path(path)
  return path.read_bytes().count(b"\n") if path.exists() else 0


class GrowingFile:
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
      self._buffer = bytearray(complete_lines(path) if head is None else head)
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

  def __enter__(self) -> GrowingFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

