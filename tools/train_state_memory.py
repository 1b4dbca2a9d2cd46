"""Memory of the GRPO train state (params, optimiser, reference) per model and precision mode.

  python tools/train_state_memory.py                    # Markdown table
  python tools/train_state_memory.py --json             # the table, then one JSON line per row
  python tools/train_state_memory.py --models qwen2.5-7b --lora_rank 64

No weights are created or read: the shapes and dtypes come from `jax.eval_shape` of
`models.init_params` and of `make_optimizer(OptimConfig()).init` (AdamW: two moments per trained
leaf, in the trained leaf's dtype, plus the step counters and the clip's empty state), so the
numbers follow the code. Runs in seconds on a CPU.

Modes (compute dtype bfloat16 in all three):
  full_f32   full fine-tuning, float32 master weights + float32 Adam; the reference policy
             (beta > 0) is a separate copy in the compute dtype (bfloat16).
  full_bf16  "pure bf16" for comparison: weights and Adam moments in bfloat16, reference bfloat16
             (updates smaller than a bf16 ulp of the weight are lost: not a recommended setting).
  lora       LoRA (rank --lora_rank) on qkv, o, gate_up, down of every layer: the frozen base in
             bfloat16 (it is also the reference: no copy), adapters float32 + float32 Adam.

Per device: one GPU holds the whole state; a TPU v5e-8 shards params, optimiser and reference
over its 8 chips with fsdp (mesh data=1, fsdp=8, tensor=1). Two figures: the ideal total / 8
(`tpu_ideal_per_device_gib`) and the bytes per chip under the repo's own rules
(`sharding.DEFAULT_RULES` via `logical_to_spec`: only "embed" dimensions go to fsdp, so norms,
the qkv bias and some LoRA factors, e.g. down's A [mlp, r] and qkv's B, stay replicated; Adam's
moments follow their params and the step counters are replicated, as `optimizer_shardings`
does). "fits" uses the latter. For full fine-tuning the two differ by < 0.1%; for LoRA the
repo's rules leave most of the adapter state replicated (the large factors, gate_up's B
[r, 2, mlp] and down's A [mlp, r], have no "embed" axis), so a chip holds ~1.2-1.5x the ideal.
"fits" = state <= margin (default 70%) of the device's memory. The state ONLY: it excludes
activations and gradients of the update, the KV cache and the sampler's compute-dtype copy of
the weights, which need the remaining memory: `python -m tools.memory_plan` plans those too,
from the run's compiled programs (per-device bytes here come from its `device_bytes`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from grpo_jax import models, sharding  # noqa: E402
from grpo_jax import train_step as ts  # noqa: E402
from grpo_jax.models import lora  # noqa: E402
from grpo_jax.models.config import LORA_TARGETS, ModelConfig, PRESETS, get_config  # noqa: E402
from grpo_jax.train_step import OptimConfig, make_optimizer  # noqa: E402
from tools.memory_programs import device_bytes, tree_bytes, with_shardings  # noqa: E402

GIB = 2 ** 30
MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
MODES = ("full_f32", "full_bf16", "lora")
COMPUTE_DTYPE = "bfloat16"


def model_config(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown model {name!r}; known: {sorted(PRESETS)}")
  return get_config(name)


def mode_config(config: ModelConfig, mode: str, lora_rank: int = 16) -> ModelConfig:
  """The model config of `mode` (dtypes, LoRA) from a preset's shapes."""
  if mode == "full_f32":
    return config.replace(param_dtype="float32", dtype=COMPUTE_DTYPE, lora_rank=0)
  if mode == "full_bf16":
    return config.replace(param_dtype=COMPUTE_DTYPE, dtype=COMPUTE_DTYPE, lora_rank=0)
  if mode == "lora":  # base stored in the compute dtype; adapters are float32 (blocks._lora)
    return config.replace(param_dtype=COMPUTE_DTYPE, dtype=COMPUTE_DTYPE, lora_rank=lora_rank,
                          lora_targets=LORA_TARGETS)
  raise ValueError(f"Unknown mode {mode!r}; known: {MODES}")


def abstract_state(config: ModelConfig, mode: str, lora_rank: int = 16,
                   optim: OptimConfig | None = None):
  """(params, trained, opt_state, reference) as ShapeDtypeStructs; reference is None when it is
  the frozen base itself (LoRA). `params` is everything stored for the policy (base + adapters)."""
  cfg = mode_config(config, mode, lora_rank)
  params = jax.eval_shape(functools.partial(models.init_params, cfg), jax.random.key(0))
  trained = lora.split(params)[0] if mode == "lora" else params
  opt_state = jax.eval_shape(make_optimizer(optim or OptimConfig()).init, trained)
  reference = None
  if mode != "lora":  # weights.abstract_reference: the params in the compute dtype
    dtype = jnp.dtype(cfg.dtype)
    reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
  return params, trained, opt_state, reference


def tree_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def moments_bytes(opt_state) -> int:
  """Bytes of Adam's mu and nu (the leaves of every ScaleByAdamState's mu/nu)."""
  total = 0
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu") and hasattr(x, "nu")):
    if hasattr(s, "mu"):
      total += tree_bytes(s.mu) + tree_bytes(s.nu)
  return total


