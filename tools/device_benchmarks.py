#!/usr/bin/env python
"""Every accelerator benchmark of BENCHMARKS.md in one call, one JSON line each.

  JAX_PLATFORMS=cuda python tools/device_benchmarks.py --out=$OUT      # a lent GPU (one call)
  python tools/device_benchmarks.py --small --out=/tmp/dev              # CPU: the same runs, tiny
  JAX_PLATFORMS=cuda python tools/device_benchmarks.py --set=varlen --out=$OUT   # variable lengths
  JAX_PLATFORMS=cuda python tools/device_benchmarks.py --set=rollout --out=$OUT  # decode, compile
  JAX_PLATFORMS=cuda python tools/device_benchmarks.py --set=async --out=$OUT    # staleness

A lent GPU comes with minutes, not hours: this runs the benchmarks in priority order, each in
its own process under its own time limit, and appends one line per benchmark to
`<out>/results.jsonl` as soon as it ends ({"bench", "rc", "wall_s", "argv", "result": the tool's
last JSON line or null}); the tools' whole output goes to `<out>/log.txt`. A benchmark that times
out or fails leaves its line (rc != 0) and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))

# (name, arguments, time limit in seconds): the order is the priority.
FULL = (
    ("bench_device_0.5b", ["bench_device.py", "--model=qwen2.5-0.5b"], 170),
    ("bench_step_spec_bf16", ["bench_step.py", "--dtype=bfloat16"], 70),
    ("bench_step_spec_f32", ["bench_step.py", "--dtype=float32"], 60),
    ("bench_step_0.5b_bf16", ["bench_step.py", "--model=qwen2.5-0.5b", "--dtype=bfloat16",
                              "--prompts=64", "--new_tokens=256", "--prompt_len=64",
                              "--micro_batch_size=16", "--steps=3"], 160),
    ("bench_update_spec", ["bench_update.py", "--skip_torch", "--modes=float32,bf16,lora16",
                           "--repeats=10"], 100),
)
# Variable-length batches, 0.5B shape in bf16: lengths spread by stop ids (1500
# of 151936 ids end a completion: ~1/100 per token under random weights), padded (length_bucket
# 0) then bucketed (64); the trainer's overlapped step against the phase-timed one; the SPEC
# workload's variable-length variant. The compile cache (~/.cache/grpo_jax) is shared by the runs.
_B05 = ["bench_step.py", "--model=qwen2.5-0.5b", "--dtype=bfloat16", "--prompts=64",
        "--new_tokens=256", "--prompt_len=64", "--micro_batch_size=16"]
VARLEN = (
    ("step_0.5b_varlen_padded", _B05 + ["--stop_ids=1500", "--length_bucket=0", "--steps=3"], 180),
    ("step_0.5b_varlen_bucketed", _B05 + ["--stop_ids=1500", "--length_bucket=64", "--steps=3"],
     200),
    ("step_spec_varlen_bucketed", ["bench_step.py", "--dtype=bfloat16", "--stop_ids=64",
                                   "--length_bucket=16"], 60),
    ("step_spec_fixed_phases", ["bench_step.py", "--dtype=bfloat16"], 35),
    ("step_spec_varlen_padded", ["bench_step.py", "--dtype=bfloat16", "--stop_ids=64",
                                 "--length_bucket=0"], 35),
    ("step_spec_fixed_trainer", ["bench_step.py", "--dtype=bfloat16", "--driver=trainer"], 35),
)
# Rollouts: static and continuous batching's decode time on the fixed (SPEC) and variable-length
# workloads, and the 0.5B bf16 sampler's compile time at 2 and 24 layers (tools/bench_rollout.py);
# then the same with the layers scanned, and the 0.5B step scanned against unrolled.
_COMPILE = ["bench_rollout.py", "--part=compile", "--programs=sample_train"]
_COMPILE_ALL = ["bench_rollout.py", "--part=compile", "--programs=sample_train,update,logprobs"]
ROLLOUT = (
    ("rollout_spec_fixed", ["bench_rollout.py", "--part=generation", "--workloads=fixed",
                            "--slots=0,128,64", "--repeats=5"], 90),
    ("rollout_spec_varlen", ["bench_rollout.py", "--part=generation", "--workloads=varlen",
                             "--slots=0,128,64", "--repeats=5"], 90),
    ("compile_sampler_0.5b_2_layers", _COMPILE + ["--layers=2"], 120),
    ("compile_sampler_0.5b_24_layers", _COMPILE + ["--layers=24"], 240),
    # Scanned layers: compile at depth, decode and the 0.5B step (warmup_step_s: the first step).
    ("compile_0.5b_scan_2_24_layers", _COMPILE_ALL + ["--layers=2,24", "--set",
                                                      "model.scan_layers=true"], 150),
    ("rollout_spec_fixed_scan", ["bench_rollout.py", "--part=generation", "--workloads=fixed",
                                 "--slots=0,128", "--repeats=5", "--scan_layers"], 90),
    ("step_0.5b_bf16_scan", _B05 + ["--steps=3", "--scan_layers"], 160),
    ("step_0.5b_bf16_unrolled", _B05 + ["--steps=3", "--no-scan_layers"], 200),
)
_SMOKE = os.path.join(os.path.dirname(TOOLS), "experiments/configs/arithmetic.py:smoke")
SMALL_ROLLOUT = (
    ("rollout_tiny_varlen", ["bench_rollout.py", "--part=generation", "--workloads=varlen",
                             "--prompts=4", "--samples=4", "--new_tokens=32", "--slots=0,16,8",
                             "--repeats=1"],
     300),
    ("compile_sampler_tiny", _COMPILE + [f"--config={_SMOKE}", "--layers=1"], 300),
    ("compile_tiny_scan", _COMPILE_ALL + [f"--config={_SMOKE}", "--layers=1,2", "--set",
                                          "model.scan_layers=true"], 300),
    ("rollout_tiny_fixed_scan", ["bench_rollout.py", "--part=generation", "--workloads=fixed",
                                 "--prompts=4", "--samples=4", "--new_tokens=16", "--slots=0,16",
                                 "--repeats=1", "--scan_layers"], 300),
    ("step_tiny_scan", ["bench_step.py", "--model=tiny_qwen2", "--prompts=4", "--samples=2",
                        "--prompt_len=8", "--new_tokens=8", "--steps=1", "--dtype=bfloat16",
                        "--scan_layers"], 300),
)
# Rollouts sampled ahead (grpo.max_staleness = 1) against the synchronous step, one device.
ASYNC = (("async_step_one_device", ["bench_async.py", "--cases=sync,k1", "--devices=1"], 300),)
SMALL_ASYNC = (("async_step_tiny", ["bench_async.py", "--cases=sync,k1", "--devices=1",
                                    "--small", "--steps=3", "--rounds=1"], 300),)
_TINY = ["bench_step.py", "--model=tiny_qwen2", "--prompts=4", "--samples=2", "--prompt_len=8",
         "--new_tokens=16", "--steps=1", "--dtype=bfloat16", "--micro_batch_size=4"]
SMALL_VARLEN = (
    ("step_tiny_varlen_padded", _TINY + ["--stop_ids=64", "--length_bucket=0"], 300),
    ("step_tiny_varlen_bucketed", _TINY + ["--stop_ids=64", "--length_bucket=4"], 300),
    ("step_tiny_trainer", _TINY + ["--driver=trainer"], 300),
)
SMALL = (
    ("bench_device_tiny", ["bench_device.py", "--model=tiny_qwen2", "--batches=8,16",
                           "--prompt_len=8", "--new_tokens=8", "--update_rows=8",
                           "--micro_batch_size=4", "--repeats=1"], 300),
    ("bench_step_tiny", ["bench_step.py", "--model=tiny_qwen2", "--prompts=4", "--samples=2",
                         "--prompt_len=8", "--new_tokens=8", "--steps=1",
                         "--dtype=bfloat16"], 300),
    ("bench_update_tiny", ["bench_update.py", "--skip_torch", "--model=tiny_qwen2",
                           "--modes=bf16", "--repeats=1"], 300),
)


def last_json(text: str):
  for line in reversed(text.strip().splitlines()):
    try:
      return json.loads(line)
    except ValueError:
      continue
  return None


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "device_out"))
  parser.add_argument("--small", action="store_true", help="tiny sizes: a check of this script")
  parser.add_argument("--only", default="", help="comma list of benchmark names")
  parser.add_argument("--set", default="all", choices=("all", "varlen", "rollout", "async"),
                      help="all: bench_device, bench_step and bench_update; "
                           "varlen: variable-length batches; rollout: bench_rollout; "
                           "async: bench_async (BENCHMARKS.md)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  runs = {("all", False): FULL, ("all", True): SMALL, ("varlen", False): VARLEN,
          ("varlen", True): SMALL_VARLEN, ("rollout", False): ROLLOUT,
          ("rollout", True): SMALL_ROLLOUT, ("async", False): ASYNC,
          ("async", True): SMALL_ASYNC}[args.set, args.small]
  if args.only:
    runs = [r for r in runs if r[0] in args.only.split(",")]
  lines = []
  for name, bench_argv, limit in runs:
    cmd = [sys.executable, os.path.join(TOOLS, bench_argv[0]), *bench_argv[1:]]
    start = time.time()
    try:
      # unbuffered: a benchmark cut at its limit still leaves the lines it printed
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
      rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
      rc = 124
      stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      stderr = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    line = {"bench": name, "rc": rc, "wall_s": round(time.time() - start, 1),
            "argv": bench_argv, "result": last_json(stdout)}
    lines.append(line)
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
      f.write(json.dumps(line) + "\n")
    with open(os.path.join(args.out, "log.txt"), "a") as f:
      f.write(f"===== {name} rc={rc} {line['wall_s']} s\n{stdout[-20000:]}\n{stderr[-20000:]}\n")
    print(json.dumps(line), flush=True)
  return lines


if __name__ == "__main__":
  main()
