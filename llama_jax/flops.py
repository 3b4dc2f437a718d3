"""Model FLOPs per token and peak device FLOP/s, for MFU.

Training FLOPs per token = 6 * N_matmul + 6 * L * T * D, where
  N_matmul = parameters that take part in a matmul (every weight matrix, the LM head included
             even when tied to the embedding; the embedding lookup and norms are not matmuls),
  6 = 2 (multiply-add) * 3 (forward, and a backward pass costing twice the forward),
  6 * L * T * D = the attention scores and weighted sum (4 * T * D per layer and token in the
             forward pass), halved by causality, times 3 for training.
MFU = achieved model FLOP/s / peak FLOP/s of the devices (bf16 dense peak from the vendors'
tables; on CPU, a measured fp32 matmul rate).
"""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per device (one chip; one TensorCore pair on v4/v5p "megacore").
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def matmul_params(config) -> int:
  D, F, L, V = config.dim, config.ffw_dim, config.n_layers, config.vocab_size
  attn = D * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
  return L * (attn + 3 * D * F) + D * V


def train_flops_per_token(config, seq_len: int) -> float:
  return 6 * matmul_params(config) + 6 * config.n_layers * seq_len * config.dim


def mesh_peak_flops(mesh, dtype: str) -> float:
  """Peak FLOP/s of all the mesh's devices (0 for an unknown accelerator)."""
  return peak_flops_per_device(mesh.devices.flat[0], dtype) * mesh.size


def peak_flops_per_device(device, dtype: str = "float32") -> float:
  """The vendors' dense bf16 peak of a GPU/TPU; on CPU, a matmul in the compute dtype timed here."""
  if device.platform == "cpu":
    return _measured_cpu_flops(dtype)
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in device.device_kind.lower():
      return peak
  return 0.0


@functools.cache
def _measured_cpu_flops(dtype: str, n: int = 2048, repeats: int = 10) -> float:
  """The matmul rate of one CPU device in `dtype`, the best of `repeats` timed runs (~0.1 s each
  on 2 cores; on a shared machine a best of 4 came out up to 15% low, which flatters the fraction).

  2048 x 2048 (three 16 MiB operands) outgrows the caches, so this is the sustained rate a
  model's large matmuls see, not a cache-resident burst.
  """
  x = jax.device_put(jnp.ones((n, n), dtype), jax.devices("cpu")[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best
