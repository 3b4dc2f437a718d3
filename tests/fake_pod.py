"""The simulated TPU pod of the launcher tests: a fake `gcloud` first on PATH (tests/fake_pod/gcloud; its
fake_gcloud.py says what it accepts) whose slices live in a folder and whose workers are local processes.

  from fake_pod import fake_pod            # the fixture; it kills every process of the pod at teardown

  def test_x(fake_pod):
    subprocess.run([sys.executable, "-m", "llama_jax.launch", ...], env=fake_pod.env)
    fake_pod.preempt("my-tpu")             # slice PREEMPTED, its workers SIGKILLed
    assert fake_pod.calls()[-1]["argv"][:4] == ["compute", "tpus", "tpu-vm", "ssh"]
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

FAKE_DIR = pathlib.Path(__file__).resolve().parent / "fake_pod"
GCLOUD = FAKE_DIR / "gcloud"

_spec = importlib.util.spec_from_file_location("fake_gcloud", FAKE_DIR / "fake_gcloud.py")
fake_gcloud = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_gcloud)


class FakePod:
  """A state folder under tmp_path, the environment that points `gcloud` at it, and what a test does to it.

  Args:
    tmp_path: the test's folder; the state goes to tmp_path/fake_gcloud.
    python: the workers' `python` (default this interpreter, the test venv's: the "image" has every package).
    cpu_devices: jax CPU devices per worker (JAX_NUM_CPU_DEVICES).
    create_s, queue_s: seconds a slice stays CREATING; seconds a queued resource waits before provisioning.

  `env` is a plain dict: a test may change FAKE_GCLOUD_CPU_DEVICES (or the other FAKE_GCLOUD_* values) in
  it before a slice is made; the fake reads them at create.
  """

  def __init__(self, tmp_path, python=sys.executable, cpu_devices=1, create_s=0.2, queue_s=0.5):
    self.root = pathlib.Path(tmp_path) / "fake_gcloud"
    self.root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are this process's; a worker gets cpu_devices
    env.update(PATH=f"{FAKE_DIR}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", JAX_PLATFORMS="cpu",
               FAKE_GCLOUD_STATE=str(self.root), FAKE_GCLOUD_PYTHON=str(python),
               FAKE_GCLOUD_CPU_DEVICES=str(cpu_devices), FAKE_GCLOUD_CREATE_S=str(create_s),
               FAKE_GCLOUD_QUEUE_S=str(queue_s))
    self.env = env

  def gcloud(self, *args, timeout=120, **kwargs):
    """Runs `gcloud *args` with self.env; returns the CompletedProcess (text stdout/stderr captured)."""
    return subprocess.run([str(GCLOUD), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                          **kwargs)

  def popen(self, *args, **kwargs):
    """Starts `gcloud *args` with self.env (text pipes for stdout/stderr unless given)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([str(GCLOUD), *args], env=self.env, text=True, **kwargs)

  def slice(self, name):
    """The slice's slice.json as a dict (None if there is none), after the elapsed time's state changes."""
    with fake_gcloud.locked(str(self.root)):
      fake_gcloud.advance(str(self.root))
      return fake_gcloud.load_node(str(self.root), name)

  def state(self, name):
    """The slice's state ("CREATING", "READY", "PREEMPTED", ...), or None if it does not exist."""
    node = self.slice(name)
    return node and node["state"]

  def queued_state(self, name):
    """The queued resource's state ("WAITING_FOR_RESOURCES", ..., "SUSPENDED"), or None if it does not exist."""
    with fake_gcloud.locked(str(self.root)):
      fake_gcloud.advance(str(self.root))
      qr = fake_gcloud.load_queued(str(self.root), name)
    return qr and qr["state"]

  def home(self, name, worker=0):
    """The home folder of a worker of slice `name`."""
    return self.root / name / f"worker-{worker}" / "home"

  def preempt(self, name):
    """What a preemption does: slice -> PREEMPTED, its queued resource -> SUSPENDED, every worker process
    SIGKILLed. KeyError if there is no such slice."""
    fake_gcloud.preempt(str(self.root), name)

  def kill_worker(self, name, worker):
    """SIGKILLs every process of one worker; the slice stays READY (a worker that died, not a preemption)."""
    node = self.slice(name)
    tag = fake_gcloud.worker_tag(str(self.root), name, worker, node["incarnation"])
    fake_gcloud.kill_processes(lambda env: env.get(fake_gcloud.WORKER_VAR) == tag,
                               [self.root / name / f"worker-{worker}" / "pgids"])

  def calls(self):
    """Every finished gcloud call so far, in the order they ended: [{"argv": [...], "exit": code}]."""
    path = self.root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def processes(self):
    """Pids of the live processes of this pod: its workers' and any process given self.env (gcloud calls,
    a launcher), this one excepted."""
    return [pid for pid, _ in fake_gcloud.find_processes(self._ours)]

  def kill_all(self):
    """SIGKILLs every process of processes() until none is left (RuntimeError if some survive 5 s)."""
    pgid_dirs = list(self.root.glob("*/worker-*/pgids"))
    fake_gcloud.kill_processes(self._ours, pgid_dirs)

  def _ours(self, env):
    return (env.get(fake_gcloud.STATE_VAR) == str(self.root)
            or env.get(fake_gcloud.WORKER_VAR, "").startswith(f"{self.root}/"))


@pytest.fixture
def fake_pod(tmp_path):
  """A FakePod in tmp_path; at teardown no process of it is left."""
  pod = FakePod(tmp_path)
  yield pod
  pod.kill_all()
