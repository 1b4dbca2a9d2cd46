"""The unified-paradigm comparison (DeepSeekMath 5.2.1) on the offline arithmetic task.

  python tools/run_paradigms.py --out=workdirs/paradigms            # ~15-20 min on 2 CPU cores
  python tools/run_paradigms.py --out=/tmp/p --variant=smoke         # seconds (a test)

1. one warm start (SFT on the flawed teacher) shared by every method, with its step-0 eval;
2. each method of experiments/configs/paradigm.py (`paradigm.py:<name>,<variant>`) for the
   same number of steps from that warm start (`--config.init_from`), same data and model;
3. one figure of held-out greedy accuracy (and pass@k / maj@k) against steps for all of them
   (`<out>/paradigms.png`) and a table (`<out>/paradigms.md`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from experiments.configs.paradigm import PARADIGMS  # noqa: E402
from grpo_jax import metrics  # noqa: E402


def run(args: list[str]) -> None:
  cmd = [sys.executable, "-m", "experiments.train", *args]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def evals(workdir: str) -> list[dict]:
  return [r for r in metrics.read_metrics(workdir) if "eval/accuracy" in r]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--variant", default="local", help="config variant: local or smoke")
  parser.add_argument("--paradigms", default=",".join(PARADIGMS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--extra", action="append", default=[],
                      help="extra --config.key=value flags for every paradigm run")
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  warm = os.path.join(out, "warmstart")
  run([f"--config=experiments/configs/arithmetic.py:{args.variant}", f"--workdir={warm}",
       "--config.grpo.steps=0", f"--config.seed={args.seed}", *args.extra])
  names = [n for n in args.paradigms.split(",") if n]
  for name in names:
    run([f"--config=experiments/configs/paradigm.py:{name},{args.variant}",
         f"--workdir={os.path.join(out, name)}", f"--config.init_from={warm}",
         f"--config.seed={args.seed}", *args.extra])

  start = evals(warm)[-1]
  rows = ["| method | " + " | ".join(k for k in start if k.startswith("eval/") and
                                       not k.endswith("_s")) + " |"]
  keys = [k for k in start if k.startswith("eval/") and not k.endswith("_s")]
  rows.append("|---" * (len(keys) + 1) + "|")
  rows.append("| warm start (step 0) | " + " | ".join(f"{start[k]:.3f}" for k in keys) + " |")
  for name in names:
    last = evals(os.path.join(out, name))[-1]
    rows.append(f"| {name} (step {last['step']}) | " +
                " | ".join(f"{last.get(k, float('nan')):.3f}" for k in keys) + " |")
  table = "\n".join(rows)
  with open(os.path.join(out, "paradigms.md"), "w") as f:
    f.write(table + "\n")
  print(table)

  from plot_metrics import plot_workdirs
  plot_keys = [k for k in ("eval/accuracy", "eval/maj_at_8", "eval/pass_at_8", "reward")
               if k in start or k == "reward"]
  png = plot_workdirs([os.path.join(out, n) for n in names], names, plot_keys,
                      os.path.join(out, "paradigms.png"))
  print(f"figure: {png}")


if __name__ == "__main__":
  main()
