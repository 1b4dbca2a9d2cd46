"""Tool-integrated GRPO: the Python tool environment, SFT targets without loss on tool output,
config errors, hostile programs during a training run, exact resume of a multi-turn run."""

import itertools
import json
import os
import threading

import numpy as np
import pytest

import grpo_jax
from experiments.configs import tool_arithmetic as tool_config
from grpo_jax import metrics, python_tool, sandbox, settings, tasks
from grpo_jax.data import tool_arithmetic
from grpo_jax.multiturn import EnvStep
from grpo_jax.tokenizer_training import train_sentencepiece
import test_trainer  # tests/ is on sys.path (pytest rootdir-less import mode), as multihost_worker

TIMING = test_trainer.TIMING + ("episode/tool_s", "episode/decode_s")
TOOL_SMOKE = ["--config=experiments/configs/tool_arithmetic.py:smoke"]


def test_python_tool_answers_every_program_with_text():
  tool = python_tool.PythonTool(timeout_s=1.0, memory_mb=128, cache=False)
  run = lambda code: tool.step((), f"Let me compute.\n```python\n{code}\n```\n```output")[1]  # noqa: E731
  out = run("print(437*86+25)")
  assert out.observation == "\n37607\n```\n" and out.info["status"] == "ok" and not out.done
  out = run("print(1/0)")
  assert out.observation == "\nZeroDivisionError: division by zero\n```\n"
  assert out.info["status"] == "error"
  out = run("while True:\n  pass")
  assert out.info["status"] == "timeout" and "TimeoutError" in out.observation
  out = tool.step((), "no code here ```output")[1]
  assert out.info["status"] == "no_code" and out.observation.startswith("\nSyntaxError")
  # the LAST block of the turn runs
  out = tool.step((), "```python\nprint(1)\n```\n```python\nprint(2)\n```\n```output")[1]
  assert out.observation == "\n2\n```\n"
  assert tool.observation("x" * 1000).count("x") == tool.max_output_chars


def test_teacher_segments_and_targets_mask_the_tool_output():
  train, _ = tool_arithmetic.make_splits(8, 2, seed=0, tool_p=0.5)
  tool = python_tool.PythonTool()
  with_tool = next(r for r in train if r["uses_tool"])
  head = next(r for r in train if not r["uses_tool"])
  parts = tool.teacher_segments(with_tool["answer"])
  assert "".join(t for t, _ in parts) == with_tool["answer"]
  assert [is_obs for _, is_obs in parts] == [False, True, False]
  assert parts[0][0].endswith("```output")
  assert parts[1][0] == f"\n{with_tool['final_answer']}\n```\n"
  assert tool.teacher_segments(head["answer"]) == [(head["answer"], False)]
  # the tool's answer is right: the teacher's output block is what the sandbox prints
  code = tool.step((), parts[0][0])[1]
  assert code.observation == parts[1][0]

  tok = train_sentencepiece([r["question"] + " " + r["answer"] for r in train], vocab_size=120)
  targets = tasks.encode_targets(tok, [with_tool, head], 80, tool)
  enc = [tok.encode(" " + parts[0][0]), tok.encode(parts[1][0]), tok.encode(parts[2][0])]
  n = sum(map(len, enc))
  assert targets.ids_NxC[0, :n + 1].tolist() == enc[0] + enc[1] + enc[2] + [tok.eos_id]
  expect = [1] * len(enc[0]) + [0] * len(enc[1]) + [1] * (len(enc[2]) + 1)
  assert targets.mask_NxC[0, :n + 1].tolist() == expect and targets.mask_NxC[0, n + 1:].sum() == 0
  plain = tasks.encode_targets(tok, [head], 80)  # no tool: the whole solution is the policy's
  np.testing.assert_array_equal(targets.ids_NxC[1], plain.ids_NxC[0])
  np.testing.assert_array_equal(targets.mask_NxC[1], plain.mask_NxC[0])


@pytest.mark.parametrize("change, message", [
    (lambda c: c.reward_model.update(enabled=True), "learned reward model"),
    (lambda c: c.tools.update(code_pattern="(unclosed"), "config.tools.code_pattern"),
    (lambda c: c.tools.update(observation_template="no placeholder"),
     "config.tools.observation_template"),
    (lambda c: c.tools.update(slots=5), "config.tools.slots = 5"),
    (lambda c: c.tools.update(max_turns=0), "config.tools.max_turns = 0"),
    (lambda c: c.tools.update(stop_strings=""), "config.tools.stop_strings"),
    (lambda c: c.tools.update(hidden_paths="/data,relative/dir"), "config.tools.hidden_paths"),
])
def test_tool_config_errors_name_the_field(change, message):
  cfg = tool_config.get_config("smoke")
  change(cfg)
  with pytest.raises(settings.ConfigError, match=message):
    settings.from_config(cfg, 1)


def test_env_factory_errors_name_the_field():
  cfg = tool_config.get_config("smoke")
  cfg.tools.env = "no_such_module_xyz:make"
  s = settings.from_config(cfg, 1)
  with pytest.raises(settings.ConfigError, match="config.tools.env"):
    tasks.make_env(s)


