#!/usr/bin/env python
"""Accelerator benchmark: decode throughput against the HBM roofline, update throughput as MFU.

  JAX_PLATFORMS=cuda python tools/bench_device.py --model=qwen2.5-0.5b     # one GPU / TPU chip
  JAX_PLATFORMS=cuda python tools/bench_device.py --model=qwen2.5-1.5b
  python tools/bench_device.py --model=tiny_qwen2 --batches=8,16 --prompt_len=8 --new_tokens=8 \\
      --update_rows=8 --micro_batch_size=4 --repeats=1        # CPU: seconds, a check of the tool

Random weights of the preset's published shape (seed 0), float32 master weights, bf16 compute
(`--dtype`), the programs the trainer runs (`sampling.make_sampler`, `train_step.make_update_fn`
and `make_logprob_fn` on a (data = all devices) mesh; with fsdp = 1 the training layout of the
params is also the sampler's decode layout, so the sampler reads them as a rollout does).

Decode, for each sampling batch B of `--batches` (B = P prompts x G = `--samples`): P prompts of
`--prompt_len` random ids, exactly `--new_tokens` = N new tokens per row (the EOS id is outside
the vocabulary), temperature 1. Each call is timed twice: N tokens, and 1 token (the prefill and
the first draw only); decode_s = the difference, decode_tok_s = B * (N - 1) / decode_s (median of
`--repeats` calls after a compile call each; null when the 1-token call is not the faster one,
which only timing noise at a tiny size causes). Roofline: every decode step reads the
compute-dtype params once (per device) and the KV cache it attends to: the P prompts' shared
prefixes (the sampler prefills a prompt once per group) and each row's completion so far:
    bytes = (N - 1) * params_bytes * devices
            + kv_bytes_per_token * ((N - 1) * P * prompt_len + B * N * (N - 1) / 2)
    kv_bytes_per_token = 2 (K, V) * kv_heads * head_dim * layers * compute-dtype bytes
roofline_frac = (bytes / peak HBM bandwidth) / decode_s: 1.0 is the memory-bound limit (the
sampler's padded cache blocks, the logits and the writes are not counted: they are overhead).

Update: `--update_rows` rows of prompt_len + N tokens, random tokens and advantages, the GRPO loss
(eps 0.2, k3 KL beta 0.04) and one AdamW step, micro-batches of `--micro_batch_size` rows inside
the jitted step; the reference log-prob pass (bf16 reference) timed too. update_tok_s = rows *
(prompt_len + N) / update_s; update_mfu = 6 * params * tokens / update_s / peak bf16 FLOP/s (the
usual 6N; `update_mfu_counted` uses the counted matmul FLOPs: projections and MLP on every token,
causal attention, the unembedding on the N completion positions only, x3 for forward + backward);
ref_mfu likewise with 2N.

Peaks by `jax.devices()[0].device_kind` (table `PEAKS`); an unknown device (CPU) reports null
fractions. Peak device memory from `device.memory_stats()["peak_bytes_in_use"]` (null where the
backend has none, e.g. CPU), after the decode runs and after the update. The last stdout line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np

# This checkout's grpo_jax, not whichever one the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (lower-case substring of device_kind, peak HBM bytes/s, peak dense bf16 FLOP/s), first match
# wins (so "h100 pcie" before "h100", "v5 lite" before "v5"). Vendor figures (dense, no sparsity).
PEAKS = (
    ("h200", 4.8e12, 989e12),
    ("h100 pcie", 2.0e12, 756e12),
    ("h100", 3.35e12, 989e12),          # SXM
    ("a100-sxm4-40gb", 1.555e12, 312e12),
    ("a100-pcie-40gb", 1.555e12, 312e12),
    ("a100", 2.0e12, 312e12),           # 80 GB
    ("v5 lite", 819e9, 197e12),         # TPU v5e
    ("v5e", 819e9, 197e12),
    ("v5p", 2.76e12, 459e12),
    ("tpu v5", 2.76e12, 459e12),        # v5p reports "TPU v5"
    ("v6 lite", 1.64e12, 918e12),       # TPU v6e (Trillium)
    ("v6e", 1.64e12, 918e12),
)


def device_peaks(device_kind: str) -> tuple[float | None, float | None]:
  """(HBM bytes/s, bf16 FLOP/s) of one chip, or (None, None) for a device not in `PEAKS`."""
  kind = device_kind.lower()
  for key, bandwidth, flops in PEAKS:
    if key in kind:
      return bandwidth, flops
  return None, None


def peak_device_bytes(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def tree_bytes(tree) -> int:
  import jax
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_bytes(config, param_bytes: int, devices: int, P: int, G: int, prompt_len: int,
                 N: int) -> float:
  """Bytes the N - 1 decode steps must read at least (see the module docstring)."""
  import jax.numpy as jnp
  kv_per_token = 2 * config.num_kv_heads * config.head_dim * config.num_layers * jnp.dtype(
      config.dtype).itemsize
  B = P * G
  kv_tokens = (N - 1) * P * prompt_len + B * N * (N - 1) / 2
  return (N - 1) * param_bytes * devices + kv_per_token * kv_tokens


def counted_flops(config, rows: int, prompt_len: int, N: int) -> float:
  """Matmul FLOPs of one teacher-forced forward: projections and MLP on every token, causal
  attention, the unembedding on the N completion positions (what the loss computes)."""
  T = prompt_len + N
  c = config
  per_token = 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # qkv
  per_token += 2 * c.num_heads * c.head_dim * c.hidden_size  # o
  per_token += 2 * 3 * c.hidden_size * c.intermediate_size  # gate, up, down
  attention = 2 * 2 * c.num_heads * c.head_dim * T * (T + 1) / 2
  return (c.num_layers * rows * (T * per_token + attention)
          + 2 * rows * N * c.hidden_size * c.vocab_size)


def bench(args) -> dict:
  import jax
  from grpo_jax import losses, models, sampling, sharding
  from grpo_jax import train_step as ts

  overrides = dict(param_dtype="float32", dtype=args.dtype)
  if args.layers:
    overrides["num_layers"] = args.layers
  config = models.get_config(args.model, **overrides)
  devices = jax.device_count()
  device = jax.devices()[0]
  bandwidth, flops_peak = device_peaks(device.device_kind)
  mesh = sharding.make_mesh(-1, 1, 1)
  G, N, Tp = args.samples, args.new_tokens, args.prompt_len
  rng = np.random.default_rng(0)

  # Master weights (float32) in their shards, and the compute-dtype copy the sampler and the
  # reference pass read (weights.compute_params / reference_copy).
  optimizer = ts.make_optimizer(ts.OptimConfig(learning_rate=1e-6, max_grad_norm=None))
  shapes = jax.eval_shape(lambda r: models.init_params(config, r), jax.random.key(0))
  state_sh = ts.state_shardings(mesh, config, optimizer, shapes)
  t0 = time.perf_counter()
  state = jax.jit(lambda r: ts.init_train_state(models.init_params(config, r), optimizer),
                  out_shardings=state_sh)(jax.random.key(0))
  compute = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(config.dtype), p),
                    out_shardings=state_sh.params)(state.params)
  jax.block_until_ready((state, compute))
  init_s = time.perf_counter() - t0
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  param_bytes = tree_bytes(compute)

  # ------------------------------------------------------------------ decode
  decode = []
  eos = config.vocab_size  # never drawn: every row decodes exactly N tokens
  for B in args.batches:
    if B % G or (B // G) % devices:
      raise SystemExit(f"--batches: {B} must be a multiple of --samples ({G}) x devices "
                       f"({devices})")
    P = B // G
    ids = rng.integers(10, config.vocab_size, (P, Tp)).astype(np.int32)
    mask = np.ones((P, Tp), np.int32)
    ids, mask = sharding.shard_batch((ids, mask), mesh)
    times = {}
    for n in (N, 1):
      settings = sampling.SamplingSettings(num_samples=G, max_new_tokens=n, temperature=1.0,
                                           eos_ids=(eos,), pad_id=0)
      sampler = sampling.make_sampler(config, settings, mesh)
      key = jax.random.key(1)
      t0 = time.perf_counter()
      out = jax.block_until_ready(sampler(compute, ids, mask, key))
      compile_s = time.perf_counter() - t0
      if n == N and not bool(out.truncated.all()):
        raise RuntimeError("a row drew the EOS id, which is outside the vocabulary")
      calls = iter(range(1, 1 + args.repeats))
      median, all_times = median_time(lambda: jax.block_until_ready(
          sampler(compute, ids, mask, jax.random.fold_in(key, next(calls)))), args.repeats)
      times[n] = dict(s=median, times=all_times, compile_s=compile_s)
    # Null when timing noise exceeds the decode itself (tiny CPU checks), not a wrong figure.
    decode_s = times[N]["s"] - times[1]["s"]
    decode_s = decode_s if decode_s > 0 else None
    row = dict(batch=B, prompts=P, call_s=times[N]["s"], prefill_s=times[1]["s"],
               decode_s=decode_s, decode_tok_s=B * (N - 1) / decode_s if decode_s else None,
               gen_tok_s=B * N / times[N]["s"], call_times=times[N]["times"],
               compile_s=times[N]["compile_s"] + times[1]["compile_s"])
    moved = decode_bytes(config, param_bytes, devices, P, G, Tp, N)
    row["decode_bytes_per_token"] = moved / (B * (N - 1))
    row["roofline_frac"] = (moved / (bandwidth * devices) / decode_s if bandwidth and decode_s
                            else None)
    decode.append(row)
    frac = "n/a" if row["roofline_frac"] is None else f"{row['roofline_frac']:.3f}"
    print(f"[bench_device] decode B={B}: {row['decode_tok_s'] or 0:.0f} tok/s, "
          f"{row['decode_bytes_per_token'] / 1e6:.2f} MB/token, roofline fraction {frac}, "
          f"compile {row['compile_s']:.1f} s", file=sys.stderr, flush=True)
  peak_after_decode = peak_device_bytes(device)

  # ------------------------------------------------------------------ update
  R, mbs = args.update_rows, args.micro_batch_size or args.update_rows
  if R % mbs or mbs % devices:
    raise SystemExit(f"--update_rows {R} must be a multiple of --micro_batch_size {mbs}, itself "
                     f"a multiple of the {devices} devices")
  batch = ts.TrainBatch(
      prompt_tokens=rng.integers(10, config.vocab_size, (R, Tp)).astype(np.int32),
      prompt_mask=np.ones((R, Tp), np.int32),
      completion_tokens=rng.integers(10, config.vocab_size, (R, N)).astype(np.int32),
      completion_mask=np.ones((R, N), np.int32),
      advantages=rng.standard_normal(R).astype(np.float32))
  batch = sharding.shard_batch(batch, mesh)
  chunk = {} if not args.vocab_chunk else dict(vocab_chunk=args.vocab_chunk)
  loss_cfg = losses.LossConfig(beta=0.04, kl_estimator="k3", epsilon_low=0.2,
                               max_completion_length=N)
  ref_fn = ts.make_logprob_fn(mesh, state_sh.params, model_config=config,
                              num_microbatches=R // mbs, **chunk)
  update = ts.make_update_fn(mesh, state_sh, model_config=config, optimizer=optimizer,
                             loss_cfg=loss_cfg, num_microbatches=R // mbs, **chunk)
  t0 = time.perf_counter()
  ref = jax.block_until_ready(ref_fn(compute, batch))  # compiles; `compute` is the reference
  ref_compile_s = time.perf_counter() - t0
  ref_s, ref_times = median_time(lambda: jax.block_until_ready(ref_fn(compute, batch)),
                                 args.repeats)
  train_batch = batch.replace(ref_logprobs=ref)
  holder = {"state": state}

  def one_update():
    holder["state"], metrics = update(holder["state"], train_batch)
    jax.block_until_ready(metrics)
    return metrics

  t0 = time.perf_counter()
  metrics = one_update()  # compiles
  update_compile_s = time.perf_counter() - t0
  update_s, update_times = median_time(one_update, args.repeats)
  finite = bool(np.isfinite(float(jax.device_get(metrics["loss"]))))
  tokens = R * (Tp + N)
  counted = counted_flops(config, R, Tp, N)
  peak_flops = flops_peak * devices if flops_peak else None
  fraction = lambda flop, s: flop / s / peak_flops if peak_flops else None  # noqa: E731
  result = dict(
      model=args.model, num_params=num_params, num_layers=config.num_layers, dtype=config.dtype,
      param_bytes=param_bytes, samples=G, prompt_len=Tp, new_tokens=N, repeats=args.repeats,
      decode=decode,
      decode_tok_s={str(row["batch"]): row["decode_tok_s"] for row in decode},
      roofline_frac={str(row["batch"]): row["roofline_frac"] for row in decode},
      update_rows=R, micro_batch_size=mbs, update_tokens=tokens,
      update_s=update_s, update_times=update_times, update_tok_s=tokens / update_s,
      update_mfu=fraction(6 * num_params * tokens, update_s),
      update_mfu_counted=fraction(3 * counted, update_s),
      ref_s=ref_s, ref_times=ref_times, ref_tok_s=tokens / ref_s,
      ref_mfu=fraction(2 * num_params * tokens, ref_s), ref_mfu_counted=fraction(counted, ref_s),
      update_loss_finite=finite, update_compile_s=update_compile_s, ref_compile_s=ref_compile_s,
      init_s=init_s, peak_device_bytes_decode=peak_after_decode,
      peak_device_bytes=peak_device_bytes(device),
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      device=device.device_kind, platform=device.platform, num_devices=devices,
      peak_hbm_bytes_s=bandwidth, peak_bf16_flops=flops_peak, jax_version=jax.__version__)
  mfu = "n/a" if result["update_mfu"] is None else f"{result['update_mfu']:.3f}"
  print(f"[bench_device] update: {result['update_tok_s']:.0f} tok/s, MFU {mfu}, ref pass "
        f"{result['ref_tok_s']:.0f} tok/s, peak device bytes {result['peak_device_bytes']}",
        file=sys.stderr, flush=True)
  return result


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="qwen2.5-0.5b",
                      help="preset of grpo_jax/models/config.py (qwen2.5-0.5b, qwen2.5-1.5b; "
                      "tiny_qwen2 for a CPU check)")
  parser.add_argument("--layers", type=int, default=0, help="override num_layers (0: preset's)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="compute dtype (master weights and Adam stay float32)")
  parser.add_argument("--batches", default="64,128,256",
                      type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                      help="sampling batches (rows = prompts x samples), comma-separated")
  parser.add_argument("--samples", type=int, default=8, help="G, completions per prompt")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=256, help="exact completion length N")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
  parser.add_argument("--update_rows", type=int, default=64)
  parser.add_argument("--micro_batch_size", type=int, default=16, help="rows (0: all)")
  parser.add_argument("--vocab_chunk", type=int, default=0,
                      help="unembedding positions per chunk (0: the library's default)")
  args = parser.parse_args(argv)
  if not args.batches or args.new_tokens < 2 or args.repeats < 1:
    parser.error("--batches non-empty, --new_tokens >= 2, --repeats >= 1")
  return args


def main(argv=None) -> dict:
  result = bench(parse_args(argv))
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
