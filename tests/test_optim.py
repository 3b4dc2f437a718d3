"""Optimizers, learning-rate schedules and the weight-decay mask (llama_jax/optim.py): each schedule's
learning rate against its formula written out here, the decay mask on zero gradients, muon's per-layer
orthogonalisation, each optimizer training the tiny model on a 2-way fsdp mesh, and bad values."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_test_config
from llama_jax import config_lib, model as model_lib, optim, trainer
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT_SAMPLE = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")

LR, MIN_RATIO = 1e-2, 0.1


def expected_lr(schedule, shape, t, steps, warmup, decay_steps):
  """The learning rate of 0-based step t by the schedules' definitions (README, optim.make_schedule):
  linear warmup from 0 over `warmup` steps, then per schedule; wsd's last `decay_steps` steps of
  `steps` decay from LR to LR * MIN_RATIO, reaching it at t = steps."""
  end = LR * MIN_RATIO
  if t < warmup:
    return LR * t / warmup
  if schedule == "constant":
    return LR
  if schedule in ("cosine", "linear"):
    p = min(t - warmup, steps - warmup) / (steps - warmup)
    return end + (LR - end) * ((1 + math.cos(math.pi * p)) / 2 if schedule == "cosine" else 1 - p)
  start = steps - decay_steps
  if t <= start:
    return LR
  p = min(t - start, decay_steps) / decay_steps
  return end + (LR - end) * {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - math.sqrt(p)}[shape]


def _optim_config(**overrides):
  c = tiny_test_config(**{"optim.learning_rate": LR, "optim.min_lr_ratio": MIN_RATIO, **overrides})
  config_lib.check_config(c, tokenizer=False)
  return c


@pytest.mark.parametrize("schedule,shape", [("cosine", ""), ("linear", ""), ("constant", ""), ("wsd", "linear"),
                                            ("wsd", "cosine"), ("wsd", "1-sqrt")])
def test_every_step_of_each_schedule_follows_its_formula(schedule, shape):
  overrides = {"optim.schedule": schedule, "optim.warmup_steps": 5, "train.steps": 50, "optim.decay_fraction": 0.2}
  if shape:
    overrides["optim.decay_shape"] = shape
  c = _optim_config(**overrides)
  _, lr_schedule = optim.make_optimizer(c.optim, c.train.steps)
  steps = np.arange(60)  # past train.steps too: held at the end value
  want = [expected_lr(schedule, shape, int(t), 50, 5, decay_steps=10) for t in steps]  # 10 = 0.2 * 50
  np.testing.assert_allclose(np.asarray(lr_schedule(steps)), want, rtol=2e-6, atol=1e-9)


def test_wsd_stable_phase_does_not_depend_on_train_steps():
  """A cool-down branched at step k of the stable phase sees the same learning rates up to k as a run
  planned for any length whose decay starts later: the schedules agree exactly up to the decay's start."""
  schedules = {}
  for steps in (100, 250):
    c = _optim_config(**{"optim.schedule": "wsd", "optim.warmup_steps": 10, "train.steps": steps,
                         "optim.decay_fraction": 0.2})
    schedules[steps] = optim.make_optimizer(c.optim, steps)[1]
  stable_to = 100 - 20  # the shorter run's decay starts at step 80
  np.testing.assert_array_equal(schedules[100](np.arange(stable_to + 1)), schedules[250](np.arange(stable_to + 1)))
  assert schedules[100](stable_to) == LR and schedules[100](stable_to + 1) < LR


def test_adamw_with_cosine_is_todays_chain_bit_for_bit():
  """The default optimizer is the chain every earlier checkpoint was trained with (resume and parity tests
  rely on it): clipping, then optax.adamw on warmup-cosine, no decay on norms and the embedding."""
  c = tiny_test_config()
  tx, lr_schedule = optim.make_optimizer(c.optim, 20)
  o = c.optim
  old_schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, 20,
                                                    o.learning_rate * o.min_lr_ratio)
  old_mask = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("scale", "embed_VD"), p)
  old = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                    optax.adamw(old_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=old_mask))
  params = _params(tiny_test_config())
  new_params, old_params, new_state, old_state = params, params, tx.init(params), old.init(params)
  step = jax.jit(lambda tx, grads, state, params: tx.update(grads, state, params), static_argnums=0)
  for t in range(4):
    grads = _params(c, seed=t + 1, std=1.0)
    updates, new_state = step(tx, grads, new_state, new_params)
    new_params = _apply(new_params, updates)
    updates, old_state = step(old, grads, old_state, old_params)
    old_params = _apply(old_params, updates)
    assert lr_schedule(t) == old_schedule(t)
  jax.tree.map(np.testing.assert_array_equal, (new_params, new_state), (old_params, old_state))


