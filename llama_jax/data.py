"""Token batches for training and evaluation.

Training: documents are tokenized as [BOS] doc [EOS], concatenated, cut into windows of
seq_len + 1 tokens, and shuffled afresh each epoch by grain. The global batch of step s is
windows [s * B, (s + 1) * B) of that endless shuffled stream, so the data position is the step
itself: resuming at step s reproduces exactly the batches an uninterrupted run would see, with
any number of processes (each loads only its rows).

Evaluation: each document is scored on its own, in consecutive windows, every token of the
document predicted once (BOS is context only; EOS is not scored, it has no bytes).

A batch is a dict of int32 arrays [B, T]: inputs, targets, weights (1 where the target counts).
"""

import dataclasses

import grain
import numpy as np

from llama_jax.errors import ConfigError


class TokenWindows(grain.sources.RandomAccessDataSource):
  """Window i = tokens[i*T : i*T + T + 1] (windows overlap by the one token they both predict from)."""

  def __init__(self, tokens, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len
    self._len = (len(tokens) - 1) // seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    start = i * self._seq_len
    return self._tokens[start:start + self._seq_len + 1]


def concat_documents(ids_per_doc, bos_id: int, eos_id: int) -> np.ndarray:
  pieces = []
  for ids in ids_per_doc:
    pieces += [[bos_id], ids, [eos_id]]
  return np.concatenate([np.asarray(p, np.int32) for p in pieces])


def windows_to_batch(windows_BT1, bos_id: int):
  """Splits windows into inputs/targets; a BOS target is not scored (it follows EOS, a given)."""
  windows_BT1 = np.asarray(windows_BT1, np.int32)
  targets = windows_BT1[:, 1:]
  return {"inputs": windows_BT1[:, :-1], "targets": targets,
          "weights": (targets != bos_id).astype(np.int32)}


@dataclasses.dataclass
class TrainData:
  """The endless, epoch-shuffled stream of training batches; `batch(step)` is this process's rows."""

  tokens: np.ndarray
  seq_len: int
  global_batch_size: int
  seed: int
  bos_id: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.global_batch_size % self.process_count:
      raise ConfigError(f"data.batch_size={self.global_batch_size} is not divisible by the "
                       f"{self.process_count} processes")
    windows = TokenWindows(self.tokens, self.seq_len)
    if len(windows) < self.global_batch_size:
      raise ConfigError(f"the training corpus has {len(windows)} windows of data.seq_len={self.seq_len}, "
                       f"fewer than one batch (data.batch_size={self.global_batch_size})")
    self.local_batch_size = self.global_batch_size // self.process_count
    # shuffle() draws a new permutation for each pass over the windows; batch k of this
    # dataset is rows [k * local_batch, (k + 1) * local_batch) of the endless stream.
    self._batches = (grain.MapDataset.source(windows).shuffle(seed=self.seed).repeat(None)
                     .batch(self.local_batch_size).map(lambda w: windows_to_batch(w, self.bos_id)))

  def batch(self, step: int):
    return self._batches[step * self.process_count + self.process_index]


def eval_batches(ids_per_doc, seq_len: int, batch_size: int, bos_id: int, pad_id: int):
  """Fixed list of batches covering every document token once; padding rows have weight 0."""
  rows = []
  for ids in ids_per_doc:
    seq = np.asarray([bos_id] + list(ids), np.int32)
    for start in range(0, len(seq) - 1, seq_len):
      chunk = seq[start:start + seq_len + 1]
      n = len(chunk) - 1
      inputs = np.full(seq_len, pad_id, np.int32)
      targets = np.full(seq_len, pad_id, np.int32)
      weights = np.zeros(seq_len, np.int32)
      inputs[:n], targets[:n], weights[:n] = chunk[:-1], chunk[1:], 1
      rows.append((inputs, targets, weights))
  while len(rows) % batch_size:
    rows.append((np.full(seq_len, pad_id, np.int32),) * 2 + (np.zeros(seq_len, np.int32),))
  batches = []
  for i in range(0, len(rows), batch_size):
    inputs, targets, weights = (np.stack(x) for x in zip(*rows[i:i + batch_size]))
    batches.append({"inputs": inputs, "targets": targets, "weights": weights})
  return batches
