"""Chat prompts from a checkpoint's own Jinja chat template, rendered as transformers renders them.

    template = chat.load_template("/ckpt/Qwen3-0.6B")     # or "gs://bucket/ckpt"
    to_prompt = chat.prompt_fn(template, system="Solve step by step.",
                               template_kwargs={"enable_thinking": False})
    to_prompt("What is 2 + 3?")   # "<|im_start|>system\\nSolve ...<|im_start|>assistant\\n<think>..."

A model was trained on the exact bytes its template emits (Llama 3's date lines, Qwen3's empty think
block), so the prompt must come from that template, not from a hand-written copy of it. This is the
primary path; `prompts.CHAT_TEMPLATES` stays as the fallback for a checkpoint without a template.

`render` reproduces `tokenizer.apply_chat_template(messages, tokenize=False, ...)` without
transformers: the same sandboxed Jinja environment, filters and globals. jinja2 is imported lazily,
so only users of chat templates need it (`pip install 'grpo_jax[chat]'`).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Callable

from grpo_jax import paths

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def load_template(checkpoint_dir: str) -> str | None:
  """The chat template of a Hugging Face checkpoint directory, or None if it has none.

  Newer transformers save the template as `chat_template.jinja`; older ones inside
  `tokenizer_config.json`, as a string or as a list of named templates (we take "default", the
  one `apply_chat_template` uses). The .jinja file wins, as it does in transformers.
  """
  directory = paths.as_path(checkpoint_dir)
  jinja_file = directory / TEMPLATE_FILE
  if jinja_file.exists():
    return jinja_file.read_text()
  config_file = directory / TOKENIZER_CONFIG_FILE
  if not config_file.exists():
    return None
  try:
    config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{config_file} holds a {type(config).__name__}, not a JSON object")
  return _template_from_config(config.get("chat_template"), config_file)


def _template_from_config(value: Any, config_file) -> str | None:
  """`tokenizer_config.json`'s `chat_template` value as one template string."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
    if "default" in named:
      return named["default"]
    # Picking another by position would silently prompt with a tool-use or RAG variant.
    raise ValueError(f"{config_file}: chat_template list has no 'default' entry "
                     f"(names: {sorted(str(name) for name in named)})")
  raise ValueError(f"{config_file}: chat_template is a {type(value).__name__}, "
                   "expected a string or a list of {'name', 'template'} dicts")


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
  """`template` applied to `messages`, byte for byte what `apply_chat_template(...,
  tokenize=False)` returns.

  As there, `tools` and `documents` are defined (as None) unless given, and message keys whose
  value is None are dropped (templates test `'key' in message`, and many print a literal "None").
  kwargs are template variables, e.g. `enable_thinking=False` (Qwen3) or `date_string="26 Jul
  2024"` (Llama 3.x, which otherwise prints today's date).
  """
  context = {"tools": None, "documents": None, "bos_token": bos_token, "eos_token": eos_token,
             **kwargs}
  return _compile(template).render(messages=_without_none(messages),
                                   add_generation_prompt=add_generation_prompt, **context)


def prompt_fn(template: str, *, system: str = "", bos_token: str = "", eos_token: str = "",
              strip_bos: bool = False,
              template_kwargs: dict[str, Any] | None = None) -> Callable[[str], str]:
  """question -> prompt: a user turn (after a system turn if `system` is non-empty) and the
  assistant header the model continues from.

  `strip_bos` drops a leading `bos_token` from the prompt, for a tokenizer that adds BOS itself (a
  second BOS shifts the model off its training distribution). The template is compiled here, so a
  broken one fails at set-up rather than on the first question. The result is a
  `functools.partial` of module-level code, so it pickles into data-loader worker processes.
  """
  _compile(template)
  return functools.partial(_prompt, template, system=system, bos_token=bos_token,
                           eos_token=eos_token, strip_bos=strip_bos,
                           template_kwargs=dict(template_kwargs or {}))


def _prompt(template: str, question: str, *, system: str, bos_token: str, eos_token: str,
            strip_bos: bool, template_kwargs: dict[str, Any]) -> str:
  messages = [{"role": "system", "content": system}] if system else []
  messages.append({"role": "user", "content": question})
  text = render(template, messages, add_generation_prompt=True, bos_token=bos_token,
                eos_token=eos_token, **template_kwargs)
  if strip_bos and bos_token and text.startswith(bos_token):
    text = text[len(bos_token):]
  return text


def _without_none(messages: list[dict]) -> list[dict]:
  """Copies of the messages without None-valued keys, as transformers normalises them."""
  return [{key: value for key, value in message.items() if value is not None}
          for message in messages]


@functools.lru_cache(maxsize=32)
def _compile(template: str):
  """The compiled template; compiling costs milliseconds, rendering microseconds, and a data
  pipeline renders the same template once per example."""
  return _environment().from_string(template)


@functools.lru_cache(maxsize=None)
def _environment():
  """The Jinja environment transformers builds in `chat_template_utils._compile_jinja_template`.

  Templates are code from the checkpoint's author, so they run sandboxed and cannot mutate what we
  pass in. trim_blocks/lstrip_blocks, loopcontrols (`{% break %}`), `tojson` without HTML
  escaping, `raise_exception` and `strftime_now` are what Hub templates are written against.
  """
  try:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
  except ImportError as e:
    raise ImportError("chat templates need jinja2: pip install 'grpo_jax[chat]'") from e

  class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' loss mask;
    as text it renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(format):
    return datetime.datetime.now().strftime(format)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env
