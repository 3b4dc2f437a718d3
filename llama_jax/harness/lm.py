"""LlamaLM: lm-evaluation-harness's model interface (lm_eval.api.model.TemplateLM) over our jitted model.

It scores and generates in this process, on the setup's mesh, and gives what lm-eval's `hf` backend
(lm_eval/models/huggingface.py, lm-eval 0.4.13) gives for the same Llama checkpoint and tokenizer; the
token-level rules below are that backend's.

Tokens (TemplateLM.loglikelihood and _encode_pair, inherited, turn text into token ids through these):
  tok_encode(s) = [BOS] + ids(s), and ids(s) alone with add_special_tokens=False: what transformers'
  tokenizer of our exported checkpoint (AutoTokenizer on export-hf's tokenizer.model) gives with
  add_bos_token=True, so hf matches us with model_args add_bos_token=True; without it that tokenizer
  adds no BOS (the hub's Llama tokenizers add it by default). prefix_token_id = BOS (the context of an
  empty-context request), eot_token_id = EOS.
  tok_decode drops the tokenizer's special ids (Tokenizer.special_tokens: control and unknown pieces,
  Llama 3's 256 specials), as transformers' decode with skip_special_tokens=True. Text that spells a
  special token ("<s>") is encoded as plain text, where transformers would map it to the token.

loglikelihood, per (context_ids, continuation_ids) request, in request order:
  (sum of log p(continuation token | everything before it), whether every continuation token is the
  argmax), log-softmax in fp32. A request longer than max_length + 1 tokens is cut from the left as hf
  does (_loglikelihood_tokens): input = (ctx + cont)[-(max_length + 1):][:-1], the targets the same
  window shifted by one, the continuation its last len(cont) targets; counted in truncated
  ["loglikelihood"]. A continuation longer than max_length raises ConfigError (hf asserts).
  Requests are packed, many per row (first fit, longest first; at most model.attention_max_segments
  - 1 per row so that cuDNN's packed layout holds a row with its padding): request k of a row has
  segment id k (1, 2, ...; 0 is padding) and positions 0 .. n-1, so attention (model.py, attention.py)
  keeps it to itself and it is scored as if alone in its row. Score calls (plan_calls): every call has
  batch_size * max_length tokens, in rows of T = the shortest of max_length, max_length / 2, ...
  (while whole and >= MIN_ROW = 32; row_buckets) that holds the longest request not yet scored,
  batch_size * max_length / T rows of them; the requests not yet scored fill them first fit, longest
  first. Attention then spans about the requests' lengths rather than max_length (configs/tiny.py's
  model here: 33 ms a call in rows of 256, 26 in rows of 128, 21 in rows of 64). A call runs two
  compiled functions: make_hidden_fn, the model's hidden states of the [rows, T] rows (one compiled
  shape per T used), and make_head_fn, the LM head and fp32 log-softmax at the S scored (continuation)
  positions only, gathered from them (S: a multiple of slot_quantum, an eighth of the call's tokens,
  one compiled shape per S used; logits formed train.loss_chunk_size slots at a time where that is >
  0); the host sums each request's slots. Each call is dispatched before the previous one's results
  are read.
  Speed (benchmarks/README.md, plays_speaker on a 2-core CPU): ~1000 requests/s, 3.1-3.3x lm-eval's hf
  backend at its default batch size 1, 0.9-1.0x hf at batch size 32 or 64.

loglikelihood_rolling, per document: the sum over lm_eval.utils.get_rolling_token_windows(
  tok_encode(doc), prefix BOS, max_length, context_len=1), each made disjoint (make_disjoint_window)
  and scored as a loglikelihood request (as hf: the token list starts with BOS, so the first window
  also scores BOS after the prefix BOS). Windows never exceed max_length + 1 tokens:
  truncated["loglikelihood_rolling"] stays 0.

generate_until: requests grouped by gen_kwargs and sorted longest first (lm_eval.models.utils.
  Collator, as hf), batch_size prompts per llama_jax.generate.Generator call (the KV-cache decoder).
  gen_kwargs are read by lm-eval's normalize_gen_kwargs: max_gen_toks (default the constructor's),
  do_sample / temperature / top_k / top_p (generate.Sampling; temperature 0 or do_sample false is
  greedy; the n-th Generator call of an LlamaLM draws with seed + n); any other key raises
  ConfigError. The prompt tok_encode(context) is cut from the left to max_length - max_gen_toks
  tokens (hf's tok_batch_encode left_truncate_len; counted in truncated["generate_until"]). A row
  ends at EOS or one of stop_ids, or after max_gen_toks tokens; its text is tok_decode of the new
  tokens, cut before the first occurrence of each `until` string, the EOS text ("</s>") added to them
  as hf does (handle_stop_sequences, postprocess_generated_text).

Mesh: rows are sharded over the (data, fsdp) axes (sharding.batch_sharding), so batch_size is rounded
up to a multiple of data x fsdp (and with it every score call's rows); params are used as given
(sharded as Setup.params_sharding).

Multi-host: lm-eval runs on process 0 only and sees rank 0 / world_size 1. Each compiled call needs
every process, so process 0 sends each call's inputs with jax.experimental.multihost_utils.
broadcast_one_to_all, first a fixed int32 header (operation, array shape, then the score call's rows,
T and S or the generation settings), then one int32 array (score: [1, 1, 3 * rows * T + 2 * S], the
rows' tokens, positions and segment ids, then the slots' flat positions (row * T + t) and targets;
generate: [1, batch_size, max_length + 1] prompt lengths and ids); every other process calls serve(), which
receives them and runs the same call, until process 0 calls finish(). Process 0 must call finish()
(in a `finally`) or the others wait until jax's distributed timeout. With one process nothing is
broadcast and serve()/finish() return at once.
"""

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models import utils as lm_model_utils
from tqdm import tqdm

