"""Trains a small SentencePiece BPE model (used by the offline arithmetic task).

The CLI is `tools/train_tokenizer.py`; the function lives in the package, not in `tools/`, so an
installed package can use it. The result is a `tokenizer.SentencePieceTokenizer`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

from grpo_jax.tokenizer import SentencePieceTokenizer

# Ids fixed explicitly so pad != eos and the mask-free decode of completions is unambiguous.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_sentencepiece(
    texts: Iterable[str] | None = None,
    *,
    corpus_path: str | os.PathLike | None = None,
    model_prefix: str | os.PathLike | None = None,
    vocab_size: int = 256,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = ("####", "\n"),
    split_digits: bool = True,
    hard_vocab_limit: bool = False,
    byte_fallback: bool = False,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` or on the lines of `corpus_path`.

  Ids are pad=0, unk=1, bos=2, eos=3. Digits are split (so numbers are spelled digit by digit and
  arithmetic is learnable), `####` is one piece, and "\\n" is kept as a piece (no normalisation, so
  decode(encode(x)) == x for text made of seen characters). With `hard_vocab_limit=False` a corpus
  too small for `vocab_size` yields a smaller vocabulary instead of an error.

  Writes `{model_prefix}.model` and `.vocab` when `model_prefix` is given; always returns the
  loaded tokenizer.
  """
  import sentencepiece as spm

  if (texts is None) == (corpus_path is None):
    raise ValueError("give exactly one of texts or corpus_path")
  if corpus_path is not None:
    corpus_path = os.fspath(corpus_path)
    if not os.path.isfile(corpus_path):
      raise FileNotFoundError(f"corpus not found: {corpus_path}")
    source = dict(input=corpus_path)
  else:
    source = dict(sentence_iterator=iter(texts))
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      **source,
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      split_digits=split_digits,
      user_defined_symbols=list(user_defined_symbols),
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      character_coverage=1.0,
      byte_fallback=byte_fallback,
      hard_vocab_limit=hard_vocab_limit,
      minloglevel=2,
  )
  proto = model.getvalue()
  if model_prefix is not None:
    return _write_model(proto, os.fspath(model_prefix))
  return SentencePieceTokenizer(model_proto=proto)


def _write_model(proto: bytes, model_prefix: str) -> SentencePieceTokenizer:
  """Writes `{model_prefix}.model` and `.vocab` (piece and score per line); returns the
  tokenizer loaded from the `.model` file."""
  os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
  with open(model_prefix + ".model", "wb") as f:
    f.write(proto)
  tok = SentencePieceTokenizer(model_prefix + ".model")
  with open(model_prefix + ".vocab", "w") as f:
    for i in range(tok.vocab_size):
      f.write(f"{tok.id_to_piece(i)}\t{tok._sp.GetScore(i)}\n")
  return tok