def _params(config, seed=0, std=0.02):
  """Random float32 numpy arrays shaped as config's model's params (nothing to compile)."""
  abstract = model_lib.abstract_model(config_lib.llama_config(config.model))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: std * rng.standard_normal(a.shape, np.float32),
                      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _apply(params, updates):
  return jax.tree.map(lambda p, u: p + np.asarray(u), params, updates)


def _names(params):
  """{path: array} of every param, the path as keystr writes it: "['blocks']['attn']['wq_DNH']"."""
  return {jax.tree_util.keystr(path): a for path, a in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("optimizer,tie,no_decay", [
    *((optimizer, False, ("norms", "embedding")) for optimizer in optim.OPTIMIZERS),  # the default mask
    ("adamw", False, ("norms", "embedding", "lm_head")), ("muon", False, ("norms", "embedding", "lm_head")),
    ("lion", True, ())])
def test_zero_gradients_decay_exactly_the_params_outside_the_mask(optimizer, tie, no_decay):
  """With zero gradients one update is the weight decay alone: p * (1 - lr * weight_decay) for a decayed
  param, and a masked group's params come back bit-identical."""
  wd = 0.1
  c = _optim_config(**{"optim.optimizer": optimizer, "optim.decay_mask": no_decay, "optim.schedule": "constant",
                       "optim.warmup_steps": 0, "optim.weight_decay": wd, "model.tie_embeddings": tie})
  tx, _ = optim.make_optimizer(c.optim, c.train.steps)
  params = _params(c)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  new = _names(_apply(params, updates))
  masked_names = {"norms": "['scale']", "embedding": "['embed_VD']", "lm_head": "['lm_head_DV']"}
  masked = {path for path in new if any(path.endswith(masked_names[g]) for g in no_decay)}
  assert ("['lm_head_DV']" in new) != tie
  assert masked or not no_decay
  for path, p in _names(params).items():
    if path in masked:
      np.testing.assert_array_equal(new[path], p, err_msg=path)
    else:
      np.testing.assert_allclose(new[path], p * (1 - LR * wd), rtol=1e-6, err_msg=path)
      assert not np.array_equal(new[path], p), path


def test_muon_orthogonalises_each_layers_matrix_and_steps_the_rest_with_adamw():
  """The first muon update of a block weight is, per layer, the Newton-Schulz orthogonalisation of that
  layer's gradient as one (fan_in, fan_out) matrix (optax's 2-D routine, applied here by hand), scaled by
  lr * 0.2 * sqrt(max(fan_in, fan_out)); the embedding's is AdamW's first step, -lr * g / (|g| + eps)."""
  c = _optim_config(**{"optim.optimizer": "muon", "optim.schedule": "constant", "optim.warmup_steps": 0,
                       "optim.weight_decay": 0.0, "optim.grad_clip": 1e9, "model.tie_embeddings": False})
  tx, _ = optim.make_optimizer(c.optim, c.train.steps)
  params = _params(c)
  grads = _params(c, seed=1, std=1.0)
  updates = jax.jit(tx.update)(grads, tx.init(params), params)[0]
  L, D, N, H, F = 2, 32, 4, 8, 64

  def reference(g_MN):
    """Jordan's quintic Newton-Schulz iteration (github.com/KellerJordan/Muon, zeropower_via_newtonschulz5)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g_MN / (jnp.linalg.norm(g_MN) + 1e-8)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(5):
      s = x @ x.T
      x = a * x + (b * s + c * s @ s) @ x
    return -LR * 0.2 * math.sqrt(max(g_MN.shape)) * (x.T if tall else x)

  blocks, block_updates = grads["blocks"], updates["blocks"]
  for name, fan_in, fan_out in (("wq_DNH", D, N * H), ("wo_NHD", N * H, D)):
    for layer in range(L):
      g = blocks["attn"][name][layer].reshape(fan_in, fan_out)
      got = block_updates["attn"][name][layer].reshape(fan_in, fan_out)
      np.testing.assert_allclose(got, reference(g), rtol=1e-4, atol=1e-7, err_msg=f"{name} layer {layer}")
  g = blocks["mlp"]["w_down_FD"][1]
  np.testing.assert_allclose(block_updates["mlp"]["w_down_FD"][1], reference(g), rtol=1e-4, atol=1e-7)
  assert g.shape == (F, D)
  g = grads["embed_VD"]
  np.testing.assert_allclose(updates["embed_VD"], -LR * g / (jnp.abs(g) + c.optim.eps), rtol=1e-5)
  assert optim.muon_labels(params)["final_norm"]["scale"] == "adamw"
  assert optim.muon_labels(params)["lm_head_DV"] == "adamw"


@pytest.fixture(scope="module")
def tokenizer_320(tmp_path_factory):
  """One 320-piece tokenizer (two plays) for the runs of this module."""
  from llama_jax import corpus, tokenizer as tok_lib  # noqa: PLC0415
  path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
  return tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:2]), 320, path).path


@pytest.mark.parametrize("optimizer", optim.OPTIMIZERS)
def test_each_optimizer_trains_the_tiny_model_with_wsd_on_a_sharded_mesh(optimizer, tmp_path, tokenizer_320):
  """200 steps of the tiny model on 2 devices, params and optimizer state sharded 2-way over fsdp (adafactor's
  with D=128, so that it factors its second moments): the logged loss falls, and the logged learning rate
  of step k (the update from k - 1) is the wsd formula's."""
  dim = 128 if optimizer == "adafactor" else 32
  config = tiny_test_config(**{
      "optim.optimizer": optimizer, "optim.schedule": "wsd", "optim.decay_shape": "1-sqrt",
      "optim.decay_fraction": 0.2, "optim.warmup_steps": 20, "optim.learning_rate": LR, "optim.min_lr_ratio": MIN_RATIO,
      "model.dim": dim, "model.ffw_dim": 2 * dim, "train.steps": 200, "train.log_every": 10,
      "train.checkpoint_every": 200, "data.eval_corpus": HELDOUT_SAMPLE, "data.tokenizer_path": tokenizer_320,
      "metrics.trackers": ("jsonl",)})
  workdir = str(tmp_path / optimizer)
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [e for e in map(json.loads, f) if "loss" in e]
  assert [e["step"] for e in train] == list(range(10, 201, 10))
  want = [expected_lr("wsd", "1-sqrt", e["step"] - 1, 200, 20, decay_steps=40) for e in train]
  np.testing.assert_allclose([e["learning_rate"] for e in train], want, rtol=2e-6)
  losses = [e["loss"] for e in train]
  assert all(map(math.isfinite, losses))
  assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("overrides,message", [
    ({"optim.optimizer": "adam"}, "config.optim.optimizer='adam' is not one of adamw, adafactor, lion, muon"),
    ({"optim.schedule": "wsd2"}, "config.optim.schedule='wsd2' is not one of cosine, wsd, linear, constant"),
    ({"optim.schedule": "wsd", "optim.decay_shape": "sqrt"}, "config.optim.decay_shape='sqrt' is not one of"),
    ({"optim.decay_mask": ("norms", "bias")}, "config.optim.decay_mask='bias' is not one of norms, embedding, lm_head"),
    ({"optim.decay_mask": ("norms", 3)}, "config.optim.decay_mask=('norms', 3): must be a tuple of parameter groups"),
    ({"optim.schedule": "wsd", "optim.decay_fraction": 0.01, "train.steps": 40}, "config.optim.decay_fraction=0.01"),
    ({"optim.schedule": "wsd", "optim.warmup_steps": 35, "train.steps": 40},
     "config.optim.warmup_steps=35 + the 8 decay steps of config.optim.decay_fraction=0.2 exceed train.steps=40"),
])
def test_bad_optim_values_are_one_config_error_naming_the_key(overrides, message):
  with pytest.raises(ConfigError) as e:
    config_lib.check_config(tiny_test_config(**overrides), tokenizer=False)
  assert message in str(e.value) and "\n" not in str(e.value)
