"""Datasets: the arithmetic generator and its step verifier (read back with the generator's own
grammar), GSM8K parsing (fixture and the real file when present), prompt templates, and the
resumable iterator."""

import json
import os
import re

import numpy as np
import pytest

from grpo_jax.data import arithmetic, gsm8k, iterator, prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_GSM8K = os.path.join(REPO, "..", "shared", "data", "gsm8k")

_STEP_RE = {
    "buys": (r"buys (\d+) bags of (\d+)\.", 1),
    "sells": (r"sells (\d+) boxes of (\d+)\.", -1),
    "finds": (r"finds (\d+) more\.", 1),
    "gets": (r"gets (\d+) from a friend\.", 1),
    "gives": (r"gives away (\d+)\.", -1),
    "loses": (r"loses (\d+)\.", -1),
}


def _solve(question: str) -> tuple[int, list[str]]:
  """Recomputes the answer from the question text alone: (answer, verbs in order)."""
  sentences = re.findall(r"[^.?]+[.?]", question)
  amount = int(re.search(r"has (\d+) ", sentences[0]).group(1))
  verbs = []
  for sentence in sentences[1:-1]:
    for verb, (pattern, sign) in _STEP_RE.items():
      m = re.search(pattern, sentence.strip() + ("" if sentence.endswith(".") else "."))
      if m:
        nums = [int(g) for g in m.groups()]
        amount += sign * int(np.prod(nums))
        assert amount >= 0, question
        verbs.append(verb)
        break
    else:
      raise AssertionError(f"unparsed step {sentence!r}")
  return amount, verbs


def test_arithmetic_is_deterministic_and_seeded():
  a = arithmetic.generate(200, seed=3, flaw_p=0.6)
  assert a == arithmetic.generate(200, seed=3, flaw_p=0.6)
  assert a != arithmetic.generate(200, seed=4, flaw_p=0.6)
  # The teacher's flaws do not change which problems are drawn.
  assert [r["question"] for r in a] == [r["question"] for r in arithmetic.generate(200, seed=3)]


def test_arithmetic_answers_are_correct_by_recomputation():
  records = arithmetic.generate(500, seed=0)
  for r in records:
    truth, verbs = _solve(r["question"])
    assert 2 <= len(verbs) <= 3
    assert 5 <= int(re.search(r"has (\d+)", r["question"]).group(1)) <= 20
    assert r["final_answer"] == str(truth)
    assert r["answer"].endswith(f"#### {truth}") and r["teacher_correct"]
    # Every equation in the worked solution is right and chains from the previous result.
    eqs = re.findall(r"(\d+)([+-])(\d+)(?:\*(\d+))?=(\d+)\.", r["answer"])
    assert len(eqs) == len(verbs)
    for a, op, x, y, b in eqs:
      delta = int(x) * (int(y) if y else 1)
      assert int(a) + (delta if op == "+" else -delta) == int(b)
  assert records[0]["answer"].count("####") == 1
  verbs = {v for r in records for v in _solve(r["question"])[1]}
  assert verbs == set(arithmetic.VERBS)


def test_flawed_teacher_flips_loses_and_sells_at_rate_p():
  p = 0.6
  records = arithmetic.generate(3000, seed=1, flaw_p=p)
  flawed_steps = total_steps = 0
  for r in records:
    truth, verbs = _solve(r["question"])
    assert r["final_answer"] == str(truth)  # the truth is kept whatever the teacher writes
    signs = re.findall(r"\d([+-])\d", r["answer"])
    for verb, sign in zip(verbs, signs):
      true_sign = _STEP_RE[verb][1]
      wrong = (sign == "+") != (true_sign > 0)
      if verb in ("loses", "sells"):
        total_steps += 1
        flawed_steps += wrong
      else:
        assert not wrong, r  # other verbs are always right
    teacher_final = int(r["answer"].rsplit("####", 1)[1])
    assert r["teacher_correct"] == (teacher_final == truth)
    assert r["num_flawed_steps"] > 0 or r["teacher_correct"]
  rate = flawed_steps / total_steps
  assert abs(rate - p) < 0.04, rate
  assert all(r["teacher_correct"] for r in records if not r["has_flawed_verb"])


