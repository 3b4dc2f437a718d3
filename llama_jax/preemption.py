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
waiting for (the main thread blocked in `next()` on the input pipeline included). The trainer
installs the watch before any other work, so this covers training a tokenizer too.

After the last step (`stop_at_once`: the final held-out eval and sample, the checkpoint of the
last step already saved or in flight) the one-process handler raises Interrupted (a StopRun)
at once again, and a signal that came before is raised there too.

A signal during a periodic eval (train.eval_every) or sample (sample.every) inside the loop only
sets the flag, which the loop reads after them: the stop waits for that eval or sample to end
(one pass over the eval corpus; `sample.max_new_tokens` tokens), then saves as above.

Under jax.distributed with several processes none of this applies (no handler of our own): the
preemption notice is read after each step, and the final eval runs to its end.
"""

import contextlib
import signal
import sys

import jax
from jax.experimental import multihost_utils

from llama_jax.errors import StopRun


class Interrupted(StopRun):
  """A signal after the last step (PreemptionWatch.stop_at_once): the final eval or sample stops."""


class PreemptionWatch:
  """`reached(step)`: stop after this step? Restores the previous signal handlers on close().

  One process: a SIGTERM / SIGINT before the first call of `reached` raises StopRun in the main
  thread (see the module docstring); after it, the signal only sets the flag `reached` reads, except
  within `stop_at_once`, where it raises Interrupted.
  """

  def __init__(self):
    self._signal = None
    self._stepping = False  # has a step finished (reached() been called)?
    self._after_loop = False  # inside stop_at_once()
    self._previous = {}
    # jax.distributed.is_initialized first: a plain run starts no JAX backend here.
    self._single = not jax.distributed.is_initialized() or jax.process_count() == 1
    self._previous_unraisable = None
    if self._single:  # under jax.distributed, SIGTERM belongs to jax's preemption notifier
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)
      self._previous_unraisable = sys.unraisablehook
      sys.unraisablehook = self._on_unraisable

  def _on_unraisable(self, unraisable):
    """Python ignores an exception raised where it cannot propagate (a gc callback, __del__), our
    handler's StopRun included: that one is dropped here, and `check` raises it again."""
    if not isinstance(unraisable.exc_value, StopRun):
      self._previous_unraisable(unraisable)

  def check(self):
    """Raises StopRun for a signal before the first step whose StopRun was lost (see _on_unraisable)."""
    if self._single and self._signal is not None and not self._stepping:
      raise StopRun(self._stop_message())

  def _stop_message(self):
    return (f"{self._signal} before the first step of this run finished: nothing new to save, "
            "the same command starts (or resumes) it again")

  def _on_signal(self, signum, frame):
    del frame
    self._signal = signal.Signals(signum).name
    if self._after_loop:
      raise Interrupted(self._signal)
    if not self._stepping:
      raise StopRun(self._stop_message())

  @property
  def signal_name(self) -> str:
    return self._signal or "preemption notice"

  def reached(self, step: int) -> bool:
    self._stepping = True
    if self._single:
      return self._signal is not None
    # Every process calls this at every step; it turns True on all of them at the same step.
    return multihost_utils.reached_preemption_sync_point(step)

  @contextlib.contextmanager
  def stop_at_once(self):
    """Within it, a SIGTERM / SIGINT (one process) raises Interrupted in the main thread at once; so
    does one that came before it (a signal during the last step has already stopped the loop)."""
    if not self._single:
      yield
      return
    self._after_loop = True
    try:
      if self._signal is not None:
        raise Interrupted(self._signal)
      yield
    finally:
      self._after_loop = False

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._previous_unraisable is not None:
      sys.unraisablehook = self._previous_unraisable
