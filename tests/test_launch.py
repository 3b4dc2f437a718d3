"""The TPU launcher (llama_jax/launch): the accelerator table, the gcloud commands against the syntax of MaxText's
and Levanter's launchers, --dry_run, bad input in one line, the supervisor's loop against a scripted gcloud,
and the shell lines the workers run (install once per VM, kill by pid) run here in bash."""

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from llama_jax.errors import ConfigError
from llama_jax.launch import accelerators, command as command_lib, gcloud, ship, supervisor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["python", "train.py", "--config", "configs/tiny.py", "--workdir", "gs://bucket/run"]

# ------------------------------------------------------------------------------------------ the anchors' syntax

# The gcloud commands as the anchors write them, transcribed (placeholders in capitals; MaxText and Levanter put
# `alpha` after `gcloud` at places, which the comparison drops):
# - MaxText tools/orchestration/multihost_runner.py (get_slices, scps, execute_main_command);
# - Levanter src/levanter/infra/tpus.py (describe_tpu_vm, describe_tpu_queued_resource,
#   start_tpu_vm_queued_resources, tpu_ssh), infra/spin-up-vm.sh and infra/babysit-tpu-vm.sh;
# - gcloud's reference synopsis of `compute tpus tpu-vm create` (for --spot, which neither anchor passes there).
ANCHORS = {
    ("tpu-vm", "describe"): [
        "gcloud compute tpus tpu-vm describe NAME --flatten=networkEndpoints[] "
        "--format=csv[no-heading](networkEndpoints.ipAddress) --project=PROJECT --zone=ZONE",  # MaxText
        "gcloud alpha compute tpus tpu-vm describe NAME --zone=ZONE --format=json(name.basename(),state) --quiet",
        "gcloud compute tpus tpu-vm describe --zone ZONE NAME",  # babysit-tpu-vm.sh
    ],
    ("tpu-vm", "create"): [
        "gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=VM_IMAGE "
        "--preemptible",  # spin-up-vm.sh
        "gcloud compute tpus tpu-vm create NAME --zone=ZONE --version=VERSION --accelerator-type=TYPE --spot",
    ],
    ("tpu-vm", "delete"): [
        "gcloud compute tpus tpu-vm delete --zone ZONE NAME",  # babysit-tpu-vm.sh (answers `yes`)
    ],
    ("queued-resources", "create"): [
        "gcloud alpha compute tpus queued-resources create NAME --accelerator-type=TYPE --zone=ZONE --quiet "
        "--runtime-version=VERSION --spot --node-id=NAME",  # Levanter tpus.py
    ],
    ("queued-resources", "describe"): [
        "gcloud alpha compute tpus queued-resources describe NAME --zone=ZONE "
        "--format=json(name.basename(),state) --quiet",
    ],
    ("queued-resources", "delete"): [
        "gcloud alpha compute tpus queued-resources delete NAME --quiet --zone=ZONE --force",
    ],
    ("tpu-vm", "scp"): [
        "gcloud compute tpus tpu-vm scp --worker=N LOCAL NAME:~/ --strict-host-key-checking=no "
        "--project=PROJECT --zone=ZONE",  # MaxText
        "gcloud compute tpus tpu-vm scp --zone=ZONE SETUP_SCRIPT NAME:~/ --worker=all",  # spin-up-vm.sh
    ],
    ("tpu-vm", "ssh"): [
        "gcloud alpha compute tpus tpu-vm ssh NAME --worker=N --command CMD --strict-host-key-checking=no "
        "--project=PROJECT --zone=ZONE",  # MaxText
        "gcloud alpha compute tpus tpu-vm ssh NAME --quiet --worker=all --zone=ZONE --command=CMD",  # Levanter
        "gcloud compute tpus tpu-vm ssh --zone=ZONE NAME --command=CMD --worker=all",  # babysit-tpu-vm.sh
    ],
}
_SPACE_VALUED = {"--zone", "--command"}  # flags the anchors also write as `--flag VALUE`
# gcloud-wide flags (gcloud topic flags): valid on every command.
_GCLOUD_WIDE = {"--project", "--quiet", "--format", "--flatten"}


def _parse(argv):
  """(subcommand path after `gcloud [alpha] compute tpus`, positionals, {flag: value or True})."""
  assert argv[0] == "gcloud"
  words = [w for w in argv[1:] if w != "alpha"]
  assert words[:2] == ["compute", "tpus"], argv
  path, rest = tuple(words[2:4]), words[4:]
  positionals, flag_values = [], {}
  it = iter(rest)
  for word in it:
    if word.startswith("--"):
      name, eq, value = word.partition("=")
      flag_values[name] = value if eq else (next(it) if name in _SPACE_VALUED else True)
    else:
      positionals.append(word)
  return path, positionals, flag_values


