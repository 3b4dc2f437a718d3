"""Logical axis names, the one table that maps them onto mesh axes, and mesh helpers.

Parameters and activations are annotated with the logical names below where they are
made (model.py); nothing else in the code base names a mesh axis. Changing how a model is
laid out over devices means changing `LOGICAL_AXIS_RULES`, nothing more.
"""

import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from llama_jax import metrics as metrics_lib
from llama_jax.errors import ConfigError

# Logical axis names (dimension letters of STYLE: B T D F N K H L V).
BATCH = "batch"  # B
SEQ = "seq"  # T
EMBED = "embed"  # D, on parameters
ACT_EMBED = "act_embed"  # D, on activations
MLP = "mlp"  # F
HEADS = "heads"  # N
KV_HEADS = "kv_heads"  # K
HEAD_DIM = "head_dim"  # H
LAYERS = "layers"  # L
VOCAB = "vocab"  # V

# Mesh axes.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES = {
    BATCH: (DATA, FSDP),
    SEQ: None,
    EMBED: FSDP,
    ACT_EMBED: None,
    MLP: TENSOR,
    HEADS: TENSOR,
    KV_HEADS: TENSOR,
    HEAD_DIM: None,
    LAYERS: None,
    VOCAB: TENSOR,
}


def logical_to_mesh(names) -> P:
  """Maps a tuple of logical axis names to a mesh PartitionSpec."""
  if names is None:
    return P()
  return P(*(LOGICAL_AXIS_RULES[n] if n is not None else None for n in names))


def constrain(x, names):
  """Constrains an activation's sharding by logical names; a no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(names))


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh (data, fsdp, tensor) from `config.mesh`; one axis may be -1: the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [mesh_config[a] for a in MESH_AXES]
  asked = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise ConfigError(f"config.mesh ({asked}): sizes must be >= 1, and at most one may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    sizes[sizes.index(-1)] = max(len(devices) // known, 1)
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"config.mesh ({asked}) needs {math.prod(sizes)} devices, but there are {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def named(mesh, logical_names) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, logical_to_mesh(logical_names))


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return named(mesh, (BATCH, SEQ))


def _logical_specs(abstract_model):
  """The logical-name PartitionSpec of every param, as a pure dict shaped like the params."""
  return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)))


def _sharded_dims(abstract_model) -> list[tuple[str, str, int, tuple[str, ...]]]:
  """(param path, logical name, size, mesh axes) of every param dim the rules split over the mesh."""
  shapes = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  specs = jax.tree.leaves(_logical_specs(abstract_model), is_leaf=lambda x: isinstance(x, P))
  dims = []
  for (path, param), names in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], specs):
    for dim, name in zip(param.shape, names):
      axes = LOGICAL_AXIS_RULES.get(name) if name else None
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      if axes:
        dims.append((jax.tree_util.keystr(path, simple=True, separator="/"), name, dim, axes))
  return dims


def _indivisible(dims, sizes: dict) -> str | None:
  """The first of `dims` (_sharded_dims) that mesh axis sizes {axis: size} do not split evenly, in words."""
  for path, name, dim, axes in dims:
    n = math.prod(sizes[a] for a in axes)
    if dim % n:
      return f"param {path}: dim '{name}' of size {dim} is not divisible by mesh axes {'x'.join(axes)} = {n}"
  return None


def _mesh_sizes(mesh_config, num_devices: int) -> dict | None:
  """{axis: size} of `config.mesh` over num_devices devices (its -1 axis filled in); None where it cannot span them."""
  sizes = {a: mesh_config[a] for a in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  for a, s in sizes.items():
    if s == -1:
      if num_devices % known:
        return None
      sizes[a] = num_devices // known
  return sizes if math.prod(sizes.values()) == num_devices else None


def indivisible_param(abstract_model):
  """A function of mesh axis sizes {axis: size} that says, in words, the first param dim those sizes do
  not split evenly (None where every one splits): for searching meshes without building them."""
  dims = _sharded_dims(abstract_model)
  return lambda sizes: _indivisible(dims, sizes)


def check_params_divisible(mesh, abstract_model):
  """Raises one line naming the param, dim and mesh axes where a dim does not split evenly, and the
  device counts (up to the mesh's) over which the mesh's data and tensor sizes, with fsdp filling
  the rest, split every param."""
  dims = _sharded_dims(abstract_model)
  problem = _indivisible(dims, dict(mesh.shape))
  if problem:
    d, t = mesh.shape[DATA], mesh.shape[TENSOR]
    counts = [d * f * t for f in range(1, mesh.shape[FSDP] + 1)
              if not _indivisible(dims, {DATA: d, FSDP: f, TENSOR: t})]
    works = (f"device counts that work with data={d}, tensor={t}: {', '.join(map(str, counts))}" if counts else
             f"no device count works with tensor={t}")
    raise ConfigError(f"{problem} ({works})")


def fitting_devices(mesh_config, abstract_model, devices=None) -> list:
  """The most devices, the first of `devices` (default: all), over which `config.mesh` (its -1
  axis filling the rest) splits every param evenly, so that a checkpoint loads on any device
  count. Uses fewer devices than given only in a single process, and then logs one line saying
  so and why; raises one line where no count works."""
  devices = jax.devices() if devices is None else list(devices)
  dims = _sharded_dims(abstract_model)
  counts = range(len(devices), 0, -1) if jax.process_count() == 1 else [len(devices)]
  for n in counts:
    sizes = _mesh_sizes(mesh_config, n)
    if sizes and not _indivisible(dims, sizes):
      break
  else:
    sizes = _mesh_sizes(mesh_config, len(devices))
    why = _indivisible(dims, sizes) if sizes else "the mesh cannot span them"
    raise ConfigError(f"config.mesh ({', '.join(f'{a}={mesh_config[a]}' for a in MESH_AXES)}) fits none of "
                      f"{'1..' if len(counts) > 1 else ''}{len(devices)} devices: {why}")
  if n < len(devices):
    sizes = _mesh_sizes(mesh_config, len(devices))
    why = _indivisible(dims, sizes) if sizes else "the mesh cannot span them"
    metrics_lib.log(f"using {n} of the {len(devices)} devices: over all of them, {why}")
  return devices[:n]


def param_shardings(mesh, abstract_model):
  """NamedShardings of the params (pure dict), from the logical names the model gave them."""
  return jax.tree.map(lambda spec: named(mesh, tuple(spec)), _logical_specs(abstract_model),
                      is_leaf=lambda x: isinstance(x, P))


def state_shardings(mesh, abstract_state, params_sharding, tx):
  """Shardings of the train state: optimizer moments follow their params, the rest is replicated
  (so is a moment shaped unlike its param: adafactor's factored row and column statistics). A param
  that a branch of optax.partition (muon) does not hold is a MaskedNode in its state, and stays one."""
  replicated = jax.sharding.NamedSharding(mesh, P())

  def moment(a, s, p):
    return a if isinstance(a, optax.MaskedNode) else s if a.shape == p.shape else replicated

  opt_sharding = optax.tree_map_params(
      tx, moment, abstract_state["opt_state"], params_sharding, abstract_state["params"],
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, (jax.sharding.NamedSharding, optax.MaskedNode)))
  return {"step": replicated, "params": params_sharding, "opt_state": opt_sharding}


def replicated_to_host(tree):
  """Host copies of replicated arrays; works when the mesh spans processes (device_get does not)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
