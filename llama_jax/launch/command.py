"""The command the launcher runs on every worker: which llama_jax entry point, its workdir, and the bash line
each worker's ssh runs.

The entry points are the programs that join a multi-host job with `--distributed` (llama_jax/distributed.py,
through llama_jax/entry.py): `train.py`, `eval.py` and `python -m llama_jax.MODULE` for the modules in
ENTRY_MODULES.
"""

import dataclasses
import re
import shlex

from llama_jax.errors import ConfigError

ENTRY_SCRIPTS = ("train.py", "eval.py")
ENTRY_MODULES = ("aot", "bench", "convert", "data", "generate", "plan", "plot", "tokenizer")
# Where the workers keep the shipped checkout and the pid of the running command (relative to the home
# directory, where gcloud's ssh starts).
REMOTE_DIR = "llama_jax"
PID_FILE = "llama_jax.pid"


def _forms() -> str:
  return (f"python {' | '.join(ENTRY_SCRIPTS)} ... or python -m llama_jax.{{{','.join(ENTRY_MODULES)}}} ...")


@dataclasses.dataclass(frozen=True)
class Command:
  """The user's command without its leading python (`args[0]` is `train.py`, `eval.py` or `-m`), with
  `--distributed`; `workdir` is its --workdir (None without one)."""
  args: tuple[str, ...]
  workdir: str | None

  def remote(self, python: str) -> str:
    """The bash line that runs it on a worker: from the shipped checkout, its pid written to ~/PID_FILE (the
    launcher kills that pid, never a name pattern), `python` in place of the user's, output unbuffered (the
    launcher streams it)."""
    return (f"cd ~/{REMOTE_DIR} && echo $$ > ~/{PID_FILE} && PYTHONUNBUFFERED=1 exec "
            f"{shlex.join([python, *self.args])}")


def _flag_value(args, name: str) -> str | None:
  """The value of --name (absl also takes -name, and the value as the next argument), the last one given."""
  value = None
  for i, arg in enumerate(args):
    for dashes in ("--", "-"):
      if arg.startswith(f"{dashes}{name}="):
        value = arg.split("=", 1)[1]
      elif arg == f"{dashes}{name}" and i + 1 < len(args):
        value = args[i + 1]
  return value


def parse(argv: list[str]) -> Command:
  """The Command of the argv given after `--`; ConfigError (one line) when it is not a llama_jax entry
  point, or when train.py has no --workdir."""
  argv = list(argv)
  python = argv[0].rsplit("/", 1)[-1] if argv else ""
  if not re.fullmatch(r"python(3(\.[0-9]+)?)?", python) or len(argv) < 2:
    raise ConfigError(f"the command after -- must be a llama_jax entry point: {_forms()}; got: "
                      f"{shlex.join(argv) or 'nothing'}")
  args = argv[1:]
  script = args[0].removeprefix("./")
  module = args[1] if args[0] == "-m" and len(args) > 1 else None
  in_package = module is not None and module.startswith("llama_jax.")
  if not (script in ENTRY_SCRIPTS or in_package and module.removeprefix("llama_jax.") in ENTRY_MODULES):
    raise ConfigError(f"the command after -- must be a llama_jax entry point: {_forms()}; got: {shlex.join(argv)}")
  workdir = _flag_value(args, "workdir")
  if script == "train.py" and not workdir:
    raise ConfigError("train.py needs --workdir (on a multi-host slice: a gs:// URL every worker reaches)")
  if not any(a in ("--distributed", "-distributed") or a.startswith(("--distributed=", "-distributed="))
             for a in args):
    args.append("--distributed")
  return Command(tuple(args), workdir)


def workdir_warning(command: Command, hosts: int) -> str | None:
  """A one-line warning when a multi-host slice runs with a workdir that is not on object storage."""
  if hosts > 1 and command.workdir and not command.workdir.startswith("gs://"):
    return (f"warning: --workdir={command.workdir} is not gs:// on a slice of {hosts} workers: the workers share no "
            "disk unless it is a mount on each (NFS, GCS FUSE)")
  return None
