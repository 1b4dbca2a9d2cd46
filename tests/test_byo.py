"""Bring your own reward and data: a reward module, a dataset and a config file that live outside
the repository train the offline smoke run; bad input fails before any compile, naming the field
or file:line; a reward that fails mid-run stops it with the last checkpoint intact."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import grpo_jax
from grpo_jax import checkpointing, experiment, metrics, reward_table, settings, tasks, trainer
from grpo_jax.data import arithmetic, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REWARDS_PY = '''
import json, os

CALLS = os.path.join(os.path.dirname(__file__), "calls.jsonl")


def probe(prompts, completions, **columns):
  """Logs what it receives; rewards a completion that names the target number."""
  with open(CALLS, "a") as f:
    f.write(json.dumps({"prompts": prompts, "completions": completions,
                        "columns": {k: v for k, v in columns.items()}}) + "\\n")
  return [float(str(t) in c) for c, t in zip(completions, columns["target"])]


def failing(completions, **_):
  n = sum(1 for _ in open(CALLS)) if os.path.exists(CALLS) else 0
  if n >= 3:  # the dry run and the first rollout pass, then it breaks
    raise RuntimeError("judge unreachable")
  return [0.0] * len(completions)


def no_completions(text):
  return [0.0]
'''

CONFIG_PY = '''
from experiments.configs import arithmetic


def get_config(arg="smoke"):
  c = arithmetic.get_config("smoke")
  c.data.task = "records"
  c.data.path = "{data}"
  c.data.fields.update(question="problem", answer="solution", final_answer="target", marker="")
  c.data.prompt_template = "Level {{difficulty}}. Q: {{problem}}\\nA:"
  c.grpo.reward_fns = dict(probe="{rewards}:probe", failing="{rewards}:failing")
  c.grpo.rewards.update(exact_answer=0.0, probe=1.0)  # failing: weight 1.0 (not listed)
  c.grpo.reward_errors = "zero"  # a failing reward scores its batch 0, counted in the metrics
  c.grpo.steps, c.grpo.num_prompts, c.eval.every, c.checkpoint.every = 2, 8, 0, 1
  c.sft.steps, c.eval.pass_k_problems = 0, 0  # seconds: no warm start, greedy eval only
  return c
'''


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
  """A dataset (GSM8K-like problems under other column names, one extra column), a reward module
  and a config file, all outside the repository."""
  d = tmp_path_factory.mktemp("byo")
  train, test = arithmetic.make_splits(160, 16, 3, flaw_p=0.0)
  data = d / "data"
  data.mkdir()
  for name, split in (("train", train), ("test", test)):
    with open(data / f"{name}.jsonl", "w") as f:
      for i, rec in enumerate(split):
        f.write(json.dumps({"problem": rec["question"], "solution": rec["answer"],
                            "target": int(rec["final_answer"]), "difficulty": i % 3}) + "\n")
  (d / "my_rewards.py").write_text(REWARDS_PY)
  (d / "my_config.py").write_text(CONFIG_PY.format(data=data, rewards=d / "my_rewards.py"))
  return d


def _config(byo):
  spec = importlib.util.spec_from_file_location("my_config", byo / "my_config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_own_reward_and_data_train_and_the_reward_sees_every_column(byo, tmp_path):
  cfg = _config(byo)
  final = grpo_jax.train(cfg, str(tmp_path / "run"))
  assert "eval/accuracy" in final
  calls = [json.loads(line) for line in open(byo / "calls.jsonl")]
  assert len(calls) == 1 + 2  # the dry run on two records, then one call per rollout
  call = calls[-1]
  n = 8 * 4  # prompts x samples
  assert len(call["completions"]) == len(call["prompts"]) == n
  cols = call["columns"]
  assert {"problem", "solution", "target", "difficulty", "question", "final_answer",
          "completion_ids", "completion_length"} <= set(cols)
  assert all(len(v) == n for v in cols.values())
  for p, problem, level in zip(call["prompts"], cols["problem"], cols["difficulty"]):
    assert p == f"Level {level}. Q: {problem}\nA:"  # the template over the record's columns
  assert cols["final_answer"] == [str(t) for t in cols["target"]]
  assert [len(ids) for ids in cols["completion_ids"]] == [
      length + (length < 24) for length in cols["completion_length"]]  # + EOS unless truncated
  rows = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "reward" in r]
  assert [r["reward_errors/failing"] for r in rows] == [0, 1]  # the second rollout's call failed
  assert [r["reward_errors/probe"] for r in rows] == [0, 0]
  assert all("reward/probe" in r and r["reward/failing"] == 0 for r in rows)


def test_a_reward_that_fails_mid_run_stops_it_and_loses_nothing(byo, tmp_path):
  (byo / "calls.jsonl").unlink(missing_ok=True)
  cfg = _config(byo)
  cfg.grpo.steps, cfg.grpo.reward_errors = 3, "raise"
  workdir = tmp_path / "run"
  with pytest.raises(grpo_jax.rewards.RewardFunctionError, match="failing raised RuntimeError: "
                     "judge unreachable"):
    grpo_jax.train(cfg, f"file://{workdir}")  # every file through etils.epath
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 1  # step 1 saved; step 2's rollout failed
  ckpt.close()
  assert [r["step"] for r in metrics.read_metrics(str(workdir)) if "reward" in r] == [1]
  assert {"config.json", "run.json", "tokenizer.model", "metrics.jsonl"} <= set(os.listdir(workdir))


def test_reward_functions_from_python_and_their_weights(byo):
  cfg = _config(byo)
  cfg.grpo.reward_fns = {}
  s = settings.from_config(cfg, 8)
  mine = lambda completions, **_: [1.0] * len(completions)  # noqa: E731
  rw = reward_table.reward_functions(s.rollout, s.reward_model, {"probe": mine, "bonus": mine})
  assert rw.names == ("probe", "bonus") and rw.weights == (1.0, 1.0)  # bonus: not in rewards
  cfg.grpo.rewards.probe = 0.5
  rw = reward_table.reward_functions(settings.from_config(cfg, 8).rollout, s.reward_model,
                              {"probe": mine})
  assert rw.weights == (0.5,)
  with pytest.raises(settings.ConfigError, match="unknown reward 'probe'"):
    reward_table.reward_functions(s.rollout, s.reward_model)
  with pytest.raises(settings.ConfigError, match="'format' is a built-in"):
    reward_table.reward_functions(s.rollout, s.reward_model, {"probe": mine, "format": mine})


def _no_compile(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("compiled programs for a bad input")
  monkeypatch.setattr(experiment, "_programs", fail)


def _bad_data(byo, tmp_path, line):
  data = tmp_path / "data"
  data.mkdir()
  good = (byo / "data" / "train.jsonl").read_text().splitlines()
  (data / "train.jsonl").write_text("\n".join(good[:5] + [line] + good[5:]) + "\n")
  (data / "test.jsonl").write_text((byo / "data" / "test.jsonl").read_text())
  return str(data / "train.jsonl")


@pytest.mark.parametrize("change, message", [
    (dict(reward_fns=dict(probe="no_such_module_xyz:fn")),
     r"config.grpo.reward_fns.probe = 'no_such_module_xyz:fn': cannot import no_such_module_xyz"),
    (dict(reward_fns=dict(probe="/nowhere/r.py:fn")), r"file /nowhere/r.py does not exist"),
    (dict(reward_fns=dict(probe="{byo}/my_rewards.py:nope")), r"has no function 'nope'"),
    (dict(reward_fns=dict(probe="{byo}/my_rewards.py:no_completions")),
     r"reward function probe failed: it needs \['text'\]"),
    (dict(reward_fns=dict(probe="my_rewards")), r"expected 'module:function'"),
    (dict(reward_errors="later"), r"config.grpo.reward_errors = 'later'"),
    (dict(question="nope"), r"train.jsonl:1: field 'nope' is missing or not text "
     r"\(config.data.fields.question\)"),
    (dict(prompt_template="{{level}}: {{problem}}"),
     r"config.data.prompt_template = '{{level}}: {{problem}}' names column 'level'"),
    (dict(line='{{"problem": "2+2", "solution": "4"}}'),
     r"train.jsonl:6: field 'target' is missing"),
    (dict(line="{{not json"), r"train.jsonl:6: malformed JSON"),
    (dict(path="/nowhere/data"), r"config.data.path: /nowhere/data does not exist"),
])
def test_bad_input_is_named_before_any_compile_and_loses_nothing(byo, tmp_path, monkeypatch,
                                                                  change, message):
  _no_compile(monkeypatch)
  cfg = _config(byo)
  cfg.grpo.reward_errors = "raise"
  for key, value in change.items():
    if key in ("reward_fns", "reward_errors"):
      if key == "reward_fns":
        value = {k: v.format(byo=byo) for k, v in value.items()}
      cfg.grpo[key] = value
    elif key == "question":
      cfg.data.fields.question = value
    elif key == "line":
      cfg.data.path = os.path.dirname(_bad_data(byo, tmp_path, value.format()))
    else:
      cfg.data[key] = value.format() if "{" in value else value
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 1, "phase": "grpo", "time": 0}\n')
  (workdir / "config.json").write_text("{}")
  with pytest.raises(settings.ConfigError, match=message.format(byo=byo)):
    trainer.train(cfg, str(workdir))
  assert sorted(os.listdir(workdir)) == ["config.json", "metrics.jsonl"]  # nothing written
  assert (workdir / "config.json").read_text() == "{}"


def test_the_launcher_names_a_bad_reward_in_one_line(byo, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={byo}/my_config.py",
       "--config.grpo.reward_fns.probe=no_such_module_xyz:fn", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.grpo.reward_fns.probe" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_template_from_the_checkpoint(tmp_path):
  """config.data.chat_template = "checkpoint": the prompt is the checkpoint's own Jinja template
  (tokenizer_config.json) around the prompt template, with the config's system prompt and
  template switches."""
  from grpo_jax.data import chat
  from experiments.configs import gsm8k as gsm8k_config
  template = (pathlib.Path(ROOT) / "tests/data/chat_templates/Qwen-Qwen3-0.6B.jinja").read_text()
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  cfg = gsm8k_config.get_config("qwen3-0.6b")
  cfg.model.hf_checkpoint = str(tmp_path)
  prompt = tasks.prompt_fn(settings.from_config(cfg, 8))
  got = prompt({"question": "What is 2 + 3?"})
  assert got == chat.render(template, [{"role": "system", "content": cfg.data.system_prompt},
                                       {"role": "user", "content": "What is 2 + 3?"}],
                            enable_thinking=False)
  assert got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(settings.ConfigError, match="has no chat template"):
    tasks.prompt_fn(settings.from_config(cfg, 8))


def test_records_formats_agree(byo, tmp_path):
  """jsonl, json and parquet of the same rows give the same records; a single file holds out
  its last num_eval rows."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [json.loads(line) for line in open(byo / "data" / "train.jsonl")]
  (tmp_path / "train.json").write_text(json.dumps(rows))
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
  fields = records.FieldMap(question="problem", answer="solution", final_answer="target",
                            marker="")
  want = records.load_split(str(byo / "data"), "train", fields)
  assert want[0]["difficulty"] == 0 and want[0]["final_answer"] == str(rows[0]["target"])
  for name in ("train.json", "train.parquet"):
    assert records.load_split(str(tmp_path / name), "train", fields) == want
  assert records.load_split("file://" + str(byo / "data"), "train", fields) == want
  cfg = _config(byo)
  cfg.data.update(path=str(tmp_path / "train.parquet"), eval_split="", num_eval=10)
  task = tasks.load_task(settings.from_config(cfg, 8))
  assert task.eval == want[-10:] and task.train == want[:-10][:cfg.data.num_train]


def test_hugging_face_datasets_source(byo, tmp_path, monkeypatch):
  """`hf:<name>` goes through `datasets.load_dataset` (here a local directory of jsonl splits,
  offline) and gives the records the jsonl reader gives."""
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  fields = records.FieldMap(question="problem", answer="solution", final_answer="target",
                            marker="")
  want = records.load_split(str(byo / "data"), "test", fields)
  assert records.load_split(f"hf:{byo / 'data'}", "test", fields) == want
