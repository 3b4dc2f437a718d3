"""The real sizes compile without allocating: llama3-8b on 8 fake CPU devices, and for a TPU topology."""

import importlib.util

import jax
import pytest

from configs import llama
from llama_jax import aot, model as model_lib
from llama_jax.errors import ConfigError


def _config_8b(batch_size=8, seq_len=1024):
  c = llama.get_config("llama3-8b")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  c.data.batch_size, c.data.seq_len = batch_size, seq_len
  return c


def test_llama3_8b_train_step_compiles_on_an_fsdp8_mesh():
  compiled = aot.lower_train_step(_config_8b(), jax.devices()).compile()  # its time: python -m llama_jax.aot
  # fp32 params + two fp32 Adam moments, split 8 ways (+ a few replicated scalars).
  n = model_lib.count_params(model_lib.PRESETS["llama3-8b"])
  assert compiled.memory_analysis().argument_size_in_bytes == pytest.approx(12 * n / 8, rel=0.01)


@pytest.mark.parametrize("topology", ["bogus", "v5p", "v5:2x2x", "2x2x1"])
def test_a_topology_of_no_accepted_form_is_one_line_naming_the_flag(topology):
  with pytest.raises(ConfigError, match=rf"--topology '{topology}': not a slice name \(v4-8, .*'vN:AxBxC'"):
    aot.tpu_devices(topology)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_compiles_for_a_tpu_topology_without_a_tpu():
  devices = aot.tpu_devices("v5p-16")
  assert len(devices) == 8 and "v5" in devices[0].device_kind.lower()
  config = _config_8b(batch_size=8, seq_len=256)  # the TPU compiler's time grows with T (38 s at 2048)
  config.model.remat = "full"
  mem = aot.lower_train_step(config, devices).compile().memory_analysis()
  n = model_lib.count_params(model_lib.PRESETS["llama3-8b"])
  assert mem.argument_size_in_bytes == pytest.approx(12 * n / 8, rel=0.01)