def _check_against_anchors(argv):
  path, positionals, flag_values = _parse(argv)
  anchors = [_parse(shlex.split(a)) for a in ANCHORS[path]]
  anchor_flags = set().union(*(set(f) for _, _, f in anchors))
  assert set(flag_values) - _GCLOUD_WIDE <= anchor_flags, (argv, anchor_flags)
  assert {len(p) for _, p, _ in anchors} == {len(positionals)}, argv
  if path == ("tpu-vm", "scp"):
    assert ":" in positionals[1] and ":" not in positionals[0]
  # the contract: every valued flag written as --flag=value, and --worker is "all" or an index
  assert all("=" in w for w in argv if w.startswith("--") and flag_values[w.split("=")[0]] is not True), argv
  if "--worker" in flag_values:
    assert flag_values["--worker"] == "all" or flag_values["--worker"].isdigit()
  return path, positionals, flag_values


def test_every_gcloud_command_has_the_anchors_syntax():
  where = gcloud.Slice("my-tpu", "us-central2-b", "proj")
  commands = [where.describe(), where.create("v5p-64", "v2-alpha-tpuv5", True), where.delete(),
              where.queued_create("v5p-64", "v2-alpha-tpuv5", True), where.queued_describe(), where.queued_delete(),
              where.scp("/tmp/a.tar.gz", "~/a.tar.gz"), where.ssh("all", "true"), where.ssh(3, "true")]
  paths_seen = {_check_against_anchors(argv)[0] for argv in commands}
  assert paths_seen == set(ANCHORS)
  _, positionals, flag_values = _check_against_anchors(where.create("v5p-64", "v2-alpha-tpuv5", True))
  assert positionals == ["my-tpu"] and flag_values["--zone"] == "us-central2-b"
  assert flag_values["--accelerator-type"] == "v5p-64" and flag_values["--spot"] is True
  assert "--spot" not in where.create("v5p-64", "v", False)


def test_the_anchor_check_catches_a_wrong_command():
  with pytest.raises(AssertionError):
    _check_against_anchors(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n", "--zone=z", "--workers=all"])
  with pytest.raises(AssertionError):
    _check_against_anchors(["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=z", "--type=v5p-8"])
  with pytest.raises(AssertionError):
    _check_against_anchors(["gcloud", "compute", "tpus", "tpu-vm", "scp", "n:x", "f", "--zone=z"])


# ------------------------------------------------------------------------------------------ the accelerator table


@pytest.mark.parametrize("name,chips,hosts,runtime", [
    # Cloud TPU docs: v4/v5p-N counts TensorCores (2 per chip, 4 chips per host); v5e/v6e-N counts chips
    # (8 on one host up to 8, else 4 per host); runtime versions from the TPU software versions page.
    ("v5p-64", 32, 8, "v2-alpha-tpuv5"), ("v5p-8", 4, 1, "v2-alpha-tpuv5"), ("v5p-1024", 512, 128, "v2-alpha-tpuv5"),
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"), ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v3-8", 4, 1, "tpu-ubuntu2204-base"), ("v2-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-1", 1, 1, "v2-alpha-tpuv5-lite"), ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"), ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v6e-8", 8, 1, "v2-alpha-tpuv6e"), ("v6e-4", 4, 1, "v2-alpha-tpuv6e"), ("v6e-64", 64, 16, "v2-alpha-tpuv6e"),
])
def test_accelerator_table(name, chips, hosts, runtime):
  a = accelerators.parse(name)
  assert (a.chips, a.hosts, a.runtime_version) == (chips, hosts, runtime)


@pytest.mark.parametrize("name", ["v5p-12", "v5p-0", "v7-8", "v5e-8", "v5litepod-2", "v6e-512", "tpu", "", "v4-8x",
                                  "v4-08"])
def test_unknown_accelerator_type_is_one_line_with_the_accepted_forms(name):
  with pytest.raises(ConfigError) as e:
    accelerators.parse(name)
  line = str(e.value)
  assert "\n" not in line and f"--accelerator_type={name}:" in line
  for form in ("v2-N", "v3-N", "v4-N", "v5p-N", "v5litepod-N", "v6e-N"):
    assert form in line


