"""Decoder models (Qwen2/2.5, Qwen3, Llama 3.x, Gemma 3 text) and Hugging Face checkpoints."""

from grpo_jax.models.attention import (KVCache, attend, attention_logits, init_cache,
                                       per_layer, rope_tables)
from grpo_jax.models.config import REMAT_POLICIES, ModelConfig, PRESETS, get_config
from grpo_jax.models.layer_stack import layout_of, to_layout
from grpo_jax.models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from grpo_jax.models.peft_export import save_merged_hf, save_peft_adapter
from grpo_jax.models.transformer import (
    compute_logits,
    forward,
    init_params,
    param_logical_axes,
    unembed,
)

__all__ = [
    "KVCache", "ModelConfig", "PRESETS", "REMAT_POLICIES", "attend", "attention_logits",
    "compute_logits", "forward", "get_config", "init_cache", "init_params", "layout_of",
    "load_hf_checkpoint", "param_logical_axes", "per_layer", "rope_tables", "save_hf_checkpoint",
    "save_merged_hf", "save_peft_adapter", "to_layout", "unembed",
]
