"""The GRPO experiment end to end: launcher, metrics, checkpoints, exact resume after SIGKILL,
GSM8K on a tiny random checkpoint, and clear errors for bad input.

The launcher runs in subprocesses (1 CPU device, as a user runs it); one run goes in-process on
the 8 simulated devices to cover the data-parallel path.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker as mw
from experiments.configs import arithmetic as arithmetic_config
from experiments.configs import gsm8k as gsm8k_config
from grpo_jax import (metrics, models, reward_table, rollout, settings, tasks,
                      tensorboard, trainer, updates)
from grpo_jax.data import arithmetic
from grpo_jax.tokenizer_training import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=experiments/configs/arithmetic.py:smoke"]
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
# Figures that measure time, not what the run computed.
TIMING = ("time", "update_s", "sample_s", "score_s", "eval_s", "tok_per_s", "step_s", "wait_s")


def launch(workdir, *flags, wait=True, env_extra=None):
  env = mw.subprocess_env(1)  # conftest's XLA flags and compilation cache, 1 device
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def comparable(workdir):
  return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics.read_metrics(workdir)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  code, out = launch(workdir, *SMOKE)
  assert code == 0, out[-4000:]
  return workdir, out


def test_launcher_writes_metrics_checkpoints_samples(reference_run):
  workdir, out = reference_run
  assert "final eval:" in out and "grpo" in out
  rows = metrics.read_metrics(workdir)
  phases = {r["phase"] for r in rows}
  assert phases == {"sft", "grpo"}
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2, 4]  # step 0 = after the warm start, every 2, end
  assert all(0.0 <= r["eval/accuracy"] <= 1.0 and "eval/pass_at_4" in r for r in evals)
  grpo = [r for r in rows if r["phase"] == "grpo" and "reward" in r]
  assert [r["step"] for r in grpo] == [1, 2, 3, 4]
  for key in ("loss", "reward", "clip_frac", "completion_length", "grad_norm", "sample_s",
              "update_s", "tok_per_s"):
    assert key in grpo[0], key
  sft = [r for r in rows if r["phase"] == "sft"]
  assert len(sft) == 6 and sft[-1]["nll"] < sft[0]["nll"]  # the warm start learns
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  assert os.path.exists(os.path.join(workdir, "samples.jsonl"))
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
  assert tensorboard.read_tensorboard_scalars(os.path.join(workdir, "tb"))["grpo/reward"]
  json.load(open(os.path.join(workdir, "config.json")))


def _finished_checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


def _kill_when(proc, workdir, min_lines):
  """SIGKILL once the metrics file has `min_lines` lines and a checkpoint is finalised."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      break
    if (os.path.exists(path) and sum(1 for _ in open(path)) >= min_lines
        and _finished_checkpoints(workdir)):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.05)
  return False


def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
  """Killed during SFT (4 lines), resumed, the resumed run killed during GRPO (12 lines), resumed
  again: every segment's metrics are the uninterrupted run's."""
  assert_kill_and_resume_is_exact(reference_run[0], tmp_path / "killed", SMOKE, 4, 12)


def assert_kill_and_resume_is_exact(reference_workdir, workdir, flags, *kill_after_lines):
  """SIGKILL a run of `flags` after `kill_after_lines[0]` metrics lines and a checkpoint, resume
  it (SIGKILL that resumed run after `kill_after_lines[1]` lines, and so on), let the last resume
  finish, and compare its metrics with the uninterrupted run's: bitwise (same floats, steps,
  order). A kill point must lie past the lines the run before it left behind."""
  assert kill_after_lines
  for i, lines in enumerate(kill_after_lines):
    proc = launch(workdir, *flags, wait=False)
    killed = _kill_when(proc, workdir, lines)
    out = proc.communicate(timeout=60)[0]
    assert killed, f"the run finished before it could be killed after {lines} lines: {out[-3000:]}"
    assert i == 0 or "resumed from" in out, out[-4000:]
  code, out = launch(workdir, *flags)
  assert code == 0, out[-4000:]
  assert "resumed from" in out
  assert comparable(workdir) == comparable(reference_workdir)


