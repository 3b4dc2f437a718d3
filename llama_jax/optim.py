"""The optimizer and its learning-rate schedule, from `config.optim`, in optax.

Every optimizer is clip_by_global_norm(optim.grad_clip) followed by one of OPTIMIZERS, stepped by
the schedule (make_schedule) and with decoupled weight decay (optim.weight_decay, scaled by the
scheduled learning rate: p -= lr_t * weight_decay * p) on every parameter outside the groups of
optim.decay_mask (DECAY_GROUPS).
"""

import difflib

import jax
import jax.numpy as jnp
import optax

from llama_jax.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon")

# optim.decay_mask's groups -> the names their parameters have in model.py (the last key of the
# param's path). The norms' scales are `scale` in every RMSNorm (attn_norm, mlp_norm, final_norm);
# lm_head_DV exists only when model.tie_embeddings is False (tied, the head is embed_VD).
DECAY_GROUPS = {
    "norms": ("scale",),
    "embedding": ("embed_VD",),
    "lm_head": ("lm_head_DV",),
}

# Muon's matrices: the block weights (model.py: Attention, MLP), each with its fan-in (the axes the
# layer contracts with its input) and fan-out axes, counted from the end so that the leading L axis
# of the stacked layers is a batch axis: each layer's weight is orthogonalised on its own, as one
# (fan_in, fan_out) matrix, the heads folded into fan-out (wq, wk, wv) or fan-in (wo).
_MUON_DIMS = {
    "wq_DNH": optax.contrib.MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "wk_DKH": optax.contrib.MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "wv_DKH": optax.contrib.MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "wo_NHD": optax.contrib.MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1),
    "w_gate_DF": optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
    "w_up_DF": optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
    "w_down_FD": optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
}
# Muon's orthogonalised update times 0.2 * sqrt(max(fan_in, fan_out)): an update RMS of about 0.2,
# AdamW's typical one (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982), so that
# one optim.learning_rate and optim.weight_decay serve the matrices and the adamw-stepped rest.
_MUON_CONSISTENT_RMS = 0.2


def _param_name(path) -> str:
  return jax.tree_util.keystr(path[-1:], simple=True)


def _choice_error(key: str, value, choices) -> ConfigError:
  close = difflib.get_close_matches(str(value), choices, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"config.{key}={value!r} is not one of {', '.join(choices)}{hint}")


def wsd_decay_steps(optim_config, total_steps: int) -> int:
  """The decay steps of the wsd schedule: round(optim.decay_fraction * total_steps), Python's round."""
  return round(optim_config.decay_fraction * total_steps)


def check_config(config) -> None:
  """ConfigError, one line naming the key, for a config.optim value make_optimizer cannot take:
  optim.optimizer, optim.schedule or optim.decay_shape not among its choices; optim.decay_mask not a
  tuple (or list) of DECAY_GROUPS names; and, for schedule "wsd", fewer than 1 decay step or
  warmup_steps + decay steps more than train.steps. Numeric ranges are config_lib.check_ranges'."""
  c = config.optim
  for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES)):
    if c[key] not in choices:
      raise _choice_error(f"optim.{key}", c[key], choices)
  groups = c.decay_mask
  if not isinstance(groups, (tuple, list)) or not all(isinstance(g, str) for g in groups):
    raise ConfigError(f"config.optim.decay_mask={groups!r}: must be a tuple of parameter groups without "
                      f"weight decay, from {', '.join(DECAY_GROUPS)}")
  for group in groups:
    if group not in DECAY_GROUPS:
      raise _choice_error("optim.decay_mask", group, tuple(DECAY_GROUPS))
  if c.schedule == "wsd":
    steps = config.train.steps
    decay = wsd_decay_steps(c, steps)
    if decay < 1:
      raise ConfigError(f"config.optim.decay_fraction={c.decay_fraction!r}: round(decay_fraction * "
                        f"train.steps={steps}) = {decay} decay steps; the wsd schedule needs at least 1")
    if c.warmup_steps + decay > steps:
      raise ConfigError(f"config.optim.warmup_steps={c.warmup_steps} + the {decay} decay steps of "
                        f"config.optim.decay_fraction={c.decay_fraction!r} exceed train.steps={steps}: "
                        "the wsd decay must start after the warmup")


