"""The loss, the train step and the eval step: pure functions of (state, batch), jitted by the caller.

The train state is a plain dict {"step", "params", "opt_state"} of arrays; the model's structure
(its nnx GraphDef) is static and closed over.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def loss_sums(graphdef, params, batch):
  """Summed next-token cross-entropy (fp32) over weighted targets, and the number of targets."""
  model = nnx.merge(graphdef, params)
  logits_BTV = model(batch["inputs"]).astype(jnp.float32)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  weights_BT = batch["weights"].astype(jnp.float32)
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def _micro_batches(batch, k: int):
  """[B, T] -> [k, B/k, T], micro-batch j holding rows j, j+k, ... (so each spans every data shard)."""
  def split(x):
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx, schedule, grad_accum_steps: int = 1):
  """train_step(state, batch) -> (state, metrics), gradients averaged over all target tokens."""
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    if grad_accum_steps == 1:
      (loss_sum, n_targets), grad_sums = grad_fn(params, batch)
    else:
      def accumulate(carry, micro_batch):
        (loss_sum, n_targets), grad_sums = grad_fn(params, micro_batch)
        return jax.tree.map(jnp.add, carry, (loss_sum, n_targets, grad_sums)), None
      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
      (loss_sum, n_targets, grad_sums), _ = jax.lax.scan(
          accumulate, zeros, _micro_batches(batch, grad_accum_steps))
    # Normalising by the tokens of the whole batch makes k micro-batches equal one big batch.
    n_targets = jnp.maximum(n_targets, 1.0)
    grads = jax.tree.map(lambda g: g / n_targets, grad_sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = {"loss": loss_sum / n_targets, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"]), "num_targets": n_targets}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef):
  """eval_step(params, batch) -> (summed NLL in nats, number of targets)."""
  def eval_step(params, batch):
    return loss_sums(graphdef, params, batch)
  return eval_step
