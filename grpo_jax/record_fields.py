"""Which source columns hold a record's question, solution and final answer: `FieldMap`.

The settings read it from config.data.fields (`settings.DataSettings.fields`); grpo_jax/data/
records.py maps source rows with it. No imports, so the data modules stay light.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Which source columns hold the question, the solution and the final answer."""
  question: str = "question"
  answer: str = "answer"          # the worked solution ("solution" role); "" = none in the data
  final_answer: str = "answer"
  marker: str = "####"            # final answer = text after the last marker ("" = whole value)
  cleanup: str = ""               # regex removed from the solution (GSM8K calculator notes)
