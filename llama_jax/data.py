"""Token batches, streamed: documents -> [BOS] doc [EOS] -> chunks -> packed rows -> batches.

The pipeline is grain's, end to end, so its position is an iterator state saved in every
checkpoint (checkpoint.py) and a resumed run reads exactly the batches it would have read.

- Documents come from a corpus spec (corpus.py), this process's share of one global order.
- Each is tokenized on the fly as [BOS] doc [EOS], in `data.read_threads` threads
  (sentencepiece and tiktoken release the GIL). A document longer than a row is cut into
  chunks of T + 1 tokens that overlap by one token, so every token is predicted exactly once.
- Chunks pass a shuffle window (`data.shuffle_window` chunks), so that the chunks of one long
  document spread over many batches, then are packed into rows of T + 1 tokens by grain's
  `FirstFitPackIterDataset`: a chunk is never split, it goes to the first of
  `data.pack_bins` open rows with room, and what no chunk fills is padding.
- A row becomes inputs = row[:-1] and targets = row[1:]; a target counts (weight 1) only
  when it lies in the same document as its input, so nothing is predicted across a document
  boundary or on padding. The model attends only within a segment and RoPE positions restart
  at 0 in each one (model.attention_mask).

A batch is a dict of int32 arrays [B, T]: inputs, targets, weights, positions, segment_ids
(1, 2, ... per document within a row; 0 for padding); evaluation batches add num_bytes (the
UTF-8 size of a document on its first token) for bits per byte. Training and evaluation use
the same layout; evaluation reads each document once, in order, and pads the last batch.

  python -m llama_jax.data --config configs/tiny.py --show 3     # decoded rows, segments marked
  python -m llama_jax.data --config configs/tiny.py --stats      # documents/s, tokens/s, padding
"""

import functools
import time

import grain
import numpy as np
from absl import flags
from ml_collections import config_flags

from llama_jax import corpus as corpus_lib
from llama_jax.errors import ConfigError

# The fields of config.data that decide which batch comes at which step; a resume must keep them.
STREAM_FIELDS = ("train_corpus", "shuffle_seed", "seq_len", "batch_size", "shuffle_window", "pack_bins",
                 "skip_bad_documents")


def open_corpus(data_config, key: str):
  """The corpus of `config.data.<key>` (train_corpus or eval_corpus)."""
  return corpus_lib.open_corpus(data_config[key], name=f"config.data.{key}",
                                tfds_data_dir=data_config.tfds_data_dir,
                                skip_bad_documents=data_config.skip_bad_documents)


class _Encode:
  """text -> chunks {"tokens"} of [BOS] text [EOS], each <= row_len, overlapping by one token."""

  def __init__(self, tok, row_len: int, count_bytes: bool):
    self._tok, self._row_len, self._count_bytes = tok, row_len, count_bytes

  def __call__(self, text):
    if text is None:  # a skipped document
      return []
    ids = np.asarray([self._tok.bos_id] + self._tok.encode(text) + [self._tok.eos_id], np.int32)
    step = self._row_len - 1
    chunks = [{"tokens": ids[s:s + self._row_len]} for s in range(0, len(ids) - 1, step)]
    if self._count_bytes:
      for c in chunks:
        c["num_bytes"] = np.zeros(len(c["tokens"]), np.int32)
      chunks[0]["num_bytes"][0] = len(text.encode("utf-8"))
    return chunks


class _Flatten(grain.experimental.FlatMapTransform):
  max_fan_out = 1 << 30

  def flat_map(self, chunks):
    return chunks


def packed_rows(docs, tok, seq_len: int, *, read_threads: int, pack_bins: int, seed: int | None = None,
                shuffle_window: int = 0, count_bytes: bool = False) -> grain.IterDataset:
  """Rows {"tokens", "tokens_segment_ids", "tokens_positions"} of seq_len + 1 tokens.

  Args:
    docs: a grain dataset of documents (str; None for a skipped one).
    seed: shuffles chunks (within `shuffle_window`) and rows; None keeps the corpus order.
  """
  encode = _Encode(tok, seq_len + 1, count_bytes)
  if isinstance(docs, grain.MapDataset):
    chunks = docs.map(encode).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))
  else:
    chunks = docs.map(encode)
  chunks = grain.experimental.FlatMapIterDataset(chunks, _Flatten())
  if seed is not None and shuffle_window > 1:
    chunks = grain.experimental.WindowShuffleIterDataset(chunks, window_size=shuffle_window, seed=seed)
  lengths = {"tokens": seq_len + 1}
  if count_bytes:
    lengths["num_bytes"] = seq_len + 1
  return grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct=lengths, num_packing_bins=pack_bins, seed=seed or 0, shuffle_bins=seed is not None)


def rows_to_batch(rows):
  """Packed rows [B, T + 1] -> the batch layout [B, T] (see the module docstring)."""
  tokens, segments = rows["tokens"], rows["tokens_segment_ids"]
  batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": ((segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)).astype(np.int32),
      "positions": rows["tokens_positions"][:, :-1],
      "segment_ids": segments[:, :-1],
  }
  if "num_bytes" in rows:
    batch["num_bytes"] = rows["num_bytes"][:, :-1]
  return {k: np.asarray(v, np.int32) for k, v in batch.items()}


