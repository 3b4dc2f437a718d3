"""The launch: check the input, bring the slice up, ship the code, run the command on every worker, watch,
and relaunch after a preemption or a dead worker until the command succeeds everywhere or the restarts run out.

One attempt:
1. the slice made READY (provision.py), the packed checkout copied to every worker, unpacked there and the
   requirements installed (ship.py);
2. one `gcloud ... ssh --worker=i --command=...` per worker (command.py), all at once. Worker 0's output
   goes to `out` with a "[worker 0] " prefix; every worker's output goes to a local log
   (LOGS/attempt-<k>/worker-<i>.log), copied to WORKDIR/launch/attempt-<k>/worker-<i>.log when the attempt
   ends (llama_jax.paths: a gs:// workdir too; a local one is taken as a path on this machine, a shared mount);
3. watched: the workers' exit statuses all the time, the slice's state every poll_s seconds.
It ends when
- every worker exits 0: the launch is done;
- a worker exits non-zero while the slice is READY and its output ends with an entry point's one-line
  `error: ...` (bad input, a non-finite loss): the launch stops, since a relaunch would fail the same way;
- the slice leaves READY (preempted, deleted) or a worker exits non-zero otherwise: the local ssh processes
  are killed, the run's leftovers on a still-READY slice too (by the pid each worker wrote, ship.kill_command),
  and the next attempt recreates the slice if needed, ships again and runs the same command, which resumes
  from its last checkpoint. A failed gcloud command (create, copy, install) ends an attempt the same way.
After --max_restarts relaunches the launch gives up. The last line says why: `done after K restarts`,
`gave up after N restarts: REASON`, `bad input: LINE` or `interrupted after K restarts`.
"""

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time

from llama_jax import paths
from llama_jax.errors import ConfigError
from llama_jax.launch import accelerators, command as command_lib, gcloud, provision, ship

PREFIX = "[launch] "
_READER_JOIN_S = 10  # for a finished worker's last lines to be read
# Lines gcloud and ssh add to a worker's output (not the command's): skipped when looking for its last line.
_TRANSPORT_LINE = re.compile(r"^(ERROR: \(gcloud\.|Connection to \S+ closed|Warning: Permanently added)")


@dataclasses.dataclass(frozen=True)
class Options:
  """The launcher's flags (llama_jax/launch/__main__.py says what each means)."""
  tpu: str
  zone: str
  accelerator_type: str
  project: str | None = None
  spot: bool = False
  queued_resources: bool = False
  version: str | None = None
  max_restarts: int = 10
  poll_s: float = 60.0
  ship_working_tree: bool = False
  python: str = "python3"
  dry_run: bool = False
  repo_dir: str | None = None  # the checkout to ship; None: the one this package is in


def default_repo_dir() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _restarts(n: int) -> str:
  return f"{n} restart" + ("" if n == 1 else "s")


class _Stop(Exception):
  """An attempt that ends the launch: bad input found in a worker's output."""


def launch(options: Options, command_argv: list[str], runner: gcloud.Runner | None = None, out=None) -> int:
  """Runs the launch; returns the exit status (0 done, 1 gave up or bad input, 130 interrupted).

  Bad input raises ConfigError (one line) before any command runs: an unknown accelerator type, a command
  that is not a llama_jax entry point, train.py without --workdir, no gcloud on PATH (unless dry_run or a
  runner is given), a checkout that cannot be packed; and after the first describe, a slice of that name
  with another accelerator type. A workdir that is not gs:// on a multi-worker slice is
  a warning. `runner` runs the gcloud commands (default: gcloud.Runner, subprocesses); `out` gets the
  launcher's lines and worker 0's output (default: sys.stdout)."""
  out = out or sys.stdout
  accelerator = accelerators.parse(options.accelerator_type)
  command = command_lib.parse(command_argv)
  if runner is None and not options.dry_run and shutil.which("gcloud") is None:
    raise ConfigError("gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
                      ", or see the commands with --dry_run")
  if options.max_restarts < 0 or options.poll_s < 0:
    raise ConfigError(f"--max_restarts={options.max_restarts} and --poll_s={options.poll_s} must be >= 0")
  repo_dir = options.repo_dir or default_repo_dir()
  warning = command_lib.workdir_warning(command, accelerator.hosts)
  if warning:
    print(warning, file=out, flush=True)
  if options.dry_run:
    for comment, argv in dry_run_plan(options, accelerator, command, repo_dir):
      print(f"# {comment}\n{shlex.join(argv)}", file=out)
    out.flush()
    return 0
  local_dir = tempfile.mkdtemp(prefix=f"llama_jax-launch-{options.tpu}-")
  archive = ship.make_archive(repo_dir, paths.join(local_dir, ship.ARCHIVE), options.ship_working_tree)
  return _Supervisor(options, accelerator, command, archive, local_dir, runner or gcloud.Runner(), out).run()


