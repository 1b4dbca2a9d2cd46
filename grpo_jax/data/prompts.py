"""Prompt templates: plain text and chat, as plain format strings (no tokenizer involved).

A chat template is a string with a `{question}` field and optionally a `{system}` field, e.g.
`CHAT_TEMPLATES["qwen"]`. Pass your model's template string; nothing here depends on a tokenizer.

The primary path is `chat.py`, which renders the checkpoint's own Jinja template (exact date
lines, Qwen3's thinking switch); this table is the fallback for a checkpoint without one.
"""

from __future__ import annotations

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"

CHAT_TEMPLATES = {
    "qwen": ("<|im_start|>system\n{system}<|im_end|>\n"
             "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"),
    "gemma": "<start_of_turn>user\n{system}\n\n{question}<end_of_turn>\n<start_of_turn>model\n",
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}

DEFAULT_SYSTEM = ("Solve the problem step by step. "
                  "End with the final answer as '#### <number>'.")


def plain_prompt(question: str, template: str = PLAIN_TEMPLATE) -> str:
  """`"Question: {question}\\nAnswer:"`; the model continues after "Answer:"."""
  return template.format(question=question.strip())


def chat_prompt(question: str, template: str, *, system: str = DEFAULT_SYSTEM) -> str:
  """Fills a chat template string; `{system}` is optional in the template (Gemma has no system
  role, so its template puts the system text at the top of the user turn)."""
  if "{question}" not in template:
    raise ValueError("chat template must contain '{question}'")
  return template.format(question=question.strip(), system=system)
