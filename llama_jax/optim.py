"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms/embeddings."""

import jax
import optax


def decay_mask(params):
  """True for the matrices that get weight decay: not norm scales, not the token embedding."""
  def is_decayed(path, _):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    return name not in ("scale", "embed_VD")
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(optim_config, total_steps: int, skip_nonfinite_steps: int = 0):
  """Returns (optax transform, learning-rate schedule) from `config.optim`.

  skip_nonfinite_steps > 0: an update whose gradients are not finite is skipped (optax's
  apply_if_finite), up to that many in a row; the next one is applied as it is.
  """
  c = optim_config
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=c.learning_rate,
      warmup_steps=c.warmup_steps,
      decay_steps=max(total_steps, c.warmup_steps + 1),
      end_value=c.learning_rate * c.min_lr_ratio,
  )
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
  )
  if skip_nonfinite_steps:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=skip_nonfinite_steps)
  return tx, schedule
