"""DeepSeekMath's unified paradigm (section 5.2.1) on the offline arithmetic task: one config per
method, each one switch on experiments/configs/arithmetic.py (same data, model, warm start and
step budget; only the data source / gradient coefficient differ, see grpo_jax/paradigms.py).

  python tools/run_paradigms.py --out=workdirs/paradigms     # all six from one shared warm start
  python tools/run_paradigms.py --out=/tmp/p --variant=smoke  # tiny models: a check of the pipeline
  python -m experiments.train --config=experiments/configs/paradigm.py:rft \
      --config.init_from=WARMSTART_WORKDIR --workdir=workdirs/paradigm_rft
  python -m experiments.train --config=experiments/configs/paradigm.py:rft,smoke   # seconds

The argument is the method's name, then arithmetic.py's variants after commas (local, smoke,
lora; none = local):

  sft             continued SFT on the teacher's solutions, coefficient 1
  rft             samples of the frozen warm start, coefficient 1[correct]
  online_rft      samples of the live policy, coefficient 1[correct]
  grpo            GRPO with outcome supervision (the exact-answer reward)
  grpo_process    GRPO with process supervision: step rewards from the task's step verifier
                  (each equation right and consistent with the question: an oracle PRM),
                  normalised over the group's steps and summed over the steps at or after each
                  token (`advantages.process_advantages`). `grpo_process,learned` (or
                  `grpo_process,smoke,learned`) uses a PRM trained on verifier step labels of
                  the policy's samples instead, retrained every 25 steps with 10% replay.
  iterative_grpo  DeepSeekMath Algorithm 1: an ORM (the policy's backbone + a scalar head) is
                  trained on the warm-start policy's samples labelled by the verifier, GRPO then
                  optimises the ORM's probability of "correct" (no rule reward), and every 25
                  steps the ORM continues training on fresh policy samples with 10% replay of
                  historical data and the reference resets to the policy.
"""

import ml_collections

from experiments.configs import arithmetic

PARADIGMS = ("sft", "rft", "online_rft", "grpo", "grpo_process", "iterative_grpo")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  name, *variants = arg.split(",")
  if name not in PARADIGMS:
    raise ValueError(f"paradigm config: unknown method {name!r}; one of {', '.join(PARADIGMS)}, "
                     "then arithmetic.py's variants, e.g. paradigm.py:rft or paradigm.py:rft,smoke")
  learned = "learned" in variants
  if learned and name != "grpo_process":
    raise ValueError(f"paradigm config: 'learned' is a variant of grpo_process only, not {name!r}")
  variants = [v for v in variants if v != "learned"]
  c = arithmetic.get_config(",".join(variants) or "local")

  if name in ("sft", "rft", "online_rft", "grpo"):
    c.grpo.algorithm = name
  elif name == "grpo_process":
    c.grpo.algorithm = "grpo"
    c.grpo.supervision = "process"
    if learned:
      c.grpo.process_reward = "prm"
      c.reward_model.update(enabled=True, kind="prm", weight=0.0)
      if c.reward_model.iteration_steps == 0:
        c.reward_model.iteration_steps = 25
  elif name == "iterative_grpo":
    c.grpo.algorithm = "grpo"
    c.grpo.rewards.exact_answer = 0.0  # the learned ORM is the reward
    c.grpo.loss.beta = 0.04  # a KL to the (periodically reset) reference
    c.reward_model.update(enabled=True, kind="orm", weight=1.0)
    if "smoke" not in variants:  # smoke keeps arithmetic.py's 2-step iterations
      c.reward_model.iteration_steps = 25
  return c
