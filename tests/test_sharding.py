"""Sharded training on 8 fake CPU devices equals one device; shardings are what the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import config_lib, corpus, data as data_lib, run_setup


def _train_losses(config, devices, steps):
  setup = run_setup.Setup(config, devices)
  run_setup.check_batch(config, setup.mesh)
  # Packed rows of the plays, bytes as tokens (no tokenizer to train), masks and all.
  batches = iter(data_lib.train_batches(corpus.open_corpus("shakespeare:train"), ByteTokenizer(), config.data))
  state = setup.init_state()
  step_fn = setup.jit_train_step()
  losses = []
  with jax.set_mesh(setup.mesh):
    for _ in range(steps):
      state, metrics = step_fn(state, setup.global_batch(next(batches)))
      losses.append(float(metrics["loss"]))
  batches.close()
  return np.array(losses), state


@pytest.fixture(scope="module")
def single_device_run():
  return _train_losses(tiny_test_config(), jax.devices()[:1], 20)


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_sharded_training_equals_one_device(single_device_run, mesh):
  config = tiny_test_config(**{f"mesh.{k}": v for k, v in mesh.items()})
  losses, state = _train_losses(config, jax.devices(), 20)
  expected_losses, expected_state = single_device_run
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(state["params"]), jax.device_get(expected_state["params"]))


def test_param_and_optimizer_shardings_follow_the_rules():
  config = tiny_test_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  setup = run_setup.Setup(config, jax.devices())
  state = setup.init_state()
  params = state["params"]
  assert params["embed_VD"].sharding.spec == P("tensor", "fsdp")
  assert params["blocks"]["attn"]["wq_DNH"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["blocks"]["attn"]["wo_NHD"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert params["blocks"]["mlp"]["w_down_FD"].sharding.spec == P(None, "tensor", "fsdp")
  assert params["blocks"]["attn_norm"]["scale"].sharding.spec == P(None, "fsdp")
  # Each device holds 1/4 of wq: split over fsdp (2) and tensor (2), replicated over data.
  wq = params["blocks"]["attn"]["wq_DNH"]
  assert wq.addressable_shards[0].data.size == wq.size // 4
  adam = state["opt_state"][1][0]
  assert adam.mu["blocks"]["attn"]["wq_DNH"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert state["step"].sharding.spec == P()


@pytest.mark.parametrize("mesh,overrides,message", [
    (dict(data=3, fsdp=1, tensor=1), {}, "needs 3 devices, but there are 8"),
    (dict(data=1, fsdp=-1, tensor=8), {}, "of size 2 is not divisible by mesh axes tensor = 8"),
    (dict(data=8, fsdp=1, tensor=1), {"data.batch_size": 4}, "not divisible by the 8 batch shards"),
])
def test_bad_meshes_fail_before_compiling(mesh, overrides, message):
  config = tiny_test_config(**{f"mesh.{k}": v for k, v in mesh.items()}, **overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    setup = run_setup.Setup(config, jax.devices())
    run_setup.check_batch(config, setup.mesh)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  from llama_jax import checkpoint as ckpt_lib
  saved_setup = run_setup.Setup(tiny_test_config(**{"mesh.fsdp": 8}), jax.devices())
  state = saved_setup.init_state()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.save(0, state, saved_setup.config)
  ckpt.wait()

  other = run_setup.Setup(tiny_test_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), jax.devices())
  restored = ckpt.restore_state(0, other.abstract_state)
  wq = restored["params"]["blocks"]["attn"]["wq_DNH"]
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  params_only = ckpt.restore_params(0, run_setup.Setup(tiny_test_config(), jax.devices()[:1]).abstract_state["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_only), jax.device_get(state["params"]))
