"""The streamed pipeline: packing and document masks, exact resume, hosts, sources, mixtures, bad input."""

import collections
import json
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import checkpoint as ckpt_lib
from llama_jax import config_lib, corpus as corpus_lib, data as data_lib, model as model_lib
from llama_jax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 32  # seq_len of tiny_test_config


TOK = ByteTokenizer()


def _data_config(**overrides):
  c = tiny_test_config().data
  c.pack_bins, c.shuffle_window = 8, 16
  for k, v in overrides.items():
    c[k] = v
  return c


def _documents(rng, n, prefix):
  """n documents of 1 to 120 characters (a row holds 31 bytes, so many are chunked)."""
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz  \né"))
  return [f"{prefix}{i}:" + "".join(rng.choice(letters, rng.integers(1, 120))) for i in range(n)]


def _write_jsonl(directory, docs, files=3, field="text"):
  os.makedirs(directory, exist_ok=True)
  for f in range(files):
    with open(os.path.join(directory, f"part{f}.jsonl"), "w", encoding="utf-8") as out:
      for d in docs[f::files]:
        out.write(json.dumps({field: d, "other": 1}) + "\n")
  return [d for f in range(files) for d in docs[f::files]]  # in corpus order


class TinyPlays(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset over local text: prepared offline, read back without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE_DIR = None  # set by the test: one document per *.txt file there

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"body": tfds.features.Text(), "id": tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, name in enumerate(sorted(os.listdir(self.SOURCE_DIR))):
      with open(os.path.join(self.SOURCE_DIR, name), encoding="utf-8") as f:
        yield name, {"body": f.read(), "id": i}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Specs of one small corpus per kind, and each one's documents in corpus order."""
  root = tmp_path_factory.mktemp("corpora")
  rng = np.random.default_rng(0)
  jsonl_docs = _write_jsonl(root / "jsonl", _documents(rng, 60, "j"))
  text_docs = _documents(rng, 20, "t")
  os.makedirs(root / "text")
  for i, d in enumerate(text_docs):
    (root / "text" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
  TinyPlays.SOURCE_DIR = str(root / "text")
  TinyPlays(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  import pyarrow as pa
  import pyarrow.parquet as pq
  parquet_docs = _documents(rng, 40, "p")
  os.makedirs(root / "parquet")
  for f in range(4):
    pq.write_table(pa.table({"content": parquet_docs[f * 10:(f + 1) * 10]}), root / "parquet" / f"{f}.parquet",
                   row_group_size=4)
  return {
      "jsonl": (f"jsonl:{root}/jsonl/*.jsonl", jsonl_docs),
      "text": (f"text:{root}/text/*.txt", text_docs),
      "tfds": ("tfds:tiny_plays@train#body", None),  # in the order TFDS wrote them
      "parquet": (f"parquet:{root}/parquet/*.parquet#content", parquet_docs),
      "tfds_data_dir": str(root / "tfds"),
  }


def _open(sources, spec, **kwargs):
  return corpus_lib.open_corpus(spec, tfds_data_dir=sources["tfds_data_dir"], **kwargs)


def _expected_chunks(docs):
  """[BOS] doc [EOS] cut into pieces of T + 1 tokens starting every T tokens (written out here)."""
  chunks = []
  for d in docs:
    ids = [1] + [b + 3 for b in d.encode("utf-8")] + [2]
    chunks += [tuple(ids[s:s + T + 1]) for s in range(0, len(ids) - 1, T)]
  return chunks


# ------------------------------------------------------------------ packing


def test_every_packed_segment_is_one_chunk_of_one_document_with_arange_positions(sources):
  spec, docs = sources["jsonl"]
  rows = data_lib.packed_rows(_open(sources, spec).documents(None), TOK, T, read_threads=2, pack_bins=4)
  segments = []
  for row in rows:
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    assert len(tokens) == T + 1
    assert np.all(tokens[seg == 0] == 0)
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment is not contiguous"
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      segments.append(tuple(tokens[idx].tolist()))
  assert collections.Counter(segments) == collections.Counter(_expected_chunks(docs))


def test_batches_score_every_target_once_and_nothing_across_documents(sources):
  spec, docs = sources["jsonl"]
  batches = list(data_lib.eval_batches(_open(sources, spec), TOK, _data_config(), batch_size=4))
  n_targets = sum(len(d.encode("utf-8")) + 1 for d in docs)  # the bytes and EOS of each document
  assert sum(int(b["weights"].sum()) for b in batches) == n_targets
  assert sum(int(b["num_bytes"].sum()) for b in batches) == sum(len(d.encode("utf-8")) for d in docs)
  for b in batches:
    assert b["inputs"].shape == (4, T)
    seg = b["segment_ids"]
    counted = b["weights"] == 1
    # A counted target is the next token of the same document; never BOS, never padding.
    assert np.all(seg[counted] > 0) and np.all(b["targets"][counted] != TOK.bos_id)
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    crossing = (seg[:, :-1] != seg[:, 1:])
    assert not np.any(counted[:, :-1] & crossing)


@pytest.mark.parametrize("blocks", [512, 8])  # the row in one block; 4 x 4 blocks of 8
def test_packed_row_logits_equal_each_document_alone(blocks):
  config = config_lib.llama_config(tiny_test_config(**{"model.attention": "xla", "model.attention_block_q": blocks,
                                                       "model.attention_block_kv": blocks}).model)
  model = model_lib.init_model(config, seed=0)
  rng = np.random.default_rng(1)
  lengths = [9, 14, 6]  # + 3 padding = T
  docs = [rng.integers(3, config.vocab_size, n).astype(np.int32) for n in lengths]
  tokens = np.zeros(T, np.int32)
  seg = np.zeros(T, np.int32)
  pos = np.zeros(T, np.int32)
  start = 0
  for s, d in enumerate(docs, 1):
    tokens[start:start + len(d)], seg[start:start + len(d)], pos[start:start + len(d)] = d, s, np.arange(len(d))
    start += len(d)
  forward = jax.jit(lambda m, *args: m(*args))  # a compile per shape, not one per op as an eager call makes
  packed = np.asarray(forward(model, tokens[None], pos[None], seg[None]))[0]
  start = 0
  for d in docs:
    alone = np.asarray(forward(model, d[None]))[0]
    np.testing.assert_allclose(packed[start:start + len(d)], alone, atol=1e-5, rtol=1e-5)
    start += len(d)

  changed = tokens.copy()
  changed[9:23] = rng.integers(3, config.vocab_size, 14)  # the second document only
  repacked = np.asarray(forward(model, changed[None], pos[None], seg[None]))[0]
  np.testing.assert_array_equal(repacked[:9], packed[:9])
  np.testing.assert_array_equal(repacked[23:29], packed[23:29])
  assert not np.allclose(repacked[9:23], packed[9:23])


# ------------------------------------------------------------------ hosts and mixtures


def test_two_processes_read_disjoint_shares_covering_an_epoch(sources):
  spec, docs = sources["jsonl"]
  corpus = _open(sources, spec)
  shares = []
  for p in range(2):
    it = iter(corpus.documents(seed=3, shard_index=p, shard_count=2))
    shares.append([next(it) for _ in range(len(docs) // 2)])  # half an epoch of the global order each
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(docs)
  assert shares[0] != docs[0::2]  # shuffled, not the corpus order


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "text"])
def test_two_processes_evaluate_disjoint_shares_covering_the_corpus(sources, kind):
  spec, docs = sources[kind]
  shares = [list(_open(sources, spec).documents(None, p, 2)) for p in range(2)]
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(docs)


def test_each_epoch_has_a_new_order(sources):
  spec, docs = sources["jsonl"]
  it = iter(_open(sources, spec).documents(seed=0))
  epochs = [[next(it) for _ in docs] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(docs)
  assert epochs[0] != epochs[1]


@pytest.mark.parametrize("second", ["jsonl", "parquet"])
def test_mixture_proportions_follow_the_weights(sources, tmp_path, second):
  other = _write_jsonl(tmp_path / "b", _documents(np.random.default_rng(5), 30, "b"), files=1)
  assert other
  spec_b = f"jsonl:{tmp_path}/b/*.jsonl" if second == "jsonl" else sources["parquet"][0]
  mix = _open(sources, f"mix:{sources['jsonl'][0]}=0.7,{spec_b}=0.3")
  it = iter(mix.documents(seed=0))
  first = [next(it) for _ in range(10_000)]
  share = sum(d.startswith("j") for d in first) / len(first)
  assert abs(share - 0.7) < 0.02


# ------------------------------------------------------------------ exact resume in a new process


_RESUME_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
from conftest import ByteTokenizer
from test_data import _data_config
from llama_jax import checkpoint as ckpt_lib, corpus as corpus_lib, data as data_lib
for name, spec in {specs!r}.items():
  corpus = corpus_lib.open_corpus(spec, tfds_data_dir={data_dir!r})
  it = data_lib.process_batches(corpus, ByteTokenizer(), _data_config(), 1)
  ck = ckpt_lib.Checkpointer({workdir!r} + "/" + name, read_only=True)
  ck.restore_data(ck.latest_step(), it)
  batches = [next(it) for _ in range({n})]
  it.close()
  np.savez({workdir!r} + "/" + name + ".npz", **{{f"{{i}}_{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
"""


def test_resume_in_a_new_process_continues_the_stream_exactly(sources, tmp_path):
  k, n = 5, 4
  specs = {kind: sources[kind][0] for kind in ("jsonl", "text", "tfds")}
  specs["mix"] = f"mix:{specs['jsonl']}=2,{specs['text']}=1,{specs['tfds']}=1"
  config = tiny_test_config()
  for name, spec in specs.items():
    straight = iter(data_lib.train_batches(_open(sources, spec), TOK, _data_config()))
    expected = [next(straight) for _ in range(k + n)][k:]
    np.savez(tmp_path / f"{name}_expected.npz",
             **{f"{i}_{key}": v for i, b in enumerate(expected) for key, v in b.items()})
    it = data_lib.process_batches(_open(sources, spec), TOK, _data_config(), 1)
    for _ in range(k):
      next(it)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / name), tiny_test_config(**{"train.async_checkpoint": True}).train)
    checkpointer.save(k, {"step": np.int32(k)}, config, it, {}, force=True)
    next(it)  # reading on while the save finishes must not move the saved position
    checkpointer.wait()
    checkpointer.close()
  script = _RESUME_SCRIPT.format(tests=os.path.dirname(__file__), specs=specs, n=n, workdir=str(tmp_path),
                                 data_dir=sources["tfds_data_dir"])
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in specs:
    expected, resumed = np.load(tmp_path / f"{name}_expected.npz"), np.load(tmp_path / f"{name}.npz")
    assert sorted(expected) == sorted(resumed)
    for key in expected:
      assert expected[key].tobytes() == resumed[key].tobytes(), (name, key)


# ------------------------------------------------------------------ TFDS


def test_train_on_a_tfds_dataset_prepared_offline(sources, tmp_path):
  from llama_jax import tokenizer as tok_lib, trainer
  tok = tok_lib.train_sentencepiece(tok_lib.training_lines(corpus_lib.shakespeare_plays("train")[:2]), 320,
                                    str(tmp_path / "tok.model"))
  config = tiny_test_config(**{"data.train_corpus": sources["tfds"][0], "data.eval_corpus": sources["text"][0],
                               "data.tfds_data_dir": sources["tfds_data_dir"], "data.tokenizer_path": tok.path,
                               "train.steps": 4, "train.checkpoint_every": 4})
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert np.isfinite(result["loss"])
  # Every token of every held-out document after its BOS, the EOS included.
  assert result["num_tokens"] == sum(len(tok.encode(d)) + 1 for d in sources["text"][1])


def test_tfds_mock_data_streams_through_the_pipeline(sources):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    corpus = _open(sources, "tfds:tiny_plays@train#body")
    docs = list(corpus.documents(None))
    assert len(docs) == 12 and all(isinstance(d, str) for d in docs)
    batch = next(iter(data_lib.train_batches(corpus, TOK, _data_config())))
  assert batch["weights"].sum() > 0


# ------------------------------------------------------------------ bad input


def test_bad_specs_name_the_culprit(sources, tmp_path):
  (tmp_path / "dirs" / "a").mkdir(parents=True)
  os.mkfifo(tmp_path / "fifo")
  cases = {
      f"text:{tmp_path}/none/*.txt": "no files match",
      f"text:{tmp_path}/dirs": r"dirs is a directory, not a regular file: use DIR/\*",
      f"jsonl:{tmp_path}/fifo": "fifo is a FIFO, not a regular file",
      f"text:{tmp_path}/dirs/*": "matches no regular files, only a directory",
      "tfds:wiki40b/en@train": "not prepared in",
      f"mix:{sources['jsonl'][0]}=0.5,{sources['text'][0]}=0": "needs a finite weight > 0",
      f"mix:{sources['jsonl'][0]}": "needs a finite weight > 0",
      f"mix:{sources['jsonl'][0]}=inf": "needs a finite weight > 0",
      f"mix:{sources['jsonl'][0]}=1e400": "needs a finite weight > 0",
      f"mix:{sources['jsonl'][0]}=nan": "needs a finite weight > 0",
      f"parquet:{tmp_path}/x.parquet": "name the text column",
      sources["parquet"][0].replace("#content", "#body"): "has no column 'body'",
      "tfds:tiny_plays@validation#body": "validation",
      "tfds:tiny_plays@train": "no feature 'text'",
      "books:x": "unknown corpus kind",
  }
  for spec, message in cases.items():
    with pytest.raises(ConfigError, match=message):
      _open(sources, spec, name="config.data.train_corpus")


def test_a_glob_leaves_out_directories_and_says_how_many(tmp_path, capsys):
  (tmp_path / "sub.txt").mkdir()
  (tmp_path / "a.txt").write_text("some text")
  corpus = corpus_lib.open_corpus(f"text:{tmp_path}/*.txt", name="config.data.train_corpus")
  assert list(corpus.documents(None)) == ["some text"]
  assert "also matches a directory" in capsys.readouterr().err


def _first_batch(spec, **kwargs):
  corpus = corpus_lib.open_corpus(spec, **kwargs)
  return next(iter(data_lib.train_batches(corpus, TOK, _data_config())))


def test_unreadable_documents_name_file_and_line_or_are_skipped_and_counted(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\nnot json\n{"text": "3"}\n')
  with pytest.raises(DataError, match=r"a\.jsonl:4: not JSON"):
    _first_batch(f"jsonl:{tmp_path}/a.jsonl")
  (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"body": "x"}\n')
  with pytest.raises(DataError, match=r"b\.jsonl:2: no string field 'text'"):
    _first_batch(f"jsonl:{tmp_path}/b.jsonl")
  (tmp_path / "c.txt").write_bytes(b"caf\xe9 latin-1")
  with pytest.raises(DataError, match=r"c\.txt: not UTF-8"):
    _first_batch(f"text:{tmp_path}/c.txt")

  corpus = corpus_lib.open_corpus(f"jsonl:{tmp_path}/[ab].jsonl", skip_bad_documents=True)
  assert sorted(d for d in corpus.documents(None) if d is not None) == ["3", "one", "one", "two"]
  assert corpus.skipped() == 2


def test_an_empty_eval_corpus_stops_before_training(tmp_path):
  from llama_jax import trainer
  (tmp_path / "empty.jsonl").write_text("\n\n")
  config = tiny_test_config(**{"data.eval_corpus": f"jsonl:{tmp_path}/empty.jsonl"})
  with pytest.raises(ConfigError, match=r"config.data.eval_corpus='jsonl:.*' has no documents with text: 2 lines, all blank"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_stream_definition_names_what_changes_the_order_and_nothing_else():
  saved = data_lib.stream_definition(_data_config(), 1)
  assert data_lib.stream_changes(saved, data_lib.stream_definition(_data_config(read_threads=7), 1)) == []
  changed = data_lib.stream_definition(_data_config(seq_len=16), 2)
  assert data_lib.stream_changes(saved, changed) == ["data.seq_len: 32 -> 16", "data.shards: 1 -> 2"]


def test_inspect_a_pipeline_from_the_command_line(tmp_path):
  from llama_jax import tokenizer as tok_lib
  tok = tok_lib.train_sentencepiece(tok_lib.training_lines(corpus_lib.shakespeare_plays("train")[:2]), 320,
                                    str(tmp_path / "tok.model"))
  proc = subprocess.run([sys.executable, "-m", "llama_jax.data", "--config=configs/tiny.py", "--show=2", "--stats=20",
                         f"--config.data.tokenizer_path={tok.path}", "--config.data.seq_len=64"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count("--- row ") == 2 and "[segment 1: positions 0.." in proc.stdout
  assert "20 batches of 8 rows" in proc.stdout and "tokens/s" in proc.stdout and "padding" in proc.stdout


# ------------------------------------------------------------------ corpora that cannot feed a run


@pytest.fixture(scope="module")
def tokenizer_320(tmp_path_factory):
  """A 320-piece tokenizer (tiny_test_config's vocabulary) trained on two plays."""
  from llama_jax import tokenizer as tok_lib
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  return tok_lib.train_sentencepiece(tok_lib.training_lines(corpus_lib.shakespeare_plays("train")[:2]), 320, path)


def _parquet(path, texts):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": pa.array(texts, pa.string())}), path)


@pytest.mark.parametrize("case", ["blank", "zero_bytes", "all_skipped", "mix_part", "empty_files", "parquet_nulls"])
def test_a_corpus_without_a_document_with_text_stops_at_open_naming_it_and_why(tmp_path, case):
  (tmp_path / "blank.jsonl").write_text("\n\n\n")
  (tmp_path / "zero.jsonl").write_bytes(b"")
  (tmp_path / "bad.jsonl").write_text('nope\n{"body": "x"}\n')
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("")
  _parquet(tmp_path / "n.parquet", [None, None])
  spec, error, message = {
      "blank": (f"jsonl:{tmp_path}/blank.jsonl", ConfigError, "has no documents with text: 3 lines, all blank"),
      "zero_bytes": (f"jsonl:{tmp_path}/zero.jsonl", ConfigError, r"has no documents \(0 lines\)"),
      "all_skipped": (f"jsonl:{tmp_path}/bad.jsonl", DataError,
                      r"has no documents with text: 2 lines, 1 not JSON, 1 no string field 'text'; "
                      r"the first unreadable: .*bad\.jsonl:1: not JSON"),
      "mix_part": (f"mix:shakespeare:heldout=1,jsonl:{tmp_path}/blank.jsonl=1", ConfigError,
                   r"config.data.train_corpus mix part='jsonl:.*blank\.jsonl' has no documents with text: 3 lines"),
      "empty_files": (f"text:{tmp_path}/*.txt", ConfigError, "has no documents with text: 2 files, all empty"),
      "parquet_nulls": (f"parquet:{tmp_path}/n.parquet#body", DataError,
                        r"2 rows, all null; the first unreadable: .*n\.parquet row 1: null"),
  }[case]
  with pytest.raises(error, match=message) as raised:
    corpus_lib.open_corpus(spec, name="config.data.train_corpus", skip_bad_documents=True)
  assert "\n" not in str(raised.value)
  assert str(raised.value).startswith("config.data.train_corpus")


def test_no_sft_pair_that_fits_a_row_stops_before_the_stream_starts(tmp_path):
  (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "p" * 40, "response": "r" * 40}) + "\n")
  corpus = corpus_lib.open_corpus(f"jsonl:{tmp_path}/long.jsonl", pair_fields=("prompt", "response"))
  for overlong in data_lib.SFT_OVERLONG:  # the response alone is longer than a row: neither mode fits it
    with pytest.raises(ConfigError, match=r"has no pairs that fit a row: 1 line, all longer than a row of 33 tokens"):
      data_lib.train_batches(corpus, TOK, _data_config(format="sft", sft_overlong=overlong))


def _train_py(workdir, config, timeout=120):
  from test_train import subprocess_env, train_cmd
  return subprocess.run(train_cmd(workdir, config), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


def test_train_py_on_a_corpus_of_blank_lines_ends_in_one_line(tmp_path, tokenizer_320):
  (tmp_path / "blank.jsonl").write_text("\n\n\n")
  config = tiny_test_config(**{"data.train_corpus": f"jsonl:{tmp_path}/blank.jsonl",
                               "data.tokenizer_path": tokenizer_320.path})
  proc = _train_py(tmp_path / "run", config)  # before: waited forever for the first batch
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: config.data.train_corpus='jsonl:{tmp_path}/blank.jsonl' has no documents with text: 3 lines, all blank")
  assert "Traceback" not in proc.stderr


def _surrogate_corpus(tmp_path):
  path = tmp_path / "s.jsonl"
  path.write_text('{"text": "fine words"}\n{"text": "a lone \\ud83d surrogate"}\n')  # valid JSON, not valid Unicode
  return f"jsonl:{path}"


def test_a_lone_surrogate_names_file_and_line_or_is_skipped_and_counted(tmp_path):
  spec = _surrogate_corpus(tmp_path)
  with pytest.raises(DataError, match=r"s\.jsonl:2: field 'text' is not valid Unicode \(a lone surrogate U\+D83D"):
    _first_batch(spec)
  corpus = corpus_lib.open_corpus(spec, skip_bad_documents=True)
  batch = next(iter(data_lib.train_batches(corpus, TOK, _data_config())))
  assert corpus.skipped() >= 1
  text = TOK.decode(batch["inputs"][batch["segment_ids"] > 0])
  assert "surrogate" not in text and "fine words" in text
  (tmp_path / "p.jsonl").write_text('{"prompt": "q", "response": "\\udc00"}\n{"prompt": "q", "response": "a"}\n')
  pairs = corpus_lib.open_corpus(f"jsonl:{tmp_path}/p.jsonl", pair_fields=("prompt", "response"))
  with pytest.raises(DataError, match=r"p\.jsonl:1: field 'response' is not valid Unicode"):
    pairs.source[0]


def test_train_py_on_a_lone_surrogate_ends_in_one_line(tmp_path, tokenizer_320):
  config = tiny_test_config(**{"data.train_corpus": _surrogate_corpus(tmp_path), "data.tokenizer_path": tokenizer_320.path})
  proc = _train_py(tmp_path / "run", config)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp_path}/s.jsonl:2: field 'text' is not valid Unicode (a lone surrogate U+D83D at character 7)")
  assert "Traceback" not in proc.stderr


def test_sigterm_ends_a_wait_for_the_first_batch():
  from llama_jax import preemption
  from llama_jax.errors import StopRun
  released = threading.Event()

  class Stalled:  # reads that do not return (a stalled network file system)
    def __len__(self):
      return 4

    def __getitem__(self, i):
      released.wait()
      return "text"

  batches = iter(data_lib.train_batches(corpus_lib.MapCorpus("stalled", Stalled(), None), TOK, _data_config()))

  def too_long(signum, frame):
    raise TimeoutError("SIGTERM did not end the wait")

  previous_alarm = signal.signal(signal.SIGALRM, too_long)
  watch = preemption.PreemptionWatch()
  try:
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    signal.alarm(10)
    with pytest.raises(StopRun, match="SIGTERM before the first step of this run finished: nothing new to save"):
      next(batches)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous_alarm)
    watch.close()
    released.set()
    batches.close()
  watch = preemption.PreemptionWatch()  # once a step has finished, a signal is a request to save and stop
  try:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2) and watch.signal_name == "SIGTERM"
  finally:
    watch.close()


def test_tokenizer_training_cuts_lines_sentencepiece_would_skip_and_says_so(tmp_path, capsys):
  from llama_jax import tokenizer as tok_lib
  long_line = "xyzqw" * 20_000 + "\n"  # 100,000 bytes: over sentencepiece's max_sentence_length
  texts = ["ab cd\n"] * 200 + [long_line]
  # 285 pieces need the long line's characters and merges (without it sentencepiece allows 268)
  tok = tok_lib.train_sentencepiece(tok_lib.training_lines(texts), 285, str(tmp_path / "tok.model"))
  assert len(tok.encode("xyzqw" * 4)) <= 4  # learned from the long line
  assert "tokenizer training: cut 1 of 201 lines longer than 65,536 bytes into pieces" in capsys.readouterr().out


def _midbad_corpus(tmp_path):
  """300 good lines; lines 151-154 a lone surrogate, non-UTF-8 bytes, a number, not JSON."""
  good = [json.dumps({"text": f"line {i} of the good words, some more of them"}).encode() for i in range(300)]
  bad = [b'{"text": "a lone \\ud83d surrogate"}', b'{"text": "caf\xe9"}', b'{"text": 7}', b"not json"]
  path = tmp_path / "midbad.jsonl"
  path.write_bytes(b"\n".join(good[:150] + bad + good[150:]) + b"\n")
  return f"jsonl:{path}"


def test_a_bad_document_met_while_training_a_tokenizer_is_named_as_itself(tmp_path):
  from llama_jax import trainer
  config = tiny_test_config(**{"data.train_corpus": _midbad_corpus(tmp_path)})
  with pytest.raises(DataError, match=r"midbad\.jsonl:15[1-4]: "):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_a_tokenizer_is_trained_ends_the_run_leaving_nothing(tmp_path, monkeypatch, sig):
  from llama_jax import tokenizer as tok_lib
  from llama_jax import trainer
  from llama_jax.errors import StopRun
  lines = tok_lib.training_lines

  def signalled(texts):  # the signal arrives while sentencepiece reads the lines
    for n, line in enumerate(lines(texts)):
      if n == 200:
        os.kill(os.getpid(), sig)
      yield line

  def outside(signum, frame):  # where no watch takes it (512ea26: installed later), it is not a stop
    raise RuntimeError("signal outside the run's watch")

  monkeypatch.setattr(tok_lib, "training_lines", signalled)
  previous = signal.signal(sig, outside)
  try:
    with pytest.raises(StopRun, match=f"{sig.name} before the first step"):
      trainer.train_and_evaluate(tiny_test_config(), str(tmp_path / "run"), devices=jax.devices()[:1])
  finally:
    signal.signal(sig, previous)
  assert not os.path.exists(tmp_path / "run")


def test_a_bad_eval_document_stops_the_run_before_its_first_step(tmp_path):
  from llama_jax import trainer
  config = tiny_test_config(**{"data.eval_corpus": _midbad_corpus(tmp_path),
                               "data.tokenizer_path": _tokenizer_file(tmp_path)})
  with pytest.raises(DataError, match=r"midbad\.jsonl:151: field 'text' is not valid Unicode"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "run")
  # data.skip_bad_documents: the check at start counts them instead
  from llama_jax import evaluate as eval_lib, run_setup, tokenizer as tok_lib
  config.data.skip_bad_documents = True
  corpus = data_lib.open_corpus(config.data, "eval_corpus")
  evaluator = eval_lib.Evaluator(run_setup.Setup(config, jax.devices()[:1]), tok_lib.load_tokenizer(
      config.data.tokenizer_path), corpus)
  evaluator.check()
  assert corpus.skipped() == 4


def _tokenizer_file(tmp_path):
  from llama_jax import tokenizer as tok_lib
  plays = corpus_lib.shakespeare_plays("train")[:1]
  return tok_lib.train_sentencepiece(tok_lib.training_lines(plays), 320, str(tmp_path / "tok.model")).path


def test_a_stop_python_ignored_in_a_gc_callback_is_raised_again_before_the_first_step(capsys):
  """A signal handled inside a gc callback or __del__: Python prints the StopRun as ignored and goes on."""
  import types
  import time
  from llama_jax import preemption
  from llama_jax.errors import StopRun
  watch = preemption.PreemptionWatch()
  try:
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    except StopRun as e:
      lost = e
    sys.unraisablehook(types.SimpleNamespace(exc_type=StopRun, exc_value=lost, exc_traceback=None, err_msg=None,
                                             object=None))
    assert "StopRun" not in capsys.readouterr().err  # not printed as ignored: check() raises it
    with pytest.raises(StopRun, match="SIGTERM before the first step"):
      watch.check()
  finally:
    watch.close()
