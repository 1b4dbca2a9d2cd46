"""Unified paradigm (DeepSeekMath 5.2.1): iterative GRPO with a learned outcome reward model.

  python tools/run_paradigms.py            # all paradigms from one shared warm start, one figure

DeepSeekMath Algorithm 1 on the arithmetic task: an ORM (the policy's backbone + a scalar head)
is trained on the warm-start policy's samples labelled by the verifier, GRPO then optimises the
ORM's probability of "correct" (no rule reward), and every 25 steps the ORM continues training
on fresh policy samples with 10% replay of historical data and the reference resets to the
policy.
"""

from experiments.configs import arithmetic


def get_config(arg: str = "local"):
  c = arithmetic.get_config(arg)
  c.grpo.algorithm = "grpo"
  c.grpo.rewards.exact_answer = 0.0  # the learned ORM is the reward
  c.grpo.loss.beta = 0.04  # a KL to the (periodically reset) reference
  c.reward_model.update(enabled=True, kind="orm", weight=1.0)
  if arg != "smoke":
    c.reward_model.iteration_steps = 25
  return c
