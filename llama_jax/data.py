"""Token batches, streamed: documents -> [BOS] doc [EOS] -> chunks -> packed rows -> batches.

The pipeline is grain's, end to end, so its position is an iterator state saved in every
checkpoint (checkpoint.py) and a resumed run reads exactly the batches it would have read.

- Documents come from a corpus spec (corpus.py), in `data.shards` shards S of one global order:
  shard s reads documents s, s + S, ... (Parquet: whole files) through a pipeline of its own (all
  that follows) and gives B / S rows of each batch. Process p of P reads shards p*S/P .. (p+1)*S/P - 1
  (process_batches), so a global batch is every shard's rows in shard order whatever P is, and a
  checkpoint's one iterator state per shard lets any P that divides S continue it (data_shards).
- Each is tokenized on the fly as [BOS] doc [EOS], in `data.read_threads` threads
  (sentencepiece and tiktoken release the GIL). A document longer than a row is cut into
  chunks of T + 1 tokens that overlap by one token, so every token is predicted exactly once.
- Chunks pass a shuffle window (`data.shuffle_window` chunks), so that the chunks of one long
  document spread over many batches, then are packed into rows of T + 1 tokens by grain's
  `FirstFitPackIterDataset`: a chunk is never split, it goes to the first of
  `data.pack_bins` open rows with room, and what no chunk fills is padding.
- A row becomes inputs = row[:-1] and targets = row[1:]; a target counts (weight 1) only
  when it lies in the same document as its input, so nothing is predicted across a document
  boundary or on padding. The model attends only within a segment (its segment ids go to
  llama_jax/attention.py) and RoPE positions restart at 0 in each one.

Fine-tuning data (`data.format = "sft"`) are (prompt, response) pairs, each one segment
[BOS] prompt response [EOS] that is never cut into chunks: only the response tokens and the
EOS are targets (the model learns to answer and to stop), and an example longer than a row
loses the start of its prompt or is skipped (`data.sft_overlong`), counted in the log. Training
stops at the start (ConfigError) when no pair of the corpus fits a row that way.

Skipped documents (corpus.py: unreadable ones with data.skip_bad_documents, blank JSONL lines)
give no chunks; nothing else is dropped: an evaluation pass holds every chunk of every
document once.

A batch is a dict of int32 arrays [B, T]: inputs, targets, weights, positions, segment_ids
(1, 2, ... per document within a row; 0 for padding); evaluation batches add num_bytes (the
UTF-8 size of a document on its first token) for bits per byte. Training and evaluation use
the same layout; evaluation reads each document once, in order, and pads the last batch.

  python -m llama_jax.data --config configs/tiny.py --show 3     # decoded rows, segments marked
  python -m llama_jax.data --config configs/tiny.py --stats      # documents/s, tokens/s, padding
"""

import copy
import functools
import threading
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
SFT_STREAM_FIELDS = ("format", "prompt_field", "response_field", "sft_overlong")
FORMATS = ("text", "sft")
SFT_OVERLONG = ("truncate_prompt", "skip")


def check_data_config(data_config):
  if data_config.format not in FORMATS:
    raise ConfigError(f"config.data.format={data_config.format!r} is not one of {FORMATS}")
  if data_config.sft_overlong not in SFT_OVERLONG:
    raise ConfigError(f"config.data.sft_overlong={data_config.sft_overlong!r} is not one of {SFT_OVERLONG}")


def open_corpus(data_config, key: str, spec: str | None = None):
  """The corpus of `config.data.<key>` (train_corpus or eval_corpus), or of `spec` read the same way."""
  c = data_config
  pairs = (c.prompt_field, c.response_field) if c.format == "sft" else None
  return corpus_lib.open_corpus(spec or c[key], name="--corpus" if spec else f"config.data.{key}",
                                tfds_data_dir=c.tfds_data_dir, skip_bad_documents=c.skip_bad_documents,
                                pair_fields=pairs)


class Overlong:
  """Counts SFT examples longer than a row: truncated from the prompt side, or skipped."""

  def __init__(self):
    self.truncated = self.skipped = 0
    self._lock = threading.Lock()

  def add(self, truncated: bool):
    with self._lock:
      if truncated:
        self.truncated += 1
      else:
        self.skipped += 1


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
      for i, c in enumerate(chunks):
        c["num_bytes"] = _byte_counts(len(c["tokens"]), text if i == 0 else "")
    return chunks


