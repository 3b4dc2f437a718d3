"""Held-out loss, perplexity and bits per byte of a checkpoint.

bits/byte = (total NLL of the document tokens, in bits) / (UTF-8 bytes of the documents), which
compares models across tokenizers. It needs a lossless tokenizer (decode(encode(x)) == x); the
ones trained here are, and the count uses the documents' own bytes.
"""

import json
import math

import jax
import numpy as np

from llama_jax import config_lib
from llama_jax import corpus
from llama_jax import data as data_lib
from llama_jax import metrics as metrics_lib
from llama_jax import sharding as sh


class Evaluator:
  """Scores params on fixed held-out batches: evaluator(params) -> loss, perplexity, bits/byte."""

  def __init__(self, setup, tok, docs):
    config = setup.config
    self._setup = setup
    ids = tok.encode_batch(docs)
    self.ids_per_doc = ids
    self.num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    batch_size = max(config.data.batch_size // config.train.grad_accum_steps, 1)
    batches = data_lib.eval_batches(ids, config.data.seq_len, batch_size, tok.bos_id, tok.pad_id)
    # Each process feeds its rows of every batch.
    p, n = jax.process_index(), jax.process_count()
    rows = batch_size // n if batch_size % n == 0 else None
    if rows is None:
      raise config_lib.ConfigError(f"eval batch size {batch_size} is not divisible by {n} processes")
    self._batches = [{k: v[p * rows:(p + 1) * rows] for k, v in b.items()} for b in batches]
    self._eval_step = setup.jit_eval_step()

  def __call__(self, params) -> dict:
    nll, count = 0.0, 0.0
    with jax.set_mesh(self._setup.mesh):
      for batch in self._batches:
        batch_nll, batch_count = sh.replicated_to_host(self._eval_step(params, self._setup.global_batch(batch)))
        nll += float(batch_nll)
        count += float(batch_count)
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nll / math.log(2) / self.num_bytes, "num_tokens": int(count)}


def as_eval_metrics(result: dict) -> dict:
  return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
          "eval_bits_per_byte": result["bits_per_byte"], "eval_num_tokens": result["num_tokens"]}


def evaluate_checkpoint(workdir: str, step: int | None = None, corpus_spec: str | None = None) -> dict:
  """Loads WORKDIR's checkpoint (latest by default) and its config, and scores the eval corpus."""
  from llama_jax import trainer  # the Setup lives with the training loop

  setup, params, tok, step = trainer.load_run(workdir, step)
  docs = corpus.load_documents(corpus_spec or setup.config.data.eval_corpus)
  return {"step": int(step), **Evaluator(setup, tok, docs)(params)}


def write_json(result: dict, path: str):
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
    metrics_lib.log(f"wrote {path}")


def unigram_bits_per_byte(train_tokens, eval_ids_per_doc, num_bytes: int, vocab_size: int) -> float:
  """The baseline a model must beat: every eval token scored by its training frequency (add-one)."""
  counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size) + 1.0
  log2_prob = np.log2(counts / counts.sum())
  return -sum(log2_prob[np.asarray(ids, np.int64)].sum() for ids in eval_ids_per_doc) / num_bytes