# ------------------------------------------------------------------------------------------ the command


def _entry_modules():
  """The llama_jax modules that start through entry.main (and so parse --distributed), read from the source."""
  folder = os.path.join(REPO, "llama_jax")
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py")
                and "entry.main(" in open(os.path.join(folder, f)).read())


def test_the_entry_modules_are_those_that_parse_distributed():
  assert tuple(_entry_modules()) == command_lib.ENTRY_MODULES


@pytest.mark.parametrize("argv", [["bash", "run.sh"], ["python", "foo.py", "--workdir", "gs://b/r"],
                                  ["python", "-m", "llama_jax.trainer"], ["python", "-m", "other.bench"],
                                  ["python"], [], ["torchrun", "train.py"]])
def test_a_command_that_is_not_an_entry_point_is_one_line(argv):
  with pytest.raises(ConfigError) as e:
    command_lib.parse(argv)
  assert "\n" not in str(e.value) and "llama_jax entry point" in str(e.value)
  for name in ("train.py", "eval.py", "llama_jax.{aot,bench,convert,data,generate,plan,plot,tokenizer}"):
    assert name in str(e.value)


def test_train_without_workdir_is_one_line():
  with pytest.raises(ConfigError, match="train.py needs --workdir"):
    command_lib.parse(["python3", "train.py", "--config", "configs/tiny.py"])


def test_the_command_each_worker_runs():
  c = command_lib.parse([".venv/bin/python3.11", "./train.py", "--config=configs/tiny.py", "-workdir", "gs://b/r"])
  assert c.workdir == "gs://b/r" and c.args[-1] == "--distributed"
  line = c.remote("/opt/py/bin/python")
  assert line.startswith("cd ~/llama_jax && echo $$ > ~/llama_jax.pid && ")
  assert shlex.split(line.split(" exec ", 1)[1]) == ["/opt/py/bin/python", "./train.py", "--config=configs/tiny.py",
                                                     "-workdir", "gs://b/r", "--distributed"]
  assert command_lib.parse(["python", "eval.py", "--workdir=x", "--distributed"]).args.count("--distributed") == 1
  assert command_lib.parse(["python", "-m", "llama_jax.bench", "--config", "c.py"]).args[:2] == ("-m", "llama_jax.bench")


# ------------------------------------------------------------------------------------------ --dry_run and the CLI


