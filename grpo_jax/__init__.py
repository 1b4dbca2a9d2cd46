"""grpo_jax: Group Relative Policy Optimization (DeepSeekMath) in JAX/Flax."""

__version__ = "0.1.0"
