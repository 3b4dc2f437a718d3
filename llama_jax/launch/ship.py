"""The code the workers run: this checkout packed into one tar.gz, copied to every worker and unpacked into
~/llama_jax there (replacing the copy before), and the pinned requirements installed once per worker VM.

Packed: the committed tree (`git archive HEAD`), so that every worker, and every relaunch, runs one known
commit; with `working_tree=True` the files of the working copy instead, tracked and untracked but not
ignored (`git ls-files -co --exclude-standard`). The install (`PYTHON -m pip install -r requirements.txt
-r requirements-tpu.txt`) leaves a marker file named by a hash of those two files in the worker's home: a
relaunch on the same VM skips it, a new VM (after a preemption) or changed pins install again.
"""

import dataclasses
import hashlib
import os
import shlex
import subprocess
import tarfile

from llama_jax import paths
from llama_jax.errors import ConfigError
from llama_jax.launch.command import PID_FILE, REMOTE_DIR

ARCHIVE = "llama_jax.tar.gz"  # its name on the workers, in the home directory
REQUIREMENTS = ("requirements.txt", "requirements-tpu.txt")
_KILL_WAIT_S = 30


@dataclasses.dataclass(frozen=True)
class Archive:
  """A packed checkout: the local file, the hash of its requirement files, and a note on what it leaves out
  (None when it leaves out nothing)."""
  path: str
  requirements_hash: str
  note: str | None


def _git(repo_dir: str, *args: str) -> str:
  done = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise ConfigError(f"git {' '.join(args[:2])} in {repo_dir}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
  return done.stdout


def archive_argv(out_path: str) -> list[str]:
  """The command that packs the committed tree."""
  return ["git", "archive", "--format=tar.gz", f"--output={out_path}", "HEAD"]


def list_argv() -> list[str]:
  """The command that lists the working copy's files to pack (tracked and untracked, not ignored)."""
  return ["git", "ls-files", "-co", "--exclude-standard", "-z"]


def make_archive(repo_dir: str, out_path: str, working_tree: bool = False) -> Archive:
  """Packs the checkout at repo_dir into out_path (tar.gz); ConfigError when it is not a git checkout with a
  commit or lacks a requirement file."""
  digest = requirements_hash(repo_dir, working_tree)
  if working_tree:
    files = [f for f in _git(repo_dir, *list_argv()[1:]).split("\0") if f]
    with tarfile.open(out_path, "w:gz") as tar:
      for f in files:
        if os.path.lexists(os.path.join(repo_dir, f)):  # a tracked file deleted in the working copy is left out
          tar.add(os.path.join(repo_dir, f), arcname=f, recursive=False)
    return Archive(out_path, digest, None)
  _git(repo_dir, *archive_argv(out_path)[1:])
  changed = [line for line in _git(repo_dir, "status", "--porcelain").splitlines() if line.strip()]
  note = (f"note: {len(changed)} uncommitted change(s) in the working copy are not shipped (the workers run "
          "HEAD; --ship_working_tree ships the working copy)") if changed else None
  return Archive(out_path, digest, note)


def requirements_hash(repo_dir: str, working_tree: bool = False) -> str:
  """A hash of the requirement files that would be shipped (HEAD's, or the working copy's); ConfigError
  when repo_dir is not a git checkout with a commit or lacks one of them."""
  _git(repo_dir, "rev-parse", "--verify", "HEAD")
  texts = [(_read if working_tree else _git_show)(repo_dir, f) for f in REQUIREMENTS]
  return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def _read(repo_dir: str, name: str) -> str:
  if not paths.isfile(paths.join(repo_dir, name)):
    raise ConfigError(f"{name} is missing from {repo_dir}: the workers install it")
  return paths.read_text(paths.join(repo_dir, name))


def _git_show(repo_dir: str, name: str) -> str:
  done = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=repo_dir, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise ConfigError(f"{name} is not committed in {repo_dir}: the workers install it")
  return done.stdout


def kill_command() -> str:
  """Bash that ends the command a launch left running on a worker: SIGKILL to the pid in ~/PID_FILE if that
  process still runs in ~/REMOTE_DIR (a pid reused by another process is left alone), then waits up to 30 s
  for it to be gone or a zombie (either way it holds the TPU no more)."""
  return (f'if [ -f ~/{PID_FILE} ]; then pid=$(cat ~/{PID_FILE}); dir=$(cd ~/{REMOTE_DIR} 2>/dev/null && pwd -P); '
          f'if [ -n "$dir" ] && [ "$(readlink /proc/$pid/cwd 2>/dev/null)" = "$dir" ]; then kill -9 $pid; '
          f'for i in $(seq {_KILL_WAIT_S}); do [ "$(ps -o stat= -p $pid | cut -c1)" = "" ] && break; '
          f'[ "$(ps -o stat= -p $pid | cut -c1)" = Z ] && break; sleep 1; done; fi; '
          f'rm -f ~/{PID_FILE}; fi; true')


MIN_PYTHON = (3, 11)  # jax 0.10.2's oldest Python (its wheels are built for 3.11 and newer)


def python_check(python: str) -> str:
  """Bash that ends with a one-line "error: ..." and status 1 when `python` on the worker is missing or older
  than MIN_PYTHON (the stock TPU images have Python 3.10, on which the pins do not install)."""
  want = ".".join(map(str, MIN_PYTHON))
  py = shlex.quote(python)
  return (f"{{ {py} -c 'import sys; sys.exit(sys.version_info < {MIN_PYTHON})' 2>/dev/null || "
          f"{{ echo \"error: --python {python} on worker $(hostname) is $({py} -V 2>&1 | head -1); llama_jax needs "
          f"Python {want} or newer with pip there: pass --python a path to one\"; exit 1; }}; }}")


def setup_command(requirements_hash: str, python: str) -> str:
  """Bash for every worker once the archive is there: end a leftover run, check that `python` is new enough
  (python_check), unpack into ~/REMOTE_DIR (replacing it), install the requirements unless this VM's marker for
  their hash is there."""
  marker = f"~/.llama_jax_installed_{requirements_hash}"
  install = shlex.join([python, "-m", "pip", "install", "-r", REQUIREMENTS[0], "-r", REQUIREMENTS[1]])
  return (f"{{ {kill_command()}; }} && {python_check(python)} && rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
          f"tar -xzf ~/{ARCHIVE} -C ~/{REMOTE_DIR} && rm -f ~/{ARCHIVE} && cd ~/{REMOTE_DIR} && "
          f"{{ [ -f {marker} ] || {{ {install} && touch {marker}; }}; }}")
