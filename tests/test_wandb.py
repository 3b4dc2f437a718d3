"""Weights & Biases offline (issue 20, acceptance 1): a run stopped part way (or SIGKILLed) and resumed logs
to one W&B run id, and the train loss and held-out bits/byte read back from W&B's own offline files equal
metrics.jsonl's; bad tracker settings are one ConfigError line. Nothing reaches the network: W&B
runs offline, its directories and settings in the test's temporary directory."""

import contextlib
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib

import jax
import pytest

from conftest import tiny_test_config
from llama_jax import checkpoint as ckpt_lib, config_lib, metrics as metrics_lib, paths, trainer, trackers
from llama_jax.errors import ConfigError
from test_train import ROOT, subprocess_env, train_cmd

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


def read_wandb_records(path, cut_short=False):
  """The records of a W&B transaction log (run-<id>.wandb), read with wandb's protos.

  cut_short: the log of a killed process may end inside a record: then its complete records (the ones
  before a chunk that runs past the end of the file) are returned, and the cut record is dropped.

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
    if cut_short and pos + 7 + length > len(data):
      break
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
  """The offline run directories under `wandb_dir`, in the order they started (their names' times; a
  second start in the same second gets the suffix -1, wandb_init.py: set_sync_dir_suffix)."""
  return sorted(glob.glob(os.path.join(wandb_dir, "offline-run-*")))


def _run_id_of(run_dir):
  """The W&B run id in an offline run directory's name: offline-run-<YYYYMMDD_HHMMSS>-<id>[-<n>]."""
  return os.path.basename(run_dir).split("-")[3]


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
  assert [_run_id_of(r) for r in runs] == [run_id, run_id]
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


def _wandb_cores_of(pid: int) -> list[int]:
  """The live wandb-core processes that process `pid` started (wandb passes them its pid: --pid PID)."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    except (OSError, ValueError):  # not a process, or gone
      continue
    if os.path.basename(args[0]) == "wandb-core" and f"\0--pid\0{pid}\0" in "\0".join(args) + "\0":
      found.append(int(entry))
  return found


@contextlib.contextmanager
def _train_py(cmd, env):
  """train.py running `cmd`, its output (and that of the wandb-core it starts, which inherits it) on
  .stdout; killed after 300 s (a hang guard), and at the end, with any wandb-core of its still running."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  guard = threading.Timer(300, proc.kill)
  guard.start()
  try:
    yield proc
  finally:
    guard.cancel()
    proc.kill()
    proc.wait()
    for pid in _wandb_cores_of(proc.pid):
      os.kill(pid, signal.SIGKILL)
    proc.stdout.close()


def test_a_killed_run_resumed_appends_to_its_wandb_run_with_the_values_of_metrics_jsonl(tmp_path):
  """train.py SIGKILLed after step 6 (its last checkpoint: step 4), then run again to the end: both starts
  write to the one W&B run id, and the rows of both offline logs (the killed one's as far as it was
  written) hold the train losses and bits/byte of metrics.jsonl, steps 5 and 6 twice."""
  workdir = tmp_path / "run"
  config = _wandb_config(**{"data.eval_corpus": HELDOUT, "train.eval_every": 2,  # an eval right after step 6
                            "data.tokenizer_sample_bytes": 300_000})
  cmd = train_cmd(workdir, config)
  env = subprocess_env(compilation_cache=tmp_path / "jax-cache")  # the kill comes after the last compile
  env.pop("WANDB_SERVICE", None)  # a wandb service of its own, never this process's

  with _train_py(cmd, env) as killed:
    out = []
    for line in killed.stdout:
      out.append(line)
      if " step 6/8 " in line:
        assert _wandb_cores_of(killed.pid), "".join(out)
        killed.send_signal(signal.SIGKILL)
        break
    # The end of the output: when wandb-core exits too, which it does by itself once its parent is gone.
    out.append(killed.communicate(timeout=120)[0])
    assert killed.returncode == -signal.SIGKILL, "".join(out)
    assert not _wandb_cores_of(killed.pid)
  with _train_py(cmd, env) as resumed:
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert "resumed from step 4 " in out
    assert not _wandb_cores_of(resumed.pid)  # stopped at the run's end

  run_id = (workdir / "wandb_run_id").read_text().strip()
  runs = _offline_runs(str(workdir / "wandb"))
  assert [_run_id_of(r) for r in runs] == [run_id, run_id]  # the two starts
  killed_log, resumed_log = (os.path.join(r, f"run-{run_id}.wandb") for r in runs)
  records = [read_wandb_records(killed_log, cut_short=True), read_wandb_records(resumed_log)]
  assert records[0], (f"{killed_log}: not one record of the killed run in its {os.path.getsize(killed_log)} bytes "
                      "(wandb-core had not written them from its buffer when it stopped)")
  assert [_only(r, "run").run_id for r in records] == [run_id, run_id]
  assert [r for r in records[0] if r.WhichOneof("record_type") == "exit"] == []  # killed: never finished
  assert _only(records[1], "exit").exit_code == 0

  # metrics.jsonl: the killed run's events to step 6 (7 or 8 too, were they logged before the kill landed),
  # then the resumed run's from step 5: steps 5 and 6 twice.
  events = metrics_lib.read_events(str(workdir / "metrics.jsonl"))
  cut = next(i for i in range(1, len(events)) if events[i]["step"] < events[i - 1]["step"])
  killed_steps = [e["step"] for e in events[:cut] if "loss" in e]
  assert killed_steps == list(range(1, len(killed_steps) + 1)) and len(killed_steps) >= 6
  assert [e["step"] for e in events[cut:] if "loss" in e] == [5, 6, 7, 8]
  # W&B: the same values, row for row. Of the killed run, its log as far as wandb-core wrote it before
  # it stopped (the rest was in its buffer), but at least up to the checkpoint of step 4.
  killed_rows, resumed_rows = (history_rows(r) for r in records)
  for key in ("loss", "eval_bits_per_byte"):
    expected = [(e["step"], e[key]) for e in events[:cut] if key in e]
    logged = [(r["step"], r[key]) for r in killed_rows if key in r]
    assert logged == expected[:len(logged)], key
    assert len(logged) >= len([s for s, _ in expected if s <= 4]), (key, logged, expected)
    assert [(r["step"], r[key]) for r in resumed_rows if key in r] == [(e["step"], e[key]) for e in events[cut:]
                                                                       if key in e], key


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
  assert [_run_id_of(r) for r in runs] == [run_id, run_id]
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
