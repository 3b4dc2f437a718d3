"""Weights & Biases offline (issue 20, acceptance 1): a run stopped part way and resumed logs to one
W&B run id, and the train loss and held-out bits/byte read back from W&B's own offline files equal
metrics.jsonl's; bad tracker settings are one ConfigError line. Nothing reaches the network: W&B
runs offline, its directories and settings in the test's temporary directory."""

import glob
import json
import os
import struct
import sys
import zlib

import jax
import pytest

from conftest import tiny_test_config
from llama_jax import checkpoint as ckpt_lib, config_lib, metrics as metrics_lib, paths, trainer, trackers
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory):
  """W&B's settings, cache and default directories in a temporary directory, offline and silent, for
  this module's tests; wandb's service process stopped at the end (it outlives a run otherwise)."""
  home = tmp_path_factory.mktemp("wandb_home")
  with pytest.MonkeyPatch.context() as mp:
    for var, sub in [("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")]:
      mp.setenv(var, str(home / sub))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything to try the network: refused at once
    yield
    if "wandb" in sys.modules:
      sys.modules["wandb"].teardown()


def _wandb_config(**overrides):
  return tiny_test_config(**{"metrics.trackers": ("jsonl", "wandb"), "metrics.wandb_mode": "offline",
                             "metrics.wandb_project": "llama_jax_tests", **overrides})


def read_wandb_records(path):
  """The records of a W&B transaction log (run-<id>.wandb), read with wandb's protos.

  The format, as wandb's writer lays it out (leveldb's log format with CRC-32, not CRC-32C): a 7-byte
  header (b":W&B", magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of chunks, each with a
  7-byte header (CRC-32 of the type byte and the data, length, type: 1 full, 2 first, 3 middle, 4 last)
  and a block's tail of under 7 bytes left as padding; a record is the data of its chunks joined."""
  from wandb.proto import wandb_internal_pb2  # noqa: PLC0415
  data = open(path, "rb").read()
  assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
  block, pos, parts, records = 32768, 7, [], []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 0 and length == 0:  # zero padding at the end of a block
      continue
    assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: chunk at {pos} damaged"
    parts.append(chunk)
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      records.append(record)
      parts = []
  return records


def _value(item):
  return json.loads(item.value_json)


def history_rows(records) -> list[dict]:
  """The logged rows: {key: value} (a media value as its dict of fields)."""
  rows = []
  for r in records:
    if r.WhichOneof("record_type") == "history":
      row = {}
      for item in r.history.item:
        keys = list(item.nested_key) or [item.key]
        node = row
        for k in keys[:-1]:
          node = node.setdefault(k, {})
        node[keys[-1]] = _value(item)
      rows.append(row)
  return rows


def _only(records, kind):
  (found,) = [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
  return found


def _offline_runs(wandb_dir):
  """The offline run directories under `wandb_dir`, in the order they started (their names' times)."""
  return sorted(glob.glob(os.path.join(wandb_dir, "offline-run-*")))


def test_a_stopped_and_resumed_run_logs_to_one_wandb_run_with_the_values_of_metrics_jsonl(tmp_path):
  workdir = str(tmp_path / "run")
  config = _wandb_config(**{"data.eval_corpus": HELDOUT, "train.eval_every": 4,
                            "data.tokenizer_sample_bytes": 300_000})  # a tokenizer trained in a second
  assert trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1], stop_after=4) is None  # preempted
  result = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])  # resumes at 4
  assert result["step"] == 8

  assert not os.path.exists(os.path.join(workdir, "tensorboard"))  # not a tracker of this run
  run_id = open(os.path.join(workdir, "wandb_run_id")).read().strip()
  runs = _offline_runs(os.path.join(workdir, "wandb"))
  assert [os.path.basename(r).rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
  records = [read_wandb_records(os.path.join(r, f"run-{run_id}.wandb")) for r in runs]
  first, resumed = (_only(r, "run") for r in records)
  assert first.run_id == resumed.run_id == run_id
  assert first.project == "llama_jax_tests" and first.display_name == "run"  # the workdir's name
  assert [_only(r, "exit").exit_code for r in records] == [0, 0]

  # The config is the run's: every key, as JSON.
  logged = {u.key: _value(u) for u in first.config.update if u.key != "_wandb"}
  assert logged == json.loads(json.dumps(config.to_dict()))

  # Every train loss and held-out bits/byte of metrics.jsonl, at its step, the same float.
  events = metrics_lib.read_events(os.path.join(workdir, "metrics.jsonl"))
  rows = history_rows(records[0]) + history_rows(records[1])
  for key in ("loss", "eval_bits_per_byte", "learning_rate"):
    expected = [(e["step"], e[key]) for e in events if key in e]
    assert [(r["step"], r[key]) for r in rows if key in r] == expected, key
  assert [e["step"] for e in events if "loss" in e] == list(range(1, 9))
  assert [e["step"] for e in events if "eval_bits_per_byte" in e] == [4, 8]

  # The held-out sets as a W&B table in the eval rows: (set, loss, bits_per_byte, perplexity, num_tokens).
  evals = [(run_dir, r) for run_dir, recs in zip(runs, records) for r in history_rows(recs) if "eval_loss" in r]
  assert [r["step"] for _, r in evals] == [4, 8]
  for run_dir, r in evals:
    table = r[trackers.EVAL_TABLE]
    assert table["_type"] == "table-file"
    with open(os.path.join(run_dir, "files", table["path"])) as f:
      written = json.load(f)
    (event,) = [e for e in events if e["step"] == r["step"] and "eval_loss" in e]
    assert written["columns"] == ["set", "loss", "bits_per_byte", "perplexity", "num_tokens"]
    assert written["data"] == [["", event["eval_loss"], event["eval_bits_per_byte"], event["eval_perplexity"],
                                event["eval_num_tokens"]]]


def test_samples_and_named_sets_go_to_wandb_in_its_form_and_a_failed_run_finishes_as_failed(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  config = _wandb_config(**{"metrics.wandb_name": "named"})
  writer = metrics_lib.MetricWriter(workdir, config)
  scores = {"eval_loss": 2.5, "eval_perplexity": 12.18, "eval_bits_per_byte": 1.25, "eval_num_tokens": 640,
            "eval_plays_loss": 3.0, "eval_plays_perplexity": 20.08, "eval_plays_bits_per_byte": 1.5,
            "eval_plays_num_tokens": 320, "eval_mean_loss": 2.75, "eval_mean_perplexity": 15.6,
            "eval_mean_bits_per_byte": 1.375, "train/ignored_text": "x", "lr": float("inf")}
  writer.write(3, scores)
  writer.write_text(3, "sample", "ROMEO. <a> & 'b'")
  writer.close(failed=True)

  (run_dir,) = _offline_runs(os.path.join(workdir, "wandb"))
  records = read_wandb_records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0])
  assert _only(records, "run").display_name == "named"
  assert _only(records, "exit").exit_code == 1
  metric, sample = history_rows(records)
  assert metric["step"] == sample["step"] == 3
  assert metric["lr"] == float("inf") and "train/ignored_text" not in metric
  with open(os.path.join(run_dir, "files", metric[trackers.EVAL_TABLE]["path"])) as f:
    assert json.load(f)["data"] == [["", 2.5, 1.25, 12.18, 640], ["plays", 3.0, 1.5, 20.08, 320],
                                    ["mean", 2.75, 1.375, 15.6, None]]
  assert sample["sample"]["_type"] == "html-file"
  with open(os.path.join(run_dir, "files", sample["sample"]["path"])) as f:
    assert "<pre>ROMEO. &lt;a&gt; &amp; &#x27;b&#x27;</pre>" in f.read()  # the text, escaped


