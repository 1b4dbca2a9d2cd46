"""Rule-based rewards and the reward-function interface.

A reward function is called as in TRL: `fn(completions=..., prompts=..., completion_ids=...,
completion_length=..., **columns) -> N numbers`, where each column is a field of the dataset
record by name, one value per completion (e.g. `final_answer=[...]`). It receives the arguments
it names, or all of them if it takes `**kwargs`. `score` runs several and checks what they return.
A reward may return None for a row it does not apply to, as in TRL: the row's weighted sum is
over the rewards that apply (`weighted_sum`), per-reward means skip it (`reward_means`).
In multi-turn runs `completions`, `completion_ids` and `completion_length` are the policy's part
of each episode (tool output left out) and `episodes` the whole of it: per completion "text",
"length" (policy and tool tokens: what the budget counts), "turns", "tool_calls", "env_reward".
"""

from grpo_jax.rewards.scoring import (
    RewardFunctionError, Scored, call_reward, check_rows_rewarded, expand_columns, reward_means,
    score, score_rows, weighted_sum)
from grpo_jax.rewards.verifiable import (
    exact_answer_reward, extract_answer, format_reward, length_penalty, numbers_equal,
    overlong_penalty_reward, parse_number, soft_overlong_penalty)
