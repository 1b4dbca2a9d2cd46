"""The path of one GRPO step through the package: which grpo_jax modules it enters, in order.

  python -m tools.step_path                 # the offline smoke config, one layer; ~1 minute
  python -m tools.step_path --depth=1       # only the calls `trainer.grpo_step` makes itself

Runs `trainer.grpo_step` twice (the first compiles) and traces the second with `sys.setprofile`:
every Python call into a grpo_jax function, on the loop's thread. Prints the modules in the
order they are entered (consecutive calls into one module counted once), the distinct modules,
and how often the step enters each: what WORKSPACE.md's "Data flow of one GRPO step" states.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def trace(depth: int) -> list[str]:
  """grpo_jax modules entered by the second GRPO step of a smoke run, in order (depth: call
  depth below grpo_step to record, 0 = all)."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments.configs import arithmetic  # pylint: disable=import-outside-toplevel
  from grpo_jax import experiment, runstate, settings  # pylint: disable=import-outside-toplevel
  from grpo_jax import trainer  # pylint: disable=import-outside-toplevel
  from grpo_jax.data import iterator  # pylint: disable=import-outside-toplevel

  cfg = arithmetic.get_config("smoke")
  cfg.model.overrides.num_layers = 1
  with tempfile.TemporaryDirectory() as workdir:
    exp = experiment.build(settings.from_config(cfg, jax.device_count()), workdir)
    loop = runstate.LoopState("grpo", 0, iterator.Position(0, 0, exp.settings.seed + 1))
    models = runstate.initial_grpo_models(exp)
    loop, models, _ = trainer.grpo_step(exp, loop, models, 0)  # compiles
    entered, level = [], [0]

    def profile(frame, event, _):
      if event == "call":
        level[0] += 1
        module = frame.f_globals.get("__name__", "")
        if module.startswith("grpo_jax") and (not depth or level[0] <= depth + 1):
          entered.append(module.removeprefix("grpo_jax."))
      elif event == "return":
        level[0] -= 1

    sys.setprofile(profile)
    try:
      trainer.grpo_step(exp, loop, models, 1)
    finally:
      sys.setprofile(None)
  return entered


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depth", type=int, default=0,
                      help="call depth below trainer.grpo_step to record (0: all)")
  args = parser.parse_args()
  entered = trace(args.depth)
  path = [m for i, m in enumerate(entered) if i == 0 or m != entered[i - 1]]
  counts = collections.Counter(path)
  print(" -> ".join(path))
  print(json.dumps({"modules": len(counts), "entries": dict(counts.most_common()),
                    "depth": args.depth}))


if __name__ == "__main__":
  main()
