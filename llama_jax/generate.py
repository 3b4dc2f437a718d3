"""Sampling text from a model (no KV cache: each new token re-reads a fixed-size window).

  python -m llama_jax.generate --workdir runs/tiny --prompt "ROMEO." [--step N]
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from flax import nnx

from llama_jax import sharding as sh


def sample(graphdef, params, prompt_ids, max_new_tokens: int, window: int, temperature: float, seed: int):
  """Appends max_new_tokens sampled tokens (greedy if temperature == 0) to prompt_ids."""

  @jax.jit
  def next_token(params, tokens_1W, last, key):
    logits_V = nnx.merge(graphdef, params)(tokens_1W)[0, last].astype(jnp.float32)
    if temperature == 0:
      return jnp.argmax(logits_V)
    return jax.random.categorical(key, logits_V / temperature)

  ids = list(prompt_ids)
  key = jax.random.key(seed)
  for _ in range(max_new_tokens):
    context = ids[-window:]
    tokens_1W = np.zeros((1, window), np.int32)
    tokens_1W[0, :len(context)] = context
    key, sub = jax.random.split(key)
    ids.append(int(sh.replicated_to_host(next_token(params, tokens_1W, len(context) - 1, sub))))
  return ids


def sample_text(setup, params, tok, sample_config) -> str:
  prompt_ids = tok.encode(sample_config.prompt, bos=True)
  with jax.set_mesh(setup.mesh):
    ids = sample(setup.graphdef, params, prompt_ids, sample_config.max_new_tokens,
                 setup.llama.max_seq_len, sample_config.temperature, sample_config.seed)
  new = ids[len(prompt_ids):]
  if tok.eos_id in new:
    new = new[:new.index(tok.eos_id)]
  return sample_config.prompt + tok.decode(new)


def main(argv=None):
  from llama_jax import config_lib
  from llama_jax import trainer

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--prompt", default="ROMEO.\n")
  parser.add_argument("--max_new_tokens", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    setup, params, tok, _ = trainer.load_run(args.workdir, args.step)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  sample_config = ml_collections.ConfigDict(dict(prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                                 temperature=args.temperature, seed=args.seed))
  print(sample_text(setup, params, tok, sample_config))


if __name__ == "__main__":
  main()
