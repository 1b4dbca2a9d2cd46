"""Runs model-written Python in a confined child process and returns what it printed.

GRPO with a Python tool: the policy writes code, we run it, and feed the output back. That code
is hostile until proven otherwise, so it never runs in the trainer's process nor with the
trainer's rights. `run_python(code)` starts `python -I -c _WRAPPER` (isolated mode: no
PYTHON* variables, no user site) in its own session, in a fresh temporary directory, with a
scrubbed environment, and sends the code on stdin. No `preexec_fn` (the trainer is
multi-threaded): the wrapper confines itself before it runs the code, in layers, each of which
falls back quietly where the machine refuses it (`isolation()` says what holds here):

  1. namespaces (`unshare` through libc): network (only a down loopback: no connection
     anywhere), IPC, mount and PID, plus a user namespace when not root;
  2. in the mount namespace, mounts made private and fresh size-limited tmpfs on /tmp,
     /var/tmp, /dev/shm and /run/lock, so nothing is left in (or read from) shared temp dirs;
     the working directory is a directory of that fresh /tmp at the parent's temp-dir path;
  3. PID namespace: the wrapper forks an init (pid 1), which forks the process that runs the
     code and relays its exit status. When the init dies, the kernel kills every process in the
     namespace, even ones that called setsid, so killing the process group is enough; the
     outer wrapper re-raises the code's death signal so the parent sees "died of signal N";
  4. rlimits: CPU seconds (ceil(timeout_s) + 1, then SIGXCPU), address space (memory_mb), file
     size (max_file_mb), processes (max_processes), 64 open files, no core files;
  5. as root: no groups, gid and uid 65534 ("nobody") last, plus no_new_privs and non-dumpable.
     RLIMIT_NPROC does not bind uid 0, one more reason to drop. If the Python install sits under
     a directory nobody cannot enter (here /root/.pyenv, with /root 0700), that directory is
     replaced in the mount namespace by a tmpfs holding bind mounts of just the install
     (root-owned, so still read-only to nobody); without a mount namespace the code runs as the
     same user, and `isolation()` says so. Not root: the user namespace maps the trainer's uid
     to itself, and the code's process drops every capability.

The parent writes the code, reads stdout and stderr with one `select` loop (rather than reader
threads) under a single wall deadline, so an escaped grandchild holding a pipe cannot hang it;
it keeps the first `max_output_bytes` of each and discards the rest (an infinite print loop
costs CPU, not memory), and on the deadline kills the whole process group. It always reaps the
child and removes the temporary directory.

A trivial `print(1)` takes about 0.06 s end to end on the development machine (python -I
start-up is ~0.03 s of it; unshare, mounts and two forks the rest).

Not blocked (see `isolation()["not_blocked"]`): reading world-readable host files, kernel attack
surface (no seccomp filter), CPU and memory only per process (no cgroups: up to max_processes
processes, each with memory_mb), and RLIMIT_NPROC counts every process of uid 65534 on the
machine, so concurrent runs share that budget.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

NOBODY = 65534
_READ_CHUNK_BYTES = 65536
_DRAIN_GRACE_S = 0.5  # after the child exits or is killed, how long its pipes may stay open
_POLL_S = 0.01  # exit polling interval where pidfd_open is unavailable

# Runs in the child as `python -I -c _WRAPPER LIMITS_JSON`, code on stdin. Self-contained: it
# may import only the standard library. Order matters: read the code, unshare, mount, fork the
# PID namespace's init, then (in the code's process) rlimits, working directory, drop rights.
_WRAPPER = r'''
import ctypes, json, os, resource, signal, sys

A = json.loads(sys.argv[1])
CODE = sys.stdin.buffer.read()
_fd = os.open("/dev/null", os.O_RDWR)
os.dup2(_fd, 0)
os.close(_fd)
os.umask(0o022)
NOBODY = 65534
ROOT = os.geteuid() == 0
UID, GID = os.getuid(), os.getgid()
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
LAYERS = set()


def prctl(option, value):
  return LIBC.prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0


def mount(source, target, fstype, flags, data=None):
  enc = lambda s: None if s is None else s.encode()
  return LIBC.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


def enters(path, bits):
  """Whether uid/gid 65534 without supplementary groups has `bits` (1: x, 5: r+x) on path."""
  st = os.stat(path)
  shift = 6 if st.st_uid == NOBODY else 3 if st.st_gid == NOBODY else 0
  return (st.st_mode >> shift) & bits == bits


def first_blocked(path):
  """The outermost directory on `path` that nobody cannot enter (or read, for path), or None."""
  parts = path.rstrip("/").split("/")
  for i in range(1, len(parts) + 1):
    d = "/".join(parts[:i]) or "/"
    if not enters(d, 5 if i == len(parts) else 1):
      return d
  return None


def python_dirs():
  """Directories the interpreter reads from, outermost only (realpaths)."""
  paths = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix,
           os.path.dirname(os.path.realpath(sys.executable)), *sys.path}
  real = {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}
  return sorted(p for p in real if not any(p.startswith(q.rstrip("/") + "/") for q in real))


def expose_python(dirs):
  """Replaces each directory nobody cannot enter by a tmpfs holding bind mounts of `dirs`."""
  groups = {}
  for p in dirs:
    b = first_blocked(p)
    if b is not None and b not in ("/", p):
      groups.setdefault(b, []).append(p)
  for blocked, inner in groups.items():
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inner]
    if mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755"):
      for p, fd in zip(inner, fds):
        os.makedirs(p, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
    for fd in fds:
      os.close(fd)


def relay(child, r, w):
  """The outer process: waits for the init and dies the way the code's process died."""
  os.close(w)
  _, status = os.waitpid(child, 0)
  data = os.read(r, 32)
  status = int(data) if data else status
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    prctl(PR_SET_DUMPABLE, 0)  # no core file of ours
    try:
      signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
      pass
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is to be ignored
  os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def init(user_pid, w):
  """pid 1 of the namespace: reaps everything; when the code's process ends, reports and exits
  (the kernel then kills whatever the code left behind)."""
  while True:
    try:
      pid, status = os.wait()
    except ChildProcessError:
      os._exit(1)
    if pid == user_pid:
      os.write(w, b"%d" % status)
      os._exit(0)