def dry_run_plan(options: Options, accelerator: accelerators.Accelerator, command: command_lib.Command,
                 repo_dir: str) -> list[tuple[str, list[str]]]:
  """(what, argv) of every command a launch runs on a slice that does not exist yet, in order."""
  where = gcloud.Slice(options.tpu, options.zone, options.project)
  version = options.version or accelerator.runtime_version
  bring_up = provision.plan(where, accelerator, version, options.spot, options.queued_resources)
  if options.queued_resources:
    steps = [("describe the queued resource (NOT_FOUND: create it)", bring_up[0]),
             ("create the queued resource", bring_up[1]),
             (f"describe it every {options.poll_s:g} s until ACTIVE", bring_up[2]),
             ("describe the slice: READY, workers = networkEndpoints", bring_up[3])]
  else:
    steps = [("describe the slice (NOT_FOUND: create it)", bring_up[0]),
             ("create the slice (returns when READY)", bring_up[1])]
  archive = "LOCAL_DIR/" + ship.ARCHIVE
  digest = ship.requirements_hash(repo_dir, options.ship_working_tree)
  steps += [
      ("pack the committed tree (LOCAL_DIR: a new temporary folder)", ship.archive_argv(archive))
      if not options.ship_working_tree else
      (f"list the working copy's files, packed into {archive}", ship.list_argv()),
      (f"copy it to every worker ({accelerator.hosts})", where.scp(archive, f"~/{ship.ARCHIVE}")),
      ("unpack into ~/llama_jax, install the requirements once per VM", where.ssh("all", ship.setup_command(
          digest, options.python)))]
  steps += [(f"run on worker {i} of {accelerator.hosts}", where.ssh(i, command.remote(options.python)))
            for i in range(accelerator.hosts)]
  steps += [(f"while they run: describe the slice every {options.poll_s:g} s", where.describe()),
            (f"on a preemption or a failed worker (at most {options.max_restarts} relaunches): end the leftovers on "
             "a READY slice, then bring the slice up, copy, unpack and run again", where.ssh("all", ship.kill_command()))]
  return steps


