"""The offline task: procedurally generated multi-step arithmetic word problems, GSM8K-style.

    Ann has 19 pens. Ann finds 4 more. Ann sells 3 boxes of 3. Ann loses 1. How many pens now?
    target: 19+4=23. 23-3*3=14. 14-1=13. #### 13

A start amount in [5, 20], then 2 or 3 steps among six verbs: "buys k bags of m" (+k*m), "sells k
boxes of m" (-k*m) with k, m in 2..3; "finds n more" (+n), "gets n from a friend" (+n), "gives
away n" (-n), "loses n" (-n) with n in 1..5. Amounts never go negative.

A *flawed teacher* (for the supervised warm start) writes, with probability `flaw_p` per step,
the wrong sign for "loses" and "sells"; its arithmetic is otherwise right. `MULTISTEP` (the
"multistep" task) has longer chains and a kind of teacher error per flawed verb: "sign" (the
opposite sign) for "loses", "units" ("k boxes of n" counted as n) for "sells": the warm start is
then far from solved, so methods separate (docs/RESULTS.md). `final_answer` is
always the true answer: rewards and evaluation use the truth, only the SFT target is flawed.
Problems and teacher flaws come from separate random streams, so the questions for a seed do not
depend on `flaw_p`. Everything is a deterministic function of the seed (Python's `random.Random`
with a string seed, stable across platforms and versions).

The task's grammar is written once, in `OPENING` and `PHRASES`: the generator fills the templates
and `parse_question` matches regexes built from them, so the reader cannot drift from the writer.
`step_labels` is the process verifier (one 0/1 label per step of a completion) that a PRM is
trained on and `grpo.process_reward = "verifier"` uses.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import random
import re
from collections.abc import Mapping
from typing import Any

from grpo_jax.rewards.steps import split_steps

NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal")
ITEMS = ("pens", "cards", "eggs", "coins", "books", "shells", "stamps", "apples")

# The question's grammar. A question is f"{name} {OPENING}." + one f"{name} {phrase}." per step
# + f"How many {item} now?". A phrase with {k} changes the amount by sign * k * n, else sign * n.
OPENING = "has {start} {item}"
PHRASES = {  # verb -> (phrase template, sign)
    "buys": ("buys {k} bags of {n}", +1),
    "sells": ("sells {k} boxes of {n}", -1),
    "finds": ("finds {n} more", +1),
    "gets": ("gets {n} from a friend", +1),
    "gives": ("gives away {n}", -1),
    "loses": ("loses {n}", -1),
}
VERBS = tuple(PHRASES)  # the generator draws from this order: changing it changes every dataset


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Ranges of the generator (inclusive bounds)."""

  start_range: tuple[int, int] = (5, 20)
  steps_range: tuple[int, int] = (2, 3)
  count_range: tuple[int, int] = (2, 3)  # k and m of "buys/sells k bags/boxes of m"
  amount_range: tuple[int, int] = (1, 5)  # n of "finds/gets/gives/loses n"
  flawed_verbs: tuple[str, ...] = ("loses", "sells")
  # the teacher's error on each flawed verb's flawed steps (FLAW_MODES); () = all "sign"
  flaw_modes: tuple[str, ...] = ()

  def mode(self, verb: str) -> str:
    return dict(zip(self.flawed_verbs, self.flaw_modes)).get(verb, "sign")


FLAW_MODES = ("sign", "units")
# Longer chains, two error modes: with flaw_p = 0.75 (experiments/configs/multistep.py) the warm
# start solves greedily about the 26% of problems without a flawed verb, ~70% in 8 samples.
MULTISTEP = ArithmeticConfig(steps_range=(3, 4), flawed_verbs=("loses", "sells"),
                             flaw_modes=("sign", "units"))


def _multiplied(verb: str) -> bool:
  """Whether the verb's phrase counts k units of n ("buys k bags of n") rather than n."""
  return "{k}" in PHRASES[verb][0]


