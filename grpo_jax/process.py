"""The process around a run: the persistent compilation cache, glibc's malloc arenas, traces.

    process.limit_malloc_arenas(); process.enable_compile_cache()   # what trainer.train does
    with process.profiled(settings.profile_steps, workdir, step): ...  # a jax.profiler trace
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Optional

import jax
from absl import logging

from grpo_jax import paths


def compile_cache_dir() -> Optional[str]:
  """Where compiled programs are kept across launches: $GRPO_JAX_COMPILE_CACHE ("off" / "0":
  none), else JAX's own setting (JAX_COMPILATION_CACHE_DIR), else
  $XDG_CACHE_HOME/grpo_jax/xla (~/.cache/grpo_jax/xla)."""
  setting = os.environ.get("GRPO_JAX_COMPILE_CACHE", "")
  if setting.lower() in ("off", "0", "false", "none"):
    return None
  if setting:
    return setting
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "grpo_jax", "xla")


def enable_compile_cache() -> Optional[str]:
  """The persistent compilation cache, on by default: a second launch of the same config loads
  its programs instead of compiling them (every program, however quick to compile)."""
  directory = compile_cache_dir()
  if directory is None:
    return None
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def limit_malloc_arenas() -> Optional[int]:
  """At most $GRPO_JAX_MALLOC_ARENAS glibc malloc arenas (default: one per CPU core, at least 2;
  "0": untouched; glibc's own default is 8 per core). XLA's threads otherwise each grow their
  own arena, which keeps freed buffers: on the 2-core CPU bench_step's SPEC step peaked at
  0.75-0.76 GB with glibc's default (0.98 GB in one probe) and 0.73 GB with 2 arenas, at the
  same step time (BENCHMARKS.md). Per core, not a fixed 2: a many-core GPU host compiles with
  many threads, which a couple of arenas would serialise on malloc's locks. A no-op without
  glibc (macOS) and for a process that set MALLOC_ARENA_MAX itself."""
  arenas = int(os.environ.get("GRPO_JAX_MALLOC_ARENAS") or max(2, os.cpu_count() or 2))
  if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return None
  M_ARENA_MAX = -8  # glibc's malloc.h
  return arenas if libc.mallopt(M_ARENA_MAX, arenas) == 1 else None


@contextlib.contextmanager
def profiled(steps: Optional[tuple[int, int]], workdir: str, step: int):
  """A jax.profiler trace of GRPO steps `steps` = (first, last) (config.profile_steps, 1-based),
  written to <workdir>/profile: TensorBoard's profile plugin reads it, ui.perfetto.dev its
  perfetto_trace.json.gz."""
  if not steps or not steps[0] <= step <= steps[1]:
    yield
    return
  if step == steps[0]:
    jax.profiler.start_trace(str(paths.as_path(workdir) / "profile"), create_perfetto_trace=True)
  try:
    with jax.profiler.StepTraceAnnotation("grpo_step", step_num=step):
      yield
  finally:
    if step == steps[1]:
      jax.effects_barrier()
      jax.profiler.stop_trace()
      logging.info("profile of GRPO steps %d-%d: %s/profile", steps[0], steps[1], workdir)
