"""The sandbox child's lifetime seen from the parent: its output, its deadline, its orphans.

`communicate` writes the code to the child's stdin and reads stdout and stderr with one
`select` loop under a single wall deadline (an escaped grandchild holding a pipe cannot hang
it), keeps the first `max_bytes` of each, and kills the whole process group on the deadline. A
trainer that is PID 1 of a container without a PID namespace for the child (or a subreaper)
reaps the tool's orphans (`reap_orphans`), never its own subprocesses.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import selectors
import signal
import subprocess
import threading
import time

NOBODY = 65534  # the uid tool code runs as under a root trainer
_READ_CHUNK_BYTES = 65536
_DRAIN_GRACE_S = 0.5  # after the child exits or is killed, how long its pipes may stay open
_POLL_S = 0.01  # exit polling interval where pidfd_open is unavailable
_PR_GET_CHILD_SUBREAPER = 37

# The process groups of recent runs (the child's pid names its group), for reap_orphans.
_RECENT_GROUPS: collections.deque = collections.deque(maxlen=4096)
_REAP_LOCK = threading.Lock()


def started(pid: int) -> None:
  """Records a new child: its process group is the run's (see reap_orphans)."""
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


def reap_orphans(group: int, grace_s: float = 0.2) -> None:
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


def communicate(proc: subprocess.Popen, code_bytes: bytes, max_bytes: int,
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
      if stop_at is None and (now >= deadline or exited(proc.pid)):
        timed_out = now >= deadline and not exited(proc.pid)
        kill_group(proc.pid)  # on exit too: stragglers left in the group (no PID namespace)
        stop_at = now + _DRAIN_GRACE_S
      if stop_at is not None and (not open_pipes or now >= stop_at) and exited(proc.pid):
        break
      limit = (stop_at if stop_at is not None else deadline) - now
      if pidfd is None or stop_at is not None:
        limit = min(limit, _POLL_S)
      for key, _ in sel.select(max(limit, 0.0)):
        fd = key.fd
        if fd == in_fd:
          pending = _feed(sel, proc.stdin, in_fd, pending)
        elif fd in open_pipes:
          truncated |= _drain(sel, fd, open_pipes, captured[fd], max_bytes)
        elif fd == pidfd:
          sel.unregister(fd)  # readable for good once the child exited
  if pidfd is not None:
    os.close(pidfd)
  return bytes(captured[out_fd]), bytes(captured[err_fd]), truncated, timed_out


def _feed(sel: selectors.BaseSelector, stdin, fd: int, pending: memoryview) -> memoryview:
  """Writes the next piece of the code to the child's stdin (`fd`), closing it once everything
  is written or the child stopped reading; returns what is left to write."""
  try:
    pending = pending[os.write(fd, pending[:_READ_CHUNK_BYTES]):]
  except BlockingIOError:
    return pending
  except OSError:  # BrokenPipeError: the child is gone or stopped reading
    pending = pending[:0]
  if not pending:
    sel.unregister(fd)
    stdin.close()
  return pending


def _drain(sel: selectors.BaseSelector, fd: int, open_pipes: set[int], buf: bytearray,
           max_bytes: int) -> bool:
  """Reads what the pipe `fd` holds, keeping the first `max_bytes` in `buf`; at its end, stops
  watching it. Returns whether output was cut."""
  try:
    chunk = os.read(fd, _READ_CHUNK_BYTES)
  except BlockingIOError:
    return False
  if not chunk:
    sel.unregister(fd)
    open_pipes.discard(fd)
    return False
  room = max_bytes - len(buf)
  if room > 0:
    buf += chunk[:room]
  return len(chunk) > room


def exited(pid: int) -> bool:
  """Whether the child has exited, without reaping it (so its pid keeps naming its group)."""
  try:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
  except ChildProcessError:
    return True


def kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
