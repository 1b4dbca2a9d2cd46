"""Datasets: your files or a HF dataset (records.py), the generated arithmetic task, GSM8K, prompt
and chat templates, a resumable iterator.

Every dataset is a list of records (dicts): every column of the source row as written, plus
`question`, `solution` (the worked solution, "" if none) and `final_answer` (as a string). Reward
functions receive the records' columns by name (see `grpo_jax.rewards`).
"""

from grpo_jax.data.arithmetic import ArithmeticConfig, generate, make_splits
from grpo_jax.data.gsm8k import load_gsm8k, load_gsm8k_hf, load_gsm8k_jsonl, parse_gsm8k_answer
from grpo_jax.data.iterator import BatchIterator, collate, epoch_permutation
from grpo_jax.data.prompts import CHAT_TEMPLATES, chat_prompt, plain_prompt
from grpo_jax.data.records import FieldMap, load_split, to_record
