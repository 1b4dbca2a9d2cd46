"""Datasets from anywhere: a jsonl / json / parquet file, a directory of splits, or a Hugging Face
`datasets` name, mapped onto the framework's record.

    fields = FieldMap(question="problem", answer="solution", final_answer="answer", marker="")
    train = load_split("data/my_task", "train", fields)   # data/my_task/train.{jsonl,json,parquet}

A record is the source row, every column kept as written (reward functions receive them all,
so a reward reading the dataset's own `answer` gets it), plus three roles under names of their own:
  question      the problem text (the prompt template's usual field)
  solution      the worked solution, the SFT / RFT teacher target ("" when unmapped)
  final_answer  what the exact-answer reward and evaluation compare with: the text after the
                last `marker` in the mapped column (GSM8K: "####"), thousands separators between
                digits removed ("1,234" -> "1234"; "(1, 2]" stays as written)
A column with a role's name is that role's source (GSM8K's `question`) or an error: a role
never replaces another column.

`FieldMap` (grpo_jax/record_fields.py) is config.data.fields. GSM8K is
FieldMap(marker="####", cleanup=r"<<[^<>]*>>") on its jsonl files; the arithmetic
generator yields the same records directly. A malformed line or a missing field raises
ValueError naming `file:line` (or `name[split] row i`) and the field.
"""

from __future__ import annotations

import json
import re
from typing import Iterator

from grpo_jax import paths
from grpo_jax.record_fields import FieldMap

FORMATS = (".jsonl", ".json", ".parquet")
RESERVED = ("prompts", "completions", "completion_ids", "completion_length", "episodes")  # reward arguments
# A run of thousands groups that is a whole number: not "1,23", "1234,567" or "(1, 2]".
_THOUSANDS_RE = re.compile(r"(?<![\d,])\d{1,3}(?:,\d{3})+(?![\d,])")


GSM8K = FieldMap(marker="####", cleanup=r"<<[^<>]*>>")


def to_record(row: dict, where: str, fields: FieldMap) -> dict:
  """The framework record of one source row; ValueError naming `where` and the field."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object with named fields, got "
                     f"{type(row).__name__}")
  for col in RESERVED:
    if col in row:
      raise ValueError(f"{where}: column {col!r} clashes with a reward function argument; "
                       "rename it in the data")

  def text(field: str, role: str) -> str:
    value = row.get(field)
    if value is None or isinstance(value, (dict, list)):
      raise ValueError(f"{where}: field {field!r} is missing or not text (config.data.fields."
                       f"{role}); the row has {sorted(row)}")
    return str(value)

  question = text(fields.question, "question").strip()
  answer = text(fields.answer, "answer") if fields.answer else ""
  if fields.cleanup:
    answer = re.sub(fields.cleanup, "", answer)
  final = text(fields.final_answer, "final_answer")
  if fields.marker:
    if fields.marker not in final:
      raise ValueError(f"{where}: field {fields.final_answer!r} has no {fields.marker!r} before "
                       "the final answer (config.data.fields.marker)")
    final = final.rsplit(fields.marker, 1)[1]
  final = _THOUSANDS_RE.sub(lambda m: m.group().replace(",", ""), final.strip())
  if not final:
    raise ValueError(f"{where}: empty final answer in field {fields.final_answer!r}")
  for role, field in (("question", "question"), ("solution", "answer"),
                      ("final_answer", "final_answer")):
    if role in row and getattr(fields, field) != role:
      raise ValueError(
          f"{where}: column {role!r} is not the {role}'s source (config.data.fields.{field} = "
          f"{getattr(fields, field)!r}), and the record's {role} goes under that name; rename "
          f"the column in the data, or set config.data.fields.{field} = {role!r}")
  return {**row, "question": question, "solution": answer.strip(), "final_answer": final}


def load_split(source: str, split: str, fields: FieldMap) -> list[dict]:
  """Records of `split` from `source` (see `split_file` for how a source names its files)."""
  records = [to_record(row, where, fields) for where, row in read_rows(source, split)]
  if not records:
    raise ValueError(f"{source} ({split}) holds no examples")
  return records


def split_file(source: str, split: str) -> str:
  """The file of `split`: `source` itself if it is a file, else `source/{split}{.jsonl,.json,
  .parquet}` (the first that exists)."""
  path = paths.as_path(source)
  if not path.exists():
    raise FileNotFoundError(f"{source} does not exist")
  if not path.is_dir():
    return source
  for ext in FORMATS:
    if (path / f"{split}{ext}").exists():
      return str(path / f"{split}{ext}")
  raise FileNotFoundError(f"{source} has no " + ", ".join(split + ext for ext in FORMATS))


def read_rows(source: str, split: str) -> Iterator[tuple[str, dict]]:
  """(where, row) pairs: `where` names file:line (jsonl), file[i] (json, parquet) or the HF row."""
  if source.startswith("hf:"):
    yield from _hf_rows(source[3:], split)
    return
  file = split_file(source, split)
  suffix = paths.as_path(file).suffix
  if suffix == ".jsonl":
    yield from _jsonl_rows(file)
  elif suffix == ".json":
    yield from _json_rows(file)
  elif suffix == ".parquet":
    yield from _parquet_rows(file)
  else:
    raise ValueError(f"{file}: unknown data format {suffix!r}; expected one of {FORMATS}")


def _jsonl_rows(file: str) -> Iterator[tuple[str, dict]]:
  with paths.as_path(file).open("r") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{lineno}: malformed JSON ({e.msg})") from None
      yield f"{file}:{lineno}", row


def _json_rows(file: str) -> Iterator[tuple[str, dict]]:
  try:
    data = json.loads(paths.as_path(file).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}:{e.lineno}: malformed JSON ({e.msg})") from None
  if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
    data = next(iter(data.values()))  # {"data": [...]}
  if not isinstance(data, list):
    raise ValueError(f"{file}: expected a JSON list of objects (or {{\"name\": [...]}})")
  for i, row in enumerate(data):
    yield f"{file}[{i}]", row


def _parquet_rows(file: str) -> Iterator[tuple[str, dict]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{file}: reading parquet needs pyarrow (pip install 'grpo_jax[data]')"
                      ) from e
  with paths.as_path(file).open("rb") as f:
    rows = pq.read_table(f).to_pylist()
  for i, row in enumerate(rows):
    yield f"{file}[{i}]", row


def _hf_rows(name: str, split: str) -> Iterator[tuple[str, dict]]:
  """`name` or `name:config` through Hugging Face `datasets` (a hub name, or a local directory
  of data files); the optional extra, and it may download."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"hf:{name}: Hugging Face datasets need `pip install 'grpo_jax[data]'`"
                      ) from e
  name, _, config = name.partition(":")
  for i, row in enumerate(datasets.load_dataset(name, config or None, split=split)):
    yield f"hf:{name}[{split}] row {i}", row