def limit(res, soft, hard=None):
  hard = soft if hard is None else hard
  cur = resource.getrlimit(res)[1]
  if cur != resource.RLIM_INFINITY:
    soft, hard = min(soft, cur), min(hard, cur)
  resource.setrlimit(res, (soft, hard))


def drop_capabilities():
  class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
  LIBC.capset(ctypes.byref(Header(0x20080522, 0)), (ctypes.c_uint32 * 6)())


def report(exc, module):
  """Prints the traceback from the code's first frame on, like `python file.py` would."""
  module.__dict__.clear()  # frees what the code built, so a MemoryError can still be printed
  tb = exc.__traceback__
  while tb is not None and tb.tb_frame.f_code.co_filename != "<tool>":
    tb = tb.tb_next
  try:
    import linecache, traceback
    lines = CODE.decode("utf-8", "replace").splitlines(True)
    linecache.cache["<tool>"] = (len(CODE), None, lines, "<tool>")
    traceback.print_exception(type(exc), exc, tb)
  except BaseException:
    os.write(2, ("%s: %s\n" % (type(exc).__name__, exc)).encode("utf-8", "replace"))
  raise SystemExit(1)


prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
if os.getppid() != A["ppid"]:
  os._exit(137)  # the trainer is already gone

if not ROOT and LIBC.unshare(0x10000000) == 0:
  LAYERS.add("user")
  try:
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (UID, UID)),
                       ("gid_map", "%d %d 1" % (GID, GID))):
      with open("/proc/self/" + name, "w") as f:
        f.write(text)
  except OSError:
    pass
for name, flag in (("net", 0x40000000), ("ipc", 0x08000000), ("mnt", 0x00020000),
                   ("pid", 0x20000000)):
  if LIBC.unshare(flag) == 0:
    LAYERS.add(name)

CWD = A["workdir"]
DIRS = python_dirs()
if "mnt" in LAYERS and mount(None, "/", None, MS_REC | MS_PRIVATE):
  if ROOT:
    expose_python(DIRS)
  mb = A["max_file_mb"]
  for d, size_mb in (("/tmp", 4 * mb), ("/var/tmp", mb), ("/dev/shm", mb), ("/run/lock", 1)):
    if (os.path.isdir(d) and not os.path.islink(d) and
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV,
              "size=%dm,nr_inodes=4096,mode=1777" % size_mb)):
      if os.path.realpath(CWD).startswith(d + "/"):
        os.makedirs(CWD, mode=0o700)
        if ROOT:
          os.chown(CWD, NOBODY, NOBODY)
