"""Runs model-written Python in a confined child process and returns what it printed.

GRPO with a Python tool: the policy writes code, we run it, and feed the output back. That code
is hostile until proven otherwise, so it never runs in the trainer's process nor with the
trainer's rights, whoever the trainer runs as. `run_python(code)` starts
`python -I sandbox_child.py` (isolated mode: no PYTHON* variables, no user site) in its own
session, in a fresh temporary directory, with a scrubbed environment, and sends the code on
stdin. No `preexec_fn` (the trainer is multi-threaded): the child confines itself before it runs
the code, in layers (`grpo_jax/sandbox_child.py`; `sandbox_isolation.isolation()` says what
holds here):

  1. namespaces: network (only a down loopback), IPC, mount and PID, plus a user namespace when
     not root (the kernel's unprivileged user namespaces);
  2. in the mount namespace, fresh size-limited tmpfs on /tmp, /var/tmp, /dev/shm and
     /run/lock, and empty ones over every hidden path: the trainer user's home, the trainer's
     working directory, /root, and `hidden_paths` (the run's directory, say). The interpreter's
     own directories inside any of them (a venv under /tmp or in the home) are bound back
     read-only, so a Python installed anywhere keeps working;
  3. PID namespace: the child forks an init (pid 1) that reaps everything; when it dies the
     kernel kills every process in the namespace, even ones that called setsid;
  4. as root: uid and gid 65534 ("nobody"), no groups; not root: every capability dropped;
  5. Landlock (Linux >= 5.13, nothing to install): the code may read and execute only the
     interpreter's directories and /usr, /bin, /lib*, write only its own directory and the
     private temp dirs, nothing else, so the trainer user's files are neither readable nor
     writable, whoever the trainer runs as; with ABI >= 4 no TCP bind / connect, with ABI >= 6
     no signals to processes outside the sandbox;
  6. seccomp: a filter compiled once here by libseccomp (the `pyseccomp` package,
     grpo_jax[tools]) and loaded by the child: ptrace, mount, new namespaces, keyctl, bpf,
     perf_event_open, io_uring, module loading, internet sockets and the like fail with EPERM;
     syscalls of a foreign architecture kill the process;
  7. rlimits: CPU seconds (ceil(timeout_s) + 1, then SIGXCPU), address space (memory_mb), file
     size (max_file_mb), processes (max_processes), 64 open files, no core files; no_new_privs.

Which of those the machine allows varies (a container without CAP_SYS_ADMIN has no
namespaces; an old kernel no Landlock): `grpo_jax/sandbox_isolation.py` probes it, and the
trainer calls its `require_isolation` before the first rollout.

The parent (`grpo_jax/sandbox_process.py`) writes the code, reads stdout and stderr with one
`select` loop under a single wall deadline (an escaped grandchild holding a pipe cannot hang
it), keeps the first `max_output_bytes` of each, and on the deadline kills the whole process
group. The child says "ready" on a pipe just before it runs the code: a child that ends without
saying it could not start the program (an interpreter it cannot load, say), and `run_python`
raises `SandboxError` instead of handing an error text to the policy. A trainer that is PID 1
of a container without a PID namespace for the child reaps the tool's orphans
(`sandbox_process.reap_orphans`).

A trivial `print(1)` takes about 0.07 s end to end (BENCHMARKS.md: `tools/bench_sandbox.py`).

Not blocked (see `sandbox_isolation.isolation()["not_blocked"]`): reading files under /usr,
/lib and the interpreter's directories, the kernel surface seccomp leaves open, CPU and memory
only per process (no cgroups), and RLIMIT_NPROC counts every process of the run's uid on the
machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import json
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from grpo_jax import sandbox_process
from grpo_jax.sandbox_process import NOBODY

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# The namespaces the child enters where the kernel lets it (a test removes "pid" to play a
# container that refuses it).
NAMESPACES = ("user", "net", "ipc", "mnt", "pid")


class SandboxError(RuntimeError):
  """The sandbox cannot run programs here (or not confined enough): stops the run."""


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """What one run of model-written code did."""
  status: str  # "ok" | "error" | "timeout" | "memory" | "killed"
  stdout: str  # utf-8 (errors="replace"), the first max_output_bytes bytes
  stderr: str  # likewise
  returncode: int | None  # as subprocess: -N for "died of signal N"
  seconds: float  # wall time, start-up and clean-up included
  truncated: bool  # stdout or stderr was cut to max_output_bytes
  layers: dict = dataclasses.field(default_factory=dict, compare=False)  # what confined it


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run limits and hidden paths; checked here, before anything runs."""
  timeout_s: float = 5.0  # wall clock; CPU time is limited to ceil(timeout_s) + 1 s per process
  memory_mb: int = 512  # address space per process (RLIMIT_AS)
  max_output_bytes: int = 16384  # per stream
  max_processes: int = 16  # RLIMIT_NPROC (threads count too)
  max_file_mb: int = 16  # largest file; the fresh /tmp holds 4x this
  hidden_paths: tuple[str, ...] = ()  # hidden besides home, working directory and /root

  def __post_init__(self):
    t = self.timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
      raise ValueError(f"timeout_s must be a finite number > 0, got {t!r}")
    for name, lowest in (("memory_mb", 32), ("max_output_bytes", 0), ("max_processes", 1),
                         ("max_file_mb", 1)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
        raise ValueError(f"{name} must be an int >= {lowest}, got {v!r}")
    if isinstance(self.hidden_paths, str) or not all(
        isinstance(p, str) and os.path.isabs(p) for p in self.hidden_paths):
      raise ValueError(f"hidden_paths must be a sequence of absolute paths, got "
                       f"{self.hidden_paths!r}")
    object.__setattr__(self, "hidden_paths", tuple(self.hidden_paths))


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 16384, max_processes: int = 16,
               max_file_mb: int = 16, hidden_paths: Sequence[str] = ()) -> ToolResult:
  """Runs `code` in the sandbox. Never raises for anything the code does; ValueError for bad
  arguments (before anything runs), SandboxError if the sandbox itself cannot start it."""
  limits = Limits(timeout_s, memory_mb, max_output_bytes, max_processes, max_file_mb,
                  tuple(hidden_paths))
  _check_code(code)
  return _run(code, limits)


