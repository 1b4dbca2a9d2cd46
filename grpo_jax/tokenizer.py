"""Tokenizers: one small interface, a SentencePiece and a Hugging Face `tokenizer.json` implementation.

The sampler wants prompts as a fixed-shape, **left-padded** int32 batch plus a mask, so every row's
last prompt token sits at the same column and generation starts at column `L` for all rows:

    tok = load_tokenizer("tokenizer.model")            # or a dir / file with tokenizer.json
    ids_NxL, mask_NxL = tok.encode_batch(prompts, max_length=44)
    texts = tok.decode_batch(completion_ids_NxT)      # each row stops at the first eos

`tokenizer_training.train_sentencepiece` trains a small SentencePiece BPE model (used by the
offline arithmetic task; the CLI is `tools/train_tokenizer.py`).
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

Truncate = Literal["left", "error"]


class LeftPadded(NamedTuple):
  """A left-padded batch. `ids_NxL`/`mask_NxL` are int32; mask is 1 on real tokens, 0 on padding."""

  ids_NxL: np.ndarray
  mask_NxL: np.ndarray
  num_truncated: int  # rows whose left end was cut off to fit `max_length`


def left_pad(
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_length: int | None = None,
    truncate: Truncate = "left",
) -> LeftPadded:
  """Left-pads token lists into an `[N, L]` int32 batch.

  L is `max_length` when given (a fixed shape, so a jitted sampler does not recompile), else the
  longest row. A row longer than `max_length` keeps its *last* `max_length` tokens with
  `truncate="left"` (the end of a prompt is what the model continues from), or raises a ValueError
  naming the row with `truncate="error"`.
  """
  if truncate not in ("left", "error"):
    raise ValueError(f"truncate must be 'left' or 'error', got {truncate!r}")
  if max_length is not None and max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  n = len(seqs)
  length = max_length if max_length is not None else max((len(s) for s in seqs), default=0)
  ids_NxL = np.full((n, length), pad_id, dtype=np.int32)
  mask_NxL = np.zeros((n, length), dtype=np.int32)
  num_truncated = 0
  for row, seq in enumerate(seqs):
    if len(seq) > length:
      if truncate == "error":
        raise ValueError(
            f"row {row} has {len(seq)} tokens, more than max_length={length} "
            "(use truncate='left' to keep its last tokens)")
      seq = seq[len(seq) - length:]
      num_truncated += 1
    if len(seq):
      ids_NxL[row, length - len(seq):] = seq
      mask_NxL[row, length - len(seq):] = 1
  return LeftPadded(ids_NxL, mask_NxL, num_truncated)


class Tokenizer(abc.ABC):
  """The interface the framework uses. Subclasses implement `encode`/`decode` and the ids.

  `encode` never adds special tokens; `encode_batch` adds bos explicitly, so both implementations
  behave the same way whatever their file's post-processor says.
  """

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Text -> token ids, without bos/eos."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Token ids -> text; special tokens (bos/eos/pad) are dropped."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None when the tokenizer has none (e.g. Qwen)."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """End-of-sequence id: generation stops here."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Padding id (may equal eos_id for HF tokenizers without a pad token)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (the model's embedding may be larger)."""

  @property
  def add_bos_default(self) -> bool:
    """Whether `encode_batch` prepends bos when `add_bos` is not given."""
    return self.bos_id is not None

  def encode_batch_padded(
      self,
      texts: Sequence[str],
      *,
      max_length: int | None = None,
      add_bos: bool | None = None,
      truncate: Truncate = "left",
  ) -> LeftPadded:
    """Like `encode_batch`, also returning how many rows were truncated (for metrics)."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of strings, got a single str")
    add_bos = self.add_bos_default if add_bos is None else add_bos
    if add_bos and self.bos_id is None:
      raise ValueError("add_bos=True but this tokenizer has no bos token")
    prefix = [self.bos_id] if add_bos else []
    seqs = [prefix + self.encode(t) for t in texts]
    out = left_pad(seqs, pad_id=self.pad_id, max_length=max_length, truncate=truncate)
    if out.num_truncated:
      logging.warning("truncated %d of %d prompts on the left to %d tokens",
                      out.num_truncated, len(texts), max_length)
    return out

  def encode_batch(
      self,
      texts: Sequence[str],
      *,
      max_length: int | None = None,
      add_bos: bool | None = None,
      truncate: Truncate = "left",
  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodes prompts for the sampler.

    Args:
      texts: N strings.
      max_length: L, the fixed output width; None pads to the longest row.
      add_bos: prepend bos; None uses `add_bos_default`.
      truncate: "left" keeps the last `max_length` tokens of an over-long row (a warning logs the
        count; `encode_batch_padded` returns it), "error" raises naming the row.

    Returns:
      `(ids_NxL, mask_NxL)`, int32, left-padded with `pad_id`; mask 1 on real tokens.
    """
    out = self.encode_batch_padded(texts, max_length=max_length, add_bos=add_bos,
                                   truncate=truncate)
    return out.ids_NxL, out.mask_NxL

  def decode_batch(self, ids_NxT, mask_NxT=None) -> list[str]:
    """Decodes each row up to (not including) its first eos.

    With a mask, only positions with mask 1 are read (so left padding is skipped even when
    pad_id == eos_id). Without one, leading pad tokens are skipped when pad_id != eos_id.
    """
    ids_NxT = np.asarray(ids_NxT)
    if ids_NxT.ndim != 2:
      raise ValueError(f"decode_batch expects [N, T] ids, got shape {ids_NxT.shape}")
    if mask_NxT is not None:
      mask_NxT = np.asarray(mask_NxT)
      if mask_NxT.shape != ids_NxT.shape:
        raise ValueError(f"mask shape {mask_NxT.shape} != ids shape {ids_NxT.shape}")
    texts = []
    for row in range(ids_NxT.shape[0]):
      seq = ids_NxT[row]
      if mask_NxT is not None:
        seq = seq[mask_NxT[row].astype(bool)]
      elif self.pad_id != self.eos_id:
        nonpad = np.flatnonzero(seq != self.pad_id)
        seq = seq[nonpad[0]:] if nonpad.size else seq[:0]
      eos = np.flatnonzero(seq == self.eos_id)
      if eos.size:
        seq = seq[:eos[0]]
      texts.append(self.decode(seq.tolist()))
    return texts


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file (Gemma, Llama 2, or one from `tokenizer_training`)."""

  def __init__(self, path: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
    import sentencepiece as spm  # a core dependency; imported here to keep module import light

    if (path is None) == (model_proto is None):
      raise ValueError("give exactly one of path or model_proto")
    self._sp = spm.SentencePieceProcessor()
    if path is not None:
      path = os.fspath(path)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
      self._sp.Load(path)
    else:
      self._sp.LoadFromSerializedProto(model_proto)
    self.path = path
    if self._sp.eos_id() < 0:
      raise ValueError(f"SentencePiece model {path or '<proto>'} has no eos id")

  @property
  def model_proto(self) -> bytes:
    """The serialized model: what `tokenizer.model` holds."""
    return self._sp.serialized_model_proto()

  def encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  @property
  def bos_id(self) -> int | None:
    return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    # Models trained without a pad piece (Llama 2) pad with eos; the mask tells them apart.
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.eos_id()

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))


def _import_tokenizers():
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError(
        "HFTokenizer needs the optional 'tokenizers' package: pip install 'grpo_jax[hf]'") from e
  return tokenizers


_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


def _token_content(value) -> str | None:
  """tokenizer_config.json stores special tokens as a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (Qwen, Llama 3, ...) through the optional `tokenizers` package.

  `path` is the `tokenizer.json` file or the directory holding it. Special tokens come from the
  arguments, else the sibling `tokenizer_config.json`, else well-known token names; pad falls back
  to eos.
  """

  def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None):
    tokenizers = _import_tokenizers()
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"tokenizer.json not found: {file}")
    self.path = file
    self._tok = tokenizers.Tokenizer.from_file(file)

    config = {}
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.isfile(config_file):
      with open(config_file) as f:
        config = json.load(f)

    def pick(explicit, key, candidates):
      name = explicit if explicit is not None else _token_content(config.get(key))
      if name is not None:
        i = self._tok.token_to_id(name)
        if i is None:
          raise ValueError(f"{key} {name!r} is not in the vocabulary of {file}")
        return i
      for name in candidates:
        i = self._tok.token_to_id(name)
        if i is not None:
          return i
      return None

    self._bos = pick(bos_token, "bos_token", _BOS_CANDIDATES)
    self._eos = pick(eos_token, "eos_token", _EOS_CANDIDATES)
    if self._eos is None:
      raise ValueError(f"could not find an eos token in {file}; pass eos_token=...")
    pad = pick(pad_token, "pad_token", _PAD_CANDIDATES)
    self._pad = self._eos if pad is None else pad
    # Follow the file's own convention for bos (Llama 3 adds it, Qwen has none).
    with_specials = self._tok.encode("a", add_special_tokens=True).ids
    self._adds_bos = self._bos is not None and bool(with_specials) and with_specials[0] == self._bos

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def add_bos_default(self) -> bool:
    return self._adds_bos


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Picks the implementation by file: `*.model` -> SentencePiece, `tokenizer.json` -> HF.

  A directory is searched for `tokenizer.json` first, then `tokenizer.model`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in directory {path}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"unknown tokenizer file type (expected .model or tokenizer.json): {path}")
