"""Paths that may be local or on object storage (`gs://bucket/...`): the one path layer of the project.

Every path a user gives (a workdir, a corpus, a tokenizer, an HF directory, a plot) is a string that
goes through this module to be read, written, listed or globbed; no other module calls `os.path`,
`open` or `glob` on it.

Built on `etils.epath`, because orbax (our checkpoints) and tfds (our `tfds:` corpora) already use it:
one layer then covers our files and theirs, a local path behaves as `pathlib.Path`, and `gs://` goes
through fsspec + gcsfs (no TensorFlow needed). What epath does not expose, ranged reads, globbing
with `**`, append, is taken from the same fsspec filesystem (`filesystem`).

Object storage semantics that the callers rely on:
- An object is written whole or not at all (a GCS upload is atomic), so `write_atomic` needs no
  temporary object on `gs://`; on a local disk it writes a temporary sibling and renames it.
- There is no append: `append` on `gs://` uploads the new bytes as a temporary object and composes
  the file with it (GCS `compose`, atomic, server-side: only the new bytes travel).
- There are no directories: a "directory" exists when an object has its name as a prefix, and a
  rename is a copy and a delete (not atomic): nothing here renames on `gs://` where atomicity matters.

Retries are the client libraries', not ours: gcsfs retries an HTTP request that fails with a
connection error, a timeout, 429 or 5xx up to `GCSFileSystem.retries` = 6 times with exponential
backoff (1, 2, 4, 8, 16 s, plus jitter; gcsfs/retry.py), and tensorstore (orbax's array writes)
retries by its own `gcs_request_retries` context defaults. A request that still fails raises
(`OSError` or the library's error), which the callers name in one line.

Test against a local GCS API server (tests/gcs_server.py): `STORAGE_EMULATOR_HOST` points gcsfs at
it and `TENSORSTORE_GCS_HTTP_URL` points tensorstore at it.
"""

import glob as glob_lib
import os
import re
import threading
import uuid

from etils import epath

from llama_jax import errors
from llama_jax.errors import ConfigError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://...`, any `scheme://`) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


def normalize(path) -> str:
  """The path as the project keeps it: a URL as given (without a trailing '/'), a local path with
  `~` expanded and made absolute."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(os.path.expanduser(path))


def join(base, *names) -> str:
  """`base/name/...`: a URL keeps '/' separators, a local path uses os.path.join."""
  base = os.fspath(base)
  if is_remote(base):
    return "/".join([base.rstrip("/"), *[str(n).strip("/") for n in names]])
  return os.path.join(base, *names)


def parent(path) -> str:
  """The directory that holds `path` (for a URL: the prefix before its last '/')."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/").rsplit("/", 1)[0]
  return os.path.dirname(os.path.abspath(os.path.expanduser(path)))


def name(path) -> str:
  """The last component of `path`."""
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def as_path(path) -> epath.Path:
  return epath.Path(normalize(path))


def exists(path) -> bool:
  return as_path(path).exists()


def isdir(path) -> bool:
  return as_path(path).is_dir()


def isfile(path) -> bool:
  """Whether `path` is a regular file (locally: not a directory, FIFO or socket) or an object."""
  if not is_remote(path):
    return os.path.isfile(normalize(path))
  return as_path(path).is_file()


def listdir(path) -> list[str]:
  """The names directly under `path` (empty if it is not a directory)."""
  p = as_path(path)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


def makedirs(path):
  """Makes `path` and its parents (on object storage directories are implicit: nothing to do)."""
  if not is_remote(path):
    os.makedirs(normalize(path), exist_ok=True)


def size(path) -> int:
  """Bytes in the file at `path`."""
  if is_remote(path):
    return int(filesystem(path).size(normalize(path)))
  return os.path.getsize(normalize(path))


def open(path, mode="r", **kwargs):  # noqa: A001  (the module's `open`, as io.open)
  """Opens `path` like the built-in `open` (text or binary, "r", "w", "rb", "wb")."""
  return as_path(path).open(mode, **kwargs)


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def read_text(path, encoding="utf-8") -> str:
  return as_path(path).read_text(encoding=encoding)