def _path_with_git_only(tmp_path):
  """A PATH that has git and no gcloud."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "git").symlink_to(shutil.which("git"))
  return str(bin_dir)


def test_dry_run_for_v5p_64_prints_create_copy_install_and_8_runs(tmp_path):
  env = dict(os.environ, PATH=_path_with_git_only(tmp_path))
  done = subprocess.run([sys.executable, "-m", "llama_jax.launch", "--tpu=big", "--zone=us-east5-a",
                         "--accelerator_type=v5p-64", "--project=p1", "--spot", "--dry_run", "--", *TRAIN],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  commands = [shlex.split(line) for line in done.stdout.splitlines() if line and not line.startswith("#")]
  gcloud_commands = [c for c in commands if c[0] == "gcloud"]
  for argv in gcloud_commands:
    _check_against_anchors(argv)
    assert "--zone=us-east5-a" in argv and "--project=p1" in argv
  kinds = [_parse(c)[0] + ((_parse(c)[2].get("--worker"),) if _parse(c)[0][1] == "ssh" else ()) for c in
           gcloud_commands]
  assert kinds[:4] == [("tpu-vm", "describe"), ("tpu-vm", "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh", "all")]
  assert kinds[4:12] == [("tpu-vm", "ssh", str(i)) for i in range(8)]
  create = _parse(gcloud_commands[1])[2]
  assert create["--accelerator-type"] == "v5p-64" and create["--version"] == "v2-alpha-tpuv5" and create["--spot"]
  assert ["git", "archive", "--format=tar.gz"] == commands[2][:3] and commands[2][-1] == "HEAD"
  install = _parse(gcloud_commands[3])[2]["--command"]
  assert "python3 -m pip install -r requirements.txt -r requirements-tpu.txt" in install
  for name in ship.REQUIREMENTS:
    assert os.path.isfile(os.path.join(REPO, name))
  for i in range(8):
    run = _parse(gcloud_commands[4 + i])[2]["--command"]
    assert run.endswith("exec " + shlex.join(["python3", *TRAIN[1:], "--distributed"]))
  assert "warning" not in done.stdout  # a gs:// workdir


@pytest.mark.parametrize("args,start", [
    (["--accelerator_type=v9-8", "--", *TRAIN], "error: --accelerator_type=v9-8: unknown accelerator type"),
    (["--accelerator_type=v4-8", *TRAIN], "error: Unknown command line flag 'config' (the command to run goes after --)"),
    (["--accelerator_type=v4-8", "--", "python", "-m", "llama_jax.trainer"], "error: the command after -- must be"),
    (["--accelerator_type=v4-8", "--", *TRAIN, "--dry_run"], "error: --dry_run comes after --, so it would go to the "
                                                              "command"),
    (["--accelerator_type=v4-8", "--tpu=My_tpu", "--", *TRAIN], "error: --tpu=My_tpu: a TPU name is"),
    (["--accelerator_type=v4-8", "--poll_s=0", "--", *TRAIN], "error: --poll_s=0.0 must be > 0"),
])
def test_bad_input_on_the_command_line_is_one_line_on_stderr(tmp_path, args, start):
  env = dict(os.environ, PATH=_path_with_git_only(tmp_path))
  done = subprocess.run([sys.executable, "-m", "llama_jax.launch", "--tpu=t", "--zone=z", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 1 and done.stdout == ""
  assert done.stderr.count("\n") == 1 and done.stderr.startswith(start), done.stderr


def _options(**kw):
  return supervisor.Options(**{"tpu": "t1", "zone": "z1", "accelerator_type": "v5p-16", **kw})


def test_no_gcloud_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", _path_with_git_only(tmp_path))
  with pytest.raises(ConfigError, match="^gcloud is not on PATH") as e:
    supervisor.launch(_options(), TRAIN, out=io.StringIO())
  assert "\n" not in str(e.value)
  supervisor.launch(_options(dry_run=True), TRAIN, out=io.StringIO())  # --dry_run needs none


@pytest.mark.parametrize("accelerator_type,workdir,warned", [
    ("v5p-16", "runs/x", True), ("v5litepod-16", "/mnt/x", True), ("v5p-8", "runs/x", False),
    ("v5p-16", "gs://b/x", False)])
def test_a_local_workdir_on_a_multi_worker_slice_is_a_warning(accelerator_type, workdir, warned):
  out = io.StringIO()
  argv = ["python", "train.py", "--workdir", workdir]
  assert supervisor.launch(_options(accelerator_type=accelerator_type, dry_run=True, repo_dir=REPO), argv, out=out) == 0
  warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
  assert len(warnings) == int(warned)
  if warned:
    assert f"--workdir={workdir} is not gs://" in warnings[0] and "share no disk" in warnings[0]


# ------------------------------------------------------------------------------------------ the supervisor's loop


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
  """A git checkout with the two requirement files committed and one other file."""
  repo = tmp_path_factory.mktemp("repo")
  (repo / "requirements.txt").write_text("numpy\n")
  (repo / "requirements-tpu.txt").write_text("libtpu\n")
  (repo / "train.py").write_text("print('hi')\n")
  (repo / ".gitignore").write_text("ignored/\n")
  git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
  subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
  subprocess.run([*git, "add", "."], cwd=repo, check=True)
  subprocess.run([*git, "commit", "-qm", "c"], cwd=repo, check=True)
  return str(repo)


class FakeProc:
  """A worker's ssh: its output lines, then exit `code` after `polls` polls (never, with code None)."""

  def __init__(self, lines, code, polls=1, on_exit=None):
    self.stdout = iter(lines)
    self.code, self.polls_left, self.on_exit, self.returncode, self.killed = code, polls, on_exit, None, False

  def poll(self):
    if self.returncode is None and self.code is not None:
      self.polls_left -= 1
      if self.polls_left <= 0:
        self.returncode = self.code
        if self.on_exit:
          self.on_exit()
    return self.returncode

  def wait(self):
    return self.returncode

  def kill(self):
    if self.returncode is None:
      self.killed, self.returncode = True, -9


