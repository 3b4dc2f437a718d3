"""The gcloud commands the launcher runs, and the runner that runs them.

One argv form per command (`gcloud compute tpus ...`, flags as `--flag=value`), as MaxText's
`multihost_runner.py` and Levanter's `infra/launch.py`, `spin-up-vm.sh` and `babysit-tpu-vm.sh` call them
(tests/test_launch.py holds their templates and checks ours against them):

  tpu-vm describe NAME --zone=Z [--project=P] --format=json
  tpu-vm create NAME --zone=Z [--project=P] --accelerator-type=T --version=V [--spot]     (waits for READY)
  tpu-vm delete NAME --zone=Z [--project=P] --quiet
  queued-resources create NAME --node-id=NAME --zone=Z [--project=P] --accelerator-type=T --runtime-version=V [--spot]
  queued-resources describe NAME --zone=Z [--project=P] --format=json
  queued-resources delete NAME --zone=Z [--project=P] --force --quiet                      (deletes the node too)
  tpu-vm scp LOCAL NAME:REMOTE --worker=all --zone=Z [--project=P]
  tpu-vm ssh NAME --zone=Z [--project=P] --worker=W --command=CMD --strict-host-key-checking=no

`Runner` runs them: `run` waits for a command and returns its exit status and output, `start` returns a
running process whose output is read line by line (a worker's ssh). Tests give the launcher a Runner of
their own that answers from a script, or run the real one against a fake `gcloud` first on PATH.
"""

import dataclasses
import json
import os
import signal
import subprocess

READY = "READY"
# Node states after which the slice never becomes READY again by itself: it is deleted and made anew.
DEAD_NODE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")
# Queued-resource states that end the request: it is deleted (with its node) and made anew.
DEAD_QUEUED_STATES = ("SUSPENDED", "FAILED")
ACTIVE = "ACTIVE"


class GcloudError(RuntimeError):
  """A gcloud command that failed: the command's subject and gcloud's first line of error. `describe` is
  True for a describe that failed otherwise than NOT_FOUND (no project, no credentials, a bad zone, ...)."""

  def __init__(self, message: str, describe: bool = False):
    super().__init__(message)
    self.describe = describe


@dataclasses.dataclass(frozen=True)
class Result:
  """A finished command: exit status, stdout and stderr (text)."""
  returncode: int
  stdout: str = ""
  stderr: str = ""


class Runner:
  """Runs gcloud (and any other) commands as subprocesses."""

  def run(self, argv: list[str]) -> Result:
    """Runs argv to its end; its output comes back in the Result."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          check=False)
    return Result(done.returncode, done.stdout, done.stderr)

  def start(self, argv: list[str]):
    """Starts argv with stdout and stderr in one text pipe (`.stdout`, read by line); the object has
    `poll()`, `wait()` and `kill()` (which ends the command's whole process group: gcloud and its ssh)."""
    return _Process(argv)


class _Process(subprocess.Popen):

  def __init__(self, argv):
    super().__init__(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     errors="replace", bufsize=1, start_new_session=True)

  def kill(self):
    if self.poll() is None:
      try:
        os.killpg(self.pid, signal.SIGKILL)  # its own session: gcloud and the ssh it started, nothing else
      except ProcessLookupError:
        pass


@dataclasses.dataclass(frozen=True)
class Node:
  """A TPU VM slice as `tpu-vm describe` gives it: state, accelerator type and workers (networkEndpoints)."""
  state: str
  accelerator_type: str
  workers: int


@dataclasses.dataclass(frozen=True)
class Slice:
  """The argv of every command on one slice (`name` in `zone`, `project` or gcloud's default project)."""
  name: str
  zone: str
  project: str | None = None

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def describe(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self._where(), "--format=json"]

  def create(self, accelerator_type: str, version: str, spot: bool) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where(),
            f"--accelerator-type={accelerator_type}", f"--version={version}", *(["--spot"] if spot else [])]

  def delete(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._where(), "--quiet"]

  def queued_create(self, accelerator_type: str, version: str, spot: bool) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, f"--node-id={self.name}",
            *self._where(), f"--accelerator-type={accelerator_type}", f"--runtime-version={version}",
            *(["--spot"] if spot else [])]

  def queued_describe(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where(), "--format=json"]

  def queued_delete(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._where(), "--force",
            "--quiet"]

  def scp(self, local_file: str, remote_path: str) -> list[str]:
    """Copies local_file to remote_path (relative to the home directory) on every worker."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_file, f"{self.name}:{remote_path}", "--worker=all",
            *self._where()]

  def ssh(self, worker: int | str, command: str) -> list[str]:
    """Runs the bash `command` on one worker (an index) or on all of them at once (`"all"`)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(), f"--worker={worker}",
            f"--command={command}", "--strict-host-key-checking=no"]


def _not_found(result: Result) -> bool:
  return result.returncode != 0 and "NOT_FOUND" in result.stderr


def error_line(text: str, max_chars: int = 400) -> str:
  """gcloud's `ERROR: ...` message in its output as one line (with the lines that go on from it, where
  gcloud often puts the cause: "Error parsing [tpu]." then "Failed to find attribute [project]..."), else
  the output's last non-empty line; at most max_chars."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  start = next((i for i, line in enumerate(lines) if line.startswith("ERROR:")), None)
  if start is None:
    return lines[-1][:max_chars] if lines else "no output"
  message = [lines[start]]
  for line in lines[start + 1:]:
    if line.startswith(("ERROR:", "WARNING:")):
      break
    message.append(line)
  return " ".join(message)[:max_chars]


def _failure(what: str, result: Result) -> GcloudError:
  return GcloudError(f"{what}: {error_line(result.stderr + result.stdout)} (exit status {result.returncode})")


def _described(runner: Runner, argv: list[str], what: str) -> dict | None:
  """The JSON a describe prints, or None when gcloud says NOT_FOUND; GcloudError (describe=True) when it fails
  otherwise, GcloudError when it prints no JSON object."""
  result = runner.run(argv)
  if _not_found(result):
    return None
  if result.returncode != 0:
    raise GcloudError(str(_failure(what, result)), describe=True)
  try:
    info = json.loads(result.stdout)
  except json.JSONDecodeError:
    info = None
  if not isinstance(info, dict):
    raise GcloudError(f"{what}: not a JSON object: {result.stdout[:200]!r}")
  return info


def describe_node(runner: Runner, where: Slice) -> Node | None:
  """The slice's Node, or None when it does not exist; GcloudError when gcloud fails otherwise."""
  info = _described(runner, where.describe(), f"describe {where.name}")
  if info is None:
    return None
  return Node(info.get("state", "UNKNOWN"), info.get("acceleratorType", ""), len(info.get("networkEndpoints") or []))


def describe_queued(runner: Runner, where: Slice) -> str | None:
  """The queued resource's state (`ACTIVE`, `WAITING_FOR_RESOURCES`, ...), or None when it does not exist."""
  what = f"describe queued resource {where.name}"
  info = _described(runner, where.queued_describe(), what)
  if info is None:
    return None
  try:
    return info["state"]["state"]
  except (KeyError, TypeError):
    raise GcloudError(f"{what}: no state in {json.dumps(info)[:200]!r}") from None


def check(runner: Runner, argv: list[str], what: str) -> Result:
  """Runs argv; GcloudError naming `what` and gcloud's first error line when it fails."""
  result = runner.run(argv)
  if result.returncode != 0:
    raise _failure(what, result)
  return result