def run_python_batch(codes: Sequence[str], *, max_workers: int = 4, **limits) -> list[ToolResult]:
  """Runs each program in its own sandbox, at most `max_workers` at once; results in input order.

  RLIMIT_NPROC counts all processes of uid 65534, so concurrent runs share max_processes."""
  checked = Limits(**limits)
  if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
    raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
  codes = list(codes)
  for code in codes:
    _check_code(code)
  if not codes:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(max_workers, len(codes))) as pool:
    return list(pool.map(lambda c: _run(c, checked), codes))


def default_hidden() -> tuple[str, ...]:
  """Always hidden: the trainer user's home ($HOME and the password database's), the working
  directory (the repository, its runs and checkpoints) and /root."""
  homes = {os.environ.get("HOME", ""), _passwd_home()}
  return tuple(sorted({os.path.realpath(p) for p in (*homes, os.getcwd(), "/root")
                       if p and p != "/"}))


def hidden_realpaths(hidden_paths: Sequence[str]) -> tuple[str, ...]:
  """default_hidden() and `hidden_paths`, resolved (the child compares realpaths), sorted."""
  return tuple(sorted({os.path.realpath(p) for p in (*default_hidden(), *hidden_paths)}))


def _passwd_home() -> str:
  try:
    return pwd.getpwuid(os.geteuid()).pw_dir
  except KeyError:
    return ""


def _check_code(code) -> None:
  if not isinstance(code, str):
    raise ValueError(f"code must be a str, got {type(code).__name__}")


def classify(returncode: int | None, stderr: str, timed_out: bool) -> str:
  """The status of a finished run (see ToolResult.status)."""
  if timed_out or returncode == -signal.SIGXCPU:
    return "timeout"
  if returncode == 0:
    return "ok"
  if "MemoryError" in stderr:
    return "memory"
  if returncode is None or returncode < 0:
    return "killed"  # a SIGKILL we did not send (OOM killer or kill -9) lands here too
  return "error"


def child_env(workdir: str) -> dict[str, str]:
  """The child's whole environment: nothing from os.environ. One thread per BLAS/OpenMP pool,
  since threads count against RLIMIT_NPROC."""
  return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
          "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
          "MKL_NUM_THREADS": "1"}


# Denied with EPERM by the seccomp filter: kernel surface no tool program needs, and the calls
# that would undo the other layers.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsconfig",
    "fsmount", "fspick", "open_tree", "move_mount", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff", "reboot", "acct", "syslog",
    "quotactl", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "vhangup", "uselib", "lookup_dcookie", "personality",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self")
_CLONE_NAMESPACES = (0x10000000, 0x40000000, 0x08000000, 0x00020000, 0x20000000, 0x04000000,
                     0x02000000, 0x00000080)  # user, net, ipc, mnt, pid, uts, cgroup, time


