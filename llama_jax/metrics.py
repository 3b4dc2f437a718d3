"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per event, each with "step"), the
trackers of config.metrics.trackers besides it (trackers.py: TensorBoard event files under
WORKDIR/tensorboard, a Weights & Biases run), and a log line. Only process 0 writes.

Non-finite values (an infinite perplexity, a NaN throughput) are kept, not dropped or clipped:
JSON has no numbers for them (Python's `Infinity`/`NaN` are not JSON and strict parsers refuse
them), so metrics.jsonl and eval_<step>.json write them as the strings "inf", "-inf" and "nan"
(`dumps`), which `number` and `float()` read back; TensorBoard and W&B get the float itself.

A workdir on object storage (`gs://`) has no append, and an object there takes about one update a
second, so MetricWriter keeps the events in memory and sends them together (`flush`): once
`flush_secs` have passed since the last upload (checked at each event), when the trainer saves a
checkpoint, and at the end of the run. metrics.jsonl grows by paths.append (a compose: only the
new lines travel), and so does the TensorBoard event file (trackers.TensorBoard). A process that
dies without a word (SIGKILL, a lost machine) loses the events since the last flush; those after
its last checkpoint are logged again by the resumed run.
"""

import contextlib
import json
import math
import sys
import time

import jax
import numpy as np

from llama_jax import errors
from llama_jax import paths
from llama_jax import trackers as trackers_lib
from llama_jax.errors import ConfigError

# Seconds between uploads of the metrics of a workdir on object storage (see the module docstring).
FLUSH_SECS = 10.0
# The trackers of a MetricWriter made without a config (configs/tiny.py's default).
DEFAULT_TRACKERS = ("jsonl", "tensorboard")


class MetricsError(ConfigError):
  """metrics.jsonl or a TensorBoard file on object storage that cannot be written, named in one line."""


class MetricWriter:
  """metrics.jsonl and the trackers of `config.metrics.trackers` (DEFAULT_TRACKERS without a config)
  behind one set of calls; on processes other than 0 every call does nothing.

  Args:
    config: the run's config: config.metrics picks the trackers (checked by
      trackers.check_trackers, through config_lib.check_config); W&B logs all of it.
  Raises trackers.TrackerError when W&B cannot start (metrics.jsonl is closed again first).
  """

  def __init__(self, workdir: str, config=None, flush_secs: float = FLUSH_SECS):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    names = DEFAULT_TRACKERS if config is None else tuple(config.metrics.trackers)
    self._remote = paths.is_remote(workdir)
    self._jsonl_path = metrics_path(workdir)
    self._flush_secs, self._flushed_at, self._failed = flush_secs, time.monotonic(), False
    self._trackers = []
    if self._remote:
      self._lines = []  # events not yet appended to metrics.jsonl
    else:
      self._jsonl = paths.open(self._jsonl_path, "a")
    try:
      if "tensorboard" in names:
        self._trackers.append(trackers_lib.TensorBoard(workdir))
      if "wandb" in names:
        run = trackers_lib.Wandb(workdir, config)
        self._trackers.append(run)
        log(run.describe())
    except BaseException:
      self.close(failed=True)
      raise

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._add_line(dumps(record))
    values = {k: v for k, v in record.items() if k != "step"}
    for tracker in self._trackers:
      tracker.write(step, values)
    self._written()

  def write_text(self, step: int, tag: str, text: str):
    """A text (a sample) as {"step", tag: text} in metrics.jsonl and under `tag` in each tracker."""
    if not self.enabled:
      return
    self._add_line(dumps({"step": int(step), tag: text}))
    for tracker in self._trackers:
      tracker.write_text(step, tag, text)
    self._written()

  def _add_line(self, line: str):
    if self._remote:
      self._lines.append(line + "\n")
    else:
      self._jsonl.write(line + "\n")
      self._jsonl.flush()

  def _written(self):
    if self._remote and time.monotonic() - self._flushed_at >= self._flush_secs:
      self.flush()

  def flush(self):
    """Sends what object storage does not have yet (nothing to do for a local workdir, which has
    every event already). Raises MetricsError, naming the file, when an upload fails after the
    client's retries; the run stops on it, so later flushes (close) do not try again."""
    if not self.enabled or not self._remote or self._failed:
      return
    path = self._jsonl_path
    try:
      if self._lines:
        paths.append(path, "".join(self._lines))
        self._lines = []
      for tracker in self._trackers:
        path = tracker.path
        tracker.flush()
    except Exception as e:  # noqa: BLE001  (gcsfs and aiohttp raise many kinds)
      self._failed = True
      reason = errors.first_line(e)
      raise MetricsError(f"writing {path} failed: {reason}") from e
    self._flushed_at = time.monotonic()

  def close(self, failed: bool = False):
    """Sends what is left (object storage), or closes metrics.jsonl, and closes every tracker (a W&B
    run ends as failed when `failed`: the run stopped on an error), whatever fails; then raises the
    first failure."""
    if not self.enabled:
      return
    first = None
    for close in [self.flush if self._remote else self._jsonl.close,
                  *[lambda t=t: t.close(failed) for t in self._trackers]]:
      try:
        close()
      except BaseException as e:  # noqa: BLE001  (raised below, once all are closed)
        first = first or e
    if first is not None:
      raise first


