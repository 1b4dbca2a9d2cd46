"""Rule-based rewards and the reward-function interface.

A reward function is called as in TRL: `fn(completions=..., prompts=..., completion_ids=...,
completion_length=..., **columns) -> N numbers`, where each column is a field of the dataset
record by name, one value per completion (e.g. `final_answer=[...]`). It receives the arguments
it names, or all of them if it takes `**kwargs`. `score` runs several and checks what they return.
"""

from grpo_jax.rewards.scoring import (
    RewardFunctionError, Scored, call_reward, expand_columns, score, score_rows)
from grpo_jax.rewards.verifiable import (
    exact_answer_reward, extract_answer, format_reward, length_penalty, numbers_equal,
    overlong_penalty_reward, parse_number, soft_overlong_penalty)
