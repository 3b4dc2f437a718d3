"""Non-finite metrics (a diverged model's perplexity, a throughput over no time) are reported, as
strict JSON ("inf", "-inf", "nan" strings) in metrics.jsonl and eval_<step>.json, floats in TensorBoard."""

import glob
import json
import math
import os
import struct

import jax
import numpy as np
import pytest

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import corpus as corpus_lib
from llama_jax import evaluate
from llama_jax import metrics as metrics_lib
from llama_jax import run_setup

HELDOUT = "text:" + os.path.join(os.path.dirname(__file__), "data", "heldout_sample.txt")


def strict_json(text):
  """json.loads that refuses Infinity, -Infinity and NaN, as strict parsers (RFC 8259) do."""
  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")
  return json.loads(text, parse_constant=refuse)


def diverged_params(setup, scale=1e5):
  """Random params whose final norm multiplies the logits by `scale`: a held-out loss in the thousands."""
  params = jax.device_get(setup.init_state()["params"])
  params["final_norm"]["scale"] = params["final_norm"]["scale"] * scale
  return params


def test_evaluator_reports_an_infinite_perplexity_for_a_huge_loss(tmp_path):
  setup = run_setup.Setup(tiny_test_config(), jax.devices()[:1])
  corpus = corpus_lib.open_corpus(HELDOUT)
  result = evaluate.Evaluator(setup, ByteTokenizer(), corpus)(diverged_params(setup))  # OverflowError before
  assert math.log(np.finfo(np.float64).max) < result["loss"] < math.inf  # exp(loss) overflows a double
  assert result["perplexity"] == math.inf
  assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] > 1000
  assert result["num_tokens"] > 0

  path = tmp_path / "eval_0.json"
  evaluate.write_json({"step": 0, **result}, str(path))
  written = strict_json(path.read_text())
  assert written["perplexity"] == "inf"
  assert {k: metrics_lib.number(v) for k, v in written.items()} == {"step": 0, **result}


def test_scores_of_a_nan_loss_are_nan():
  scores = evaluate.scores(math.nan, 10.0, 40)
  assert all(math.isnan(scores[k]) for k in ("loss", "perplexity", "bits_per_byte"))
  assert strict_json(metrics_lib.dumps(scores))["perplexity"] == "nan"


def _tensorboard_scalars(logdir):
  """{tag: [simple_value, ...]} of the TFRecord event files under logdir (read without TensorFlow)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):  # record: length (8 bytes), its crc (4), payload, payload crc (4)
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(value.simple_value)
  return scalars


def test_metric_writer_keeps_non_finite_values_in_strict_json_and_tensorboard(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(5, {"loss": np.float32(2.5), "eval_perplexity": math.inf, "mfu": np.float64("nan"),
                   "delta": -math.inf, "hist": np.array([1.0, np.inf])})
  writer.close()
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert strict_json(line) == {"step": 5, "loss": 2.5, "eval_perplexity": "inf", "mfu": "nan", "delta": "-inf",
                               "hist": [1.0, "inf"]}
  scalars = _tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert scalars["loss"] == [2.5] and scalars["eval_perplexity"] == [math.inf] and scalars["delta"] == [-math.inf]
  assert math.isnan(scalars["mfu"][0])


def test_metric_writer_on_gs_sends_events_together_and_tensorboard_reads_them_there(tmp_path, gcs_bucket):
  """On object storage (no append; an object takes about one update a second) events go up together:
  at flush() (the trainer's, at each checkpoint), once flush_secs have passed, and at close."""
  from llama_jax import paths
  workdir = f"{gcs_bucket}/run"
  jsonl = paths.join(workdir, "metrics.jsonl")

  def on_gs():
    """(steps in metrics.jsonl, TensorBoard scalars of the event files, oldest file first) as object
    storage has them."""
    scalars = {}
    for path in paths.glob(paths.join(workdir, "tensorboard", "*")):  # sorted: by the time in the name
      local = tmp_path / f"tensorboard-{len(os.listdir(tmp_path))}"
      local.mkdir()
      (local / paths.name(path)).write_bytes(paths.read_bytes(path))
      for tag, values in _tensorboard_scalars(str(local)).items():
        scalars.setdefault(tag, []).extend(values)
    steps = [strict_json(line)["step"] for line in paths.read_text(jsonl).splitlines()] if paths.exists(jsonl) else []
    return steps, scalars

  writer = metrics_lib.MetricWriter(workdir, flush_secs=3600)
  writer.write(1, {"loss": 3.0})
  assert on_gs() == ([], {})  # kept here until a flush
  writer.flush()
  assert on_gs() == ([1], {"loss": [3.0]})
  writer.write(2, {"loss": 2.5, "eval_perplexity": math.inf})
  writer.write_text(2, "sample", "ROMEO.")
  assert on_gs()[0] == [1]
  writer.close()
  text = {"sample/text_summary": [0.0]}  # how the text's event shows here (the parser reads scalars)
  assert on_gs() == ([1, 2, 2], {"loss": [3.0, 2.5], "eval_perplexity": [math.inf], **text})
  assert strict_json(paths.read_text(jsonl).splitlines()[-1]) == {"step": 2, "sample": "ROMEO."}

  writer = metrics_lib.MetricWriter(workdir, flush_secs=0)  # a resumed run, whose every event is due
  writer.write(3, {"loss": 2.0})
  assert on_gs() == ([1, 2, 2, 3], {"loss": [3.0, 2.5, 2.0], "eval_perplexity": [math.inf], **text})
  writer.close()


def test_tokens_per_sec_over_no_time_is_nan_and_the_log_line_says_so(monkeypatch):
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: 100.0)  # a clock that does not advance
  progress = metrics_lib.ProgressLogger(start_step=0, total_steps=10)
  rate = progress.tokens_per_sec(1, 2048)  # was 2048 / 1e-9 = 2e12 tokens/s
  assert math.isnan(rate)
  line = progress.line(1, {"loss": 2.0, "tokens_per_sec": rate, "mfu": rate * 1e6 / 1e12,
                           "learning_rate": 1e-3, "grad_norm": 1.0})
  assert "| nan tok/s | MFU nan% |" in line and line.endswith("| eta 0:00:00")


