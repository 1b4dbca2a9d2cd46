#!/usr/bin/env python
"""On-policy distillation on the offline task: a larger teacher lifts the default student.

  python tools/run_distill.py --out=experiments/results/distill   # ~25 min on 2 CPU cores
  python tools/run_distill.py --out=/tmp/d --variant=smoke        # seconds: a check

1. the teacher: the offline default with twice the layers (4), SFT and GRPO, exported as a
   Hugging Face checkpoint (`tools/export_hf.py`); `--teacher=DIR` uses an existing one;
2. the student's warm start: the default model's SFT (`grpo.steps = 0`);
3. from that warm start (init_from), the same number of steps of: on-policy distillation from
   the teacher (`grpo.algorithm = distill`), and GRPO with the exact-answer reward.
Writes <out>/table.md (held-out greedy accuracy, pass@8 and maj@8 of each) and prints it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grpo_jax import metrics  # noqa: E402


def run(module: str, args: list[str]) -> None:
  cmd = [sys.executable, "-m", module, *args]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def last_eval(workdir: str) -> dict:
  return [r for r in metrics.read_metrics(workdir) if "eval/accuracy" in r][-1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--variant", default="", help="config variant, e.g. smoke")
  parser.add_argument("--teacher", default="", help="an existing HF checkpoint directory")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  config = "--config=experiments/configs/arithmetic.py" + (f":{args.variant}" if args.variant
                                                           else "")
  seed = [f"--config.seed={args.seed}", f"--config.data.seed={args.seed}"]
  teacher = args.teacher
  if not teacher:
    teacher = os.path.join(out, "teacher_hf")
    run("experiments.train", [config, f"--workdir={out}/teacher", *seed,
                              "--config.model.overrides.num_layers=4"])
    run("tools.export_hf", [f"--workdir={out}/teacher", f"--out={teacher}"])
  warm = os.path.join(out, "student_warmstart")
  if not os.path.exists(os.path.join(warm, "metrics.jsonl")):  # (kept from an earlier call)
    run("experiments.train", [config, f"--workdir={warm}", "--config.grpo.steps=0", *seed])
  runs = {"distill": ["--config.grpo.algorithm=distill", f"--config.distill.teacher={teacher}"],
          "grpo": []}
  for name, flags in runs.items():
    run("experiments.train", [config, f"--workdir={out}/{name}", f"--config.init_from={warm}",
                              *seed, *flags])
  keys = [k for k in ("eval/accuracy", "eval/pass_at_8", "eval/maj_at_8")
          if k in last_eval(warm)]
  rows = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, workdir in (("teacher (4 layers, SFT + GRPO)", f"{out}/teacher"),
                        ("student warm start (2 layers, SFT)", warm),
                        ("student + on-policy distillation", f"{out}/distill"),
                        ("student + GRPO (exact-answer reward)", f"{out}/grpo")):
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      e = last_eval(workdir)
      rows.append(f"| {name} | " + " | ".join(f"{100 * e[k]:.1f}%" for k in keys) + " |")
  table = "\n".join(rows)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
