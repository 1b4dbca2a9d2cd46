"""Benchmark of the GRPO update step and the reference log-prob pass (workload: bench/SPEC.md).

  python tools/bench_update.py                      # CPU: float32, bf16, lora16 + a torch/transformers baseline
  python tools/bench_update.py --skip_torch         # ours only (the three modes)
  python tools/bench_update.py --skip_torch --modes=float32      # today's path only
  python tools/bench_update.py --skip_torch --model=tiny_qwen2 --repeats=2   # a quick check of the tool
  JAX_PLATFORMS=cuda python tools/bench_update.py --skip_torch --repeats=10   # a GPU

Workload: Qwen2 (vocab 4096, hidden 256, 4 layers, GQA 4/2, tied), 16 prompts x 8 samples = 128
rows of 32 prompt + 128 completion tokens; GRPO loss (eps 0.2) + beta 0.04 k3 KL to a frozen
reference; one AdamW step (lr 1e-6) on the whole batch (gradients accumulated over micro-batches
of `--micro_batch_size` rows inside one jitted step: exactly the full-batch step).

Precision / LoRA modes (`--modes`, comma list, each measured in its own subprocess, so the peak
RSS is that mode's alone):
  float32  float32 params, Adam and compute; the reference a float32 copy (SPEC.md's setting).
  bf16     float32 master params and Adam, bfloat16 compute (`param_dtype="float32",
           dtype="bfloat16"`); the reference stored in bfloat16 (weights.reference_copy).
  loraR    LoRA rank R (e.g. lora16) on qkv, o, gate_up and down of every layer, alpha 2R; only
           the float32 adapters and their Adam state are trained; the frozen base is held in the
           compute dtype and is also the reference (no copy). Compute dtype float32, as in the
           float32 mode (so the figure compares with it); `loraR_bf16` computes in bfloat16.

Reports per mode the median over `--repeats` calls after one warm-up call: update_s (forward +
backward + AdamW), ref_s (reference log-probs), step_s = update_s + ref_s, compile times, peak
RSS of that mode's process, train-state bytes (trained params + optimiser + reference / frozen
base, from the arrays themselves), FLOP/s from an analytic count against a measured float32
matmul peak (measured in the same process after the timings). The torch baseline (float32,
skipped with --skip_torch) runs the same loss with transformers' Qwen2ForCausalLM on the same
weights (what TRL computes for this workload) in its own process. stdout: one JSON line per
mode ({"mode": ..., ...}), then a last JSON line: the first mode's figures at top level (the
tool's output before --modes), `modes` (every mode's object), `vs_first` (each mode's time and
memory ratios to the first mode, measured in this one run) and, with torch, its figures and the
speedups of the first mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# This checkout's grpo_jax, not whichever one the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

P, G, TP, TC = 16, 8, 32, 128


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_rollout(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  prompts = rng.integers(10, vocab, (P, TP)).astype(np.int32)
  completions = rng.integers(10, vocab, (P * G, TC)).astype(np.int32)
  rewards = (completions % 2 == 0).mean(1).reshape(P, G).astype(np.float32)
  return prompts, completions, rewards


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


def matmul_peak_flops(jax, jnp, n: int = 2048) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t, _ = median_time(lambda: f(a).block_until_ready(), 10)
  return 2 * n ** 3 / t


def _flops_parts(c) -> tuple[float, float, float]:
  """(weight matmuls, causal attention, unembedding) FLOPs of one teacher-forced pass."""
  rows, T = P * G, TP + TC
  per_token = 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # qkv
  per_token += 2 * c.num_heads * c.head_dim * c.hidden_size  # o
  per_token += 2 * 3 * c.hidden_size * c.intermediate_size  # gate, up, down
  attention = 2 * 2 * c.num_heads * c.head_dim * T * (T + 1) / 2  # QK^T and AV, causal half
  return (c.num_layers * rows * T * per_token, c.num_layers * rows * attention,
          2 * rows * TC * c.hidden_size * c.vocab_size)


def forward_flops(c) -> float:
  """Useful matmul FLOPs of one teacher-forced pass over the 128 x 160 tokens: projections and
  MLP on every token, attention scores/values causally, the unembedding on completion positions.
  (XLA's cost analysis counts a scan body once, so it undercounts micro-batched programs.)"""
  return sum(_flops_parts(c))


def lora_forward_flops(c) -> float:
  """FLOPs of the adapters' (x @ A) @ B on every token, all targets and layers."""
  E, M, r = c.hidden_size, c.intermediate_size, c.lora_rank
  in_out = {"qkv": (E, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
            "o": (c.num_heads * c.head_dim, E), "gate_up": (E, 2 * M), "down": (M, E)}
  per_token = sum(2 * r * sum(in_out[t]) for t in c.lora_targets)
  return c.num_layers * P * G * (TP + TC) * per_token


def update_flops(c) -> float:
  """Forward + backward. Full training: 3x the forward (backward = gradients of both operands).
  LoRA: the frozen weights' matmuls and the unembedding need only the input gradient (2x), the
  attention both operands (3x), the adapters 3x."""
  weights, attention, unembed = _flops_parts(c)
  if not c.lora_rank:
    return 3 * (weights + attention + unembed)
  return 2 * (weights + unembed) + 3 * attention + 3 * lora_forward_flops(c)


def tree_bytes(tree) -> int:
  import jax
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def parse_mode(mode: str) -> dict:
  """float32 | bf16 | lora<R> | lora<R>_bf16 -> dtypes and LoRA rank."""
  m = re.fullmatch(r"float32|bf16|lora(\d+)(_bf16)?", mode)
  if not m:
    raise SystemExit(f"--modes: unknown mode {mode!r} (float32, bf16, lora<rank>, "
                     "lora<rank>_bf16)")
  bf16 = mode == "bf16" or bool(m.group(2))
  rank = int(m.group(1) or 0)
  if m.group(1) is not None and rank < 1:
    raise SystemExit(f"--modes: LoRA rank must be >= 1 in {mode!r}")
  return dict(param_dtype="float32", dtype="bfloat16" if bf16 else "float32", lora_rank=rank)


def bench_ours(args, mode: str = "float32") -> dict:
  import jax
  import jax.numpy as jnp
  from grpo_jax import advantages, losses, models, sharding
  from grpo_jax import train_step as ts
  from grpo_jax.models import lora

  spec = parse_mode(mode)
  config = models.get_config(args.model)
  if args.weights:
    config, params = models.load_hf_checkpoint(args.weights)
  else:
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  # The base's master params stay float32 (params above); only the compute dtype changes.
  config = config.replace(param_dtype=spec["param_dtype"], dtype=spec["dtype"])
  compute = jnp.dtype(config.dtype)
  prompts, completions, rewards = make_rollout(config.vocab_size)
  adv = np.asarray(advantages.group_advantages(rewards)).reshape(-1)
  batch = ts.TrainBatch(prompt_tokens=np.repeat(prompts, G, 0),
                        prompt_mask=np.ones((P * G, TP), np.int32),
                        completion_tokens=completions,
                        completion_mask=np.ones((P * G, TC), np.int32), advantages=adv)
  mesh = sharding.make_mesh(-1, 1, 1)
  optimizer = ts.make_optimizer(ts.OptimConfig(learning_rate=1e-6, max_grad_norm=None))
  loss_cfg = losses.LossConfig(beta=0.04, kl_estimator="k3", epsilon_low=0.2)
  n_micro = (P * G) // args.micro_batch_size
  base_sh = ts.state_shardings(mesh, config, optimizer, jax.eval_shape(lambda: params)).params
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p), out_shardings=base_sh)
  if spec["lora_rank"]:
    # LoRA: fresh adapters (A random, B zero) trained beside the frozen base, which is held in
    # the compute dtype and is also the reference policy (no copy), as runstate.initial_grpo_models does.
    config = config.replace(lora_rank=spec["lora_rank"], lora_alpha=2.0 * spec["lora_rank"],
                            lora_targets=("qkv", "o", "gate_up", "down"))
    init_adapters = lambda r: lora.split(models.init_params(config, r))[0]  # noqa: E731
    adapter_shapes = jax.eval_shape(init_adapters, jax.random.key(1))
    state_sh = ts.state_shardings(mesh, config, optimizer, adapter_shapes)
    state = jax.jit(lambda r: ts.init_train_state(init_adapters(r), optimizer),
                    out_shardings=state_sh)(jax.random.key(1))
    ref_params = cast(params)  # the frozen base = the reference
    del params
    ref_config, frozen_sh, extra = lora.base_config(config), base_sh, (ref_params,)
  else:
    state_sh = ts.state_shardings(mesh, config, optimizer, jax.eval_shape(lambda: params))
    state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
    # The reference: a copy in the compute dtype (weights.reference_copy).
    ref_params = cast(params) if compute != jnp.float32 else jax.device_put(
        jax.tree.map(jnp.copy, params), base_sh)
    del params
    ref_config, frozen_sh, extra = config, None, ()
  jax.block_until_ready((state, ref_params))
  state_bytes = dict(trained_bytes=tree_bytes(state.params), opt_bytes=tree_bytes(state.opt_state),
                     ref_bytes=tree_bytes(ref_params))
  state_bytes["state_bytes"] = sum(state_bytes.values())
  batch = sharding.shard_batch(batch, mesh)
  ref_fn = ts.make_logprob_fn(mesh, base_sh, model_config=ref_config,
                              num_microbatches=n_micro, vocab_chunk=args.vocab_chunk)
  update = ts.make_update_fn(mesh, state_sh, model_config=config, optimizer=optimizer,
                             loss_cfg=loss_cfg, num_microbatches=n_micro,
                             vocab_chunk=args.vocab_chunk, frozen_sh=frozen_sh)

  t0 = time.perf_counter()
  ref_compiled = ref_fn.lower(ref_params, batch).compile()
  ref_compile_s = time.perf_counter() - t0
  ref = ref_fn(ref_params, batch).block_until_ready()  # also the reference pass's warm-up
  ref_batch, batch = batch, batch.replace(ref_logprobs=ref)  # (another pytree: keep both)
  t0 = time.perf_counter()
  upd_compiled = update.lower(state, batch, *extra).compile()
  update_compile_s = time.perf_counter() - t0

  holder = {"state": state}

  def one_update():
    holder["state"], m = update(holder["state"], batch, *extra)
    jax.block_until_ready(m)

  one_update()  # warm-up
  update_s, update_times = median_time(one_update, args.repeats)
  ref_s, ref_times = median_time(lambda: ref_fn(ref_params, ref_batch).block_until_ready(),
                                 args.repeats)

  del upd_compiled, ref_compiled
  peak = matmul_peak_flops(jax, jnp)
  ref_flops = forward_flops(ref_config)
  upd_flops = update_flops(config)
  return dict(mode=mode, param_dtype=config.param_dtype, dtype=config.dtype,
              lora_rank=config.lora_rank, lora_alpha=config.lora_alpha if config.lora_rank else 0,
              model=args.model, update_s=update_s, ref_s=ref_s, step_s=update_s + ref_s,
              update_times=update_times, ref_times=ref_times,
              update_compile_s=update_compile_s, ref_compile_s=ref_compile_s,
              compile_s=update_compile_s + ref_compile_s,
              peak_rss_mb=peak_rss_mb(), **state_bytes, micro_batch_size=args.micro_batch_size,
              update_gflop=upd_flops / 1e9, ref_gflop=ref_flops / 1e9,
              matmul_peak_gflops=peak / 1e9,
              update_frac_peak=upd_flops / update_s / peak, ref_frac_peak=ref_flops / ref_s / peak,
              device=str(jax.devices()[0].platform), num_devices=jax.device_count())


