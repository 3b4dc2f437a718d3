"""Faults of object storage, against a local GCS API server (tests/gcs_server.py): a bucket that does not
exist, a server that goes away in the middle of an async save, a torn checkpoint on gs://, a short
outage, a run refused on gs://; and the pieces they rest on (train.storage_retries reaching
tensorstore, a run's cleanup after a storage failure).

A test that stops a server starts its own GcsServer and runs train.py in a subprocess pointed at it
(CHILD below), so the clients of this process, which the session's server serves, are not touched.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

from conftest import tiny_test_config
from test_faults import _tokenizer
from test_train import ROOT, subprocess_env

EVAL = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")

# train.py with a hook that breaks the storage in the middle of an async save, for the test that starts it:
# in the background thread of the save of step STEP, when orbax opens the step's OCDBT stores to merge
# them (its first tensorstore request after the arrays are written; commit_success.txt comes later).
# GCS_FAULT=kill:STEP: this process kills the server (SIGKILL to GCS_SERVER_PID) there. gcsfs's backoff
#   sleeps (1, 2, 4, 8, 16 s) are fast-forwarded: its 6 tries stay, without their ~31 s of waiting.
# GCS_FAULT=outage:STEP: there, once the main thread waits for that save (the next one is due: no
#   request of its own in flight), it prints GCS_OUTAGE and waits for a line on stdin, which the test
#   sends once it has taken the network to the server down (_Proxy; up again half a second later).
CHILD = r"""
import asyncio, os, runpy, signal, sys, threading, time, types
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import tensorstore_utils
from llama_jax import checkpoint as ckpt_lib

kind, at = os.environ["GCS_FAULT"].split(":")
if kind == "kill":
  import gcsfs.retry

  async def no_wait(seconds):
    await asyncio.sleep(0)

  gcsfs.retry.asyncio = types.SimpleNamespace(sleep=no_wait)

finalize, open_kv_store, armed = ocp.PyTreeCheckpointHandler.finalize, tensorstore_utils.open_kv_store, []


def finalize_armed(self, directory):
  if os.path.basename(os.path.dirname(str(directory).rstrip("/"))) == at:
    armed.append(True)
  return finalize(self, directory)


def open_kv_store_with_fault(*args, **kwargs):
  if armed:
    armed.clear()
    if kind == "kill":
      os.kill(int(os.environ["GCS_SERVER_PID"]), signal.SIGKILL)
    else:
      while not waiting.is_set():
        time.sleep(0.01)
      print("GCS_OUTAGE", flush=True)
      sys.stdin.readline()
  return open_kv_store(*args, **kwargs)


wait, waiting = ckpt_lib.Checkpointer.wait, threading.Event()


def wait_marked(self):
  waiting.set()
  try:
    return wait(self)
  finally:
    waiting.clear()


ocp.PyTreeCheckpointHandler.finalize = finalize_armed
tensorstore_utils.open_kv_store = open_kv_store_with_fault
ckpt_lib.Checkpointer.wait = wait_marked
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def _config(**overrides):
  """The tiny test config on one small text file (opened in a blink, where the plays take a second)."""
  return tiny_test_config(**{"data.train_corpus": EVAL, "data.eval_corpus": EVAL, "data.tokenizer_path": _tokenizer(),
                             "train.steps": 6, "train.checkpoint_every": 1, "train.async_checkpoint": True,
                             **overrides})


def _config_file(path, config):
  """A --config file whose get_config() is `config`, for train.py in a subprocess."""
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  return str(path)


def _child(server, workdir, config_file, fault, via=None, stdin=None, stderr=subprocess.PIPE):
  """train.py (CHILD) on `workdir`, its clients pointed at `server` (through the proxy `via` if given).
  The children of a test share a JAX compilation cache next to the config file: the second compiles
  nothing (~8 s less here)."""
  cache = os.path.join(os.path.dirname(config_file), "jax-cache")
  clients = {k: v.replace(server.url, via.url) if via else v for k, v in server.env().items()}
  env = dict(subprocess_env(compilation_cache=cache), **clients, GCS_FAULT=fault,
             GCS_SERVER_PID=str(server._process.pid))
  return subprocess.Popen([sys.executable, "-c", CHILD, f"--config={config_file}", f"--workdir={workdir}"], cwd=ROOT,
                          env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, text=True)