class ScriptedGcloud(gcloud.Runner):
  """Answers the launcher's gcloud commands from a script: the slice's state, and per attempt what each worker
  prints and how it ends (`workers(attempt, worker, runner) -> FakeProc`)."""

  def __init__(self, workers, state=None, describe_hook=None, queued_state=None):
    self.workers, self.state, self.describe_hook, self.queued_state = workers, state, describe_hook, queued_state
    self.calls, self.procs, self.attempt = [], [], -1

  def run(self, argv):
    self.calls.append(argv)
    assert len(self.calls) < 500, f"the launcher goes round in circles: {self.kinds()[-6:]}"  # a hang guard
    path, positionals, flag_values = _parse(argv)
    if path == ("tpu-vm", "describe"):
      if self.describe_hook:
        self.describe_hook(self)
      if self.state is None:
        return gcloud.Result(1, "", f"ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
                                    f"'projects/p/locations/z1/nodes/{positionals[0]}' was not found")
      return gcloud.Result(0, json.dumps({"name": f"projects/p/locations/z1/nodes/{positionals[0]}",
                                          "state": self.state, "acceleratorType": "v5p-16",
                                          "networkEndpoints": [{"ipAddress": "10.0.0.2"}, {"ipAddress": "10.0.0.3"}]}))
    if path == ("queued-resources", "describe"):
      if self.queued_state is None:
        return gcloud.Result(1, "", "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: nope")
      return gcloud.Result(0, json.dumps({"state": {"state": self.queued_state}}))
    if path == ("tpu-vm", "create"):
      self.state = "READY"
    elif path == ("tpu-vm", "delete"):
      self.state = None
    elif path == ("queued-resources", "create"):
      self.queued_state, self.state = "ACTIVE", "READY"
    elif path == ("queued-resources", "delete"):
      self.queued_state, self.state = None, None
    elif path == ("tpu-vm", "ssh") and "llama_jax.tar.gz -C" in flag_values["--command"]:
      self.attempt += 1  # the setup before each attempt's run
    return gcloud.Result(0)

  def start(self, argv):
    self.calls.append(argv)
    proc = self.workers(self.attempt, int(_parse(argv)[2]["--worker"]), self)
    self.procs.append(proc)
    return proc

  def kinds(self):
    """Each call as 'describe', 'create', 'ssh 0', 'ssh all setup', 'ssh all kill', ..."""
    out = []
    for argv in self.calls:
      path, _, flag_values = _parse(argv)
      kind = path[1] if path[0] == "tpu-vm" else "queued " + path[1]
      if kind == "ssh":
        kind += " " + flag_values["--worker"]
        if flag_values["--worker"] == "all":
          kind += " setup" if "tar -xzf" in flag_values["--command"] else " kill"
      out.append(kind)
    return out


def _launch(small_repo, runner, tmp_path, **kw):
  out = io.StringIO()
  workdir = str(tmp_path / "run")
  code = supervisor.launch(_options(poll_s=0, repo_dir=small_repo, **kw),
                           ["python", "train.py", "--workdir", workdir], runner=runner, out=out)
  return code, out.getvalue().splitlines(), workdir


def test_all_workers_exit_0_is_done(small_repo, tmp_path):
  runner = ScriptedGcloud(lambda k, i, r: FakeProc([f"step 1 on {i}\n", f"done {i}\n"], 0))
  code, lines, workdir = _launch(small_repo, runner, tmp_path)
  assert code == 0 and lines[-1] == "[launch] done after 0 restarts"
  assert runner.kinds() == ["describe", "create", "describe", "scp", "ssh all setup", "ssh 0", "ssh 1"]
  assert "[worker 0] step 1 on 0" in lines and not any("on 1" in line for line in lines)
  for i in range(2):
    log = os.path.join(workdir, "launch", "attempt-0", f"worker-{i}.log")
    assert open(log).read() == f"step 1 on {i}\ndone {i}\n"


def test_a_preempted_slice_is_deleted_created_and_the_command_relaunched(small_repo, tmp_path):
  def workers(k, i, runner):
    if k == 0 and i == 0:  # the slice is preempted under the first attempt: its ssh loses the connection
      return FakeProc(["step 1\n", "Connection to 10.0.0.2 closed by remote host.\n"], 255,
                      on_exit=lambda: setattr(runner, "state", "PREEMPTED"))
    if k == 0:
      return FakeProc(["step 1\n"], None)  # runs until killed
    return FakeProc(["resumed at step 1\n", "done\n"], 0)

  runner = ScriptedGcloud(workers)
  code, lines, workdir = _launch(small_repo, runner, tmp_path)
  assert code == 0 and lines[-1] == "[launch] done after 1 restart"
  assert runner.kinds() == ["describe", "create", "describe", "scp", "ssh all setup", "ssh 0", "ssh 1",
                            "describe",  # the failed attempt: is the slice READY?
                            "describe", "delete", "describe", "create", "describe", "scp", "ssh all setup",
                            "ssh 0", "ssh 1"]
  assert runner.procs[1].killed  # worker 1 of the first attempt, still running, was killed
  assert any("relaunch 1 of at most 10: slice PREEMPTED; worker 0's ssh ended with status 255 (connection lost)"
             in line
             for line in lines)
  assert open(os.path.join(workdir, "launch", "attempt-1", "worker-0.log")).read() == "resumed at step 1\ndone\n"
  assert "[worker 0] resumed at step 1" in lines


