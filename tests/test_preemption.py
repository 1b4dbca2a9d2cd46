"""Preemption: the first SIGTERM / SIGINT asks for a stop at the next step boundary, a second one
aborts; the handlers are restored after the run. (The end-to-end SIGTERM -> checkpoint -> exact
resume test is in test_trainer.py, beside the SIGKILL ones.)"""

import os
import signal

import pytest

from grpo_jax import preemption


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
