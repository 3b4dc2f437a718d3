"""Two processes on 127.0.0.1 with 2 CPU devices each train like one process with 4 devices."""

import json
import os
import subprocess
import sys
import time

import portpicker
import pytest

from conftest import tiny_test_config
from test_train import ROOT, _flat

pytestmark = pytest.mark.slow


def _train_cmd(workdir, *extra):
  config = tiny_test_config(**{"train.steps": 10, "train.checkpoint_every": 10, "sample.max_new_tokens": 0,
                               "data.eval_corpus": "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")})
  return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in _flat(config).items()], *extra]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the test session's 8 fake devices; these processes pick their own
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [e["loss"] for e in map(json.loads, f) if "loss" in e]


def test_two_processes_train_like_one_with_four_devices(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(_train_cmd(tmp_path / "multi", "--num_cpu_devices=2", f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=60"),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  single = subprocess.run(_train_cmd(tmp_path / "single", "--num_cpu_devices=4"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert single.returncode == 0, single.stderr
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  assert "step 10/10" in outputs[0] and "step 10/10" not in outputs[1]  # only process 0 logs
  multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  assert len(multi) == 10
  assert multi == pytest.approx(one, rel=1e-5)
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["10"]


def test_a_missing_peer_fails_both_within_the_timeout(tmp_path):
  start = time.time()
  procs = [subprocess.Popen(_train_cmd(tmp_path / f"alone{i}", "--num_cpu_devices=2",
                                       f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}",
                                       "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=10"),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]  # each waits for a peer that never comes
  for p in procs:
    p.communicate(timeout=120)
    assert p.returncode != 0
  assert time.time() - start < 60
