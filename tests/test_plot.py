"""llama_jax.plot on the metrics.jsonl of a real (tiny) training run."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import matplotlib.image
import pytest

from conftest import tiny_test_config
from llama_jax import plot, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run of 8 steps (a train event each step, one eval at the end), as in test_train.py."""
  workdir = str(tmp_path_factory.mktemp("plot") / "tiny")
  eval_corpus = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")
  config = tiny_test_config(**{"data.eval_corpus": eval_corpus, "sample.max_new_tokens": 0})
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_the_figure_has_the_four_panels_with_one_line_per_run(workdir, tmp_path):
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns("checkpoints"))
  fig = plot.plot_runs([workdir, other])
  assert [ax.get_title() for ax in fig.axes] == ["train loss", "eval bits/byte", "learning rate", "tokens/s"]
  for ax in fig.axes:
    assert [line.get_label() for line in ax.get_lines()] == ["tiny", "other"]
  loss, bits_per_byte, lr, tokens_per_sec = (ax.get_lines()[0] for ax in fig.axes)
  assert list(loss.get_xdata()) == list(range(1, 9))  # log_every = 1
  assert list(bits_per_byte.get_xdata()) == [8]  # the final eval
  assert 0 < bits_per_byte.get_ydata()[0] < 8
  assert lr.get_ydata()[1] > lr.get_ydata()[0]  # warmup
  assert min(tokens_per_sec.get_ydata()) > 0
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["tiny", "other"]


def _plot_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "llama_jax.plot", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)


def test_the_command_line_writes_a_png(workdir, tmp_path):
  output = tmp_path / "run.png"
  proc = _plot_cli(workdir, f"--output={output}")
  assert proc.returncode == 0, proc.stderr
  assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.image.imread(output).shape == (700, 1000, 4)  # 10 x 7 inches at 100 dpi, RGBA


def test_a_workdir_without_metrics_is_one_line(tmp_path):
  proc = _plot_cli(str(tmp_path), f"--output={tmp_path / 'run.png'}")
  assert proc.returncode == 1
  assert proc.stderr.strip() == f"error: {tmp_path}: no metrics.jsonl (not a training workdir, or no step logged yet)"
  assert not (tmp_path / "run.png").exists()


def test_non_finite_metrics_are_read_back_as_floats_and_plotted(tmp_path):
  # As metrics.MetricWriter writes them: strict JSON, non-finite values as strings.
  events = [{"step": 1, "loss": 4.0, "learning_rate": 1e-3, "tokens_per_sec": "nan"},  # no time measured
            {"step": 2, "loss": 3.0, "learning_rate": 1e-3, "tokens_per_sec": 1000.0},
            {"step": 2, "eval_bits_per_byte": "inf"},  # a diverged checkpoint
            {"step": 3, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_sec": 1100.0},
            {"step": 3, "eval_bits_per_byte": 2.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e, allow_nan=False) + "\n" for e in events))
  events = plot.read_metrics(str(tmp_path))
  assert plot.series(events, "eval_bits_per_byte") == ([2, 3], [math.inf, 2.5])
  steps, tokens_per_sec = plot.series(events, "tokens_per_sec")
  assert steps == [1, 2, 3] and math.isnan(tokens_per_sec[0]) and tokens_per_sec[1:] == [1000.0, 1100.0]
  output = tmp_path / "run.png"
  plot.plot_runs([str(tmp_path)]).savefig(output)
  assert matplotlib.image.imread(output).shape == (700, 1000, 4)


@pytest.mark.parametrize("content,said", [
    (b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', None),  # a crash mid-write
    (b'{"step": 1, "loss": 2.0}\ngarbage\n{"step": 3, "loss": 1.0}\n', "metrics.jsonl:2: not JSON"),
    (b'{"step": 1, "loss": 2.0}\n\xff\xfe\n{"step": 3, "loss": 1.0}\n', "metrics.jsonl:2: not UTF-8"),
    (b"", "metrics.jsonl: nothing to plot (no logged step)"),
])
def test_a_bad_metrics_line_is_named_and_a_cut_last_line_skipped(content, said, tmp_path, capsys):
  (tmp_path / "metrics.jsonl").write_bytes(content)
  output = tmp_path / "run.png"
  if said is None:
    plot.write_png([str(tmp_path)], str(output))
    assert plot.series(plot.read_metrics(str(tmp_path)), "loss") == ([1, 2], [2.0, 1.5])
    assert "metrics.jsonl:3: not JSON; skipped it as a last line cut short" in capsys.readouterr().err
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return
  with pytest.raises(plot.ConfigError) as e:
    plot.write_png([str(tmp_path)], str(output))
  assert str(e.value) == os.path.join(str(tmp_path), said)
  assert not output.exists()


def test_a_bad_output_is_one_line_before_plotting(workdir, tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(plot.ConfigError, match=r"^--output .*/out is a directory; give a file name$"):
    plot.write_png([workdir], str(tmp_path / "out"))
  assert os.listdir(tmp_path / "out") == []
  with pytest.raises(plot.ConfigError, match=r"^--output /nonexistent/dir/o.png: directory /nonexistent/dir does "
                                             r"not exist$"):
    plot.write_png([workdir], "/nonexistent/dir/o.png")