def test_a_slice_that_leaves_ready_while_the_workers_run_ends_the_attempt(small_repo, tmp_path):
  def describe_hook(runner):  # the third describe (the first one while the workers run) finds it PREEMPTED
    if runner.kinds().count("describe") == 3 and runner.attempt == 0:
      runner.state = "PREEMPTED"

  runner = ScriptedGcloud(lambda k, i, r: FakeProc(["x\n"], None if k == 0 else 0), describe_hook=describe_hook)
  code, lines, _ = _launch(small_repo, runner, tmp_path)
  assert code == 0 and lines[-1] == "[launch] done after 1 restart"
  assert all(p.killed for p in runner.procs[:2]) and not any(p.killed for p in runner.procs[2:])
  assert any(line.endswith("relaunch 1 of at most 10: slice PREEMPTED") for line in lines)
  # the watch's describe (PREEMPTED), then the next attempt's: PREEMPTED, so delete and create
  assert runner.kinds()[7:12] == ["describe", "describe", "delete", "describe", "create"]


def test_a_worker_that_dies_on_a_ready_slice_is_relaunched_after_its_leftovers_are_killed(small_repo, tmp_path):
  runner = ScriptedGcloud(lambda k, i, r: FakeProc(["Traceback\n", "RuntimeError: boom\n"], 1) if (k, i) == (0, 1)
                          else FakeProc(["ok\n"], None if k == 0 else 0))
  code, lines, _ = _launch(small_repo, runner, tmp_path)
  assert code == 0 and lines[-1] == "[launch] done after 1 restart"
  assert runner.kinds()[7:10] == ["describe", "ssh all kill", "describe"]  # the slice is READY: no delete
  assert "delete" not in runner.kinds() and runner.kinds().count("create") == 1


def test_bad_input_in_a_worker_stops_without_relaunch(small_repo, tmp_path):
  error = "error: data.shards=4 is not a multiple of the 3 processes: resume on 1, 2 or 4"
  runner = ScriptedGcloud(lambda k, i, r: FakeProc(
      ["loading\n", error + "\n", "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with return code "
       "[1].\n"], 1))
  code, lines, _ = _launch(small_repo, runner, tmp_path)
  assert code == 1 and lines[-1] == f"[launch] bad input: worker 0: {error}"
  assert runner.kinds().count("ssh 0") == 1 and runner.kinds()[-1] == "ssh all kill"


def test_an_old_python_on_the_workers_stops_without_relaunch(small_repo, tmp_path):
  error = ("error: --python python3 on worker t1-w-0 is Python 3.10.12; llama_jax needs Python 3.11 or newer "
           "with pip there: pass --python a path to one")

  class OldPython(ScriptedGcloud):
    def run(self, argv):
      result = super().run(argv)
      if self.kinds()[-1] == "ssh all setup":
        return gcloud.Result(1, error + "\n", "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with "
                                              "return code [1].\n")
      return result

  runner = OldPython(lambda k, i, r: FakeProc(["ok\n"], 0))
  code, lines, _ = _launch(small_repo, runner, tmp_path)
  assert code == 1 and lines[-1] == f"[launch] bad input: {error}"
  assert runner.kinds() == ["describe", "create", "describe", "scp", "ssh all setup"]  # nothing ran, once


@pytest.mark.parametrize("version_check_exit, expected", [(0, None), (1, "is Python 3.10.12")])
def test_the_python_check_in_bash(tmp_path, version_check_exit, expected):
  python = tmp_path / "py"
  python.write_text(f'#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.10.12" && exit 0\nexit {version_check_exit}\n')
  python.chmod(0o755)
  done = subprocess.run(["bash", "-c", ship.python_check(str(python)) + " && echo fine"], capture_output=True,
                        text=True)
  if expected is None:
    assert done.returncode == 0 and done.stdout == "fine\n"
  else:
    assert done.returncode == 1 and done.stdout.startswith(f"error: --python {python} on worker ")
    assert expected in done.stdout and "llama_jax needs Python 3.11 or newer" in done.stdout
  real = subprocess.run(["bash", "-c", ship.python_check(sys.executable)], capture_output=True, text=True)
  assert real.returncode == 0, real.stdout  # this interpreter is new enough


