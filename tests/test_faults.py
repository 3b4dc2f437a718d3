"""Runs that survive: SIGTERM, damaged and unfinished checkpoints, other meshes, non-finite steps,
changed configs, a wrong tokenizer and failed saves."""

import collections
import contextlib
import functools
import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from conftest import tiny_test_config
from llama_jax import data as data_lib
from llama_jax import paths, run_setup, trainer
from llama_jax.errors import ConfigError, StopRun
from test_train import ROOT, subprocess_env, train_cmd

EVAL = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")
COMPARED = ("loss", "grad_norm", "learning_rate", "num_targets")
EVAL_COMPARED = ("eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_num_tokens")


@functools.cache
def _tokenizer():
  """One 320-piece tokenizer for every run here (training one per run costs seconds each)."""
  from llama_jax import corpus, tokenizer as tok_lib
  path = os.path.join(tempfile.mkdtemp(), "tokenizer.model")
  return tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:3]), 320, path).path


def _config(**overrides):
  return tiny_test_config(**{"data.eval_corpus": EVAL, "sample.max_new_tokens": 0,
                             "data.tokenizer_path": _tokenizer(), **overrides})


def _metrics(workdir, kind="loss"):
  """step -> the compared metrics of the last event of `kind` logged for that step (a resumed run logs
  again): train steps ("loss") or held-out evals ("eval_loss"); `workdir` local or gs://."""
  events = map(json.loads, paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines())
  compared = COMPARED if kind == "loss" else EVAL_COMPARED
  return {e["step"]: tuple(e[k] for k in compared) for e in events if kind in e}


