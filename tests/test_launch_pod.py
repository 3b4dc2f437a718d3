"""`python -m llama_jax.launch` on the simulated pod (tests/fake_pod): a 2-worker slice preempted twice at
random steps is brought back each time, and the run ends where a straight run ends, bit for bit."""

import subprocess
import sys

import numpy as np
import pytest

from fake_pod import fake_pod  # noqa: F401  (the fixture)
from llama_jax import paths
from test_faults import _metrics, two_process_config
from test_train import ROOT, _flat, subprocess_env

pytestmark = pytest.mark.slow


def test_a_twice_preempted_run_ends_like_a_straight_run(fake_pod, gcs_bucket, straight_two_process_run):  # noqa: F811
  """The straight run: the same config on 2 local processes of 2 CPU devices each, as the slice's 2 workers
  have (conftest.straight_two_process_run)."""
  straight, cache = straight_two_process_run
  config = two_process_config(**{"train.checkpoint_every": 4})  # how often it saves changes no step's numbers
  steps = config.train.steps
  paths.copy(config.data.tokenizer_path, f"{gcs_bucket}/tokenizer.model")
  config.data.tokenizer_path = f"{gcs_bucket}/tokenizer.model"
  workdir = f"{gcs_bucket}/run"
  # The workers get the launcher's environment (the fake passes it on, as the VMs' credentials): the
  # compilation cache of the straight run, so that no attempt compiles. A worker killed while writing an
  # entry leaves one that is compiled again, never a wrong program (test_train.subprocess_env).
  env = dict(fake_pod.env, FAKE_GCLOUD_CPU_DEVICES="2",
             **{k: v for k, v in subprocess_env(compilation_cache=cache).items() if k.startswith("JAX_")})
  launcher = subprocess.Popen(
      [sys.executable, "-m", "llama_jax.launch", "--tpu=pod", "--zone=us-central2-b", "--accelerator_type=v5p-16",
       "--poll_s=0.5", "--ship_working_tree", "--",
       "python", "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
       *[f"--config.{k}={v}" for k, v in _flat(config).items()]],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  rng = np.random.default_rng()
  at = [int(rng.integers(3, 12))]
  at.append(at[0] + int(rng.integers(6, 14)))  # after the resumed run has passed the first; before step 30
  lines, preempted = [], 0
  try:
    for line in launcher.stdout:
      lines.append(line)
      if preempted < 2 and line.startswith("[worker 0]") and f" step {at[preempted]}/{steps} " in line:
        fake_pod.preempt("pod")
        preempted += 1
    launcher.wait(timeout=60)
  finally:
    launcher.kill()
  out = "".join(lines)
  assert launcher.returncode == 0, out
  assert preempted == 2, out
  assert out.count("relaunch ") == 2 and "done after 2 restarts" in out, out
  assert _metrics(workdir) == _metrics(straight)  # every step's loss, exactly
  assert steps in _metrics(workdir, "eval_loss")
  assert _metrics(workdir, "eval_loss") == _metrics(straight, "eval_loss")  # the final eval
  for attempt in (0, 1, 2):
    for worker in (0, 1):
      assert paths.exists(f"{workdir}/launch/attempt-{attempt}/worker-{worker}.log"), (attempt, worker)
  creates = [c for c in fake_pod.calls() if c["argv"][2:4] == ["tpu-vm", "create"]]
  assert len(creates) == 3  # the first slice and one after each preemption
