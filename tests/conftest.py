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
  c.sample.max_new_tokens = 0  # no sample (a generator compile per run); tests of samples turn it on
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture
def one_device():
  return jax.devices()[:1]


class ByteTokenizer:
  """UTF-8 bytes as tokens (id = byte + 3): a tokenizer whose output a test can predict."""

  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

  def encode(self, text):
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def pytest_terminal_summary(terminalreporter):
  """Skipped tests are named in the last lines, never passed over in silence."""
  skipped = terminalreporter.stats.get("skipped", [])
  if skipped:
    reasons = sorted({str(r.longrepr[-1]) for r in skipped if isinstance(r.longrepr, tuple)})
    terminalreporter.write_line(f"NOTE: {len(skipped)} tests did not run: {'; '.join(reasons)}", yellow=True)
