"""DeepSeekMath's claims at small scale: the "multistep" arithmetic task, on which the SFT warm
start is far from solved, so RFT, Online RFT and GRPO separate (docs/RESULTS.md).

  python -m experiments.train --config=experiments/configs/multistep.py
  python -m tools.reproduce --claim=paradigms --seeds=0,1,2        # every run of a claim

Problems of 3-4 steps (grpo_jax/data/arithmetic.py, MULTISTEP); the SFT teacher errs on 75% of
the steps of two verbs, each its own way: "loses" with the wrong sign, "sells k boxes of n" as n.
The warm start learns those errors: greedy accuracy 26.6%, pass@8 69.7% (seed 0, 500 / 300
held-out problems). The rest is the offline default's recipe (2-layer model,
its own tokenizer), with a completion budget for the longer chains.

Variants (`:arg`, comma-separated): those of arithmetic.py ("smoke": seconds, for tests).
"""

import ml_collections

from experiments.configs import arithmetic


def get_config(arg: str = "local") -> ml_collections.ConfigDict:
  c = arithmetic.get_config(arg)
  c.data.task, c.data.flaw_p = "multistep", 0.75
  if "smoke" not in arg.split(","):
    c.grpo.max_completion_length = 56
  return c
