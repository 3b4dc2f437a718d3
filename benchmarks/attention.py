"""Attention on a CPU: train-step time and compiled memory of the tiny model by attention variant.

  .venv-test/bin/python benchmarks/attention.py --seq_lens 256,2048 [--rounds 3] [--steps 10]
  .venv-test/bin/python benchmarks/attention.py --seq_lens 1024,2048,4096 --memory_only
  JAX_PLATFORMS=cpu .venv-test/bin/python benchmarks/attention.py --topology v5p-8 --preset llama3-8b --seq_lens 8192

With --topology (a slice name of llama_jax.aot, libtpu installed, no TPU needed) it compiles the attention
alone, forward and backward (the gradient of sum(out * dout) with respect to q, k, v), for one chip of
that topology: one row of the --preset's heads in bf16, variants einsum, xla and splash (blocks of 512),
and prints XLA's temporaries of each; nothing is timed.

Variants (--variants, comma-separated):
  einsum      the model's attention before llama_jax/attention.py: a [B, T, S] boolean mask built
              from the segment ids outside the layers, dense fp32 scores, autodiff backward
              (written out below as it was, patched in for this variant only);
  default     configs/tiny.py as it is (model.attention "auto", i.e. xla on a CPU, its blocks);
  xla:Q       the xla kernel with blocks of Q queries and Q keys (Q >= T: one dense block).

Each variant is the whole train step of configs/tiny.py (--config) at data.seq_len = T, on rows
packed with documents of random lengths. Times are medians of --steps steps per round, rounds
alternating over the variants (ours then the next, --rounds times) so that a busy moment of the
machine hits every variant; the printed ratio is the einsum variant's median over each variant's.
Memory is XLA's compiled temporaries of the step (memory_analysis().temp_size_in_bytes), the
buffers live at once besides the parameters, optimizer state and batch.
"""

import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llama_jax import attention as attention_lib
from llama_jax import model as model_lib
from llama_jax import run_setup

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "2048"], "Row lengths T to measure.")
_VARIANTS = flags.DEFINE_list("variants", ["einsum", "default", "xla:256"], "Attention variants (docstring).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Compile and report memory; time nothing.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice name (llama_jax.aot): the attention alone on one chip.")
_PRESET = flags.DEFINE_string("preset", "llama3-8b", "With --topology: the model.PRESETS whose heads are used.")


def einsum_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, **unused):
  """The dense attention the model had before the kernels: mask [B, T, S] from the segment ids, fp32
  scores of every (query, key) pair, masked softmax; autodiff gives the backward pass."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  mask_BTS = jnp.tril(jnp.ones((T, T), bool))[None] & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BTKH).astype(jnp.float32) / math.sqrt(H)
  scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BTNH.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BTKH).reshape(B, T, N, H)


def packed_batch(B: int, T: int, V: int, seed: int = 0):
  """A batch of B rows of T tokens packed with documents of random lengths (1 to T/2)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
  segment_ids = np.zeros((B, T), np.int32)
  positions = np.zeros((B, T), np.int32)
  for b in range(B):
    start, doc = 0, 1
    while start < T:
      n = min(int(rng.integers(1, T // 2 + 1)), T - start)
      segment_ids[b, start:start + n], positions[b, start:start + n] = doc, np.arange(n)
      start, doc = start + n, doc + 1
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((B, T), np.int32),
          "positions": positions, "segment_ids": segment_ids}


def compile_variant(variant: str, T: int):
  """(step, temporaries in bytes): `step()` runs one train step of the variant and waits for it."""
  config = _CONFIG.value.copy_and_resolve_references()
  config.data.seq_len = T
  config.model.max_seq_len = max(config.model.max_seq_len, T)
  if variant.startswith("xla:"):
    config.model.attention = "xla"
    config.model.attention_block_q = config.model.attention_block_kv = int(variant.split(":")[1])
  elif variant not in ("einsum", "default"):
    raise app.UsageError(f"--variants: unknown variant {variant!r}")
  setup = run_setup.Setup(config)
  batch = setup.global_batch(packed_batch(config.data.batch_size, T, config.model.vocab_size))
  original = attention_lib.attend
  if variant == "einsum":
    attention_lib.attend = einsum_attention  # model.py calls attention_lib.attend while tracing
  try:
    with jax.set_mesh(setup.mesh):
      compiled = setup.jit_train_step().lower(setup.abstract_state, batch).compile()
  finally:
    attention_lib.attend = original
  state = {"state": setup.init_state()}

  def step():
    with jax.set_mesh(setup.mesh):
      state["state"], metrics = compiled(state["state"], batch)
      jax.block_until_ready(metrics)

  return step, compiled.memory_analysis().temp_size_in_bytes


def tpu_attention_memory(T: int):
  """Prints the per-chip temporaries of attention alone (forward + backward) by variant, compiled for
  one chip of --topology through libtpu."""
  from llama_jax import aot
  from llama_jax import sharding as sh
  llama = model_lib.PRESETS[_PRESET.value]
  N, K, H = llama.n_heads, llama.n_kv_heads, llama.head_dim
  devices = aot.tpu_devices(_TOPOLOGY.value)
  mesh = jax.make_mesh((1, 1, 1), sh.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices[:1])
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((1, T, N, H), (1, T, K, H), (1, T, K, H), (1, T, N, H))]
  segment_ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
  print(f"{_PRESET.value} attention alone on one {devices[0].device_kind} ({_TOPOLOGY.value}): 1 row of T={T}, "
        f"N={N}, K={K}, H={H}, bf16, forward + backward")
  for variant in ("einsum", "xla", "splash"):
    attend = einsum_attention if variant == "einsum" else functools.partial(
        attention_lib.attend, kernel=variant, block_q=512, block_kv=512)

    def grads(q, k, v, dout, segment_ids):
      loss = lambda q, k, v: jnp.sum(attend(q, k, v, segment_ids).astype(jnp.float32) * dout)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh):
      compiled = jax.jit(grads).lower(*args, segment_ids).compile()
    print(f"  {variant:7s} temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**30:8.3f} GiB", flush=True)


def main(argv):
  del argv
  if _TOPOLOGY.value:
    for T in map(int, _SEQ_LENS.value):
      tpu_attention_memory(T)
    return
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {len(jax.devices())} device(s); "
        f"config {_CONFIG.value.model.dim}d x {_CONFIG.value.model.n_layers} layers, "
        f"batch {_CONFIG.value.data.batch_size} rows")
  for T in map(int, _SEQ_LENS.value):
    steps, memory = {}, {}
    for v in _VARIANTS.value:
      steps[v], memory[v] = compile_variant(v, T)
    times = {v: [] for v in _VARIANTS.value}
    if not _MEMORY_ONLY.value:
      for v in _VARIANTS.value:
        steps[v]()  # warm-up
      for _ in range(_ROUNDS.value):
        for v in _VARIANTS.value:
          for _ in range(_STEPS.value):
            start = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - start)
    tokens = _CONFIG.value.data.batch_size * T
    base = statistics.median(times["einsum"]) if times.get("einsum") else None
    for v in _VARIANTS.value:
      line = f"T={T:5d} {v:10s} temporaries {memory[v] / 2**20:9.1f} MiB"
      if times[v]:
        median = statistics.median(times[v])
        line += f"  step {median * 1e3:8.1f} ms  {tokens / median:9.0f} tokens/s"
        if base:
          line += f"  einsum/this {base / median:5.2f}x"
      print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