def _one_minus_sqrt(peak: float, end: float, steps: int) -> optax.Schedule:
  """peak -> end over `steps`: end + (peak - end) * (1 - sqrt(t / steps)), held at end after.

  The "1-sqrt" cooldown of Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
  Fixed Training Durations" (arXiv:2405.18392)."""
  def schedule(count):
    frac = jnp.clip(count, 0, steps) / steps
    return end + (peak - end) * (1.0 - jnp.sqrt(frac))
  return schedule


def make_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """The learning rate at optimizer step t (0-based: the update that makes step t + 1; the train
  step logs it as metrics["learning_rate"] = schedule(t)). With lr = optim.learning_rate,
  W = optim.warmup_steps, S = total_steps (train.steps), end = lr * optim.min_lr_ratio:

  - every schedule warms up linearly: lr * t / W for t < W (0 at t = 0: the first update is 0).
  - "cosine" (optax.warmup_cosine_decay_schedule): for t >= W,
      end + (lr - end) * (1 + cos(pi * min(t - W, S' - W) / (S' - W))) / 2, S' = max(S, W + 1).
  - "linear": for t >= W, lr + (end - lr) * min(t - W, S'' ) / S'', S'' = max(S - W, 1).
  - "constant": lr for t >= W.
  - "wsd" (warmup-stable-decay; Hu et al. 2024, "MiniCPM", arXiv:2404.06395; Hägele et al. 2024,
    arXiv:2405.18392): with D = round(optim.decay_fraction * S) decay steps and the decay's start
    s = S - D: lr for W <= t <= s (the stable phase: it does not depend on S for t <= s), then for
    t > s, with p = min(t - s, D) / D:
      "linear"  end + (lr - end) * (1 - p),
      "cosine"  end + (lr - end) * (1 + cos(pi * p)) / 2,
      "1-sqrt"  end + (lr - end) * (1 - sqrt(p)).
  cosine, linear and wsd reach end at t = S, one past the last update (t = S - 1).
  check_config raises ConfigError for a wsd schedule whose D < 1 or W + D > S.
  """
  c = optim_config
  lr, end, warmup = c.learning_rate, c.learning_rate * c.min_lr_ratio, c.warmup_steps
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=end,
    )
  warmup_schedule = optax.linear_schedule(0.0, lr, warmup)
  if c.schedule == "constant":
    return optax.join_schedules([warmup_schedule, optax.constant_schedule(lr)], [warmup])
  if c.schedule == "linear":
    decay = optax.linear_schedule(lr, end, max(total_steps - warmup, 1))
    return optax.join_schedules([warmup_schedule, decay], [warmup])
  if c.schedule != "wsd":
    raise _choice_error("optim.schedule", c.schedule, SCHEDULES)
  decay_steps = wsd_decay_steps(c, total_steps)
  shapes = {
      "linear": lambda: optax.linear_schedule(lr, end, decay_steps),
      "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=c.min_lr_ratio),
      "1-sqrt": lambda: _one_minus_sqrt(lr, end, decay_steps),
  }
  if c.decay_shape not in shapes:
    raise _choice_error("optim.decay_shape", c.decay_shape, DECAY_SHAPES)
  return optax.join_schedules([warmup_schedule, optax.constant_schedule(lr), shapes[c.decay_shape]()],
                              [warmup, total_steps - decay_steps])


def decay_mask(params, no_decay: tuple[str, ...]):
  """A tree like `params` of bools: True for the params that get weight decay, False for those of the
  DECAY_GROUPS named in `no_decay` (optim.decay_mask), matched by the param's name (its last path key)."""
  skipped = {name for group in no_decay for name in DECAY_GROUPS[group]}
  return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) not in skipped, params)