def test_heldout_is_disjoint_and_truthful():
  train, heldout = arithmetic.make_splits(3000, 300, seed=0, flaw_p=0.6)
  assert len(train) == 3000 and len(heldout) == 300
  train_q = {r["question"] for r in train}
  held_q = [r["question"] for r in heldout]
  assert len(set(held_q)) == 300 and not train_q & set(held_q)
  assert all(r["teacher_correct"] for r in heldout)
  # Not just the training stream's continuation.
  assert held_q[:10] != [r["question"] for r in arithmetic.generate(3010, seed=0)][3000:]
  with pytest.raises(ValueError, match="held-out"):
    tiny = arithmetic.ArithmeticConfig(start_range=(5, 5), steps_range=(2, 2),
                                       count_range=(2, 2), amount_range=(1, 1))
    arithmetic.make_splits(2000, 1500, seed=0, config=tiny)


def test_arithmetic_rejects_bad_settings():
  with pytest.raises(ValueError, match="flaw_p"):
    arithmetic.generate(1, 0, flaw_p=1.5)
  with pytest.raises(ValueError, match="flawed_verbs"):
    arithmetic.generate(1, 0, config=arithmetic.ArithmeticConfig(flawed_verbs=("eats",)))


def test_arithmetic_step_labels_hand_examples():
  record = {"question": "Ann has 19 pens. Ann finds 4 more. Ann sells 3 boxes of 3. Ann loses 1. "
                        "How many pens now?", "final_answer": "13"}
  labels = lambda text, **kw: arithmetic.step_labels(text, record, **kw)
  assert labels("19+4=23. 23-3*3=14. 14-1=13. #### 13") == [1, 1, 1, 1]
  assert labels("19+4=24. 24-3*3=15. 15-1=14. #### 14") == [0, 1, 1, 0]  # wrong arithmetic
  assert labels("19+4=23. 22-3*3=13. 13-1=12. #### 12") == [1, 0, 1, 0]  # wrong carry-over
  assert labels("19+4=23. 23+3*3=32. 32-1=31. #### 31") == [1, 0, 1, 0]  # wrong sign (verb)
  assert labels("19+4=23. 23-3*3=14. 14-2=12. #### 12") == [1, 1, 0, 0]  # wrong amount
  assert labels("19+4=23. 23-3*3=14. 14-1=13. #### 12") == [1, 1, 1, 0]  # wrong final answer
  assert labels("19+4=23. I think. #### 13") == [1, 0, 1]  # unparseable step
  assert labels("19+4=23. 23-3*3=14. 14-1=13. 13+1=14. #### 14") == [1, 1, 1, 0, 0]  # extra step
  assert labels("19+4=24. 24-3*3=15. 15-1=14. #### 13", cumulative=True) == [0, 0, 0, 0]
  assert arithmetic.parse_question(record["question"]) == (19, [4, -9, -1])


def test_eval_int_expr_is_a_safe_tiny_parser():
  assert arithmetic.eval_int_expr("3+4*2") == 11
  assert arithmetic.eval_int_expr("10-2*3") == 4
  assert arithmetic.eval_int_expr("2*3-1") == 5
  assert arithmetic.eval_int_expr("7") == 7
  for bad in ("", "3+", "__import__('os')", "(1+2)", "-1", "2**3", "1/2"):
    assert arithmetic.eval_int_expr(bad) is None, bad


def test_one_grammar_writes_and_reads_the_questions():
  """The reader (`parse_question`, `step_labels`) is built from the writer's phrase table: every
  generated question parses back to its answer, and the teacher's steps are judged as written."""
  config = arithmetic.ArithmeticConfig()
  for seed in range(3):
    clean = arithmetic.generate(300, seed)
    flawed = arithmetic.generate(300, seed, flaw_p=1.0)
    seen = set()
    for r, f in zip(clean, flawed):
      _, verbs = _solve(r["question"])  # this file's own reading of the question
      seen.update(verbs)
      start, changes = arithmetic.parse_question(r["question"])
      assert len(changes) == len(verbs) and start + sum(changes) == int(r["final_answer"]), r
      assert arithmetic.step_labels(r["answer"], r) == [1] * (len(verbs) + 1), r
      # flaw_p = 1 flips every flawed verb's sign: exactly those steps and the answer are wrong.
      want = [int(v not in config.flawed_verbs) for v in verbs] + [int(not f["has_flawed_verb"])]
      assert arithmetic.step_labels(f["answer"], f) == want, f
      assert want.count(0) == f["num_flawed_steps"] + int(f["has_flawed_verb"])
    assert seen == set(arithmetic.VERBS)