@functools.cache
def seccomp_program() -> bytes:
  """The child's seccomp filter, compiled once by libseccomp (the `pyseccomp` package) to BPF:
  everything allowed but DENIED_SYSCALLS, clone with a namespace flag, clone3 (ENOSYS, so that
  libc falls back to clone, whose flags a filter can read) and AF_INET / AF_INET6 sockets;
  syscalls of a foreign architecture (i386 on x86-64) kill the process. b"" where pyseccomp or
  libseccomp.so.2 is missing (then `sandbox_isolation.isolation()` says so)."""
  try:
    import pyseccomp as seccomp  # pylint: disable=import-outside-toplevel
  except (ImportError, RuntimeError, OSError):  # RuntimeError: no libseccomp.so.2
    return b""
  f = seccomp.SyscallFilter(seccomp.ALLOW)
  eperm = seccomp.ERRNO(errno.EPERM)
  for name in DENIED_SYSCALLS:
    try:
      f.add_rule(eperm, name)
    except (ValueError, OSError):  # a name this libseccomp or architecture does not know
      pass
  f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
  for flag in _CLONE_NAMESPACES:
    f.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
  for family in (socket.AF_INET, socket.AF_INET6):
    f.add_rule(eperm, "socket", seccomp.Arg(0, seccomp.EQ, family))
  with tempfile.TemporaryFile() as out:
    f.export_bpf(out)
    out.seek(0)
    return out.read()


def _run(code: str, limits: Limits) -> ToolResult:
  start = time.monotonic()
  workdir = tempfile.mkdtemp(prefix="grpo_tool_")
  ready_r, ready_w = os.pipe()
  try:
    if os.geteuid() == 0:
      os.chown(workdir, NOBODY, NOBODY)
    hidden = hidden_realpaths(limits.hidden_paths)
    args = {"ppid": os.getpid(), "workdir": workdir, "cpu_s": math.ceil(limits.timeout_s) + 1,
            "memory_mb": limits.memory_mb, "max_file_mb": limits.max_file_mb,
            "max_processes": limits.max_processes, "hidden": hidden,
            "namespaces": list(NAMESPACES), "ready_fd": ready_w,
            "seccomp_bpf": seccomp_program().hex()}
    proc = subprocess.Popen(
        [sys.executable, "-I", CHILD, json.dumps(args)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=child_env(workdir),
        start_new_session=True, pass_fds=(ready_w,))
    os.close(ready_w)
    ready_w = -1
    sandbox_process.started(proc.pid)
    try:
      out, err, truncated, timed_out = sandbox_process.communicate(
          proc, code.encode("utf-8", "surrogatepass"), limits.max_output_bytes,
          start + limits.timeout_s)
    finally:
      if proc.returncode is None and not sandbox_process.exited(proc.pid):
        sandbox_process.kill_group(proc.pid)
      for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()
      proc.wait()
      sandbox_process.reap_orphans(proc.pid)
    layers = _read_ready(ready_r)
  finally:
    os.close(ready_r)
    if ready_w >= 0:
      os.close(ready_w)
    _remove_tree(workdir)
  stdout = out.decode("utf-8", errors="replace")
  stderr = err.decode("utf-8", errors="replace")
  status = classify(proc.returncode, stderr, timed_out)
  if layers is None and status != "timeout":  # a timeout under load may strike during set-up
    raise SandboxError(f"the sandbox could not start the program (exit status "
                       f"{proc.returncode}, interpreter {sys.executable}): {stderr[-2000:]}")
  return ToolResult(status, stdout, stderr, proc.returncode, time.monotonic() - start,
                    truncated, layers or {})


def _read_ready(fd: int) -> dict | None:
  """The layers the child reported just before it ran the code, or None if it never did."""
  os.set_blocking(fd, False)
  data = b""
  try:
    while chunk := os.read(fd, 65536):
      data += chunk
  except BlockingIOError:
    pass
  try:
    return json.loads(data) if data else None
  except ValueError:
    return None


def _remove_tree(path: str) -> None:
  """Removes the run's directory even where the code took its own permissions away."""
  def retry(func, p, _):
    try:
      os.chmod(os.path.dirname(p), 0o700)
      os.chmod(p, 0o700)
    except OSError:
      pass
    func(p)
  try:
    if sys.version_info >= (3, 12):
      shutil.rmtree(path, onexc=retry)
    else:
      shutil.rmtree(path, onerror=retry)
  except OSError:
    shutil.rmtree(path, ignore_errors=True)
