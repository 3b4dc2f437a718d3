"""flops.train_flops_per_token: against a count by hand, and against XLA's count of the compiled
forward and backward pass."""

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import data as data_lib
from llama_jax import flops
from llama_jax import model as model_lib
from llama_jax import train_step


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_flops_per_token_by_hand(tie_embeddings):
  config = model_lib.LlamaConfig(vocab_size=100, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffw_dim=40,
                                 tie_embeddings=tie_embeddings)  # head dim 16 / 4 = 4
  T = 8
  wq = 16 * (4 * 4)  # D x N*H = 256
  wk = 16 * (2 * 4)  # D x K*H = 128
  wv = 16 * (2 * 4)  # 128
  wo = (4 * 4) * 16  # N*H x D = 256
  gate = up = 16 * 40  # D x F = 640 each
  down = 40 * 16  # F x D = 640
  per_layer = wq + wk + wv + wo + gate + up + down  # 2688
  head = 16 * 100  # D x V = 1600, a matmul whether or not it shares the embedding's weights
  n_matmul = 3 * per_layer + head  # 9664
  assert n_matmul == 9664
  # 2 FLOPs per multiply-add, x3 for forward + backward; the attention's q.k and p.v matmuls:
  # 2 * (2 * T * D) per token and layer in the forward pass, halved by causality, x3.
  attention = 3 * (2 * 2 * T * 16 // 2) * 3  # L x causal forward x 3 = 3 x 256 x 3 = 2304
  assert flops.matmul_params(config) == n_matmul
  assert flops.train_flops_per_token(config, T) == 6 * n_matmul + attention == 60288
  if not tie_embeddings:  # the other parameters: the token embedding and 2L + 1 norm scales
    assert model_lib.count_params(config) == n_matmul + 100 * 16 + (2 * 3 + 1) * 16


# XLA counts 2 FLOPs per multiply-add of every dot, so its count of the gradient is
# 6 * N_matmul plus the attention matmuls over the full T x T scores (it cannot know that the
# masked half is wasted: 12 * L * T * D per token instead of the formula's 6), plus 1 FLOP per
# element of every elementwise op (norms, RoPE, SiLU, softmax, the mask, the cross-entropy over
# V). With D = 512 those add ~c / D per matmul FLOP for a small c: 0.5% at T = 16 and 0.6% at
# T = 512 here, so 2% leaves room for XLA versions while still telling the causal count (7.8%
# below XLA's at T = 512) from the full one. The optimizer is left out (elementwise, ~10 FLOPs a
# parameter) and the layers are unrolled: XLA's cost analysis counts a while loop's body once,
# so scan_layers would show one layer's FLOPs.
TOLERANCE = 0.02


@pytest.mark.parametrize("T, B", [(16, 2), (512, 1)])
def test_flops_per_token_against_xla(T, B):
  config = model_lib.LlamaConfig(vocab_size=1024, dim=512, n_layers=2, n_heads=8, n_kv_heads=4, ffw_dim=1536,
                                 max_seq_len=T, scan_layers=False)
  graphdef, _ = nnx.split(model_lib.abstract_model(config))
  params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model_lib.init_model(config, 0), nnx.Param)))
  batch = data_lib.dense_batch(np.zeros((B, T + 1), np.int32))
  grad = jax.grad(lambda p: train_step.loss_sums(graphdef, p, batch)[0])
  xla_per_token = jax.jit(grad).lower(params).compile().cost_analysis()["flops"] / (B * T)

  causal = flops.train_flops_per_token(config, T)
  full_attention = causal + 6 * config.n_layers * T * config.dim  # the masked half, which XLA computes
  assert 1.0 <= xla_per_token / full_attention < 1 + TOLERANCE
  if T == 512:  # the attention term is large enough here to be seen
    assert xla_per_token / causal > 1 + TOLERANCE
