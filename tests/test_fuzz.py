"""Arbitrary input to the corpus readers, the tokenizers and the packing pipeline (hypothesis).

Every input either gives what the reader / pipeline promises (checked here: valid Unicode
documents, skipped ones counted, batch shapes, segments, weights within a segment, every
chunk of every document once in an eval pass) or raises one ConfigError / DataError; nothing
hangs (a SIGALRM watchdog turns a wait into a failure) and no other exception escapes.
Derandomized, so CI sees the same examples every run.
"""

import contextlib
import json
import os
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import corpus as corpus_lib, data as data_lib
from llama_jax import tokenizer as tok_lib
from llama_jax.errors import ConfigError, DataError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TOK = ByteTokenizer()
T, B = 8, 2  # short rows: most documents are cut into chunks

# Strings with what breaks readers: lone surrogates, NUL, newlines, U+2581, non-BMP characters.
# (st.text never yields a surrogate, so the strings are joined from characters here.)
TEXT = st.lists(st.one_of(st.characters(codec="utf-8"), st.characters(categories=["Cs"]),
                          st.sampled_from(["\x00", "\n", "\r", "\u2581", " ", "😀"])), max_size=30).map("".join)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                          max_leaves=6)
JSONL_LINE = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),  # arbitrary bytes
    TEXT.map(lambda s: s.replace("\n", "").encode("utf-8", "surrogatepass")),  # arbitrary (even invalid) text
    JSON_VALUE.map(lambda v: json.dumps(v).encode()),  # any JSON value
    st.builds(lambda t, extra: json.dumps({"text": t, **extra}).encode(), TEXT,  # the field, any string
              st.dictionaries(st.sampled_from(["id", "meta"]), JSON_VALUE, max_size=2)),
    st.sampled_from([b"", b"  ", b"\r", b"{}", b'{"text": ""}', b'{"text": null}', b"[" * 5000 + b"]" * 5000]),
)


@contextlib.contextmanager
def _no_hang(seconds=20):
  """Fails (TimeoutError) instead of waiting forever."""
  def too_long(signum, frame):
    raise TimeoutError(f"no answer within {seconds} s")
  previous = signal.signal(signal.SIGALRM, too_long)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _valid(text):
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _read(spec, skip, **kwargs):
  """The documents of one pass in corpus order, the corpus, and the error if one was raised."""
  try:
    with _no_hang():
      corpus = corpus_lib.open_corpus(spec, skip_bad_documents=skip, **kwargs)
      # grain's map datasets pass a None (a blank or skipped document) on as no element at all
      return [d for d in corpus.documents(None) if d is not None], corpus, None
  except ConfigError as e:  # DataError included
    assert "\n" not in str(e)
    return None, None, e


def _check_documents(docs, corpus, error, expected, skip):
  """expected: per document, its text, None for a blank JSONL line, or False for an unreadable one."""
  usable = any(isinstance(e, str) and e for e in expected)
  if not usable:  # nothing to train on: stopped at open
    assert error is not None and corpus is None, "a corpus without a document with text was opened"
    return
  if error is not None:  # only an unreadable document stops a run, and only when not skipping
    assert isinstance(error, DataError) and not skip and False in expected, error
    return
  assert docs == [e for e in expected if isinstance(e, str)]
  assert all(_valid(d) for d in docs)
  assert corpus.skipped() == expected.count(False)


# ------------------------------------------------------------------ readers


@SETTINGS
@given(files=st.lists(st.binary(max_size=30), min_size=1, max_size=4), skip=st.booleans())
def test_text_files_of_any_bytes(files, skip):
  with tempfile.TemporaryDirectory() as d:
    expected = []
    for i, raw in enumerate(files):
      with open(os.path.join(d, f"{i}.txt"), "wb") as f:
        f.write(raw)
      try:
        expected.append(raw.decode("utf-8"))
      except UnicodeDecodeError:
        expected.append(False)
    _check_documents(*_read(f"text:{d}/*.txt", skip), expected, skip)


def _expected_jsonl(line: bytes):
  if not line.strip():
    return None
  try:
    record = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError):
    return False
  text = record.get("text") if isinstance(record, dict) else None
  return text if isinstance(text, str) and _valid(text) else False


