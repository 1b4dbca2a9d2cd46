"""LoRA export for the Hugging Face ecosystem: a PEFT adapter directory, or a merged checkpoint.

    save_peft_adapter("/tmp/adapter", config, params, base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    # transformers + peft:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
    #                                                 "/tmp/adapter")   (vLLM's LoRARequest too)
    save_merged_hf("/tmp/merged", config, params)   # a plain checkpoint, W + (alpha / r) A @ B

The adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (float32) with
PEFT's saved key format (the adapter name "default" stripped):

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

PEFT's update is (lora_alpha / r) * lora_B @ lora_A on an HF [out, in] weight, ours
(lora_alpha / r) * A @ B on our [in..., out...] weight, so lora_A is A with its input axes
flattened in HF's input order, transposed, and lora_B is B with its output axes flattened in HF's
output order, transposed. The orders are those of `hf_checkpoint._to_hf` (which this mirrors
tensor by tensor; tests/test_lora_export.py pins the two together):

    qkv A [E, r], B [r, K, G+2, D] -> q/k/v_proj share lora_A = A^T [r, E];
        lora_B = B's q (the G query heads of each KV head, head k*G+g), k and v slices [out, r]
    o A [H, D, r] -> lora_A [r, H*D]; B [r, E] -> lora_B [E, r]
    gate_up A [E, r], B [r, 2, M] -> gate/up_proj share lora_A = A^T; lora_B = B[:, 0|1]^T
    down A [M, r] -> lora_A [r, M]; B [r, E] -> lora_B [E, r]

The fused qkv and gate_up adapters become three (two) PEFT adapters sharing one lora_A: their
sum of ranks is not lower, just the same update written per projection.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from grpo_jax.models import lora
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.hf_checkpoint import save_hf_checkpoint
from grpo_jax.models.layer_stack import to_layout

# Our LoRA target -> the HF modules (in `target_modules` order) it covers.
HF_MODULES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
              "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_PARENT = {"qkv": "self_attn", "o": "self_attn", "gate_up": "mlp", "down": "mlp"}
_PREFIX = "base_model.model.model.layers."


def _require_lora(config: ModelConfig, params, what: str) -> None:
  if not config.lora_rank:
    raise ValueError(f"{what}: config.lora_rank=0, the params have no LoRA adapters to export "
                     "(use save_hf_checkpoint for a plain model)")
  r, params = config.lora_rank, to_layout(params, False)
  for layer, module, target in lora.adapter_targets(config):
    leaves = params.get(layer, {}).get(module, {})
    for suffix in ("_lora_a", "_lora_b"):
      name = f"{layer}/{module}/{target}{suffix}"
      if target + suffix not in leaves:
        raise ValueError(f"{what}: params lack the adapter leaf {name} that config "
                         f"(lora_rank={r}, lora_targets={config.lora_targets}) implies")
      shape = np.shape(leaves[target + suffix])
      if (shape[-1] if suffix == "_lora_a" else shape[0]) != r:
        raise ValueError(f"{what}: adapter {name} has shape {shape}, not rank {r}")


def _hf_adapters(config: ModelConfig, target: str, a: np.ndarray, b: np.ndarray
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """HF module name -> (lora_A [r, in], lora_B [out, r]) of one of our adapters."""
  c = config
  H, K, G, D = c.num_heads, c.num_kv_heads, c.num_groups, c.head_dim
  r = c.lora_rank
  if target == "qkv":  # as _to_hf: qkv.transpose(1, 2, 3, 0) [K, G+2, D, in], then slices
    b_kcdr = b.transpose(1, 2, 3, 0)
    return {"q_proj": (a.T, b_kcdr[:, :G].reshape(H * D, r)),
            "k_proj": (a.T, b_kcdr[:, G].reshape(K * D, r)),
            "v_proj": (a.T, b_kcdr[:, G + 1].reshape(K * D, r))}
  if target == "o":  # as _to_hf: o.reshape(H * D, E).T
    return {"o_proj": (a.reshape(H * D, r).T, b.T)}
  if target == "gate_up":  # as _to_hf: gate_up[:, 0|1].T
    return {"gate_proj": (a.T, b[:, 0].T), "up_proj": (a.T, b[:, 1].T)}
  if target == "down":  # as _to_hf: down.T
    return {"down_proj": (a.T, b.T)}
  raise ValueError(f"unknown LoRA target {target!r}")


def peft_tensors(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """PEFT tensor name -> float32 array of every adapter in `params` (see the module docstring)."""
  _require_lora(config, params, "peft_tensors")
  params = to_layout(params, False)  # stacked layers: sliced per layer
  get = lambda x: np.asarray(jax.device_get(x), dtype=np.float32)
  out = {}
  for layer, module, target in lora.adapter_targets(config):
    i = int(layer.removeprefix("layers_"))
    leaves = params[layer][module]
    a, b = get(leaves[f"{target}_lora_a"]), get(leaves[f"{target}_lora_b"])
    for name, (lora_a, lora_b) in _hf_adapters(config, target, a, b).items():
      key = f"{_PREFIX}{i}.{_PARENT[target]}.{name}"
      out[f"{key}.lora_A.weight"] = np.ascontiguousarray(lora_a)
      out[f"{key}.lora_B.weight"] = np.ascontiguousarray(lora_b)
  return out


def peft_config(config: ModelConfig, base_model_name_or_path: str = "") -> dict:
  """adapter_config.json of `config`'s adapters (a PEFT LoraConfig for a causal LM)."""
  alpha = config.lora_alpha
  return dict(
      peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
      r=config.lora_rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
      target_modules=[m for t in config.lora_targets for m in HF_MODULES[t]],
      lora_dropout=0.0, bias="none", use_rslora=False, fan_in_fan_out=False, use_dora=False,
      modules_to_save=None, init_lora_weights=True, inference_mode=True)


def save_peft_adapter(path: str, config: ModelConfig, params, *,
                      base_model_name_or_path: str = "") -> None:
  """Writes adapter_config.json and adapter_model.safetensors (float32) that
  `peft.PeftModel.from_pretrained(model, path)` loads onto the transformers model of
  `save_hf_checkpoint(..., lora.base_config(config), base)` (or the original HF base model).

  `params` is the combined tree (`lora.combine(base, adapters)`); only its adapters are written.
  Raises ValueError when config.lora_rank is 0 or an adapter leaf is missing."""
  tensors = peft_tensors(config, params)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(peft_config(config, base_model_name_or_path), f, indent=2)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def save_merged_hf(path: str, config: ModelConfig, params) -> None:
  """A plain HF checkpoint (base config, W + (alpha / r) A @ B in W's dtype) of LoRA params."""
  _require_lora(config, params, "save_merged_hf")
  merged, base = lora.merge(params, config)
  save_hf_checkpoint(path, base, merged)
