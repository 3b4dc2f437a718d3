"""Held-out loss, perplexity and bits per byte of a checkpoint, on any corpus, streamed; several named
held-out sets at once (EvalSets); and lm-evaluation-harness tasks on params (TaskEvaluator).

bits/byte = (total NLL of the document tokens, in bits) / (UTF-8 bytes of the documents), which
compares models across tokenizers. Every token of every document after its BOS is scored once,
its EOS included, in packed rows laid out as in training (data.py). It needs a lossless
tokenizer (decode(encode(x)) == x); the ones trained here are, and the count uses the
documents' own bytes.

A loss too large for exp() (a diverged model) gives perplexity inf, not an error; the report
keeps every field, and eval_<step>.json writes inf and NaN as the strings "inf" and "nan"
(metrics.dumps), so that strict JSON parsers read it.

Held-out sets: data.eval_corpus (when set) and the named sets of data.eval_corpora, each scored as
above. Their report (`report`) keeps data.eval_corpus's scores at the top (loss, perplexity,
bits_per_byte, num_tokens, as before there were named sets), the named sets' under "sets", and,
when there is a named set, their macro mean under "mean": the mean of the sets' losses, the mean of
their bits/byte, and perplexity = exp(mean loss), which is the geometric mean of the sets'
perplexities (every set weighs the same, whatever its size). In metrics.jsonl and TensorBoard
(`as_eval_metrics`) they are eval_loss, eval_perplexity, eval_bits_per_byte, eval_num_tokens for
data.eval_corpus, eval_<name>_loss, ..._perplexity, ..._bits_per_byte, ..._num_tokens per named set,
and eval_mean_loss, eval_mean_perplexity, eval_mean_bits_per_byte for the mean.
"""

import contextlib
import math
import os

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import config_lib
from llama_jax import data as data_lib
from llama_jax import generate as generate_lib
from llama_jax import metrics as metrics_lib
from llama_jax import paths
from llama_jax import run_setup
from llama_jax import sharding as sh


