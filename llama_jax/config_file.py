"""What a path a user names is, and the config file `--config` names: the checks every entry
point makes before it reads a file (one line naming the flag and what the path is instead).

A config file is Python that is imported, so it is a local file: `--config gs://...` is refused in
one line (copy the file to the machine first). The paths it checks otherwise may be local or on object
storage (llama_jax.paths).

Imports nothing of llama_jax but its errors and paths, so the entry points' flag parsing (entry.py) can
use it.
"""

import importlib.util
import inspect
import os
import traceback

import ml_collections

from llama_jax import paths
from llama_jax.errors import ConfigError


def describe_path(path: str) -> str:
  """What is at `path` (local or object storage), in a few words that finish "PATH ...", for a line
  saying a file is not what a flag or key says: "does not exist", "is a directory", "is a JSON file", ...

  Reads at most 64 bytes of a file; a directory (on object storage: a prefix with objects under it)
  is named by what marks it (checkpoints/ for a llama_jax workdir, config.json for a Hugging Face
  checkpoint).
  """
  if paths.isdir(path):
    names = set(paths.listdir(path))
    if "checkpoints" in names:
      return "is a llama_jax workdir (it has checkpoints/)"
    if "config.json" in names:
      return "is a Hugging Face checkpoint directory (it has config.json)"
    return "is an empty directory" if not names else "is a directory"
  if not paths.exists(path):
    return "does not exist"
  size = paths.size(path)
  if size == 0:
    return "is an empty file"
  with paths.open(path, "rb") as f:
    head = f.read(64)
  # safetensors: an 8-byte little-endian header length, then the JSON header.
  if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
    return "is a safetensors file"
  if head.lstrip()[:1] in (b"{", b"["):
    return "is a JSON file"
  return "is a file"


def load_config_file(config_arg: str, flag: str = "--config") -> ml_collections.ConfigDict:
  """The ConfigDict of `FILE.py[:ARG]` as ml_collections' --config takes it: FILE's get_config(ARG)
  (everything after the first colon, "" included), or get_config() without a colon.

  Raises ConfigError in one line naming `flag` and the file when FILE is a URL (`gs://...`: a config
  file must be local), does not exist, is not a .py file, fails to import (its line and error), has no
  get_config(), takes no ARG but is given one, raises (its line and error) or returns something other
  than a ConfigDict.
  """
  if paths.is_remote(config_arg):
    raise ConfigError(f"{flag} {config_arg}: a config file is imported as Python, so it must be a local file; "
                      "copy it to this machine and give its local path")
  path, colon, arg = config_arg.partition(":")
  if not path:
    raise ConfigError(f"{flag} {config_arg!r} names no file: give FILE.py[:ARG], a Python file with get_config()")
  # A local file, taken as written (no `~` expansion), as ml_collections' --config then imports it.
  if not os.path.exists(path):
    raise ConfigError(f"{flag} {path} does not exist")
  if not os.path.isfile(path) or not path.endswith(".py"):
    raise ConfigError(f"{flag} {path} {describe_path(path)}, not a Python config file (FILE.py[:ARG] "
                      "with get_config())")
  spec = importlib.util.spec_from_file_location("llama_jax_config_file", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{flag} {path}: line {e.lineno}: {e.msg}") from None
  except Exception as e:  # noqa: BLE001  (whatever the file's own code raises)
    raise ConfigError(f"{flag} {path}: importing it raised {_where(e, path)}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"{flag} {path} has no get_config() function")
  if colon:
    try:
      inspect.signature(get_config).bind(arg)
    except TypeError:
      raise ConfigError(f"{flag} {config_arg}: {path}'s get_config() takes no argument; "
                        f"drop ':{arg}'") from None
    except ValueError:  # no signature to inspect: let the call say
      pass
  try:
    config = get_config(arg) if colon else get_config()
  except (ConfigError, ValueError) as e:  # the file's own word on a bad argument, e.g. a preset name
    raise ConfigError(f"{flag} {config_arg}: {e}") from None
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"{flag} {config_arg}: get_config() raised {_where(e, path)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{flag} {config_arg}: get_config() returned {type(config).__name__}, "
                      "not an ml_collections.ConfigDict")
  return config


def _where(e: Exception, path: str) -> str:
  """'NameError: ... (line 3)': the exception, and the last line of `path` its traceback passed."""
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  message = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {message}" + (f" (line {lines[-1]})" if lines else "")