def test_time_paused_for_an_eval_is_left_out_of_tokens_per_sec_but_not_out_of_the_eta(monkeypatch):
  clock = iter([0.0, 10.0, 40.0, 50.0, 50.0])  # start; pause from 10 to 40 s; log at 50 s; the eta's read
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
  progress = metrics_lib.ProgressLogger(start_step=0, total_steps=20)
  with progress.paused():  # a 30 s eval between steps
    pass
  assert progress.tokens_per_sec(10, 1000) == 10 * 1000 / 20  # 20 s of training, not 50
  line = progress.line(10, {"loss": 2.0, "tokens_per_sec": 500.0, "mfu": 0.1, "learning_rate": 1e-3, "grad_norm": 1.0})
  assert line.endswith("| eta 0:00:50")  # 10 more steps at the 5 s each they took, the eval included


def test_the_log_line_shows_z_loss_only_when_it_is_logged():
  progress = metrics_lib.ProgressLogger(start_step=0, total_steps=10)
  metrics = {"loss": 2.0, "tokens_per_sec": 1.0, "mfu": 0.1, "learning_rate": 1e-3, "grad_norm": 1.0}
  assert "| loss 2.0000 |" in progress.line(1, metrics)
  assert "| loss 2.0000 (z_loss 0.004712) |" in progress.line(1, dict(metrics, z_loss=0.0047123))


def test_eta_before_any_step_is_unknown():
  progress = metrics_lib.ProgressLogger(start_step=4, total_steps=10)
  line = progress.line(4, {"loss": 2.0, "tokens_per_sec": 1.0, "mfu": 0.1, "learning_rate": 1e-3, "grad_norm": 1.0})
  assert line.endswith("| eta unknown")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1.5, "text"])
def test_number_reads_back_what_dumps_writes(value):
  back = metrics_lib.number(strict_json(metrics_lib.dumps({"v": value}))["v"])
  assert back == value or (math.isnan(back) and math.isnan(value))


def test_eval_py_on_a_diverged_checkpoint_prints_and_writes_perplexity_inf(tmp_path):
  import subprocess
  import sys

  from test_sharding import save_run
  from test_train import ROOT, subprocess_env
  config = tiny_test_config(**{"data.eval_corpus": HELDOUT})
  save_run(str(tmp_path), config, diverged_params(run_setup.Setup(config, jax.devices()[:1])))
  proc = subprocess.run([sys.executable, "eval.py", f"--workdir={tmp_path}", "--exact_match=0"], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr  # was: OverflowError: math range error
  assert "| perplexity inf |" in proc.stdout
  written = strict_json((tmp_path / "eval_0.json").read_text())
  assert written["perplexity"] == "inf" and written["step"] == 0
  assert 700 < written["loss"] < math.inf and 0 < written["bits_per_byte"] < math.inf
