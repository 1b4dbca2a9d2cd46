"""The isolation probe: a tool program that reports, from inside the sandbox, what it looks like.

`sandbox_isolation.isolation()` sends this file's source as the code of one sandbox run,
followed by a call `main(MARKER, HIDDEN, RLIMITS)`, and reads the JSON line it prints. Standard
library only: the code runs in the sandbox's interpreter, where this package is out of reach.
"""

import json
import os
import resource
import socket


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


def probe(marker, hidden, rlimits):
  """What the code sees. marker: a file in the shared /tmp; hidden: the hidden paths (none may
  be listed); rlimits: resource limit names."""
  try:
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines()
                  if ":" in l)
  except OSError:
    status = {}
  try:
    interfaces = [n for _, n in socket.if_nameindex()]
  except OSError:
    interfaces = None
  return {
      "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
      "ns": {n: ns(n) for n in ("net", "pid", "mnt", "ipc", "user")},
      "interfaces": interfaces,
      "marker_visible": os.path.exists(marker),
      "hidden_listed": {h: listed(h) for h in hidden if listed(h)},
      "own_proc": os.path.exists("/proc/self") and os.readlink("/proc/self") == str(os.getpid()),
      "no_new_privs": status.get("NoNewPrivs", "").strip() == "1",
      "no_capabilities": int(status.get("CapEff", "0").strip(), 16) == 0,
      "rlimits": {n: resource.getrlimit(getattr(resource, n))[0] for n in rlimits},
  }


def main(marker, hidden, rlimits):
  print(json.dumps(probe(marker, hidden, rlimits)))
