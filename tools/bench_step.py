#!/usr/bin/env python
"""The whole GRPO step of bench/SPEC.md through grpo_jax's driver: one command, JSON last line.

  python tools/bench_step.py                       # the SPEC's size (2-core CPU: 1-3 min)
  python tools/bench_step.py --model=tiny_qwen2 --prompts=8 --samples=2 --prompt_len=8 \\
      --new_tokens=8 --steps=2                     # seconds: a check of the tool
  JAX_PLATFORMS=cuda python tools/bench_step.py --dtype=bfloat16                        # one GPU
  JAX_PLATFORMS=cuda python tools/bench_step.py --model=qwen2.5-0.5b --dtype=bfloat16 \\
      --prompts=64 --new_tokens=256                # a published shape, random weights

Workload (SPEC.md): 16 prompts of 32 random token ids in [10, vocab), G = 8 completions each of
exactly 128 new tokens (the EOS id lies outside the model's vocabulary, so it is never drawn),
temperature 1, no top-k / top-p; reward = fraction of even completion token ids; group mean / std
advantages; GRPO clipped ratio (eps 0.2) + k3 KL to a frozen reference (beta 0.04); one AdamW step
(lr 1e-6, no clipping, no weight decay) on the whole batch (gradients accumulated exactly over
micro-batches of `--micro_batch_size` rows inside one jitted step).

How it runs: everything goes through the public driver, as a user's run does. The prompts are a
records file (`data.task = "records"`, one jsonl row per prompt, the ids written as text), the
tokenizer a Hugging Face `tokenizer.json` whose token "i" is id i (so the text is the id list,
exactly, as in trl_grpo_bench.py), the model an HF checkpoint directory (`model.hf_checkpoint`):
the SPEC's seed-0 weights from `$TINY_QWEN2_DIR` or `<repo>/tiny_qwen2` when present (written by
trl_grpo_bench.py, so both load identical weights), else grpo_jax's random init of `--model`
(seed 0) saved to a temporary directory. The reward is a Python function passed as
`experiment.build(settings, workdir, reward_fns={"even": fn})`. The config starts from
experiments/configs/arithmetic.py. Each step is `trainer.grpo_step`'s four calls, timed one by
one (each timer waits for its device work):

    policy = weights.decode_params(device, weights.policy_params(device, state))  # no-op f32
    roll, position = rollout.collect(data, sampler, r, policy, position, key)    # gen_s, score_s
    adv = rollout.coefficients(roll, r, weights); batch = rollout.train_batch(roll, adv, ...)
    ready = updates.with_logprobs(device, g, state.params, ref, batch)  # ref_s: device + ref pass
    state, figures = updates.update(device, g, state, ready)            # update_s
    ref = updates.next_reference(device, g, ref, state.params, step + 1)

(`grpo_step` also builds the logged samples and histograms; they are not timed here.) With
`--driver=trainer` each step is `trainer.grpo_step` itself, which overlaps: its log-prob passes
are queued before the host decodes and scores, its update before the samples and histograms;
then ref_s is not separable (update_s = ref pass + update) and wait_s is the time the host
waited for the update's metrics after its own work. gen_s is
the rollout's `sample_s`: the jitted sampler, the copy to the host and the decode to text (TRL's
`_generate`: tokenise, `generate`, decode). step_s is the wall time of all of the above.

Figures: the median of the `--steps` steps after `--warmup` warm-up steps (SPEC: steps 2..6 after
1), with their ranges; gen_tok_s = P * G * new_tokens / gen_s; peak RSS of the process (includes
the compiles); the warm-up step (compiles) on its own. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

# This checkout's grpo_jax and experiments/, not whichever ones the environment has installed.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SPEC_MODEL = "bench_qwen2"
FIRST_ID = 10  # prompt ids are drawn from [10, vocab), as in the SPEC's reference scripts


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def even_fraction(completion_ids, **unused) -> list[float]:
  """SPEC's reward: the fraction of completion tokens whose id is even."""
  del unused
  return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def write_tokenizer(directory: str, vocab: int) -> None:
  """tokenizer.json: token "i" <-> id i for i < vocab; <eos>, <pad>, <unk> at vocab, +1, +2,
  outside the model's logits, so the sampler never draws the EOS (trl_grpo_bench.py's choice)."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  table = {str(i): i for i in range(vocab)}
  table.update({"<eos>": vocab, "<pad>": vocab + 1, "<unk>": vocab + 2})
  tok = Tokenizer(tok_models.WordLevel(vocab=table, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))


def write_prompts(path: str, num: int, prompt_len: int, vocab: int, seed: int = 0) -> None:
  """`num` records whose question is `prompt_len` random ids in [10, vocab) as text (the same
  draws as trl_grpo_bench.py's make_prompts for the same count and seed)."""
  ids = np.random.default_rng(seed).integers(FIRST_ID, vocab, size=(num, prompt_len))
  with open(path, "w") as f:
    for row in ids:
      f.write(json.dumps({"question": " ".join(map(str, row.tolist())), "answer": "0"}) + "\n")


def spec_weights_dir() -> str:
  """The SPEC's shared seed-0 weights, if present: $TINY_QWEN2_DIR, else <repo>/tiny_qwen2."""
  path = os.environ.get("TINY_QWEN2_DIR") or os.path.join(REPO, "tiny_qwen2")
  return path if os.path.isfile(os.path.join(path, "model.safetensors")) else ""


def model_dir(args, tmp: str) -> tuple[str, str]:
  """(HF checkpoint directory, where its weights come from)."""
  if args.weights:
    return args.weights, args.weights
  if args.model == SPEC_MODEL and spec_weights_dir():
    return spec_weights_dir(), spec_weights_dir()
  import jax
  from grpo_jax import models
  config = models.get_config(args.model)
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  path = os.path.join(tmp, "model")
  models.save_hf_checkpoint(path, config, jax.device_get(params))
  return path, f"random init of {args.model} (grpo_jax, seed 0)"


def make_config(args, data_path: str, tokenizer_dir: str, weights_dir: str):
  """The SPEC's GRPO step as an experiment config (experiments/configs/arithmetic.py, changed)."""
  from experiments.configs import arithmetic
  c = arithmetic.get_config("local")
  P = args.prompts
  c.data.update(task="records", path=data_path, train_split="train", eval_split="", num_train=0,
                num_eval=P, prompt_template="{question}", chat_template="")
  c.data.fields.update(question="question", answer="", final_answer="answer", marker="")
  c.tokenizer.path = tokenizer_dir
  c.model.update(hf_checkpoint=weights_dir, param_dtype="float32", dtype=args.dtype,
                 scan_layers=args.scan_layers, remat=args.remat)
  c.sft.steps = 0
  g = c.grpo
  g.update(steps=args.warmup + args.steps, num_prompts=P, num_samples=args.samples,
           max_prompt_length=args.prompt_len,
           max_completion_length=args.new_tokens - 1,  # the sampler's budget is this + 1
           temperature=1.0, top_k=0, top_p=0.0, min_p=0.0, advantage_scale="group",
           num_iterations=1, micro_batch_size=args.micro_batch_size,
           mask_truncated_completions=False, dynamic_sampling=False)
  # Variable lengths: `--stop_ids` ids (from FIRST_ID) end a completion, each drawn with
  # probability ~1/vocab per step under near-uniform random weights.
  g.stop_tokens = ",".join(str(FIRST_ID + i) for i in range(args.stop_ids))
  g.length_bucket = args.length_bucket
  g.batching = args.batching
  g.rewards.exact_answer = 0.0
  g.rewards.even = 1.0
  g.loss.update(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, beta=0.04, kl_estimator="k3",
                importance_sampling_level="token")
  g.optim.update(learning_rate=1e-6, warmup_steps=0, decay_steps=0, weight_decay=0.0)
  g.optim.max_grad_norm = None  # SPEC: plain AdamW (TRL's max_grad_norm=0)
  c.eval.update(every=0, batch_size=P, num_problems=P, k=1)
  return c


def timed_step(exp, state, ref, position, step: int):
  """`trainer.grpo_step`'s calls, each timed to the end of its device work."""
  import jax
  from grpo_jax import experiment, rollout, updates, weights
  r, g, device = exp.settings.rollout, exp.settings.grpo, exp.device
  t0 = time.perf_counter()
  policy = weights.decode_params(device, weights.policy_params(device, state))
  roll, position = rollout.collect(exp.data, device.programs.sample_train, r, policy, position,
                                   exp.keys(experiment.Stream.ROLLOUT, step))
  t1 = time.perf_counter()
  adv = rollout.coefficients(roll, r, exp.data.rewards.weights)
  batch = rollout.train_batch(roll, adv, mask_truncated=r.mask_truncated_completions)
  t2 = time.perf_counter()
  ready = updates.with_logprobs(device, g, weights.update_params(state), ref, batch)
  batch = ready.batch
  jax.block_until_ready(batch.ref_logprobs)
  t3 = time.perf_counter()
  state, figures = updates.update(device, g, state, ready)  # waits: it reads the step's metrics
  ref = updates.next_reference(device, g, ref, state.params, step + 1)
  jax.block_until_ready((state, ref))
  t4 = time.perf_counter()
  f = roll.figures
  times = dict(step_s=t4 - t0, rollout_s=t1 - t0, gen_s=f["sample_s"], score_s=f["score_s"],
               advantages_s=t2 - t1, ref_s=t3 - t2, update_s=t4 - t3)
  full = roll.mask_NxC.shape[1] == r.max_completion_length + 1 and bool(roll.mask_NxC.all())
  checks = dict(reward=f["reward"], completion_length=f["completion_length"],
                lengths=roll.mask_NxC.sum(1).tolist(), width=int(batch.completion_mask.shape[1]),
                truncated_fraction=f["truncated_fraction"], loss=figures.get("loss"),
                kl=figures.get("kl"), skipped=figures.get("skipped"), full_length=full)
  return state, ref, position, times, checks


def trainer_step(exp, state, ref, position, step: int):
  """One `trainer.grpo_step`, as a run does it (log-prob passes overlapped with the host's text
  decoding and scoring, the update with its bookkeeping): its own timeline figures."""
  import jax
  from grpo_jax import runstate, trainer
  loop = runstate.LoopState("grpo", step, position)
  t0 = time.perf_counter()
  loop, models, out = trainer.grpo_step(exp, loop, runstate.Models(state, ref), step)
  f = out.figures
  state, ref = models.state, models.ref_params
  jax.block_until_ready((state, ref))
  times = dict(step_s=time.perf_counter() - t0, rollout_s=f["sample_s"] + f["score_s"],
               gen_s=f["sample_s"], score_s=f["score_s"], advantages_s=None,
               ref_s=None, update_s=f["update_s"], wait_s=f["wait_s"])
  checks = dict(reward=f["reward"], completion_length=f["completion_length"],
                lengths=[], width=-1, truncated_fraction=f["truncated_fraction"],
                loss=f.get("loss"), kl=f.get("kl"), skipped=f.get("skipped"),
                full_length=f["completion_length"] == exp.settings.rollout.max_completion_length + 1)
  return state, ref, loop.position, times, checks


def bench(args) -> dict:
  import jax
  from grpo_jax import experiment, process, settings as settings_lib, weights
  from grpo_jax.data import iterator

  arenas = process.limit_malloc_arenas()  # as a launch does (GRPO_JAX_MALLOC_ARENAS=0: glibc's)
  cache_dir = process.enable_compile_cache()  # as a launch does (GRPO_JAX_COMPILE_CACHE=off: none)

  P, G, N = args.prompts, args.samples, args.new_tokens
  with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
    weights_dir, weights_from = model_dir(args, tmp)
    vocab = _hf_vocab(weights_dir)
    data_path, tokenizer_dir = os.path.join(tmp, "prompts.jsonl"), os.path.join(tmp, "tokenizer")
    # Fresh prompts for every step (as trl_grpo_bench.py), plus P held out (never used here).
    write_prompts(data_path, P * (args.warmup + args.steps) + P, args.prompt_len, vocab)
    write_tokenizer(tokenizer_dir, vocab)
    cfg = make_config(args, data_path, tokenizer_dir, weights_dir)
    t0 = time.perf_counter()
    s = settings_lib.from_config(cfg, jax.device_count())
    exp = experiment.build(s, os.path.join(tmp, "workdir"), reward_fns={"even": even_fraction})
    state = experiment.init_state(exp.device, exp.keys, "grpo")
    ref = weights.reference_copy(exp.device, state.params)
    jax.block_until_ready((state, ref))
    setup_s = time.perf_counter() - t0
    position = iterator.Position(0, 0, s.seed + 1)  # as trainer.sft_phase starts GRPO
    steps = []
    for step in range(args.warmup + args.steps):
      run_step = trainer_step if args.driver == "trainer" else timed_step
      state, ref, position, times, checks = run_step(exp, state, ref, position, step)
      steps.append(dict(times, **checks))
      print(f"[bench_step] step {step} ({'warm-up' if step < args.warmup else 'counted'}): "
            + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in steps[-1].items() if k != "lengths"),
            file=sys.stderr, flush=True)
    num_params = exp.device.num_params()
    counted = steps[args.warmup:]
    result = {"impl": "grpo_jax"}
    keys = ("gen_s", "step_s", "ref_s", "update_s", "score_s", "rollout_s", "advantages_s")
    for key in keys + (("wait_s",) if args.driver == "trainer" else ()):
      values = [st[key] for st in counted]
      if None in values:  # not separable under --driver=trainer
        result[key] = result[f"{key}_range"] = None
        continue
      result[key] = statistics.median(values)
      result[f"{key}_range"] = [min(values), max(values)]
    lengths = np.concatenate([st["lengths"] for st in counted]) if args.driver == "phases" \
        else np.asarray([st["completion_length"] for st in counted])  # trainer: means only
    result.update(
        gen_tok_s=float(np.mean([st["completion_length"] for st in counted])) * P * G
        / result["gen_s"], driver=args.driver,
        completion_length={"mean": float(lengths.mean()),
                           **{f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90)}},
        update_widths=sorted({st["width"] for st in steps}), stop_ids=args.stop_ids,
        length_bucket=args.length_bucket, batching=args.batching,
        scan_layers=args.scan_layers, remat=args.remat, compile_cache=cache_dir,
        malloc_arenas=arenas,
        peak_rss_mb=peak_rss_mb(),
        warmup_step_s=steps[0]["step_s"] if args.warmup else None, setup_s=setup_s,
        all_completions_full=all(st["full_length"] for st in steps),
        reward=statistics.mean(st["reward"] for st in counted),
        kl_last=steps[-1]["kl"], skipped=sum(st["skipped"] or 0 for st in steps),
        steps=[{k: st[k] for k in ("step_s", "gen_s", "ref_s", "update_s")} for st in steps],
        model=args.model, weights=weights_from, num_params=num_params, vocab=vocab,
        dtype=args.dtype, prompts=P, samples=G, prompt_len=args.prompt_len, new_tokens=N,
        micro_batch_size=args.micro_batch_size, warmup=args.warmup, counted=args.steps,
        device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
        num_devices=jax.device_count(), jax_version=jax.__version__)
  return result


