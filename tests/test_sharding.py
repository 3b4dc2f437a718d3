"""Sharded training on 8 fake CPU devices equals one device; shardings are what the rules say; a
checkpoint loads, evaluates, generates and exports the same on device counts its dims do not divide."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import config_lib, corpus, data as data_lib, run_setup
from llama_jax import sharding as sh


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


# The one-device run computes attention with the xla kernel (auto on a CPU); the sharded splash
# run (Pallas interpret mode, under shard_map: rows over data x fsdp, heads over tensor) must equal it.
@pytest.mark.parametrize("mesh,attention", [
    (dict(data=8, fsdp=1, tensor=1), "auto"), (dict(data=1, fsdp=8, tensor=1), "auto"),
    (dict(data=2, fsdp=2, tensor=2), "auto"), (dict(data=2, fsdp=2, tensor=2), "splash")])
def test_sharded_training_equals_one_device(single_device_run, mesh, attention):
  config = tiny_test_config(**{f"mesh.{k}": v for k, v in mesh.items()}, **{"model.attention": attention})
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


# A model whose dim (36) 8 devices do not split: fsdp takes 6 of them; 3 split it.
ODD_MODEL = {"model.dim": 36, "model.n_heads": 3, "model.n_kv_heads": 3, "model.ffw_dim": 40}


def save_run(workdir, config, params=None):
  """WORKDIR with checkpoint 0 of `config` (initial params, or `params`), saved on one device, and a
  320-piece tokenizer.model: what load_run, eval.py and generate read."""
  from llama_jax import checkpoint as ckpt_lib
  from llama_jax import tokenizer as tok_lib
  os.makedirs(workdir, exist_ok=True)
  setup = run_setup.Setup(config, jax.devices()[:1])
  state = setup.init_state()
  if params is not None:
    state = dict(state, params=jax.device_put(params, setup.params_sharding))
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  ckpt.save(0, state, config, force=True)
  ckpt.wait()
  ckpt.close()
  tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:2]), 320,
                              run_setup.tokenizer_path(str(workdir)))
  return jax.device_get(state["params"])


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("odd") / "run")
  return workdir, save_run(workdir, tiny_test_config(**ODD_MODEL))


def _eval_and_generate(workdir, devices):
  from llama_jax import evaluate, generate
  setup, params, tok, _ = run_setup.load_run(workdir, devices=devices)
  heldout = corpus.open_corpus("text:" + os.path.join(os.path.dirname(__file__), "data", "heldout_sample.txt"))
  scores = evaluate.Evaluator(setup, tok, heldout)(params)
  prompts = [tok.encode("To be, or not"), tok.encode("My lord")]
  prompts = [[tok.bos_id] + p for p in prompts]
  ids = generate.Generator(setup.graphdef, setup.llama, setup.mesh)(params, prompts, 6, tok.eos_id).ids
  return setup.mesh.size, jax.device_get(params), scores, ids


def test_a_checkpoint_loads_on_device_counts_its_dims_do_not_divide(odd_run, capsys):
  workdir, saved = odd_run
  _, _, one_scores, one_ids = _eval_and_generate(workdir, jax.devices()[:1])
  for devices, used in ((jax.devices(), 6), (jax.devices()[:3], 3)):
    capsys.readouterr()
    size, params, scores, ids = _eval_and_generate(workdir, devices)
    assert size == used
    if used < len(devices):
      assert ("using 6 of the 8 devices: over all of them, param blocks/attn/wk_DKH: dim 'embed' of size 36 "
              "is not divisible by mesh axes fsdp = 8") in capsys.readouterr().out
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    assert scores["num_tokens"] == one_scores["num_tokens"]
    np.testing.assert_allclose(scores["loss"], one_scores["loss"], rtol=1e-5)
    np.testing.assert_allclose(scores["bits_per_byte"], one_scores["bits_per_byte"], rtol=1e-5)
    assert ids == one_ids


def test_export_on_8_devices_of_a_checkpoint_8_do_not_divide(odd_run, tmp_path):
  from llama_jax import convert
  workdir, saved = odd_run
  convert.export_hf(workdir, str(tmp_path / "hf"), dtype="float32")  # all 8 fake devices
  _, exported = convert.from_hf(str(tmp_path / "hf"))
  jax.tree.map(np.testing.assert_array_equal, exported, saved)


def test_an_explicit_mesh_that_does_not_divide_the_model_names_the_device_counts_that_work():
  config = tiny_test_config(**ODD_MODEL)  # mesh data=1, fsdp=-1, tensor=1, as a training config has it
  with pytest.raises(config_lib.ConfigError) as e:
    run_setup.Setup(config, jax.devices())
  assert str(e.value) == ("param blocks/attn/wk_DKH: dim 'embed' of size 36 is not divisible by mesh axes fsdp = 8 "
                          "(device counts that work with data=1, tensor=1: 1, 2, 3, 4, 6)")
  config = tiny_test_config(**ODD_MODEL, **{"mesh.data": 2, "mesh.tensor": 2, "mesh.fsdp": 2})
  with pytest.raises(config_lib.ConfigError, match=r"tensor = 2 \(no device count works with tensor=2\)$"):
    run_setup.Setup(config, jax.devices())


def test_a_mesh_no_device_count_fits_is_one_line(odd_run):
  from llama_jax import model as model_lib
  abstract = model_lib.abstract_model(config_lib.llama_config(tiny_test_config(**ODD_MODEL).model))
  mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(config_lib.ConfigError, match=r"^config.mesh \(data=1, fsdp=8, tensor=1\) fits none of 1..8 "
                     r"devices: param blocks/attn/wk_DKH: dim 'embed' of size 36 is not divisible by mesh axes "
                     r"fsdp = 8$"):
    sh.fitting_devices(mesh, abstract, jax.devices())


def test_eval_py_on_8_devices_uses_the_6_the_model_divides(odd_run, tmp_path):
  import json
  import subprocess
  import sys

  from test_train import ROOT, subprocess_env
  workdir, _ = odd_run
  heldout = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")
  _, _, one, _ = _eval_and_generate(workdir, jax.devices()[:1])
  proc = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", f"--corpus={heldout}", "--num_cpu_devices=8",
                         f"--output={tmp_path / 'eval.json'}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "using 6 of the 8 devices" in proc.stdout
  written = json.loads((tmp_path / "eval.json").read_text())
  assert written["num_tokens"] == one["num_tokens"]
  np.testing.assert_allclose(written["loss"], one["loss"], rtol=1e-5)
