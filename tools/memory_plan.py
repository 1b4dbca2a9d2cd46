"""Per-device memory plan of a GRPO run: state bytes and the peak of every compiled program.

  python -m tools.memory_plan --config=experiments/configs/gsm8k.py:qwen2.5-7b \
      --config.mesh.fsdp=8 --config.mesh.data=1 [--num_devices=8] [--chip=h100] [--out=plan.json]

No weights are allocated and no accelerator is needed. The run's own jitted programs (what
`experiment.make_device` builds: policy update, log-prob pass, samplers, the decode-layout cast)
are lowered on abstract inputs (`jax.ShapeDtypeStruct`s with the run's shardings; shapes from
`jax.eval_shape`) over simulated CPU devices (`--num_devices`, default the mesh's product),
compiled, and read with `compiled.memory_analysis()`: argument, output, alias (donated) and
temporary bytes per device. A program's peak = argument + output - alias + temp.

Printed per device (GiB = 2^30 bytes; `--out` writes the same as JSON, in bytes):
  state     params (param_dtype), optimiser state, reference copy (settings.use_reference; LoRA:
            the frozen base), gradients (the trained leaves' size; they live in the update's
            temp), the policy's compute-dtype copy and its decode-layout copy: from shapes and
            shardings alone, exact.
  programs  each compiled program, and its PHASE peak = the program's peak + what the driver
            holds beside it without passing it (trainer.grpo_step: the train state, the reference
            and the policy copy live through the whole step; the decode copy through the rollout).
  chips     fits (largest phase peak <= --margin x memory) and headroom on TPU v5e / v6e / v5p,
            H100, H200 (nominal memory; JAX on a GPU takes 75% of it unless
            XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).
  search    with --chip: the largest grpo.micro_batch_size whose update phase fits, and the
            largest sampling batch (prompts x samples per device) whose rollout fits.

Depth (`--layers`): models of at most 4 layers, and scanned ones (`model.scan_layers`: their
compile time does not grow with depth), are compiled whole; deeper unrolled ones at 2 and 3
layers, every figure extrapolated linearly (identical layers each add the same weights, saved
activations, gathered weights and KV cache). Checked on Qwen2.5-7B: the update extrapolated to
28 layers matched its exact compile (90 s) to 0.01%. Not from 1 layer: a 1-layer sampler is
scheduled differently (+15% at 6 layers). A sampler is the larger of two lines: at a few layers
it peaks while prefilling the prompts, a deep one while decoding (each layer adds its
completion KV cache), so the decode phase gets its own line, from the same sampler with 1-token
prompts plus the prompts' ids and cache (for 7B at 32 prompts per device: 1.33 GiB per layer
prefilling, 1.55 decoding; at 8 and 16 layers the exact compile matched the larger line to
0.01%, where the prefill line alone was 5% low at 16). The
search's sampler probes compile the decode phase at 2 layers and take its per-layer bytes,
linear in the batch, from two sizes compiled at 2 and 3 layers. Gemma 3's interleaved layers
are extrapolated from its first three (sliding) layers.

What the CPU compile does not tell (read the figures with these in mind):
- XLA:CPU computes bfloat16 matmuls and collectives in float32 and keeps float32 copies of the
  bf16 operands; in a sampler the weights' copies are hoisted out of the decode loop. So with a
  bfloat16 compute dtype the temp of the samplers, the log-prob pass and the decode-layout cast
  holds up to 2 x their bf16 weights that a GPU or TPU does not need (`cpu_upcast_bound`).
- Partitioning (GSPMD) is the same pass on every backend; fusion and scheduling differ, so
  temporaries on a GPU / TPU can differ by some percent.
- The reward model (iterative GRPO) and the SFT warm start are not planned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import jax
from absl import app, flags
from ml_collections import config_flags

from grpo_jax import models, settings as settings_lib, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from tools.memory_programs import (  # noqa: E402  (tools/ is not an installed package)
    DEPTHS, EXACT_MAX_LAYERS, Planner, Probe, cpu_upcast_bound, kv_tokens, model_config,
    phase_peaks, resolve_decode_layout, sampler_prompts, state_bytes)

GIB = 2 ** 30
# Nominal memory per device (GiB): HBM per TPU chip, a GPU's memory.
CHIPS = {"v5e": 16.0, "v6e": 32.0, "h100": 80.0, "v5p": 95.0, "h200": 141.0}
DEFAULT_CHIP = "h100"  # what mesh.decode_layout = "auto" is resolved for without --chip
# ----------------------------------------------------------------------------- search


def largest(candidates: list[int], fits: Callable[[int], bool],
            known: Optional[dict[int, bool]] = None,
            guess: Optional[Callable[[], Optional[int]]] = None) -> Optional[int]:
  """The largest of the sorted `candidates` that `fits` (monotone: what is below a fitting one
  fits), by bisection; `known`: results already probed; `guess()`: an index to probe instead of
  the midpoint (None: the midpoint), moved inside the open bounds, every other step when it
  does not halve them. None when none fits."""
  known = known or {}
  lo = max((i for i, c in enumerate(candidates) if known.get(c) is True), default=-1)
  hi = min((i for i, c in enumerate(candidates) if known.get(c) is False),
           default=len(candidates))
  bisect_next = False
  while hi - lo > 1:
    width = hi - lo
    i = None if guess is None or bisect_next else guess()
    i = (lo + hi) // 2 if i is None else min(max(i, lo + 1), hi - 1)
    if fits(candidates[i]):
      lo = i
    else:
      hi = i
    # A guided probe that did not halve a probed bracket: bisect next (past a kink, a line
    # through probes on one side creeps toward the limit one candidate at a time).
    bisect_next = not bisect_next and hi < len(candidates) and hi - lo > width / 2
  return candidates[lo] if lo >= 0 else None


def affine_guess(peaks: dict[int, int], budget: float, candidates: list[int]) -> Callable:
  """guess() for `largest`: the index of the largest candidate under the budget on the line
  through the two probes whose peaks are nearest it (peaks grow about linearly with rows)."""
  def guess() -> Optional[int]:
    if len(peaks) < 2:
      return None
    (x1, y1), (x2, y2) = sorted(peaks.items(), key=lambda p: abs(p[1] - budget))[:2]
    if y2 == y1:
      return None
    x = x1 + (budget - y1) * (x2 - x1) / (y2 - y1)
    return sum(1 for c in candidates if c <= x) - 1
  return guess


def _with_microbatches(s: settings_lib.Settings, n: int) -> settings_lib.Settings:
  return dataclasses.replace(s, grpo=dataclasses.replace(s.grpo, num_microbatches=n))


def search(planner: Planner, probe: Probe, b: dict[str, int], budget: float,
           max_prompts_per_device: int = 4096, sampling: bool = True) -> dict:
  """The largest grpo.micro_batch_size whose update phase fits `budget`, and (`sampling`) the
  largest number of prompts per device whose rollout phase fits (G samples each, as set)."""
  s = probe.settings
  dp = sharding.data_parallel_size(planner.mesh)
  rows = s.rollout.num_prompts * s.rollout.num_samples
  setup = planner.setup(probe)
  out = dict(budget_bytes=int(budget))

  update_peaks: dict[int, int] = {}

  def update_fits(mb: int) -> bool:
    p = dataclasses.replace(probe, settings=_with_microbatches(s, rows // mb))
    mem = {"update": planner.memory(p, "update", rows)}
    update_peaks[mb] = phase_peaks(planner.setup(p), b, mem)["update"]
    return update_peaks[mb] <= budget

  mbs = [m for m in range(dp, rows + 1, dp) if rows % m == 0]
  configured = rows // s.grpo.num_microbatches
  out["micro_batch_size"] = largest(mbs, update_fits, {configured: update_fits(configured)},
                                    affine_guess(update_peaks, budget, mbs))
  out["update_peak_bytes"] = dict(sorted(update_peaks.items()))
  if not sampling or s.rollout.paradigm.data == "teacher":
    return out

  sample_peaks: dict[int, int] = {}
  start = max(1, s.rollout.num_prompts // dp)

  seeds: tuple[int, ...] = ()

  def sample_fits(per_device: int) -> bool:
    n = per_device * dp
    mem = {"sample_train": planner.sampler_memory(probe, "sample_train", n, seeds,
                                                  prefill=per_device == start)}
    sample_peaks[per_device] = phase_peaks(setup, b, mem)["sample_train"]
    return sample_peaks[per_device] <= budget

  prompts = list(range(1, max_prompts_per_device + 1))
  second = 4 * start if sample_fits(start) else max(1, start // 4)
  seeds = (start * dp, second * dp)  # per-layer bytes compiled at these two sizes
  sample_fits(second)
  known = {p: sample_peaks[p] <= budget for p in (start, second)}
  best = largest(prompts, sample_fits, known, affine_guess(sample_peaks, budget, prompts))
  out.update(prompts_per_device=best, sample_peak_bytes=dict(sorted(sample_peaks.items())),
             sampling_rows_per_device=best and best * s.rollout.num_samples,
             num_prompts=best and best * dp)
  return out


# ----------------------------------------------------------------------------- the plan


def plan(s: settings_lib.Settings, config: models.ModelConfig, mesh, *,
         chip: Optional[str] = None, margin: float = 0.9, layers: str = "auto",
         log: Callable[[str], None] = lambda _: None) -> dict:
  """The memory plan of settings `s` and model `config` on `mesh` (JSON-able, bytes per device).
  With `chip` (a CHIPS name): mesh.decode_layout "auto" resolved for it, and the search."""
  t0 = time.perf_counter()
  notes = []
  if s.reward_model.enabled:
    s = dataclasses.replace(s, reward_model=dataclasses.replace(s.reward_model, enabled=False))
    notes.append("the reward model's state and programs are not planned")
  dp = sharding.data_parallel_size(mesh)
  target = chip or DEFAULT_CHIP
  layout = resolve_decode_layout(s, config, mesh.shape["tensor"], CHIPS[target] * GIB)
  planner = Planner(mesh, layers, log)
  probe = Probe(s, config, layout)
  setup = planner.setup(probe)
  b = state_bytes(setup)
  r, g = s.rollout, s.grpo
  rows = r.num_prompts * r.num_samples

  mem = {"update": planner.memory(probe, "update", rows)}
  if r.paradigm.objective == "grpo" and (g.loss.beta != 0.0 or g.num_iterations > 1):
    mem["logprobs"] = planner.memory(probe, "logprobs", rows)
  if b["decode_copy"]:
    mem["to_decode"] = planner.memory(probe, "to_decode")
  prompts = sampler_prompts(s, dp)
  top = max(prompts, key=lambda k: kv_tokens(s, k, prompts[k]), default=None)
  for name, n in prompts.items():
    if getattr(setup.programs, name) is None:
      continue
    if name == "sample_train" or name == top:
      mem[name] = planner.sampler_memory(probe, name, n)
    else:
      notes.append(f"{name} ({n} prompts) not compiled: it caches fewer tokens than "
                   f"{top}")
  peaks = phase_peaks(setup, b, mem)
  peak = max(peaks.values())
  out = dict(
      model=dict(name=s.model.hf_checkpoint or s.model.preset, num_layers=config.num_layers,
                 num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(setup.params)),
                 param_dtype=config.param_dtype, dtype=config.dtype, lora_rank=config.lora_rank,
                 remat=config.remat, scan_layers=config.scan_layers),
      mesh=dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape))),
      decode_layout=layout, decode_layout_for=target, margin=margin,
      batch=dict(prompts=r.num_prompts, samples=r.num_samples, rows=rows,
                 micro_batch_size=rows // g.num_microbatches,
                 prompt_length=r.max_prompt_length, completion_length=r.max_completion_length + 1,
                 sampler_prompts={k: v for k, v in prompts.items() if k in mem}),
      state_bytes=b,
      programs={k: dict(dataclasses.asdict(m), peak=m.peak,
                        cpu_upcast_bound=cpu_upcast_bound(setup, k, m.temp))
                for k, m in mem.items()},
      phase_peak_bytes=peaks, peak_bytes=peak, peak_phase=max(peaks, key=peaks.get),
      chips={name: dict(gib=gib, fits=peak <= margin * gib * GIB,
                        headroom_gib=(gib * GIB - peak) / GIB) for name, gib in CHIPS.items()})
  if chip:
    log(f"search: the largest batches that fit {chip} ({margin:.0%} of {CHIPS[chip]:g} GiB)")
    out["search"] = dict(chip=chip, **search(planner, probe, b, margin * CHIPS[chip] * GIB))
  out.update(notes=notes, depth=sorted({m.depth for m in mem.values()}),
             compiles=planner.compiles, compile_s=round(planner.compile_s, 1),
             runtime_s=round(time.perf_counter() - t0, 1))
  return out


# ----------------------------------------------------------------------------- report


def _gib(n: float, width: int = 8) -> str:
  return f"{n / GIB:{width}.2f}"


def _probes(peaks: dict) -> str:
  return ", ".join(f"{k}: {v / GIB:.1f}" for k, v in peaks.items()) + " GiB"


def format_plan(p: dict) -> str:
  """The plan as text (GiB)."""
  m, bt = p["model"], p["batch"]
  lines = [
      f"memory plan: {m['name']} ({m['num_params'] / 1e9:.2f}B params, {m['num_layers']} layers,"
      f" params {m['param_dtype']}, compute {m['dtype']}"
      + (f", LoRA r={m['lora_rank']}" if m["lora_rank"] else "")
      + (f", remat {m['remat']}" if m["remat"] != "none" else "")
      + (", scanned layers" if m.get("scan_layers") else "") + ")",
      f"mesh {p['mesh']}; sampler layout {p['decode_layout']} (mesh.decode_layout resolved for "
      f"{p['decode_layout_for']})",
      f"batch {bt['prompts']} prompts x {bt['samples']} samples = {bt['rows']} rows, micro-batch "
      f"{bt['micro_batch_size']}, prompt {bt['prompt_length']} + completion "
      f"{bt['completion_length']} tokens",
      "", "per device, GiB (2^30 bytes)", "  state (exact: shapes and shardings)"]
  names = dict(params="parameters", optimizer="optimiser state", step="step counter",
               reference="reference copy", gradients="gradients (in the update's temp)",
               policy_copy="policy copy, compute dtype", decode_copy="policy copy, sampler layout")
  for k, v in p["state_bytes"].items():
    if k != "step":
      lines.append(f"    {names[k]:34s}{_gib(v)}")
  lines += ["", "  program        argument   output    alias     temp     peak  phase peak"
            "  (cpu upcast <=)"]
  for k, v in p["programs"].items():
    lines.append(f"    {k:13s}" + "".join(_gib(v[f], 9) for f in
                                           ("argument", "output", "alias", "temp", "peak"))
                 + _gib(p["phase_peak_bytes"][k], 12)
                 + (f"  ({v['cpu_upcast_bound'] / GIB:.2f})" if v["cpu_upcast_bound"] else ""))
  lines += [f"  depth: {'; '.join(p['depth'])}",
            "  phase peak = program peak + what the step holds beside it (state, reference, "
            "policy copies)",
            f"  PEAK {p['peak_bytes'] / GIB:.2f} GiB per device, in {p['peak_phase']}",
            "", f"chips (fits: peak <= {p['margin']:.0%} of memory)"]
  for name, c in p["chips"].items():
    lines.append(f"    {name:5s} {c['gib']:4.0f} GiB  {'fits' if c['fits'] else 'does not fit':12s}"
                 f"  headroom {c['headroom_gib']:7.2f} GiB")
  if "search" in p:
    sr = p["search"]
    mb, pp = sr["micro_batch_size"], sr.get("prompts_per_device")
    lines += ["", f"largest that fit {sr['chip']} ({sr['budget_bytes'] / GIB:.1f} GiB budget):",
              f"    grpo.micro_batch_size = {mb or 'none fits'}"
              f"   (update phase peaks: {_probes(sr['update_peak_bytes'])})"]
    if "sample_peak_bytes" in sr:
      lines.append(
          "    sampling: " + (f"{pp} prompts x {bt['samples']} samples = "
                              f"{sr['sampling_rows_per_device']} rows per device "
                              f"(grpo.num_prompts = {sr['num_prompts']})" if pp else "none fits")
          + f"   (rollout phase peaks per prompts/device: {_probes(sr['sample_peak_bytes'])})")
  for note in p["notes"]:
    lines.append(f"note: {note}")
  lines.append("note: compiled for CPU; bf16 matmuls there keep float32 copies of their weights "
               "('cpu upcast <=': at most that much of a temp a GPU / TPU does not need)")
  lines.append(f"{p['compiles']} compiles ({p['compile_s']} s); plan {p['runtime_s']} s")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def simulate_devices(n: int) -> None:
  """n CPU devices, set before JAX's backends start; fine if they started with >= n."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    if jax.device_count() < n:
      raise app.UsageError(f"JAX started with {jax.device_count()} devices; run the plan in a "
                           f"fresh process for {n}")
    return
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla_flags:
    xla_flags += f" --xla_force_host_platform_device_count={n}"
  # Only LLVM's code generation is left unoptimised: buffer assignment (what memory_analysis
  # reports) is unchanged and a compile takes about half the time.
  if "xla_backend_optimization_level" not in xla_flags:
    xla_flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = xla_flags.strip()
  jax.config.update("jax_platforms", "cpu")


