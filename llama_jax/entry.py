"""What train.py and eval.py share: bad input as one line and a non-zero exit, never a traceback."""

import sys

from absl import flags, logging


# Errors that mean "the input is wrong", reported as one line naming the culprit.
BAD_INPUT = (ValueError, FileNotFoundError, KeyError, TypeError)


def run(fn):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from llama_jax import config_lib
  try:
    return fn()
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")


def main(app_run, main_fn):
  app_run(main_fn)
