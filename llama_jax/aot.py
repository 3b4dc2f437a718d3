"""Compiles the train step ahead of time for a TPU topology, on this machine, and prints its memory.

  JAX_PLATFORMS=cpu python -m llama_jax.aot --config configs/llama.py:llama3-8b --topology v5p-64
  python -m llama_jax.aot --config configs/llama.py:llama3-8b --topology cpu   # lower + compile time here

Needs `libtpu` (the version `jax[tpu]` pins) but no TPU: libtpu describes the topology and XLA
compiles for it, so a config's per-device memory is known before a pod is booked.

--topology takes a slice name of TOPOLOGIES (v4-8 ... v5p-128, v5e-4 ... v5e-256, v6e-4 ... v6e-256),
a libtpu topology 'vN:AxBxC' (v5e and v6e: 'v5e:AxB', 'v6e:AxB'), or 'cpu'; anything else, or one
libtpu cannot describe, ends in one line naming --topology. The
config is checked as train.py checks it (but for data.tokenizer_path, a file of the pod's).
"""

import re
import time

import jax

from llama_jax import errors

# Cloud TPU slice names -> (libtpu topology name, chip config). A v4-M or v5p-M slice has M
# TensorCores, two per chip, run as one device ("megacore"); a v5e-M or v6e-M slice has M chips of
# one TensorCore each (libtpu's "default" chip config; "megacore" does not exist for them).
TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", "megacore"), "v4-16": ("v4:2x2x2", "megacore"), "v4-32": ("v4:2x2x4", "megacore"),
    "v4-64": ("v4:2x4x4", "megacore"), "v4-128": ("v4:4x4x4", "megacore"),
    "v5p-8": ("v5:2x2x1", "megacore"), "v5p-16": ("v5:2x2x2", "megacore"), "v5p-32": ("v5:2x2x4", "megacore"),
    "v5p-64": ("v5:2x4x4", "megacore"), "v5p-128": ("v5:4x4x4", "megacore"),
    **{f"{chip}-{a * b}": (f"{chip}:{a}x{b}", "default") for chip in ("v5e", "v6e")
       for a, b in ((2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))},
}
_SINGLE_CORE_CHIPS = ("v5e:", "v6e:")  # libtpu topologies whose chips take the "default" chip config


_LIBTPU_TOPOLOGY = re.compile(r"v\d+[a-z]*:\d+(x\d+)+")


def tpu_devices(topology: str):
  """The devices of a TPU topology described by libtpu (no TPU needed): a slice name from TOPOLOGIES
  or a libtpu topology 'vN:AxBxC'. ConfigError naming --topology for any other string, and with
  libtpu's first line when libtpu cannot describe it (or is not installed)."""
  from llama_jax.errors import ConfigError
  if topology not in TOPOLOGIES and not _LIBTPU_TOPOLOGY.fullmatch(topology):
    raise ConfigError(f"--topology {topology!r}: not a slice name ({', '.join(TOPOLOGIES)}), a libtpu "
                      "topology 'vN:AxBxC' (e.g. 'v5:2x2x2') or 'cpu'")
  from jax.experimental import topologies
  name, chip_config = TOPOLOGIES.get(
      topology, (topology, "default" if topology.startswith(_SINGLE_CORE_CHIPS) else "megacore"))
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False,) * 3).devices
  except RuntimeError as e:  # JaxRuntimeError from libtpu, or no TPU backend (libtpu missing)
    raise ConfigError(f"--topology {topology}: libtpu cannot describe it: "
                      f"{errors.first_line(e)}") from None


def peak_bytes(memory) -> int:
  """Per-device bytes a compiled step holds at its peak, from its memory_analysis(): arguments
  + outputs not aliased to (donated into) an argument + temporaries."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def lower_train_step(config, devices):
  """The train step lowered for `devices` from abstract shapes only: nothing is allocated."""
  from llama_jax import run_setup
  setup = run_setup.Setup(config, devices)
  run_setup.check_batch(config, setup.mesh)
  B, T = config.data.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, T), jax.numpy.int32, sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "weights", "positions", "segment_ids")}
  with jax.set_mesh(setup.mesh):
    return setup.jit_train_step().lower(setup.abstract_state, batch)


def main():
  """The command line; its flags are defined here because llama_jax.plan imports this module."""
  from absl import flags
  from ml_collections import config_flags

  from llama_jax import entry

  config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.")
  topology_flag = flags.DEFINE_string(
      "topology", "v5p-8", "A Cloud TPU slice name from TOPOLOGIES (v4-8 ... v5p-128, v5e-4 ... v5e-256, v6e-4 ... "
      "v6e-256), a libtpu topology 'vN:AxBxC' (e.g. 'v5:2x2x2', 'v5e:4x4'), or 'cpu' (this machine's devices).")
  flags.mark_flags_as_required(["config"])

  def run():
    from llama_jax import config_lib
    config, topology = config_flag.value, topology_flag.value
    config_lib.check_config(config, tokenizer=False)  # the tokenizer file is the pod's
    devices = jax.devices("cpu") if topology == "cpu" else tpu_devices(topology)
    start = time.perf_counter()
    try:
      lowered = lower_train_step(config, devices)
      lowered_s = time.perf_counter() - start
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise SystemExit(f"{topology}: does not fit: {str(e).splitlines()[0]}")
    mem = compiled.memory_analysis()
    gib = lambda b: b / 2**30
    print(f"{topology}: {len(devices)} x {devices[0].device_kind}, lowered in {lowered_s:.1f} s, "
          f"lowered + compiled in {time.perf_counter() - start:.1f} s")
    print(f"per device: arguments {gib(mem.argument_size_in_bytes):.2f} GiB, outputs "
          f"{gib(mem.output_size_in_bytes):.2f} GiB (aliased {gib(mem.alias_size_in_bytes):.2f}), "
          f"temporaries {gib(mem.temp_size_in_bytes):.2f} GiB, code {gib(mem.generated_code_size_in_bytes):.3f} GiB")
    print(f"peak estimate: {gib(peak_bytes(mem)):.2f} GiB per device")

  entry.main(lambda argv: entry.run(run))


if __name__ == "__main__":
  main()