class _Proxy:
  """A TCP proxy to a local server whose network can go down: `down()` refuses new connections and
  holds the bytes of those open (a partition: TCP retransmits through a short one), `up()` takes new
  connections again and lets the held bytes through. The server behind it keeps its state, as GCS does
  through an outage (stopping fake-gcs-server would also lose the upload sessions it keeps in memory,
  which GCS keeps for a week).

  Open connections are held, not cut: a cut after fake-gcs-server has finished a resumable upload but
  before its answer arrives makes the client send the last chunk again, which fake-gcs-server answers
  with 404 where GCS answers with the finished object, a failure GCS would not give."""

  def __init__(self, port: int):
    from tests.gcs_server import _free_port
    self._target, self._port = port, _free_port()
    self.url = f"http://127.0.0.1:{self._port}"
    self._flowing = threading.Event()
    self.up()

  def up(self):
    self._listener = socket.create_server(("127.0.0.1", self._port))
    threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
    self._flowing.set()

  def down(self):
    self._flowing.clear()
    self._listener.shutdown(socket.SHUT_RDWR)
    self._listener.close()

  def _accept(self, listener):
    while True:
      try:
        client, _ = listener.accept()
      except OSError:  # down()
        return
      server = socket.create_connection(("127.0.0.1", self._target))
      for a, b in ((client, server), (server, client)):
        threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

  def _pump(self, source, sink):
    try:
      while data := source.recv(1 << 16):
        self._flowing.wait()
        sink.sendall(data)
    except OSError:
      pass
    for conn in (source, sink):
      try:
        conn.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      conn.close()


def _runs(metrics_jsonl):
  """The train records of metrics.jsonl, one {step: record} per run (a run starts where the step goes
  back), less the machine's speed."""
  runs, last = [], None
  for event in map(json.loads, open(metrics_jsonl).read().splitlines()):
    if "loss" in event:
      if last is None or event["step"] <= last:
        runs.append({})
      runs[-1][event["step"]] = {k: v for k, v in event.items() if k not in ("tokens_per_sec", "mfu")}
      last = event["step"]
  return runs


@pytest.fixture
def own_server(tmp_path):
  from tests.gcs_server import GcsServer
  server = GcsServer(str(tmp_path / "gcs")).start()
  yield server
  server.stop()


