"""Trains a SentencePiece BPE tokenizer on a text corpus (one text per line) or on generated problems.

    python tools/train_tokenizer.py --corpus=corpus.txt --model_prefix=/tmp/tok --vocab_size=256
    python tools/train_tokenizer.py --arithmetic=20000 --model_prefix=/tmp/arith   # offline task

Writes `{model_prefix}.model` and `.vocab`. Ids: pad=0, unk=1, bos=2, eos=3; digits split; `####`
and newline are single pieces. The function behind it is
`grpo_jax.tokenizer_training.train_sentencepiece` (re-exported here) so the installed package can
train without this script.
"""

from __future__ import annotations

import argparse
import sys
import time

from grpo_jax.tokenizer_training import train_sentencepiece

__all__ = ["train_sentencepiece", "main"]


def arithmetic_corpus(num: int, seed: int) -> list[str]:
  """Prompt + worked solution texts of the offline task, as the tokenizer should see them."""
  from grpo_jax.data import arithmetic, prompts

  return [prompts.plain_prompt(r["question"]) + " " + r["answer"]
          for r in arithmetic.generate(num, seed)]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--corpus", help="text file, one training text per line")
  source.add_argument("--arithmetic", type=int, metavar="N",
                      help="train on N generated arithmetic problems instead")
  parser.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
  parser.add_argument("--vocab_size", type=int, default=256)
  parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
  parser.add_argument("--user_defined_symbols", default="####,\\n",
                      help="comma-separated; \\n stands for a newline")
  parser.add_argument("--seed", type=int, default=0, help="seed of --arithmetic")
  parser.add_argument("--hard_vocab_limit", action="store_true",
                      help="fail instead of shrinking the vocab when the corpus is too small")
  args = parser.parse_args(argv)

  symbols = [s.replace("\\n", "\n") for s in args.user_defined_symbols.split(",") if s]
  texts = arithmetic_corpus(args.arithmetic, args.seed) if args.arithmetic else None
  start = time.time()
  tok = train_sentencepiece(texts, corpus_path=args.corpus, model_prefix=args.model_prefix,
                            vocab_size=args.vocab_size, model_type=args.model_type,
                            user_defined_symbols=symbols, hard_vocab_limit=args.hard_vocab_limit)
  print(f"wrote {args.model_prefix}.model: vocab {tok.vocab_size}, "
        f"pad={tok.pad_id} bos={tok.bos_id} eos={tok.eos_id}, {time.time() - start:.2f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
