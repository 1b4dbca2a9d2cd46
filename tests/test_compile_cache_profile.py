"""The persistent compilation cache (on by default) and the profiler trace option."""

import glob
import os

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import process, settings, trainer
import test_trainer  # tests/ is on sys.path (pytest rootdir-less import mode), as multihost_worker


def test_compile_cache_dir_settings(monkeypatch):
  monkeypatch.setenv("GRPO_JAX_COMPILE_CACHE", "off")
  assert process.compile_cache_dir() is None
  monkeypatch.setenv("GRPO_JAX_COMPILE_CACHE", "/some/where")
  assert process.compile_cache_dir() == "/some/where"


def test_second_launch_compiles_nothing(tmp_path):
  """Two launches of the same config with a fresh cache: the first fills it, the second adds
  no entry (every program is loaded, none compiled)."""
  cache = tmp_path / "cache"
  env = {"GRPO_JAX_COMPILE_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": ""}
  flags = test_trainer.SMOKE + ["--config.grpo.steps=2", "--config.sft.steps=2"]
  code, out = test_trainer.launch(tmp_path / "a", *flags, env_extra=env)
  assert code == 0, out[-3000:]
  first = sorted(os.listdir(cache))
  assert len(first) > 5, first
  code, out = test_trainer.launch(tmp_path / "b", *flags, env_extra=env)
  assert code == 0, out[-3000:]
  assert sorted(os.listdir(cache)) == first
  rows = [test_trainer.comparable(tmp_path / d) for d in ("a", "b")]
  assert rows[0] == rows[1]  # loaded programs compute what compiled ones did


def test_profile_steps_write_a_trace(tmp_path):
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.profile_steps = 8, 2, "2"
  trainer.train(cfg, str(tmp_path))
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  cfg.profile_steps = "3-2"
  try:
    settings.from_config(cfg, 8)
  except settings.ConfigError as e:
    assert "config.profile_steps" in str(e)
  else:
    raise AssertionError("a reversed range must be a ConfigError")


_ARENA_PROBE = r"""
import ctypes, os, re, sys, tempfile, threading
from grpo_jax import process
print("limit", process.limit_malloc_arenas())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.fopen.restype = ctypes.c_void_p, ctypes.c_void_p
barrier = threading.Barrier(8)
def work():  # eight threads allocating at once: glibc gives each a new arena up to its limit
  ptrs = [libc.malloc(4096) for _ in range(200)]
  barrier.wait()
  for p in ptrs:
    libc.free(ctypes.c_void_p(p))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
path = os.path.join(tempfile.mkdtemp(), "malloc_info.xml")
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
print("heaps", len(re.findall(r"<heap nr=", open(path).read())))
"""


def test_malloc_arenas_are_limited():
  """glibc's malloc_info counts the heaps (arenas) after eight threads allocate at once: two
  with GRPO_JAX_MALLOC_ARENAS=2, more with "0" (glibc's own); unset, the limit is one per core
  (at least 2)."""
  import subprocess
  import sys
  heaps, limits = {}, {}
  for setting in ("2", "0", ""):
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX",)}
    env["GRPO_JAX_MALLOC_ARENAS"] = setting
    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    heaps[setting] = int(out.split("heaps")[-1])
    limits[setting] = out.split("limit ")[1].split()[0]
  assert limits == {"2": "2", "0": "None", "": str(max(2, os.cpu_count()))}, limits
  assert heaps["2"] <= 2 < heaps["0"], heaps
