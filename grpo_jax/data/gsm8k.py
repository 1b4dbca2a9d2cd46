"""GSM8K: one `{"question": ..., "answer": "... #### N"}` object per line, as the generic records
loader reads it (`records.GSM8K`: final answer after "####", `<<...>>` calculator notes removed).

Records keep `question` and `answer` as written and add `solution` (the worked solution,
annotations stripped) and `final_answer` (N, thousands separators removed: "1,000" -> "1000").
"""

from __future__ import annotations

import os

from grpo_jax.data import records


def parse_gsm8k_answer(answer: str) -> tuple[str, str]:
  """`"... <<2*3=6>>6 ...\\n#### 6"` -> (solution without annotations, "6").

  Raises ValueError when there is no `#### <answer>`.
  """
  rec = records.to_record({"question": "", "answer": answer}, "answer", records.GSM8K)
  return rec["solution"], rec["final_answer"]


def load_gsm8k_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a GSM8K-format jsonl file. Blank lines are skipped.

  Raises FileNotFoundError naming a missing path, ValueError naming `file:line` for a malformed
  line (bad JSON, a missing or non-string field, no `####`), and ValueError for an empty file.
  """
  return records.load_split(os.fspath(path), "train", records.GSM8K)


def load_gsm8k(path: str | os.PathLike, split: str = "train") -> list[dict]:
  """From a `.jsonl` file, or a directory holding `{split}.jsonl` (e.g. a local copy of `hf:openai/gsm8k`)."""
  return records.load_split(os.fspath(path), split, records.GSM8K)


def load_gsm8k_hf(split: str = "train", *, name: str = "openai/gsm8k",
                  config: str = "main") -> list[dict]:
  """Through Hugging Face `datasets` (optional; may download). Same records as the jsonl loader."""
  return records.load_split(f"hf:{name}:{config}", split, records.GSM8K)