class _Supervisor:

  def __init__(self, options, accelerator, command, archive, local_dir, runner, out):
    self.options, self.accelerator, self.command = options, accelerator, command
    self.archive, self.local_dir, self.runner, self.out = archive, local_dir, runner, out
    self.where = gcloud.Slice(options.tpu, options.zone, options.project)
    self.version = options.version or accelerator.runtime_version
    self.lock = threading.Lock()
    self.seen_ready = False  # until the slice is first READY, a failing describe is taken as bad input
    self.copy_logs = bool(command.workdir)

  def say(self, line: str):
    with self.lock:
      print(PREFIX + line, file=self.out, flush=True)

  def run(self) -> int:
    if self.archive.note:
      self.say(self.archive.note)
    self.say(f"worker logs in {self.local_dir}" + (f", copied to {self._remote_logs()}/" if self.command.workdir
                                                   else ""))
    if self.copy_logs and paths.is_remote(self.command.workdir):
      try:
        paths.check_bucket(self.command.workdir, "--workdir")
      except ConfigError as e:  # the workers may reach it with their own credentials: a warning, not a stop
        self.copy_logs = False
        self.say(f"warning: {e}: worker logs stay in {self.local_dir} only")
    restarts = 0
    try:
      while True:
        try:
          reason = self._attempt(restarts)
        except _Stop as stop:
          self.say(f"bad input: {stop}")
          return 1
        if reason is None:
          self.say(f"done after {_restarts(restarts)}")
          return 0
        if restarts >= self.options.max_restarts:
          self.say(f"gave up after {_restarts(restarts)}: {reason}")
          return 1
        restarts += 1
        self.say(f"relaunch {restarts} of at most {self.options.max_restarts}: {reason}")
    except KeyboardInterrupt:
      self._kill_leftovers()
      self.say(f"interrupted after {_restarts(restarts)}")
      return 130

  def _remote_logs(self) -> str:
    return paths.join(self.command.workdir, "launch")

  def _attempt(self, k: int) -> str | None:
    """Attempt k (0: the first launch): None when every worker exits 0, else why it failed."""
    try:
      workers = provision.ensure_ready(self.runner, self.where, self.accelerator, self.version, self.options.spot,
                                       self.options.queued_resources, self.options.poll_s, self.say)
      self.seen_ready = True
      self.say(f"slice {self.where.name} READY with {workers} workers: copying the code")
      gcloud.check(self.runner, self.where.scp(self.archive.path, f"~/{ship.ARCHIVE}"), "copy to the workers")
      self.say("unpacking, installing the requirements (once per VM)")
      setup = self.runner.run(self.where.ssh("all", ship.setup_command(self.archive.requirements_hash,
                                                                        self.options.python)))
      bad = [line for line in (setup.stdout + setup.stderr).splitlines() if line.startswith("error: ")]
      if setup.returncode != 0 and bad:  # ship.python_check's line: relaunching would not help
        raise _Stop(bad[0])
      if setup.returncode != 0:
        raise gcloud.GcloudError(f"unpack and install on the workers: "
                                 f"{gcloud.error_line(setup.stderr + setup.stdout)} (exit status {setup.returncode})")
    except gcloud.GcloudError as e:
      if e.describe and not self.seen_ready:  # no project, no credentials, a bad zone: no relaunch mends it
        raise _Stop(f"gcloud cannot describe the slice: {e}") from None
      time.sleep(self.options.poll_s)  # the slice may be on its way out: look again later
      return str(e)
    self.say(f"attempt {k}: running {shlex.join([self.options.python, *self.command.args])} on {workers} workers")
    workers_run = _Workers(self, k, workers)
    try:
      failed = workers_run.watch()
      exited = workers_run.failed_workers()  # before the others are killed
    finally:
      workers_run.stop()
      self._copy_logs(k, workers)
    if failed is None:
      return None
    worker, reason = failed
    if worker < 0:  # the slice left READY: nothing runs there any more
      return reason
    node = self._describe()
    if node is not None and node.state == gcloud.READY:
      for i in exited:
        line = workers_run.last_lines[i]
        if line.startswith("error: "):
          self._kill_leftovers(node)
          raise _Stop(f"worker {i}: {line}")
      self._kill_leftovers(node)
      return reason
    return f"slice {node.state if node else 'deleted'}; {reason}"

  def _describe(self) -> gcloud.Node | None:
    """The slice's Node (None: it is gone); state UNKNOWN when gcloud fails to say."""
    try:
      return gcloud.describe_node(self.runner, self.where)
    except gcloud.GcloudError as e:
      self.say(f"{e} (taken as not READY)")
      return gcloud.Node("UNKNOWN", "", 0)

  def _kill_leftovers(self, node: gcloud.Node | None = None):
    """Ends what the command left running on the workers, when the slice is READY (else nothing runs there)."""
    node = node or self._describe()
    if node is None or node.state != gcloud.READY:
      return
    result = self.runner.run(self.where.ssh("all", ship.kill_command()))
    if result.returncode != 0:
      self.say(f"could not end the leftovers on every worker: {gcloud.error_line(result.stderr + result.stdout)}")

  def _copy_logs(self, k: int, workers: int):
    if not self.copy_logs:
      return
    for i in range(workers):
      dst = paths.join(self._remote_logs(), f"attempt-{k}", f"worker-{i}.log")
      try:
        paths.makedirs(paths.parent(dst))
        paths.copy(self._log_path(k, i), dst)
      except Exception as e:  # noqa: BLE001  (no credentials, no bucket: the local log stays)
        self.say(f"could not copy worker {i}'s log to {dst}: {type(e).__name__}: {e}")
        return

  def _log_path(self, k: int, i: int) -> str:
    return paths.join(self.local_dir, f"attempt-{k}", f"worker-{i}.log")


