"""The offline task: procedurally generated multi-step arithmetic word problems, GSM8K-style.

    Ann has 19 pens. Ann finds 4 more. Ann sells 3 boxes of 3. Ann loses 1. How many pens now?
    target: 19+4=23. 23-3*3=14. 14-1=13. #### 13

A start amount in [5, 20], then 2 or 3 steps among six verbs: "buys k bags of m" (+k*m), "sells k
boxes of m" (-k*m) with k, m in 2..3; "finds n more" (+n), "gets n from a friend" (+n), "gives
away n" (-n), "loses n" (-n) with n in 1..5. Amounts never go negative.

A *flawed teacher* (for the supervised warm start) writes, with probability `flaw_p` per step,
the wrong sign for "loses" and "sells"; its arithmetic is otherwise right. `final_answer` is
always the true answer: rewards and evaluation use the truth, only the SFT target is flawed.
Problems and teacher flaws come from separate random streams, so the questions for a seed do not
depend on `flaw_p`. Everything is a deterministic function of the seed (Python's `random.Random`
with a string seed, stable across platforms and versions).
"""

from __future__ import annotations

import dataclasses
import random

NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal")
ITEMS = ("pens", "cards", "eggs", "coins", "books", "shells", "stamps", "apples")
VERBS = ("buys", "sells", "finds", "gets", "gives", "loses")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Ranges of the generator (inclusive bounds)."""

  start_range: tuple[int, int] = (5, 20)
  steps_range: tuple[int, int] = (2, 3)
  count_range: tuple[int, int] = (2, 3)  # k and m of "buys/sells k bags/boxes of m"
  amount_range: tuple[int, int] = (1, 5)  # n of "finds/gets/gives/loses n"
  flawed_verbs: tuple[str, ...] = ("loses", "sells")


@dataclasses.dataclass(frozen=True)
class Step:
  verb: str
  k: int  # multiplier (1 for the single-amount verbs)
  n: int  # amount per unit

  @property
  def sign(self) -> int:
    return -1 if self.verb in ("sells", "gives", "loses") else 1

  def phrase(self, name: str) -> str:
    return {
        "buys": f"{name} buys {self.k} bags of {self.n}.",
        "sells": f"{name} sells {self.k} boxes of {self.n}.",
        "finds": f"{name} finds {self.n} more.",
        "gets": f"{name} gets {self.n} from a friend.",
        "gives": f"{name} gives away {self.n}.",
        "loses": f"{name} loses {self.n}.",
    }[self.verb]

  def equation(self, amount: int, sign: int) -> tuple[str, int]:
    """`"a+k*n=b."` (or `a+n=b.`) with the given sign; returns the text and b."""
    operand = f"{self.k}*{self.n}" if self.verb in ("buys", "sells") else f"{self.n}"
    result = amount + sign * self.k * self.n
    return f"{amount}{'+' if sign > 0 else '-'}{operand}={result}.", result


def _draw_steps(rng: random.Random, start: int, config: ArithmeticConfig) -> list[Step]:
  steps, amount = [], start
  for _ in range(rng.randint(*config.steps_range)):
    while True:  # rejection keeps every verb's distribution simple; amounts never go negative
      verb = rng.choice(VERBS)
      if verb in ("buys", "sells"):
        step = Step(verb, rng.randint(*config.count_range), rng.randint(*config.count_range))
      else:
        step = Step(verb, 1, rng.randint(*config.amount_range))
      if amount + step.sign * step.k * step.n >= 0:
        break
    steps.append(step)
    amount += step.sign * step.k * step.n
  return steps


def _solution(start: int, steps: list[Step], signs: list[int]) -> tuple[str, int]:
  parts, amount = [], start
  for step, sign in zip(steps, signs):
    text, amount = step.equation(amount, sign)
    parts.append(text)
  return " ".join(parts) + f" #### {amount}", amount


def _problem(rng: random.Random, teacher_rng: random.Random, config: ArithmeticConfig,
             flaw_p: float) -> dict:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  start = rng.randint(*config.start_range)
  steps = _draw_steps(rng, start, config)
  question = " ".join([f"{name} has {start} {item}."] + [s.phrase(name) for s in steps]
                      + [f"How many {item} now?"])
  true_signs = [s.sign for s in steps]
  _, truth = _solution(start, steps, true_signs)
  # One teacher draw per flawed-verb step whatever flaw_p is, so streams stay aligned across p.
  teacher_signs = [
      -s.sign if s.verb in config.flawed_verbs and teacher_rng.random() < flaw_p else s.sign
      for s in steps
  ]
  answer, teacher_final = _solution(start, steps, teacher_signs)
  return {
      "question": question,
      "answer": answer,
      "final_answer": str(truth),
      "teacher_correct": teacher_final == truth,
      "has_flawed_verb": any(s.verb in config.flawed_verbs for s in steps),
      "num_flawed_steps": sum(t != s for t, s in zip(teacher_signs, true_signs)),
  }


def _check(config: ArithmeticConfig, flaw_p: float) -> None:
  if not 0.0 <= flaw_p <= 1.0:
    raise ValueError(f"flaw_p must be in [0, 1], got {flaw_p}")
  for field in ("start_range", "steps_range", "count_range", "amount_range"):
    lo, hi = getattr(config, field)
    if not 0 <= lo <= hi or (field != "start_range" and lo < 1):
      raise ValueError(f"ArithmeticConfig.{field}={lo, hi} is not a valid range")
  unknown = set(config.flawed_verbs) - set(VERBS)
  if unknown:
    raise ValueError(f"unknown flawed_verbs {sorted(unknown)}; verbs are {VERBS}")


def generate(num: int, seed: int, *, flaw_p: float = 0.0, split: str = "train",
             config: ArithmeticConfig = ArithmeticConfig()) -> list[dict]:
  """`num` problems, a deterministic function of (seed, split, config); flaws also of flaw_p.

  Records: `question`, `answer` (the teacher's worked solution), `final_answer` (true answer as a
  string), `teacher_correct`, `has_flawed_verb`, `num_flawed_steps`.
  """
  _check(config, flaw_p)
  rng = random.Random(f"arithmetic/{split}/{seed}")
  teacher_rng = random.Random(f"arithmetic/{split}/teacher/{seed}")
  return [_problem(rng, teacher_rng, config, flaw_p) for _ in range(num)]


def make_splits(num_train: int, num_heldout: int, seed: int, *, flaw_p: float = 0.0,
                config: ArithmeticConfig = ArithmeticConfig()) -> tuple[list[dict], list[dict]]:
  """(train, heldout). Held-out problems come from a separate stream, always with true solutions;
  any held-out question equal to a train question (or an earlier held-out one) is dropped and
  replaced, so the split has exactly `num_heldout` distinct questions unseen in train."""
  train = generate(num_train, seed, flaw_p=flaw_p, split="train", config=config)
  seen = {r["question"] for r in train}
  rng = random.Random(f"arithmetic/heldout/{seed}")
  teacher_rng = random.Random(f"arithmetic/heldout/teacher/{seed}")
  heldout = []
  for _ in range(10 * num_heldout + 1000):  # bounded: a too-small space fails
    if len(heldout) == num_heldout:
      break
    record = _problem(rng, teacher_rng, config, 0.0)
    if record["question"] not in seen:
      seen.add(record["question"])
      heldout.append(record)
  else:
    if len(heldout) < num_heldout:
      raise ValueError(f"could only find {len(heldout)} held-out problems unseen in train; "
                       "the problem space is too small for the requested sizes")
  return train, heldout