DROP = ROOT and all(first_blocked(p) is None for p in DIRS) and first_blocked(CWD) is None

if "pid" in LAYERS:
  r, w = os.pipe()
  child = os.fork()
  if child:
    relay(child, r, w)
  os.close(r)
  prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if "mnt" in LAYERS:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  child = os.fork()
  if child:
    init(child, w)
  os.close(w)

# The code's process.
os.chdir(CWD)
limit(resource.RLIMIT_CPU, A["cpu_s"], A["cpu_s"] + 1)
limit(resource.RLIMIT_AS, A["memory_mb"] << 20)
limit(resource.RLIMIT_FSIZE, A["max_file_mb"] << 20)
limit(resource.RLIMIT_NPROC, A["max_processes"])
limit(resource.RLIMIT_NOFILE, 64)
limit(resource.RLIMIT_CORE, 0)
if DROP:
  os.setgroups([])
  os.setgid(NOBODY)
  os.setuid(NOBODY)
elif "user" in LAYERS:
  drop_capabilities()
prctl(PR_SET_NO_NEW_PRIVS, 1)
prctl(PR_SET_DUMPABLE, 0)

import types
MAIN = types.ModuleType("__main__")
sys.modules["__main__"] = MAIN
sys.argv = ["<tool>"]
sys.stdout.reconfigure(line_buffering=True)  # what was printed survives a kill
try:
  exec(compile(CODE, "<tool>", "exec"), MAIN.__dict__)
except SystemExit:
  raise
except BaseException as exc:
  report(exc, MAIN)
'''


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """What one run of model-written code did."""
  status: str  # "ok" | "error" | "timeout" | "memory" | "killed"
  stdout: str  # utf-8 (errors="replace"), the first max_output_bytes bytes
  stderr: str  # likewise
  returncode: int | None  # as subprocess: -N for "died of signal N"
  seconds: float  # wall time, start-up and clean-up included
  truncated: bool  # stdout or stderr was cut to max_output_bytes


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run limits; checked here, before anything runs."""
  timeout_s: float = 5.0  # wall clock; CPU time is limited to ceil(timeout_s) + 1 s per process
  memory_mb: int = 512  # address space per process (RLIMIT_AS)
  max_output_bytes: int = 16384  # per stream
  max_processes: int = 16  # RLIMIT_NPROC (threads count too)
  max_file_mb: int = 16  # largest file; the fresh /tmp holds 4x this

  def __post_init__(self):
    t = self.timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
      raise ValueError(f"timeout_s must be a finite number > 0, got {t!r}")
    for name, lowest in (("memory_mb", 32), ("max_output_bytes", 0), ("max_processes", 1),
                         ("max_file_mb", 1)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
        raise ValueError(f"{name} must be an int >= {lowest}, got {v!r}")


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 16384, max_processes: int = 16,
               max_file_mb: int = 16) -> ToolResult:
  """Runs `code` in the sandbox. Never raises for anything the code does; ValueError for bad
  arguments (before anything runs)."""
  limits = Limits(timeout_s, memory_mb, max_output_bytes, max_processes, max_file_mb)
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


_RLIMIT_NAMES = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE",
                 "RLIMIT_CORE")

# Runs as tool code and reports, from inside, what the sandbox looks like.
_PROBE = r'''
import json, os, resource, socket
def ns(name):
  try:
    return os.readlink("/proc/self/ns/" + name)
  except OSError:
    return None
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
try:
  interfaces = [n for _, n in socket.if_nameindex()]