class _Workers:
  """The ssh processes of one attempt, a thread each reading its output into its log (and worker 0's to out)."""

  def __init__(self, supervisor: _Supervisor, k: int, workers: int):
    self.supervisor = supervisor
    paths.makedirs(paths.parent(supervisor._log_path(k, 0)))
    self.last_lines = [""] * workers
    self.procs, self.readers = [], []
    for i in range(workers):
      proc = supervisor.runner.start(supervisor.where.ssh(i, supervisor.command.remote(supervisor.options.python)))
      reader = threading.Thread(target=self._read, args=(i, proc, supervisor._log_path(k, i)), daemon=True)
      reader.start()
      self.procs.append(proc)
      self.readers.append(reader)

  def _read(self, i: int, proc, log_path: str):
    with paths.open(log_path, "w") as log:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        if line.strip() and not _TRANSPORT_LINE.match(line):
          self.last_lines[i] = line.strip()
        if i == 0:
          with self.supervisor.lock, contextlib.suppress(OSError, ValueError):  # out closed: the log goes on
            self.supervisor.out.write("[worker 0] " + line if line.endswith("\n") else f"[worker 0] {line}\n")
            self.supervisor.out.flush()

  def watch(self) -> tuple[int, str] | None:
    """Waits for the workers: None when all exit 0; (worker, why) when one exits non-zero or the slice leaves
    READY (worker -1)."""
    poll_s = self.supervisor.options.poll_s
    next_describe = time.monotonic() + poll_s
    while True:
      codes = [p.poll() for p in self.procs]
      failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed is not None:
        self.readers[failed[0]].join(_READER_JOIN_S)
        last = self.last_lines[failed[0]]
        if failed[1] == 255:  # ssh's own status: the connection went (a preempted or lost VM), not the command
          return failed[0], f"worker {failed[0]}'s ssh ended with status 255 (connection lost)"
        return failed[0], f"worker {failed[0]} exited with status {failed[1]}" + (f" ({last})" if last else "")
      if all(c == 0 for c in codes):
        return None
      if time.monotonic() >= next_describe:
        next_describe = time.monotonic() + poll_s
        try:
          node = gcloud.describe_node(self.supervisor.runner, self.supervisor.where)
        except gcloud.GcloudError as e:  # gcloud's trouble, not the slice's: the workers go on
          self.supervisor.say(f"{e} (looking again in {poll_s:g} s)")
        else:
          if node is None or node.state != gcloud.READY:
            return -1, f"slice {node.state if node else 'deleted'}"
      time.sleep(min(poll_s, 1.0))

  def failed_workers(self) -> list[int]:
    """The workers whose ssh has exited non-zero."""
    return [i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]

  def stop(self):
    """Kills the ssh processes still running and waits for their output to be read."""
    for p in self.procs:
      p.kill()
    for p in self.procs:
      p.wait()
    for r in self.readers:
      r.join(_READER_JOIN_S)
