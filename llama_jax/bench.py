"""The train step alone, on random tokens: compile time, step time, tokens/s and MFU.

  python -m llama_jax.bench --config configs/tiny.py [--steps 20] [--config.model.dtype=bfloat16]
"""

import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llama_jax import data as data_lib
from llama_jax import entry
from llama_jax import flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after one warm-up step).")
flags.mark_flags_as_required(["config"])


def bench(config, steps: int) -> dict:
  from llama_jax import run_setup

  setup = run_setup.Setup(config)
  run_setup.check_batch(config, setup.mesh)
  B, T, V = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  rng = np.random.default_rng(0)
  windows = rng.integers(0, V, (B, T + 1), dtype=np.int32)
  batch = data_lib.dense_batch(windows)
  state = setup.init_state()
  with jax.set_mesh(setup.mesh):
    batch = setup.global_batch(batch)
    start = time.perf_counter()
    step_fn = setup.jit_train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
  tokens_per_sec = B * T / step_s
  flops_per_token = flops.train_flops_per_token(setup.llama, T)
  peak = flops.peak_flops_per_device(jax.devices()[0]) * setup.mesh.size
  return {"compile_s": compile_s, "step_s": step_s, "tokens_per_sec": tokens_per_sec,
          "model_tflops_per_sec": tokens_per_sec * flops_per_token / 1e12,
          "mfu": tokens_per_sec * flops_per_token / peak if peak else float("nan")}


def main(argv):
  del argv

  def run():
    r = bench(_CONFIG.value, _STEPS.value)
    print(f"devices {jax.device_count()} x {jax.devices()[0].device_kind} | compile {r['compile_s']:.1f} s | "
          f"step {r['step_s'] * 1e3:.1f} ms | {r['tokens_per_sec']:,.0f} tokens/s | "
          f"{r['model_tflops_per_sec']:.3f} model TFLOP/s | MFU {r['mfu']:.1%}")

  entry.run(run)


if __name__ == "__main__":
  entry.main(main)
