"""Unified paradigm (DeepSeekMath 5.2.1): `sft` on the offline arithmetic task.

  python tools/run_paradigms.py            # all paradigms from one shared warm start, one figure
  python -m experiments.train --config=experiments/configs/paradigm_sft.py \
      --config.init_from=WARMSTART_WORKDIR --workdir=/tmp/paradigm_sft

Same data, model, warm start and step budget as the other paradigm_*.py configs; only the data
source / gradient coefficient differ (see grpo_jax/paradigms.py).
"""

from experiments.configs import arithmetic


def get_config(arg: str = "local"):
  c = arithmetic.get_config(arg)
  c.grpo.algorithm = "sft"
  return c