def encode_pair(tok, prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
  """[BOS] prompt response [EOS] and its loss mask: 1 on the response tokens and the EOS."""
  prompt_ids, response_ids = tok.encode(prompt), tok.encode(response)
  ids = [tok.bos_id] + prompt_ids + response_ids + [tok.eos_id]
  loss = [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
  return np.asarray(ids, np.int32), np.asarray(loss, np.int32)


def fit_pair(ids, loss, row_len: int, overlong: str):
  """(ids, loss) of an encoded pair fitted to row_len tokens: as they are when short enough, else
  without the start of the prompt (overlong="truncate_prompt", if the prompt is long enough),
  else (None, None)."""
  excess = len(ids) - row_len
  if excess <= 0:
    return ids, loss
  prompt_len = int(np.argmax(loss)) - 1  # tokens between BOS and the response
  if overlong == "skip" or excess > prompt_len:
    return None, None
  return np.delete(ids, np.s_[1:1 + excess]), np.delete(loss, np.s_[1:1 + excess])


class _EncodePair:
  """(prompt, response) -> [one chunk {"tokens", "loss"}], or [] when skipped (see Overlong)."""

  def __init__(self, tok, row_len: int, overlong: str, counts: Overlong, count_bytes: bool):
    self._tok, self._row_len, self._overlong, self._counts = tok, row_len, overlong, counts
    self._count_bytes = count_bytes

  def __call__(self, pair):
    if pair is None:  # a skipped document
      return []
    ids, loss = encode_pair(self._tok, *pair)
    fitted, fitted_loss = fit_pair(ids, loss, self._row_len, self._overlong)
    if fitted is None or len(fitted) != len(ids):
      self._counts.add(truncated=fitted is not None)
    if fitted is None:
      return []
    ids, loss = fitted, fitted_loss
    chunk = {"tokens": ids, "loss": loss}
    if self._count_bytes:  # bits per byte of the responses
      chunk["num_bytes"] = _byte_counts(len(ids), pair[1])
    return [chunk]


def _byte_counts(num_tokens: int, text: str) -> np.ndarray:
  """The UTF-8 size of `text` on the first of num_tokens positions (bits per byte counts it once)."""
  counts = np.zeros(num_tokens, np.int32)
  counts[0] = len(text.encode("utf-8"))
  return counts


class _Flatten(grain.experimental.FlatMapTransform):
  max_fan_out = 1 << 30

  def flat_map(self, chunks):
    return chunks


def packed_rows(docs, tok, seq_len: int, *, read_threads: int, pack_bins: int, seed: int | None = None,
                shuffle_window: int = 0, count_bytes: bool = False, sft_overlong: str | None = None,
                overlong: Overlong | None = None) -> grain.IterDataset:
  """Rows {"tokens", "tokens_segment_ids", "tokens_positions"} (+ "loss" for SFT) of seq_len + 1 tokens.

  Args:
    docs: a grain dataset of documents (str, or (prompt, response) for SFT; None for a skipped one).
    seed: shuffles chunks (within `shuffle_window`) and rows; None keeps the corpus order.
    sft_overlong: set for SFT pairs: what happens to one longer than a row (counted in `overlong`).
  """
  if sft_overlong:
    encode = _EncodePair(tok, seq_len + 1, sft_overlong, overlong or Overlong(), count_bytes)
  else:
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
  if sft_overlong:
    lengths["loss"] = seq_len + 1
  return grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct=lengths, num_packing_bins=pack_bins, seed=seed or 0, shuffle_bins=seed is not None)


def rows_to_batch(rows):
  """Packed rows [B, T + 1] -> the batch layout [B, T] (see the module docstring)."""
  tokens, segments = rows["tokens"], rows["tokens_segment_ids"]
  weights = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
  if "loss" in rows:  # SFT: only response tokens and the EOS are targets
    weights &= rows["loss"][:, 1:] > 0
  batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": weights.astype(np.int32),
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


def _sft_overlong(data_config):
  return data_config.sft_overlong if data_config.format == "sft" else None


def _check_pairs_fit(corpus, tok, data_config):
  """ConfigError for SFT pairs of which none fits a row (data.sft_overlong), found by reading in
  corpus order up to the first that fits: a stream of them would never yield a batch."""
  c = data_config
  row_len = c.seq_len + 1
  corpus.check_usable("config.data.train_corpus",
                      lambda pair: fit_pair(*encode_pair(tok, *pair), row_len, c.sft_overlong)[0] is not None,
                      f"longer than a row of {row_len} tokens (data.sft_overlong={c.sft_overlong!r})",
                      "pairs that fit a row")


def _shard_batches(corpus, tok, data_config, shard_index: int, shard_count: int, overlong: Overlong | None):
  """Shard `shard_index` of `shard_count`: documents shard_index, shard_index + shard_count, ... of the
  global order, packed into rows of its own, batch_size / shard_count rows a batch (a grain IterDataset)."""
  c = data_config
  docs = corpus.documents(c.shuffle_seed, shard_index, shard_count)
  rows = packed_rows(docs, tok, c.seq_len, read_threads=c.read_threads, pack_bins=c.pack_bins,
                     seed=c.shuffle_seed, shuffle_window=c.shuffle_window, sft_overlong=_sft_overlong(c),
                     overlong=overlong)
  batches = rows.batch(local_batch_size(c.batch_size, shard_count), drop_remainder=True).map(rows_to_batch)
  # Batches are made in a background thread while the step runs.
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)


