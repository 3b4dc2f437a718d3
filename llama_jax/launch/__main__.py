"""Runs a llama_jax command on every worker of a Cloud TPU slice, creating the slice first if needed, and
relaunches it (it resumes from its last checkpoint) after a preemption or a dead worker:

  python -m llama_jax.launch --tpu NAME --zone ZONE --accelerator_type v5p-64 [--project P] [--spot]
      [--queued_resources] [--version RUNTIME] [--max_restarts 10] [--poll_s 60] [--ship_working_tree]
      [--python python3] [--dry_run] -- python train.py --config configs/llama.py:llama3-8b --workdir gs://B/run

--dry_run prints every command it would run and runs none (no gcloud needed). Bad input (an unknown
accelerator type, a command that is not a llama_jax entry point, train.py without --workdir, no gcloud)
is one line on stderr and exit status 1. Ctrl-C or SIGTERM ends the launch: the local ssh processes and
the command on a READY slice are killed, the logs copied, exit status 130. llama_jax/launch/supervisor.py
describes what it does.
"""

import re
import signal
import sys

from absl import app, flags

from llama_jax.errors import ConfigError
from llama_jax.launch import supervisor

_TPU = flags.DEFINE_string("tpu", None, "Name of the TPU slice (its queued resource has the same name).")
_ZONE = flags.DEFINE_string("zone", None, "Zone of the slice, e.g. us-central2-b.")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None, "Accelerator type, e.g. v5p-64, v5litepod-16, v6e-8.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's configured project).")
_SPOT = flags.DEFINE_bool("spot", False, "Create the slice as Spot capacity (preemptible at any time).")
_QUEUED = flags.DEFINE_bool("queued_resources", False, "Create the slice through a queued resource (waits for "
                            "capacity) instead of `tpu-vm create`.")
_VERSION = flags.DEFINE_string("version", None, "TPU runtime version (default: the generation's: v2-alpha-tpuv5 "
                               "for v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e, "
                               "tpu-ubuntu2204-base for v2-v4).")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 10, "Relaunches after a preemption or a failed worker before "
                                     "giving up.")
_POLL_S = flags.DEFINE_float("poll_s", 60.0, "Seconds between looks at the slice's state while the workers run.")
_SHIP_WORKING_TREE = flags.DEFINE_bool("ship_working_tree", False, "Ship the working copy's files (tracked and "
                                       "untracked, not ignored) instead of the committed tree.")
_PYTHON = flags.DEFINE_string("python", "python3", "Python on the workers: runs pip and the command in place of "
                              "its leading python.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command it would run; run nothing.")
flags.mark_flags_as_required(["tpu", "zone", "accelerator_type"])


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt  # a SIGTERM ends the launch as Ctrl-C does: workers' leftovers killed, logs copied


_OWN_FLAGS = (_TPU, _ZONE, _ACCELERATOR_TYPE, _PROJECT, _SPOT, _QUEUED, _VERSION, _MAX_RESTARTS, _POLL_S,
              _SHIP_WORKING_TREE, _PYTHON, _DRY_RUN)
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # a Cloud TPU node name (a GCE resource name)


def _check(command_argv):
  """ConfigError for a launcher flag given after -- (it would go to the command, and --dry_run there would
  not keep the launch from running), a --tpu that is no TPU name, a --poll_s that is not positive."""
  own = {f.name for f in _OWN_FLAGS} | {f"no{f.name}" for f in _OWN_FLAGS}
  for arg in command_argv:
    if arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in own:
      raise ConfigError(f"{arg} comes after --, so it would go to the command, which does not take it: "
                        "the launcher's flags go before --")
  if not _TPU_NAME.fullmatch(_TPU.value):
    raise ConfigError(f"--tpu={_TPU.value}: a TPU name is 1-63 lowercase letters, digits and hyphens, starting "
                      "with a letter and not ending with a hyphen")
  if _POLL_S.value <= 0:
    raise ConfigError(f"--poll_s={_POLL_S.value} must be > 0 (seconds between looks at the slice)")


def main(argv):
  signal.signal(signal.SIGTERM, _interrupt)
  options = supervisor.Options(
      tpu=_TPU.value, zone=_ZONE.value, accelerator_type=_ACCELERATOR_TYPE.value, project=_PROJECT.value,
      spot=_SPOT.value, queued_resources=_QUEUED.value, version=_VERSION.value, max_restarts=_MAX_RESTARTS.value,
      poll_s=_POLL_S.value, ship_working_tree=_SHIP_WORKING_TREE.value, python=_PYTHON.value, dry_run=_DRY_RUN.value)
  try:
    _check(argv[1:])
    return supervisor.launch(options, argv[1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1


def _parse_flags(argv):
  """absl's parsing, a bad or unknown flag reported in one line (the command's own flags go after --)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    hint = " (the command to run goes after --)" if "Unknown command line flag" in str(e) else ""
    sys.exit(f"error: {e}{hint}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
