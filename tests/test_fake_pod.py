"""The simulated pod (tests/fake_pod) answers the gcloud commands of the launcher's contract as gcloud does.

The expected syntax, states and error words are gcloud's (the TPU API's node and queued-resource states,
`ERROR: (gcloud.<command>) NOT_FOUND / ALREADY_EXISTS / INVALID_ARGUMENT`, exit 2 for arguments gcloud does
not know, ssh's 255 for a lost connection), and the hosts per slice those of Cloud TPU's slice tables.
"""

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from fake_pod import fake_pod  # noqa: F401  (the fixture)

ZONE = "--zone=us-east5-a"
TPU_VM = ("compute", "tpus", "tpu-vm")
QUEUED = ("compute", "tpus", "queued-resources")


def _create(pod, name, accelerator_type="v4-8", *extra):
  return pod.gcloud(*TPU_VM, "create", name, ZONE, f"--accelerator-type={accelerator_type}",
                    "--version=tpu-ubuntu2204-base", *extra)


def _describe(pod, name, *extra):
  return pod.gcloud(*TPU_VM, "describe", name, ZONE, "--format=json", *extra)


def _alive(pid):
  """Whether pid is a live process (a zombie no longer runs anything)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


def test_create_describe_delete(fake_pod):  # noqa: F811
  missing = _describe(fake_pod, "pod-a")
  assert missing.returncode == 1
  assert ("NOT_FOUND: Resource 'projects/fake-project/locations/us-east5-a/nodes/pod-a' was not found"
          in missing.stderr)

  assert _create(fake_pod, "pod-a", "v5p-16", "--spot").returncode == 0
  desc = _describe(fake_pod, "pod-a")
  assert desc.returncode == 0, desc.stderr
  node = json.loads(desc.stdout)
  assert node["name"] == "projects/fake-project/locations/us-east5-a/nodes/pod-a"
  assert (node["state"], node["acceleratorType"], node["runtimeVersion"]) == ("READY", "v5p-16",
                                                                                "tpu-ubuntu2204-base")
  assert len(node["networkEndpoints"]) == 2
  assert node["schedulingConfig"] == {"spot": True}
  assert fake_pod.state("pod-a") == "READY"

  again = _create(fake_pod, "pod-a", "v5p-16")
  assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
  other_zone = fake_pod.gcloud(*TPU_VM, "describe", "pod-a", "--zone=us-central2-b", "--format=json")
  assert other_zone.returncode == 1 and "NOT_FOUND" in other_zone.stderr
  other_project = _describe(fake_pod, "pod-a", "--project=elsewhere")
  assert other_project.returncode == 1 and "NOT_FOUND" in other_project.stderr

  home = fake_pod.home("pod-a", 1)
  assert home.is_dir()
  assert fake_pod.gcloud(*TPU_VM, "delete", "pod-a", ZONE, "--quiet").returncode == 0
  assert fake_pod.state("pod-a") is None and not home.exists()
  gone = fake_pod.gcloud(*TPU_VM, "delete", "pod-a", ZONE, "--quiet")
  assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr

  calls = fake_pod.calls()
  assert [c["exit"] for c in calls] == [1, 0, 0, 1, 1, 1, 0, 1]
  assert calls[1]["argv"] == [*TPU_VM, "create", "pod-a", ZONE, "--accelerator-type=v5p-16",
                              "--version=tpu-ubuntu2204-base", "--spot"]


@pytest.mark.parametrize("accelerator_type,workers", [
    ("v4-8", 1), ("v4-32", 4), ("v5p-64", 8), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-256", 64),
    ("v3-32", 4), ("v2-8", 1)])
def test_workers_per_accelerator_type(fake_pod, accelerator_type, workers):  # noqa: F811
  assert _create(fake_pod, "pod-b", accelerator_type).returncode == 0
  assert len(json.loads(_describe(fake_pod, "pod-b").stdout)["networkEndpoints"]) == workers


@pytest.mark.parametrize("accelerator_type", ["v5p-12", "v5litepod-12", "v7-8", "tpu-8"])
def test_an_unknown_accelerator_type_is_invalid(fake_pod, accelerator_type):  # noqa: F811
  bad = _create(fake_pod, "pod-c", accelerator_type)
  assert bad.returncode == 1
  assert bad.stderr.startswith("ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT")
  assert accelerator_type in bad.stderr
  assert fake_pod.state("pod-c") is None


@pytest.mark.parametrize("argv,message", [
    ((*TPU_VM, "ssh", "pod-d", ZONE, "--worker=all", "--command=true", "--bogus=1"),
     "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) unrecognized arguments: --bogus=1"),
    ((*TPU_VM, "describe", "pod-d", ZONE, "extra"),
     "ERROR: (gcloud.compute.tpus.tpu-vm.describe) unrecognized arguments: extra"),
    ((*TPU_VM, "create", "pod-d", ZONE, "--accel=v4-8", "--version=v"),  # gcloud takes no abbreviations
     "ERROR: (gcloud.compute.tpus.tpu-vm.create) unrecognized arguments: --accel=v4-8"),
    ((*TPU_VM, "create", "pod-d", ZONE, "--accelerator-type=v4-8"),
     "ERROR: (gcloud.compute.tpus.tpu-vm.create) argument --version: Must be specified."),
    ((*TPU_VM, "start-all", "pod-d"), "ERROR: (gcloud.compute.tpus.tpu-vm) Invalid choice: 'start-all'."),
    (("compute", "tpu", "list"), "ERROR: (gcloud.compute) Invalid choice: 'tpu'."),
    ((*QUEUED, "delete", "pod-d", ZONE, "--force", "--yes"),
     "ERROR: (gcloud.compute.tpus.queued-resources.delete) unrecognized arguments: --yes"),
])
def test_unknown_arguments_exit_2(fake_pod, argv, message):  # noqa: F811
  out = fake_pod.gcloud(*argv)
  assert out.returncode == 2 and out.stderr.startswith(message), out.stderr
  assert fake_pod.calls() == [{"argv": list(argv), "exit": 2}]


def test_flags_in_any_order_and_either_form(fake_pod):  # noqa: F811
  created = fake_pod.gcloud("--quiet", *TPU_VM, "create", "--version", "v", "--zone", "us-east5-a", "pod-e",
                            "--accelerator-type", "v4-8")
  assert created.returncode == 0, created.stderr
  assert fake_pod.gcloud(*TPU_VM, "describe", "--format=json", "pod-e", ZONE).returncode == 0


def test_scp_and_ssh_on_every_worker(fake_pod, tmp_path):  # noqa: F811
  assert _create(fake_pod, "pod-f", "v5litepod-16").returncode == 0
  (tmp_path / "code.txt").write_text("shipped\n")
  for remote in ("~/code.txt", "again.txt"):
    copied = fake_pod.gcloud(*TPU_VM, "scp", str(tmp_path / "code.txt"), f"pod-f:{remote}", "--worker=all", ZONE)
    assert copied.returncode == 0, copied.stderr
  for w in range(4):
    assert (fake_pod.home("pod-f", w) / "code.txt").read_text() == "shipped\n"
    assert (fake_pod.home("pod-f", w) / "again.txt").read_text() == "shipped\n"

  show = ('echo "$JAX_PROCESS_ID $JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $JAX_PLATFORMS $PIP_NO_INDEX '
          '$(cat code.txt) $HOME $PWD"; python -c "import sys; sys.stdout.write(sys.prefix + chr(10))"')
  # each line one write: the workers share gcloud's stdout, and print() unbuffered (PYTHONUNBUFFERED) writes
  # a line's text and its newline apart, so two workers' lines could interleave
  out = fake_pod.gcloud(*TPU_VM, "ssh", "pod-f", ZONE, "--worker=all", f"--command={show}",
                        "--strict-host-key-checking=no")
  assert out.returncode == 0, out.stderr
  lines = [line.split() for line in out.stdout.splitlines() if " " in line]
  assert sorted(int(line[0]) for line in lines) == [0, 1, 2, 3]
  assert len({line[2] for line in lines}) == 1 and lines[0][2].startswith("127.0.0.1:")
  for line in lines:
    home = str(fake_pod.home("pod-f", int(line[0])))
    assert line[1:] == ["4", lines[0][2], "cpu", "1", "shipped", home, home]
  # each worker's python: the image's packages, in a prefix of the worker's own
  assert sorted(line for line in out.stdout.splitlines() if " " not in line) == [
      str(fake_pod.home("pod-f", w).parent) for w in range(4)]
  assert "Attempting to SSH into 1 nodes with a total of 4 workers." in out.stderr

  # the install step of a launcher: what the image has is there, offline; an install stays on the worker
  (tmp_path / "req.txt").write_text(f"numpy=={np.__version__}\n")
  assert fake_pod.gcloud(*TPU_VM, "scp", str(tmp_path / "req.txt"), "pod-f:req.txt", ZONE).returncode == 0
  pip = fake_pod.gcloud(*TPU_VM, "ssh", "pod-f", ZONE, "--command=pip install -r req.txt && echo $PIP_NO_INDEX")
  assert pip.returncode == 0 and "Requirement already satisfied: numpy" in pip.stdout and pip.stdout.endswith("1\n")

  one = fake_pod.gcloud(*TPU_VM, "ssh", "pod-f", ZONE, "--worker=2", "--command=exit 7")
  assert one.returncode == 7
  some_fail = fake_pod.gcloud(*TPU_VM, "ssh", "pod-f", ZONE, "--worker=all",
                              '--command=test "$JAX_PROCESS_ID" != 3')
  assert some_fail.returncode == 1
  out_of_range = fake_pod.gcloud(*TPU_VM, "ssh", "pod-f", ZONE, "--worker=4", "--command=true")
  assert out_of_range.returncode != 0 and "--worker" in out_of_range.stderr


_ALLGATHER = """
import os, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                           process_id=int(os.environ["JAX_PROCESS_ID"]), initialization_timeout=60)
gathered = multihost_utils.process_allgather(np.array([10 * jax.process_index() + 1, jax.local_device_count()]))
print("result", jax.process_index(), jax.process_count(), jax.device_count(), gathered.ravel().tolist())
"""


def test_two_workers_join_one_jax_job(fake_pod, tmp_path):  # noqa: F811
  fake_pod.env["FAKE_GCLOUD_CPU_DEVICES"] = "2"
  assert _create(fake_pod, "pod-g", "v5p-16").returncode == 0
  (tmp_path / "allgather.py").write_text(_ALLGATHER)
  assert fake_pod.gcloud(*TPU_VM, "scp", str(tmp_path / "allgather.py"), "pod-g:allgather.py", "--worker=all",
                         ZONE).returncode == 0
  workers = [fake_pod.popen(*TPU_VM, "ssh", "pod-g", ZONE, f"--worker={w}", "--command=python allgather.py")
             for w in range(2)]
  outs = [w.communicate(timeout=180) for w in workers]
  for w, (stdout, stderr) in zip(workers, outs):
    assert w.returncode == 0, stderr
  results = [next(line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("result "))
             for stdout, _ in outs]
  # process i contributes [10 i + 1, its 2 devices]; 2 processes, 4 devices in all
  assert results == ["0 2 4 [1, 2, 11, 2]", "1 2 4 [1, 2, 11, 2]"]


def test_preempt_kills_a_running_worker(fake_pod):  # noqa: F811
  assert _create(fake_pod, "pod-h", "v4-16").returncode == 0
  ssh = fake_pod.popen(*TPU_VM, "ssh", "pod-h", ZONE, "--worker=all",
                       "--command=sleep 600 & echo $! > sleep.pid; echo started; wait")
  assert [ssh.stdout.readline(), ssh.stdout.readline()] == ["started\n", "started\n"]
  pids = [int((fake_pod.home("pod-h", w) / "sleep.pid").read_text()) for w in range(2)]
  assert all(map(_alive, pids))
  assert len(list(fake_pod.root.glob("pod-h/worker-*/pgids/*"))) == 2

  fake_pod.preempt("pod-h")
  assert ssh.wait(timeout=60) == 255
  assert "closed by remote host" in ssh.stderr.read()
  assert json.loads(_describe(fake_pod, "pod-h").stdout)["state"] == "PREEMPTED"
  assert not any(map(_alive, pids))
  refused = fake_pod.gcloud(*TPU_VM, "ssh", "pod-h", ZONE, "--worker=0", "--command=true")
  assert refused.returncode == 255 and "Connection refused" in refused.stderr
  assert fake_pod.gcloud(*TPU_VM, "delete", "pod-h", ZONE, "--quiet").returncode == 0
  assert fake_pod.processes() == []


def test_a_sigterm_to_ssh_leaves_the_remote_command_running(fake_pod):  # noqa: F811
  assert _create(fake_pod, "pod-i").returncode == 0
  ssh = fake_pod.popen(*TPU_VM, "ssh", "pod-i", ZONE, "--worker=0",
                       "--command=sleep 600 & echo $! > sleep.pid; echo started; wait")
  assert ssh.stdout.readline() == "started\n"
  pid = int((fake_pod.home("pod-i") / "sleep.pid").read_text())
  ssh.send_signal(signal.SIGTERM)
  assert ssh.wait(timeout=60) == -signal.SIGTERM
  assert _alive(pid)
  assert fake_pod.calls()[-1]["exit"] == -signal.SIGTERM
  # what a launcher does next: kill it by its pid file, over ssh
  killed = fake_pod.gcloud(*TPU_VM, "ssh", "pod-i", ZONE, "--worker=0", "--command=kill -9 $(cat sleep.pid)")
  assert killed.returncode == 0
  assert fake_pod.gcloud(*TPU_VM, "delete", "pod-i", ZONE, "--quiet").returncode == 0
  assert not _alive(pid) and fake_pod.processes() == []


def test_kill_worker_is_a_worker_dying(fake_pod):  # noqa: F811
  assert _create(fake_pod, "pod-j", "v4-16").returncode == 0
  ssh = fake_pod.popen(*TPU_VM, "ssh", "pod-j", ZONE, "--worker=1", "--command=echo started; exec sleep 600")
  assert ssh.stdout.readline() == "started\n"
  fake_pod.kill_worker("pod-j", 1)
  assert ssh.wait(timeout=60) == 255  # ssh reports a command killed by a signal as 255
  assert fake_pod.state("pod-j") == "READY"


def test_queued_resource_provisions_then_is_suspended_by_a_preemption(fake_pod):  # noqa: F811
  create = fake_pod.gcloud(*QUEUED, "create", "qr-k", "--node-id=qr-k", ZONE, "--accelerator-type=v5p-16",
                           "--runtime-version=v2-alpha-tpuv5", "--spot")
  assert create.returncode == 0, create.stderr
  dup = fake_pod.gcloud(*QUEUED, "create", "qr-k", "--node-id=qr-k", ZONE, "--accelerator-type=v5p-16",
                        "--runtime-version=v2-alpha-tpuv5")
  assert dup.returncode == 1 and "ALREADY_EXISTS" in dup.stderr
  order = ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
  seen = []
  for _ in range(400):  # polls as a launcher does; each call is a process start, so this is bounded
    node = _describe(fake_pod, "qr-k")
    qr = fake_pod.gcloud(*QUEUED, "describe", "qr-k", ZONE, "--format=json")
    assert qr.returncode == 0, qr.stderr
    state = json.loads(qr.stdout)["state"]["state"]
    if state == "WAITING_FOR_RESOURCES":  # still waiting now, so no node a moment before
      assert node.returncode == 1 and "NOT_FOUND" in node.stderr
    seen.append(state)
    if state == "ACTIVE":
      break
  assert seen[-1] == "ACTIVE" and seen == sorted(seen, key=order.index)
  node = json.loads(_describe(fake_pod, "qr-k").stdout)
  assert node["state"] == "READY" and len(node["networkEndpoints"]) == 2
  assert node["queuedResource"].endswith("/queuedResources/qr-k")

  fake_pod.preempt("qr-k")
  assert (fake_pod.state("qr-k"), fake_pod.queued_state("qr-k")) == ("PREEMPTED", "SUSPENDED")
  deleted = fake_pod.gcloud(*QUEUED, "delete", "qr-k", ZONE, "--force", "--quiet")
  assert deleted.returncode == 0, deleted.stderr
  assert (fake_pod.state("qr-k"), fake_pod.queued_state("qr-k")) == (None, None)
  gone = fake_pod.gcloud(*QUEUED, "describe", "qr-k", ZONE, "--format=json")
  assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_no_process_outlives_kill_all(tmp_path):
  from fake_pod import FakePod
  pod = FakePod(tmp_path)
  assert pod.gcloud(*TPU_VM, "create", "pod-l", ZONE, "--accelerator-type=v4-8", "--version=v").returncode == 0
  # a command that leaves its own session, and the ssh that runs it, both still running
  ssh = pod.popen(*TPU_VM, "ssh", "pod-l", ZONE, "--command=setsid sleep 600 & echo started; sleep 600")
  assert ssh.stdout.readline() == "started\n"
  for _ in range(600):  # the ssh, its shell and the setsid sleep; the shell may not have started its own sleep yet
    if len(pod.processes()) >= 3:
      break
    time.sleep(0.1)
  assert len(pod.processes()) >= 3
  pod.kill_all()
  assert pod.processes() == []
  assert ssh.wait(timeout=60) == -signal.SIGKILL
