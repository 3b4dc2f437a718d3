"""A run with data.shards = 4 trains on 4 processes (1 CPU device each), resumes on 2 (2 devices each) and
then on 1 (4 devices), every step's loss that of one process with 4 devices fed the global batches of 4
processes (each packing its own share of the documents); a resume on 3 processes stops with one line.
The workdir, tokenizer and corpus (a JSONL + TFDS mixture) are on gs://, the local GCS server of
conftest.py. All processes run on 127.0.0.1."""

import json
import os
import subprocess
import time

import numpy as np
import portpicker
import pytest

from conftest import tiny_test_config
from llama_jax import paths
from test_faults import _tokenizer
from test_gcs_data import _mix, corpora  # noqa: F401  (corpora: the fixture of the corpora on gs://)
from test_train import ROOT, subprocess_env, train_cmd

pytestmark = pytest.mark.slow

SHARDS, STEPS = 4, 6


def _config(corpora, bucket, steps, shards):
  tokenizer = f"{bucket}/tokenizer.model"
  if not paths.exists(tokenizer):
    paths.copy(_tokenizer(), tokenizer)
    paths.write_atomic(f"{bucket}/heldout.txt", paths.read_text(os.path.join(ROOT, "tests", "data",
                                                                             "heldout_sample.txt"))[:2000])
  # min_lr_ratio = 1: after warmup the learning rate is the peak at every step whatever train.steps is, so
  # a leg that ends at step `steps` (train.steps = steps) trains as one leg of a STEPS-step run.
  return tiny_test_config(**{"train.steps": steps, "train.checkpoint_every": 100, "sample.max_new_tokens": 0,
                             "optim.min_lr_ratio": 1.0, "data.shards": shards,
                             # a window of 16 chunks, not one epoch of the plays' (7504) per shard to fill first
                             "data.shuffle_window": 16,
                             "data.train_corpus": _mix(corpora, 1), "data.tfds_data_dir": corpora["tfds_data_dir"][1],
                             "data.tokenizer_path": tokenizer,
                             "data.eval_corpus": f"text:{bucket}/heldout.txt"})  # one eval batch


def _losses(workdir):
  return [e["loss"] for e in map(json.loads, paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines())
          if "loss" in e]


def _run(workdir, config, processes):
  """train.py on `processes` processes with 4 // processes CPU devices each: (return codes, outputs)."""
  port = portpicker.pick_unused_port()
  multi = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
           "--distributed_timeout_s=60"] if processes > 1 else []
  procs = [subprocess.Popen(train_cmd(workdir, config, f"--num_cpu_devices={max(SHARDS // processes, 1)}", *multi,
                                      *([f"--process_id={i}"] if multi else [])),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  return [p.returncode for p in procs], outputs


def test_four_then_two_then_one_process_train_like_four(corpora, gcs_bucket):  # noqa: F811
  workdir = f"{gcs_bucket}/multi"
  # 4 processes x 1 device to step 2; 2 x 2 to step 4 (data.shards = 0: the checkpoint's 4); 1 x 4 to the end.
  for processes, end, shards in ((4, 2, SHARDS), (2, 4, 0), (1, STEPS, SHARDS)):
    codes, outputs = _run(workdir, _config(corpora, gcs_bucket, end, shards), processes)
    assert codes == [0] * processes, outputs
    assert f"step {end}/{end}" in outputs[0] and all(f"step {end}/" not in out for out in outputs[1:])  # 0 logs
    if end > 2:
      assert f"resumed from step {end - 2}" in outputs[0]
    if processes == 4:  # a resume on 3 processes cannot read 4 shards: one line, before anything compiles
      codes, outputs = _run(workdir, _config(corpora, gcs_bucket, STEPS, 0), 3)
      assert codes == [1] * 3, outputs
      line = ("error: config.data.shards=4 (saved in checkpoint 2): a run on 3 processes cannot read it; "
              "use 1, 2 or 4 processes")
      assert all(out.strip().splitlines()[-1] == line for out in outputs), outputs
  losses = _losses(workdir)
  assert len(losses) == STEPS
  reference = _one_process_losses(workdir, _config(corpora, gcs_bucket, STEPS, SHARDS), STEPS)
  # Within 2 float32 ulps, not bit for bit: the loss is a sum over the 4 devices divided by the target
  # count, and across 4 processes that sum is all-reduced in another order than within one process
  # (measured: 1 or 2 ulps at step 2 on 4 processes, every other step exact).
  ulp = [float(np.spacing(np.float32(r))) for r in reference]
  assert all(abs(a - b) <= 2 * u for a, b, u in zip(losses, reference, ulp)), (losses, reference)
  assert sorted(paths.listdir(f"{workdir}/checkpoints"), key=int) == ["2", "4", "6"]


def _one_process_losses(workdir, config, steps):
  """The global batches of 4 processes (process 0's rows, then 1's, 2's, 3's, each process reading its
  share as before data.shards) on one process with 4 devices."""
  import jax
  from llama_jax import data as data_lib, run_setup, tokenizer as tok_lib
  setup = run_setup.Setup(config, jax.devices()[:SHARDS])
  tok = tok_lib.load_tokenizer(run_setup.tokenizer_path(str(workdir)))
  corpus = data_lib.open_corpus(config.data, "train_corpus")
  shares = [iter(data_lib.train_batches(corpus, tok, config.data, p, SHARDS)) for p in range(SHARDS)]
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