def test_corrupted_latest_checkpoint_falls_back_and_resumes_exactly(reference_run, tmp_path):
  """A half-copied latest checkpoint: the run says which step and path it cannot read, moves it
  aside, resumes from the one before (keep = 2) and ends with the uninterrupted metrics."""
  import shutil
  workdir = tmp_path / "copied"
  shutil.copytree(reference_run[0], workdir)
  steps = sorted(int(n) for n in _finished_checkpoints(workdir))
  assert len(steps) == 2, steps  # keep = 2
  latest = workdir / "checkpoints" / str(steps[-1])
  for path in (latest / "state").rglob("*"):
    if path.is_file():  # truncated to half: what an interrupted copy leaves
      data = path.read_bytes()
      path.write_bytes(data[:len(data) // 2])
  code, out = launch(workdir, *SMOKE)
  assert code == 0, out[-4000:]
  assert f"fell back to step {steps[0]}" in out and str(latest) in out
  assert (workdir / "checkpoints.corrupt" / str(steps[-1])).is_dir()  # kept, not deleted
  assert comparable(workdir) == comparable(reference_run[0])


def test_data_parallel_run_in_process(tmp_path):
  """The same smoke experiment on the 8 simulated devices (mesh data=8)."""
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.num_prompts = 8
  cfg.grpo.steps = 2
  assert jax.device_count() == 8
  final = trainer.train(cfg, str(tmp_path))
  assert 0.0 <= final["eval/accuracy"] <= 1.0
  rows = metrics.read_metrics(tmp_path)
  assert any(r.get("phase") == "grpo" and np.isfinite(r.get("loss", np.nan)) for r in rows)


def test_gsm8k_config_on_a_tiny_random_checkpoint(tmp_path):
  data_dir = GSM8K_DIR if os.path.isdir(GSM8K_DIR) else _gsm8k_fixture(tmp_path)
  records = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))][:200]
  ckpt = tmp_path / "tiny"
  tok = train_sentencepiece([r["question"] + " " + r["answer"] for r in records],
                            model_prefix=str(tmp_path / "tok"), vocab_size=300)
  config = models.get_config("tiny_qwen2", vocab_size=tok.vocab_size)
  models.save_hf_checkpoint(ckpt, config, models.init_params(config, jax.random.key(0)))
  code, out = launch(tmp_path / "run", "--config=experiments/configs/gsm8k.py:smoke",
                     f"--config.model.hf_checkpoint={ckpt}",
                     f"--config.tokenizer.path={tmp_path / 'tok.model'}",
                     f"--config.data.path={data_dir}")
  assert code == 0, out[-4000:]
  rows = metrics.read_metrics(tmp_path / "run")
  assert [r["step"] for r in rows if "reward" in r] == [1, 2]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]


def _gsm8k_fixture(tmp_path):
  d = tmp_path / "gsm8k"
  d.mkdir()
  for split in ("train", "test"):
    with open(d / f"{split}.jsonl", "w") as f:
      for r in arithmetic.generate(300, 0, split=split):
        f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
  return str(d)


@pytest.mark.parametrize("flags, message", [
    (["--config.grpo.num_samples=1"], "config.grpo.num_samples = 1"),
    (["--config.grpo.num_prompts=3", "--config.grpo.micro_batch_size=5"],
     "config.grpo.micro_batch_size = 5"),
    (["--config.grpo.rewards.exact_answer=0.0"], "all weights are 0"),
    (["--config.mesh.data=3"], "config.mesh"),
    (["--config.grpo.loss.policy_loss=ppo2"], "config.grpo.loss: loss: unknown policy_loss"),
])
def test_bad_config_is_a_clear_error(tmp_path, flags, message):
  code, out = launch(tmp_path / "bad", *SMOKE, *flags)
  assert code == 2, out[-3000:]
  assert message in out and "Traceback" not in out


def test_unknown_reward_names_it():
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.rewards.unlock()
  cfg.grpo.rewards.nonsense = 1.0
  s = settings.from_config(cfg, 1)
  with pytest.raises(settings.ConfigError, match="unknown reward 'nonsense'"):
    reward_table.reward_functions(s.rollout, s.reward_model)