except OSError:
  interfaces = None
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "ns": {n: ns(n) for n in ("net", "pid", "mnt", "ipc", "user")},
    "interfaces": interfaces,
    "marker_visible": os.path.exists(MARKER),
    "own_proc": os.readlink("/proc/self") == str(os.getpid()),
    "no_new_privs": status.get("NoNewPrivs", "").strip() == "1",
    "no_capabilities": int(status.get("CapEff", "0").strip(), 16) == 0,
    "rlimits": {n: resource.getrlimit(getattr(resource, n))[0] for n in RLIMITS},
}))
'''


@functools.cache
def isolation() -> dict:
  """What this machine enforces, probed once from inside a sandbox run and cached.

  Keys: user ("nobody" | "same"), network ("namespace" | "none"), pid_namespace,
  mount_namespace, ipc_namespace, user_namespace, private_tmp, private_proc, no_new_privs,
  no_capabilities (bools), rlimits (names of the finite limits), blocked and not_blocked (plain
  sentences). Raises RuntimeError if the probe itself fails: then the sandbox is broken here."""
  own_ns = {n: _readlink(f"/proc/self/ns/{n}") for n in ("net", "pid", "mnt", "ipc", "user")}
  fd, marker = tempfile.mkstemp(prefix="grpo_sandbox_probe_", dir="/tmp")
  os.close(fd)
  try:
    source = f"MARKER = {marker!r}\nRLIMITS = {_RLIMIT_NAMES!r}\n{_PROBE}"
    result = run_python(source, timeout_s=10.0)
  finally:
    os.remove(marker)
  if result.status != "ok":
    raise RuntimeError(f"sandbox probe failed ({result.status}): {result.stderr[-2000:]}")
  seen = json.loads(result.stdout)
  differs = {n: seen["ns"][n] is not None and seen["ns"][n] != own_ns[n] for n in own_ns}
  report = {
      "user": "nobody" if seen["uid"] == NOBODY else "same",
      "network": "namespace" if differs["net"] else "none",
      "pid_namespace": differs["pid"],
      "mount_namespace": differs["mnt"],
      "ipc_namespace": differs["ipc"],
      "user_namespace": differs["user"],
      "private_tmp": not seen["marker_visible"],
      "private_proc": differs["pid"] and seen["own_proc"],
      "no_new_privs": seen["no_new_privs"],
      "no_capabilities": seen["no_capabilities"],
      "rlimits": [n for n, v in seen["rlimits"].items() if v != -1],
      "interfaces": seen["interfaces"],
      "probe_seconds": round(result.seconds, 3),
  }
  report["blocked"], report["not_blocked"] = _explain(report)
  return report


def _readlink(path: str) -> str | None:
  try:
    return os.readlink(path)
  except OSError:
    return None


def _explain(r: dict) -> tuple[list[str], list[str]]:
  """Plain sentences: what the probed layers block, and what they leave open."""
  layers = (  # (holds, what it blocks, what is open without it)
      (r["user"] == "nobody",
       "writing the trainer's files, and reading those not world-readable: uid 65534 (nobody)",
       "the code runs as the trainer's own uid: it can read and write what the trainer can "
       "(and for root, RLIMIT_NPROC does not apply)"),
      (r["network"] == "namespace",
       "network: a down loopback only, nothing outside the run is reachable",
       "network: the code can open connections"),
      (r["pid_namespace"],
       "outliving the run: every process the code starts dies with it (PID namespace)",
       "processes that leave the process group (setsid) can outlive the run"),
      (r["private_tmp"],
       "shared temp dirs: /tmp, /var/tmp, /dev/shm and /run/lock are fresh, size-limited tmpfs",
       "the code can read and leave files in the shared /tmp"),
      (r["private_proc"],
       "seeing other processes: /proc lists only the run's own",
       "/proc lists the machine's processes (their environments readable as the uid allows)"),
  )
  blocked = [b for holds, b, _ in layers if holds] + [
      "the trainer's environment: the child gets a fresh, minimal one",
      "per-process resource use: " + ", ".join(r["rlimits"]),
  ]
  open_ = [o for holds, _, o in layers if not holds] + [
      "reading world-readable files anywhere on the host (the repository, datasets, /etc)",
      "kernel attack surface: no seccomp filter",
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
  return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir,
          "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
          "MKL_NUM_THREADS": "1"}


def _run(code: str, limits: Limits) -> ToolResult:
  start = time.monotonic()
  workdir = tempfile.mkdtemp(prefix="grpo_tool_")
  try:
    if os.geteuid() == 0:
      os.chown(workdir, NOBODY, NOBODY)
    args = {"ppid": os.getpid(), "workdir": workdir, "cpu_s": math.ceil(limits.timeout_s) + 1,
            "memory_mb": limits.memory_mb, "max_file_mb": limits.max_file_mb,
            "max_processes": limits.max_processes}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", _WRAPPER, json.dumps(args)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=child_env(workdir),
        start_new_session=True)
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
  finally:
    _remove_tree(workdir)
  stdout = out.decode("utf-8", errors="replace")
  stderr = err.decode("utf-8", errors="replace")
  return ToolResult(classify(proc.returncode, stderr, timed_out), stdout, stderr,
                    proc.returncode, time.monotonic() - start, truncated)


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

