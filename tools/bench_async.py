#!/usr/bin/env python
"""A GRPO step's wall time with rollouts sampled ahead (grpo.max_staleness) and the samplers on
their own devices (mesh.rollout_devices), on simulated CPU devices.

  python tools/bench_async.py                       # 8 simulated devices, ~10 min on 2 cores
  python tools/bench_async.py --steps=3 --small     # seconds: a check
  JAX_PLATFORMS=cuda python tools/bench_async.py --cases=sync,k1   # one accelerator

Each case is one process (`experiments.train` on the offline default, no SFT, no evaluation
between steps) with XLA_FLAGS=--xla_force_host_platform_device_count=--devices; cases run one
after the other, the list twice in alternation. One JSON line per case and round: the median
over steps 2.. of `step_s` (the whole step), `sample_s` (drawing the rollout), `score_s` (host
scoring) and `update_s` (queued update to its metrics), and the bound the overlap aims at,
max(sample + score, update), against their sum for the synchronous step. On a CPU the
simulated devices share the machine's cores (`os.cpu_count()` is printed with the figures), so
the sampler and the update compete for them even on disjoint devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grpo_jax import metrics  # noqa: E402

CASES = {"sync": [], "k1": ["--config.grpo.max_staleness=1"],  # one mesh
         "sync_split": ["--config.mesh.rollout_devices=4"],      # samplers on 4 devices
         "k1_split": ["--config.mesh.rollout_devices=4", "--config.grpo.max_staleness=1"],
         # in-flight weight updates after 8 decode steps (of the smoke / default budgets)
         "k1_inflight": ["--config.grpo.max_staleness=1", "--config.grpo.inflight_after=8"],
         "k1_split_inflight": ["--config.mesh.rollout_devices=4", "--config.grpo.max_staleness=1",
                               "--config.grpo.inflight_after=8"]}


def run_case(flags: list[str], steps: int, devices: int, small: bool) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    config = "--config=experiments/configs/arithmetic.py" + (":smoke" if small else "")
    cmd = [sys.executable, "-m", "experiments.train", config, f"--workdir={workdir}",
           "--config.sft.steps=0", f"--config.grpo.steps={steps}", "--config.eval.every=0",
           "--config.eval.num_problems=16", "--config.eval.batch_size=16",
           "--config.eval.k=1", "--config.checkpoint.every=0", "--config.grpo.num_prompts=16",
           *flags]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rows = [r for r in metrics.read_metrics(workdir) if r.get("phase") == "grpo" and "loss" in r]
  timed = rows[1:] or rows  # the first step compiles
  med = {k: float(np.median([r[k] for r in timed]))
         for k in ("step_s", "sample_s", "score_s", "update_s")}
  med["overlap_bound_s"] = max(med["sample_s"] + med["score_s"], med["update_s"])
  med["serial_sum_s"] = med["sample_s"] + med["score_s"] + med["update_s"]
  return med


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--small", action="store_true", help="the smoke model (a check)")
  parser.add_argument("--cases", default=",".join(CASES),
                      help="comma list of " + ", ".join(CASES) + " (one accelerator: sync,k1)")
  args = parser.parse_args()
  for rnd in range(args.rounds):
    for name in args.cases.split(","):
      flags = CASES[name]
      fig = run_case(flags, args.steps, args.devices, args.small)
      print(json.dumps({"bench": "async_step", "case": name, "round": rnd,
                        "devices": args.devices, "cpu_count": os.cpu_count(),
                        **{k: round(v, 4) for k, v in fig.items()}}), flush=True)


if __name__ == "__main__":
  main()