def test_unknown_config_key_and_missing_paths(tmp_path):
  code, out = launch(tmp_path / "a", *SMOKE, "--config.grpo.num_sample=4")
  assert code == 2 and "num_sample" in out and "Traceback" not in out
  code, out = launch(tmp_path / "b", "--config=experiments/configs/gsm8k.py:smoke",
                     "--config.data.path=/nonexistent/gsm8k")
  assert code == 2 and "/nonexistent/gsm8k" in out and "Traceback" not in out


def test_malformed_jsonl_names_file_and_line(tmp_path):
  d = tmp_path / "gsm"
  d.mkdir()
  (d / "train.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{not json\n')
  (d / "test.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
  cfg = gsm8k_config.get_config("smoke")
  cfg.data.path = str(d)
  with pytest.raises(settings.ConfigError, match=r"train.jsonl:2"):
    tasks.load_task(settings.from_config(cfg, 1))


def _fixed_rewards(monkeypatch, fn):
  monkeypatch.setattr(reward_table, "reward_functions",
                      lambda r, rm, extra=None: reward_table.Rewards((fn,), ("r",), (1.0,)))


def _record_updates(monkeypatch, seen):
  """Every batch an update step gets (the trainer's step queues it with dispatch_update)."""
  real = updates.dispatch_update
  monkeypatch.setattr(updates, "dispatch_update", lambda device, g, state, ready, frozen=None: (
      seen.append(jax.device_get(ready.batch)), real(device, g, state, ready, frozen))[1])


@pytest.mark.parametrize("algorithm", ["sft", "rft", "online_rft"])
def test_paradigm_baselines_use_their_data(tmp_path, algorithm, monkeypatch):
  """Each unified-paradigm baseline trains on its own data source with its own coefficient."""
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.algorithm, cfg.grpo.num_prompts, cfg.grpo.steps = algorithm, 8, 2
  cfg.eval.every = 0
  sampled_with, batches = [], []
  real_collect = rollout.collect

  def collect(data, sampler, r, params, *args, **kw):
    if params is not None:  # teacher data: nothing sampled
      sampled_with.append(np.asarray(jax.tree.leaves(params)[0]))  # before donation
    return real_collect(data, sampler, r, params, *args, **kw)

  monkeypatch.setattr(rollout, "collect", collect)
  _record_updates(monkeypatch, batches)
  # Every other completion "correct", so the coefficient is not all zero and the policy moves.
  _fixed_rewards(monkeypatch, lambda completions, **_: [float(i % 2) for i in range(len(completions))])
  trainer.train(cfg, str(tmp_path))
  assert len(batches) == 2
  if algorithm == "sft":  # teacher solutions of 32 distinct problems, coefficient 1
    np.testing.assert_array_equal(batches[0].advantages, 1.0)
    assert len({row.tobytes() for row in batches[0].prompt_tokens}) == 32
    return
  for batch in batches:  # gradient coefficient 1[correct]
    np.testing.assert_array_equal(batch.advantages, np.arange(len(batch.advantages)) % 2)
  same = bool(np.array_equal(*sampled_with))
  # RFT samples from the frozen warm start; Online RFT from the live (updated) policy.
  assert same == (algorithm == "rft")


ITERATIVE = ["--config=experiments/configs/paradigm.py:iterative_grpo,smoke"]


@pytest.fixture(scope="module")
def iterative_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("iterative")
  code, out = launch(workdir, *ITERATIVE)
  assert code == 0, out[-4000:]
  return workdir


def test_iterative_grpo_replay_reference_reset_and_rm_continuation(iterative_run):
  rows = metrics.read_metrics(iterative_run)
  rm_rows = [r for r in rows if r["phase"] == "rm"]
  assert [r["step"] for r in rm_rows] == [0, 2]  # before GRPO, then every 2 steps
  first, second = rm_rows
  assert first["rm/replayed_rows"] == 0  # no history yet
  # 10% of the mixed set is replayed history: round(0.1 / 0.9 * new) rows.
  assert second["rm/replayed_rows"] == round(0.1 / 0.9 * second["rm/new_rows"])
  assert second["rm/history_rows"] == first["rm/history_rows"] + second["rm/new_rows"]
  # The RM keeps training (one state, continued): history includes every new row once.
  assert second["rm/new_rows"] == 2 * 16  # two GRPO steps of 4 prompts x 4 samples
  grpo = {r["step"]: r for r in rows if r["phase"] == "grpo" and "kl" in r}
  # Reference reset to the policy at the iteration boundary: the first update after it has
  # KL exactly 0 (mu = 1: policy == reference), the one before it does not.
  assert grpo[3]["kl"] == 0.0 and grpo[2]["kl"] > 0.0
  assert "reward/reward_model" in grpo[1]


def test_iterative_grpo_resume_mid_iteration_is_exact(iterative_run, tmp_path):
  assert_kill_and_resume_is_exact(iterative_run, tmp_path / "killed", ITERATIVE, 6)


def test_process_supervision_uses_per_token_step_advantages(tmp_path, monkeypatch):
  from experiments.configs import paradigm
  cfg = paradigm.get_config("grpo_process,smoke")
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.eval.every = 8, 1, 0
  seen = []
  _record_updates(monkeypatch, seen)
  trainer.train(cfg, str(tmp_path))
  (batch,) = seen
  C = batch.completion_tokens.shape[1]
  assert batch.advantages.shape == (8 * 4, C)  # [P*G, C] token-level advantages
  samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  steps = [s for s in samples if s.get("phase") == "grpo" and "steps" in s]
  assert steps and all("span" in st and "reward" in st for st in steps[0]["steps"])


def test_dynamic_sampling_drops_zero_spread_groups(tmp_path, monkeypatch):
  """DAPO dynamic sampling: groups whose rewards are all equal are replaced by fresh prompts."""
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.eval.every = 8, 2, 0
  cfg.grpo.dynamic_sampling, cfg.grpo.max_resample_rounds = True, 8

  def reward(completions, final_answer, **_):  # odd answers: spread; even answers: none
    return [float(i % 2) if int(a) % 2 else 0.0 for i, a in enumerate(final_answer)]

  _fixed_rewards(monkeypatch, reward)
  seen = []
  _record_updates(monkeypatch, seen)
  trainer.train(cfg, str(tmp_path))
  rows = [r for r in metrics.read_metrics(tmp_path) if r.get("sample_rounds")]
  assert all(r["sample_rounds"] >= 2 for r in rows)  # some groups had to be refilled
  for batch in seen:  # every kept group has spread: no all-zero advantage group
    adv = np.asarray(batch.advantages).reshape(8, 4)
    assert np.all(np.abs(adv).sum(1) > 0)


def test_stop_tokens_are_single_token_eos_ids(tmp_path):
  tok = train_sentencepiece([r["answer"] for r in arithmetic.generate(300, 0)],
                            model_prefix=str(tmp_path / "t"), vocab_size=100)
  assert tasks.stop_token_ids(tok, "") == ()
  assert tasks.stop_token_ids(tok, "####") == (tok.encode("####")[-1],)  # a user symbol
  with pytest.raises(settings.ConfigError, match="stop_tokens"):
    tasks.stop_token_ids(tok, "not one token at all")


def test_reference_update_policies():
  import types
  cfg = arithmetic_config.get_config("smoke")
  device = types.SimpleNamespace(model_config=models.get_config("tiny_llama"))  # what it reads
  g = lambda: settings.from_config(cfg, 1).grpo  # noqa: E731
  ref, pol = {"w": np.ones(3, np.float32)}, {"w": np.zeros(3, np.float32)}
  cfg.grpo.loss.beta = 0.0  # no KL: the reference is never touched
  assert updates.next_reference(device, g(), ref, pol, 4) is ref
  cfg.grpo.loss.beta, cfg.grpo.ref_reset_every = 0.04, 2
  np.testing.assert_array_equal(updates.next_reference(device, g(), ref, pol, 3)["w"], 1.0)  # frozen
  np.testing.assert_array_equal(updates.next_reference(device, g(), ref, pol, 4)["w"], 0.0)  # reset
  cfg.grpo.ref_reset_every, cfg.grpo.ref_ema = 0, 0.25
  np.testing.assert_allclose(updates.next_reference(device, g(), ref, pol, 3)["w"], 0.75)  # EMA