def test_a_describe_that_fails_before_the_slice_was_ever_ready_stops_with_gclouds_cause(small_repo, tmp_path):
  class NoProject(ScriptedGcloud):
    def run(self, argv):
      if _parse(argv)[0] == ("tpu-vm", "describe"):
        self.calls.append(argv)
        return gcloud.Result(1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) Error parsing [tpu].\n"
                                    "  The [tpu] resource is not properly specified.\n"
                                    "  Failed to find attribute [project]. Provide --project.\n")
      return super().run(argv)

  runner = NoProject(lambda k, i, r: FakeProc(["ok\n"], 0))
  code, lines, _ = _launch(small_repo, runner, tmp_path)
  assert code == 1 and runner.kinds() == ["describe"]  # no relaunch, nothing created
  assert lines[-1] == ("[launch] bad input: gcloud cannot describe the slice: describe t1: ERROR: "
                       "(gcloud.compute.tpus.tpu-vm.describe) Error parsing [tpu]. The [tpu] resource is not properly "
                       "specified. Failed to find attribute [project]. Provide --project. (exit status 1)")


def test_max_restarts_gives_up_with_the_last_reason(small_repo, tmp_path):
  runner = ScriptedGcloud(lambda k, i, r: FakeProc([f"attempt {k}\n", "RuntimeError: boom\n"], 1 if i == 0 else None))
  code, lines, workdir = _launch(small_repo, runner, tmp_path, max_restarts=2)
  assert code == 1
  assert lines[-1] == "[launch] gave up after 2 restarts: worker 0 exited with status 1 (RuntimeError: boom)"
  assert runner.kinds().count("ssh 0") == 3
  assert sorted(os.listdir(os.path.join(workdir, "launch"))) == ["attempt-0", "attempt-1", "attempt-2"]


