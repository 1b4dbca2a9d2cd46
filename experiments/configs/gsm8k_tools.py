"""Tool-integrated GRPO on GSM8K: a Hugging Face chat model that writes and runs Python.

  python -m experiments.train --config=experiments/configs/gsm8k_tools.py:qwen2.5-1.5b \\
      --config.model.hf_checkpoint=/path/to/Qwen2.5-Math-1.5B-Instruct \\
      --workdir=/tmp/gsm8k_tools     # GSM8K: hf:openai/gsm8k:main, or --config.data.path=DIR

Qwen2.5-Math's tool-integrated reasoning format: the model writes a ```python block, then
"```output" (the stop string that ends its turn); the program runs in the sandbox
(grpo_jax/sandbox.py: a child process as an unprivileged user, no network, CPU / memory /
process / file limits) and "\\n<output>\\n```\\n" is appended (loss mask 0) before the model
continues, up to `tools.max_turns` turns within the `max_completion_length` token budget (policy
and tool tokens together). Rewards score the policy's text (the answer is what the model wrote,
not what the tool printed) and read the whole episode through their `episodes` argument (README
"What rewards read of an episode"). Variants are those of gsm8k.py (qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen3-0.6b,
gemma3-1b, llama3.2-1b, smoke); the system prompt asks for programs. Models tuned for this
format (Qwen2.5-Math-*-Instruct) call the tool from the first step; others learn it slowly.
"""

from experiments.configs import gsm8k

SYSTEM = ("Please integrate natural language reasoning with programs to solve the problem. "
          "Write Python in a ```python block and end it with ```output to run it; you will see "
          "its output. End with the final answer as '#### <number>'.")


def get_config(arg: str = "qwen2.5-1.5b"):
  c = gsm8k.get_config(arg)
  c.data.system_prompt = SYSTEM
  g = c.grpo
  g.max_completion_length = 768  # policy + tool tokens of the whole episode
  c.tools = dict(env="python", max_turns=4, max_observation_tokens=128, slots=0, max_workers=8,
                 timeout_s=5.0, memory_mb=1024, stop_strings="```output",
                 code_pattern=r"```python\n(.*?)```", observation_template="\n{output}\n```\n",
                 # Tool code never sees home, the working directory, /root, the run's
                 # workdir, nor these (comma-separated); allow_unisolated: run it even where
                 # the sandbox cannot confine it (a throwaway machine only).
                 hidden_paths="", allow_unisolated=False)
  if arg == "smoke":  # the tiny random checkpoint of gsm8k.py's smoke
    g.max_completion_length = 24
    c.tools.update(max_turns=2, max_observation_tokens=16, max_workers=2, timeout_s=2.0,
                   memory_mb=256)
  return c
