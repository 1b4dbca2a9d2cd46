"""Runs model-written Python in a confined child process and returns what it printed.

GRPO with a Python tool: the policy writes code, we run it, and feed the output back. That code
is hostile until proven otherwise, so it never runs in the trainer's process nor with the
trainer's rights, whoever the trainer runs as. `run_python(code)` starts
`python -I sandbox_child.py` (isolated mode: no PYTHON* variables, no user site) in its own
session, in a fresh temporary directory, with a scrubbed environment, and sends the code on
stdin. No `preexec_fn` (the trainer is multi-threaded): the child confines itself before it runs
the code, in layers (`grpo_jax/sandbox_child.py`; `isolation()` says what holds here):

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
namespaces; an old kernel no Landlock). The trainer calls `require_isolation` before the first
rollout: the user's private files must be out of reach (uid nobody as root, Landlock
otherwise), or the run stops with an error that says what is missing and how to enable it,
unless the user explicitly sets `tools.allow_unisolated`.

The parent writes the code, reads stdout and stderr with one `select` loop under a single wall
deadline (an escaped grandchild holding a pipe cannot hang it), keeps the first
`max_output_bytes` of each, and on the deadline kills the whole process group. The child says
"ready" on a pipe just before it runs the code: a child that ends without saying it could not
start the program (an interpreter it cannot load, say), and `run_python` raises `SandboxError`
instead of handing an error text to the policy. A trainer that is PID 1 of a container without
a PID namespace for the child reaps the tool's orphans (`_reap_orphans`).

A trivial `print(1)` takes about 0.07 s end to end (BENCHMARKS.md: `tools/bench_sandbox.py`).

Not blocked (see `isolation()["not_blocked"]`): reading files under /usr, /lib and the
interpreter's directories, the kernel surface seccomp leaves open, CPU and memory only per
process (no cgroups), and RLIMIT_NPROC counts every process of the run's uid on the machine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

NOBODY = 65534
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# The namespaces the child enters where the kernel lets it (a test removes "pid" to play a
# container that refuses it).
NAMESPACES = ("user", "net", "ipc", "mnt", "pid")
_READ_CHUNK_BYTES = 65536
_DRAIN_GRACE_S = 0.5  # after the child exits or is killed, how long its pipes may stay open
_POLL_S = 0.01  # exit polling interval where pidfd_open is unavailable
_PR_GET_CHILD_SUBREAPER = 37


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


_RLIMIT_NAMES = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE",
                 "RLIMIT_CORE")

# Runs as tool code and reports, from inside, what the sandbox looks like. MARKER: a file in
# the shared /tmp; HIDDEN: the hidden paths (none may be listed); RLIMITS: names.
_PROBE = r"""
import json, os, resource, socket
def ns(name):
  try:
    return os.readlink("/proc/self/ns/" + name)
  except OSError:
    return None
def listed(path):
  try:
    return sorted(os.listdir(path))
  except OSError:
    return []
try:
  status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
except OSError:
  status = {}
try:
  interfaces = [n for _, n in socket.if_nameindex()]
