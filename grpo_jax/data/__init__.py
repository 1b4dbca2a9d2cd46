"""Datasets: the procedurally generated arithmetic task, GSM8K, prompt templates, a resumable iterator.

Every dataset is a list of records (dicts) with at least `question`, `answer` (the full worked
solution ending in `#### N`) and `final_answer` (N as a string). Reward functions receive the
records' columns by name (see `grpo_jax.rewards`).
"""

from grpo_jax.data.arithmetic import ArithmeticConfig, generate, make_splits
from grpo_jax.data.gsm8k import load_gsm8k, load_gsm8k_hf, load_gsm8k_jsonl, parse_gsm8k_answer
from grpo_jax.data.iterator import BatchIterator, collate, epoch_permutation
from grpo_jax.data.prompts import CHAT_TEMPLATES, chat_prompt, plain_prompt
