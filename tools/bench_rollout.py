"""Rollout benchmark: the decode work a static batch spends on finished rows, and compile time
against depth.

  python -m tools.bench_rollout --part=generation             # CPU, about a minute
  python -m tools.bench_rollout --part=compile --layers=2,8,24  # qwen2.5-0.5b shape, minutes

generation: the SPEC model (the bench_qwen2 preset: vocab 4096, 4 layers, float32, random
weights), 16 prompts x 8 samples of up to N = 128 new tokens at temperature 1, its final norm
zeroed so that every step's distribution is exactly uniform: a row ends at one of k stop ids
with probability q = k / V per step, whatever the machine. Workloads:
  fixed   no stop ids: every row runs to the budget (the SPEC workload);
  varlen  k ids for q = 1 - 0.1^(1/N): geometric lengths, 10% of rows at the budget, a mean of
          ~39% of it (GSM8K-like).
Per workload: seconds per call (median of --repeats after a warm-up call), the rows' real
tokens, the decode slots the loop ran (rows x its steps: a static batch runs until its longest
row ends) and their ratio, the useful fraction of the decode work.

compile: the run's own programs on abstract weights (tools/memory_programs.py: what
`experiment.make_device` builds) of a config (default gsm8k.py:qwen2.5-0.5b, bfloat16 compute)
at each depth of --layers: seconds to lower and compile the sampler, the update and the
log-prob pass (no persistent compile cache).

One JSON line per figure on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

PROMPTS, SAMPLES, NEW_TOKENS, PROMPT_LEN = 16, 8, 128, 32
AT_BUDGET = 0.1  # varlen: fraction of rows that reach the budget


def stop_ids(workload: str, vocab: int, new_tokens: int) -> tuple[int, ...]:
  """The workload's stop ids (the last k of the vocabulary): none for "fixed"; for "varlen" k
  with k / V = 1 - AT_BUDGET^(1 / N), so that a fraction AT_BUDGET of the rows draws none."""
  if workload == "fixed":
    return ()
  k = max(1, round(vocab * (1 - AT_BUDGET ** (1 / new_tokens))))
  return tuple(range(vocab - k, vocab))


def emit(**figure) -> dict:
  print(json.dumps(figure), flush=True)
  return figure


def generation(workload: str, *, model: str = "bench_qwen2", prompts: int = PROMPTS,
               samples: int = SAMPLES, new_tokens: int = NEW_TOKENS,
               prompt_len: int = PROMPT_LEN, repeats: int = 3,
               slots: tuple[int, ...] = (0,), scan_layers: bool = False) -> list[dict]:
  """Times the sampler on `workload` (see the module docstring) with each decode-slot count of
  `slots` (0: the static batch), the calls alternated; one JSON figure per count."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from grpo_jax import models, sampling  # pylint: disable=import-outside-toplevel

  config = models.get_config(model, scan_layers=scan_layers)
  params = models.init_params(config, jax.random.key(0))
  params["final_norm"]["scale"] = np.zeros_like(params["final_norm"]["scale"])  # uniform
  stops = stop_ids(workload, config.vocab_size, new_tokens)
  samplers = {w: sampling.make_sampler(config, sampling.SamplingSettings(
      num_samples=samples, max_new_tokens=new_tokens, temperature=1.0, eos_ids=stops, pad_id=0,
      continuous=w > 0, decode_slots=w)) for w in slots}
  ids = np.random.default_rng(0).integers(10, config.vocab_size - len(stops) or 10,
                                           (prompts, prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  outs = {w: jax.block_until_ready(f(params, ids, mask, jax.random.key(0)))  # compiles
          for w, f in samplers.items()}
  times = {w: [] for w in slots}
  for i in range(repeats):
    for w, f in samplers.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, ids, mask, jax.random.key(i + 1)))
      times[w].append(time.perf_counter() - t0)
  first = outs[slots[0]]
  lengths = np.asarray(first.lengths)
  tokens, steps = int(lengths.sum()), int(lengths.max())
  static_s = statistics.median(times[0]) if 0 in times else None
  figures = []
  for w in slots:
    gen_s = statistics.median(times[w])
    figures.append(emit(
        figure="generation", workload=workload, model=model, rows=len(lengths),
        budget=new_tokens, stop_ids=len(stops), slots=w or len(lengths),
        batching="static" if w == 0 else "continuous", scan_layers=scan_layers,
        gen_s=round(gen_s, 4),
        times_s=[round(t, 4) for t in times[w]], tokens=tokens,
        static_useful_fraction=round(tokens / (len(lengths) * steps), 4),
        speedup_vs_static=None if static_s is None else round(static_s / gen_s, 3),
        same_samples=bool(np.array_equal(np.asarray(outs[w].tokens), np.asarray(first.tokens))),
        max_logprob_diff=float(np.abs(np.asarray(outs[w].logprobs)
                                      - np.asarray(first.logprobs)).max()),
        mean_length_fraction=round(float(lengths.mean()) / new_tokens, 4),
        at_budget_fraction=round(float(np.asarray(first.truncated).mean()), 4),
        device=jax.devices()[0].device_kind))
  return figures