def test_a_failed_describe_while_the_workers_run_does_not_end_the_attempt(small_repo, tmp_path):
  real_run = ScriptedGcloud.run

  def run(self, argv):
    if self.kinds()[-1:] == ["ssh 1"] or self.kinds()[-2:] == ["ssh 1", "describe"]:  # the watch's first two
      self.calls.append(argv)
      return gcloud.Result(1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE: try again")
    return real_run(self, argv)

  runner = ScriptedGcloud(lambda k, i, r: FakeProc(["x\n"], 0, polls=4))
  runner.run = run.__get__(runner)
  code, lines, _ = _launch(small_repo, runner, tmp_path)
  assert code == 0 and lines[-1] == "[launch] done after 0 restarts"
  assert sum("UNAVAILABLE: try again (exit status 1) (looking again in 0 s)" in line for line in lines) == 2


def test_ctrl_c_kills_the_workers_and_the_leftovers_and_copies_the_logs(small_repo, tmp_path):
  class Interrupted(FakeProc):
    def poll(self):
      raise KeyboardInterrupt

  runner = ScriptedGcloud(lambda k, i, r: Interrupted(["started\n"], None) if i == 0 else FakeProc(["w1\n"], None))
  code, lines, workdir = _launch(small_repo, runner, tmp_path)
  assert code == 130 and lines[-1] == "[launch] interrupted after 0 restarts"
  assert runner.kinds()[-2:] == ["describe", "ssh all kill"] and runner.procs[1].killed
  assert open(os.path.join(workdir, "launch", "attempt-0", "worker-1.log")).read() == "w1\n"


def test_queued_resources_are_created_and_recreated_when_suspended(small_repo, tmp_path):
  def workers(k, i, runner):
    if k == 0:
      return FakeProc(["x\n"], 255, on_exit=lambda: setattr(runner, "queued_state", "SUSPENDED") or
                      setattr(runner, "state", "PREEMPTED"))
    return FakeProc(["y\n"], 0)

  runner = ScriptedGcloud(workers)
  code, lines, _ = _launch(small_repo, runner, tmp_path, queued_resources=True, spot=True)
  assert code == 0 and lines[-1] == "[launch] done after 1 restart"
  kinds = runner.kinds()
  assert kinds[:4] == ["queued describe", "queued create", "queued describe", "describe"]
  assert kinds[kinds.index("ssh 1") + 1:][:5] == ["describe", "queued describe", "queued delete", "queued describe",
                                                  "queued create"]
  create = _parse(runner.calls[1])[2]
  assert create["--node-id"] == "t1" and create["--runtime-version"] == "v2-alpha-tpuv5" and create["--spot"]


def test_a_slice_of_another_type_is_one_line(small_repo, tmp_path):
  runner = ScriptedGcloud(lambda k, i, r: FakeProc([], 0), state="READY")
  with pytest.raises(ConfigError, match="slice t1 is a v5p-16, not --accelerator_type=v5p-32"):
    _launch(small_repo, runner, tmp_path, accelerator_type="v5p-32")


# ------------------------------------------------------------------------------------------ shipping and the workers' shell lines


def test_the_committed_tree_is_shipped_and_uncommitted_changes_are_noted(small_repo, tmp_path):
  with open(os.path.join(small_repo, "train.py"), "a") as f:
    f.write("# changed\n")
  os.makedirs(os.path.join(small_repo, "ignored"), exist_ok=True)
  open(os.path.join(small_repo, "ignored", "big.bin"), "w").close()
  open(os.path.join(small_repo, "new.py"), "w").close()
  try:
    committed = ship.make_archive(small_repo, str(tmp_path / "a.tar.gz"))
    with tarfile.open(committed.path) as tar:
      assert tar.extractfile("train.py").read() == b"print('hi')\n" and "new.py" not in tar.getnames()
    assert committed.note.startswith("note: 2 uncommitted change(s)")
    tree = ship.make_archive(small_repo, str(tmp_path / "b.tar.gz"), working_tree=True)
    with tarfile.open(tree.path) as tar:
      assert tar.extractfile("train.py").read().endswith(b"# changed\n")
      assert "new.py" in tar.getnames() and not any(n.startswith("ignored") for n in tar.getnames())
    assert tree.note is None and tree.requirements_hash == committed.requirements_hash
  finally:
    subprocess.run(["git", "checkout", "-q", "train.py"], cwd=small_repo, check=True)
    for name in ("new.py", "ignored/big.bin"):
      os.remove(os.path.join(small_repo, name))


def test_setup_installs_once_per_vm_and_replaces_the_code(small_repo, tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  python = tmp_path / "py"  # records what pip would install
  python.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "$@" >> {tmp_path}/installs\n')  # -c: the version check
  python.chmod(0o755)
  archive = ship.make_archive(small_repo, str(tmp_path / "a.tar.gz"))
  line = ship.setup_command(archive.requirements_hash, str(python))
  env = dict(os.environ, HOME=str(home))
  for _ in range(2):  # a relaunch on the same VM
    shutil.copy(archive.path, home / ship.ARCHIVE)
    (home / "llama_jax").mkdir(exist_ok=True)
    (home / "llama_jax" / "stale.py").write_text("")
    subprocess.run(["bash", "-c", line], env=env, check=True, cwd=home)
    assert sorted(os.listdir(home / "llama_jax")) == [".gitignore", "requirements-tpu.txt", "requirements.txt",
                                                      "train.py"]
    assert not (home / ship.ARCHIVE).exists()
  assert (tmp_path / "installs").read_text() == "-m pip install -r requirements.txt -r requirements-tpu.txt\n"
  for marker in home.glob(".llama_jax_installed_*"):  # a new VM: a fresh home
    marker.unlink()
  shutil.copy(archive.path, home / ship.ARCHIVE)
  subprocess.run(["bash", "-c", line], env=env, check=True, cwd=home)
  assert (tmp_path / "installs").read_text().count("pip install") == 2


def test_kill_ends_the_process_in_the_pid_file_and_only_it(tmp_path):
  home = tmp_path / "home"
  (home / "llama_jax").mkdir(parents=True)
  ours = subprocess.Popen(["sleep", "60"], cwd=home / "llama_jax")
  other = subprocess.Popen(["sleep", "60"], cwd=tmp_path)
  try:
    env = dict(os.environ, HOME=str(home))
    (home / "llama_jax.pid").write_text(f"{other.pid}\n")  # a pid now used by a process that is not ours
    subprocess.run(["bash", "-c", ship.kill_command()], env=env, check=True, timeout=60)
    assert other.poll() is None and not (home / "llama_jax.pid").exists()
    (home / "llama_jax.pid").write_text(f"{ours.pid}\n")
    subprocess.run(["bash", "-c", ship.kill_command()], env=env, check=True, timeout=60)
    assert ours.wait(timeout=30) == -9 and other.poll() is None
    subprocess.run(["bash", "-c", ship.kill_command()], env=env, check=True, timeout=60)  # no pid file: nothing
  finally:
    for p in (ours, other):
      p.kill()
      p.wait()
