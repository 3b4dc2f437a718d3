"""What the entry points share: bad input is one line on stderr and a non-zero exit; the host
allocator set up to reuse freed memory."""

import ctypes
import os
import re
import sys

from absl import app, flags, logging

from llama_jax import distributed  # noqa: F401  (defines the multi-host flags)

_REUSE_FREED_MEMORY = flags.DEFINE_bool(
    "reuse_freed_memory", True, "Let malloc keep freed memory for reuse (one arena, no mmap) instead of "
    "handing it back to the OS: XLA:CPU's per-step buffers then reuse pages already mapped instead of "
    "faulting in fresh ones (Linux/glibc only; elsewhere a warning says it was not done).")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory and hand it out again; False where it cannot (not glibc).

  XLA:CPU allocates a step's temporary buffers (~0.9 GB for peer-tiny's 32k vocabulary) with
  posix_memalign and frees them when the step ends. glibc serves blocks this large from fresh
  mmap'd pages, so every step takes a page fault per 4 KiB on first touch: 213k faults and
  ~0.4 s of kernel time per peer-tiny step on a 2-core CPU, a fifth of its wall time
  (benchmarks/README.md; `python benchmarks/page_faults.py` counts them with and without).
  With a single arena, no mmap and no trimming below 2 GiB of free top memory, the next step
  gets the same, already mapped pages. Has to run before JAX starts its threads: a thread picks
  its arena on its first malloc.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def parse_flags(argv):
  """absl flag parsing, with a bad --config file or an unknown or mistyped --config.* key reported
  in one line.

  A program with ml_collections' --config has its FILE.py[:ARG] loaded first by
  config_file.load_config_file, which names the file and what is wrong with it (missing, not a .py
  file, a syntax error or exception in it, no get_config(), a bad ARG), instead of the traceback,
  or the later "Configuration is not available", that ml_collections gives."""
  config_arg = _config_file_arg(argv)
  if config_arg is not None:
    from llama_jax import config_file
    from llama_jax.errors import ConfigError
    try:
      config_file.load_config_file(config_arg)
    except ConfigError as e:
      sys.exit(f"error: {e}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # several missing required flags are one line each in absl's message
    sys.exit("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()))
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown config key
    culprit = next((a.split("=")[0] for a in argv[1:] if _names_missing_key(a, str(e))), "in --config.*")
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    sys.exit(f"error: unknown config key {culprit}" + (f' (did you mean "{hint.group(1)}"?)' if hint else ""))


def _config_file_arg(argv) -> str | None:
  """The value of the last --config in argv where --config is ml_collections' config-file flag."""
  if "config" not in flags.FLAGS or not type(flags.FLAGS["config"].parser).__module__.startswith("ml_collections"):
    return None
  value = None
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      break
    if arg in ("--config", "-config"):
      value = next(args, None)
    elif arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
  return value


def _names_missing_key(arg, message):
  if not arg.startswith("--config."):
    return False
  return any(part in message for part in arg.split("=")[0].split(".")[1:])


def run(fn):
  """Runs fn with library logs at WARNING; a ConfigError or missing file ends it in one line.

  First (--reuse_freed_memory, the default) sets malloc up to reuse freed memory, and says so on
  stderr where it cannot."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes, and more
  from llama_jax.errors import ConfigError, StopRun
  # Before distributed.initialize_from_flags, which starts JAX and its threads (see reuse_freed_memory).
  if _REUSE_FREED_MEMORY.value and not reuse_freed_memory():
    print("warning: malloc cannot be told to reuse freed memory here (not glibc, or mallopt refused): "
          "each step's host buffers are mapped and faulted in afresh", file=sys.stderr, flush=True)
  try:
    distributed.initialize_from_flags()
    return fn()
  except (ConfigError, FileNotFoundError, StopRun) as e:
    sys.stdout.flush()
    sys.stderr.flush()
    # Background threads of orbax and tensorstore (a failed restore's, say) print their own
    # tracebacks while the process ends: stderr goes to /dev/null first, so the one line stays
    # the last. Not sys.exit, which would wait for those threads.
    line_fd = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(line_fd, f"error: {e}\n".encode())
    os._exit(1)


def main(main_fn):
  app.run(main_fn, flags_parser=parse_flags)