_FIXTURE = [
    {"question": "Janet has 16 eggs. She eats 3. How many are left?",
     "answer": "She has 16 - 3 = <<16-3=13>>13 left.\n#### 13"},
    {"question": "A shop sells 1,000 pens at $2. Revenue?",
     "answer": "1000 * 2 = <<1000*2=2000>>2,000 dollars.\n#### 2,000"},
    {"question": "What is -4 + 1.5?", "answer": "-4 + 1.5 = <<-4+1.5=-2.5>>-2.5\n#### -2.5"},
]


def _write_jsonl(path, rows, extra_lines=()):
  lines = [json.dumps(r) for r in rows] + list(extra_lines)
  path.write_text("\n".join(lines) + "\n")
  return path


def test_gsm8k_fixture_parsing(tmp_path):
  path = _write_jsonl(tmp_path / "train.jsonl", _FIXTURE, extra_lines=["", "   "])
  records = gsm8k.load_gsm8k(tmp_path, split="train")
  assert [r["final_answer"] for r in records] == ["13", "2000", "-2.5"]
  assert records[0]["solution"] == "She has 16 - 3 = 13 left.\n#### 13"
  assert all("<<" not in r["solution"] for r in records)
  assert [r["answer"] for r in records] == [r["answer"] for r in _FIXTURE]  # kept as written
  assert records == gsm8k.load_gsm8k_jsonl(path)


def test_gsm8k_real_or_fixture(tmp_path):
  """Runs on ../shared/data/gsm8k when it exists, on the fixture otherwise: never skipped."""
  if os.path.isfile(os.path.join(SHARED_GSM8K, "test.jsonl")):
    records, expected_len = gsm8k.load_gsm8k(SHARED_GSM8K, split="test"), 1319
  else:
    _write_jsonl(tmp_path / "test.jsonl", _FIXTURE)
    records, expected_len = gsm8k.load_gsm8k(tmp_path, split="test"), len(_FIXTURE)
  assert len(records) == expected_len
  for r in records:
    assert r["question"] and "<<" not in r["solution"] and "####" in r["solution"]
    assert re.fullmatch(r"-?\d+(\.\d+)?", r["final_answer"]), r["final_answer"]
    assert r["solution"].rsplit("####", 1)[1].strip().replace(",", "") == r["final_answer"]


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "malformed JSON"),
    ('{"question": "q"}', "'answer' is missing"),
    ('{"question": "q", "answer": "no marker"}', "####"),
    ("[1, 2]", "JSON object"),
])
def test_gsm8k_malformed_line_names_file_and_line(tmp_path, bad_line, message):
  path = _write_jsonl(tmp_path / "bad.jsonl", _FIXTURE[:2], extra_lines=[bad_line])
  with pytest.raises(ValueError, match=re.escape(f"{path}:3") + ".*" + re.escape(message)):
    gsm8k.load_gsm8k_jsonl(path)


def test_gsm8k_missing_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
    gsm8k.load_gsm8k(tmp_path / "nowhere.jsonl")
  with pytest.raises(FileNotFoundError, match="test.jsonl"):
    gsm8k.load_gsm8k(tmp_path, split="test")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="no examples"):
    gsm8k.load_gsm8k_jsonl(tmp_path / "empty.jsonl")


def test_prompt_templates():
  assert prompts.plain_prompt(" How many? ") == "Question: How many?\nAnswer:"
  qwen = prompts.chat_prompt("2+2?", prompts.CHAT_TEMPLATES["qwen"], system="Be brief.")
  assert qwen == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  assert prompts.chat_prompt("a {b}", "U: {question}\nA:") == "U: a {b}\nA:"
  with pytest.raises(ValueError, match="question"):
    prompts.chat_prompt("x", "no field")


