"""Loaded records: every source column kept as written, the mapped roles (`question`, `solution`,
`final_answer`) beside them, and each reader (prompts, rewards, SFT targets, evaluation) taking
the role it needs."""

import json
import os

import numpy as np
import pytest

from grpo_jax import reward_table, tasks
from grpo_jax.data import arithmetic, gsm8k, records, tool_arithmetic

SHARED_GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
MATH = records.FieldMap(question="problem", answer="solution", final_answer="answer", marker="")
ROW = {"problem": "Solve $x^2 < 2x$.", "solution": "Factor: $x(x-2) < 0$, so $\\boxed{(0, 2)}$.",
       "answer": "(0, 2)", "level": 3}


def test_math_style_rows_keep_their_answer_column():
  rec = records.to_record(ROW, "row", MATH)
  assert {k: rec[k] for k in ROW} == ROW  # untouched, types included
  assert rec["question"] == ROW["problem"] and rec["solution"] == ROW["solution"]
  assert rec["final_answer"] == "(0, 2)"  # an interval's comma is not a thousands separator
  no_solution = {k: v for k, v in ROW.items() if k != "solution"}
  unmapped = records.to_record(no_solution, "row", records.FieldMap(
      question="problem", answer="", final_answer="answer", marker=""))
  assert unmapped["answer"] == "(0, 2)" and unmapped["solution"] == ""


@pytest.mark.parametrize("written, final", [
    ("1,234", "1234"), ("1,234,567", "1234567"), ("-1,000.5", "-1000.5"), ("$12,000", "$12000"),
    ("(1, 2]", "(1, 2]"), ("(1,2]", "(1,2]"), ("1,23", "1,23"), ("1,2345", "1,2345"),
    ("3, 1,000", "3, 1000"), ("x = 1,5", "x = 1,5"), ("1234,567", "1234,567"),
    ("1,234,56", "1,234,56"),
])
def test_final_answer_drops_only_thousands_separators(written, final):
  row = {"q": "?", "a": f"... #### {written}"}
  assert records.to_record(row, "row", records.FieldMap("q", "a", "a"))["final_answer"] == final


def test_a_role_never_replaces_a_different_source_column():
  for role, field in (("question", "question"), ("solution", "answer"),
                      ("final_answer", "final_answer")):
    row = {"q": "Q", "s": "S", "f": "1", role: "another column"}
    with pytest.raises(ValueError, match=f"row: column '{role}' .*config.data.fields.{field} = "):
      records.to_record(row, "row", records.FieldMap("q", "s", "f", marker=""))
  # A role mapped from the column of its name is that column, mapped as configured.
  own = records.to_record({"question": " Q ", "solution": "S<<n>>", "final_answer": 1000}, "row",
                          records.FieldMap("question", "solution", "final_answer", marker="",
                                           cleanup="<<n>>"))
  assert own == {"question": "Q", "solution": "S", "final_answer": "1000"}


def test_gsm8k_records_keep_the_annotated_answer():
  path = os.path.join(SHARED_GSM8K, "test.jsonl")
  if os.path.isfile(path):
    with open(path) as f:
      raw = [json.loads(line) for line, _ in zip(f, range(50))]
    loaded = gsm8k.load_gsm8k(SHARED_GSM8K, split="test")[:50]
  else:  # the shared data is absent: one row in its format
    raw = [{"question": "Sam has 2,000 pens and sells 1. How many?",
            "answer": "2,000 - 1 = <<2000-1=1999>>1,999\n#### 1,999"}]
    loaded = [records.to_record(raw[0], "row", records.GSM8K)]
  for row, rec in zip(raw, loaded, strict=True):
    assert {k: rec[k] for k in row} == row
    assert "<<" not in rec["solution"] and rec["solution"] == gsm8k.parse_gsm8k_answer(
        row["answer"])[0]
    assert rec["final_answer"] == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")


class _CharTokenizer:
  pad_id, eos_id = 0, 1

  def encode(self, text):
    return [ord(c) for c in text]


def test_readers_take_the_roles_and_rewards_see_the_source():
  recs = [records.to_record(ROW, "row", MATH)]
  targets = tasks.encode_targets(_CharTokenizer(), recs, max_len=80)
  n = int(targets.mask_NxC[0].sum())
  assert "".join(map(chr, targets.ids_NxC[0, :n - 1])) == " " + ROW["solution"]
  ids = np.zeros((1, 1), np.int32)
  columns = reward_table.reward_columns(recs, ["prompt"], ids, ids + 1, [3], 2)
  assert columns["answer"] == ["(0, 2)"] * 2 and columns["final_answer"] == ["(0, 2)"] * 2
  assert columns["solution"] == [ROW["solution"]] * 2 and columns["level"] == [3, 3]


def test_generated_tasks_carry_the_roles():
  for rec in arithmetic.generate(5, seed=0) + tool_arithmetic.make_splits(5, 2, 0)[0]:
    assert rec["solution"] == rec["answer"] and rec["final_answer"] in rec["solution"]
