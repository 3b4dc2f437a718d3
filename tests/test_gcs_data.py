"""Corpora on object storage (gs://, the local GCS server of conftest.py): the same documents and batches
as the same files on a local disk, exact resume and per-process shares over gs://, one line for a
bucket or glob that names nothing, and `python -m llama_jax.data` on a gs:// workdir."""

import json
import os
import subprocess
import sys

import fsspec
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import ByteTokenizer
from test_data import ROOT, TinyPlays, _data_config, _documents, _write_jsonl
from llama_jax import corpus as corpus_lib, data as data_lib, paths
from llama_jax.errors import ConfigError

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpora(gcs_server, tmp_path_factory):
  """One small corpus of each kind written locally, then the same files uploaded to a bucket: specs
  {kind: (local spec, gs:// spec)} and the two tfds data_dirs."""
  root = tmp_path_factory.mktemp("gcs_corpora")
  rng = np.random.default_rng(1)
  _write_jsonl(root / "jsonl", _documents(rng, 240, "j"))  # an epoch longer than the reads of a test
  os.makedirs(root / "text")
  for i, d in enumerate(_documents(rng, 12, "t")):
    (root / "text" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
  TinyPlays.SOURCE_DIR = str(root / "text")
  TinyPlays(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(root / "parquet")
  parquet_docs = _documents(rng, 30, "p")
  for f in range(3):
    pq.write_table(pa.table({"content": parquet_docs[f * 10:(f + 1) * 10]}), root / "parquet" / f"{f}.parquet",
                   row_group_size=4)
  bucket = gcs_server.make_bucket("corpora-" + os.urandom(4).hex())
  fsspec.filesystem("gs").put(str(root), f"{bucket}/c", recursive=True)
  patterns = {"jsonl": "jsonl/*.jsonl", "text": "text/*.txt", "parquet": "parquet/*.parquet#content"}
  specs = {k: (f"{k}:{root}/{p}", f"{k}:{bucket}/c/{p}") for k, p in patterns.items()}
  specs["tfds"] = ("tfds:tiny_plays@train#body",) * 2  # local or gs:// by its data_dir
  return {"specs": specs, "tfds_data_dir": (str(root / "tfds"), f"{bucket}/c/tfds"), "url": gcs_server.url}


@pytest.fixture
def array_record_on_gcs(corpora, monkeypatch):
  """array_record's own GCS client pointed at the local server (it reads CLOUD_STORAGE_EMULATOR_ENDPOINT)."""
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", corpora["url"])


def _open(corpora, spec, where):
  """The corpus `spec` with the tfds data_dir of `where` (0: local, 1: gs://)."""
  return corpus_lib.open_corpus(spec, tfds_data_dir=corpora["tfds_data_dir"][where])


def _mix(corpora, where):
  specs = corpora["specs"]
  return f"mix:{specs['jsonl'][where]}=2,{specs['tfds'][where]}=1"


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      assert x[key].tobytes() == y[key].tobytes(), key


class _ReadLog:
  """Records every GET of object data that gcsfs sends (bucket/object, first byte, end), however it
  was asked for: a ranged read, an open file's read, a whole-object read (None, None)."""

  def __init__(self, monkeypatch):
    import gcsfs
    self.ranges = []
    get = gcsfs.GCSFileSystem._cat_file_sequential

    async def logged(fs, path, start=None, end=None, **kwargs):
      self.ranges.append((fs._strip_protocol(path), start, end))
      return await get(fs, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_cat_file_sequential", logged)


def _line_ranges(jsonl) -> list[tuple[str, int, int]]:
  """(bucket/object, start, end) of every line of a JsonlLines source on gs://, in its global line order."""
  return [(path.removeprefix("gs://"), int(o[i]), int(o[i + 1])) for path, o in zip(jsonl._paths, jsonl._offsets)
          for i in range(len(o) - 1)]


def test_a_jsonl_and_tfds_mixture_on_gcs_resumes_exactly_each_process_reading_only_its_share(
    corpora, array_record_on_gcs, monkeypatch):
  k, n, config = 4, 4, _data_config()
  log = _ReadLog(monkeypatch)
  for p in range(2):
    local = _take(iter(data_lib.train_batches(_open(corpora, _mix(corpora, 0), 0), TOK, config, p, 2)), k + n)
    corpus = _open(corpora, _mix(corpora, 1), 1)
    log.ranges.clear()  # from here on: the documents this process reads
    straight = iter(data_lib.train_batches(corpus, TOK, config, p, 2))
    first = _take(straight, k)
    state = json.dumps(straight.get_state())  # what a checkpoint keeps of the stream
    rest = _take(straight, n)
    _assert_same_batches(first + rest, local)  # gs:// gives what the same files give on a local disk

    # It read whole lines of its own share, every other document of the global order (two processes
    # read disjoint shares), one ranged read each, and nothing else (no file read whole).
    lines = _line_ranges(corpus.components[0].source)
    order = grain.MapDataset.range(len(lines)).shuffle(seed=corpus_lib._component_seed(config.shuffle_seed, 0))
    share = {lines[order[j]] for j in range(p, len(lines), 2)}
    assert len(log.ranges) >= 10 and set(log.ranges) <= share

    resumed = iter(data_lib.train_batches(_open(corpora, _mix(corpora, 1), 1), TOK, config, p, 2))
    resumed.set_state(json.loads(state))
    _assert_same_batches(_take(resumed, n), rest)


def test_a_jsonl_file_on_gcs_is_indexed_block_by_block_with_ranged_reads(corpora, monkeypatch):
  local_spec, gs_spec = corpora["specs"]["jsonl"]
  monkeypatch.setattr(corpus_lib, "REMOTE_BLOCK_BYTES", 1000)  # a file here holds ~5 KB: several blocks each
  log = _ReadLog(monkeypatch)
  remote = _open(corpora, gs_spec, 1)
  local = _open(corpora, local_spec, 0)
  index_reads = [r for r in log.ranges if r[0].endswith(".jsonl")]
  assert len(index_reads) > 3 * len(remote.source._paths)
  assert all(start is not None and 0 < end - start <= 1000 for _, start, end in index_reads)
  for a, b in zip(remote.source._offsets, local.source._offsets, strict=True):
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("kind", ["text", "parquet", "jsonl"])
def test_text_parquet_and_jsonl_on_gcs_give_the_documents_of_the_same_files_on_disk(corpora, kind, monkeypatch):
  monkeypatch.setattr(corpus_lib, "PARQUET_SHUFFLE_WINDOW", 16)  # not 333 epochs of 30 rows before the first
  local_spec, gs_spec = corpora["specs"][kind]
  local, remote = _open(corpora, local_spec, 0), _open(corpora, gs_spec, 1)
  assert list(remote.documents(None)) == list(local.documents(None))
  for p in range(2):
    a, b = iter(local.documents(seed=3, shard_index=p, shard_count=2)), iter(remote.documents(3, p, 2))
    assert _take(b, 25) == _take(a, 25)


def test_a_gcs_bucket_or_glob_that_names_nothing_is_one_line_naming_the_key(corpora, gcs_bucket):
  missing = "gs://no-such-bucket-" + os.urandom(4).hex()
  cases = {
      ("train_corpus", f"jsonl:{missing}/web/*.jsonl"): f"config.data.train_corpus={missing}/web/*.jsonl: bucket "
                                                        f"{missing} does not exist",
      ("train_corpus", f"text:{gcs_bucket}/nothing/*.txt"): "config.data.train_corpus: no files match",
      ("eval_corpus", f"parquet:{gcs_bucket}/x/*.parquet#text"): "config.data.eval_corpus: no files match",
      ("train_corpus", f"mix:{corpora['specs']['jsonl'][1]}=1,text:{missing}/*.txt=1"):
          "config.data.train_corpus mix part=",
  }
  for (key, spec), message in cases.items():
    with pytest.raises(ConfigError) as e:
      data_lib.open_corpus(_data_config(**{key: spec}), key)
    assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
  with pytest.raises(ConfigError) as e:
    data_lib.open_corpus(_data_config(train_corpus="tfds:tiny_plays@train#body", tfds_data_dir=f"{missing}/tfds"),
                         "train_corpus")
  assert f"config.data.tfds_data_dir={missing}/tfds: bucket {missing} does not exist" in str(e.value)


def test_tfds_on_gcs_without_the_emulator_variable_of_array_record_is_one_line(corpora, monkeypatch):
  monkeypatch.delenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", raising=False)
  with pytest.raises(ConfigError, match="CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    _open(corpora, corpora["specs"]["tfds"][1], 1)


def test_inspect_a_gcs_corpus_with_a_gcs_workdir_from_the_command_line(corpora, gcs_bucket, tmp_path):
  from llama_jax import tokenizer as tok_lib
  tok = tok_lib.train_sentencepiece(tok_lib.training_lines(corpus_lib.shakespeare_plays("train")[:1]), 320,
                                    str(tmp_path / "tok.model"))
  paths.copy(tok.path, f"{gcs_bucket}/run/tokenizer.model")
  proc = subprocess.run(
      [sys.executable, "-m", "llama_jax.data", "--config", "configs/tiny.py", "--workdir", f"{gcs_bucket}/run",
       "--show", "1", "--stats", "2", f"--config.data.train_corpus={corpora['specs']['jsonl'][1]}",
       "--config.data.seq_len=32", "--config.data.shuffle_window=16"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- row 0:" in proc.stdout and "2 batches of 8 rows" in proc.stdout
