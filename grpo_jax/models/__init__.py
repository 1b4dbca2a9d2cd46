"""Decoder models (Qwen2/2.5, Qwen3, Llama 3.x, Gemma 3 text) and Hugging Face checkpoints."""

from grpo_jax.models.attention import (KVCache, attend, attention_logits, init_cache,
                                       rope_tables)
from grpo_jax.models.config import ModelConfig, PRESETS, get_config
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
    "KVCache", "ModelConfig", "PRESETS", "attend", "attention_logits", "compute_logits",
    "forward", "get_config", "init_cache", "init_params", "load_hf_checkpoint", "param_logical_axes",
    "rope_tables", "save_hf_checkpoint", "save_merged_hf", "save_peft_adapter", "unembed",
]
