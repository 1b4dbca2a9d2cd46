"""Paths the run reads and writes, local or remote (`gs://bucket/run` on a TPU pod), as `epath.Path`.

    workdir = paths.as_path("gs://bucket/run")   # or "/tmp/run", or "file:///tmp/run"
    (workdir / "config.json").write_text(...)

etils.epath (already a dependency of orbax) reads `gs://` and `s3://` through the cloud
libraries where they are installed; `file://` URLs are local paths.
"""

from __future__ import annotations

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path; a `file://` URL becomes the local path it names."""
  text = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
  if text.startswith("file://"):
    text = text[len("file://"):]
  return epath.Path(text)


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on this machine's file system (no scheme, or file://)."""
  text = str(path)
  return text.startswith("file://") or "://" not in text
