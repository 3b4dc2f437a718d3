"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per event, each with "step"),
TensorBoard event files under WORKDIR/tensorboard, and a log line. Only process 0 writes.

Non-finite values (an infinite perplexity, a NaN throughput) are kept, not dropped or clipped:
JSON has no numbers for them (Python's `Infinity`/`NaN` are not JSON and strict parsers refuse
them), so metrics.jsonl and eval_<step>.json write them as the strings "inf", "-inf" and "nan"
(`dumps`), which `number` and `float()` read back; TensorBoard gets the float itself.
"""

import json
import math
import os
import time

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: processes > 0 never need it
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._jsonl.write(dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def write_text(self, step: int, tag: str, text: str):
    """A text (a sample) as {"step", tag: text} in metrics.jsonl and under `tag` in TensorBoard."""
    if not self.enabled:
      return
    self._jsonl.write(dumps({"step": int(step), tag: text}) + "\n")
    self._jsonl.flush()
    self._tb.add_text(tag, text, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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


def number(value):
  """A metric as written by `dumps`, read back: "inf", "-inf" and "nan" become floats again."""
  return _NONFINITE[value] if isinstance(value, str) and value in _NONFINITE else value


class ProgressLogger:
  """Formats the train log line: step, loss, tokens/s, lr, and the time left."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._first_step, self._first_time = start_step, self._last_time

  def tokens_per_sec(self, step: int, tokens_per_step: int) -> float:
    """Throughput since the previous call (the caller has synced with the device); NaN where no
    time was measured (the clock did not advance), since no rate follows from a zero interval."""
    now = time.perf_counter()
    elapsed = now - self._last_time
    rate = (step - self._last_step) * tokens_per_step / elapsed if elapsed > 0 else math.nan
    self._last_step, self._last_time = step, now
    return rate

  def line(self, step: int, metrics: dict) -> str:
    done = step - self._first_step
    elapsed = time.perf_counter() - self._first_time
    eta = elapsed / done * (self.total_steps - step) if done > 0 else math.nan  # no step timed: unknown
    line = (f"step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | "
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