def _define_flags() -> None:
  """Defined when run as a program only (tests import this module beside other launchers)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg]; "
                                  "--config.key=value overrides.", lock_config=True)
  flags.DEFINE_integer("num_devices", 0, "Simulated devices (0: the mesh's product; needed "
                       "when the mesh has a -1 axis).")
  flags.DEFINE_enum("chip", None, list(CHIPS), "Search the largest micro-batch and sampling "
                    f"batch that fit this chip (and resolve decode_layout=auto for it; default "
                    f"{DEFAULT_CHIP}).")
  flags.DEFINE_float("margin", 0.9, "Fits = peak <= margin x the chip's memory.")
  flags.DEFINE_enum("layers", "auto", ["auto", "exact", "extrapolate"],
                    f"exact: compile the full depth; extrapolate: {DEPTHS[0]} and {DEPTHS[1]} "
                    f"layers; auto: exact up to {EXACT_MAX_LAYERS} layers.")
  flags.DEFINE_string("out", "", "Also write the plan here (JSON, bytes).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("--config=FILE[:arg] is required")
  n = f.num_devices
  if not n:
    sizes = (f.config.mesh.data, f.config.mesh.fsdp, f.config.mesh.tensor)
    if min(sizes) < 1:
      raise app.UsageError(f"the mesh {sizes} has a -1 axis: give --num_devices")
    n = math.prod(sizes)
  simulate_devices(n)
  try:
    s = settings_lib.from_config(f.config, n)
    config = model_config(s)
  except (settings_lib.ConfigError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  mesh = sharding.make_mesh(*s.mesh, devices=jax.devices()[:n])
  result = plan(s, config, mesh, chip=f.chip, margin=f.margin, layers=f.layers,
                log=lambda msg: print(msg, file=sys.stderr, flush=True))
  print(format_plan(result), flush=True)
  if f.out:
    with open(f.out, "w") as fh:
      json.dump(result, fh, indent=1)
    print(f"wrote {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