def test_a_bucket_that_does_not_exist_is_one_line_before_compiling(tmp_path, gcs_server):
  config_file = _config_file(tmp_path / "config.py", _config())
  proc = subprocess.run([sys.executable, "train.py", f"--config={config_file}", "--workdir=gs://nobucket/run"],
                        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert proc.stdout == ""  # not a line of the run: no tokenizer, no model, nothing compiled
  assert proc.stderr.strip().splitlines() == [
      "error: --workdir=gs://nobucket/run: bucket gs://nobucket does not exist (or these credentials cannot see it)"]


def _tear(server, bucket, step_prefix):
  """Cuts every array data file (state/**/d/*) under step_prefix to a third through the GCS API, as
  test_faults._damage does on a disk: a torn checkpoint, as a bad copy leaves one."""
  api = f"{server.url}/storage/v1/b/{bucket}/o"
  listing = json.loads(urllib.request.urlopen(f"{api}?prefix={urllib.parse.quote(step_prefix)}state/").read())
  names = [o["name"] for o in listing["items"] if "/d/" in o["name"]]
  assert names
  for name in names:
    data = urllib.request.urlopen(f"{api}/{urllib.parse.quote(name, safe='')}?alt=media").read()
    upload = urllib.request.Request(f"{server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
                                    f"{urllib.parse.quote(name, safe='')}", data=data[:len(data) // 3], method="POST")
    urllib.request.urlopen(upload).read()


def test_storage_faults_in_a_run_on_gs_end_in_one_line_and_the_restart_resumes_exactly(tmp_path, own_server):
  """The server goes away in the middle of an async save: the run stops with one line. The server is
  back, the latest complete checkpoint is torn: the restart ignores the half-written step, moves the
  torn one to broken_checkpoints/ (one warning), resumes from the one before and trains on exactly as
  the first run did; a half-second network outage during one of its saves (new connections refused, open
  ones held: _Proxy) is ridden out."""
  server = own_server
  bucket = "faults"
  workdir = server.make_bucket(bucket) + "/run"
  root = os.path.join(server.root, bucket, "run")  # the server keeps the objects as files here: read them there

  # The server dies in the background save of step 4, with tensorstore told to retry once: one line.
  proc = _child(server, workdir, _config_file(tmp_path / "short.py", _config(**{"train.storage_retries": 1})), "kill:4")
  try:
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()  # gone already, unless it hung
  assert proc.returncode == 1, out + err
  assert "Traceback" not in err
  assert re.fullmatch(rf"error: (saving step 4 in {workdir}/checkpoints|writing {workdir}/\S+) failed: .+",
                      err.strip().splitlines()[-1]), err
  assert os.listdir(os.path.join(root, "checkpoints", "4", "state"))  # arrays written, never committed
  assert not os.path.exists(os.path.join(root, "checkpoints", "4", "commit_success.txt"))

  # The server is back and step 3, the newest complete one, is torn. The same command, with
  # tensorstore's retries as configured, rides out a half-second outage of the network in its save of step 4.
  server.stop()
  server.start()
  _tear(server, bucket, "run/checkpoints/3/")
  network = _Proxy(server.port)
  proc = _child(server, workdir, _config_file(tmp_path / "config.py", _config()), "outage:4", via=network,
                stdin=subprocess.PIPE, stderr=subprocess.STDOUT)
  watchdog = threading.Timer(120, proc.kill)  # a hang fails the test instead of holding it
  watchdog.start()
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.strip() == "GCS_OUTAGE":
        network.down()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(0.5)
        network.up()
    proc.wait()
  finally:
    watchdog.cancel()
    network.down()
  out = "".join(lines)
  assert proc.returncode == 0 and "Traceback" not in out, out
  (warning,) = [line for line in out.splitlines() if "warning:" in line]
  (broken,) = os.listdir(os.path.join(root, "broken_checkpoints"))
  assert broken.startswith("3-") and f"checkpoint step 3 in {workdir}/checkpoints is damaged" in warning, out
  assert f"moved it to {workdir}/broken_checkpoints/{broken}" in warning
  assert f"resumed from step 2 in {workdir}/checkpoints" in out, out  # not the half-written 4, not the torn 3
  first, resumed = _runs(os.path.join(root, "metrics.jsonl"))
  assert sorted(resumed) == [3, 4, 5, 6] and {3, 4} <= set(first)
  assert all(resumed[step] == first[step] for step in first if step in resumed)  # bit for bit


def test_train_storage_retries_reach_every_tensorstore_context_orbax_makes():
  """orbax takes no tensorstore context from its caller; the setting must still reach the contexts it
  makes for array files with and without OCDBT (tensorstore's own default retries for ~15 min)."""
  from orbax.checkpoint._src.serialization import tensorstore_utils

  from llama_jax import checkpoint as ckpt_lib
  try:
    ckpt_lib.set_storage_retries(2)
    for ocdbt in (True, False):
      retries = tensorstore_utils.get_ts_context(use_ocdbt=ocdbt)["gcs_request_retries"].to_json(include_defaults=True)
      assert retries == {"max_retries": 2, "initial_delay": "1s", "max_delay": "32s"}
  finally:
    ckpt_lib.set_storage_retries(ckpt_lib.STORAGE_RETRIES)


def test_closing_a_run_calls_every_closer_and_reports_the_error_that_stopped_it():
  """A storage server gone fails the save in flight and the metrics upload too: every closer still
  runs, and the run reports the error it was stopping on (none: the first closer's)."""
  from llama_jax import trainer
  called = []

  def closer(name, fails):
    def close():
      called.append(name)
      if fails:
        raise OSError(name)
    return close

  closers = [closer("checkpoint", True), closer("hook", False), closer("metrics", True)]
  trainer._close_all(closers, failed=True)  # the run's own error goes on: nothing raised here
  assert called == ["checkpoint", "hook", "metrics"]
  with pytest.raises(OSError, match="^checkpoint$"):
    trainer._close_all(closers, failed=False)
  assert called[3:] == ["checkpoint", "hook", "metrics"]


def test_a_run_on_gs_refused_before_its_first_step_leaves_the_workdir_as_it_was(gcs_bucket):
  """As on a disk (test_faults): refused after its tokenizer was copied in, the run removes what it added."""
  import jax

  from llama_jax import paths, trainer
  from llama_jax.errors import ConfigError
  workdir = f"{gcs_bucket}/run"
  paths.write_atomic(paths.join(workdir, "notes.txt"), "mine")
  with pytest.raises(ConfigError, match="config.sample.prompt has .* no room left"):
    trainer.train_and_evaluate(_config(**{"sample.max_new_tokens": 4, "sample.prompt": "ROMEO. " * 40}), workdir,
                               devices=jax.devices()[:1])
  assert paths.listdir(workdir) == ["notes.txt"]
