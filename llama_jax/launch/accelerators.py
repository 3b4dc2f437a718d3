"""Cloud TPU accelerator types (`v5p-64`, `v5litepod-16`, ...): chips, hosts (workers) and the default
runtime version of each.

What the number in a type counts, from the Cloud TPU system architecture pages
(https://cloud.google.com/tpu/docs/system-architecture-tpu-vm, /tpu/docs/v4, /tpu/docs/v5p, /tpu/docs/v5e,
/tpu/docs/v6e):
- v2, v3, v4, v5p: TensorCores, two per chip, four chips per host: `v5p-64` is 32 chips on 8 hosts,
  `v4-8` 4 chips on 1 host. The number is a multiple of 8.
- v5e (`v5litepod-N`) and v6e (`v6e-N`): chips, one TensorCore each; 1, 4 and 8 fit on one host, a larger
  slice has four chips per host: `v5litepod-16` is 4 hosts, `v6e-256` 64. Slices of 1, 4, 8, 16, 32, 64,
  128 and 256 chips.

Default runtime versions for JAX (https://cloud.google.com/tpu/docs/runtimes): v6e `v2-alpha-tpuv6e`,
v5p `v2-alpha-tpuv5`, v5e `v2-alpha-tpuv5-lite`, v4 and older `tpu-ubuntu2204-base`.
"""

import dataclasses
import re

from llama_jax.errors import ConfigError

_RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
_CORES_PER_HOST = 8  # v2-v5p: 4 chips of 2 TensorCores
_LITE_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e, v6e chips
_LITE_CHIPS_PER_HOST = 4  # v5e, v6e slices over 8 chips

FORMS = ("v2-N, v3-N, v4-N, v5p-N (N TensorCores, a multiple of 8), v5litepod-N, v6e-N "
         f"(N chips: {', '.join(map(str, _LITE_SIZES))})")


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One accelerator type: `name` as gcloud takes it (`v5p-64`), its generation (`v5p`), TPU chips, hosts
  (= the slice's workers, one process each) and the runtime version a slice of it is created with by default."""
  name: str
  generation: str
  chips: int
  hosts: int
  runtime_version: str


def parse(accelerator_type: str) -> Accelerator:
  """The Accelerator of a type name; ConfigError naming the accepted forms for anything else."""
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)", accelerator_type or "")
  n = int(match.group(2)) if match else 0
  if match and match.group(1) in ("v5litepod", "v6e"):
    ok = n in _LITE_SIZES
    chips, hosts = n, (1 if n <= 8 else n // _LITE_CHIPS_PER_HOST)
  else:
    ok = n > 0 and n % _CORES_PER_HOST == 0
    chips, hosts = n // 2, n // _CORES_PER_HOST
  if not (match and ok):
    raise ConfigError(f"--accelerator_type={accelerator_type}: unknown accelerator type; accepted: {FORMS}")
  generation = match.group(1)
  return Accelerator(accelerator_type, generation, chips, hosts, _RUNTIME[generation])