@dataclasses.dataclass(frozen=True)
class Step:
  verb: str
  k: int  # multiplier (1 for the single-amount verbs)
  n: int  # amount per unit

  @property
  def sign(self) -> int:
    return PHRASES[self.verb][1]

  def phrase(self, name: str) -> str:
    return f"{name} {PHRASES[self.verb][0].format(k=self.k, n=self.n)}."

  def equation(self, amount: int, flaw: str = "") -> tuple[str, int]:
    """`"a+k*n=b."` (or `a+n=b.`), with the teacher's `flaw` if any (FLAW_MODES: the sign
    flipped, or the multiplier k dropped); returns the text and b."""
    sign, k = (-self.sign if flaw == "sign" else self.sign), (1 if flaw == "units" else self.k)
    operand = f"{k}*{self.n}" if _multiplied(self.verb) and k > 1 else f"{self.n}"
    result = amount + sign * k * self.n
    return f"{amount}{'+' if sign > 0 else '-'}{operand}={result}.", result


def _draw_steps(rng: random.Random, start: int, config: ArithmeticConfig) -> list[Step]:
  steps, amount = [], start
  for _ in range(rng.randint(*config.steps_range)):
    while True:  # rejection keeps every verb's distribution simple; amounts never go negative
      verb = rng.choice(VERBS)
      if _multiplied(verb):
        step = Step(verb, rng.randint(*config.count_range), rng.randint(*config.count_range))
      else:
        step = Step(verb, 1, rng.randint(*config.amount_range))
      if amount + step.sign * step.k * step.n >= 0:
        break
    steps.append(step)
    amount += step.sign * step.k * step.n
  return steps


def _solution(start: int, steps: list[Step], flaws: list[str]) -> tuple[str, int]:
  parts, amount = [], start
  for step, flaw in zip(steps, flaws):
    text, amount = step.equation(amount, flaw)
    parts.append(text)
  return " ".join(parts) + f" #### {amount}", amount


def _problem(rng: random.Random, teacher_rng: random.Random, config: ArithmeticConfig,
             flaw_p: float) -> dict:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  start = rng.randint(*config.start_range)
  steps = _draw_steps(rng, start, config)
  question = " ".join([f"{name} {OPENING.format(start=start, item=item)}."]
                      + [s.phrase(name) for s in steps]
                      + [f"How many {item} now?"])
  _, truth = _solution(start, steps, [""] * len(steps))
  # One teacher draw per flawed-verb step whatever flaw_p is, so streams stay aligned across p.
  flaws = [config.mode(s.verb) if s.verb in config.flawed_verbs and teacher_rng.random() < flaw_p
           else "" for s in steps]
  answer, teacher_final = _solution(start, steps, flaws)
  return {
      "question": question,
      "answer": answer,  # the GSM8K-style column a loaded row would have
      "solution": answer,
      "final_answer": str(truth),
      "teacher_correct": teacher_final == truth,
      "has_flawed_verb": any(s.verb in config.flawed_verbs for s in steps),
      "num_flawed_steps": sum(bool(f) for f in flaws),
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
  if config.flaw_modes and (len(config.flaw_modes) != len(config.flawed_verbs)
                            or set(config.flaw_modes) - set(FLAW_MODES)):
    raise ValueError(f"flaw_modes {config.flaw_modes}: one of {FLAW_MODES} per flawed verb "
                     f"{config.flawed_verbs}")
  for verb, mode in zip(config.flawed_verbs, config.flaw_modes):
    if mode == "units" and (not _multiplied(verb) or config.count_range[0] < 2):
      raise ValueError(f"flaw mode 'units' drops the k of 'k boxes of n': verb {verb!r} has "
                       "none (or k can be 1)")


def generate(num: int, seed: int, *, flaw_p: float = 0.0, split: str = "train",
             config: ArithmeticConfig = ArithmeticConfig()) -> list[dict]:
  """`num` problems, a deterministic function of (seed, split, config); flaws also of flaw_p.

  Records: `question`, `answer` and `solution` (the teacher's worked solution), `final_answer`
  (true answer as a string), `teacher_correct`, `has_flawed_verb`, `num_flawed_steps`.
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


# ----------------------------------------------------------------------------- reading it back


def _template_regex(template: str) -> str:
  """A template's regex: literal text escaped, each {field} an integer group (in order)."""
  return "".join(r"(\d+)" if re.fullmatch(r"\{\w+\}", part) else re.escape(part)
                 for part in re.split(r"(\{\w+\})", template))


# The opening up to the amount (whatever the item), and each verb's phrase without the name (a
# question sentence starts with it) or the period (sentences are split on ". ").
_START = re.compile(r"\b" + _template_regex(OPENING.split("{item}")[0]))
_STEP_PATTERNS = tuple((re.compile(_template_regex(template)), sign)
                       for template, sign in PHRASES.values())


def parse_question(question: str) -> tuple[int, list[int]]:
  """(start amount, signed change of each step) of a generated question, e.g.
  "Ann has 19 pens. Ann finds 4 more. Ann sells 3 boxes of 3. ..." -> (19, [4, -9, ...]).
  Sentences that are no step (the opening, the closing question) contribute nothing."""
  start = _START.search(question)
  if start is None:
    raise ValueError(f"not an arithmetic-task question (no 'has N'): {question!r}")
  changes = []
  for sentence in question.split(". "):
    for pattern, sign in _STEP_PATTERNS:
      m = pattern.search(sentence)
      if m:  # the product of the phrase's numbers: k * n, or n
        changes.append(sign * math.prod(int(g) for g in m.groups()))
        break
  return int(start.group(1)), changes


def eval_int_expr(text: str) -> int | None:
  """Value of an integer expression with + - * (usual precedence, no parentheses, no unary
  minus), or None if `text` is anything else. A tiny parser: never `eval` model output."""
  toks = re.findall(r"\d+|[+\-*]|\S", text)
  if not toks or len(toks) % 2 == 0:
    return None
  if not all(t.isdigit() for t in toks[0::2]) or not all(t in "+-*" for t in toks[1::2]):
    return None
  total, term, sign = 0, int(toks[0]), 1
  for op, num in zip(toks[1::2], toks[2::2]):
    if op == "*":
      term *= int(num)
    else:
      total, term, sign = total + sign * term, int(num), (1 if op == "+" else -1)
  return total + sign * term


# A solution step as `Step.equation` writes it ("a+k*n=b." / "a-n=b."), and the "#### x" that ends
# `_solution`; whitespace is tolerated because these read model output, not the generator's.
_EQUATION = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+(?:\s*\*\s*\d+)?)\s*=\s*(\d+)\s*\.?\s*$")
_ANSWER = re.compile(r"^\s*####\s*(-?\d+)\s*$")


