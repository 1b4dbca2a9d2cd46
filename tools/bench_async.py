#!/usr/bin/env python
"""A GRPO step's wall time with rollouts sampled ahead (grpo.max_staleness) and the samplers on
their own devices (mesh.rollout_devices), on simulated CPU devices.

  python tools/bench_async.py                       # 8 simulated devices, ~10 min on 2 cores
  python tools/bench_async.py --steps=3 --small     # seconds: a check
  JAX_PLATFORMS=cuda python tools/bench_async.py --cases=sync,k1   # one accelerator

Each case is one process (`experiments.train` on the offline default, no SFT, no evaluation
between steps) with XLA_FLAGS=--xla_force_host_platform_device_count=--devices; cases run one
after the other, the list twice in alternation. One JSON line per case and round: the median
over steps 2 .. steps - 2 of `step_s` (the whole step), `sample_s` (drawing the rollout), `score_s` (host
scoring) and `update_s` (queued update to its metrics), and the bound the overlap aims at,
max(sample + score, update), against their sum for the synchronous step. On a CPU the
simulated devices share the machine's cores (`os.cpu_count()` is printed with the figures), so
the sampler and the update compete for them even on disjoint devices; `idle_fraction` (from a
jax.profiler trace of the last 2 steps, which are not timed) is the part of a step in which no
device ran any program: the host's share of the step that the overlap did not hide.
"""

from __future__ import annotations

import argparse
import glob
import gzip
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


PROFILED = 2  # the last steps of a case: traced for the idle fraction, not timed


def run_case(flags: list[str], steps: int, devices: int, small: bool) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    config = "--config=experiments/configs/arithmetic.py" + (":smoke" if small else "")
    cmd = [sys.executable, "-m", "experiments.train", config, f"--workdir={workdir}",
           "--config.sft.steps=0", f"--config.grpo.steps={steps}", "--config.eval.every=0",
           "--config.eval.num_problems=16", "--config.eval.batch_size=16",
           "--config.eval.k=1", "--config.checkpoint.every=0", "--config.grpo.num_prompts=16",
           f"--config.profile_steps={steps - PROFILED + 1}-{steps}", *flags]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rows = [r for r in metrics.read_metrics(workdir) if r.get("phase") == "grpo" and "loss" in r]
    idle = idle_fraction(glob.glob(os.path.join(workdir, "profile", "**",
                                                "perfetto_trace.json.gz"), recursive=True)[0])
  timed = rows[1:-PROFILED] or rows  # the first step compiles
  med = {k: float(np.median([r[k] for r in timed]))
         for k in ("step_s", "sample_s", "score_s", "update_s")}
  med["idle_fraction"] = idle
  med["overlap_bound_s"] = max(med["sample_s"] + med["score_s"], med["update_s"])
  med["serial_sum_s"] = med["sample_s"] + med["score_s"] + med["update_s"]
  return med


def idle_fraction(trace_path: str) -> float:
  """The fraction of the traced GRPO steps' wall time in which no XLA program ran on any
  device: 1 - |union of the executions| / |union of the steps|. The CPU client runs every
  simulated device's programs on one shared thread pool, so its trace does not say which
  device ran what: an execution ("ThunkExecutor::Execute") counts for all of them."""
  with gzip.open(trace_path) as f:
    trace = json.load(f)
  events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
            if e.get("ph") == "X"]
  span = lambda name: _union([(e["ts"], e["ts"] + e["dur"]) for e in events  # noqa: E731
                              if e["name"].startswith(name)])
  steps, busy = span("grpo_step"), span("ThunkExecutor::Execute")
  total = sum(b - a for a, b in steps)
  inside = sum(max(0.0, min(b, d) - max(a, c)) for a, b in steps for c, d in busy)
  return 1.0 - inside / total


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
  out: list[list[float]] = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return [(a, b) for a, b in out]


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
