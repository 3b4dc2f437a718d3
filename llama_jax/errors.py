"""The errors for bad input: the entry points print their one line and exit non-zero."""


class ConfigError(ValueError):
  """Bad input (config key, file, sizes), named in one line, raised before anything compiles."""


class DataError(ConfigError):
  """A document that cannot be read (file:line and why), found while the data streams."""


class StopRun(RuntimeError):
  """A run that stops on purpose (a non-finite loss), named in one line with where to go back to."""


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (its type's name when the message is empty): the
  reason a one-line error gives for a library's failure."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]
