"""Tool-integrated GRPO, offline: arithmetic too large for the model's head, and a Python tool.

  python -m experiments.train --config=experiments/configs/tool_arithmetic.py --workdir=/tmp/tool
  python -m experiments.train --config=experiments/configs/tool_arithmetic.py:notool \\
      --workdir=/tmp/notool                      # the same budget without the tool
  python -m experiments.train --config=experiments/configs/tool_arithmetic.py:smoke  # tests

Problems "Ben packs 437 boxes of 86 cards. Ben finds 25 more. How many cards now?"
(grpo_jax/data/tool_arithmetic.py). The SFT teacher solves half of them with the tool, in
Qwen2.5-Math's format (```python ... ``` then "```output", the tool's output, "#### N"), and
half from its head; the tiny model cannot multiply 3 by 2 digits, so only the tool path can be
right. GRPO then samples episodes with the sandboxed Python tool (`config.tools`): every
"```output" stops the policy, the program runs in a child process (grpo_jax/sandbox.py) and its
output is appended (loss mask 0) before the policy continues. The `notool` variant trains on the
teacher's head-only solutions with tools off, at the same step budget: README "Tools" has the
3-seed table (tools/run_tool_seeds.py).
"""

from experiments.configs import arithmetic


def get_config(arg: str = "local"):
  variants = set(arg.split(","))
  if variants - {"local", "smoke", "notool"}:
    raise ValueError(f"tool_arithmetic config: unknown variant {arg!r} (local, smoke, notool)")
  c = arithmetic.get_config("smoke" if "smoke" in variants else "local")
  c.data.update(task="tool_arithmetic", num_train=4000, num_eval=200, tool_p=0.5)
  c.grpo.update(max_prompt_length=40, max_completion_length=55, steps=60, num_prompts=16,
                num_samples=8)
  c.model.overrides.max_position_embeddings = 128
  c.sft.steps = 400
  c.sft.optim.update(decay_steps=400, warmup_steps=20)
  c.eval.update(every=20, num_problems=200, batch_size=200, k=1, pass_k_problems=0)
  # The sandboxed Python tool (grpo_jax/python_tool.py); env "" = single-turn sampling.
  c.tools = dict(env="python", max_turns=2, max_observation_tokens=16, slots=0, max_workers=4,
                 timeout_s=2.0, memory_mb=256, stop_strings="```output",
                 code_pattern=r"```python\n(.*?)```", observation_template="\n{output}\n```\n",
                 # Tool code never sees home, the working directory, /root, the run's
                 # workdir, nor these (comma-separated); allow_unisolated: run it even where
                 # the sandbox cannot confine it (a throwaway machine only).
                 hidden_paths="", allow_unisolated=False)
  if "notool" in variants:  # the same task and budget, the teacher and the policy without tool
    c.data.tool_p = 0.0
    c.tools.env = ""
  if "smoke" in variants:
    c.data.update(num_train=256, num_eval=8)
    c.sft.steps = 6
    c.sft.optim.update(decay_steps=6, warmup_steps=2)
    c.grpo.update(steps=3, num_prompts=4, num_samples=4)
    c.eval.update(every=2, num_problems=8, batch_size=8)
    c.checkpoint.every = 1
  return c
