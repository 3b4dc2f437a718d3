"""The loss, the train step and the eval step: pure functions of (state, batch), jitted by the caller.

The train state is a plain dict {"step", "params", "opt_state"} of arrays; the model's structure
(its nnx GraphDef) is static and closed over.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama_jax import model as model_lib
from llama_jax import sharding as sh


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cross_entropy_sum(x_BTD, lm_head_DV, targets_BT, weights_BT, z_loss: float = 0.0):
  """(sum(weights * next-token NLL), z_loss * sum(weights * lse^2)) of the logits x_BTD @ lm_head_DV, fp32.

  The first is the value of optax.softmax_cross_entropy_with_integer_labels on the logits; the
  second is the auxiliary z-loss of PaLM (Chowdhery et al. 2022, sec. 5), lse = log(Z) = log sum
  exp(logits) per position, which keeps log(Z) near 0. `z_loss` is a static Python float; at 0 the
  second value is a constant 0 and nothing of it is computed.

  The gradient is written out: d NLL/dlogits = softmax - one_hot and d(c lse^2)/dlogits =
  2c lse softmax, so (softmax * (1 + 2c lse) - one_hot) * weights is formed once and fed to the two
  matmuls of dx and dW. Left to autodiff, XLA scatters the one-hot and transposes the [B, T, V]
  gradient before the dW matmul (the LM head and loss ran 1.5x slower on CPU). No gradient flows
  to the targets or the weights.
  """
  return _cross_entropy_fwd(x_BTD, lm_head_DV, targets_BT, weights_BT, z_loss)[0]


def _cross_entropy_fwd(x_BTD, lm_head_DV, targets_BT, weights_BT, z_loss):
  logits_BTV = model_lib.head_logits(x_BTD, lm_head_DV)
  logits32_BTV = logits_BTV.astype(jnp.float32)
  max_BT = jnp.max(logits32_BTV, axis=-1)
  # exp(logits - max) is summed where it is made: "logits - max" is never written out whole.
  lse_BT = jnp.log(jnp.sum(jnp.exp(logits32_BTV - max_BT[..., None]), axis=-1)) + max_BT
  target_BT = jnp.take_along_axis(logits32_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll = jnp.sum((lse_BT - target_BT) * weights_BT)
  z = z_loss * jnp.sum(jnp.square(lse_BT) * weights_BT) if z_loss else jnp.zeros((), jnp.float32)
  # The logits (not an fp32 log-softmax) are kept: recomputing them would cost a third matmul.
  return (nll, z), (x_BTD, lm_head_DV, logits_BTV, lse_BT, targets_BT, weights_BT)


def _cross_entropy_bwd(z_loss, residuals, g):
  x_BTD, lm_head_DV, logits_BTV, lse_BT, targets_BT, weights_BT = residuals
  g_nll, g_z = g
  one_hot_BTV = jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32)
  softmax_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - lse_BT[..., None])
  if z_loss:  # d(c lse^2)/dlogits = 2c lse softmax, on the softmax the NLL's gradient has anyway
    dlogits_BTV = (softmax_BTV * (g_nll + 2 * z_loss * g_z * lse_BT)[..., None] - one_hot_BTV * g_nll) * (
        weights_BT[..., None])
  else:
    dlogits_BTV = (softmax_BTV - one_hot_BTV) * (g_nll * weights_BT)[..., None]
  dlogits_BTV = sh.constrain(dlogits_BTV.astype(logits_BTV.dtype), (sh.BATCH, sh.SEQ, sh.VOCAB))
  dx_BTD = jnp.einsum("BTV,DV->BTD", dlogits_BTV, lm_head_DV)
  dlm_head_DV = jnp.einsum("BTD,BTV->DV", x_BTD, dlogits_BTV)
  return dx_BTD, dlm_head_DV, None, None


cross_entropy_sum.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def loss_terms(graphdef, params, batch, loss_chunk_size: int = 0, z_loss: float = 0.0):
  """(summed next-token cross-entropy, summed z-loss term, number of targets), fp32, over weighted
  targets; the z-loss term is z_loss * sum(weights * lse^2) (cross_entropy_sum), 0 at z_loss=0.

  loss_chunk_size > 0 computes logits for that many positions at a time, recomputing them in
  the backward pass, so the fp32 [B, T, V] logits never exist whole (they dominate memory at
  Llama-3's 128k vocabulary).
  """
  model = nnx.merge(graphdef, params)
  # Packed rows: attention stays within a document and positions restart in each (data.py).
  x_BTD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
  weights_BT = batch["weights"].astype(jnp.float32)
  lm_head_DV = model.lm_head().astype(x_BTD.dtype)

  def sums(x_BCD, targets_BC, weights_BC):
    return cross_entropy_sum(x_BCD, lm_head_DV, targets_BC, weights_BC, z_loss)

  T = x_BTD.shape[1]
  if not 0 < loss_chunk_size < T:
    return *sums(x_BTD, batch["targets"], weights_BT), jnp.sum(weights_BT)

  def chunks(a_BT):  # [B, T, ...] -> [T/C, B, C, ...]
    return jnp.moveaxis(a_BT.reshape(a_BT.shape[0], T // loss_chunk_size, loss_chunk_size, *a_BT.shape[2:]), 1, 0)

  chunk_sums = jax.checkpoint(lambda args: sums(*args))
  nll, z = jax.lax.map(chunk_sums, (chunks(x_BTD), chunks(batch["targets"]), chunks(weights_BT)))
  return jnp.sum(nll), jnp.sum(z), jnp.sum(weights_BT)


def loss_sums(graphdef, params, batch, loss_chunk_size: int = 0):
  """Summed next-token cross-entropy (fp32) over weighted targets, and the number of targets
  (loss_terms without the z-loss: what eval scores)."""
  nll, _, n_targets = loss_terms(graphdef, params, batch, loss_chunk_size)
  return nll, n_targets


def _micro_batches(batch, k: int):
  """[B, T] -> [k, B/k, T], micro-batch j holding rows j, j+k, ... (so each spans every data shard)."""
  def split(x):
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx, schedule, grad_accum_steps: int = 1, loss_chunk_size: int = 0,
                    skip_nonfinite_steps: int = 0, z_loss: float = 0.0):
  """train_step(state, batch) -> (state, metrics), gradients averaged over all target tokens.

  The gradient is that of metrics["loss"] (the mean cross-entropy) plus, where z_loss > 0,
  metrics["z_loss"]: z_loss * the mean of lse^2 over the same targets (loss_terms; at z_loss=0 the
  key is absent and nothing of the z-loss is computed).
  metrics["nonfinite"] is True when the loss or the gradient norm is not finite and the update
  was applied anyway; metrics["skipped"] when it was skipped (see optim.make_optimizer).
  """
  def objective(params, batch):  # the summed loss that is differentiated, and the sums of the step
    nll_sum, z_sum, n_targets = loss_terms(graphdef, params, batch, loss_chunk_size, z_loss)
    sums = {"loss": nll_sum, "n_targets": n_targets}
    if z_loss:
      sums["z_loss"] = z_sum
      return nll_sum + z_sum, sums
    return nll_sum, sums

  grad_fn = jax.grad(objective, has_aux=True)
  sum_names = ("loss", "n_targets", "z_loss") if z_loss else ("loss", "n_targets")

  def train_step(state, batch):
    params = state["params"]
    if grad_accum_steps == 1:
      grad_sums, sums = grad_fn(params, batch)
    else:
      def accumulate(carry, micro_batch):
        grad_sums, sums = grad_fn(params, micro_batch)
        return jax.tree.map(jnp.add, carry, (grad_sums, sums)), None
      zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.zeros(()) for k in sum_names})
      (grad_sums, sums), _ = jax.lax.scan(accumulate, zeros, _micro_batches(batch, grad_accum_steps))
    # Normalising by the tokens of the whole batch makes k micro-batches equal one big batch.
    n_targets = jnp.maximum(sums["n_targets"], 1.0)
    loss = sums["loss"] / n_targets
    grad_norm = optax.tree.norm(grad_sums) / n_targets
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite loss makes the gradients non-finite too, so that apply_if_finite sees it.
    grads = jax.tree.map(lambda g: jnp.where(finite, g / n_targets, jnp.nan), grad_sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    skipped = jnp.zeros((), bool)
    if skip_nonfinite_steps:  # apply_if_finite skipped it, unless too many came in a row
      skipped = ~finite & (opt_state.notfinite_count <= skip_nonfinite_steps)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
               "num_targets": n_targets, "nonfinite": ~finite & ~skipped, "skipped": skipped}
    if z_loss:
      metrics["z_loss"] = sums["z_loss"] / n_targets
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, loss_chunk_size: int = 0):
  """eval_step(params, batch) -> (summed NLL in nats, number of targets, UTF-8 bytes of the documents)."""
  def eval_step(params, batch):
    nll, count = loss_sums(graphdef, params, batch, loss_chunk_size)
    return nll, count, jnp.sum(batch["num_bytes"])
  return eval_step
