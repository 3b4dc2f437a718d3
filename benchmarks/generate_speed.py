"""Decoding speed: the KV-cache generator against recomputing a max_seq_len window per token
(how generate.py worked before the cache), and a random model of a published size.

  python benchmarks/generate_speed.py --workdir runs/tiny --new_tokens 250
  python benchmarks/generate_speed.py --preset llama3.2-1b --new_tokens 32

Both decode greedily from one prompt; each timing excludes compilation (a first call warms up).
"""

import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from llama_jax import generate as gen_lib
from llama_jax import model as model_lib
from llama_jax import run_setup
from llama_jax import sharding as sh

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run: cached vs windowed decoding of its model.")
_PRESET = flags.DEFINE_string("preset", None, "A model.PRESETS name: cached decoding of random weights.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 250, "Tokens to generate.")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO.\n", "Prompt (--workdir).")


def windowed_greedy(graphdef, params, prompt_ids, new_tokens: int, window: int) -> tuple[list[int], float]:
  """The pre-cache decoder: each token re-runs the model over a zero-padded window of max_seq_len."""
  @jax.jit
  def next_token(params, tokens_1W, last):
    return jnp.argmax(nnx.merge(graphdef, params)(tokens_1W)[0, last])

  def run():
    ids = list(prompt_ids)
    for _ in range(new_tokens):
      context = ids[-window:]
      tokens_1W = np.zeros((1, window), np.int32)
      tokens_1W[0, :len(context)] = context
      ids.append(int(next_token(params, tokens_1W, len(context) - 1)))
    return ids[len(prompt_ids):]

  run()  # compile
  start = time.perf_counter()
  ids = run()
  return ids, time.perf_counter() - start


def cached_greedy(generator, params, prompt_ids, new_tokens: int) -> tuple[list[int], gen_lib.Generation]:
  generator(params, [prompt_ids], new_tokens, eos_id=-1)  # compile
  out = generator(params, [prompt_ids], new_tokens, eos_id=-1)
  return out.ids[0], out


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax's restore logs
  n = _NEW_TOKENS.value
  if _WORKDIR.value:
    setup, params, tok, step = run_setup.load_run(_WORKDIR.value)
    prompt_ids = tok.encode(_PROMPT.value, bos=True)
    generator = gen_lib.Generator(setup.graphdef, setup.llama, setup.mesh)
    with jax.set_mesh(setup.mesh):
      cached_ids, out = cached_greedy(generator, params, prompt_ids, n)
      windowed_ids, windowed_s = windowed_greedy(setup.graphdef, params, prompt_ids, n, setup.llama.max_seq_len)
    cached_s = out.prefill_s + out.decode_s
    print(f"{_WORKDIR.value} step {step}: {len(prompt_ids)} prompt tokens + {n} new, greedy")
    print(f"  KV cache:  {cached_s:.3f} s ({n / cached_s:,.0f} tokens/s; prefill {out.prefill_s * 1e3:.1f} ms, "
          f"{out.decode_s / max(out.decode_steps, 1) * 1e3:.2f} ms per token)")
    print(f"  windowed:  {windowed_s:.3f} s ({n / windowed_s:,.0f} tokens/s; a {setup.llama.max_seq_len}-token "
          "forward pass per token)")
    print(f"  speed-up {windowed_s / cached_s:.1f}x | same tokens: {cached_ids == windowed_ids}")
  if _PRESET.value:
    llama = model_lib.PRESETS[_PRESET.value]
    mesh = sh.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    abstract = model_lib.abstract_model(llama)
    graphdef, _ = nnx.split(abstract)
    shardings = sh.param_shardings(mesh, abstract)
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model_lib.init_model(llama, 0), nnx.Param)),
                   out_shardings=shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      params = init()
    jax.block_until_ready(params)
    print(f"{_PRESET.value}: {model_lib.count_params(llama) / 1e9:.2f}B random params made in "
          f"{time.perf_counter() - start:.1f} s")
    prompt_ids = np.random.default_rng(0).integers(0, llama.vocab_size, 16).tolist()
    generator = gen_lib.Generator(graphdef, llama, mesh)
    _, out = cached_greedy(generator, params, prompt_ids, n)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  {len(prompt_ids)} prompt tokens + {n} new: prefill {out.prefill_s:.2f} s | decode "
          f"{out.decode_steps / out.decode_s:.2f} tokens/s ({out.decode_s / out.decode_steps * 1e3:.0f} ms per token) | "
          f"peak RSS {rss_gb:.1f} GB")


if __name__ == "__main__":
  app.run(main)
