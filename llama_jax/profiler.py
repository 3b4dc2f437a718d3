"""A jax.profiler trace of chosen train steps: config.train.profile_steps = (first, last) in a run,
`--profile DIR` in the bench.

Layout: jax writes DIR/plugins/profile/<YYYY_MM_DD_HH_MM_SS>/<host>.xplane.pb (what XProf and
TensorBoard's profile plugin read), <host>.trace.json.gz, and, asked here, perfetto_trace.json.gz
(that trace without its "metadata" field, which Perfetto does not take: jax/_src/profiler.py). A
run traces into WORKDIR/profile.

One path for local and `gs://` directories: jax traces into a local temporary directory and its
files are copied into DIR through llama_jax.paths when the trace stops. jaxlib could write `gs://`
itself, but through a GCS client of its own (tsl's: its own credentials lookup, no endpoint to
point it at a test server), not the one every other file of a run goes through.

Process 0 alone traces: every process runs the same program on its own devices, and one host's
trace shows the step. The other processes' steps are not in it (a straggling host is found by
its step times, not here).
"""

import shutil
import tempfile
from numbers import Integral

import jax

from llama_jax import errors
from llama_jax import metrics as metrics_lib
from llama_jax import paths
from llama_jax.errors import ConfigError

_KEY = "config.train.profile_steps"


def check_profile_steps(train_config):
  """ConfigError naming config.train.profile_steps unless it is () or (first, last), two integers
  with 1 <= first <= last <= train.steps (1-based optimizer steps as logged, both traced)."""
  steps = train_config.profile_steps
  if isinstance(steps, (tuple, list)) and not steps:
    return
  if not (isinstance(steps, (tuple, list)) and len(steps) == 2
          and all(isinstance(s, Integral) and not isinstance(s, bool) for s in steps)):
    raise ConfigError(f"{_KEY}={steps!r}: must be (first, last), two step numbers, or () for no trace")
  first, last = steps
  if first < 1:
    raise ConfigError(f"{_KEY}={tuple(steps)!r}: steps count from 1")
  if first > last:
    raise ConfigError(f"{_KEY}={tuple(steps)!r}: the first step is after the last")
  if last > train_config.steps:
    raise ConfigError(f"{_KEY}={tuple(steps)!r}: the last step is after config.train.steps={train_config.steps}")


def check_trace_dir(path, flag: str):
  """ConfigError naming `flag` unless a trace can go to `path`: a directory or nothing there yet,
  in an existing local directory or a reachable bucket."""
  if paths.is_remote(path):
    paths.check_bucket(path, flag)
  if paths.exists(path) and not paths.isdir(path):
    raise ConfigError(f"{flag} {path} is a file, not a directory")
  if not paths.is_remote(path) and not paths.isdir(paths.parent(path)):
    raise ConfigError(f"{flag} {path}: directory {paths.parent(path)} does not exist")


class Trace:
  """One jax.profiler trace into `directory` (local or `gs://`): `start()`, then `stop()`, which
  copies the files there and sets `run_dir`, the trace's folder (DIR/plugins/profile/<time>)."""

  def __init__(self, directory: str):
    self.directory = paths.normalize(directory)
    self.run_dir = None
    self._local = None

  @property
  def active(self) -> bool:
    return self._local is not None

  def start(self):
    local = tempfile.mkdtemp(prefix="llama-jax-profile-")
    try:
      jax.profiler.start_trace(local, create_perfetto_trace=True)
    except BaseException:
      shutil.rmtree(local, ignore_errors=True)
      raise
    self._local = local

  def stop(self):
    local, self._local = self._local, None
    try:
      jax.profiler.stop_trace()
      written = [f for f in paths.glob(paths.join(local, "**")) if paths.isfile(f)]
      for f in written:
        copy = paths.join(self.directory, f[len(local) + 1:])
        paths.makedirs(paths.parent(copy))
        paths.copy(f, copy)
    finally:
      shutil.rmtree(local, ignore_errors=True)
    self.run_dir = paths.join(self.directory, paths.parent(written[0])[len(local) + 1:])

  def describe(self) -> str:
    """Where the trace is and how to look at it, in one line (after `stop`)."""
    return (f"{self.run_dir}; view it with `xprof --logdir {self.directory}` (pip install xprof; TensorBoard with "
            f"xprof installed shows it under Profile), or open {paths.join(self.run_dir, 'perfetto_trace.json.gz')} "
            "in https://ui.perfetto.dev")


class ProfileWindow:
  """The trace of config.train.profile_steps in a run that takes steps start+1 .. end, into
  WORKDIR/profile, on process 0: a context manager around the train loop, told of each step.

  `before(step, state)` before step `step` (1-based) starts the trace at the window's first step,
  once `state` (the step before's result) is ready, so nothing of earlier steps runs inside it;
  `after(step, state)` stops it after the last, once `state` is ready, so the trace holds the
  steps' whole execution. Leaving the context (the run ends inside the window: `stop_after`, a
  preemption, an error) stops a trace still running and keeps what it holds.

  A run that starts after step `start` > 0 (a resumed one, or one continuing init_from's state)
  traces nothing of a window that ended by then, and the rest of one it starts inside, from its
  first step. Both say so in a log line.
  """

  def __init__(self, profile_steps, start: int, workdir: str):
    self._trace = Trace(paths.join(workdir, "profile"))
    self._first, self._last = profile_steps or (0, 0)
    self._done = 0  # the last step finished inside the trace
    if not profile_steps or jax.process_index() != 0:
      self._first = self._last = 0
    elif self._last <= start:
      metrics_lib.log(f"{_KEY}={tuple(profile_steps)}: this run starts after step {start}, past the "
                      "window: no trace")
      self._first = self._last = 0
    elif self._first <= start:
      metrics_lib.log(f"{_KEY}={tuple(profile_steps)}: this run starts after step {start}, inside the "
                      f"window: tracing steps {start + 1}-{self._last}")
      self._first = start + 1

  def __enter__(self):
    return self

  def before(self, step: int, state):
    if step == self._first:
      jax.block_until_ready(state)
      self._trace.start()

  def after(self, step: int, state):
    if self._trace.active:
      self._done = step
      if step == self._last:
        jax.block_until_ready(state)
        self._stop()

  def _stop(self):
    self._trace.stop()
    steps = f"steps {self._first}-{self._done}" if self._done else f"step {self._first}, unfinished"
    metrics_lib.log(f"profile of {steps}: {self._trace.describe()}")

  def __exit__(self, exc_type, exc, tb):
    if not self._trace.active:
      return
    try:
      self._stop()
    except Exception as e:  # noqa: BLE001  (an error already on its way out is the one reported)
      if exc_type is None:
        raise
      metrics_lib.log(f"warning: the profile from step {self._first} was lost: {errors.first_line(e)}")