def test_on_gs_the_run_id_is_kept_in_the_workdir_and_wandb_writes_under_wandb_dir(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "local"))
  workdir = f"{gcs_bucket}/run"
  for step in (1, 2):  # a run, then its resumption
    writer = metrics_lib.MetricWriter(workdir, _wandb_config())
    writer.write(step, {"loss": step / 3})
    writer.close()
  run_id = paths.read_text(f"{workdir}/wandb_run_id").strip()
  runs = _offline_runs(str(tmp_path / "local" / "wandb"))
  assert [os.path.basename(r).rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
  rows = [row for r in runs for row in history_rows(read_wandb_records(os.path.join(r, f"run-{run_id}.wandb")))]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1 / 3), (2, 2 / 3)]
  assert [e["loss"] for e in metrics_lib.read_events(f"{workdir}/metrics.jsonl")] == [1 / 3, 2 / 3]
  assert not paths.exists(f"{workdir}/wandb")


def test_a_new_run_refused_after_wandb_started_leaves_the_workdir_as_it_was(tmp_path, monkeypatch, capsys):
  def refuse(*args, **kwargs):
    raise ConfigError("refused after the metric writer started")
  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_latest", refuse)  # the first thing after the writer
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="refused after the metric writer started"):
    trainer.train_and_evaluate(_wandb_config(**{"data.tokenizer_sample_bytes": 300_000}), str(workdir),
                               devices=jax.devices()[:1])
  assert "W&B run " in capsys.readouterr().out  # it had started, with files in the workdir
  assert os.listdir(workdir) == ["notes.txt"]


@pytest.mark.parametrize("overrides,culprit", [
    ({"metrics.trackers": ("tensorboard",)}, r"config.metrics.trackers=\('tensorboard',\) leaves out \"jsonl\""),
    ({"metrics.trackers": ("jsonl", "mlflow")}, "config.metrics.trackers has 'mlflow', not one of"),
    ({"metrics.trackers": ("jsonl", "jsonl")}, "config.metrics.trackers=.* names a tracker twice"),
    ({"metrics.trackers": ("jsonl", "wandb"), "metrics.wandb_mode": "dryrun"},
     "config.metrics.wandb_mode='dryrun' is not one of \\['online', 'offline'\\]"),
    ({"metrics.trackers": ("jsonl", "wandb"), "metrics.wandb_project": ""}, "config.metrics.wandb_project=''"),
])
def test_bad_tracker_settings_are_one_config_error_naming_the_key(tmp_path, overrides, culprit):
  with pytest.raises(ConfigError, match=culprit):
    config_lib.check_config(tiny_test_config(**overrides))
  workdir = tmp_path / "never"
  with pytest.raises(ConfigError, match=culprit):  # before anything is made
    trainer.train_and_evaluate(tiny_test_config(**overrides), str(workdir), devices=jax.devices()[:1])
  assert not workdir.exists()


def test_without_the_wandb_tracker_wandb_is_never_imported(tmp_path, monkeypatch):
  for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError from here on
  writer = metrics_lib.MetricWriter(str(tmp_path), tiny_test_config())  # jsonl and tensorboard
  writer.write(1, {"loss": 1.0})
  writer.write_text(1, "sample", "ROMEO.")
  writer.close()
  assert os.listdir(tmp_path / "tensorboard") and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
