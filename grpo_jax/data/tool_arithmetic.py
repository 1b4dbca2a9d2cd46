"""Arithmetic too large for a tiny model's head: the offline task of the Python tool.

    Ben packs 437 boxes of 86 cards. Ben finds 25 more. How many cards now?
    with the tool:  ```python\\nprint(437*86+25)\\n```\\n```output\\n37607\\n```\\n#### 37607
    without it:     437*86+25=37607. #### 37607

A three-digit count of boxes times a two-digit box size, plus a one- or two-digit extra: a
2-layer model trained on a few thousand examples cannot multiply like that, but it can copy three
numbers into a program and copy the program's output. The teacher (SFT warm start) uses the tool
with probability `tool_p` per problem and otherwise writes the answer from its head (always the
true answer: the teacher is right, the student cannot imitate it without the tool). GRPO with
`config.tools.env = "python"` then shows whether the policy learns to call the tool more often;
`tool_p = 0` with tools off is the no-tool baseline at the same budget
(experiments/configs/tool_arithmetic.py). Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import random

from grpo_jax.data.arithmetic import ITEMS, NAMES

BOXES = (100, 999)
SIZE = (10, 99)
EXTRA = (1, 99)
TOOL_FORMAT = "```python\nprint({a}*{b}+{c})\n```\n```output\n{answer}\n```\n#### {answer}"
HEAD_FORMAT = "{a}*{b}+{c}={answer}. #### {answer}"


def _problem(rng: random.Random, teacher_rng: random.Random, tool_p: float) -> dict:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  a, b, c = rng.randint(*BOXES), rng.randint(*SIZE), rng.randint(*EXTRA)
  answer = a * b + c
  uses_tool = teacher_rng.random() < tool_p
  solution = (TOOL_FORMAT if uses_tool else HEAD_FORMAT).format(a=a, b=b, c=c, answer=answer)
  return {"question": f"{name} packs {a} boxes of {b} {item}. {name} finds {c} more. "
                      f"How many {item} now?",
          "answer": solution, "solution": solution, "final_answer": str(answer),
          "uses_tool": uses_tool}


def make_splits(num_train: int, num_heldout: int, seed: int, *, tool_p: float = 0.5
                ) -> tuple[list[dict], list[dict]]:
  """(train, heldout): held-out questions are distinct and unseen in train; the held-out
  solutions always use the tool (they are only read for their final answer)."""
  if not 0.0 <= tool_p <= 1.0:
    raise ValueError(f"tool_p must be in [0, 1], got {tool_p}")
  rng = random.Random(f"tool_arithmetic/train/{seed}")
  teacher_rng = random.Random(f"tool_arithmetic/train/teacher/{seed}")
  train = [_problem(rng, teacher_rng, tool_p) for _ in range(num_train)]
  seen = {r["question"] for r in train}
  rng = random.Random(f"tool_arithmetic/heldout/{seed}")
  heldout = []
  while len(heldout) < num_heldout:
    record = _problem(rng, rng, 1.0)
    if record["question"] not in seen:
      seen.add(record["question"])
      heldout.append(record)
  return train, heldout