def step_parts(model: str, rows: int, context: int, *, layers: int = 0, dtype: str = "bfloat16",
               top_p: float = 0.95, repeats: int = 5) -> list[dict]:
  """Seconds of the parts of one decode step of `rows` rows over `context` cached tokens: the
  layers (forward to the final norm), the unembedding, the draw (unfiltered; with top-p on the
  random model's flat logits and on peaked ones)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from grpo_jax import draws, models, sampling  # pylint: disable=import-outside-toplevel

  config = models.get_config(model, dtype=dtype, param_dtype=dtype,
                             **({"num_layers": layers} if layers else {}))
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  cache = models.init_cache(config, rows, context + 1)
  cache = cache.replace(valid_BxS=cache.valid_BxS.at[:, :context].set(True),
                        pos_BxS=jnp.broadcast_to(jnp.arange(context + 1), (rows, context + 1)),
                        index=jnp.asarray(context, jnp.int32))
  tok, pos = jnp.zeros((rows, 1), jnp.int32), jnp.full((rows, 1), context, jnp.int32)
  plain = sampling.SamplingSettings(num_samples=1, max_new_tokens=1, temperature=1.0)
  nucleus = sampling.SamplingSettings(num_samples=1, max_new_tokens=1, temperature=1.0,
                                      top_p=top_p)
  layers_fn = jax.jit(lambda p, c: models.forward(p, config, tok, pos, jnp.ones_like(tok), c,
                                                  return_hidden=True)[0])
  hidden = layers_fn(params, cache)
  unembed_fn = jax.jit(lambda p, h: models.unembed(p, config, h)[:, 0])
  logits = unembed_fn(params, hidden)
  u = jax.random.uniform(jax.random.key(1), (rows, 2))
  # A random model's logits are nearly flat: top-p then keeps most of the vocabulary (its
  # threshold from the full sort). A trained model's are peaked: N(0, 5^2) logits put >= 99% of
  # the mass in the 1024 most likely of 150k tokens (the threshold from those candidates).
  peaked = 5.0 * jax.random.normal(jax.random.key(2), logits.shape, jnp.float32)
  draw, draw_top_p = (jax.jit(lambda l, v, s=s: draws.sample_tokens(l, v, s))
                      for s in (plain, nucleus))
  parts = (("layers", layers_fn, (params, cache)), ("unembed", unembed_fn, (params, hidden)),
           ("draw", draw, (logits, u)), (f"draw_top_p_{top_p}_flat", draw_top_p, (logits, u)),
           (f"draw_top_p_{top_p}_peaked", draw_top_p, (peaked, u)))
  times = {}
  for name, fn, args in parts:
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      runs.append(time.perf_counter() - t0)
    times[name] = statistics.median(runs)
  step = times["layers"] + times["unembed"] + times["draw"]
  return [emit(figure="decode_step", part=name, model=model, layers=config.num_layers,
               dtype=dtype, rows=rows, context=context, vocab=config.vocab_size,
               seconds=round(t, 6), share_of_step=round(t / step, 3),
               device=jax.devices()[0].device_kind) for name, t in times.items()]


def load_config(spec: str, overrides: list[str]):
  """`FILE.py[:arg]`'s get_config(arg), with dotted `key=value` overrides (JSON values, else
  strings; `runs.apply_overrides` names a field that cannot be set)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  from grpo_jax import runs  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()

  def value(text: str):
    try:
      return json.loads(text.lower() if text.lower() in ("true", "false") else text)
    except ValueError:
      return text

  return runs.apply_overrides(cfg, {k: value(v) for k, v in
                                    (item.split("=", 1) for item in overrides)})


