"""Step segmentation of completions, for process rewards: where each reasoning step ends.

A step ends at a delimiter ("." or "\\n"), and the last one at the final token. The token-level
rule (`step_boundaries`, `batch_step_boundaries`: the step_end / step_mask arrays a PRM scores and
`advantages.process_advantages` spreads) and the text-level rule (`split_steps`: the segments a
verifier labels) are twins, so a label list and a step_mask row line up one to one.

Host side only (NumPy, plain Python), and independent of any dataset: `data.arithmetic` builds
its step verifier on `split_steps`, so this module must not import `grpo_jax.data`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np


@functools.lru_cache(maxsize=8)
def _delimiter_ids_cached(tokenizer, delimiter: str) -> frozenset:
  ids = {i for i in range(tokenizer.vocab_size) if delimiter in tokenizer.decode([i])}
  if not ids:
    raise ValueError(f"no token of the tokenizer decodes to text containing {delimiter!r}")
  return frozenset(ids)


def delimiter_token_ids(tokenizer, delimiter: str = "\n") -> frozenset:
  """Ids whose decoded piece contains `delimiter` (one pass over the vocabulary, cached per
  tokenizer). Special tokens decode to "" and never match."""
  return _delimiter_ids_cached(tokenizer, delimiter)


def _as_delimiter_ids(tokenizer_or_delimiter_ids, delimiter: str) -> frozenset:
  if hasattr(tokenizer_or_delimiter_ids, "decode"):
    return delimiter_token_ids(tokenizer_or_delimiter_ids, delimiter)
  return frozenset(int(i) for i in tokenizer_or_delimiter_ids)


def step_boundaries(completion_token_ids: Sequence[int], tokenizer_or_delimiter_ids, *,
                    delimiter: str = "\n", max_steps: int | None = None,
                    trailing_ids: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """Step ends of one completion (host side, NumPy): (step_end [S] int32, step_mask [S] int32).

  `completion_token_ids` are the completion's real tokens (no padding; EOS may end them). A step
  ends at every token whose id is a delimiter id (from a tokenizer: every token whose decoded
  piece contains `delimiter`, e.g. "." or "\\n"), and the last step ends at the final token. A
  tail after the last delimiter made only of `trailing_ids` (e.g. EOS) is not a step of its own:
  it extends the previous step to the final token; with a tokenizer, a tail that decodes to
  blank text (EOS, spaces) does the same, matching `split_steps` on the decoded text. With
  `max_steps` = S the output is padded
  (step_end 0, mask 0) or, with more steps, the first S - 1 are kept and the last one runs to the
  final token (so the final answer is always scored). An empty completion has no steps.
  """
  ids = [int(i) for i in completion_token_ids]
  delim = _as_delimiter_ids(tokenizer_or_delimiter_ids, delimiter)
  trailing = {int(i) for i in trailing_ids}
  tok = tokenizer_or_delimiter_ids if hasattr(tokenizer_or_delimiter_ids, "decode") else None

  def blank_tail(tail):  # the text-level rule of `split_steps` when a tokenizer is given
    return (not tok.decode(tail).strip()) if tok is not None else all(i in trailing for i in tail)

  ends = [t for t, i in enumerate(ids) if i in delim]
  if ids:
    last = len(ids) - 1
    if not ends:
      ends = [last]
    elif ends[-1] != last:
      if blank_tail(ids[ends[-1] + 1:]):
        ends[-1] = last
      else:
        ends.append(last)
  if max_steps is None:
    max_steps = len(ends)
  if max_steps < 1 and ends:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  if len(ends) > max_steps:
    ends = ends[:max_steps - 1] + [ends[-1]]
  step_end = np.zeros((max_steps,), np.int32)
  step_mask = np.zeros((max_steps,), np.int32)
  step_end[:len(ends)] = ends
  step_mask[:len(ends)] = 1
  return step_end, step_mask


def batch_step_boundaries(completion_tokens_NxC, completion_mask_NxC, tokenizer_or_delimiter_ids,
                          *, max_steps: int, delimiter: str = "\n",
                          trailing_ids: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """`step_boundaries` of every row of a right-padded batch: ([N, S], [N, S]) int32, the
  step_end / step_mask that `prm_step_scores` and `advantages.process_advantages` take."""
  tokens = np.asarray(completion_tokens_NxC)
  lengths = np.asarray(completion_mask_NxC).sum(1)
  delim = _as_delimiter_ids(tokenizer_or_delimiter_ids, delimiter)
  source = tokenizer_or_delimiter_ids if hasattr(tokenizer_or_delimiter_ids, "decode") else delim
  rows = [step_boundaries(tokens[n, :lengths[n]], source, delimiter=delimiter,
                          max_steps=max_steps,
                          trailing_ids=trailing_ids) for n in range(tokens.shape[0])]
  return (np.stack([r[0] for r in rows]).astype(np.int32),
          np.stack([r[1] for r in rows]).astype(np.int32))


def split_steps(text: str, delimiter: str = ".") -> list[str]:
  """The text-level twin of `step_boundaries`: segments ending at each delimiter, plus a
  non-blank tail (a blank tail joins the last step). Concatenated they give `text` back."""
  parts, start = [], 0
  for m in re.finditer(re.escape(delimiter), text):
    parts.append(text[start:m.end()])
    start = m.end()
  tail = text[start:]
  if parts and not tail.strip():
    parts[-1] += tail
  elif tail:
    parts.append(tail)
  return parts