def dense_batch(windows_BT1):
  """The batch layout for windows that are each one document (benchmarks, tests)."""
  windows_BT1 = np.asarray(windows_BT1, np.int32)
  B, T = windows_BT1.shape[0], windows_BT1.shape[1] - 1
  return {"inputs": windows_BT1[:, :-1], "targets": windows_BT1[:, 1:], "weights": np.ones((B, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.ones((B, T), np.int32)}


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ConfigError(f"config.data.batch_size={global_batch_size} is not divisible by the "
                      f"{process_count} processes")
  return global_batch_size // process_count


def train_batches(corpus, tok, data_config, process_index: int = 0, process_count: int = 1):
  """The endless stream of this process's training batches (a grain IterDataset)."""
  c = data_config
  docs = corpus.documents(c.shuffle_seed, process_index, process_count)
  rows = packed_rows(docs, tok, c.seq_len, read_threads=c.read_threads, pack_bins=c.pack_bins,
                     seed=c.shuffle_seed, shuffle_window=c.shuffle_window)
  batches = rows.batch(local_batch_size(c.batch_size, process_count), drop_remainder=True).map(rows_to_batch)
  # Batches are made in a background thread while the step runs.
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)


def eval_batches(corpus, tok, data_config, batch_size: int, process_index: int = 0, process_count: int = 1):
  """One pass over this process's share of the corpus in batches of `batch_size` rows, padded."""
  c = data_config
  docs = corpus.documents(None, process_index, process_count)
  rows = packed_rows(docs, tok, c.seq_len, read_threads=c.read_threads, pack_bins=c.pack_bins,
                     count_bytes=True)
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  return rows.batch(batch_size, batch_fn=pad).map(rows_to_batch)


def stream_definition(data_config, process_count: int) -> dict:
  """What fixes the training stream; saved with each checkpoint and compared on resume."""
  return {**{f"data.{k}": data_config[k] for k in STREAM_FIELDS}, "process_count": process_count}


def stream_changes(saved: dict, current: dict) -> list[str]:
  """What differs between a checkpoint's stream definition and this run's, as 'key: saved -> now'."""
  return [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current if saved.get(k) != current[k]]


# ------------------------------------------------------------------ inspecting a pipeline


def show_rows(batch, tok, n: int) -> str:
  """The first n rows of a batch, decoded, each document between markers."""
  out = []
  for r in range(min(n, len(batch["inputs"]))):
    segments = batch["segment_ids"][r]
    row = [f"--- row {r}: {int((segments > 0).sum())} tokens, {len(set(segments[segments > 0]))} segments, "
           f"{int((segments == 0).sum())} padding"]
    for s in [s for s in dict.fromkeys(segments.tolist()) if s > 0]:
      idx = np.flatnonzero(segments == s)
      ids = batch["inputs"][r][idx]
      row.append(f"[segment {s}: positions {batch['positions'][r][idx[0]]}..{batch['positions'][r][idx[-1]]}]"
                 f"{tok.decode(ids)!r}")
    out.append("\n".join(row))
  return "\n".join(out)


def pipeline_stats(batches, num_batches: int, bos_id: int) -> dict:
  """Documents and tokens per second and the padding fraction of num_batches batches."""
  it = iter(batches)
  first = next(it)  # start-up (index building, first shuffle window) is timed apart
  start = time.perf_counter()
  tokens = padding = docs = 0
  for _ in range(num_batches):
    b = next(it)
    seg = b["segment_ids"]
    tokens += int((seg > 0).sum())
    padding += int((seg == 0).sum())
    docs += int(((b["positions"] == 0) & (b["inputs"] == bos_id) & (seg > 0)).sum())  # first chunks
  elapsed = time.perf_counter() - start
  return {"batches": num_batches, "rows_per_batch": len(first["inputs"]), "seconds": elapsed,
          "documents_per_sec": docs / elapsed, "tokens_per_sec": tokens / elapsed,
          "padding_fraction": padding / max(tokens + padding, 1)}


def main():
  """The command line (flags are defined here: this module is imported by train.py too)."""
  import os
  from llama_jax import entry
  from llama_jax import tokenizer as tok_lib

  config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.")
  workdir = flags.DEFINE_string("workdir", None, "A run's workdir: its tokenizer.model is used "
                                "(default: config.data.tokenizer_path).")
  show = flags.DEFINE_integer("show", 0, "Print this many decoded rows of the first training batch.")
  stats = flags.DEFINE_integer("stats", 0, "Time this many training batches of the pipeline alone.")
  flags.mark_flags_as_required(["config"])

  def run():
    config = config_flag.value
    path = os.path.join(workdir.value, "tokenizer.model") if workdir.value else config.data.tokenizer_path
    if not path:
      raise ConfigError("give --workdir (a run with a tokenizer.model) or --config.data.tokenizer_path")
    tok = tok_lib.load_tokenizer(path)
    batches = train_batches(open_corpus(config.data, "train_corpus"), tok, config.data)
    if show.value:
      print(show_rows(next(iter(batches)), tok, show.value))
    if stats.value:
      s = pipeline_stats(batches, stats.value, tok.bos_id)
      print(f"{s['batches']} batches of {s['rows_per_batch']} rows in {s['seconds']:.2f} s | "
            f"{s['documents_per_sec']:,.0f} documents/s | {s['tokens_per_sec']:,.0f} tokens/s | "
            f"padding {s['padding_fraction']:.1%}")

  entry.main(lambda argv: entry.run(run))


if __name__ == "__main__":
  main()
