"""Rule-based rewards and the reward-function interface.

A reward function is `fn(completions: list[str], **columns) -> sequence of N floats`, where each
column is a dataset field by name, one value per completion (e.g. `final_answer=[...]`). Take
`**_` to ignore the columns you do not use. `score` runs several and checks what they return.
"""

from grpo_jax.rewards.scoring import RewardFunctionError, expand_columns, score
from grpo_jax.rewards.verifiable import (
    exact_answer_reward, extract_answer, format_reward, length_penalty, numbers_equal,
    overlong_penalty_reward, parse_number, soft_overlong_penalty)
