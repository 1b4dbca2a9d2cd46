"""chat.render against transformers' apply_chat_template on the real templates of Qwen2.5, Qwen3,
Llama 3.1/3.2 and Gemma 3 (fixtures in tests/data/chat_templates, sources in its README)."""

import json
import pathlib
import pickle

import pytest

from grpo_jax.data import chat

TEMPLATES = pathlib.Path(__file__).parent / "data" / "chat_templates"
DATE = "03 Feb 2025"  # Llama 3.x prints today's date unless given one

# name -> (fixture file, bos, eos, template kwargs) with the checkpoints' own special tokens.
MODELS = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", None, "<|im_end|>", {}),
    "qwen3-thinking": ("Qwen-Qwen3-0.6B.jinja", None, "<|im_end|>", {"enable_thinking": True}),
    "qwen3-no-thinking": ("Qwen-Qwen3-0.6B.jinja", None, "<|im_end|>", {"enable_thinking": False}),
    "qwen3-default": ("Qwen-Qwen3-0.6B.jinja", None, "<|im_end|>", {}),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                 {"date_string": DATE}),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                 {"date_string": DATE}),
    "gemma3": ("google-gemma-3-1b-it.jinja", "<bos>", "<eos>", {}),
}

SYSTEM = {"role": "system", "content": "Solve the problem step by step. End with '#### <number>'."}
USER = {"role": "user", "content": "Natalia sold clips to 48 of her friends. How many?  "}
ASSISTANT = {"role": "assistant", "content": "<think>\n48 clips.\n</think>\n\nShe sold 48.\n#### 48"}
FOLLOW_UP = {"role": "user", "content": "And half as many in May?"}

# (conversation, add_generation_prompt)
CONVERSATIONS = {
    "system+user": ([SYSTEM, USER], True),
    "user-only": ([USER], True),
    "multi-turn": ([SYSTEM, USER, ASSISTANT, FOLLOW_UP], True),
    "ends-with-assistant": ([USER, ASSISTANT], False),
}


def _template(name: str) -> str:
  return (TEMPLATES / MODELS[name][0]).read_text()


def _hf_tokenizer(template: str, bos: str | None, eos: str):
  """A transformers tokenizer built offline (one-word vocabulary): apply_chat_template only needs
  its template and special tokens."""
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast
  vocab = {"<unk>": 0}
  return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                 bos_token=bos, eos_token=eos, chat_template=template)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("model", list(MODELS))
def test_render_matches_transformers(model, conversation):
  pytest.importorskip("transformers")
  _, bos, eos, kwargs = MODELS[model]
  messages, add_generation_prompt = CONVERSATIONS[conversation]
  template = _template(model)
  expected = _hf_tokenizer(template, bos, eos).apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
  got = chat.render(template, messages, add_generation_prompt=add_generation_prompt,
                    bos_token=bos or "", eos_token=eos, **kwargs)
  assert got == expected


TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluates an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}


@pytest.mark.parametrize("model", ["qwen2.5", "qwen3-thinking", "llama3.1", "llama3.2"])
def test_render_with_tools_matches_transformers(model):
  """The tools branch exercises `tojson` (Llama: with indent=4) inside real templates."""
  pytest.importorskip("transformers")
  _, bos, eos, kwargs = MODELS[model]
  template = _template(model)
  expected = _hf_tokenizer(template, bos, eos).apply_chat_template(
      [SYSTEM, USER], tools=[TOOL], tokenize=False, add_generation_prompt=True, **kwargs)
  got = chat.render(template, [SYSTEM, USER], tools=[TOOL], bos_token=bos or "", eos_token=eos,
                    **kwargs)
  assert got == expected and "calculator" in got


def test_qwen3_thinking_switch():
  template = _template("qwen3-thinking")
  off = chat.render(template, [USER], enable_thinking=False)
  on = chat.render(template, [USER], enable_thinking=True)
  assert off == on + "<think>\n\n</think>\n\n"


def test_llama_date_lines():
  text = chat.render(_template("llama3.2"), [SYSTEM, USER], bos_token="<|begin_of_text|>",
                     date_string=DATE)
  assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                         "Cutting Knowledge Date: December 2023\nToday Date: 03 Feb 2025\n\n")


