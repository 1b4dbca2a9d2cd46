"""Runs programs through grpo_jax.sandbox in a process of its own, as a trainer would.

    python sandbox_driver.py LIB_DIR SPEC_JSON

LIB_DIR holds copies of grpo_jax/sandbox*.py (and the landlock / pyseccomp packages), so that
the driver runs under any user and any interpreter (a venv under /tmp, the system Python)
without importing JAX. SPEC_JSON: {"programs": {name: code}, "hidden_paths": [...],
"namespaces": [...] or null, "zombie_wait_s": float, "subreaper": bool (orphans land here, as
on PID 1)}. Prints one JSON line: {name: result},
"isolation", and "zombies" (zombie children of this process left after the runs).
"""

import dataclasses
import json
import os
import sys
import time


def zombie_children() -> list[int]:
  me, found = os.getpid(), []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if fields[0] == "Z" and int(fields[1]) == me:
        found.append(int(name))
  return found


def main():
  sys.path.insert(0, sys.argv[1])
  from grpo_jax import sandbox, sandbox_isolation  # pylint: disable=import-outside-toplevel
  spec = json.loads(sys.argv[2])
  if spec.get("subreaper"):
    import ctypes  # pylint: disable=import-outside-toplevel
    assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
  if spec.get("namespaces") is not None:
    sandbox.NAMESPACES = tuple(spec["namespaces"])
  out = {}
  for name, code in spec["programs"].items():
    try:
      out[name] = dataclasses.asdict(
          sandbox.run_python(code, hidden_paths=spec.get("hidden_paths", ())))
    except sandbox.SandboxError as e:
      out[name] = {"status": "sandbox_error", "stdout": "", "stderr": str(e)}
  time.sleep(spec.get("zombie_wait_s", 0.0))
  out["zombies"] = zombie_children()
  out["isolation"] = sandbox_isolation.isolation(tuple(spec.get("hidden_paths", ())))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
