#!/usr/bin/env python
"""Sampler benchmark on the workload of bench/SPEC.md, against Hugging Face `generate`.

    python tools/bench_sampler.py                      # CPU: ours + HF generate, 5 repeats
    python tools/bench_sampler.py --device=gpu         # GPU (JAX CUDA + torch CUDA)
    python tools/bench_sampler.py --skip_hf --repeats=3

Workload: Qwen2 (bench_qwen2: f32, vocab 4096, hidden 256, inter 704, 4 layers, 4 heads, 2 KV
heads, head_dim 64, tied), random init with torch seed 0 (exactly as trl_grpo_bench.py builds
it), saved once with save_pretrained and loaded with `load_hf_checkpoint`, so both stacks use
identical weights; 16 prompts x 32 random tokens in [10, 4096), 8 samples each, exactly 128 new
tokens (no EOS), temperature 1, no top-k / top-p.

Reports: seconds per call (median of --repeats after one warm-up call), tokens/s, compile
time, peak RSS, the same for HF generate in the same run and the ratio, the measured fp32
matmul peak (jitted 2048x2048 product) and the fraction of it that decoding reaches, with
FLOPs = sum over the 128 x 128 generated tokens of the forward that produced their logits:
2 x (matmul weights incl. the tied unembedding) + 4 x heads x head_dim x layers x context.
The last stdout line is one JSON object (`gen_s`, `hf_gen_s`, ...).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time

from absl import app, flags

_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "JAX platform (and torch device).")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Do not run Hugging Face generate.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after one warm-up call (median).")
_HF_REPEATS = flags.DEFINE_integer("hf_repeats", None, "HF timed calls (default: --repeats).")
_BLOCK = flags.DEFINE_integer("block_size", None, "Completion-cache block (default: settings).")
_WEIGHTS = flags.DEFINE_string(
    "weights_dir", os.environ.get("TINY_QWEN2_DIR",
                                  os.path.join(tempfile.gettempdir(), "grpo_jax_bench_qwen2")),
    "Where the seed-0 HF weights are written once (and re-read).")

VOCAB, PROMPT_LEN, N_PROMPTS, G, NEW_TOKENS = 4096, 32, 16, 8, 128


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_weights(path: str) -> None:
  """Seed-0 random Qwen2 of SPEC.md saved with save_pretrained (as trl_grpo_bench.py does)."""
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    return
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  config = Qwen2Config(
      vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
      tie_word_embeddings=True, max_position_embeddings=512, use_sliding_window=False,
      attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
      dtype="float32")
  torch.manual_seed(0)
  model = Qwen2ForCausalLM(config).to(torch.float32)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  print(f"[weights] wrote seed-0 weights to {path}", flush=True)


def decode_flops(config) -> float:
  """Useful FLOPs of the 128 x 128 generated tokens (see the module docstring)."""
  E, M, L = config.hidden_size, config.intermediate_size, config.num_layers
  H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
  per_layer = E * (H + 2 * K) * D + H * D * E + E * 2 * M + M * E
  weights = L * per_layer + config.vocab_size * E
  contexts = PROMPT_LEN + sum(range(NEW_TOKENS))  # context of each produced token, summed
  rows = N_PROMPTS * G
  return rows * (NEW_TOKENS * 2 * weights + 4 * H * D * L * contexts)


def time_calls(fn, repeats: int) -> list[float]:
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return times


def matmul_peak_gflops(jax, jnp) -> float:
  a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  t = statistics.median(time_calls(lambda _: mm(a).block_until_ready(), 10))
  return 2 * 2048 ** 3 / t / 1e9


def main(_):
  os.environ.setdefault("JAX_PLATFORMS", "cuda" if _DEVICE.value == "gpu" else "cpu")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from grpo_jax import models, sampling

  write_weights(_WEIGHTS.value)
  config, params = models.load_hf_checkpoint(_WEIGHTS.value)
  bench = models.get_config("bench_qwen2")
  print(f"[setup] jax {jax.__version__} on {jax.devices()[0].device_kind} x "
        f"{jax.device_count()}, config == bench_qwen2 preset: {config == bench}", flush=True)

  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(10, VOCAB, (N_PROMPTS, PROMPT_LEN)), jnp.int32)
  mask = jnp.ones_like(prompts)
  kw = {} if _BLOCK.value is None else dict(block_size=_BLOCK.value)
  settings = sampling.SamplingSettings(num_samples=G, max_new_tokens=NEW_TOKENS,
                                       temperature=1.0, **kw)
  sampler = sampling.make_sampler(config, settings)

  t0 = time.perf_counter()
  compiled = sampler.lower(params, prompts, mask, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(sampler(params, prompts, mask, jax.random.key(0)))
  first_s = time.perf_counter() - t0
  assert out.tokens.shape == (N_PROMPTS * G, NEW_TOKENS) and int(out.lengths.min()) == NEW_TOKENS
  del compiled
  times = time_calls(lambda i: jax.block_until_ready(
      sampler(params, prompts, mask, jax.random.key(i + 1))), _REPEATS.value)
  gen_s = statistics.median(times)
  ours_rss = rss_mb()
  peak = matmul_peak_gflops(jax, jnp)
  flops = decode_flops(config)
  tokens = N_PROMPTS * G * NEW_TOKENS
  res = dict(impl="grpo_jax", device=_DEVICE.value, gen_s=round(gen_s, 4),
             gen_tok_s=round(tokens / gen_s, 1), compile_s=round(compile_s, 2),
             first_call_s=round(first_s, 3), times_s=[round(t, 3) for t in times],
             peak_rss_mb=round(ours_rss, 1), matmul_peak_gflops=round(peak, 1),
             decode_gflop=round(flops / 1e9, 1),
             decode_gflops=round(flops / gen_s / 1e9, 1),
             fraction_of_peak=round(flops / gen_s / 1e9 / peak, 3),
             block_size=settings.block_size)
  print(f"[grpo_jax] gen_s={gen_s:.3f} (runs {res['times_s']}) tok/s={res['gen_tok_s']} "
        f"compile_s={compile_s:.2f} first_call_s={first_s:.2f} peak_rss_mb={ours_rss:.0f}",
        flush=True)
  print(f"[peak] matmul 2048^2 fp32: {peak:.1f} GFLOP/s; decoding {flops / 1e9:.1f} GFLOP in "
        f"{gen_s:.3f} s = {res['decode_gflops']} GFLOP/s = {res['fraction_of_peak']:.0%} of peak",
        flush=True)

  res["hf_gen_s"] = None
  if not _SKIP_HF.value:
    import torch
    from transformers import Qwen2ForCausalLM
    dev = "cuda" if _DEVICE.value == "gpu" else "cpu"
    hf = Qwen2ForCausalLM.from_pretrained(_WEIGHTS.value, dtype=torch.float32).to(dev).eval()
    ids = torch.tensor(np.repeat(np.asarray(prompts), G, axis=0), device=dev)
    attn = torch.ones_like(ids)

    def hf_call(i):
      torch.manual_seed(i)
      with torch.no_grad():
        seq = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, pad_token_id=VOCAB + 1, eos_token_id=None)
      if dev == "cuda":
        torch.cuda.synchronize()
      assert seq.shape == (N_PROMPTS * G, PROMPT_LEN + NEW_TOKENS)

    hf_call(0)  # warm-up
    hf_times = time_calls(lambda i: hf_call(i + 1), _HF_REPEATS.value or _REPEATS.value)
    hf_s = statistics.median(hf_times)
    res.update(hf_gen_s=round(hf_s, 4), hf_gen_tok_s=round(tokens / hf_s, 1),
               hf_times_s=[round(t, 3) for t in hf_times], hf_peak_rss_mb=round(rss_mb(), 1),
               speedup_vs_hf=round(hf_s / gen_s, 2), torch_threads=torch.get_num_threads())
    print(f"[hf] generate gen_s={hf_s:.3f} (runs {res['hf_times_s']}) tok/s="
          f"{res['hf_gen_tok_s']} process peak_rss_mb={res['hf_peak_rss_mb']:.0f}; "
          f"ours is {hf_s / gen_s:.2f}x faster", flush=True)
  print(json.dumps(res), flush=True)


if __name__ == "__main__":
  app.run(main)
