"""Sampling text from a model (no KV cache: each new token re-reads a fixed-size window).

  python -m llama_jax.generate --workdir runs/tiny --prompt "ROMEO." [--step N]
"""

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


def main():
  """The command line; its flags are defined here because trainer.py imports this module."""
  from absl import flags

  from llama_jax import entry
  from llama_jax import run_setup

  workdir = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and tokenizer.model.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  prompt = flags.DEFINE_string("prompt", "ROMEO.\n", "Text to continue.")
  max_new_tokens = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to sample.")
  temperature = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0: greedy).")
  seed = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["workdir"])

  def run():
    setup, params, tok, _ = run_setup.load_run(workdir.value, step.value)
    sample_config = ml_collections.ConfigDict(dict(prompt=prompt.value, max_new_tokens=max_new_tokens.value,
                                                   temperature=temperature.value, seed=seed.value))
    print(sample_text(setup, params, tok, sample_config))

  entry.main(lambda argv: entry.run(run))


if __name__ == "__main__":
  main()