def write_atomic(path, data: bytes | str):
  """Writes `data` to `path` so that a reader sees the old file or the whole new one, never a part:
  one upload on object storage, a temporary sibling renamed over it on a local disk."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    as_path(path).write_bytes(raw)
    return
  path = normalize(path)
  tmp = join(parent(path), f".{name(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def copy(src, dst):
  """Copies the file `src` to `dst` whole (write_atomic of its bytes): for small files (a tokenizer)."""
  write_atomic(dst, read_bytes(src))


def append(path, data: bytes | str):
  """Adds `data` at the end of the file `path` (made if missing).

  On `gs://` the new bytes go up as a temporary object that GCS composes onto the file (compose is
  atomic: a reader sees the file before or after, whole), then the temporary object is deleted.
  Only one writer may append to a file at a time (two composes could each drop the other's part),
  and a compose that gcsfs retries after its first answer was lost adds the bytes twice.
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if not is_remote(path):
    with open(path, "ab") as f:
      f.write(raw)
    return
  path = normalize(path)
  fs = filesystem(path)
  if not fs.exists(path):
    fs.pipe_file(path, raw)
    return
  part = join(parent(path), f".{name(path)}.append-{uuid.uuid4().hex}")
  fs.pipe_file(part, raw)
  try:
    fs.merge(path, [path, part])
  finally:
    try:
      fs.rm_file(part)
    except FileNotFoundError:  # a delete retried after its first answer was lost
      pass


def remove(path):
  """Deletes the file or directory tree at `path` (nothing if it does not exist)."""
  p = as_path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def move(src, dst):
  """Moves the file or directory tree `src` to `dst` (on object storage: copy, then delete; not atomic)."""
  if is_remote(src):
    fs = filesystem(src)
    fs.copy(normalize(src), normalize(dst), recursive=True)
    fs.rm(normalize(src), recursive=True)
  else:
    os.replace(normalize(src), normalize(dst))


def glob(pattern: str) -> list[str]:
  """The paths matching `pattern` (`*`, `?`, `[...]`, and `**` for any depth), sorted; a local
  pattern has `~` expanded. Files and directories both; callers keep what they need."""
  if is_remote(pattern):
    fs = filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    found = fs.glob(pattern)
    return sorted(p if is_remote(p) else f"{scheme}://{p}" for p in found)
  return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))


def filesystem(path):
  """The fsspec filesystem of a URL (gcsfs for `gs://`), for ranged reads and object-store calls."""
  import fsspec  # noqa: PLC0415  (local paths never need it)
  return fsspec.filesystem(os.fspath(path).split("://", 1)[0])


def bucket(path) -> str | None:
  """The bucket of an object-store URL (`gs://bucket/...` -> 'bucket'); None for a local path."""
  if not is_remote(path):
    return None
  return os.fspath(path).split("://", 1)[1].split("/", 1)[0]


def check_bucket(path, key: str):
  """Raises ConfigError naming `key` when `path` is on object storage and its bucket does not exist
  or cannot be reached (after the client's retries). A local path passes."""
  if not is_remote(path):
    return
  b = bucket(path)
  scheme = os.fspath(path).split("://", 1)[0]
  try:
    found = filesystem(path).exists(f"{scheme}://{b}")
  except Exception as e:  # noqa: BLE001  (no server, no credentials: the client says which)
    reason = errors.first_line(e)
    raise ConfigError(f"{key}={path}: cannot reach bucket {scheme}://{b}: {reason}") from None
  if not found:
    raise ConfigError(f"{key}={path}: bucket {scheme}://{b} does not exist (or these credentials cannot see it)")


def check_output_file(path, flag: str):
  """Raises ConfigError naming `flag` unless a file can be written at `path`: it must not be a
  directory, and its parent directory must exist (a local path) or its bucket must (object storage,
  where directories are implicit)."""
  if is_remote(path):
    check_bucket(path, flag)
  if isdir(path):
    raise ConfigError(f"{flag} {path} is a directory; give a file name")
  if not is_remote(path) and not isdir(parent(path)):
    raise ConfigError(f"{flag} {path}: directory {parent(path)} does not exist")


class RangeReader:
  """Byte ranges of one file, read safely from many threads at once: `os.pread` on one descriptor of
  a local file (opened at the first read, kept open), one ranged GET (`cat_file`) per read on object
  storage. Pickles without its descriptor: a copy in another process opens its own."""

  def __init__(self, path):
    self.path = normalize(path)
    self._fd = None
    self._lock = threading.Lock()

  def read(self, start: int, end: int) -> bytes:
    """Bytes [start, end) of the file (fewer where it ends sooner)."""
    if is_remote(self.path):
      return filesystem(self.path).cat_file(self.path, start, end)
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    return os.pread(self._fd, end - start, start)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])
