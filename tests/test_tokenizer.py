"""Tokenizers: a SentencePiece model trained here on generated text, and an HF tokenizer.json built
here with the `tokenizers` library. No files are downloaded."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from grpo_jax import tokenizer as tokenizer_lib
from grpo_jax import tokenizer_training
from grpo_jax.data import arithmetic, prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(n=2000):
  return [prompts.plain_prompt(r["question"]) + " " + r["answer"]
          for r in arithmetic.generate(n, seed=0)]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("sp") / "arith")
  return tokenizer_training.train_sentencepiece(_corpus(), model_prefix=prefix, vocab_size=200)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  import tokenizers  # test extra: fail, never skip, when missing
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>", "<unk>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(500), trainer=trainer)
  d = tmp_path_factory.mktemp("hf")
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}, "bos_token": None}))
  return d


def test_trained_sentencepiece_ids_and_pieces(sp_tok, tmp_path):
  assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
  assert sp_tok.pad_id != sp_tok.eos_id
  assert sp_tok.vocab_size == 200
  assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("#### 13")].count("####") == 1
  # Digits are split: a 3-digit number is at least 3 pieces.
  assert [sp_tok.decode([i]) for i in sp_tok.encode("123")][-3:] == ["1", "2", "3"]
  # The .model file written by model_prefix loads through load_tokenizer.
  again = tokenizer_lib.load_tokenizer(sp_tok.path)
  assert isinstance(again, tokenizer_lib.SentencePieceTokenizer)
  assert again.encode("Ann has 5 pens.") == sp_tok.encode("Ann has 5 pens.")


@pytest.mark.parametrize("text", [
    "Question: Ann has 19 pens. Ann loses 4.\nAnswer: 19-4=15. #### 15",
    "Eve has 7 eggs.\n\nHow many eggs now?",
    "",
])
def test_sentencepiece_round_trip(sp_tok, text):
  assert sp_tok.decode(sp_tok.encode(text)) == text


def test_encode_batch_left_pads_with_mask(sp_tok):
  texts = ["Ann has 5 pens.", "Ben has 12 coins. Ben loses 3.", "Eve"]
  ids, mask = sp_tok.encode_batch(texts, max_length=24)
  assert ids.shape == mask.shape == (3, 24) and ids.dtype == mask.dtype == np.int32
  for row, text in enumerate(texts):
    want = [sp_tok.bos_id] + sp_tok.encode(text)
    n = len(want)
    assert ids[row, -n:].tolist() == want  # real tokens end at the last column
    assert mask[row].tolist() == [0] * (24 - n) + [1] * n
    assert (ids[row, :24 - n] == sp_tok.pad_id).all()
  assert sp_tok.decode_batch(ids, mask) == texts
  # Without max_length, L is the longest row (with bos).
  ids2, _ = sp_tok.encode_batch(texts, add_bos=False)
  assert ids2.shape[1] == max(len(sp_tok.encode(t)) for t in texts)


def test_truncation_policies(sp_tok):
  texts = ["Ann has 5 pens.", "Ben has 12 coins. Ben loses 3. Ben finds 2 more."]
  long_ids = [sp_tok.bos_id] + sp_tok.encode(texts[1])
  out = sp_tok.encode_batch_padded(texts, max_length=8, truncate="left")
  assert out.num_truncated == 1
  assert out.ids_NxL[1].tolist() == long_ids[-8:]  # keeps the end of the prompt
  assert out.mask_NxL[1].tolist() == [1] * 8
  with pytest.raises(ValueError, match="row 1 has"):
    sp_tok.encode_batch(texts, max_length=8, truncate="error")
  with pytest.raises(ValueError, match="truncate"):
    sp_tok.encode_batch(texts, max_length=8, truncate="right")


def test_decode_batch_stops_at_eos(sp_tok):
  a, b = sp_tok.encode("19+4=23. #### 23"), sp_tok.encode("#### 7")
  rows = [a + [sp_tok.eos_id] + sp_tok.encode("junk"), b + [sp_tok.eos_id]]
  width = max(map(len, rows))
  ids = np.full((2, width), sp_tok.pad_id, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  assert sp_tok.decode_batch(ids) == ["19+4=23. #### 23", "#### 7"]
  # Left-padded prompts without a mask: leading pads are skipped (pad != eos here).
  p_ids, _ = sp_tok.encode_batch(["Ann", "Ben has 3"])
  assert sp_tok.decode_batch(p_ids) == ["Ann", "Ben has 3"]


def test_hf_tokenizer_json_round_trip(hf_dir):
  tok = tokenizer_lib.load_tokenizer(hf_dir)
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert tok.eos_id == tok._tok.token_to_id("<|im_end|>")
  assert tok.pad_id == tok._tok.token_to_id("<|endoftext|>")
  assert tok.bos_id is None and not tok.add_bos_default
  text = "Question: Dee has 13 shells.\nAnswer: 13-3=10. #### 10"
  assert tok.decode(tok.encode(text)) == text
  ids, mask = tok.encode_batch([text, "Eve"], max_length=64)
  assert ids.shape == (2, 64) and mask[1, -1] == 1 and mask[1, 0] == 0
  assert tok.decode_batch(ids, mask) == [text, "Eve"]
  with pytest.raises(ValueError, match="no bos"):
    tok.encode_batch(["x"], add_bos=True)


def test_hf_tokenizer_needs_tokenizers_package(hf_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
  with pytest.raises(ImportError, match=r"grpo_jax\[hf\]"):
    tokenizer_lib.HFTokenizer(hf_dir / "tokenizer.json")


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.load_tokenizer(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tokenizer_lib.load_tokenizer(tmp_path)
  (tmp_path / "vocab.txt").write_text("a\n")
  with pytest.raises(ValueError, match="unknown tokenizer file"):
    tokenizer_lib.load_tokenizer(tmp_path / "vocab.txt")


def test_train_tokenizer_cli(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(_corpus(300)) + "\n")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), f"--corpus={corpus}",
       f"--model_prefix={tmp_path / 'cli'}", "--vocab_size=120"],
      capture_output=True, text=True, check=False, cwd=REPO)
  assert result.returncode == 0, result.stderr
  tok = tokenizer_lib.SentencePieceTokenizer(tmp_path / "cli.model")
  assert tok.vocab_size == 120 and tok.eos_id == 3
  assert tok.decode(tok.encode("Ann has 9 pens. #### 9")) == "Ann has 9 pens. #### 9"
