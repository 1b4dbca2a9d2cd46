"""What the tool sandbox enforces on this machine, probed from inside a sandbox run.

Which of the sandbox's layers (`grpo_jax/sandbox.py`) the machine allows varies (a container
without CAP_SYS_ADMIN has no namespaces; an old kernel no Landlock). `isolation()` runs the probe
(`grpo_jax/sandbox_probe.py`) as tool code once and reports what held. The trainer calls
`require_isolation` before the first rollout: the user's private files must be out of reach
(uid nobody as root, Landlock otherwise), or the run stops with an error that says what is
missing and how to enable it, unless the user explicitly sets `tools.allow_unisolated`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Sequence

from grpo_jax import sandbox
from grpo_jax.sandbox import NOBODY, SandboxError

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_probe.py")
_RLIMIT_NAMES = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE",
                 "RLIMIT_CORE")


@functools.cache
def isolation(hidden_paths: tuple[str, ...] = ()) -> dict:
  """What this machine enforces, probed once (per hidden_paths) from inside a sandbox run.

  Keys: user ("nobody" | "same"), landlock (its ABI version, 0: none), seccomp, network
  ("namespace" | "none"), pid_namespace, mount_namespace, ipc_namespace, user_namespace,
  private_tmp, private_proc, no_new_privs, no_capabilities (bools), hidden (the paths the code
  cannot list), rlimits (names of the finite limits), confined (the trainer user's files are
  out of the code's reach), missing (what would confine it, and how to enable it), blocked and
  not_blocked (plain sentences). Raises SandboxError if the probe itself fails."""
  hidden = sandbox.hidden_realpaths(hidden_paths)
  own_ns = {n: _readlink(f"/proc/self/ns/{n}") for n in ("net", "pid", "mnt", "ipc", "user")}
  fd, marker = tempfile.mkstemp(prefix="grpo_sandbox_probe_", dir="/tmp")
  os.close(fd)
  try:
    with open(PROBE) as f:
      source = f"{f.read()}\nmain({marker!r}, {hidden!r}, {_RLIMIT_NAMES!r})\n"
    result = sandbox.run_python(source, timeout_s=10.0, hidden_paths=hidden_paths)
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