def step_labels(completion_text: str, record: Mapping[str, Any], *,
                cumulative: bool = False) -> list[int]:
  """0/1 labels of the steps of a completion, one per `split_steps(text, ".")`.

  Equation step s ("a+b=c." / "a-k*n=c.") is correct iff (1) it parses, (2) its arithmetic is
  right (c = a +- operand), (3) it starts from the previous step's *written* result (the start
  amount for s = 0) and (4) its signed operand is the question's s-th change (the verb's sign
  and amount: "loses 3" must be "-3", "buys 2 bags of 3" "+2*3"). The final "#### x" step is
  correct iff x is the true answer (`record["final_answer"]`). Anything else (extra steps,
  unparseable text) is 0. Labels are local: a step is judged given the text before it; with
  `cumulative=True` a step is correct only if it and all earlier steps are (prefix
  correctness, as in Math-Shepherd).
  """
  start, changes = parse_question(record["question"])
  labels, prev = [], start
  for s, step in enumerate(split_steps(completion_text, ".")):
    answer = _ANSWER.match(step)
    if answer:
      labels.append(int(str(int(answer.group(1))) == str(record["final_answer"]).strip()))
      continue
    eq = _EQUATION.match(step)
    if eq is None:
      labels.append(0)
      continue
    a, op, operand, c = int(eq.group(1)), eq.group(2), eval_int_expr(eq.group(3)), int(eq.group(4))
    lhs = eval_int_expr(f"{a}{op}{eq.group(3)}")
    change = operand if op == "+" else -operand
    ok = lhs == c and a == prev and s < len(changes) and change == changes[s]
    labels.append(int(ok))
    prev = c
  if cumulative:
    labels = list(itertools.accumulate(labels, operator.mul))
  return [int(x) for x in labels]