def _to_python(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def json_safe(value):
  """`value` (a dict, list or scalar) with every non-finite float replaced by "inf", "-inf" or "nan"."""
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def dumps(record, **kwargs) -> str:
  """Strict JSON of a record: non-finite floats as strings (json_safe), never `Infinity` or `NaN`."""
  return json.dumps(json_safe(record), allow_nan=False, **kwargs)


def metrics_path(workdir: str) -> str:
  return paths.join(workdir, "metrics.jsonl")


def eval_steps_path(workdir: str) -> str:
  """WORKDIR/eval_steps.jsonl: one record per checkpoint scored by eval.py --all_steps (eval_steps.py)."""
  return paths.join(workdir, "eval_steps.jsonl")


def read_events(path: str) -> list[dict]:
  """The JSON objects with a "step" of a JSONL file (metrics.jsonl, eval_steps.jsonl), in order.

  A last line that is not JSON (a process killed mid-write leaves one cut short) is skipped with a
  warning on stderr; any other line that is not a UTF-8 JSON object with a "step" is ConfigError
  `PATH:LINE: ...`."""
  lines = [(n, line) for n, line in enumerate(paths.read_bytes(path).split(b"\n"), 1) if line.strip()]
  events = []
  for n, raw in lines:
    try:
      event = json.loads(raw.decode("utf-8"))
      why = None if isinstance(event, dict) and "step" in event else "not a JSON object with a step"
    except UnicodeDecodeError:
      why = "not UTF-8"
    except ValueError:
      why = "not JSON"
    if why is None:
      events.append(event)
    elif n == lines[-1][0]:
      print(f"warning: {path}:{n}: {why}; skipped it as a last line cut short (a run stopped mid-write)",
            file=sys.stderr)
    else:
      raise ConfigError(f"{path}:{n}: {why}")
  return events


def number(value):
  """A metric as written by `dumps`, read back: "inf", "-inf" and "nan" become floats again."""
  return _NONFINITE[value] if isinstance(value, str) and value in _NONFINITE else value


class ProgressLogger:
  """Formats the train log line: step, loss, tokens/s, lr, and the time left."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._first_step, self._first_time = start_step, self._last_time

  @contextlib.contextmanager
  def paused(self):
    """Leaves the wall time spent inside out of `tokens_per_sec` (an eval or a checkpoint save between
    two log lines is not training throughput); the eta still counts it, as the run will spend it again.
    The caller syncs with the device first, so that steps still running count as training."""
    began = time.perf_counter()
    try:
      yield
    finally:
      self._last_time += time.perf_counter() - began

  def tokens_per_sec(self, step: int, tokens_per_step: int) -> float:
    """Throughput (tokens/s) of the steps since the previous call, over the wall time between the
    calls less that spent `paused` (the caller has synced with the device); NaN where no time was
    measured (the clock did not advance), since no rate follows from a zero interval."""
    now = time.perf_counter()
    elapsed = now - self._last_time
    rate = (step - self._last_step) * tokens_per_step / elapsed if elapsed > 0 else math.nan
    self._last_step, self._last_time = step, now
    return rate

  def line(self, step: int, metrics: dict) -> str:
    done = step - self._first_step
    elapsed = time.perf_counter() - self._first_time
    eta = elapsed / done * (self.total_steps - step) if done > 0 else math.nan  # no step timed: unknown
    z_loss = f" (z_loss {metrics['z_loss']:.4g})" if "z_loss" in metrics else ""  # logged with optim.z_loss > 0
    line = (f"step {step}/{self.total_steps} | loss {metrics['loss']:.4f}{z_loss} | "
            f"{metrics['tokens_per_sec']:,.0f} tok/s | MFU {metrics['mfu']:.1%} | lr {metrics['learning_rate']:.2e} | "
            f"grad_norm {metrics['grad_norm']:.3f} | eta {_hms(eta)}")
    counts = [f"{metrics[k]:,} {k.replace('_', ' ')}" for k in ("skipped_documents", "truncated_examples",
                                                                 "skipped_examples") if metrics.get(k)]
    return line + "".join(f" | {c}" for c in counts)


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "unknown"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def log(msg: str):
  """A timestamped line on stdout, from process 0 only (library logs stay at WARNING)."""
  if jax.process_index() == 0:
    print(time.strftime("%H:%M:%S"), msg, flush=True)