def compile_times(config_path: str, layers: list[int], overrides: list[str],
                  programs=("sample_train", "update", "logprobs")) -> list[dict]:
  """Lower + compile seconds of the sampler, the update and the log-prob pass at each depth."""
  import jax  # pylint: disable=import-outside-toplevel

  from grpo_jax import settings as settings_lib, sharding  # pylint: disable=import-outside-toplevel
  from tools import memory_programs as mp  # pylint: disable=import-outside-toplevel

  s = settings_lib.from_config(load_config(config_path, overrides), jax.device_count())
  mesh = sharding.make_mesh(*s.mesh)
  base = mp.model_config(s)
  rows = s.rollout.num_prompts * s.rollout.num_samples
  figures = []
  for depth in layers:
    config = mp.with_depth(base, depth)
    setup = mp.build_setup(s, config, mesh, "training")
    sizes = {"sample_train": s.rollout.num_prompts, "update": rows, "logprobs": rows}
    for program in programs:
      size = sizes[program]
      fn, args = mp.program_args(setup, program, size)
      t0 = time.perf_counter()
      fn.lower(*args).compile()
      figures.append(emit(figure="compile", program=program, layers=depth, config=config_path,
                          compute_dtype=config.dtype, size=size,
                          compile_s=round(time.perf_counter() - t0, 2),
                          device=jax.devices()[0].device_kind))
  return figures


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("generation", "compile", "step", "all"), default="all")
  parser.add_argument("--step_model", default="qwen2.5-0.5b", help="step: a models preset")
  parser.add_argument("--step_layers", type=int, default=0, help="step: 0 = the preset's")
  parser.add_argument("--step_rows", type=int, default=128)
  parser.add_argument("--step_context", type=int, default=256)
  parser.add_argument("--model", default="bench_qwen2", help="generation: a models preset")
  parser.add_argument("--prompts", type=int, default=PROMPTS)
  parser.add_argument("--samples", type=int, default=SAMPLES)
  parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
  parser.add_argument("--prompt_len", type=int, default=PROMPT_LEN)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=False,
                      help="generation: the model's layers as one lax.scan (stacked weights)")
  parser.add_argument("--workloads", default="fixed,varlen", help="generation: comma-separated")
  parser.add_argument("--slots", default="0,32,64",
                      help="generation: decode-slot counts, 0 = static batch (first: the "
                           "reference samples)")
  parser.add_argument("--programs", default="sample_train,update,logprobs",
                      help="compile: comma-separated")
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments/configs/gsm8k.py:"
                                                              "qwen2.5-0.5b"))
  parser.add_argument("--layers", default="2,8,24", help="compile: depths, comma-separated")
  parser.add_argument("--set", action="append", default=[],
                      help="compile: a config override, e.g. --set=grpo.num_prompts=8")
  args = parser.parse_args(argv)
  figures = []
  if args.part in ("generation", "all"):
    for workload in args.workloads.split(","):
      figures += generation(workload, model=args.model, prompts=args.prompts,
                            samples=args.samples, new_tokens=args.new_tokens,
                            prompt_len=args.prompt_len, repeats=args.repeats,
                            slots=tuple(int(w) for w in args.slots.split(",")),
                            scan_layers=args.scan_layers)
  if args.part == "step":
    figures += step_parts(args.step_model, args.step_rows, args.step_context,
                          layers=args.step_layers, repeats=args.repeats)
  if args.part in ("compile", "all"):
    figures += compile_times(args.config, [int(n) for n in args.layers.split(",")], args.set,
                             args.programs.split(","))
  return figures


if __name__ == "__main__":
  main()
