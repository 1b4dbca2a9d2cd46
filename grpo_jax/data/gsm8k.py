"""GSM8K-format jsonl: one `{"question": ..., "answer": "... #### N"}` object per line.

Records come out as `question`, `answer` (the worked solution, `<<...>>` calculator annotations
stripped) and `final_answer` (N, thousands separators removed: "1,000" -> "1000").
"""

from __future__ import annotations

import json
import os
import re

_CALC_RE = re.compile(r"<<[^<>]*>>")


def parse_gsm8k_answer(answer: str) -> tuple[str, str]:
  """`"... <<2*3=6>>6 ...\\n#### 6"` -> (solution without annotations, "6").

  Raises ValueError when there is no `#### <answer>`.
  """
  if "####" not in answer:
    raise ValueError("answer has no '#### <final answer>'")
  final = answer.rsplit("####", 1)[1].strip().replace(",", "")
  if not final:
    raise ValueError("nothing after '####'")
  return _CALC_RE.sub("", answer), final


def load_gsm8k_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a GSM8K-format jsonl file. Blank lines are skipped.

  Raises FileNotFoundError naming a missing path, ValueError naming `file:line` for a malformed
  line (bad JSON, a missing or non-string field, no `####`), and ValueError for an empty file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GSM8K file not found: {path}")
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
      for key in ("question", "answer"):
        if not isinstance(row.get(key), str):
          raise ValueError(f"{where}: field {key!r} is missing or not a string")
      records.append(_record(row, where))
  if not records:
    raise ValueError(f"GSM8K file {path} holds no examples")
  return records


def _record(row: dict, where: str) -> dict:
  """A framework record from a GSM8K row; a bad answer raises naming `where`."""
  try:
    solution, final = parse_gsm8k_answer(row["answer"])
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return {"question": row["question"].strip(), "answer": solution.strip(), "final_answer": final}


def load_gsm8k(path: str | os.PathLike, split: str = "train") -> list[dict]:
  """From a `.jsonl` file, or a directory holding `{split}.jsonl` (e.g. `../shared/data/gsm8k`)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, f"{split}.jsonl")
  return load_gsm8k_jsonl(path)


def load_gsm8k_hf(split: str = "train", *, name: str = "openai/gsm8k", config: str = "main",
                  **kwargs) -> list[dict]:
  """Through Hugging Face `datasets` (optional; may download). Same records as the jsonl loader."""
  try:
    import datasets
  except ImportError as e:
    raise ImportError("load_gsm8k_hf needs the optional 'datasets' package "
                      "(pip install datasets), or use load_gsm8k on a local jsonl") from e
  records = []
  for i, row in enumerate(datasets.load_dataset(name, config, split=split, **kwargs)):
    records.append(_record(row, f"{name}[{split}] row {i}"))
  if not records:
    raise ValueError(f"{name}[{split}] holds no examples")
  return records
