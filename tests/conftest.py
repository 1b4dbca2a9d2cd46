"""Test-wide setup: 8 simulated CPU devices (before JAX is imported) and shared tiny fixtures.

Compile time, not arithmetic, is what the suite spends on CPU (tiny models, a few steps), so
before JAX is imported:
  * `--xla_backend_optimization_level=0`: XLA's HLO passes all run, only LLVM's code generation
    is not optimised (init_params compiles in ~1 s instead of ~10 s). Results can differ from an
    optimised build in the last bits (summation order); every test compares runs made under the
    same flags, or with tolerances far above that.
  * a persistent compilation cache in a fresh directory for this pytest run only (removed at exit):
    a program compiled once (the same HLO, devices and flags) is loaded, not recompiled, by later
    tests and by the subprocesses the launcher, resume and multi-host tests start (they inherit
    the environment; see `multihost_worker.subprocess_env`), and by every pytest-xdist worker
    (`-n`: the controller loads this file first, the workers inherit its directory).
    Executables are unchanged.
Both are defaults: set XLA_FLAGS / JAX_COMPILATION_CACHE_DIR yourself to override them.
"""

import atexit
import os
import shutil
import tempfile

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
  _FLAGS += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _FLAGS:
  _FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _FLAGS.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _CACHE = tempfile.mkdtemp(prefix="grpo_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import fcntl  # pylint: disable=wrong-import-position,wrong-import-order

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture
def sandbox_lock():
  """Held by the sandbox tests, so that pytest-xdist workers run them one at a time: they share
  uid nobody's process budget (RLIMIT_NPROC counts the whole machine's), so one test's fork bomb
  would refuse another's forks, and their process counts would see each other's children."""
  lock = os.path.join(tempfile.gettempdir(), f"grpo_jax_sandbox_tests_{os.getuid()}.lock")
  with open(lock, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield
    fcntl.flock(f, fcntl.LOCK_UN)
