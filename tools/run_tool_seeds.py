#!/usr/bin/env python
"""The tool task's table: held-out accuracy with and without the Python tool, same budget, 3 seeds.

  python tools/run_tool_seeds.py --out=experiments/results/tool_arithmetic   # ~30 min, 2 CPUs
  python tools/run_tool_seeds.py --seeds=0 --variant=smoke --out=/tmp/t       # seconds: a check

For each seed (config.seed and config.data.seed) it trains experiments/configs/tool_arithmetic.py
(tool) and its `notool` variant in fresh workdirs under --out, one after the other (one process
each: the runs do not share the 2 cores), then reads their metrics.jsonl: held-out greedy
accuracy after SFT (GRPO step 0) and at the end, tool calls per completion and the tool error
rate (calls whose status is not "ok", from the training rollouts, all steps), wall time. Writes
<out>/results.json and <out>/table.md (the README's table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = "experiments/configs/tool_arithmetic.py"


def read_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(rows: list[dict]) -> dict:
  evals = [r for r in rows if "eval/accuracy" in r]
  grpo = [r for r in rows if r.get("phase") == "grpo" and "reward" in r]
  calls = [r.get("episode/tool_calls", 0.0) for r in grpo]
  ok = [r.get("episode/tool_ok", 1.0) for r in grpo if r.get("episode/tool_calls", 0.0) > 0]
  return {
      "accuracy_after_sft": evals[0]["eval/accuracy"],
      "accuracy_final": evals[-1]["eval/accuracy"],
      "eval_tool_calls_after_sft": evals[0].get("eval/tool_calls", 0.0),
      "eval_tool_calls_final": evals[-1].get("eval/tool_calls", 0.0),
      "train_tool_calls_first": calls[0] if calls else 0.0,
      "train_tool_calls_last": calls[-1] if calls else 0.0,
      "tool_error_rate": float(1.0 - np.mean(ok)) if ok else 0.0,
      "grpo_steps": grpo[-1]["step"] if grpo else 0,
      "curve": [(r["step"], r["eval/accuracy"]) for r in evals],
  }


def run(arm: str, seed: int, variant: str, out: str) -> dict:
  workdir = os.path.join(out, f"{arm}_seed{seed}")
  arg = ",".join(x for x in (variant, "notool" if arm == "notool" else "") if x) or "local"
  cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}:{arg}",
         f"--workdir={workdir}", f"--config.seed={seed}", f"--config.data.seed={seed}"]
  start = time.time()
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  result = {"arm": arm, "seed": seed, "wall_s": time.time() - start, "workdir": workdir,
            **summarize(read_rows(workdir))}
  print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
  return result


def table(results: list[dict]) -> str:
  lines = ["| arm | seed | acc. after SFT | acc. after GRPO | tool calls / completion (eval, "
           "SFT -> GRPO) | tool error rate | wall |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['arm']} | {r['seed']} | {r['accuracy_after_sft']:.3f} | "
                 f"{r['accuracy_final']:.3f} | {r['eval_tool_calls_after_sft']:.2f} -> "
                 f"{r['eval_tool_calls_final']:.2f} | {r['tool_error_rate']:.3f} | "
                 f"{r['wall_s'] / 60:.1f} min |")
  for arm in ("tool", "notool"):
    rows = [r for r in results if r["arm"] == arm]
    if rows:
      final = [r["accuracy_final"] for r in rows]
      lines.append(f"| **{arm}** mean ± sd | {len(rows)} seeds | "
                   f"{np.mean([r['accuracy_after_sft'] for r in rows]):.3f} | "
                   f"**{np.mean(final):.3f} ± {np.std(final):.3f}** | "
                   f"{np.mean([r['eval_tool_calls_final'] for r in rows]):.2f} | | |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variant", default="", help="e.g. smoke (a quick check)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for seed in (int(s) for s in args.seeds.split(",")):
    for arm in ("tool", "notool"):
      results.append(run(arm, seed, args.variant, args.out))
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  md = table(results)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(md + "\n")
  print(md)
  return results


if __name__ == "__main__":
  main()
