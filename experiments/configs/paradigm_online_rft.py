"""Unified paradigm (DeepSeekMath 5.2.1): `online_rft` on the offline arithmetic task.

  python tools/run_paradigms.py            # all paradigms from one shared warm start, one figure
  python -m experiments.train --config=experiments/configs/paradigm_online_rft.py \
      --config.init_from=WARMSTART_WORKDIR --workdir=/tmp/paradigm_online_rft

Same data, model, warm start and step budget as the other paradigm_*.py configs; only the data
source / gradient coefficient differ (see grpo_jax/paradigms.py).
"""

from experiments.configs import arithmetic


def get_config(arg: str = "local"):
  c = arithmetic.get_config(arg)
  c.grpo.algorithm = "online_rft"
  return c