def train_batches(corpus, tok, data_config, process_index: int = 0, process_count: int = 1,
                  overlong: Overlong | None = None):
  """The endless stream of shard `process_index` of `process_count` (a grain IterDataset): what a
  process reads when every process owns one shard (process_batches with data.shards = process count).

  Raises:
    ConfigError: SFT pairs of which none fits a row (data.sft_overlong).
  """
  if _sft_overlong(data_config):
    _check_pairs_fit(corpus, tok, data_config)
  return _shard_batches(corpus, tok, data_config, process_index, process_count, overlong)


def owned_shards(shard_count: int, process_index: int, process_count: int) -> range:
  """The shards process `process_index` of `process_count` reads: a contiguous block of
  shard_count / process_count, so the global batch takes its rows from shard 0, 1, ... in order."""
  per_process = shard_count // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class ShardedBatches:
  """One process's training batches: its shards' batches concatenated row-wise in shard order.

  Iterating gives dicts of int32 arrays [B / process_count, T]. `shard_states()` is the position
  (each shard's grain iterator state, by shard index) and `set_shard_states` moves there; a
  checkpoint keeps one state per shard (checkpoint.DataShardsHandler), so any process count that
  divides `shard_count` can continue it.
  """

  def __init__(self, iterators: dict[int, "grain.DatasetIterator"], shard_count: int):
    self.iterators, self.shard_count = iterators, shard_count

  @property
  def shards(self) -> list[int]:
    return list(self.iterators)

  def __iter__(self):
    return self

  def __next__(self):
    local = [next(it) for it in self.iterators.values()]
    if len(local) == 1:
      return local[0]
    return {k: np.concatenate([b[k] for b in local]) for k in local[0]}

  def shard_states(self) -> dict[int, dict]:
    """{shard index: its iterator state}, copied, so reading on does not move it."""
    return {s: copy.deepcopy(it.get_state()) for s, it in self.iterators.items()}

  def set_shard_states(self, states: dict[int, dict]):
    for s, it in self.iterators.items():
      it.set_state(states[s])

  def start_prefetch(self):
    for it in self.iterators.values():
      it.start_prefetch()

  def close(self):
    for it in self.iterators.values():
      it.close()


def process_batches(corpus, tok, data_config, shard_count: int, process_index: int = 0, process_count: int = 1,
                    overlong: Overlong | None = None) -> ShardedBatches:
  """The endless training stream of process `process_index` of `process_count` over `shard_count`
  shards (data_shards): the batches of its shards (owned_shards), each shard's own pipeline as in
  train_batches, concatenated in shard order. The global batch is every shard's rows in shard order,
  whatever the process count.

  Raises:
    ConfigError: SFT pairs of which none fits a row (data.sft_overlong).
  """
  if _sft_overlong(data_config):
    _check_pairs_fit(corpus, tok, data_config)
  iterators = {s: iter(_shard_batches(corpus, tok, data_config, s, shard_count, overlong))
               for s in owned_shards(shard_count, process_index, process_count)}
  return ShardedBatches(iterators, shard_count)


