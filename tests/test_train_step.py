"""The train step: gradient accumulation and mixed precision."""

import collections

import jax
import numpy as np
import pytest

from conftest import tiny_test_config
from llama_jax import data as data_lib, run_setup
from test_sharding import _train_losses


def _batch(B=8, T=32, V=320, seed=0):
  rng = np.random.default_rng(seed)
  windows = rng.integers(3, V, (B, T + 1), dtype=np.int32)
  weights = np.ones((B, T), np.int32)
  # Micro-batches (rows j, j+4, ...) get very different numbers of target tokens.
  weights[0, 5:] = 0
  weights[4, :] = 0
  weights[1, 20:] = 0
  weights[3, 1:] = 0
  return dict(data_lib.dense_batch(windows), weights=weights)


def _two_steps(grad_accum_steps, batch):
  """Params after two steps: the first has warmup lr 0, the second a real update."""
  config = tiny_test_config(**{"train.grad_accum_steps": grad_accum_steps})
  setup = run_setup.Setup(config, jax.devices()[:1])
  state = setup.init_state()
  init = jax.device_get(state["params"])
  step = setup.jit_train_step()
  with jax.set_mesh(setup.mesh):
    for _ in range(2):
      state, metrics = step(state, setup.global_batch(batch))
  return init, jax.device_get(state["params"]), jax.device_get(metrics)


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
  batch = _batch()
  init, params_1, metrics_1 = _two_steps(1, batch)
  _, params_4, metrics_4 = _two_steps(4, batch)
  assert metrics_1["learning_rate"] > 0
  assert metrics_1["num_targets"] == metrics_4["num_targets"] == batch["weights"].sum()
  np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params_1, init)
  assert min(jax.tree.leaves(moved)) > 1e-4  # every parameter was updated
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_4, params_1)


def _dot_dtypes(config):
  """Operand types of the dots in the train step's lowered StableHLO, as written there."""
  import re
  setup = run_setup.Setup(config, jax.devices()[:1])
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.batch_sharding), _batch())
  with jax.set_mesh(setup.mesh):
    text = setup.jit_train_step().lower(setup.abstract_state, batch).as_text()  # StableHLO
  # The first operand's element type: a dot may accumulate bf16 operands into an fp32 result
  # (attention.py), so the result's type does not say what the matmul runs in.
  types = re.findall(r"stablehlo\.dot_general [^\n]*: \(tensor<(?:\d+x)*(\w+)>", text)
  return collections.Counter({"bf16": "bf16", "f32": "f32"}.get(t, t) for t in types)


def test_bf16_compute_really_computes_in_bf16():
  bf16 = _dot_dtypes(tiny_test_config(**{"model.dtype": "bfloat16"}))
  fp32 = _dot_dtypes(tiny_test_config())
  assert fp32 and set(fp32) == {"f32"}
  # The blocks' and the LM head's matmuls, forward and backward, run in bf16.
  assert bf16["bf16"] >= 0.75 * sum(fp32.values()), bf16


def test_bf16_compute_trains_like_fp32():
  fp32, _ = _train_losses(tiny_test_config(), jax.devices()[:1], 50)
  bf16, _ = _train_losses(tiny_test_config(**{"model.dtype": "bfloat16"}), jax.devices()[:1], 50)
  assert fp32[-1] < fp32[0] - 0.5
  assert bf16[-1] == pytest.approx(fp32[-1], rel=0.03)


def test_chunked_loss_equals_whole_sequence_loss():
  from llama_jax import train_step as step_lib
  config = tiny_test_config()
  setup = run_setup.Setup(config, jax.devices()[:1])
  params = setup.init_state()["params"]
  batch = _batch()
  grad = lambda chunk: jax.jit(jax.value_and_grad(
      lambda p: step_lib.loss_sums(setup.graphdef, p, batch, chunk)[0]))(params)
  (whole, grads_whole), (chunked, grads_chunked) = grad(0), grad(8)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  # Chunks sum the embedding gradient in another order: fp32 rounding, not a different result.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_chunked, grads_whole)


def test_weight_decay_skips_norms_and_the_embedding():
  from flax import nnx
  from llama_jax import model as model_lib, optim
  params = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(model_lib.PRESETS["tiny"]), nnx.Param))
  mask = optim.decay_mask(params)
  assert not mask["embed_VD"] and not mask["final_norm"]["scale"]
  assert not mask["blocks"]["attn_norm"]["scale"] and not mask["blocks"]["mlp_norm"]["scale"]
  assert mask["blocks"]["attn"]["wq_DNH"] and mask["blocks"]["mlp"]["w_down_FD"]


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_hand_written_loss_gradient_equals_autodiff_of_optax(tie_embeddings):
  """loss_sums' custom-VJP cross-entropy against optax on the full logits, differentiated by JAX."""
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from llama_jax import train_step as step_lib
  config = tiny_test_config(**{"model.tie_embeddings": tie_embeddings})
  setup = run_setup.Setup(config, jax.devices()[:1])
  params = setup.init_state()["params"]
  batch = _batch()

  def reference(p):
    model = nnx.merge(setup.graphdef, p)
    x_BTD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits_BTV = model.logits(x_BTD).astype(jnp.float32)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return jnp.sum(nll_BT * batch["weights"])

  ours, grads = jax.jit(jax.value_and_grad(lambda p: step_lib.loss_sums(setup.graphdef, p, batch)[0]))(params)
  ref, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  # fp32 rounding only: the tolerance of test_chunked_loss_equals_whole_sequence_loss.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)
