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
  Requests are packed, many per row, into rows of max_length tokens (first fit, longest first; at
  most model.attention_max_segments - 1 per row so that cuDNN's packed layout holds a row with its
  padding): request k of a row has segment id k (1, 2, ...; 0 is padding) and positions 0 .. n-1,
  so attention (model.py, attention.py) keeps it to itself and it is scored as if alone in its row.
  One compiled call scores [batch_size, max_length] rows: the log-prob of each position's target and
  whether the argmax equals it, the logits formed train.loss_chunk_size positions at a time where
  that divides max_length (else all at once); the host sums each request's continuation positions.

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
up to a multiple of data x fsdp; params are used as given (sharded as Setup.params_sharding).

Multi-host: lm-eval runs on process 0 only and sees rank 0 / world_size 1. Each compiled call needs
every process, so process 0 sends each call's inputs with jax.experimental.multihost_utils.
broadcast_one_to_all, first a fixed int32 header (operation, array shape, generation settings), then
one int32 array (score: [4, batch_size, max_length] tokens, targets, positions, segment ids; generate:
[1, batch_size, max_length + 1] prompt lengths and ids); every other process calls serve(), which
receives them and runs the same call, until process 0 calls finish(). Process 0 must call finish()
(in a `finally`) or the others wait until jax's distributed timeout. With one process nothing is
broadcast and serve()/finish() return at once.
"""

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

# Operations of the multi-host protocol (header[0]).
_FINISH, _SCORE, _GENERATE = 1, 2, 3
_HEADER = 16  # int32s: op, 3 array dims, then the generation settings (_GENERATE)
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
    self._score_fn = None  # compiled on first use
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
    inputs, targets, cont_lens = [], [], []
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
    scored = self._score_sequences(inputs, targets, disable_tqdm)
    results = []
    for (key, _, _), (logprob_N, greedy_N), n in zip(requests, scored, cont_lens):
      answer = (float(np.sum(logprob_N[-n:], dtype=np.float64)), bool(np.all(greedy_N[-n:])))
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
        self._run_score(array)
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

  def _score_sequences(self, inputs, targets, disable_tqdm=False):
    """(log-probs, greedy flags) of each sequence's targets, [len] arrays, with the sequences packed
    into rows of max_length tokens."""
    L, B = self._max_length, self._batch_size
    row_of, offset_of, n_rows = pack(np.array([len(x) for x in inputs], np.int64), L, self._max_per_row)
    members = [[] for _ in range(n_rows)]
    for i, r in enumerate(row_of):
      members[r].append(i)
    out = [None] * len(inputs)
    for first in tqdm(range(0, n_rows, B), disable=disable_tqdm or n_rows <= B, desc="llama_jax scoring rows"):
      rows_4BT = np.zeros((4, B, L), np.int32)  # tokens, targets, positions, segment ids
      for b, r in enumerate(range(first, min(first + B, n_rows))):
        for segment, i in enumerate(members[r], 1):
          o, n = offset_of[i], len(inputs[i])
          rows_4BT[0, b, o:o + n] = inputs[i]
          rows_4BT[1, b, o:o + n] = targets[i]
          rows_4BT[2, b, o:o + n] = np.arange(n)
          rows_4BT[3, b, o:o + n] = segment
      _, rows_4BT = self._send(_SCORE, rows_4BT)
      logprob_BT, greedy_BT = self._run_score(rows_4BT)
      for b, r in enumerate(range(first, min(first + B, n_rows))):
        for i in members[r]:
          o, n = offset_of[i], len(inputs[i])
          out[i] = (logprob_BT[b, o:o + n], greedy_BT[b, o:o + n])
    return out

  def _run_score(self, rows_4BT):
    setup = self._setup
    if self._score_fn is None:
      replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
      self._score_fn = jax.jit(make_score_fn(setup.graphdef, setup.config.train.loss_chunk_size),
                               out_shardings=replicated)
    arrays = [jax.make_array_from_callback(a.shape, setup.batch_sharding, lambda idx, a=a: a[idx])
              for a in rows_4BT]
    with jax.set_mesh(setup.mesh):
      out = self._score_fn(self._params, *arrays)
    return sh.replicated_to_host(out)

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


def pack(lengths_N, row_len: int, max_per_row: int):
  """First-fit packing, longest first, of sequences of lengths_N (each <= row_len) into rows of
  row_len with at most max_per_row per row: (row_N, offset_N, number of rows)."""
  N = len(lengths_N)
  row_N, offset_N = np.zeros(N, np.int64), np.zeros(N, np.int64)
  free_R, count_R = np.full(N, row_len, np.int64), np.zeros(N, np.int64)
  rows = 0
  for i in np.argsort(-lengths_N, kind="stable"):
    n = lengths_N[i]
    fits = (free_R[:rows] >= n) & (count_R[:rows] < max_per_row)
    r = int(np.argmax(fits)) if fits.any() else rows
    rows = max(rows, r + 1)
    row_N[i], offset_N[i] = r, row_len - free_R[r]
    free_R[r] -= n
    count_R[r] += 1
  return row_N, offset_N, rows


def make_score_fn(graphdef, chunk_size: int = 0):
  """(params, tokens_BT, targets_BT, positions_BT, segment_ids_BT) -> (logprob_BT, greedy_BT): the fp32
  log-softmax of each position's target and whether the argmax equals it. Logits are formed chunk_size
  positions at a time where 0 < chunk_size < T divides T, else for all T at once."""

  def score_chunk(x_BCD, lm_head_DV, targets_BC):
    logits_BCV = model_lib.head_logits(x_BCD, lm_head_DV).astype(jnp.float32)
    target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    logprob_BC = target_BC - jax.nn.logsumexp(logits_BCV, axis=-1)
    return logprob_BC, jnp.argmax(logits_BCV, axis=-1) == targets_BC

  def score(params, tokens_BT, targets_BT, positions_BT, segment_ids_BT):
    model = nnx.merge(graphdef, params)
    x_BTD = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT)
    lm_head_DV = model.lm_head().astype(x_BTD.dtype)
    B, T = tokens_BT.shape
    if not (0 < chunk_size < T and T % chunk_size == 0):
      return score_chunk(x_BTD, lm_head_DV, targets_BT)

    def chunks(a_BT):  # [B, T, ...] -> [T/C, B, C, ...]
      return jnp.moveaxis(a_BT.reshape(B, T // chunk_size, chunk_size, *a_BT.shape[2:]), 1, 0)

    logprob_KBC, greedy_KBC = jax.lax.map(lambda a: score_chunk(a[0], lm_head_DV, a[1]),
                                          (chunks(x_BTD), chunks(targets_BT)))
    return (jnp.moveaxis(logprob_KBC, 0, 1).reshape(B, T), jnp.moveaxis(greedy_KBC, 0, 1).reshape(B, T))

  return score