def _params(workdir, step):
  return jax.device_get(run_setup.load_run(str(workdir), step, devices=jax.devices()[:1])[1])


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.fixture(scope="module")
def straight_12(tmp_path_factory):
  """12 steps on one device without interruption, checkpoints every 4."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  trainer.train_and_evaluate(_config(**{"train.steps": 12}), str(workdir), devices=jax.devices()[:1])
  return workdir


# ------------------------------------------------------------------ SIGTERM


def _run_until_signalled(cmd, at_step, total, send, env):
  """Starts cmd, calls send(proc) when it logs step `at_step`, returns its whole output."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f" step {at_step}/{total} " in line:
      send(proc)
  proc.wait(timeout=120)
  return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_sigterm_twice_then_finishing_on_gs_equals_a_straight_run_on_disk(tmp_path, gcs_bucket):
  """The interrupted run keeps its workdir and tokenizer on gs:// (a local GCS API server): every step's
  metrics, the final eval and the params equal those of the straight run on a local disk, bit for bit."""
  config = _config(**{"train.steps": 30, "train.checkpoint_every": 2, "train.async_checkpoint": True})
  env = subprocess_env(compilation_cache=tmp_path / "jax-cache")  # the signals come after the first step
  straight = subprocess.run(train_cmd(tmp_path / "a", config), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
  assert straight.returncode == 0, straight.stdout + straight.stderr
  remote = f"{gcs_bucket}/b"
  paths.copy(config.data.tokenizer_path, f"{gcs_bucket}/tokenizer.model")
  config.data.tokenizer_path = f"{gcs_bucket}/tokenizer.model"
  rng = np.random.default_rng()
  saved = 0
  for _ in range(2):
    at = saved + int(rng.integers(2, 9))  # saves every 2 steps, asynchronously: one is often in flight
    code, out = _run_until_signalled(train_cmd(remote, config), at, 30, lambda p: p.send_signal(signal.SIGTERM), env)
    assert code == 0, out
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert "SIGTERM: saved step" in last, out
    saved = int(last.split("saved step ")[1].split()[0])
    assert saved >= at
    assert sorted(int(s) for s in paths.listdir(f"{remote}/checkpoints"))[-1] == saved
  finish = subprocess.run(train_cmd(remote, config), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert finish.returncode == 0, finish.stdout + finish.stderr
  assert f"resumed from step {saved}" in finish.stdout
  assert not os.path.exists(remote) and not os.path.exists("gs:")  # nothing went to a local folder of that name
  assert _metrics(remote) == _metrics(tmp_path / "a")  # every step, exactly
  assert 30 in _metrics(remote, "eval_loss")
  assert _metrics(remote, "eval_loss") == _metrics(tmp_path / "a", "eval_loss")  # the final eval
  assert paths.read_bytes(f"{remote}/tokenizer.model") == paths.read_bytes(tmp_path / "a" / "tokenizer.model")
  assert paths.glob(f"{remote}/tensorboard/*tfevents*")
  _assert_same_params(_params(remote, 30), _params(tmp_path / "a", 30))


def two_process_config(**overrides):
  """The config of conftest.straight_two_process_run, with `overrides`."""
  # Enough steps (~0.3 s each here, 2 processes on 2 cores) for a preemption notice to cross the coordination
  # service before the end.
  return _config(**{"train.steps": 30, "train.checkpoint_every": 15, **overrides})


def two_process_run(workdir, config, cache, at_step=None, send=None):
  """train.py on 2 local processes of 2 CPU devices each; send(process 1) when process 0 logs step
  `at_step` (the run must end with status 0 all the same). Returns process 0's output."""
  import portpicker
  env = subprocess_env(compilation_cache=cache)  # a signal comes after the first step: no compile is cut short
  port = portpicker.pick_unused_port()
  cmds = [train_cmd(workdir, config, "--num_cpu_devices=2", f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=60") for i in range(2)]
  other = subprocess.Popen(cmds[1], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  code, out = _run_until_signalled(cmds[0], at_step, config.train.steps, lambda _: send(other), env)
  other_out = other.communicate(timeout=120)[0]
  assert code == 0 and other.returncode == 0, out + other_out
  return out


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path, straight_two_process_run):
  straight, cache = straight_two_process_run
  config = two_process_config()
  sigterm = lambda other: other.send_signal(signal.SIGTERM)  # process 1 only; process 0 logs
  out = two_process_run(tmp_path / "b", config, cache, at_step=5, send=sigterm)
  last = out.strip().splitlines()[-1]
  assert "preemption notice: saved step" in last, out
  saved = int(last.split("saved step ")[1].split()[0])
  step_dir = tmp_path / "b" / "checkpoints" / str(saved)
  assert {"shard-00000-of-00002.json", "shard-00001-of-00002.json"} <= set(os.listdir(step_dir / "data"))
  out = two_process_run(tmp_path / "b", config, cache)
  assert f"resumed from step {saved}" in out
  assert 5 <= saved < 30
  assert _metrics(tmp_path / "b") == _metrics(straight)  # every step, exactly


# ------------------------------------------------------------------ damaged and unfinished checkpoints


def _damage(step_dir):
  """Truncates the array data files of a checkpoint, as a full disk or a bad copy would."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)


def _sigterm_in_a_long_eval(self, params):
  """Evaluator.__call__ of a held-out eval long enough for a SIGTERM to come early in it."""
  os.kill(os.getpid(), signal.SIGTERM)
  for _ in range(100):
    time.sleep(0.05)
  return {"loss": 1.0, "perplexity": 2.7, "bits_per_byte": 1.0, "num_tokens": 1}


def test_a_damaged_latest_checkpoint_falls_back_and_then_matches_a_straight_run(tmp_path, straight_12, capsys,
                                                                                 monkeypatch):
  """Also: the fallback is one warning line (no ignored tracebacks of tensorstore's abandoned reads),
  and a SIGTERM during the final held-out eval stops it at once, the last step saved."""
  from llama_jax import evaluate as eval_lib
  config = _config(**{"train.steps": 12})
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], stop_after=8)
  _damage(workdir / "checkpoints" / "8")

  proc = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", "--step=8"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "checkpoint step 8" in last and "damaged" in last and str(workdir / "checkpoints") in last, proc.stderr

  capsys.readouterr()
  unraisable = []  # nothing ignored reaches stderr (train.py's tensorstore noise: the test after this one)
  previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
  monkeypatch.setattr(eval_lib.Evaluator, "__call__", _sigterm_in_a_long_eval)
  try:
    assert trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1]) is None
    gc.collect()
  finally:
    sys.unraisablehook = previous_hook
  out = capsys.readouterr().out
  assert out.count("warning:") == 1 and "checkpoint step 8" in out and "resumed from step 4" in out
  assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable][:3]
  assert out.strip().splitlines()[-1].endswith(
      f"SIGTERM: training finished and step 12 is saved in {workdir / 'checkpoints'}; the held-out eval was "
      f"interrupted (python eval.py --workdir {workdir} scores it)")
  (kept,) = os.listdir(workdir / "broken_checkpoints")  # moved aside, not deleted
  assert kept.startswith("8-")
  assert _metrics(workdir) == _metrics(straight_12)
  _assert_same_params(_params(workdir, 12), _params(straight_12, 12))


def test_ignored_tracebacks_of_a_failed_restore_are_dropped_and_no_others():
  """train.py resuming past a damaged step printed ~200 lines of "RuntimeError: Event loop is closed"
  (tensorstore reads the failed restore left in flight, via sys.unraisablehook) around its one warning."""
  seen = []
  hook = trainer._quiet_abandoned_reads(seen.append)
  Unraisable = collections.namedtuple("Unraisable", "exc_type exc_value exc_traceback err_msg object")

  async def read():
    pass

  coroutine = read()
  hook(Unraisable(RuntimeError, RuntimeError("Event loop is closed"), None, None, None))
  hook(Unraisable(RuntimeError, RuntimeError("Event loop is closed"), None, None, coroutine))
  coroutine.close()
  other = Unraisable(ValueError, ValueError("something else"), None, None, None)
  hook(other)
  assert seen == [other]


def test_an_unfinished_save_is_ignored(tmp_path, straight_12):
  config = _config(**{"train.steps": 12})
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], stop_after=8)
  # What a SIGKILL during the async save of step 12 leaves: orbax's temporary directory, half written.
  unfinished = workdir / "checkpoints" / "12.orbax-checkpoint-tmp"
  shutil.copytree(workdir / "checkpoints" / "8", unfinished)
  _damage(unfinished)
  os.remove(unfinished / "commit_success.txt")
  trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert _metrics(workdir) == _metrics(straight_12)
  _assert_same_params(_params(workdir, 12), _params(straight_12, 12))


# ------------------------------------------------------------------ other meshes


def test_resume_on_other_meshes_continues_the_loss(tmp_path):
  config = _config(**{"mesh.fsdp": 8})
  trainer.train_and_evaluate(config, str(tmp_path / "fsdp8"), stop_after=4)
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(config, str(straight))
  expected = _metrics(straight)
  for name, mesh, devices in [("mixed", dict(data=2, fsdp=2, tensor=2), jax.devices()),
                              ("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])]:
    shutil.copytree(tmp_path / "fsdp8", tmp_path / name)
    trainer.train_and_evaluate(_config(**{f"mesh.{k}": v for k, v in mesh.items()}), str(tmp_path / name),
                               devices=devices)
    resumed = _metrics(tmp_path / name)
    for step in range(5, 9):
      np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-5, err_msg=f"{name} step {step}")


# ------------------------------------------------------------------ non-finite steps


def _poison_batch(monkeypatch, index):
  """Makes the index-th training batch produce a NaN loss (a target outside the vocabulary)."""
  made = []
  original = data_lib.rows_to_batch

  def rows_to_batch(rows):
    batch = original(rows)
    if "num_bytes" not in batch:  # a training batch
      made.append(1)
      if len(made) == index:
        batch["targets"][0, 0] = 10**6
        batch["weights"][0, 0] = 1
    return batch

  monkeypatch.setattr(data_lib, "rows_to_batch", rows_to_batch)


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path, monkeypatch):
  _poison_batch(monkeypatch, 6)
  workdir = tmp_path / "run"
  with pytest.raises(StopRun, match=r"not finite at step 6; .* last good checkpoint: step 4"):
    trainer.train_and_evaluate(_config(**{"train.log_every": 3}), str(workdir), devices=jax.devices()[:1])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
  params = _params(workdir, 4)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_with_skipping_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
  _poison_batch(monkeypatch, 6)
  workdir = tmp_path / "run"
  result = trainer.train_and_evaluate(_config(**{"train.skip_nonfinite_steps": 2}), str(workdir),
                                      devices=jax.devices()[:1])
  assert np.isfinite(result["loss"])
  events = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  skipped = {e["step"]: e["skipped_steps"] for e in events if "skipped_steps" in e}
  assert skipped[5] == 0 and skipped[6] == 1 and skipped[8] == 1
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(_params(workdir, 8)))


# ------------------------------------------------------------------ changed configs, tokenizers, saves


def test_a_resume_that_changes_the_model_or_data_order_stops_listing_the_keys(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(_config(), workdir, devices=jax.devices()[:1], stop_after=4)
  changed = _config(**{"model.rope_theta": 500000.0, "data.shuffle_seed": 3})
  with pytest.raises(ConfigError, match=r"changed config: data.shuffle_seed: 0 -> 3; model.rope_theta: 10000.0 -> 500000.0"):
    trainer.train_and_evaluate(changed, workdir, devices=jax.devices()[:1])
  # Longer, computed in bf16, or with another learning rate: the same run, extended.
  trainer.train_and_evaluate(_config(**{"train.steps": 10, "model.dtype": "bfloat16", "optim.learning_rate": 1e-3}),
                             workdir, devices=jax.devices()[:1], stop_after=6)
  changed.train.allow_config_change = True
  trainer.train_and_evaluate(changed, workdir, devices=jax.devices()[:1], stop_after=8)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))[-1] == 8


def test_a_refused_run_leaves_nothing_behind_and_the_corrected_one_then_works(tmp_path):
  from llama_jax import corpus, tokenizer as tok_lib
  plays = corpus.shakespeare_plays("train")[:2]
  wrong = tok_lib.train_sentencepiece(tok_lib.training_lines(plays), 400, str(tmp_path / "wrong.model"))
  right = tok_lib.train_sentencepiece(tok_lib.training_lines(plays), 320, str(tmp_path / "right.model"))
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="vocab size 400"):
    trainer.train_and_evaluate(_config(**{"data.tokenizer_path": wrong.path}), str(workdir),
                               devices=jax.devices()[:1])
  assert not os.path.exists(workdir)  # the run made it: it is gone
  # Refused after the tokenizer was copied in (issue 15 case 5): the workdir keeps only what it had.
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="config.sample.prompt has .* no room left"):
    trainer.train_and_evaluate(_config(**{"data.tokenizer_path": right.path, "sample.max_new_tokens": 4,
                                          "sample.prompt": "ROMEO. " * 40}), str(workdir), devices=jax.devices()[:1])
  assert os.listdir(workdir) == ["notes.txt"]
  trainer.train_and_evaluate(_config(**{"data.tokenizer_path": right.path, "train.steps": 2}), str(workdir),
                             devices=jax.devices()[:1])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_a_hugging_face_directory_is_refused_as_a_workdir_and_left_as_it_was(tmp_path):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text('{"model_type": "llama"}')
  (hf_dir / "tokenizer.model").write_bytes(open(_tokenizer(), "rb").read())
  with pytest.raises(ConfigError, match=f"--workdir {hf_dir} is a Hugging Face checkpoint directory .* not a llama_jax "
                                        "workdir: import it with python -m llama_jax.convert import-hf"):
    trainer.train_and_evaluate(_config(**{"train.steps": 1}), str(hf_dir), devices=jax.devices()[:1])
  assert sorted(os.listdir(hf_dir)) == ["config.json", "tokenizer.model"]


@contextlib.contextmanager
def _read_only(directory, monkeypatch):
  """`directory` made read-only by a read-only bind mount onto itself; where this machine does not
  allow mounting, orbax's save is made to fail as it would there (EROFS)."""
  mounted = subprocess.run(["mount", "--bind", directory, directory], capture_output=True).returncode == 0
  if mounted:
    read_only = subprocess.run(["mount", "-o", "remount,ro,bind", directory], capture_output=True).returncode == 0
    try:
      if read_only:
        yield
    finally:
      subprocess.run(["umount", directory], check=True)
    if read_only:
      return
  import orbax.checkpoint as ocp

  def read_only_fs(*args, **kwargs):
    raise OSError(30, "Read-only file system")

  monkeypatch.setattr(ocp.CheckpointManager, "save", read_only_fs)
  yield


def test_a_failed_save_is_one_line_and_keeps_the_checkpoints_there(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  config = _config(**{"train.async_checkpoint": True})
  trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], stop_after=4)
  files = lambda: {p: open(p, "rb").read() for p in glob.glob(str(workdir / "checkpoints" / "**"), recursive=True)
                   if os.path.isfile(p)}
  before = files()
  with _read_only(str(workdir / "checkpoints"), monkeypatch):
    with pytest.raises(ConfigError, match=r"^saving step 8 in .*checkpoints failed: .*Read-only file system"):
      trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert files() == before
  # Once the directory is writable again, the same command goes on from step 4.
  assert trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])["step"] == 8


def test_the_keep_policy_keeps_the_newest_and_every_nth_step(tmp_path):
  config = _config(**{"train.steps": 12, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
                      "train.keep_every": 4})
  trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints")) == [4, 8, 10, 12]