from llama_jax import generate as gen_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sh
from llama_jax.errors import ConfigError

MIN_ROW = 32  # the shortest rows of a score call (plan_calls)

# Operations of the multi-host protocol (header[0]).
_FINISH, _SCORE, _GENERATE = 1, 2, 3
_HEADER = 16  # int32s: op, 3 array dims, then the call's shape (_SCORE) or generation settings (_GENERATE)
_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


class LlamaLM(TemplateLM):
  """lm-eval's model interface over a llama_jax model; see the module docstring."""

  def __init__(self, setup, params, tok, *, batch_size: int = 8, max_length: int | None = None,
               max_gen_toks: int = 256, stop_ids: Sequence[int] = (), seed: int = 0):
    """setup: run_setup.Setup; params: its params (sharded); tok: a llama_jax tokenizer.

    Raises ConfigError for a max_length outside [1, model.max_seq_len], a batch_size or max_gen_toks
    below 1, or a stop id outside the vocabulary.
    """
    super().__init__()
    llama = setup.llama
    max_length = llama.max_seq_len if max_length is None else max_length
    if not 1 <= max_length <= llama.max_seq_len:
      raise ConfigError(f"max_length={max_length}: must lie in [1, model.max_seq_len={llama.max_seq_len}]")
    if batch_size < 1:
      raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    if max_gen_toks < 1:
      raise ConfigError(f"max_gen_toks={max_gen_toks}: must be >= 1")
    bad = [t for t in stop_ids if not 0 <= t < llama.vocab_size]
    if bad:
      raise ConfigError(f"stop id {bad[0]} is outside the vocabulary [0, {llama.vocab_size})")
    shards = setup.mesh.shape[sh.DATA] * setup.mesh.shape[sh.FSDP]
    self._batch_size = -(-batch_size // shards) * shards
    self._max_length, self._max_gen_toks, self._seed = max_length, max_gen_toks, seed
    self._setup, self._params, self._tok = setup, params, tok
    self._special = {i: text for text, i in tok.special_tokens.items()}  # id -> its text
    self._eos_text = self._special.get(tok.eos_id)
    # Byte-fallback pieces (sentencepiece): transformers' ByteFallback decoder turns a run of them that
    # is not valid UTF-8 into one U+FFFD per piece, where sentencepiece replaces only the invalid bytes.
    # Llama 3's byte-level decode (tiktoken) already equals transformers'.
    self._byte_of = getattr(tok, "byte_pieces", {})
    piece_of = {b: i for i, b in self._byte_of.items()}
    self._replacement_ids = [piece_of[b] for b in "\ufffd".encode("utf-8")] if len(piece_of) == 256 else []
    self._stop = tuple(dict.fromkeys([tok.eos_id, *(int(t) for t in stop_ids)]))
    self._max_per_row = max(1, llama.attention_max_segments - 1)
    self._generator = gen_lib.Generator(setup.graphdef, llama, setup.mesh)
    # Score calls (compiled per shape on first use): the hidden states of packed rows, flattened to
    # [batch_size * max_length, D], then the LM head at the scored positions only.
    self._hidden_fn = jax.jit(make_hidden_fn(setup.graphdef))
    chunk = setup.config.train.loss_chunk_size
    self._replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    self._head_fn = jax.jit(make_head_fn(setup.graphdef, chunk), out_shardings=self._replicated)
    self._slot_quantum = slot_quantum(self._batch_size * max_length, chunk)
    self.score_calls = collections.Counter()  # (rows, T) -> score calls made (benchmarks/harness.py)
    self._generate_calls = 0
    self._multi = jax.process_count() > 1
    self.truncated = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}

  # -------------------------------------------------------------------------- lm-eval's interface

  @property
  def eot_token_id(self) -> int:
    return self._tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self._tok.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, params):
    """Scores with other params of the same shapes and shardings (the trainer's live params every
    eval.harness_every steps, another checkpoint's: llama_jax/eval_steps.py); the compiled calls are reused."""
    self._params = params

  def get_model_info(self) -> dict:
    """What lm-eval records in its results' "config"."""
    llama = self._setup.llama
    return {"model_num_parameters": model_lib.count_params(llama), "model_dtype": llama.dtype,
            "max_length": self._max_length, "batch_size_rows": self._batch_size}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    ids = self._tok.encode(string, bos=add_special_tokens is not False)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    """The text of `tokens` (an id or ids) as transformers' decode gives it: special ids dropped, or
    written as their text ("</s>") without skip_special_tokens."""
    ids = [tokens] if isinstance(tokens, int) else [int(t) for t in tokens]
    if skip_special_tokens:  # dropped before the byte runs are formed: a run may span a dropped id
      ids = [t for t in ids if t not in self._special]
    parts, run = [], []
    for t in ids + [None]:
      if t is not None and t not in self._special:
        run.append(t)
        continue
      if run:
        parts.append(self._tok.decode(hf_byte_runs(run, self._byte_of, self._replacement_ids)))
        run = []
      if t is not None and not skip_special_tokens:
        parts.append(self._special[t])
    return "".join(parts)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, kind: str = "loglikelihood"):
    """(sum of continuation log-probs, all greedy) per (key, context_ids, continuation_ids), in order."""
    L = self._max_length
    inputs, targets, cont_lens = [], [], []  # cont_lens: the scored (last) positions of each input
    for key, ctx, cont in requests:
      if not ctx or not cont:
        raise ConfigError(f"request {key!r}: empty {'context' if not ctx else 'continuation'} tokens")
      if len(cont) > L:
        raise ConfigError(f"request {key!r}: its continuation of {len(cont)} tokens is longer than "
                          f"max_length={L}")
      whole = list(ctx) + list(cont)
      if len(whole) > L + 1:
        self.truncated[kind] += 1
      window = whole[-(L + 1):]
      inputs.append(window[:-1])
      targets.append(window[1:])
      cont_lens.append(len(cont))
    scored = self._score_sequences(inputs, targets, cont_lens, disable_tqdm)
    results = []
    for (key, _, _), (logprob_N, greedy_N) in zip(requests, scored):
      answer = (float(np.sum(logprob_N, dtype=np.float64)), bool(np.all(greedy_N)))
      results.append(answer)
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      token_windows = lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self._max_length,
          context_len=1)
      for ctx, pred in map(lm_utils.make_disjoint_window, token_windows):
        windows.append((None, ctx, pred))
        owners.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm, kind="loglikelihood_rolling")
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owners, scores):
      totals[i] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    args = [req.args for req in requests]
    collator = lm_model_utils.Collator(args, sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                                       group_by="gen_kwargs", group_fn=lambda r: r[1])
    results = []
    bar = tqdm(total=len(args), disable=disable_tqdm, desc="llama_jax generate_until")
    for chunk in collator.get_batched(n=self._batch_size):
      contexts, all_kwargs = zip(*chunk)
      kwargs = lm_model_utils.normalize_gen_kwargs(all_kwargs[0], self._max_gen_toks)
      until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text)
      max_gen = kwargs.pop("max_gen_toks")
      sampling = _sampling(kwargs)
      max_ctx = self._max_length - max_gen
      if max_ctx < 1:
        raise ConfigError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self._max_length}")
      prompts = []
      for context in contexts:
        ids = self.tok_encode(context)
        if len(ids) > max_ctx:
          self.truncated["generate_until"] += 1
          ids = ids[-max_ctx:]
        prompts.append(ids)
      new_ids = self._generate(prompts, max_gen, sampling)
      for context, gen_kwargs, ids in zip(contexts, all_kwargs, new_ids):
        text = lm_model_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
        results.append(text)
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
      bar.update(len(contexts))
    bar.close()
    return collator.get_original(results)

  # -------------------------------------------------------------------------- multi-host

  def serve(self):
    """On a process other than 0: runs the calls process 0 broadcasts until it calls finish()."""
    if not self._multi or jax.process_index() == 0:
      return
    while True:
      header = multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.int32))
      op = int(header[0])
      if op == _FINISH:
        return
      array = multihost_utils.broadcast_one_to_all(np.zeros(tuple(header[1:4]), np.int32))
      if op == _SCORE:
        jax.block_until_ready(self._run_score(header, array))
      elif op == _GENERATE:
        self._run_generate(header, array)
      else:
        raise RuntimeError(f"LlamaLM.serve: unknown operation {op} from process 0")

  def finish(self):
    """On process 0: releases the processes in serve()."""
    if self._multi and jax.process_index() == 0:
      multihost_utils.broadcast_one_to_all(np.array([_FINISH] + [0] * (_HEADER - 1), np.int32))

  def _send(self, op: int, array, settings=()):
    """Process 0's side of one call: the header, then the array (a no-op with one process)."""
    header = np.zeros(_HEADER, np.int32)
    header[:4] = (op, *array.shape)
    header[4:4 + len(settings)] = settings
    if self._multi:
      header = multihost_utils.broadcast_one_to_all(header)
      array = multihost_utils.broadcast_one_to_all(array)
    return header, array

  # -------------------------------------------------------------------------- scoring

  def _score_sequences(self, inputs, targets, scored, disable_tqdm=False):
    """(log-probs, greedy flags) of the targets of the last scored[i] positions of each sequence i,
    [scored[i]] arrays, with the sequences packed by plan_calls. Each call is dispatched before the
    previous one's results are read, so that the host prepares a call while the last one runs."""
    calls = plan_calls(np.array([len(x) for x in inputs], np.int64), self._max_length, self._batch_size,
                       self._max_per_row)
    out = [None] * len(inputs)

    def collect(index_M, result):
      logprob_S, greedy_S = sh.replicated_to_host(result)
      ends = np.cumsum([scored[i] for i in index_M])
      for i, end in zip(index_M, ends):
        out[i] = (logprob_S[end - scored[i]:end], greedy_S[end - scored[i]:end])

    pending = None
    for T, rows, index_M, row_M, offset_M in tqdm(calls, disable=disable_tqdm or len(calls) < 2,
                                                  desc="llama_jax scoring calls"):
      rows_3BT = np.zeros((3, rows, T), np.int32)  # tokens, positions, segment ids (0: padding)
      S = -(-sum(scored[i] for i in index_M) // self._slot_quantum) * self._slot_quantum
      slots_2S = np.zeros((2, S), np.int32)  # flat position (row * T + t) and target of each scored token
      filled = 0
      segment_R = np.zeros(rows, np.int64)
      for i, r, o in zip(index_M, row_M, offset_M):
        n, m = len(inputs[i]), scored[i]
        segment_R[r] += 1
        rows_3BT[0, r, o:o + n] = inputs[i]
        rows_3BT[1, r, o:o + n] = np.arange(n)
        rows_3BT[2, r, o:o + n] = segment_R[r]
        slots_2S[0, filled:filled + m] = r * T + o + np.arange(n - m, n)
        slots_2S[1, filled:filled + m] = targets[i][n - m:]
        filled += m
      array = np.concatenate([rows_3BT.ravel(), slots_2S.ravel()])[None, None]
      result = self._run_score(*self._send(_SCORE, array, (rows, T, S)))
      self.score_calls[rows, T] += 1
      if pending is not None:
        collect(*pending)
      pending = (index_M, result)
    if pending is not None:
      collect(*pending)
    return out

  def _run_score(self, header, array):
    """Dispatches one score call (header[4:7]: rows, T, S; array: the rows' tokens, positions and
    segment ids, then the S slots' flat positions and targets): the hidden states of the packed rows,
    then the LM head at the slots. Returns the (logprob_S, greedy_S) device arrays, replicated."""
    setup = self._setup
    rows, T, S = (int(x) for x in header[4:7])
    flat = array.reshape(-1)
    rows_3BT, slots_2S = flat[:3 * rows * T].reshape(3, rows, T), flat[3 * rows * T:].reshape(2, S)
    row_arrays = [jax.make_array_from_callback(a.shape, setup.batch_sharding, lambda idx, a=a: a[idx])
                  for a in rows_3BT]
    slot_arrays = [jax.make_array_from_callback(a.shape, self._replicated, lambda idx, a=a: a[idx])
                   for a in slots_2S]
    with jax.set_mesh(setup.mesh):
      x_ND = self._hidden_fn(self._params, *row_arrays)
      return self._head_fn(self._params, x_ND, *slot_arrays)

  # -------------------------------------------------------------------------- generation

  def _generate(self, prompts, max_new_tokens: int, sampling: gen_lib.Sampling) -> list[list[int]]:
    """New ids per prompt (each ending at its first stop id, if any), batch_size prompts per call."""
    B, L = self._batch_size, self._max_length
    prompts_1BP = np.zeros((1, B, L + 1), np.int32)  # per row: length, then the ids
    for b in range(B):
      ids = prompts[b if b < len(prompts) else 0]  # fixed B rows: one compiled shape per prompt bucket
      prompts_1BP[0, b, 0] = len(ids)
      prompts_1BP[0, b, 1:1 + len(ids)] = ids
    floats = np.array([sampling.temperature, sampling.top_p], np.float64).view(np.int32)
    settings = (max_new_tokens, self._seed + self._generate_calls, sampling.top_k, *floats)
    self._generate_calls += 1
    header, prompts_1BP = self._send(_GENERATE, prompts_1BP, settings)
    return self._run_generate(header, prompts_1BP)[:len(prompts)]

  def _run_generate(self, header, prompts_1BP):
    max_new_tokens, seed, top_k = (int(x) for x in header[4:7])
    temperature, top_p = (float(x) for x in np.asarray(header[7:11], np.int32).view(np.float64))
    prompts = [row[1:1 + row[0]].tolist() for row in prompts_1BP[0]]
    out = self._generator(self._params, prompts, max_new_tokens, self._stop,
                          gen_lib.Sampling(temperature, top_k, top_p), seed)
    return out.ids


def hf_byte_runs(ids: list[int], byte_of: dict[int, int], replacement_ids: list[int]) -> list[int]:
  """`ids` with each run of consecutive byte pieces (byte_of: id -> byte) whose bytes are not valid UTF-8
  replaced by one U+FFFD (replacement_ids, its UTF-8 bytes as pieces) per piece: what transformers'
  ByteFallback decoder (tokenizers, decoders/byte_fallback.rs) makes of such a run."""
  if not byte_of or not replacement_ids:
    return ids
  out, run = [], []
  for t in ids + [None]:
    if t is not None and t in byte_of:
      run.append(t)
      continue
    if run:
      try:
        bytes(byte_of[r] for r in run).decode("utf-8")
        out.extend(run)
      except UnicodeDecodeError:
        out.extend(replacement_ids * len(run))
      run = []
    if t is not None:
      out.append(t)
  return out


def _sampling(kwargs) -> gen_lib.Sampling:
  """generate.Sampling from normalize_gen_kwargs' output (less until and max_gen_toks)."""
  unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS))
  if unknown:
    raise ConfigError(f"gen_kwargs {unknown[0]!r} is not supported by llama_jax's lm-eval backend "
                      f"(it reads until, max_gen_toks, {', '.join(_SAMPLING_KEYS)})")
  temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
  sampling = gen_lib.Sampling(temperature, int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
  sampling.check("gen_kwargs ")
  return sampling


def row_buckets(max_length: int, min_row: int = MIN_ROW) -> list[int]:
  """The row lengths of score calls, longest first: max_length, then its halves while they are whole
  and >= min_row (max_length alone if it is odd or shorter than 2 * min_row)."""
  out = [max_length]
  while out[-1] % 2 == 0 and out[-1] // 2 >= min_row:
    out.append(out[-1] // 2)
  return out


def slot_quantum(tokens: int, chunk_size: int = 0) -> int:
  """Scored slots per score call come in multiples of this: an eighth of the call's tokens, rounded up
  to a multiple of chunk_size (when > 0) so that the LM head can run chunk_size slots at a time."""
  q = max(1, tokens // 8)
  return -(-q // chunk_size) * chunk_size if chunk_size > 0 else q


def plan_calls(lengths_N, max_length: int, batch_size: int, max_per_row: int, min_row: int = MIN_ROW):
  """The score calls for sequences of lengths_N (each <= max_length), longest first.

  Each call has rows of T = the shortest of row_buckets(max_length, min_row) that holds the longest
  sequence not yet placed, and batch_size * max_length / T of them (the same tokens in every call);
  the sequences not yet placed fill them first fit, longest first (pack with max_rows).
  Returns [(T, rows, index_M, row_M, offset_M)]: each call's sequences, their rows and offsets.
  """
  buckets = row_buckets(max_length, min_row)
  remaining = np.argsort(-lengths_N, kind="stable")
  calls = []
  while remaining.size:
    T = min(b for b in buckets if b >= lengths_N[remaining[0]])
    rows = batch_size * (max_length // T)
    row_M, offset_M, _ = pack(lengths_N[remaining], T, max_per_row, max_rows=rows)
    placed = row_M >= 0
    calls.append((T, rows, remaining[placed], row_M[placed], offset_M[placed]))
    remaining = remaining[~placed]
  return calls


def pack(lengths_N, row_len: int, max_per_row: int, max_rows: int | None = None):
  """First-fit packing, longest first, of sequences of lengths_N (each <= row_len) into rows of
  row_len with at most max_per_row per row: (row_N, offset_N, number of rows). With max_rows, at most
  that many rows: the sequences that fit in none have row -1."""
  N = len(lengths_N)
  max_rows = N if max_rows is None else max_rows
  row_N, offset_N = np.full(N, -1, np.int64), np.zeros(N, np.int64)
  free_R, count_R = np.full(max_rows, row_len, np.int64), np.zeros(max_rows, np.int64)
  rows = 0
  order = np.argsort(-lengths_N, kind="stable")
  shortest = lengths_N[order[-1]] if N else 0
  room = row_len  # the most free tokens of an open row that takes more sequences (row_len: a row can open)
  for i in order:
    n = lengths_N[i]
    if n > room:
      if room < shortest:
        break  # no sequence left fits anywhere
      continue
    fits = (free_R[:rows] >= n) & (count_R[:rows] < max_per_row)
    r = int(np.argmax(fits)) if fits.any() else rows
    rows = max(rows, r + 1)
    row_N[i], offset_N[i] = r, row_len - free_R[r]
    free_R[r] -= n
    count_R[r] += 1
    open_R = count_R[:rows] < max_per_row
    room = row_len if rows < max_rows else int(np.max(free_R[:rows], where=open_R, initial=0))
  return row_N, offset_N, rows


def make_hidden_fn(graphdef):
  """(params, tokens_BT, positions_BT, segment_ids_BT) -> x_ND: the model's final-normed hidden states
  of packed rows, flattened to N = B * T positions (row b's position t at b * T + t)."""

  def hidden(params, tokens_BT, positions_BT, segment_ids_BT):
    x_BTD = nnx.merge(graphdef, params).hidden_states(tokens_BT, positions_BT, segment_ids_BT)
    return x_BTD.reshape(-1, x_BTD.shape[-1])

  return hidden


def make_head_fn(graphdef, chunk_size: int = 0):
  """(params, x_ND, index_S, targets_S) -> (logprob_S, greedy_S): at the S positions index_S of x_ND, the
  fp32 log-softmax of the LM head's logits at targets_S and whether their argmax equals it. Logits are
  formed chunk_size slots at a time where 0 < chunk_size < S divides S, else for all S at once."""

  def score_chunk(x_CD, lm_head_DV, targets_C):
    logits_CV = jnp.einsum("CD,DV->CV", x_CD, lm_head_DV).astype(jnp.float32)
    target_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    return target_C - jax.nn.logsumexp(logits_CV, axis=-1), jnp.argmax(logits_CV, axis=-1) == targets_C

  def head(params, x_ND, index_S, targets_S):
    x_SD = x_ND[index_S]
    lm_head_DV = nnx.merge(graphdef, params).lm_head().astype(x_SD.dtype)
    S = index_S.shape[0]
    if not (0 < chunk_size < S and S % chunk_size == 0):
      return score_chunk(x_SD, lm_head_DV, targets_S)
    logprob_KC, greedy_KC = jax.lax.map(lambda a: score_chunk(a[0], lm_head_DV, a[1]),
                                        (x_SD.reshape(S // chunk_size, chunk_size, -1),
                                         targets_S.reshape(S // chunk_size, chunk_size)))
    return logprob_KC.reshape(S), greedy_KC.reshape(S)

  return head
