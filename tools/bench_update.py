"""Benchmark of the GRPO update step and the reference log-prob pass (workload: shared/bench/SPEC.md).

  python tools/bench_update.py                      # CPU, ours + a torch/transformers baseline
  python tools/bench_update.py --skip_torch         # ours only
  JAX_PLATFORMS=cuda python tools/bench_update.py --skip_torch --repeats=10   # a GPU

Workload: Qwen2 (vocab 4096, hidden 256, 4 layers, GQA 4/2, tied), float32, 16 prompts x 8
samples = 128 rows of 32 prompt + 128 completion tokens; GRPO loss (eps 0.2) + beta 0.04 k3 KL
to a frozen reference; one AdamW step (lr 1e-6) on the whole batch (gradients accumulated over
micro-batches of `--micro_batch_size` rows inside one jitted step: exactly the full-batch step).

Reports the median over `--repeats` calls after one warm-up call: update_s (forward + backward
+ AdamW), ref_s (reference log-probs), compile times, peak RSS of this process (measured before
torch is imported; the torch baseline runs in a subprocess with its own RSS), FLOP/s from XLA's
cost analysis against a measured float32 matmul peak. The torch baseline runs the same loss with
transformers' Qwen2ForCausalLM on the same weights (what TRL computes for this workload).
The last line of stdout is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

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


def forward_flops(c) -> float:
  """Useful matmul FLOPs of one teacher-forced pass over the 128 x 160 tokens: projections and
  MLP on every token, attention scores/values causally, the unembedding on completion positions.
  (XLA's cost analysis counts a scan body once, so it undercounts micro-batched programs.)"""
  rows, T = P * G, TP + TC
  per_token = 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # qkv
  per_token += 2 * c.num_heads * c.head_dim * c.hidden_size  # o
  per_token += 2 * 3 * c.hidden_size * c.intermediate_size  # gate, up, down
  attention = 2 * 2 * c.num_heads * c.head_dim * T * (T + 1) / 2  # QK^T and AV, causal half
  layers = c.num_layers * (rows * T * per_token + rows * attention)
  return layers + 2 * rows * TC * c.hidden_size * c.vocab_size


def bench_ours(args) -> dict:
  import jax
  import jax.numpy as jnp
  from grpo_jax import advantages, losses, models, sharding
  from grpo_jax import train_step as ts

  config = models.get_config("bench_qwen2")
  if args.weights:
    config, params = models.load_hf_checkpoint(args.weights)
  else:
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
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
  shapes = jax.eval_shape(lambda: params)
  state_sh = ts.state_shardings(mesh, config, optimizer, shapes)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
  ref_params = jax.device_put(jax.tree.map(jnp.copy, params), state_sh.params)
  batch = sharding.shard_batch(batch, mesh)
  ref_fn = ts.make_logprob_fn(mesh, state_sh.params, model_config=config,
                              num_microbatches=n_micro, vocab_chunk=args.vocab_chunk)
  update = ts.make_update_fn(mesh, state_sh, model_config=config, optimizer=optimizer,
                             loss_cfg=loss_cfg, num_microbatches=n_micro,
                             vocab_chunk=args.vocab_chunk)

  t0 = time.perf_counter()
  ref_compiled = ref_fn.lower(ref_params, batch).compile()
  ref_compile_s = time.perf_counter() - t0
  ref = ref_fn(ref_params, batch).block_until_ready()
  batch = batch.replace(ref_logprobs=ref)
  t0 = time.perf_counter()
  upd_compiled = update.lower(state, batch).compile()
  update_compile_s = time.perf_counter() - t0

  holder = {"state": state}

  def one_update():
    holder["state"], m = update(holder["state"], batch)
    jax.block_until_ready(m)

  one_update()  # warm-up
  update_s, update_times = median_time(one_update, args.repeats)
  ref_s, ref_times = median_time(lambda: ref_fn(ref_params, batch).block_until_ready(),
                                 args.repeats)

  del upd_compiled, ref_compiled
  peak = matmul_peak_flops(jax, jnp)
  ref_flops = forward_flops(config)
  upd_flops = 3 * ref_flops  # backward = 2x forward
  return dict(update_s=update_s, ref_s=ref_s, update_times=update_times, ref_times=ref_times,
              update_compile_s=update_compile_s, ref_compile_s=ref_compile_s,
              peak_rss_mb=peak_rss_mb(), micro_batch_size=args.micro_batch_size,
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--micro_batch_size", type=int, default=8)
  parser.add_argument("--vocab_chunk", type=int, default=128,
                      help="completion positions per unembedding chunk")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--weights", default="", help="HF dir of the bench model (default: write "
                      "the SPEC's seed-0 weights to a temp dir when torch is available)")
  args = parser.parse_args()
  tmp = None
  if not args.weights and not args.skip_torch:
    tmp = tempfile.mkdtemp(prefix="bench_qwen2_")
    write_bench_weights(tmp)
    args.weights = tmp
  result = bench_ours(args)
  print(f"ours: update {result['update_s']:.3f} s, ref {result['ref_s']:.3f} s, peak RSS "
        f"{result['peak_rss_mb']:.0f} MB, update {result['update_frac_peak']:.0%} / ref "
        f"{result['ref_frac_peak']:.0%} of the {result['matmul_peak_gflops']:.0f} GFLOP/s "
        "matmul peak", file=sys.stderr)
  if not args.skip_torch:
    out = subprocess.run([sys.executable, "-c", TORCH_BASELINE, args.weights, str(args.repeats)],
                         check=True, capture_output=True, text=True).stdout
    result.update(json.loads(out.strip().splitlines()[-1]))
    result["speedup_update_vs_torch"] = result["torch_update_s"] / result["update_s"]
    result["speedup_ref_vs_torch"] = result["torch_ref_s"] / result["ref_s"]
    print(f"torch/transformers: update {result['torch_update_s']:.3f} s, ref "
          f"{result['torch_ref_s']:.3f} s, peak RSS {result['torch_peak_rss_mb']:.0f} MB",
          file=sys.stderr)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
