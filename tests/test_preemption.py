"""Preemption: the first SIGTERM / SIGINT asks for a stop at the next step boundary, a second one
aborts; the handlers are restored after the run; a SIGTERM in the middle of GRPO writes a
checkpoint at the step, exits 75, and the resumed run's metrics equal an uninterrupted one's."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import multihost_worker as mw
from grpo_jax import metrics, preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_asks_for_a_stop_second_aborts(sig):
  before = signal.getsignal(sig)
  with preemption.Watcher() as watcher:
    assert not watcher.stop_requested(1)
    os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode
    assert watcher.stop_requested(2)
    with pytest.raises(KeyboardInterrupt, match="again"):
      os.kill(os.getpid(), sig)
  assert signal.getsignal(sig) is before


def test_preempted_names_the_step_and_the_checkpoints():
  e = preemption.Preempted(7, "/run/checkpoints")
  assert "global step 7" in str(e) and "/run/checkpoints" in str(e) and e.step == 7
  assert preemption.EXIT_PREEMPTED not in (0, 1, 2)  # distinct from success and errors


# ----------------------------------------------------------------------------- end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=experiments/configs/arithmetic.py:smoke", "--config.grpo.steps=5",
         "--config.eval.every=0", "--config.checkpoint.every=0"]  # no periodic checkpoints
TIMING = ("time", "update_s", "sample_s", "score_s", "eval_s", "tok_per_s", "step_s", "wait_s")


def _launch(workdir, wait=True, extra=()):
  proc = subprocess.Popen([sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
                           *FLAGS, *extra], cwd=ROOT, env=mw.subprocess_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def _comparable(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read_metrics(workdir)]


@pytest.mark.parametrize("extra", [(), ("--config.grpo.max_staleness=2",)],
                         ids=["synchronous", "two_rollouts_ahead"])
def test_sigterm_mid_grpo_checkpoints_exits_75_and_resumes_exactly(tmp_path, extra):
  """Stopped by SIGTERM after GRPO step 1, resumed: the uninterrupted run's metrics (with
  rollouts sampled ahead, the ones waiting at the signal are trained after the resume)."""
  workdir = tmp_path / "preempted"
  proc = _launch(workdir, wait=False, extra=extra)
  lines = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if lines.exists() and any('"reward"' in line for line in open(lines)):  # GRPO step 1 done
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == preemption.EXIT_PREEMPTED, out[-3000:]
  step = int(re.search(r"after global step (\d+)", out).group(1))
  assert 6 < step < 6 + 5  # SFT's 6 steps, then a GRPO step before the last
  assert str(step) in os.listdir(workdir / "checkpoints")  # written on the signal, not periodic
  code, out = _launch(workdir, extra=extra)
  assert code == 0 and f"resumed from {workdir}/checkpoints step {step}" in out, out[-3000:]
  code, ref = _launch(tmp_path / "uninterrupted", extra=extra)
  assert code == 0, ref[-3000:]
  assert _comparable(workdir) == _comparable(tmp_path / "uninterrupted")
