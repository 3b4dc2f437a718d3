"""What train.py and eval.py share: bad input is one line on stderr and a non-zero exit."""

import os
import re
import sys

from absl import app, flags, logging

from llama_jax import distributed  # noqa: F401  (defines the multi-host flags)


def parse_flags(argv):
  """absl flag parsing, with an unknown or mistyped --config.* key reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown config key
    culprit = next((a.split("=")[0] for a in argv[1:] if _names_missing_key(a, str(e))), "in --config.*")
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    sys.exit(f"error: unknown config key {culprit}" + (f' (did you mean "{hint.group(1)}"?)' if hint else ""))


def _names_missing_key(arg, message):
  if not arg.startswith("--config."):
    return False
  return any(part in message for part in arg.split("=")[0].split(".")[1:])


def run(fn):
  """Runs fn with library logs at WARNING; a ConfigError or missing file ends it in one line."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes, and more
  from llama_jax.errors import ConfigError, StopRun
  try:
    distributed.initialize_from_flags()
    return fn()
  except (ConfigError, FileNotFoundError, StopRun) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: background threads of orbax and tensorstore (a failed restore's, say) would
    # print their own tracebacks while the interpreter shuts down, after the one line.
    os._exit(1)


def main(main_fn):
  app.run(main_fn, flags_parser=parse_flags)
