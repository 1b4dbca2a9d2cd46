"""The unified paradigm of DeepSeekMath (section 5.2.1) as one table.

Every method is (data source, gradient coefficient, objective), all starting from the same warm
start and run for the same number of steps:

  algorithm   supervision  data source                    gradient coefficient     objective
  sft         outcome      teacher solutions              1                        NLL
  rft         outcome      samples of the frozen warm start 1[correct]             NLL
  online_rft  outcome      samples of the live policy     1[correct]               NLL
  grpo        outcome      samples of the live policy     (r - mean) / std         clipped ratio
  grpo        process      samples of the live policy     sum of later step adv.   clipped ratio
  distill     outcome      samples of the live policy     log pi_T - log pi_S      clipped ratio
                                                          per token (distill.py)

"NLL" is the advantage-weighted negative log-likelihood, averaged per sequence (eq. 5 of the
paper, `losses.sft_loss_terms`); "clipped ratio" is the GRPO loss with the KL inside
(`losses.grpo_loss_terms`). The rollout reads `data` and `coefficient`, the update reads
`objective`; nothing else branches on the algorithm.
"""

from __future__ import annotations

from typing import NamedTuple


class Paradigm(NamedTuple):
  data: str         # "teacher" | "policy" | "frozen_policy" (kept in the reference slot)
  coefficient: str  # "one" | "correct" | "group" | "process" | "teacher"
  objective: str    # "nll" | "grpo"


TABLE = {
    ("sft", "outcome"): Paradigm("teacher", "one", "nll"),
    ("rft", "outcome"): Paradigm("frozen_policy", "correct", "nll"),
    ("online_rft", "outcome"): Paradigm("policy", "correct", "nll"),
    ("grpo", "outcome"): Paradigm("policy", "group", "grpo"),
    ("grpo", "process"): Paradigm("policy", "process", "grpo"),
    ("distill", "outcome"): Paradigm("policy", "teacher", "grpo"),
}


def lookup(algorithm: str, supervision: str) -> Paradigm:
  """The table's row; ValueError listing the known combinations otherwise."""
  try:
    return TABLE[(algorithm, supervision)]
  except KeyError:
    known = ", ".join(f"{a}/{s}" for a, s in TABLE)
    raise ValueError(f"unknown combination {algorithm!r} / {supervision!r}; known: "
                     f"{known}") from None