def test_gemma_rejects_non_alternating_roles():
  jinja2 = pytest.importorskip("jinja2")
  with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
    chat.render(_template("gemma3"), [USER, USER])


def test_environment_matches_transformers_extras():
  """tojson keeps non-ASCII and HTML characters, takes json.dumps' arguments; loopcontrols; the
  `{% generation %}` block renders its body."""
  template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
              "{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}|"
              "{{ m | tojson(separators=(',', ':')) }}{% endfor %}"
              "{% generation %}<{{ eos_token }}>{% endgeneration %}")
  messages = [{"role": "user", "content": "é <b> & 'x'"}, {"role": "user", "content": "never"}]
  expected = _hf_tokenizer(template, None, "</s>").apply_chat_template(messages, tokenize=False)
  assert chat.render(template, messages, add_generation_prompt=False, eos_token="</s>") == expected
  assert "never" not in expected and "é <b> & 'x'" in expected


def test_none_valued_keys_are_dropped_like_transformers():
  template = "{% for m in messages %}{{ 'tool_calls' in m }}{{ m.content }}{% endfor %}"
  messages = [{"role": "assistant", "content": "hi", "tool_calls": None}]
  assert chat.render(template, messages) == "Falsehi"
  assert messages[0]["tool_calls"] is None  # the caller's message is untouched


def test_prompt_fn():
  template = _template("llama3.2")
  to_prompt = chat.prompt_fn(template, system="Be brief.", bos_token="<|begin_of_text|>",
                             template_kwargs={"date_string": DATE})
  question = "What is 2 + 3?"
  assert to_prompt(question) == chat.render(
      template, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
      bos_token="<|begin_of_text|>", date_string=DATE)
  stripped = chat.prompt_fn(template, system="Be brief.", bos_token="<|begin_of_text|>",
                            strip_bos=True, template_kwargs={"date_string": DATE})
  assert "<|begin_of_text|>" + stripped(question) == to_prompt(question)
  # Pickles, so a data-loader worker process can use it.
  assert pickle.loads(pickle.dumps(stripped))(question) == stripped(question)


def test_prompt_fn_without_system_has_only_the_user_turn():
  to_prompt = chat.prompt_fn(_template("qwen3-no-thinking"),
                             template_kwargs={"enable_thinking": False})
  assert to_prompt("2+3?") == ("<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
                               "<think>\n\n</think>\n\n")


def test_prompt_fn_fails_fast_on_a_broken_template():
  jinja2 = pytest.importorskip("jinja2")
  with pytest.raises(jinja2.exceptions.TemplateSyntaxError):
    chat.prompt_fn("{% if %}")


def test_load_template_from_tokenizer_config_string(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{{ x }}"}))
  assert chat.load_template(str(tmp_path)) == "A{{ x }}"


def test_load_template_from_tokenizer_config_list(tmp_path):
  config = {"chat_template": [{"name": "tool_use", "template": "T"},
                              {"name": "default", "template": "D"}]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert chat.load_template(str(tmp_path)) == "D"


def test_load_template_list_without_default_raises(tmp_path):
  config = {"chat_template": [{"name": "tool_use", "template": "T"}]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="default"):
    chat.load_template(str(tmp_path))


def test_load_template_prefers_jinja_file(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
  (tmp_path / "chat_template.jinja").write_text(_template("gemma3"))
  assert chat.load_template(str(tmp_path)) == _template("gemma3")
  assert chat.load_template(f"file://{tmp_path}") == _template("gemma3")


def test_load_template_none_without_template(tmp_path):
  assert chat.load_template(str(tmp_path)) is None
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  assert chat.load_template(str(tmp_path)) is None


def test_load_template_malformed_json_names_the_file(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "A",')
  with pytest.raises(ValueError, match="tokenizer_config.json"):
    chat.load_template(str(tmp_path))


def test_missing_jinja2_tells_how_to_install(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_jinja2(name, *args, **kwargs):
    if name.startswith("jinja2"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  chat._environment.cache_clear()
  chat._compile.cache_clear()
  monkeypatch.setattr(builtins, "__import__", no_jinja2)
  try:
    with pytest.raises(ImportError, match=r"grpo_jax\[chat\]"):
      chat.render("{{ 1 }}", [])
  finally:
    monkeypatch.undo()
    chat._environment.cache_clear()
