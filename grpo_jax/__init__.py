"""grpo_jax: Group Relative Policy Optimization (DeepSeekMath) in JAX/Flax.

    import grpo_jax
    from grpo_jax import defaults
    grpo_jax.train(defaults.config(), "/tmp/run", reward_fns={"probe": my_reward})
"""

__version__ = "0.1.0"


def train(config, workdir: str, *, reward_fns=None, env=None) -> dict:
  """Runs (or resumes) an experiment: `grpo_jax.trainer.train` (imported on first use, so that
  `import grpo_jax` stays light). `reward_fns`: {name: fn(completions=..., prompts=...,
  **columns)}; weights in config.grpo.rewards.<name> (1.0 if absent). Returns the last eval."""
  from grpo_jax import trainer  # pylint: disable=import-outside-toplevel
  return trainer.train(config, workdir, reward_fns=reward_fns, env=env)