TORCH_BASELINE = r"""
import json, resource, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
weights, repeats = sys.argv[1], int(sys.argv[2])
P, G, TP, TC = 16, 8, 32, 128
model = AutoModelForCausalLM.from_pretrained(weights, torch_dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(weights, torch_dtype=torch.float32).eval()
rng = np.random.default_rng(0)
V = model.config.vocab_size
prompts = rng.integers(10, V, (P, TP)); completions = rng.integers(10, V, (P * G, TC))
rewards = (completions % 2 == 0).mean(1).reshape(P, G)
adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
ids = torch.tensor(np.concatenate([np.repeat(prompts, G, 0), completions], 1))
adv = torch.tensor(adv, dtype=torch.float32)[:, None]
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
def logps(m):
    logits = m(ids).logits[:, TP - 1:-1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, TP:, None])[..., 0]
def ref_pass():
    with torch.no_grad():
        return logps(ref)
def update(ref_lp):
    lp = logps(model)
    ratio = torch.exp(lp - lp.detach())
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    d = ref_lp - lp
    loss = ((pg + 0.04 * (torch.exp(d) - d - 1)).mean(1)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
ref_lp = ref_pass(); update(ref_lp)
ts, us = [], []
for _ in range(repeats):
    t0 = time.perf_counter(); ref_lp = ref_pass(); ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); update(ref_lp); us.append(time.perf_counter() - t0)
print(json.dumps(dict(torch_update_s=float(np.median(us)), torch_ref_s=float(np.median(ts)),
                      torch_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      torch_threads=torch.get_num_threads())))
"""


