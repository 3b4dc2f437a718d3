"""Two processes on 127.0.0.1 with 2 CPU devices each train like one process with 4 devices fed
the same global batches (each process packs its own share of the documents): a run whose workdir,
tokenizer and corpus (a JSONL + TFDS mixture) are on gs://, the local GCS server of conftest.py."""

import json
import os
import subprocess
import time

import portpicker
import pytest

from conftest import tiny_test_config
from llama_jax import paths
from test_faults import _tokenizer
from test_gcs_data import _mix, corpora  # noqa: F401  (corpora: the fixture of the corpora on gs://)
from test_train import ROOT, subprocess_env, train_cmd

pytestmark = pytest.mark.slow


def _config(corpora, bucket):
  tokenizer = f"{bucket}/tokenizer.model"
  if not paths.exists(tokenizer):
    paths.copy(_tokenizer(), tokenizer)
  return tiny_test_config(**{"train.steps": 10, "train.checkpoint_every": 10, "sample.max_new_tokens": 0,
                             "data.train_corpus": _mix(corpora, 1), "data.tfds_data_dir": corpora["tfds_data_dir"][1],
                             "data.tokenizer_path": tokenizer,
                             "data.eval_corpus": "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")})


def _losses(workdir):
  return [e["loss"] for e in map(json.loads, paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines())
          if "loss" in e]


def test_two_processes_train_like_one_with_four_devices(corpora, gcs_bucket):  # noqa: F811
  port = portpicker.pick_unused_port()
  config, workdir = _config(corpora, gcs_bucket), f"{gcs_bucket}/multi"
  procs = [subprocess.Popen(train_cmd(workdir, config, "--num_cpu_devices=2", f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=60"),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  assert "step 10/10" in outputs[0] and "step 10/10" not in outputs[1]  # only process 0 logs
  multi = _losses(workdir)
  assert len(multi) == 10
  assert multi == pytest.approx(_one_process_losses(workdir, config, 10), rel=1e-5)
  assert paths.listdir(f"{workdir}/checkpoints") == ["10"]


def _one_process_losses(workdir, config, steps):
  """The same global batches (process 0's rows, then process 1's) on one process with 4 devices."""
  import jax
  import numpy as np
  from llama_jax import data as data_lib, run_setup, tokenizer as tok_lib
  setup = run_setup.Setup(config, jax.devices()[:4])
  tok = tok_lib.load_tokenizer(run_setup.tokenizer_path(str(workdir)))
  corpus = data_lib.open_corpus(config.data, "train_corpus")
  shares = [iter(data_lib.train_batches(corpus, tok, config.data, p, 2)) for p in range(2)]
  state, step_fn, losses = setup.init_state(), setup.jit_train_step(), []
  with jax.set_mesh(setup.mesh):
    for _ in range(steps):
      local = [next(it) for it in shares]
      batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
      state, metrics = step_fn(state, setup.global_batch(batch))
      losses.append(float(metrics["loss"]))
  for it in shares:
    it.close()
  return losses


def test_a_missing_peer_fails_both_within_the_timeout(tmp_path):
  start = time.time()
  config = tiny_test_config(**{"sample.max_new_tokens": 0})
  procs = [subprocess.Popen(train_cmd(tmp_path / f"alone{i}", config, "--num_cpu_devices=2",
                                      f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}",
                                      "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=5"),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]  # each waits for a peer that never comes
  for p in procs:
    p.communicate(timeout=120)
    assert p.returncode != 0
  assert time.time() - start < 60
