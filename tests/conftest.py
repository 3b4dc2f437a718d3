"""Eight fake CPU devices for the sharding tests (set before jax is imported), and tiny configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import tiny  # noqa: E402


def tiny_test_config(**overrides):
  """configs/tiny.py shrunk to seconds: 1 layer, short windows, small batches."""
  c = tiny.get_config()
  c.model.vocab_size = 320
  c.model.dim = 32
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.ffw_dim = 64
  c.model.max_seq_len = 32
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.eval_corpus = "shakespeare:heldout"
  c.optim.warmup_steps = 2
  c.train.steps = 8
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.train.async_checkpoint = False
  c.sample.max_new_tokens = 5
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture
def one_device():
  return jax.devices()[:1]
