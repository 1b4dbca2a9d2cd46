#!/usr/bin/env python
"""Synchronous vs rollouts sampled ahead (grpo.max_staleness) on the offline default, 3 seeds.

  python tools/run_staleness.py --out=experiments/results/staleness    # ~40 min on 2 CPU cores
  python tools/run_staleness.py --seeds=0 --variant=smoke --out=/tmp/s  # seconds: a check

For each seed: one warm start (the default's SFT, `grpo.steps = 0`), then from it (init_from)
each variant: "sync" (k = 0), "k1" (k = 1), "k2_tis" (k = 2 with token-level truncated
importance sampling), "k1_inflight" (k = 1, the samples switching to the update's weights as
they decode), one process at a time (`--variants` picks some; they join <out>/results.json). Reads their metrics.jsonl: held-out greedy
accuracy at GRPO step 0 and at the end, the mean GRPO step time (`step_s`, the first step and
its compilations excluded) and the mean sampler / trainer mismatch (`mismatch/kl`). Writes
<out>/results.json, <out>/table.md and <out>/accuracy.png (accuracy against steps, every run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from grpo_jax import metrics  # noqa: E402

VARIANTS = {"sync": [], "k1": ["--config.grpo.max_staleness=1"],
            "k2_tis": ["--config.grpo.max_staleness=2", "--config.grpo.loss.correction=tis"],
            # in-flight weight updates: the samples switch to the update's weights after 8
            # decode steps (of 24)
            "k1_inflight": ["--config.grpo.max_staleness=1", "--config.grpo.inflight_after=8"]}


def run(args: list[str]) -> None:
  cmd = [sys.executable, "-m", "experiments.train", *args]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def summarize(workdir: str) -> dict:
  rows = metrics.read_metrics(workdir)
  evals = [r for r in rows if "eval/accuracy" in r]
  grpo = [r for r in rows if r.get("phase") == "grpo" and "loss" in r]
  return {"start": evals[0]["eval/accuracy"], "end": evals[-1]["eval/accuracy"],
          "steps": len(grpo), "step_s": float(np.mean([r["step_s"] for r in grpo[1:]])),
          "mismatch_kl": float(np.mean([r["mismatch/kl"] for r in grpo])),
          "max_staleness": max(r.get("staleness", 0.0) for r in grpo),
          "curve": [(r["step"], r["eval/accuracy"]) for r in evals]}


def table(results: dict) -> str:
  seeds = sorted(results)
  lines = ["| variant | " + " | ".join(f"seed {s}: step 0 -> end" for s in seeds)
           + " | mean gain (points) | GRPO step s (mean) | mismatch/kl |",
           "|---" * (len(seeds) + 4) + "|"]
  for name in VARIANTS:
    if not all(name in results[s] for s in seeds):
      continue
    runs = [results[s][name] for s in seeds]
    cells = [f"{100 * r['start']:.1f} -> {100 * r['end']:.1f}" for r in runs]
    gain = np.mean([100 * (r["end"] - r["start"]) for r in runs])
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {gain:+.1f} | "
                 f"{np.mean([r['step_s'] for r in runs]):.3f} | "
                 f"{np.mean([r['mismatch_kl'] for r in runs]):.2e} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variant", default="", help="config variant, e.g. smoke")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="which of " + ", ".join(VARIANTS))
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  variants = args.variants.split(",")
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
  config = "--config=experiments/configs/arithmetic.py" + (f":{args.variant}" if args.variant
                                                           else "")
  saved = os.path.join(out, "results.json")
  results = {}
  if os.path.exists(saved):  # the variants run before, kept unless run again
    with open(saved) as f:
      results = {int(seed): runs for seed, runs in json.load(f).items()}
  for seed in (int(s) for s in args.seeds.split(",")):
    warm = os.path.join(out, f"seed{seed}", "warmstart")
    seed_flags = [f"--config.seed={seed}", f"--config.data.seed={seed}"]
    if not os.path.exists(os.path.join(warm, "metrics.jsonl")):
      run([config, f"--workdir={warm}", "--config.grpo.steps=0", *seed_flags])
    results.setdefault(seed, {})
    for name in variants:
      flags = VARIANTS[name]
      workdir = os.path.join(out, f"seed{seed}", name)
      run([config, f"--workdir={workdir}", f"--config.init_from={warm}", *seed_flags, *flags])
      results[seed][name] = summarize(workdir)
  with open(saved, "w") as f:
    json.dump(results, f, indent=1)
  text = table(results)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  from plot_metrics import plot_workdirs  # pylint: disable=import-outside-toplevel
  runs = [(s, n) for s in sorted(results) for n in VARIANTS
          if os.path.exists(os.path.join(out, f"seed{s}", n, "metrics.jsonl"))]
  dirs = [os.path.join(out, f"seed{s}", n) for s, n in runs]
  names = [f"{n} seed {s}" for s, n in runs]
  print("figure:", plot_workdirs(dirs, names, ["eval/accuracy"],
                                 os.path.join(out, "accuracy.png")))


if __name__ == "__main__":
  main()