def _divisors(n: int) -> str:
  """'1, 2 or 4' for 4."""
  ds = [str(d) for d in range(1, n + 1) if n % d == 0]
  return ds[0] if len(ds) == 1 else f"{', '.join(ds[:-1])} or {ds[-1]}"


def saved_shards(stream: dict) -> int | None:
  """The shard count of a saved stream definition: its "data.shards", or, in one saved before that
  key, its "process_count" (each process was one shard); None in one that has neither."""
  return stream.get("data.shards", stream.get("process_count"))


def data_shards(data_config, process_count: int, saved_stream: dict | None = None,
                saved_step: int | None = None) -> int:
  """The number of data shards of this run: config.data.shards, or where it is 0 the one of the
  newest checkpoint's stream (`saved_stream`, saved at step `saved_step`) if there is one, else
  the process count.

  Raises:
    ConfigError (one line, naming config.data.shards): a process count that does not divide it (with
      the counts that do), or config.data.batch_size not divisible by it.
  """
  shards, whence = data_config.shards, ""
  if not shards and saved_stream is not None and saved_shards(saved_stream):
    shards, whence = saved_shards(saved_stream), f" (saved in checkpoint {saved_step})"
  if not shards:
    shards, whence = process_count, " (config.data.shards=0: one per process)"
  if shards % process_count:
    raise ConfigError(f"config.data.shards={shards}{whence}: a run on {process_count} processes cannot read it; "
                      f"use {_divisors(shards)} processes")
  if data_config.batch_size % shards:
    raise ConfigError(f"config.data.batch_size={data_config.batch_size} is not divisible by the {shards} data "
                      f"shards{whence or f' of config.data.shards={shards}'}")
  return shards


def eval_batches(corpus, tok, data_config, batch_size: int, process_index: int = 0, process_count: int = 1):
  """One pass over this process's share of the corpus in batches of `batch_size` rows, padded."""
  c = data_config
  docs = corpus.documents(None, process_index, process_count)
  rows = packed_rows(docs, tok, c.seq_len, read_threads=c.read_threads, pack_bins=c.pack_bins,
                     count_bytes=True, sft_overlong=_sft_overlong(c))
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  return rows.batch(batch_size, batch_fn=pad).map(rows_to_batch)


def stream_definition(data_config, shard_count: int) -> dict:
  """What fixes the training stream (the STREAM_FIELDS and the shard count data_shards gave); saved
  with each checkpoint and compared on resume. The process count is not part of it."""
  fields = STREAM_FIELDS + (SFT_STREAM_FIELDS if data_config.format == "sft" else ())
  return {**{f"data.{k}": data_config[k] for k in fields}, "data.shards": shard_count}


def stream_changes(saved: dict, current: dict) -> list[str]:
  """What differs between a checkpoint's stream definition and this run's, as 'key: saved -> now'
  (a "process_count" saved before data.shards counts as that many shards)."""
  saved = {**saved, "data.shards": saved_shards(saved)}
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
  from llama_jax import entry, paths
  from llama_jax import tokenizer as tok_lib

  config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.")
  workdir = flags.DEFINE_string("workdir", None, "A run's workdir (local or gs://): its tokenizer.model is used "
                                "(default: config.data.tokenizer_path).")
  show = flags.DEFINE_integer("show", 0, "Print this many decoded rows of the first training batch.")
  stats = flags.DEFINE_integer("stats", 0, "Time this many training batches of the pipeline alone.")
  flags.mark_flags_as_required(["config"])

  def run():
    config = config_flag.value
    if workdir.value:
      paths.check_bucket(workdir.value, "--workdir")
    path = paths.join(workdir.value, "tokenizer.model") if workdir.value else config.data.tokenizer_path
    if not path:
      raise ConfigError("give --workdir (a run with a tokenizer.model) or --config.data.tokenizer_path")
    tok = tok_lib.load_tokenizer(path)
    # One process reading every shard: the global batches of a run.
    batches = process_batches(open_corpus(config.data, "train_corpus"), tok, config.data,
                              data_shards(config.data, 1))
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
