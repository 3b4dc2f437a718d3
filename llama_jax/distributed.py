"""Multi-host start-up: `jax.distributed.initialize` from flags, or from what the cluster provides.

Every process runs the same command. On a TPU pod slice (`gcloud ... ssh --worker=all`, or
`python -m llama_jax.launch`) and under SLURM (`srun`), `--distributed` is enough: jax reads the
coordinator, process count and id from the environment. So it does on any machine that sets
JAX_COORDINATOR_ADDRESS (host:port of process 0, read by jax itself), JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read here), as the simulated pod of the tests does. Elsewhere give them explicitly:

  python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

import os

from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection (TPU pod, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for all processes to join before failing.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Devices per process on CPU (for trying multi-device runs on one machine).")


def initialize_from_flags():
  """Joins the job described by the flags; a single process needs none of them."""
  import jax

  if _NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  explicit = _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None
  if explicit:
    missing = [n for n, v in (("coordinator_address", _COORDINATOR.value), ("num_processes", _NUM_PROCESSES.value),
                              ("process_id", _PROCESS_ID.value)) if v is None]
    if missing:
      from llama_jax.errors import ConfigError
      raise ConfigError(f"multi-process run needs --{', --'.join(missing)} as well")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               initialization_timeout=_TIMEOUT.value)
  elif _DISTRIBUTED.value:
    count, index = (os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    jax.distributed.initialize(num_processes=int(count) if count else None, process_id=int(index) if index else None,
                               initialization_timeout=_TIMEOUT.value)