def write_bench_weights(path: str) -> None:
  """The SPEC's random Qwen2 weights (seed 0) through transformers, as the TRL script does."""
  code = r"""
import sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=512)
Qwen2ForCausalLM(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
"""
  subprocess.run([sys.executable, "-c", code, path], check=True)


def run_mode(args, mode: str) -> dict:
  """`mode` measured in a fresh process of this script (its own peak RSS and XLA caches)."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--_child_mode={mode}",
         f"--repeats={args.repeats}", f"--micro_batch_size={args.micro_batch_size}",
         f"--vocab_chunk={args.vocab_chunk}", f"--model={args.model}", "--skip_torch"]
  if args.weights:
    cmd.append(f"--weights={args.weights}")
  out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def describe(r: dict) -> str:
  return (f"{r['mode']}: update {r['update_s']:.3f} s, ref {r['ref_s']:.3f} s, compile "
          f"{r['compile_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, state "
          f"{r['state_bytes'] / 2**20:.1f} MiB, update {r['update_frac_peak']:.0%} / ref "
          f"{r['ref_frac_peak']:.0%} of the {r['matmul_peak_gflops']:.0f} GFLOP/s f32 matmul peak")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--micro_batch_size", type=int, default=8)
  parser.add_argument("--vocab_chunk", type=int, default=128,
                      help="completion positions per unembedding chunk")
  parser.add_argument("--modes", default="float32,bf16,lora16",
                      help="comma list of float32, bf16, lora<rank>, lora<rank>_bf16; each runs "
                      "in its own process (see the module docstring)")
  parser.add_argument("--model", default="bench_qwen2", help="model preset (SPEC.md: "
                      "bench_qwen2; e.g. tiny_qwen2 for a quick check, with --skip_torch)")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--weights", default="", help="HF dir of the bench model (default: write "
                      "the SPEC's seed-0 weights to a temp dir when torch is available)")
  parser.add_argument("--_child_mode", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child_mode:
    result = bench_ours(args, args._child_mode)
    print(describe(result), file=sys.stderr, flush=True)
    print(json.dumps(result))
    return
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if not modes:
    raise SystemExit("--modes: give at least one mode")
  for m in modes:
    parse_mode(m)
  if args.model != "bench_qwen2" and not args.skip_torch:
    raise SystemExit("--model other than bench_qwen2 needs --skip_torch (the torch baseline "
                     "runs the SPEC's model)")
  tmp = None
  if not args.weights and not args.skip_torch:
    tmp = tempfile.mkdtemp(prefix="bench_qwen2_")
    write_bench_weights(tmp)
    args.weights = tmp
  results = {}
  for mode in modes:
    results[mode] = run_mode(args, mode)
    print(json.dumps(results[mode]), flush=True)
  first = results[modes[0]]
  result = dict(first)
  result["modes"] = results
  result["vs_first"] = {m: {k: r[k] / first[k] for k in ("update_s", "ref_s", "step_s",
                                                         "compile_s", "peak_rss_mb",
                                                         "state_bytes")}
                        for m, r in results.items()}
  if len(modes) > 1:
    print(f"ratios to {modes[0]} (this run): " + "; ".join(
        f"{m} step x{v['step_s']:.2f}, compile x{v['compile_s']:.2f}, RSS "
        f"x{v['peak_rss_mb']:.2f}, state x{v['state_bytes']:.2f}"
        for m, v in result["vs_first"].items() if m != modes[0]), file=sys.stderr)
  if not args.skip_torch:
    out = subprocess.run([sys.executable, "-c", TORCH_BASELINE, args.weights, str(args.repeats)],
                         check=True, capture_output=True, text=True).stdout
    result.update(json.loads(out.strip().splitlines()[-1]))
    result["speedup_update_vs_torch"] = result["torch_update_s"] / result["update_s"]
    result["speedup_ref_vs_torch"] = result["torch_ref_s"] / result["ref_s"]
    print(f"torch/transformers (float32): update {result['torch_update_s']:.3f} s, ref "
          f"{result['torch_ref_s']:.3f} s, peak RSS {result['torch_peak_rss_mb']:.0f} MB",
          file=sys.stderr)
  print(json.dumps(result))
  if tmp:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
