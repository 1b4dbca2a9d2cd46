"""Unified paradigm (DeepSeekMath 5.2.1): GRPO with process supervision on the arithmetic task.

  python tools/run_paradigms.py            # all paradigms from one shared warm start, one figure

Step rewards come from the task's step verifier (each equation right and consistent with the
question: an oracle PRM), normalised over the group's steps and summed over the steps at or
after each token (`advantages.process_advantages`). `:learned` uses a PRM trained on verifier
step labels of the policy's samples instead, retrained every 25 steps with 10% replay.
"""

from experiments.configs import arithmetic


def get_config(arg: str = "local"):
  learned = arg.endswith("learned")
  c = arithmetic.get_config(arg.replace(",learned", "").replace("learned", "") or "local")
  c.grpo.algorithm = "grpo"
  c.grpo.supervision = "process"
  if learned:
    c.grpo.process_reward = "prm"
    c.reward_model.update(enabled=True, kind="prm", weight=0.0)
    if c.reward_model.iteration_steps == 0:
      c.reward_model.iteration_steps = 25
  return c