class HostileTool(python_tool.PythonTool):
  """Ends a turn at every "1" the policy writes and answers the first calls with hostile
  programs (each once), later ones with a plain echo."""

  def __new__(cls, programs):
    return super().__new__(cls)

  def __init__(self, programs):
    super().__init__(stop_strings=("1",), timeout_s=1.0, memory_mb=128, cache=False)
    object.__setattr__(self, "programs", list(programs))
    object.__setattr__(self, "counter", itertools.count())
    object.__setattr__(self, "results", {})  # call number -> ToolResult
    object.__setattr__(self, "lock", threading.Lock())

  def step(self, state, text):
    with self.lock:
      i = next(self.counter)
    code = self.programs[i] if i < len(self.programs) else "print('echo')"
    result = sandbox.run_python(code, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
    with self.lock:
      self.results[i] = result
    return state, EnvStep(self.observation(python_tool.describe(result)),
                          info={"status": result.status})


def test_hostile_programs_during_training_leave_the_run_intact(tmp_path, monkeypatch):
  """Eight hostile programs as tool calls inside a GRPO run: every one comes back as an
  observation, the run finishes, its workdir is untouched and no secret leaks."""
  monkeypatch.setenv("GRPO_TEST_SECRET", "s3cret-7781")
  workdir = tmp_path / "run"
  target = workdir / "planted"
  programs = [
      "while True:\n  pass",
      "import os\nwhile True:\n  os.fork()",
      "x = bytearray(2 * 1024**3)",
      "print('x' * 5_000_000)",
      f"open({str(target)!r}, 'w').write('pwned')\n"
      f"open({str(workdir / 'config.json')!r}, 'w').write('pwned')",
      "import os\nprint(dict(os.environ))\n"
      "print(open(f'/proc/{os.getppid()}/environ', 'rb').read())",
      "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
      "import ctypes\nctypes.string_at(0)",
  ]
  env = HostileTool(programs)
  cfg = tool_config.get_config("smoke")
  cfg.sft.steps = 2
  cfg.grpo.num_prompts = 8  # rows over the 8 simulated devices: multi-turn on a mesh too
  final = grpo_jax.train(cfg, str(workdir), env=env)
  assert 0.0 <= final["eval/accuracy"] <= 1.0
  assert len(env.results) >= len(programs), "the policy made too few calls: test is vacuous"
  statuses = [env.results[i].status for i in range(len(programs))]
  assert statuses[0] == "timeout" and statuses[2] == "memory" and statuses[7] == "killed"
  assert statuses[1] != "ok" and statuses[4] == "error" and statuses[6] == "error"
  assert env.results[3].truncated and len(env.results[3].stdout) <= 16384
  assert all("s3cret-7781" not in r.stdout + r.stderr for r in env.results.values())
  assert not target.exists()
  json.load(open(workdir / "config.json"))  # still the trainer's
  rows = metrics.read_metrics(workdir)
  grpo = [r for r in rows if r.get("phase") == "grpo" and "reward" in r]
  assert len(grpo) == cfg.grpo.steps and all(r["episode/tool_calls"] > 0 for r in grpo)
  assert any(r.get("episode/tool_timeout", 0) > 0 for r in grpo)


def _comparable(workdir):
  return [{k: v for k, v in row.items() if k not in TIMING}
          for row in metrics.read_metrics(workdir)]


def test_multi_turn_run_resumes_exactly_after_sigkill(tmp_path, monkeypatch):
  """Stop strings that the smoke policy writes all the time ("1"), answered by the tool (no
  code block: a deterministic error text): killed during GRPO, resumed, the metrics equal the
  uninterrupted run's."""
  flags = TOOL_SMOKE + ["--config.tools.stop_strings=1"]
  reference = tmp_path / "reference"
  code, out = test_trainer.launch(reference, *flags)
  assert code == 0, out[-4000:]
  rows = metrics.read_metrics(reference)
  assert all(r["episode/tool_calls"] > 0 for r in rows if "episode/tool_calls" in r)
  monkeypatch.setattr(test_trainer, "comparable", _comparable)
  sft_lines = sum(r["phase"] == "sft" for r in rows)
  test_trainer.assert_kill_and_resume_is_exact(reference, tmp_path / "killed", flags,
                                               sft_lines + 2)


def test_gsm8k_tools_config_on_a_tiny_random_checkpoint(tmp_path):
  """experiments/configs/gsm8k_tools.py end to end on a tiny random Qwen2 checkpoint and GSM8K
  (the shared copy, or a generated stand-in): the random policy's turns end at every "e" it
  writes (a stop string inside tokens: the host's text check cuts them), the tool answers, the
  run trains and evaluates with the episodes."""
  import jax
  from grpo_jax import models
  data_dir = (test_trainer.GSM8K_DIR if os.path.isdir(test_trainer.GSM8K_DIR)
              else test_trainer._gsm8k_fixture(tmp_path))  # pylint: disable=protected-access
  records = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))][:200]
  tok = train_sentencepiece([r["question"] + " " + r["answer"] for r in records],
                            model_prefix=str(tmp_path / "tok"), vocab_size=300)
  config = models.get_config("tiny_qwen2", vocab_size=tok.vocab_size)
  models.save_hf_checkpoint(tmp_path / "tiny", config, models.init_params(config, jax.random.key(0)))
  code, out = test_trainer.launch(
      tmp_path / "run", "--config=experiments/configs/gsm8k_tools.py:smoke",
      f"--config.model.hf_checkpoint={tmp_path / 'tiny'}",
      f"--config.tokenizer.path={tmp_path / 'tok.model'}", f"--config.data.path={data_dir}",
      "--config.tools.stop_strings=e")
  assert code == 0, out[-4000:]
  rows = metrics.read_metrics(tmp_path / "run")
  grpo = [r for r in rows if "reward" in r]
  assert [r["step"] for r in grpo] == [1, 2]
  assert all(r["episode/tool_calls"] > 0 and r["episode/env_token_fraction"] > 0 for r in grpo)
  assert "eval/tool_calls" in [r for r in rows if "eval/accuracy" in r][-1]
  report = json.load(open(tmp_path / "run" / "run.json"))["tool_isolation"]  # what confined it
  assert report["confined"] and os.path.realpath(tmp_path / "run") in report["hidden"]
  assert "tool sandbox: confined=True" in out
