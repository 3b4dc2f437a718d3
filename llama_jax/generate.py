"""Text from a model, decoded with a KV cache.

All prompts of a batch are prefilled in one call (right-padded; row b's prompt fills cache
slots 0 .. len_b - 1), then one token per step inside a jitted `lax.while_loop`: row b's
step i feeds its previous token at position len_b + i - 1 (model.Llama.decode). The cache holds
prompt + max_new_tokens positions, never max_seq_len, and the shapes are fixed per
(batch, prompt-length bucket, max_new_tokens, stop ids), so a bucket compiles once. A row stops at
the first of its stop ids it produces: the tokenizer's EOS, or the list an HF import recorded
(run_setup.stop_ids: Llama 3 instruct's <|end_of_text|> and <|eot_id|>, kept by a run fine-tuned
from it), plus any --stop_id.

  python -m llama_jax.generate --workdir runs/tiny --prompt "ROMEO." [--prompt "JULIET." ...]
      [--max_new_tokens 100] [--temperature 0.8 --top_k 50 --top_p 0.95] [--seed 0] [--json]
      [--stop_id 128009 ...] [--dtype float32]
  python -m llama_jax.generate --workdir runs/tiny --prompt_ids "1 306 626" --temperature 0
  python -m llama_jax.generate --workdir gs://bucket/run --prompt "ROMEO." --json

The workdir may be local or on object storage (its checkpoint and files are read through
run_setup.load_run and llama_jax.paths); generate writes nothing to it.
"""

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import model as model_lib
from llama_jax import sharding as sh
from llama_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: greedy at temperature 0, else from softmax(logits / temperature)
  restricted to the top_k tokens (0: all) and to the smallest set whose probability reaches
  top_p (the nucleus; 1: all)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self, prefix: str = ""):
    """One line for a setting out of range; `prefix` says where it came from ("config.sample.", "--")."""
    if not self.temperature >= 0:
      raise ConfigError(f"{prefix}temperature={self.temperature}: must be >= 0 (0: greedy)")
    if self.top_k < 0:
      raise ConfigError(f"{prefix}top_k={self.top_k}: must be >= 0 (0: no limit)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"{prefix}top_p={self.top_p}: must lie in (0, 1]")


def sample_tokens(logits_BV, key, sampling: Sampling):
  """One token per row drawn from logits_BV per `sampling`."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  if 0 < sampling.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token is in the nucleus when the tokens above it hold less than top_p (the first always is).
    in_nucleus_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < sampling.top_p
    cutoff_B1 = jnp.take_along_axis(sorted_BV, jnp.sum(in_nucleus_BV, axis=-1, keepdims=True) - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def check_request(prompts, max_new_tokens: int, llama, name: str = "prompt"):
  """One line (ConfigError) for a request the model cannot serve, before anything compiles."""
  if not prompts:
    raise ConfigError(f"no {name} given")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  for i, ids in enumerate(prompts):
    where = f"{name} {i + 1}" if len(prompts) > 1 else name
    if len(ids) == 0:
      raise ConfigError(f"{where} is empty")
    if len(ids) + max_new_tokens > llama.max_seq_len:
      raise ConfigError(f"{where}: {len(ids)} tokens + max_new_tokens={max_new_tokens} = "
                        f"{len(ids) + max_new_tokens} > the model's max_seq_len {llama.max_seq_len}")
    bad = [t for t in ids if not 0 <= t < llama.vocab_size]
    if bad:
      raise ConfigError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {llama.vocab_size})")


@dataclasses.dataclass
class Generation:
  ids: list[list[int]]  # per prompt: the new tokens, up to and including its first stop id
  compile_s: float  # 0 when this shape bucket was compiled before
  prefill_s: float
  decode_s: float
  decode_steps: int  # steps of the decode loop after the first token (the batch's longest row)


class Generator:
  """Compiled prefill and decode loop for one model structure on one mesh; params come per call."""

  def __init__(self, graphdef, llama, mesh):
    self._graphdef, self._llama, self._mesh = graphdef, llama, mesh
    self._compiled = {}

  def __call__(self, params, prompts: list[list[int]], max_new_tokens: int, stop_ids: int | Sequence[int],
               sampling: Sampling = Sampling(), seed: int = 0) -> Generation:
    """New tokens for each prompt (lists of token ids), at most max_new_tokens per row.

    stop_ids: the id (or ids) that end a row; the row keeps the one it produced (an id outside the
    vocabulary, e.g. -1, never ends one). Raises ConfigError for a prompt or setting the model cannot
    serve, before anything compiles.
    """
    stop = (stop_ids,) if isinstance(stop_ids, int) else tuple(dict.fromkeys(int(t) for t in stop_ids))
    if not stop:
      raise ConfigError("no stop id given")
    check_request(prompts, max_new_tokens, self._llama)
    sampling.check()
    lengths = [len(p) for p in prompts]
    # Rows: a multiple of the batch shards (extra rows repeat prompt 0). Prompt length: the next
    # power of two (fewer compiles), never past what max_seq_len leaves for the new tokens.
    shards = self._mesh.shape[sh.DATA] * self._mesh.shape[sh.FSDP]
    B = -(-len(prompts) // shards) * shards
    P = min(max(8, 1 << math.ceil(math.log2(max(lengths)))), self._llama.max_seq_len - max_new_tokens)
    tokens_BP = np.zeros((B, P), np.int32)
    lengths_B = np.full((B,), lengths[0], np.int32)
    for b in range(B):
      ids = prompts[b if b < len(prompts) else 0]
      tokens_BP[b, :len(ids)] = ids
      lengths_B[b] = len(ids)
    key = jax.random.key(seed)
    compile_s = 0.0
    with jax.set_mesh(self._mesh):
      signature = (B, P, max_new_tokens, stop, sampling)
      if signature not in self._compiled:
        start = time.perf_counter()
        self._compiled[signature] = self._compile(params, tokens_BP, lengths_B, key, max_new_tokens, stop, sampling)
        compile_s = time.perf_counter() - start
      prefill, decode = self._compiled[signature]
      start = time.perf_counter()
      first_B, cache = prefill(params, tokens_BP, lengths_B, key)
      jax.block_until_ready(first_B)
      prefill_s = time.perf_counter() - start
      start = time.perf_counter()
      new_BN, steps = decode(params, first_B, lengths_B, cache, key)
      new_BN, steps = sh.replicated_to_host((new_BN, steps))
      decode_s = time.perf_counter() - start
    return Generation([_until_stop(new_BN[b], stop) for b in range(len(prompts))], compile_s, prefill_s, decode_s,
                      int(steps) - 1)

  def _compile(self, params, tokens_BP, lengths_B, key, max_new_tokens, stop, sampling):
    graphdef, llama = self._graphdef, self._llama
    B, P = tokens_BP.shape
    N = max_new_tokens
    fill = stop[0]  # what a finished row's later slots hold

    def is_stop(token_B):
      return jnp.isin(token_B, jnp.asarray(stop, jnp.int32))

    def prefill(params, tokens_BP, lengths_B, key):
      model = nnx.merge(graphdef, params)
      positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
      x_BPD, cache = model.decode(tokens_BP, positions_BP, model_lib.init_cache(llama, B, P + N))
      last_BD = x_BPD[jnp.arange(B), lengths_B - 1]
      return sample_tokens(model.logits(last_BD[:, None])[:, 0], jax.random.fold_in(key, 0), sampling), cache

    def decode(params, first_B, lengths_B, cache, key):
      model = nnx.merge(graphdef, params)

      def unfinished(carry):
        i, _, _, done_B, _ = carry
        return (i < N) & ~jnp.all(done_B)

      def step(carry):
        i, token_B, new_BN, done_B, cache = carry
        x_B1D, cache = model.decode(token_B[:, None], (lengths_B + i - 1)[:, None], cache)
        token_B = sample_tokens(model.logits(x_B1D)[:, 0], jax.random.fold_in(key, i), sampling)
        token_B = jnp.where(done_B, fill, token_B)
        return i + 1, token_B, new_BN.at[:, i].set(token_B), done_B | is_stop(token_B), cache

      new_BN = jnp.full((B, N), fill, jnp.int32).at[:, 0].set(first_B)
      carry = (jnp.int32(1), first_B, new_BN, is_stop(first_B), cache)
      i, _, new_BN, _, _ = jax.lax.while_loop(unfinished, step, carry)
      return new_BN, i

    prefill = jax.jit(prefill).lower(params, tokens_BP, lengths_B, key).compile()
    first_B, cache = prefill.out_info  # shapes and shardings the decode loop is compiled for
    # The new tokens come back whole to every process.
    replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
    decode = jax.jit(decode, out_shardings=replicated).lower(params, first_B, lengths_B, cache, key).compile()
    return prefill, decode


def _until_stop(ids_N, stop: Sequence[int]) -> list[int]:
  ids = [int(t) for t in ids_N]
  end = next((i for i, t in enumerate(ids) if t in stop), None)
  return ids if end is None else ids[:end + 1]


class TextSampler:
  """config.sample's prompt continued by a model: the end-of-training and periodic samples.
  Its settings are checked when it is made (before training), and it compiles once."""

  def __init__(self, setup, tok, sample_config, stop_ids: Sequence[int] | None = None):
    """stop_ids: the ids that end the sample (run_setup.stop_ids; default the tokenizer's EOS)."""
    self._stop = list(stop_ids) if stop_ids else [tok.eos_id]
    self._sampling = Sampling(sample_config.temperature, sample_config.top_k, sample_config.top_p)
    self._sampling.check("config.sample.")
    self._config, self._tok = sample_config, tok
    self._prompt_ids = tok.encode(sample_config.prompt, bos=True)
    self._max_new = min(sample_config.max_new_tokens, setup.llama.max_seq_len - len(self._prompt_ids))
    if sample_config.max_new_tokens > 0 and self._max_new < 1:
      raise ConfigError(f"config.sample.prompt has {len(self._prompt_ids)} tokens: no room left in "
                        f"model.max_seq_len={setup.llama.max_seq_len}")
    self._generator = Generator(setup.graphdef, setup.llama, setup.mesh)

  def __call__(self, params) -> str:
    out = self._generator(params, [self._prompt_ids], self._max_new, self._stop, self._sampling,
                          self._config.seed)
    return self._config.prompt + self._tok.decode([t for t in out.ids[0] if t not in self._stop])


def main():
  """The command line; its flags are defined here because trainer.py imports this module."""
  from absl import flags

  from llama_jax import config_lib, entry
  from llama_jax import run_setup

  workdir = flags.DEFINE_string("workdir", None, "Training workdir (or HF import) with checkpoints/ and "
                                "tokenizer.model; local or gs://.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  prompt = flags.DEFINE_multi_string("prompt", [], "Text to continue (BOS is prepended); repeat for a batch.")
  prompt_ids = flags.DEFINE_multi_string("prompt_ids", [], 'Token ids to continue, e.g. "1 306 626"; repeat for a batch.')
  max_new_tokens = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per prompt (fewer at EOS).")
  temperature = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0: greedy).")
  top_k = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
  top_p = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens with this probability (1: all).")
  seed = flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same output.")
  as_json = flags.DEFINE_bool("json", False, "Print one JSON object per prompt: prompt_ids, ids, text.")
  stop_id = flags.DEFINE_multi_integer("stop_id", [], "A token id that also ends a row, besides the run's stop ids "
                                       "(the tokenizer's EOS, or those an HF import recorded); repeatable.")
  dtype = flags.DEFINE_enum("dtype", None, list(config_lib.COMPUTE_DTYPES),
                            "Compute dtype for this call (default: the checkpoint's config.model.dtype).")
  flags.mark_flags_as_required(["workdir"])

  def run():
    if bool(prompt.value) == bool(prompt_ids.value):
      raise ConfigError("give --prompt TEXT (repeatable) or --prompt_ids 'ID ID ...', not both")
    sampling = Sampling(temperature.value, top_k.value, top_p.value)
    sampling.check("--")
    setup, params, tok, loaded_step = run_setup.load_run(workdir.value, step.value, dtype=dtype.value)
    stop = list(dict.fromkeys(run_setup.stop_ids(workdir.value, tok, setup.llama.vocab_size) + stop_id.value))
    for t in stop_id.value:
      if not 0 <= t < setup.llama.vocab_size:
        raise ConfigError(f"--stop_id {t} is outside the vocabulary [0, {setup.llama.vocab_size})")
    # On stderr, so --json's stdout stays one object per line.
    print(f"step {loaded_step} of {workdir.value}: computing in {setup.llama.dtype}; stop ids {stop}",
          file=sys.stderr)
    prompts = prompts_of(tok, prompt.value, prompt_ids.value, max_new_tokens.value, setup.llama)
    out = Generator(setup.graphdef, setup.llama, setup.mesh)(params, prompts, max_new_tokens.value, stop,
                                                             sampling, seed.value)
    for i, (ids, new) in enumerate(zip(prompts, out.ids)):
      text = tok.decode([t for t in new if t not in stop])
      if as_json.value:
        print(json.dumps({"prompt_ids": ids, "ids": new, "text": text}))
      else:
        print((prompt.value[i] if prompt.value else tok.decode(ids)) + text)
        print("---")
    if not as_json.value:
      new_tokens = sum(len(ids) for ids in out.ids) - len(out.ids)  # the decode loop's; the first come from prefill
      print(f"{len(prompts)} prompts | {setup.llama.dtype} | compile {out.compile_s:.1f} s | prefill {out.prefill_s * 1e3:.1f} ms | "
            f"decode {new_tokens / max(out.decode_s, 1e-9):,.0f} tokens/s, "
            f"{out.decode_s / max(out.decode_steps, 1) * 1e3:.2f} ms per token")

  entry.main(lambda argv: entry.run(run))


def prompts_of(tok, texts: list[str], id_strings: list[str], max_new_tokens: int, llama) -> list[list[int]]:
  """The command line's prompts as token ids: --prompt texts (BOS prepended) or --prompt_ids strings,
  checked (check_request) under the name of the flag they came from."""
  if texts:
    for i, text in enumerate(texts):
      if not text:
        raise ConfigError(f"--prompt {i + 1} is empty")
    prompts = [tok.encode(text, bos=True) for text in texts]
  else:
    prompts = [_parse_ids(s, i) for i, s in enumerate(id_strings)]
  check_request(prompts, max_new_tokens, llama, name="--prompt" if texts else "--prompt_ids")
  return prompts


def _parse_ids(text: str, i: int) -> list[int]:
  try:
    return [int(t) for t in text.replace(",", " ").split()]
  except ValueError:
    raise ConfigError(f"--prompt_ids {i + 1}: {text!r} is not a list of integers") from None


if __name__ == "__main__":
  main()