def muon_labels(params):
  """"muon" for the block matrices muon orthogonalises (_MUON_DIMS), "adamw" for the rest (the
  embedding, the LM head, the norms' scales)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "muon" if _param_name(path) in _MUON_DIMS else "adamw", params)


def _muon_dims(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: _MUON_DIMS[_param_name(path)], params)


def _adamw(c, schedule, mask):
  return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)


def _adafactor(c, schedule, mask):
  # Factored second moments (optax's defaults: over the two largest axes of a param when both have
  # >= 128 entries, decay_rate 0.8, update clipping at block RMS 1, no first moment); the learning
  # rate an absolute step (multiply_by_parameter_scale=False), as in adamw. optax adds the decay after
  # the learning rate, so its rate is the schedule times optim.weight_decay: decoupled as elsewhere.
  return optax.adafactor(schedule, multiply_by_parameter_scale=False,
                         weight_decay_rate=lambda count: c.weight_decay * schedule(count),
                         weight_decay_mask=mask)


def _lion(c, schedule, mask):
  return optax.lion(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=mask)


def _muon(c, schedule, mask):
  # optax.contrib.muon on the block matrices (momentum optim.b1, Nesterov, 5 Newton-Schulz steps per
  # layer, _MUON_DIMS) and the adamw above on the rest. Not muon's own Adam branch: that one decays
  # every param it holds, and the norms it would hold are in the default optim.decay_mask.
  muon = optax.contrib.muon(schedule, beta=c.b1, weight_decay=c.weight_decay, weight_decay_mask=mask,
                            muon_weight_dimension_numbers=_muon_dims, consistent_rms=_MUON_CONSISTENT_RMS)
  return optax.partition({"muon": muon, "adamw": _adamw(c, schedule, mask)}, muon_labels)


_MAKERS = {"adamw": _adamw, "adafactor": _adafactor, "lion": _lion, "muon": _muon}


def make_optimizer(optim_config, total_steps: int, skip_nonfinite_steps: int = 0):
  """Returns (optax transform, learning-rate schedule) from `config.optim` (make_schedule).

  - "adamw": optax.adamw(b1, b2, eps) (Loshchilov & Hutter 2019, arXiv:1711.05101).
  - "adafactor": optax.adafactor (Shazeer & Stern 2018, arXiv:1804.04235), factored second moments;
    b1, b2 and eps do not apply (see _adafactor for the arguments).
  - "lion": optax.lion(b1, b2) (Chen et al. 2023, arXiv:2302.06675), the sign of an interpolated
    momentum; it usually wants a learning rate 3-10x below AdamW's.
  - "muon": optax.contrib.muon (Jordan 2024, github.com/KellerJordan/Muon; the form of Liu et al. 2025,
    arXiv:2502.16982, update RMS matched to AdamW's) on the block matrices, each layer's weight of the
    stacked [L, ...] params orthogonalised on its own as a (fan_in, fan_out) matrix, heads folded into
    the fan-in or fan-out (_MUON_DIMS); the embedding, LM head and norm scales take the "adamw" above.

  Each decays (decoupled, lr_t * optim.weight_decay * p) every param outside optim.decay_mask's groups.
  skip_nonfinite_steps > 0: an update whose gradients are not finite is skipped (optax's
  apply_if_finite), up to that many in a row; the next one is applied as it is.
  """
  c = optim_config
  if c.optimizer not in _MAKERS:
    raise _choice_error("optim.optimizer", c.optimizer, OPTIMIZERS)
  schedule = make_schedule(c, total_steps)
  groups = tuple(c.decay_mask)
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip),
      _MAKERS[c.optimizer](c, schedule, lambda params: decay_mask(params, groups)),
  )
  if skip_nonfinite_steps:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=skip_nonfinite_steps)
  return tx, schedule