@SETTINGS
@given(lines=st.lists(JSONL_LINE, min_size=0, max_size=6), skip=st.booleans(), last_newline=st.booleans())
def test_jsonl_lines_of_any_bytes_and_json(lines, skip, last_newline):
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "a.jsonl"), "wb") as f:
      f.write(b"\n".join(lines) + (b"\n" if last_newline and lines else b""))
    if lines == [b""] and not last_newline:  # a zero-byte file: no lines at all
      lines = []
    _check_documents(*_read(f"jsonl:{d}/a.jsonl", skip), [_expected_jsonl(x) for x in lines], skip)


@SETTINGS
@given(rows=st.lists(st.none() | st.text(max_size=30), min_size=1, max_size=8), skip=st.booleans())
def test_parquet_rows_of_any_strings(rows, skip):
  import pyarrow as pa
  import pyarrow.parquet as pq
  with tempfile.TemporaryDirectory() as d:
    pq.write_table(pa.table({"body": pa.array(rows, pa.string())}), os.path.join(d, "a.parquet"), row_group_size=3)
    _check_documents(*_read(f"parquet:{d}/a.parquet#body", skip), [False if r is None else r for r in rows], skip)


# ------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  return tok_lib.train_sentencepiece(tok_lib.training_lines(corpus_lib.shakespeare_plays("train")[:2]), 320, path)


@settings(SETTINGS, max_examples=300)
@given(text=TEXT | st.text(max_size=200))
def test_the_trained_tokenizer_on_any_text(trained_tokenizer, text):
  tok = trained_tokenizer
  if not _valid(text):
    with pytest.raises(ConfigError, match="not valid Unicode"):
      tok.encode(text)
    return
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text.replace("\u2581", " ")


# ------------------------------------------------------------------ packing


def _chunks_of(docs):
  """Every chunk [BOS] doc [EOS] is cut into (T + 1 tokens, overlapping by one), as a multiset."""
  chunks = []
  for d in docs:
    ids = [TOK.bos_id] + TOK.encode(d) + [TOK.eos_id]
    chunks += [tuple(ids[s:s + T + 1]) for s in range(0, len(ids) - 1, T)]
  return sorted(chunks)