def per_chip_bytes(config: ModelConfig, mode: str, lora_rank: int, fsdp: int,
                   state=None) -> dict:
  """Bytes per chip of params, optimiser and reference on a (data=1, fsdp, tensor=1) mesh,
  placed as a run places them (`train_step.state_shardings`; `memory_plan.device_bytes`).
  `state`: `abstract_state(config, mode, lora_rank)` if already computed."""
  cfg = mode_config(config, mode, lora_rank)
  params, trained, opt_state, reference = state or abstract_state(config, mode, lora_rank)
  mesh = AbstractMesh((1, fsdp, 1), sharding.MESH_AXES)
  optimizer = make_optimizer(OptimConfig())
  params_sh = ts.state_shardings(mesh, cfg, optimizer, params).params
  opt_sh = ts.state_shardings(mesh, cfg, optimizer, trained).opt_state
  placed = lambda tree, sh: device_bytes(with_shardings(tree, sh))  # noqa: E731
  return dict(params=placed(params, params_sh), optimizer=placed(opt_state, opt_sh),
              reference=0 if reference is None else placed(reference, params_sh))


def row(name: str, mode: str, lora_rank: int = 16, gpu_gib: float = 80.0,
        tpu_chip_gib: float = 16.0, tpu_chips: int = 8, margin: float = 0.7) -> dict:
  config = model_config(name)
  state = abstract_state(config, mode, lora_rank)
  params, trained, opt_state, reference = state
  b = dict(params=tree_bytes(params), optimizer=tree_bytes(opt_state),
           reference=0 if reference is None else tree_bytes(reference))
  total = sum(b.values())
  chip = per_chip_bytes(config, mode, lora_rank, tpu_chips, state)
  gpu, tpu = total, sum(chip.values())
  return dict(
      model=name, mode=mode, lora_rank=lora_rank if mode == "lora" else 0,
      num_params=tree_count(params), num_trained=tree_count(trained),
      params_bytes=b["params"], optimizer_bytes=b["optimizer"],
      adam_moments_bytes=moments_bytes(opt_state), reference_bytes=b["reference"],
      total_bytes=total,
      params_gib=b["params"] / GIB, optimizer_gib=b["optimizer"] / GIB,
      reference_gib=b["reference"] / GIB, total_gib=total / GIB,
      gpu_per_device_gib=gpu / GIB, gpu_fits=gpu <= margin * gpu_gib * GIB,
      tpu_per_device_gib=tpu / GIB, tpu_fits=tpu <= margin * tpu_chip_gib * GIB,
      tpu_ideal_per_device_gib=total / tpu_chips / GIB,
      tpu_per_device_bytes={k: int(v) for k, v in chip.items()},
      margin=margin, gpu_gib=gpu_gib, tpu_chip_gib=tpu_chip_gib, tpu_chips=tpu_chips)


def markdown(rows: list[dict]) -> str:
  r0 = rows[0]
  gpu = f"1 GPU {r0['gpu_gib']:g} GiB"
  n = r0["tpu_chips"]
  tpu = f"v5e-{n} /chip ({r0['tpu_chip_gib']:g} GiB), repo fsdp rules"
  head = ["model", "mode", "params (M)", "trained (M)", "params GiB", "optimiser GiB",
          "reference GiB", "total GiB", f"{gpu}", "fits", f"v5e-{n} ideal total/{n}", tpu, "fits"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    mode = r["mode"] + (f" r={r['lora_rank']}" if r["mode"] == "lora" else "")
    cells = [r["model"], mode, f"{r['num_params'] / 1e6:,.1f}", f"{r['num_trained'] / 1e6:,.1f}",
             f"{r['params_gib']:.2f}", f"{r['optimizer_gib']:.2f}", f"{r['reference_gib']:.2f}",
             f"{r['total_gib']:.2f}", f"{r['gpu_per_device_gib']:.2f}",
             "yes" if r["gpu_fits"] else "no", f"{r['tpu_ideal_per_device_gib']:.2f}",
             f"{r['tpu_per_device_gib']:.2f}",
             "yes" if r["tpu_fits"] else "no"]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"State only (params + optimiser + reference); fits = state <= "
               f"{r0['margin']:.0%} of device memory. Excludes activations, gradients, the KV "
               "cache and the sampler's compute-dtype copy of the weights. GiB = 2^30 bytes. "
               "The fsdp column shards only 'embed' dimensions (sharding.DEFAULT_RULES); the "
               "rest (norms, biases, LoRA factors without an embed axis) is replicated.")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="+", default=list(MODELS))
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--gpu_gib", type=float, default=80.0, help="memory of the one GPU")
  p.add_argument("--tpu_chip_gib", type=float, default=16.0, help="HBM per TPU chip (v5e: 16)")
  p.add_argument("--tpu_chips", type=int, default=8, help="chips the state is sharded over")
  p.add_argument("--margin", type=float, default=0.7, help="fits if state <= margin * memory")
  p.add_argument("--json", action="store_true", help="also print one JSON line per row")
  args = p.parse_args(argv)
  rows = [row(m, mode, args.lora_rank, args.gpu_gib, args.tpu_chip_gib, args.tpu_chips,
              args.margin) for m in args.models for mode in args.modes]
  print(markdown(rows))
  if args.json:
    for r in rows:
      print(json.dumps(r))


if __name__ == "__main__":
  main()