except OSError:
  interfaces = None
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "ns": {n: ns(n) for n in ("net", "pid", "mnt", "ipc", "user")},
    "interfaces": interfaces,
    "marker_visible": os.path.exists(MARKER),
    "hidden_listed": {h: listed(h) for h in HIDDEN if listed(h)},
    "own_proc": os.path.exists("/proc/self") and os.readlink("/proc/self") == str(os.getpid()),
    "no_new_privs": status.get("NoNewPrivs", "").strip() == "1",
    "no_capabilities": int(status.get("CapEff", "0").strip(), 16) == 0,
    "rlimits": {n: resource.getrlimit(getattr(resource, n))[0] for n in RLIMITS},
}))
"""


@functools.cache
def isolation(hidden_paths: tuple[str, ...] = ()) -> dict:
  """What this machine enforces, probed once (per hidden_paths) from inside a sandbox run.

  Keys: user ("nobody" | "same"), landlock (its ABI version, 0: none), seccomp, network
  ("namespace" | "none"), pid_namespace, mount_namespace, ipc_namespace, user_namespace,
  private_tmp, private_proc, no_new_privs, no_capabilities (bools), hidden (the paths the code
  cannot list), rlimits (names of the finite limits), confined (the trainer user's files are
  out of the code's reach), missing (what would confine it, and how to enable it), blocked and
  not_blocked (plain sentences). Raises SandboxError if the probe itself fails."""
  hidden = hidden_realpaths(hidden_paths)
  own_ns = {n: _readlink(f"/proc/self/ns/{n}") for n in ("net", "pid", "mnt", "ipc", "user")}
  fd, marker = tempfile.mkstemp(prefix="grpo_sandbox_probe_", dir="/tmp")
  os.close(fd)
  try:
    source = f"MARKER = {marker!r}\nHIDDEN = {hidden!r}\nRLIMITS = {_RLIMIT_NAMES!r}\n{_PROBE}"
    result = run_python(source, timeout_s=10.0, hidden_paths=hidden_paths)
  finally:
    os.remove(marker)
  if result.status != "ok":
    raise SandboxError(f"sandbox probe failed ({result.status}): {result.stderr[-2000:]}")
  seen = json.loads(result.stdout)
  layers = result.layers
  leaked = _leaked(seen["hidden_listed"], layers.get("interpreter", []))
  differs = {n: seen["ns"][n] is not None and seen["ns"][n] != own_ns[n] for n in own_ns}
  report = {
      "user": "nobody" if seen["uid"] == NOBODY else "same",
      "landlock": int(layers.get("landlock", 0)),
      "seccomp": bool(layers.get("seccomp", False)),
      "network": "namespace" if differs["net"] else "none",
      "pid_namespace": differs["pid"],
      "mount_namespace": differs["mnt"],
      "ipc_namespace": differs["ipc"],
      "user_namespace": differs["user"],
      "private_tmp": not seen["marker_visible"],
      "private_proc": differs["pid"] and seen["own_proc"],
      "no_new_privs": seen["no_new_privs"],
      "no_capabilities": seen["no_capabilities"],
      "hidden": [h for h in hidden if h not in leaked],
      "rlimits": [n for n, v in seen["rlimits"].items() if v != -1],
      "interfaces": seen["interfaces"],
      "probe_seconds": round(result.seconds, 3),
  }
  # Root's files are out of reach of uid 65534 unless world-readable: those in the hidden
  # paths are then covered by the mounts or by Landlock. Anyone else needs Landlock.
  root = os.geteuid() == 0
  report["confined"] = not leaked and (
      report["landlock"] > 0 or (root and report["user"] == "nobody"))
  report["missing"] = _missing(report, root)
  report["blocked"], report["not_blocked"] = _explain(report)
  return report


def _leaked(listed: dict[str, list[str]], interpreter: Sequence[str]) -> list[str]:
  """The hidden paths whose listing shows more than the way to the interpreter's directories
  bound back inside them (a venv in the repository or the home shows as ".venv" alone)."""
  leaked = []
  for h, entries in listed.items():
    on_the_way = {os.path.relpath(k, h).split("/")[0] for k in interpreter
                  if k.startswith(h.rstrip("/") + "/")}
    if set(entries) - on_the_way:
      leaked.append(h)
  return leaked


def require_isolation(*, allow_unisolated: bool = False,
                      hidden_paths: Sequence[str] = ()) -> dict:
  """isolation(), or SandboxError where the code could reach the trainer user's files, unless
  `allow_unisolated` (then a loud warning). Call before the first tool run."""
  report = isolation(tuple(hidden_paths))
  if not report["confined"]:
    what = "; ".join(report["missing"]) or "the hidden paths are listable"
    if not allow_unisolated:
      raise SandboxError(
          "config.tools: the Python tool cannot be confined on this machine, so model-written "
          f"code could read or write this user's files. Missing: {what}. Set "
          "config.tools.allow_unisolated = True to run it anyway (only on a throwaway "
          "machine or container).")
    logging.warning("RUNNING MODEL-WRITTEN CODE UNCONFINED (config.tools.allow_unisolated): "
                    "it can read and write what this user can. Missing: %s", what)
  return report


def _missing(r: dict, root: bool) -> list[str]:
  out = []
  if root and r["user"] != "nobody":
    out.append("dropping to uid 65534 (the interpreter's directories must be readable by "
               "'nobody', or the kernel must allow a mount namespace to expose them)")
  if not r["landlock"]:
    out.append("Landlock: Linux >= 5.13 with 'landlock' in the LSM list (check "
               "/sys/kernel/security/lsm; boot with lsm=...,landlock)")
  if not r["seccomp"]:
    out.append("seccomp: libseccomp.so.2 (apt-get install libseccomp2) and the `pyseccomp` "
               "package (pip install 'grpo_jax[tools]')")
  if not r["mount_namespace"]:
    out.append("namespaces: unprivileged user namespaces (sysctl "
               "kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, or on Ubuntu "
               "kernel.apparmor_restrict_unprivileged_userns=0) or, in a container, "
               "CAP_SYS_ADMIN")
  return out


def _readlink(path: str) -> str | None:
  try:
    return os.readlink(path)
  except OSError:
    return None


def _explain(r: dict) -> tuple[list[str], list[str]]:
  """Plain sentences: what the probed layers block, and what they leave open."""
  layers = (  # (holds, what it blocks, what is open without it)
      (r["landlock"] > 0,
       "the filesystem outside the interpreter, /usr, /bin and /lib*: nothing else readable, "
       "nothing writable but the run's own directory and private temp dirs (Landlock ABI "
       f"{r['landlock']})",
       "files outside the hidden paths that the code's uid may read or write (no Landlock)"),
      (r["user"] == "nobody",
       "rights: the code runs as uid 65534 (nobody) with no groups",
       "the code runs as the trainer's own uid (without capabilities)"),
      (bool(r["hidden"]),
       "the hidden paths: " + ", ".join(r["hidden"]),
       "the trainer user's home and working directory may be listed"),
      (r["seccomp"],
       "ptrace, mount, new namespaces, keyctl, bpf, perf_event_open, io_uring, kernel modules, "
       "internet sockets (seccomp)",
       "kernel attack surface: no seccomp filter"),
      (r["network"] == "namespace",
       "network: a down loopback only, nothing outside the run is reachable",
       "network namespace: none (internet sockets are refused by seccomp where it holds)"),
      (r["pid_namespace"],
       "outliving the run: every process the code starts dies with it (PID namespace)",
       "processes that leave the process group (setsid) can outlive the run"),
      (r["private_tmp"],
       "shared temp dirs: /tmp, /var/tmp, /dev/shm and /run/lock are fresh, size-limited tmpfs",
       "the shared /tmp (Landlock, where it holds, keeps the code out of it)"),
      (r["private_proc"],
       "seeing other processes: /proc lists only the run's own",
       "/proc (Landlock, where it holds, keeps the code out of it)"),
  )
  blocked = [b for holds, b, _ in layers if holds] + [
      "the trainer's environment: the child gets a fresh, minimal one",
      "per-process resource use: " + ", ".join(r["rlimits"]),
  ]
  open_ = [o for holds, _, o in layers if not holds] + [
      "reading files under /usr, /bin, /lib* and the interpreter's directories (the "
      "installed packages)",
      "the kernel surface seccomp allows (every other syscall)",
      "no cgroup: up to max_processes processes may each use memory_mb and the CPU limit",
      "RLIMIT_NPROC counts every process and thread of the run's uid on the machine, so "
      "concurrent runs share max_processes",
  ]
  return blocked, open_


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
  libseccomp.so.2 is missing (then `isolation()` says so)."""
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
    _started(proc.pid)
    try:
      out, err, truncated, timed_out = _communicate(
          proc, code.encode("utf-8", "surrogatepass"), limits.max_output_bytes,
          start + limits.timeout_s)
    finally:
      if proc.returncode is None and not _exited(proc.pid):
        _kill_group(proc.pid)
      for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()
      proc.wait()
      _reap_orphans(proc.pid)
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


# The process groups of recent runs (the child's pid names its group), for _reap_orphans.
_RECENT_GROUPS: collections.deque = collections.deque(maxlen=4096)
_REAP_LOCK = threading.Lock()


def _started(pid: int) -> None:
  with _REAP_LOCK:
    _RECENT_GROUPS.append(pid)


def _reaps_orphans() -> bool:
  """Whether orphaned processes land here: PID 1 (a container's entry point) or a subreaper."""
  if os.getpid() == 1:
    return True
  flag = ctypes.c_int(0)
  return (_libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
          and bool(flag.value))


@functools.cache
def _libc() -> ctypes.CDLL:
  return ctypes.CDLL(None, use_errno=True)


def _reap_orphans(group: int, grace_s: float = 0.2) -> None:
  """Where orphans land here (no PID namespace for the child), reaps the zombies the tool
  code left: children of ours from a run's process group or with uid 65534, never the
  trainer's own subprocesses. The processes of `group`, just killed, get `grace_s` to die."""
  if not _reaps_orphans():
    return
  me = os.getpid()
  deadline = time.monotonic() + grace_s
  while True:
    with _REAP_LOCK:
      groups = set(_RECENT_GROUPS)
    alive = 0
    for pid, ppid, pgrp, state, uid in _processes():
      ours = pgrp in groups or uid == NOBODY
      if not ours:
        continue
      if ppid == me and state == "Z":
        try:
          os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
          pass
      elif pgrp == group and state != "Z":
        alive += 1  # killed a moment ago: becomes our zombie soon
    if not alive or time.monotonic() >= deadline:
      return
    time.sleep(0.01)


def _processes():
  """(pid, ppid, pgrp, state, uid) of every process on the machine."""
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      uid = os.stat(f"/proc/{name}").st_uid
    except (OSError, IndexError):
      continue
    yield int(name), int(fields[1]), int(fields[2]), fields[0], uid


def _communicate(proc: subprocess.Popen, code_bytes: bytes, max_bytes: int,
                 deadline: float) -> tuple[bytes, bytes, bool, bool]:
  """Writes the code, keeps the first `max_bytes` of stdout and stderr, and kills the process
  group at `deadline`. Returns once the child has exited (not yet reaped: its pid still names
  the group) and its pipes are closed, or _DRAIN_GRACE_S after it exited or was killed."""
  in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
  captured = {out_fd: bytearray(), err_fd: bytearray()}
  truncated = timed_out = False
  pending = memoryview(code_bytes)
  try:
    pidfd = os.pidfd_open(proc.pid)
  except (AttributeError, OSError):
    pidfd = None
  with selectors.DefaultSelector() as sel:
    for fd in (in_fd, out_fd, err_fd):
      os.set_blocking(fd, False)
    sel.register(in_fd, selectors.EVENT_WRITE)
    sel.register(out_fd, selectors.EVENT_READ)
    sel.register(err_fd, selectors.EVENT_READ)
    if pidfd is not None:
      sel.register(pidfd, selectors.EVENT_READ)
    open_pipes, stop_at = {out_fd, err_fd}, None  # stop_at: set once the child has ended
    while True:
      now = time.monotonic()
      if stop_at is None and (now >= deadline or _exited(proc.pid)):
        timed_out = now >= deadline and not _exited(proc.pid)
        _kill_group(proc.pid)  # on exit too: stragglers left in the group (no PID namespace)
        stop_at = now + _DRAIN_GRACE_S
      if stop_at is not None and (not open_pipes or now >= stop_at) and _exited(proc.pid):
        break
      limit = (stop_at if stop_at is not None else deadline) - now
      if pidfd is None or stop_at is not None:
        limit = min(limit, _POLL_S)
      for key, _ in sel.select(max(limit, 0.0)):
        fd = key.fd
        if fd == in_fd:
          try:
            pending = pending[os.write(fd, pending[:_READ_CHUNK_BYTES]):]
          except BlockingIOError:
            continue
          except OSError:  # BrokenPipeError: the child is gone or stopped reading
            pending = pending[:0]
          if not pending:
            sel.unregister(fd)
            proc.stdin.close()
        elif fd in open_pipes:
          try:
            chunk = os.read(fd, _READ_CHUNK_BYTES)
          except BlockingIOError:
            continue
          if not chunk:
            sel.unregister(fd)
            open_pipes.discard(fd)
            continue
          buf = captured[fd]
          room = max_bytes - len(buf)
          if len(chunk) > room:
            truncated = True
          if room > 0:
            buf += chunk[:room]
        elif fd == pidfd:
          sel.unregister(fd)  # readable for good once the child exited
  if pidfd is not None:
    os.close(pidfd)
  return bytes(captured[out_fd]), bytes(captured[err_fd]), truncated, timed_out


def _exited(pid: int) -> bool:
  """Whether the child has exited, without reaping it (so its pid keeps naming its group)."""
  try:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
  except ChildProcessError:
    return True


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


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

