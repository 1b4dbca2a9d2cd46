"""Launch a GRPO experiment: `python -m experiments.train [--config=FILE[:arg]] [--workdir=DIR]`.

With no flags it runs the offline default (experiments/configs/arithmetic.py) in a fresh
directory under ./workdirs/ that it prints. `--config.key=value` overrides any config field.
Multi-host (TPU pod slice, multi-GPU cluster): add `--config.distributed.enabled=True` and run the
same command on every host (TPU and SLURM/Open MPI clusters auto-detect the coordinator).
"""

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "arithmetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Config, metrics, checkpoints and samples go here "
                               "(an existing workdir resumes). Default: ./workdirs/<timestamp>.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  if cfg.distributed.enabled:
    from grpo_jax import sharding
    sharding.initialize_distributed(cfg.distributed.coordinator_address or None,
                                    cfg.distributed.num_processes or None,
                                    None if cfg.distributed.process_id < 0
                                    else cfg.distributed.process_id)
  from grpo_jax import preemption, settings, trainer
  workdir = _WORKDIR.value or os.path.join("workdirs", time.strftime("%Y%m%d-%H%M%S"))
  logging.info("workdir: %s", os.path.abspath(workdir))
  print(f"workdir: {os.path.abspath(workdir)}", flush=True)
  try:
    final = trainer.train(cfg, workdir)
  except settings.ConfigError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except preemption.Preempted as e:  # SIGTERM / SIGINT: stopped cleanly, resumable
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_PREEMPTED)
  print("final eval: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())), flush=True)
  print(f"metrics: {os.path.join(os.path.abspath(workdir), 'metrics.jsonl')}", flush=True)


def _parse_flags(argv):
  """absl flag parsing, with a one-line error (not a traceback) for a bad config flag."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    print(f"error: bad flag or config override: {e}\n(see --help and the config file's fields)",
          file=sys.stderr)
    sys.exit(2)


class _QuietLibraries:
  """Drops INFO chatter of orbax (every save logs a dozen lines); warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "orbax" not in record.pathname


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main, flags_parser=_parse_flags)