def _segments(batch):
  """The chunk of each (row, segment) of a batch: its inputs, and its last target where the
  chunk runs on to the row's last token (which only the targets show)."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in sorted(set(seg[seg > 0].tolist())):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))), "a segment is not contiguous"
      assert np.array_equal(batch["positions"][r][idx], np.arange(len(idx))), "positions do not restart at 0"
      weights = batch["weights"][r][idx]
      # the targets of a segment lie in it: all weighted but the last, which is weighted only
      # when the segment goes on past the row's end (the chunk's next token is its target)
      assert np.all(weights[:-1] == 1)
      last = (int(batch["targets"][r][idx[-1]]),) if weights[-1] else ()
      assert not weights[-1] or idx[-1] == T - 1, "a weighted target outside its segment"
      out.append(tuple(batch["inputs"][r][idx].tolist()) + last)
    assert np.all(batch["weights"][r][seg == 0] == 0) and np.all(batch["inputs"][r][seg == 0] == 0)
  return out


def _check_batch(batch, rows):
  assert set(batch) >= {"inputs", "targets", "weights", "positions", "segment_ids"}
  for v in batch.values():
    assert v.shape == (rows, T) and v.dtype == np.int32
  assert set(np.unique(batch["weights"]).tolist()) <= {0, 1}
  # a weight counts a target of the same document as its input
  assert np.all(batch["weights"] <= (batch["segment_ids"] > 0))


DOCS = st.lists(st.one_of(st.text(max_size=40), st.text(st.sampled_from("ab \n\u2581é😀"), max_size=60)),
                min_size=1, max_size=8)


def _write_docs(d, docs):
  with open(os.path.join(d, "a.jsonl"), "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}) + "\n")
  return f"jsonl:{d}/a.jsonl"


def _config(**overrides):
  c = tiny_test_config().data
  c.seq_len, c.batch_size, c.pack_bins, c.shuffle_window, c.read_threads = T, B, 2, 4, 1
  for k, v in overrides.items():
    c[k] = v
  return c


def _open(spec, **kwargs):
  """(corpus, None), or (None, the one-line ConfigError) where open_corpus refuses `spec`."""
  try:
    return corpus_lib.open_corpus(spec, **kwargs), None
  except ConfigError as e:
    return None, str(e)


@SETTINGS
@given(docs=DOCS, seed=st.integers(0, 3))
def test_training_batches_of_any_documents(docs, seed):
  with tempfile.TemporaryDirectory() as d:
    corpus, error = _open(_write_docs(d, docs))
    if corpus is None:
      assert not any(docs) and "has no documents with text" in error
      return
    expected = set(_chunks_of(docs))
    batches = iter(data_lib.train_batches(corpus, TOK, _config(shuffle_seed=seed)))
    try:
      with _no_hang():
        for _ in range(3):
          batch = next(batches)
          _check_batch(batch, B)
          for chunk in _segments(batch):
            assert chunk in expected, chunk
    finally:
      batches.close()


@SETTINGS
@given(docs=DOCS, rows=st.integers(1, 3))
def test_an_eval_pass_scores_every_chunk_of_every_document_once(docs, rows):
  with tempfile.TemporaryDirectory() as d:
    corpus, _ = _open(_write_docs(d, docs))
    if corpus is None:
      assert not any(docs)
      return
    chunks, num_bytes = [], 0
    with _no_hang():
      for batch in data_lib.eval_batches(corpus, TOK, _config(), rows):
        _check_batch(batch, rows)
        chunks += _segments(batch)
        num_bytes += int(batch["num_bytes"].sum())
    assert sorted(chunks) == _chunks_of(docs)
    assert num_bytes == sum(len(doc.encode("utf-8")) for doc in docs)


@SETTINGS
@given(lines=st.lists(st.one_of(DOCS.map(lambda docs: json.dumps({"text": docs[0]}).encode()), JSONL_LINE),
                      min_size=1, max_size=8))
def test_an_eval_pass_over_any_lines_scores_the_readable_and_counts_the_rest(lines):
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "a.jsonl"), "wb") as f:
      f.write(b"\n".join(lines) + b"\n")
    expected = [_expected_jsonl(x) for x in lines]
    corpus, _ = _open(f"jsonl:{d}/a.jsonl", skip_bad_documents=True)
    if corpus is None:
      assert not any(isinstance(e, str) and e for e in expected)
      return
    chunks = []
    with _no_hang():
      for batch in data_lib.eval_batches(corpus, TOK, _config(), 2):
        _check_batch(batch, 2)
        chunks += _segments(batch)
    docs = [e for e in expected if isinstance(e, str)]
    assert sorted(chunks) == _chunks_of(docs)
    assert corpus.skipped() == expected.count(False)  # every unreadable line counted, once per pass


def _sft_chunk(prompt, response, overlong):
  """[BOS] prompt response [EOS] fitted to a row as data.sft_overlong says (written out here), or None."""
  p, r = TOK.encode(prompt), TOK.encode(response)
  excess = len(p) + len(r) + 2 - (T + 1)
  if excess > 0 and (overlong == "skip" or excess > len(p)):
    return None
  return tuple([TOK.bos_id] + p[max(excess, 0):] + r + [TOK.eos_id]), tuple(r + [TOK.eos_id])


@SETTINGS
@given(pairs=st.lists(st.tuples(st.text("ab é", max_size=8), st.text("xy😀", max_size=6)), min_size=1, max_size=6),
       overlong=st.sampled_from(data_lib.SFT_OVERLONG))
def test_sft_batches_of_any_pairs_weigh_only_the_response(pairs, overlong):
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "a.jsonl"), "w", encoding="utf-8") as f:
      for prompt, response in pairs:
        f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    corpus = corpus_lib.open_corpus(f"jsonl:{d}/a.jsonl", pair_fields=("prompt", "response"))
    expected = {c for c in (_sft_chunk(p, r, overlong) for p, r in pairs) if c}
    config = _config(format="sft", sft_overlong=overlong, shuffle_seed=1)
    if not expected:
      with pytest.raises(ConfigError, match="has no pairs that fit a row"):
        data_lib.train_batches(corpus, TOK, config)
      return
    batches = iter(data_lib.train_batches(corpus, TOK, config))
    try:
      with _no_hang():
        for _ in range(3):
          batch = next(batches)
          _check_batch(batch, B)
          for r in range(B):
            seg = batch["segment_ids"][r]
            for s in set(seg[seg > 0].tolist()):
              idx = np.flatnonzero(seg == s)
              assert np.array_equal(batch["positions"][r][idx], np.arange(len(idx)))
              w, targets = batch["weights"][r][idx], batch["targets"][r][idx]
              chunk = tuple(batch["inputs"][r][idx].tolist()) + ((int(targets[-1]),) if w[-1] else ())
              assert (chunk, tuple(targets[w == 1].tolist())) in expected  # a whole pair; weights on its answer
    finally:
      batches.close()
