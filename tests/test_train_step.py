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
  mask = optim.decay_mask(params, ("norms", "embedding"))
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


def _reference_objective(graphdef, batch):
  """The mean cross-entropy plus z_loss * mean lse^2 over the weighted targets, written plainly on the
  full fp32 logits (optax's cross-entropy, jax.nn.logsumexp) and differentiated by JAX: PaLM's
  z-loss (Chowdhery et al. 2022, sec. 5). objective(params, z_loss) -> (value, (cross-entropy, logits))."""
  import jax.numpy as jnp
  import optax
  from flax import nnx

  def objective(params, z_loss):
    model = nnx.merge(graphdef, params)
    logits_BTV = model.logits(model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"]))
    logits_BTV = logits_BTV.astype(jnp.float32)
    weights_BT = batch["weights"].astype(jnp.float32)
    xent = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"]) * weights_BT)
    lse_sq = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BTV, axis=-1)) * weights_BT)
    n = jnp.sum(weights_BT)
    return xent / n + z_loss * lse_sq / n, (xent / n, logits_BTV)
  return objective


def _gradient_keeper():
  """An optax transform whose state is the last gradient it was given (and whose update is 0): the
  train step's gradient, read exactly from the state it returns."""
  import jax.numpy as jnp
  import optax
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_z_loss_is_the_logged_term_and_its_gradient_that_of_loss_plus_z_loss():
  """PaLM's z-loss against _reference_objective, the step run in 4 micro-batches of 8-position loss
  chunks: its sums are chunked and accumulated (a whole batch runs the same custom VJP once)."""
  from llama_jax import train_step as step_lib
  c = 0.01  # lse ~ log(320) ~ 5.8 at init: the term's gradient is ~10% of the cross-entropy's
  config = tiny_test_config(**{"optim.z_loss": c})
  setup = run_setup.Setup(config, jax.devices()[:1])
  params = jax.device_get(setup.init_state()["params"])
  batch = _batch()
  reference = jax.jit(jax.value_and_grad(_reference_objective(setup.graphdef, batch), has_aux=True))
  (objective, (xent, logits_BTV)), ref_grads = jax.device_get(reference(params, c))
  (objective_0, _), ref_grads_0 = jax.device_get(reference(params, 0.0))
  # c * mean lse^2, lse computed here in float64 from the model's logits.
  logits = np.asarray(logits_BTV, np.float64)
  top = logits.max(-1)
  lse = top + np.log(np.exp(logits - top[..., None]).sum(-1))
  w = batch["weights"].astype(np.float64)
  expected_z_loss = c * (w * lse**2).sum() / w.sum()
  np.testing.assert_allclose(objective - objective_0, expected_z_loss, rtol=1e-5)
  z_part = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_grads, ref_grads_0)
  assert max(jax.tree.leaves(z_part)) > 1e-4  # 1000x the tolerance below: the z-loss moves the gradient

  step = step_lib.make_train_step(setup.graphdef, _gradient_keeper(), setup.schedule, grad_accum_steps=4,
                                  loss_chunk_size=8, z_loss=config.optim.z_loss)
  state = {"step": np.int32(3), "params": params, "opt_state": jax.tree.map(np.zeros_like, params)}
  new_state, metrics = jax.device_get(jax.jit(step)(state, batch))
  # The logged term is the z-loss, by which the objective moved; the loss stays the cross-entropy;
  # the gradient is that of cross-entropy + z-loss (fp32 rounding only), and its norm is logged.
  np.testing.assert_allclose(metrics["z_loss"], expected_z_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], xent, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state["opt_state"],
               ref_grads)
  norm = np.sqrt(sum((np.asarray(g, np.float64)**2).sum() for g in jax.tree.leaves(ref_grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)


def test_z_loss_zero_traces_the_step_it_replaced():
  """optim.z_loss=0 compiles the train step of a config without the key (make_train_step's default):
  the same jaxpr, no z_loss metric; a positive coefficient adds both."""
  from llama_jax import train_step as step_lib
  setup = run_setup.Setup(tiny_test_config(**{"optim.z_loss": 0.0, "train.grad_accum_steps": 2}), jax.devices()[:1])
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), setup.abstract_state)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())

  def traced(**z_loss):
    step = step_lib.make_train_step(setup.graphdef, setup.tx, setup.schedule, 2, **z_loss)
    return jax.make_jaxpr(step, return_shape=True)(state, batch)

  (default, default_out), (zero, zero_out), (positive, positive_out) = traced(), traced(z_loss=0.0), traced(z_loss=1e-4)
  assert str(zero) == str(default)
  assert set(zero_out[1]) == {"loss", "grad_norm", "learning_rate", "num_targets", "nonfinite", "skipped"}
  assert set(positive_out[1]) == set(zero_out[1]) | {"z_loss"}
  assert str(positive) != str(zero)
