"""Knowing when to stop: SIGTERM / SIGINT (one process) or jax's preemption notice (a job).

A preempted run finishes its current step, saves at a step every process agrees on, waits for
the save, logs where it saved and exits 0; starting the same command again resumes there.

One process: a handler of our own sets a flag that the loop reads after each step (the jax
preemption service exists only under `jax.distributed`). Several processes: jax's preemption
sync manager, which `jax.distributed.initialize` starts, catches SIGTERM on any process and
`reached_preemption_sync_point(step)` turns True at the same step on all of them.

Before the first step of a run has finished (opening data, compiling, waiting for the first
batch, restoring) there is nothing new to save, so the one-process handler raises StopRun
right away instead: the process ends with its one line and exit status 1, whatever it was
waiting for (the main thread blocked in `next()` on the input pipeline included).
"""

import signal

import jax
from jax.experimental import multihost_utils

from llama_jax.errors import StopRun


class PreemptionWatch:
  """`reached(step)`: stop after this step? Restores the previous signal handlers on close().

  One process: a SIGTERM / SIGINT before the first call of `reached` raises StopRun in the main
  thread (see the module docstring); after it, the signal only sets the flag `reached` reads.
  """

  def __init__(self):
    self._signal = None
    self._stepping = False  # has a step finished (reached() been called)?
    self._previous = {}
    self._single = jax.process_count() == 1
    if self._single:  # under jax.distributed, SIGTERM belongs to jax's preemption notifier
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    self._signal = signal.Signals(signum).name
    if not self._stepping:
      raise StopRun(f"{self._signal} before the first step of this run finished: nothing new to save, "
                    "the same command starts (or resumes) it again")

  @property
  def signal_name(self) -> str:
    return self._signal or "preemption notice"

  def reached(self, step: int) -> bool:
    self._stepping = True
    if self._single:
      return self._signal is not None
    # Every process calls this at every step; it turns True on all of them at the same step.
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
