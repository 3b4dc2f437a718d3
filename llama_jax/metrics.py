"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per event, each with "step"),
TensorBoard event files under WORKDIR/tensorboard, and a log line. Only process 0 writes."""

import json
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
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def write_text(self, step: int, tag: str, text: str):
    """A text (a sample) as {"step", tag: text} in metrics.jsonl and under `tag` in TensorBoard."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), tag: text}) + "\n")
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


class ProgressLogger:
  """Formats the train log line: step, loss, tokens/s, lr, and the time left."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._first_step, self._first_time = start_step, self._last_time

  def tokens_per_sec(self, step: int, tokens_per_step: int) -> float:
    """Throughput since the previous call (the caller has synced with the device)."""
    now = time.perf_counter()
    rate = (step - self._last_step) * tokens_per_step / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def line(self, step: int, metrics: dict) -> str:
    done = step - self._first_step
    elapsed = time.perf_counter() - self._first_time
    eta = elapsed / max(done, 1) * (self.total_steps - step)
    line = (f"step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | "
            f"{metrics['tokens_per_sec']:,.0f} tok/s | MFU {metrics['mfu']:.1%} | lr {metrics['learning_rate']:.2e} | "
            f"grad_norm {metrics['grad_norm']:.3f} | eta {_hms(eta)}")
    counts = [f"{metrics[k]:,} {k.replace('_', ' ')}" for k in ("skipped_documents", "truncated_examples",
                                                                 "skipped_examples") if metrics.get(k)]
    return line + "".join(f" | {c}" for c in counts)


def _hms(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def log(msg: str):
  """A timestamped line on stdout, from process 0 only (library logs stay at WARNING)."""
  if jax.process_index() == 0:
    print(time.strftime("%H:%M:%S"), msg, flush=True)
