"""Paths the run reads and writes, local or remote (`gs://bucket/run` on a TPU pod), as `epath.Path`.

    workdir = paths.as_path("gs://bucket/run")   # or "/tmp/run", or "file:///tmp/run"
    (workdir / "config.json").write_text(...)

etils.epath (already a dependency of orbax) reads `gs://` and `s3://` through the cloud
libraries where they are installed; `file://` URLs are local paths.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

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


def write_dir(dest: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Puts the directory that `write(local_dir)` writes at `dest`, whole or not at all: it is
  written to a `.tmp` sibling (on local disk first when `dest` is remote), then renamed over
  `dest`. For writers that need a local path (safetensors, sentencepiece)."""
  dest = as_path(dest)
  tmp = dest.parent / (dest.name + ".tmp")
  if tmp.exists():
    tmp.rmtree()
  if is_local(dest):
    write(str(tmp))
  else:
    with tempfile.TemporaryDirectory() as local:
      write(local)
      for file in epath.Path(local).rglob("*"):
        if file.is_file():
          target = tmp / file.relative_to(local)
          target.parent.mkdir(parents=True, exist_ok=True)
          file.copy(target)
  if dest.exists():
    dest.rmtree()
  tmp.rename(dest)


def local_dir(path: str | os.PathLike) -> str:
  """A local directory with the files of `path`: `path` itself when local, else a copy in a
  temporary directory (readers such as safetensors' memory map need a local file)."""
  if is_local(path):
    return str(as_path(path))
  src = as_path(path)
  local = epath.Path(tempfile.mkdtemp(prefix="grpo_jax_"))
  for file in src.rglob("*"):
    if file.is_file():
      target = local / file.relative_to(src)
      target.parent.mkdir(parents=True, exist_ok=True)
      file.copy(target)
  return str(local)