def _hf_vocab(weights_dir: str) -> int:
  with open(os.path.join(weights_dir, "config.json")) as f:
    return int(json.load(f)["vocab_size"])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=SPEC_MODEL,
                      help="model preset (grpo_jax/models/config.py); the SPEC's bench_qwen2 loads "
                      "$TINY_QWEN2_DIR or <repo>/tiny_qwen2 when present, others are random")
  parser.add_argument("--weights", default="",
                      help="an HF checkpoint directory (overrides --model)")
  parser.add_argument("--steps", type=int, default=5, help="counted steps (median)")
  parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (compiles)")
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--samples", type=int, default=8, help="G, completions per prompt")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128, help="exact completion length")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype (master weights and Adam stay float32)")
  parser.add_argument("--stop_ids", type=int, default=0,
                      help="variable lengths: this many ids end a completion (0: every row is "
                      "--new_tokens long, the SPEC workload); 64 of 4096 spreads them over "
                      "~16..128")
  parser.add_argument("--length_bucket", type=int, default=16,
                      help="config.grpo.length_bucket (0: update and passes on the whole budget)")
  parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=False,
                      help="config.model.scan_layers: one lax.scan over stacked layers")
  parser.add_argument("--remat", default="none", help="config.model.remat")
  parser.add_argument("--batching", default="continuous", choices=("continuous", "static"),
                      help="config.grpo.batching: the sampler's (one decode slot per row)")
  parser.add_argument("--driver", default="phases", choices=("phases", "trainer"),
                      help="phases: the step's calls one by one, each timed to the end of its "
                      "device work (gen / ref / update); trainer: trainer.grpo_step itself, with "
                      "its host / device overlap (step_s, gen_s, score_s, update_s = ref pass + "
                      "update, wait_s)")
  parser.add_argument("--micro_batch_size", type=int, default=8,
                      help="rows per micro-batch of the update and log-prob passes (0: all)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.new_tokens < 2:
    parser.error("--steps >= 1, --warmup >= 0 and --new_tokens >= 2")
  return args


def main(argv=None) -> dict:
  result = bench(parse_args(argv))
  print(f"[bench_step] medians of {result['counted']} steps: step_s={result['step_s']:.3f} "
        f"gen_s={result['gen_s']:.3f} ref_s={result['ref_s'] or float('nan'):.3f} "
        f"update_s={result['update_s']:.3f} gen_tok_s={result['gen_tok_s']:.0f} "
        f"peak_rss_mb={result['peak_rss_mb']:.0f}", file=sys.stderr, flush=True)
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