def test_iterator_resumes_exactly():
  records = [{"i": i} for i in range(10)]
  uninterrupted = iterator.BatchIterator(records, batch_size=3, seed=7)
  want = [[r["i"] for r in next(uninterrupted)] for _ in range(8)]
  # Every epoch is a permutation; the 10 % 3 leftover is skipped, epochs differ.
  assert len(set(sum(want[:3], []))) == 9 and want[:3] != want[3:6]

  it = iterator.BatchIterator(records, batch_size=3, seed=7)
  got = [[r["i"] for r in next(it)] for _ in range(5)]
  state = json.loads(json.dumps(it.state))  # survives a JSON round trip (checkpoint metadata)
  assert state == {"epoch": 1, "index": 6, "seed": 7}
  resumed = iterator.BatchIterator(records, batch_size=3, seed=0, state=state)  # state wins
  got += [[r["i"] for r in next(resumed)] for _ in range(3)]
  assert got == want


def test_iterator_rejects_bad_state_and_sizes():
  records = [{"i": i} for i in range(4)]
  with pytest.raises(ValueError, match="fewer than batch_size"):
    iterator.BatchIterator(records, batch_size=5)
  with pytest.raises(ValueError, match="lacks"):
    iterator.BatchIterator(records, 2, state={"epoch": 0, "index": 0})
  with pytest.raises(ValueError, match="does not fit"):
    iterator.BatchIterator(records, 2, state={"epoch": 0, "index": 9, "seed": 0})
  assert iterator.collate([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]) == {"a": [1, 2], "b": ["x", "y"]}


def test_multistep_teacher_errs_its_two_ways_and_the_verifier_finds_each():
  """The "multistep" task: 3-4 steps; the teacher writes "loses" with the wrong sign and "sells k
  boxes of n" as n, each at rate flaw_p, the rest right; the step verifier labels exactly its
  flawed steps 0 (a step after a flaw chains from the written result: 1) and the answer by the
  truth. The default task's data is unchanged by the modes (no extra draws)."""
  p = 0.85
  records = arithmetic.generate(2000, seed=2, flaw_p=p, config=arithmetic.MULTISTEP)
  rates = {"loses": [0, 0], "sells": [0, 0]}
  for r in records:
    truth, verbs = _solve(r["question"])
    assert 3 <= len(verbs) <= 4 and r["final_answer"] == str(truth)
    eqs = re.findall(r"(\d+)([+-])(\d+)(?:\*(\d+))?=(\d+)\.", r["answer"])
    assert len(eqs) == len(verbs)
    want_labels = []
    for verb, (a, op, x, y, b) in zip(verbs, eqs):
      _, sign = _STEP_RE[verb]
      written = int(x) * (int(y) if y else 1) * (1 if op == "+" else -1)
      assert int(a) + written == int(b)  # the teacher's arithmetic is always right
      if verb == "loses":
        flawed = (op == "+")
      elif verb == "sells":
        flawed = not y  # "-n" in place of "-k*n"
        assert op == "-"
      else:
        flawed = False
        assert (op == "+") == (sign > 0) and (verb != "buys" or y), r
      if verb in rates:
        rates[verb][0] += flawed
        rates[verb][1] += 1
      want_labels.append(int(not flawed))
    want_labels.append(int(r["teacher_correct"]))
    assert arithmetic.step_labels(r["answer"], r) == want_labels, r
    assert r["num_flawed_steps"] == want_labels[:-1].count(0)
  for verb, (flawed, total) in rates.items():
    assert abs(flawed / total - p) < 0.04, (verb, flawed / total)
  truthful = arithmetic.generate(200, seed=2, config=arithmetic.MULTISTEP)
  assert all(arithmetic.step_labels(r["answer"], r) == [1] * (len(_solve(r["question"])[1]) + 1)
             for r in truthful)
  signs_only = arithmetic.ArithmeticConfig(flaw_modes=("sign", "sign"))
  assert arithmetic.generate(300, 4, flaw_p=0.6) == arithmetic.generate(300, 4, flaw_p=0.6,
                                                                        config=signs_only)
  with pytest.raises(ValueError, match="flaw_modes"):
    arithmetic.generate(1, 0, config=arithmetic.ArithmeticConfig(flaw_modes=("sign",)))
  with pytest.raises(ValueError, match="'units'"):
    arithmetic.generate(1, 0, config=arithmetic.ArithmeticConfig(flaw_modes=("units", "sign")))
