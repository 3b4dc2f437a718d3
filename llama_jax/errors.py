"""The error for bad input: train.py / eval.py print its one line and exit non-zero."""


class ConfigError(ValueError):
  """Bad input (config key, file, sizes), named in one line, raised before anything compiles."""
