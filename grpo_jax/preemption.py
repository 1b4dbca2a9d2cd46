"""Preemption: SIGTERM / SIGINT stop the run at the next step boundary, with a checkpoint.

    with preemption.Watcher() as watcher:
      for step in ...:
        ...                                   # the step, its metrics
        if watcher.stop_requested(step + 1):  # every process calls this at every step
          save(...); raise preemption.Preempted(step + 1, directory)

TPU VMs and spot GPUs get SIGTERM some seconds before they go; a Ctrl-C in a terminal or a
notebook's interrupt is a SIGINT. The first signal only sets a flag: the current step finishes,
a checkpoint is written, metrics are flushed and the launcher exits with `EXIT_PREEMPTED`, so a
scheduler requeues the job and it resumes exactly. A second signal aborts at once.

On several processes every one must stop at the same step (a checkpoint is a collective): the
flags are OR-ed over processes at each boundary, together with JAX's own preemption sync point
(the coordination service's notice on TPU pods).
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the launcher's status after a clean stop
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped at a step boundary on a signal, after writing its checkpoint."""

  def __init__(self, step: int, checkpoints: str):
    super().__init__(f"stopped on a signal after global step {step}; the checkpoint of that step "
                     f"is in {checkpoints}: run the same command again to resume")
    self.step = step
    self.checkpoints = checkpoints


class Watcher:
  """Signal flags for one run: installed on enter (main thread only), restored on exit."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous = {}

  def __enter__(self) -> "Watcher":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning("not the main thread: SIGTERM / SIGINT will not stop the run cleanly")
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self._requested.is_set():  # the second one: stop now
      raise KeyboardInterrupt(f"{name} again: stopping without a checkpoint")
    self._requested.set()
    logging.warning("%s: stopping after this step with a checkpoint (send it again to stop now)",
                    name)

  def request(self) -> None:
    """Ask for a stop as a signal would (tests, or a time limit of your own)."""
    self._requested.set()

  def stop_requested(self, step: int) -> bool:
    """Whether to stop after `step`; on several processes all agree (a collective: every
    process must call this at every step boundary)."""
    local = self._requested.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local))
    try:
      notice = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service (jax.distributed without it)
      notice = False
    return bool(np.any(flags) or notice)