class Evaluator:
  """Scores params on one pass over a corpus: evaluator(params) -> loss, perplexity, bits/byte."""

  def __init__(self, setup, tok, corpus, eval_step=None):
    """eval_step: setup.jit_eval_step() to share with other Evaluators of the same setup (one compile for
    them all); by default one of its own."""
    config = setup.config
    self._setup, self._tok, self._corpus = setup, tok, corpus
    batch_size = max(config.data.batch_size // config.train.grad_accum_steps, 1)
    n = jax.process_count()
    if batch_size % n:
      raise config_lib.ConfigError(f"eval batch size {batch_size} is not divisible by {n} processes")
    # A checkpoint's batch size need not split over the mesh it is loaded on (run_setup.load_run
    # picks one that fits the model): round the rows up to a multiple of the batch shards. Extra
    # rows only regroup the packed rows (or are padding, weight 0): the scores do not change.
    shards = math.lcm(setup.mesh.shape[sh.DATA] * setup.mesh.shape[sh.FSDP], n)
    self._rows = -(-batch_size // shards) * shards // n  # each process feeds its rows of every batch
    self._eval_step = eval_step or setup.jit_eval_step()

  def _batches(self, process_index: int, process_count: int):
    return data_lib.eval_batches(self._corpus, self._tok, self._setup.config.data, self._rows,
                                 process_index, process_count)

  def check(self):
    """Fails now, not at the end of training: reads every document of the corpus once, without
    tokenizing (as much reading as one eval pass; an eval reads them all anyway), so an unreadable
    one stops the run naming its file:line (with data.skip_bad_documents it is counted and logged
    instead), and tokenizes the first batch: a corpus that gives none is refused."""
    docs = self._corpus.documents(None)
    if isinstance(docs, grain.MapDataset):
      docs = docs.to_iter_dataset(grain.ReadOptions(num_threads=os.cpu_count() or 1, prefetch_buffer_size=64))
    for _ in docs:
      pass
    batches = iter(self._batches(0, 1))
    empty = next(batches, None) is None
    batches.close()
    if empty:
      raise config_lib.ConfigError(f"eval corpus {self._corpus.spec!r} has no documents")

  def __call__(self, params) -> dict:
    nll, count, num_bytes = 0.0, 0.0, 0
    T = self._setup.config.data.seq_len
    padding = {k: np.zeros((self._rows, T), np.int32) for k in
               ("inputs", "targets", "weights", "positions", "segment_ids", "num_bytes")}
    batches = iter(self._batches(jax.process_index(), jax.process_count()))
    with jax.set_mesh(self._setup.mesh), contextlib.closing(batches):
      while True:
        batch = next(batches, None)
        if jax.process_count() > 1:  # processes' shares differ in length: go on while any has rows
          if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
            break
        elif batch is None:
          break
        result = self._eval_step(params, self._setup.global_batch(padding if batch is None else batch))
        batch_nll, batch_count, batch_bytes = sh.replicated_to_host(result)
        nll += float(batch_nll)
        count += float(batch_count)
        num_bytes += int(batch_bytes)
    return scores(nll, count, num_bytes)


def scores(nll: float, count: float, num_bytes: int) -> dict:
  """Loss, perplexity and bits/byte from the summed NLL (nats) of `count` tokens over `num_bytes` bytes;
  perplexity inf where exp(loss) overflows a float, NaN where the loss is NaN."""
  loss = nll / max(count, 1)
  try:
    perplexity = math.exp(loss)
  except OverflowError:
    perplexity = math.inf
  return {"loss": loss, "perplexity": perplexity, "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
          "num_tokens": int(count)}


def open_eval_sets(data_config, corpus_spec: str | None = None) -> dict:
  """name -> corpus of every held-out set (config_lib.eval_set_specs: data.eval_corpus under "", then
  data.eval_corpora; `corpus_spec` alone when given). Opening a corpus checks its spec and finds its
  files: a bad one is a ConfigError naming config.data.eval_corpus or config.data.eval_corpora.<name>."""
  corpora = {}
  for name, spec in config_lib.eval_set_specs(data_config, corpus_spec).items():
    key = "eval_corpus" if name == config_lib.DEFAULT_SET else f"eval_corpora.{name}"
    corpora[name] = data_lib.open_corpus(data_config, key, spec=corpus_spec)
  return corpora


class EvalSets:
  """Scores params on every held-out set of a run (open_eval_sets): evaluator(params) -> report()."""

  def __init__(self, setup, tok, corpora: dict):
    eval_step = setup.jit_eval_step()  # one program for every set: their rows have the same shape
    self.evaluators = {name: Evaluator(setup, tok, corpus, eval_step) for name, corpus in corpora.items()}

  def check(self):
    """Evaluator.check of every set, before training starts."""
    for evaluator in self.evaluators.values():
      evaluator.check()

  def __call__(self, params) -> dict:
    return report({name: evaluator(params) for name, evaluator in self.evaluators.items()})


def macro_mean(scores: list[dict]) -> dict:
  """The macro mean of several sets' `scores`: mean loss, mean bits/byte, and perplexity = exp(mean loss)
  (the geometric mean of their perplexities; inf where it overflows, NaN for a NaN loss)."""
  loss = sum(s["loss"] for s in scores) / len(scores)
  try:
    perplexity = math.exp(loss)
  except OverflowError:
    perplexity = math.inf
  return {"loss": loss, "perplexity": perplexity,
          "bits_per_byte": sum(s["bits_per_byte"] for s in scores) / len(scores)}


def report(scores: dict[str, dict]) -> dict:
  """The held-out report of the sets' `scores` (name -> scores(), data.eval_corpus under ""): its
  scores at the top, the named sets' under "sets" and their macro mean over all sets under "mean"
  (these two only when there is a named set)."""
  result = dict(scores.get(config_lib.DEFAULT_SET, {}))
  named = {name: s for name, s in scores.items() if name != config_lib.DEFAULT_SET}
  if named:
    result["sets"] = named
    result["mean"] = macro_mean(list(scores.values()))
  return result


_FIELDS = ("loss", "perplexity", "bits_per_byte", "num_tokens")


def as_eval_metrics(result: dict) -> dict:
  """The metrics.jsonl / TensorBoard keys of a report (or of one Evaluator's scores): eval_loss, ... of
  data.eval_corpus, eval_<name>_loss, ... of each named set, eval_mean_loss, ... of the macro mean."""
  metrics = {f"eval_{k}": result[k] for k in _FIELDS if k in result}
  for name, scores in result.get("sets", {}).items():
    metrics.update({f"eval_{name}_{k}": scores[k] for k in _FIELDS})
  if "mean" in result:
    metrics.update({f"eval_{config_lib.MEAN_SET}_{k}": v for k, v in result["mean"].items()})
  return metrics


def describe(result: dict, main_line: bool = True) -> str:
  """A report as text: one line per set, "loss L | perplexity P | B bits/byte over N tokens", the named
  sets' and the mean's after their name; without `main_line`, data.eval_corpus's line is left out (it
  still counts in the mean's number of sets)."""
  line = lambda s: (f"loss {s['loss']:.4f} | perplexity {s['perplexity']:.3f} | {s['bits_per_byte']:.4f} bits/byte"
                    + (f" over {s['num_tokens']:,} tokens" if "num_tokens" in s else ""))
  lines = [line(result)] if "loss" in result and main_line else []
  lines += [f"{name}: {line(s)}" for name, s in result.get("sets", {}).items()]
  if "mean" in result:
    lines.append(f"{config_lib.MEAN_SET} of {len(result['sets']) + ('loss' in result)} sets: {line(result['mean'])}")
  return "\n".join(lines)


class TaskEvaluator:
  """lm-evaluation-harness tasks on params (llama_jax.harness): evaluator(params) -> lm-eval's results
  dict on process 0, None on the others (they serve the same compiled calls). One LlamaLM, built at the
  first call (its programs compiled then, once), scores every call; only its params change."""

  def __init__(self, setup, tok, tasks: list[str], *, include_path: str | None = None,
               num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
               max_length: int | None = None, stop_ids=(), seed: int = 0):
    """Arguments as harness.tasks.run_tasks's (limit 0 or None: every document) and harness.lm.LlamaLM's
    (max_length None: the model's max_seq_len)."""
    self._setup, self._tok, self.tasks = setup, tok, list(tasks)
    self._run_args = dict(include_path=include_path or None, num_fewshot=num_fewshot, limit=limit or None,
                          seed=seed)
    self._lm_args = dict(batch_size=batch_size, max_length=max_length, stop_ids=list(stop_ids), seed=seed)
    self._lm = None

  @classmethod
  def from_config(cls, setup, tok, stop_ids=()):
    """The tasks of config.eval (None when config.eval.tasks is empty)."""
    e = setup.config.eval
    tasks = config_lib.eval_tasks(e)
    if not tasks:
      return None
    return cls(setup, tok, tasks, include_path=e.include_path, num_fewshot=e.num_fewshot, limit=e.harness_limit,
               batch_size=e.harness_batch_size, stop_ids=stop_ids, seed=setup.config.seed)

  def __call__(self, params) -> dict | None:
    from llama_jax.harness import lm as lm_lib  # noqa: PLC0415  (lm-eval is imported only where tasks run)
    from llama_jax.harness import tasks as tasks_lib  # noqa: PLC0415
    if self._lm is None:
      self._lm = lm_lib.LlamaLM(self._setup, params, self._tok, **self._lm_args)
    else:
      self._lm.params = params  # the same shapes and shardings: the compiled calls are reused
    return tasks_lib.run_tasks(self._lm, self.tasks, **self._run_args)


def check_tasks(tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None):
  """llama_jax.harness.tasks.check_tasks (one line for an unknown task, a dataset not on disk, too many
  few-shot examples, a limit < 1), imported only when there are tasks."""
  if tasks:
    from llama_jax.harness import tasks as tasks_lib  # noqa: PLC0415
    tasks_lib.check_tasks(tasks, include_path or None, num_fewshot, limit)


def task_metrics(results: dict | None) -> dict:
  """The flat {"<task>/<metric>": value} of lm-eval results (harness.tasks.summary); {} for None (the
  processes other than 0)."""
  if results is None:
    return {}
  from llama_jax.harness import tasks as tasks_lib  # noqa: PLC0415
  return tasks_lib.summary(results)


def exact_match(setup, params, tok, corpus, max_examples: int, batch_size: int = 64,
                stop_ids: list[int] | None = None) -> dict:
  """Greedy answers to the first `max_examples` (prompt, response) pairs of a corpus: the fraction
  whose answer is exactly the response's tokens followed by EOS (as trained: data.encode_pair) or
  another of `stop_ids` (the run's, run_setup.stop_ids). A prompt that leaves no room for the longest
  answer within model.max_seq_len loses its start (after BOS), as in training."""
  stop = list(dict.fromkeys([*(stop_ids or []), tok.eos_id]))
  examples = []
  for pair in corpus.documents(None):
    if len(examples) == max_examples:
      break
    if pair is not None:
      ids, loss = data_lib.encode_pair(tok, *pair)
      start = int(np.argmax(loss))
      examples.append((ids[:start].tolist(), ids[start:].tolist()))
  if not examples:
    raise config_lib.ConfigError(f"exact match: corpus {corpus.spec!r} has no prompt/response pairs")
  max_new = max(len(answer) for _, answer in examples)
  room = setup.llama.max_seq_len - max_new  # prompt tokens that fit, BOS included
  if room < 2:
    raise config_lib.ConfigError(f"exact match: an answer of {max_new} tokens leaves no room for a prompt in "
                                 f"model.max_seq_len={setup.llama.max_seq_len}")
  generator = generate_lib.Generator(setup.graphdef, setup.llama, setup.mesh)
  correct = 0
  for i in range(0, len(examples), batch_size):
    batch = examples[i:i + batch_size]
    prompts = [prompt[:1] + prompt[1:][-(room - 1):] for prompt, _ in batch]
    out = generator(params, prompts, max_new, stop)
    # The answer ends in EOS (data.encode_pair); any stop id ends it as well.
    correct += sum(bool(new) and new[-1] in stop and new[:-1] == answer[:-1] for new, (_, answer) in zip(out.ids, batch))
  return {"exact_match": correct / len(examples), "exact_match_examples": len(examples)}


def evaluate_checkpoint(workdir: str, step: int | None = None, corpus_spec: str | None = None,
                        exact_match_examples: int = 0, data_format: str | None = None,
                        dtype: str | None = None, seq_len: int | None = None,
                        batch_size: int | None = None) -> dict:
  """Loads WORKDIR's checkpoint (latest by default) and its config, and scores a corpus, `corpus_spec`,
  or by default the run's held-out sets (data.eval_corpus and data.eval_corpora: `report`). SFT data
  (data.format = "sft") is scored on the responses (and EOS) only, plus the exact-match accuracy of
  greedy answers to the first pairs of data.eval_corpus or --corpus (stopping at EOS and the run's stop
  ids, run_setup.stop_ids). The result: {"step", "dtype", "seq_len", **report}; "dtype" names the
  compute dtype that ran.

  Arguments and errors as load_for_eval's."""
  setup, params, tok, step, corpora = load_for_eval(workdir, step, corpus_spec=corpus_spec, data_format=data_format,
                                                    dtype=dtype, seq_len=seq_len, batch_size=batch_size)
  d = setup.config.data
  stops = run_setup.stop_ids(workdir, tok, setup.llama.vocab_size)
  result = {"step": int(step), "dtype": setup.llama.dtype, "seq_len": d.seq_len,
            **EvalSets(setup, tok, corpora)(params)}
  if d.format == "sft" and exact_match_examples > 0 and config_lib.DEFAULT_SET in corpora:
    result.update(exact_match(setup, params, tok, corpora[config_lib.DEFAULT_SET], exact_match_examples,
                              stop_ids=stops))
  return result


def load_for_eval(workdir: str, step: int | None = None, *, corpus_spec: str | None = None,
                  data_format: str | None = None, dtype: str | None = None, seq_len: int | None = None,
                  batch_size: int | None = None):
  """(setup, params, tokenizer, step, corpora) of WORKDIR's checkpoint (latest by default;
  run_setup.load_run) made ready to score: the held-out sets opened (open_eval_sets: `corpus_spec`
  alone, or the run's data.eval_corpus and data.eval_corpora), read as `data_format` (default: the
  run's data.format). `dtype` overrides the checkpoint's compute dtype (run_setup.load_run).

  seq_len, batch_size: the packed rows scored together (default: the checkpoint's data.seq_len, and
  data.batch_size / train.grad_accum_steps rows). Raises ConfigError, before the params are read or
  anything compiles, for a seq_len over the model's max_seq_len, a size below 1, or a bad held-out set
  (a name or spec: config_lib.eval_set_specs, open_eval_sets)."""
  for flag, value in (("--seq_len", seq_len), ("--batch_size", batch_size)):
    if value is not None and value < 1:
      raise config_lib.ConfigError(f"{flag}={value}: must be >= 1")
  corpora = {}

  def fit(setup):
    config = setup.config
    d = config.data
    if seq_len is not None:
      d.seq_len = seq_len
    if batch_size is not None:
      d.batch_size, config.train.grad_accum_steps = batch_size, 1
    if d.seq_len > setup.llama.max_seq_len:
      raise config_lib.ConfigError(
          f"--seq_len={d.seq_len} exceeds the model's max_seq_len={setup.llama.max_seq_len}" if seq_len is not None
          else f"--workdir {workdir}: its config.data.seq_len={d.seq_len} exceeds the model's max_seq_len="
               f"{setup.llama.max_seq_len}; give --seq_len (at most {setup.llama.max_seq_len})")
    chunk = config.train.loss_chunk_size
    if chunk and d.seq_len % chunk:  # the loss in chunks that divide the rows
      config.train.loss_chunk_size = math.gcd(chunk, d.seq_len)
    if data_format:
      d.format = data_format
    corpora.update(open_eval_sets(d, corpus_spec))

  setup, params, tok, step = run_setup.load_run(workdir, step, dtype=dtype, check=fit)
  return setup, params, tok, step, corpora


def check_output(path: str, flag: str = "--output"):
  """One line (ConfigError) for an output file that cannot be written (paths.check_output_file: a
  directory, a missing local parent directory, a missing bucket). Called before the work, so that no
  result is lost."""
  paths.check_output_file(path, flag)


def write_json(result: dict, path: str):
  """Writes `result` as strict JSON (non-finite floats as "inf", "-inf", "nan"), from process 0, to
  `path` (local or `gs://`) with paths.write_atomic: a reader sees the old file or the whole new one."""
  if jax.process_index() == 0:
    paths.write_atomic(path, metrics_lib.dumps(result, indent=2) + "\n")
    metrics_lib.log(f"wrote {path}")
