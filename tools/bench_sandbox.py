"""Per-call cost of the tool sandbox: `print(1)` end to end, one call at a time.

    python tools/bench_sandbox.py [--calls=40] [--baseline=OLD_SANDBOX.py]

--baseline times another sandbox.py (e.g. `git show REV:grpo_jax/sandbox.py > /tmp/old.py`)
in the same run, alternating with the current one so that load drifts hit both alike.
Prints one JSON line per variant: median and p90 seconds per call, and which layers held.
"""

import importlib.util
import json
import os
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_integer("calls", 40, "calls per variant (alternated in rounds of 5)")
flags.DEFINE_string("baseline", "", "path of another sandbox.py to time beside the current one")
FLAGS = flags.FLAGS


def _load(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def main(_):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from grpo_jax import sandbox  # pylint: disable=import-outside-toplevel
  variants = {"current": sandbox}
  if FLAGS.baseline:
    variants["baseline"] = _load(FLAGS.baseline, "baseline_sandbox")
  times = {name: [] for name in variants}
  for module in variants.values():
    assert module.run_python("print(1)").stdout == "1\n"  # warm the page cache
  for _ in range(max(1, FLAGS.calls // 5)):
    for name, module in variants.items():
      for _ in range(5):
        t = time.perf_counter()
        result = module.run_python("print(1)")
        times[name].append(time.perf_counter() - t)
        assert result.status == "ok", result.stderr
  for name, module in variants.items():
    ts = sorted(times[name])
    layers = getattr(module.run_python("print(1)"), "layers", None)
    print(json.dumps({"bench": "sandbox_call", "variant": name, "calls": len(ts),
                      "median_s": round(statistics.median(ts), 4),
                      "p90_s": round(ts[int(0.9 * (len(ts) - 1))], 4), "layers": layers}))


if __name__ == "__main__":
  app.run(main)
