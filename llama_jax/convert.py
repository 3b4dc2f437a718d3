"""Hugging Face Llama checkpoints <-> our params (the pure dict of `nnx.state(model, nnx.Param)`).

  config, params = from_hf("Llama-3.2-1B")          # a dir with config.json + *.safetensors
  to_hf(config, params, "out_dir", dtype="bfloat16")  # loads in LlamaForCausalLM.from_pretrained

Only reshapes and transposes are needed: model.py uses HF's rotate-half RoPE layout, so the
q/k projections are not permuted. Conversion streams one tensor at a time into (or out of)
preallocated stacked arrays, so peak host memory stays near one copy of the model (plus one
shard when writing). Needs numpy, ml_dtypes and safetensors, not torch.

Either side may be on object storage (`gs://`, through llama_jax.paths):
- An HF dir on `gs://` is read without downloading its files: ranged reads of each safetensors
  header, then one ranged read per tensor (_RemoteSafetensors), so host memory holds one source
  tensor at a time beside the params being filled, as with the local reader.
- An HF dir written to `gs://` has each safetensors shard written to a local temporary file (one
  shard, at most max_shard_bytes, on local disk at a time) and uploaded, one object per file.
- Object storage has no atomic rename, so an import or export there writes straight into its final
  prefix and writes last the file that makes it usable (_staged says which); a failure deletes what
  it wrote.
"""

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from typing import Callable

import jax
import ml_dtypes  # registers bfloat16 with numpy: safetensors' numpy reader needs it
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from llama_jax import config_file
from llama_jax import model as model_lib
from llama_jax import paths
from llama_jax.model import LlamaConfig, RopeScaling

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
# Tensors some HF checkpoints carry that hold no weights (old transformers saved RoPE buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------- config


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """Our config from an HF config.json dict; `overrides` replace compute fields (dtype...)."""
  if hf.get("model_type") != "llama":
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, expected 'llama'")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"config.json lacks {key!r}")
  _check_unsupported(hf)
  dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or dim // n_heads
  if head_dim * n_heads != dim:
    raise ValueError(f"config.json head_dim={head_dim} != hidden_size / num_attention_heads "
                     f"= {dim} / {n_heads}: a decoupled head dim is not supported")
  max_seq_len = hf.get("max_position_embeddings", 2048)
  theta, scaling = _rope_from_hf(hf, max_seq_len)
  config = LlamaConfig(
      vocab_size=hf["vocab_size"],
      dim=dim,
      n_layers=hf["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      ffw_dim=hf["intermediate_size"],
      norm_eps=hf.get("rms_norm_eps", 1e-6),  # HF's default when absent
      rope_theta=theta,
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=max_seq_len,
  )
  return _replace(config, overrides)


def _check_unsupported(hf: dict):
  """Rejects Llama variants model.py does not compute, rather than converting them wrongly."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"config.json {key}=true is not supported (model.py has no biases)")


def _rope_from_hf(hf: dict, max_seq_len: int) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from either transformers 5's `rope_parameters` or 4's `rope_scaling`.

  Like transformers, a non-null `rope_scaling` wins over `rope_parameters`; theta may sit
  inside either dict or at the top level.
  """
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"config.json {key} has rope_type={rope_type!r}: only 'default' and "
                     "'llama3' are supported")
  for field in ("factor", "low_freq_factor", "high_freq_factor"):
    if field not in rope:
      raise ValueError(f"config.json {key} (rope_type 'llama3') lacks {field!r}")
  scaling = RopeScaling(
      factor=float(rope["factor"]),
      low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_seq_len=int(rope.get("original_max_position_embeddings", max_seq_len)),
  )
  return theta, scaling


def config_to_hf(config: LlamaConfig, **extra) -> dict:
  """The HF config.json dict of `config`; `extra` adds or replaces fields (bos_token_id...).

  Both spellings of RoPE are written: `rope_parameters` for transformers >= 5 and
  `rope_theta` + `rope_scaling` for transformers 4.
  """
  c = config
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  scaling = None
  if c.rope_scaling is not None:
    s = c.rope_scaling
    scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
               "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_seq_len}
    rope = {**scaling, "rope_theta": c.rope_theta}
  hf = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": c.vocab_size,
      "hidden_size": c.dim,
      "intermediate_size": c.ffw_dim,
      "num_hidden_layers": c.n_layers,
      "num_attention_heads": c.n_heads,
      "num_key_value_heads": c.n_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": c.norm_eps,
      "rope_theta": c.rope_theta,
      "rope_scaling": scaling,
      "rope_parameters": rope,
      "tie_word_embeddings": c.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
  }
  hf.update(extra)
  return hf


def _replace(config: LlamaConfig, overrides: dict) -> LlamaConfig:
  names = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"unknown LlamaConfig field(s) {unknown}; fields are {sorted(names)}")
  return dataclasses.replace(config, **overrides)


# ---------------------------------------------------------------------------- names and layouts


@dataclasses.dataclass(frozen=True)
class _Mapping:
  """One HF tensor <-> one of our params (or one layer of a stacked param)."""

  hf_name: str
  path: tuple[str, ...]  # key path in our params pure dict
  layer: int | None  # index into the leading L axis of a stacked param
  hf_shape: tuple[int, ...]
  to_ours: Callable  # HF array -> our layout (a view, no copy)
  to_hf: Callable  # our layout -> HF array (a view, no copy)


def _mappings(config: LlamaConfig) -> list[_Mapping]:
  """Every HF tensor of `config`'s model, in the order HF checkpoints list them."""
  V, D, F = config.vocab_size, config.dim, config.ffw_dim
  N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
  # HF Linear weights are (out, in); heads are the outer factor of the flattened N*H axis.
  def heads_in(n):  # (n*H, D) <-> (D, n, H)
    return (lambda w: w.reshape(n, H, D).transpose(2, 0, 1),
            lambda p: p.transpose(1, 2, 0).reshape(n * H, D))
  heads_out = (lambda w: w.reshape(D, N, H).transpose(1, 2, 0),  # (D, N*H) <-> (N, H, D)
               lambda p: p.transpose(2, 0, 1).reshape(D, N * H))
  same = (lambda w: w, lambda p: p)
  transposed = (lambda w: w.T, lambda p: p.T)

  maps = [_Mapping("model.embed_tokens.weight", ("embed_VD",), None, (V, D), *same)]
  per_layer = [
      ("self_attn.q_proj.weight", ("attn", "wq_DNH"), (N * H, D), heads_in(N)),
      ("self_attn.k_proj.weight", ("attn", "wk_DKH"), (K * H, D), heads_in(K)),
      ("self_attn.v_proj.weight", ("attn", "wv_DKH"), (K * H, D), heads_in(K)),
      ("self_attn.o_proj.weight", ("attn", "wo_NHD"), (D, N * H), heads_out),
      ("mlp.gate_proj.weight", ("mlp", "w_gate_DF"), (F, D), transposed),
      ("mlp.up_proj.weight", ("mlp", "w_up_DF"), (F, D), transposed),
      ("mlp.down_proj.weight", ("mlp", "w_down_FD"), (D, F), transposed),
      ("input_layernorm.weight", ("attn_norm", "scale"), (D,), same),
      ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (D,), same),
  ]
  for i in range(config.n_layers):
    for suffix, path, shape, (to_ours, to_hf) in per_layer:
      maps.append(_Mapping(f"model.layers.{i}.{suffix}", ("blocks", *path), i, shape, to_ours, to_hf))
  maps.append(_Mapping("model.norm.weight", ("final_norm", "scale"), None, (D,), *same))
  if not config.tie_embeddings:
    maps.append(_Mapping("lm_head.weight", ("lm_head_DV",), None, (V, D), *transposed))
  return maps


def _param_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every param of our model, by key path, from the abstract model (no memory)."""
  state = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(config), nnx.Param))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# ---------------------------------------------------------------------------- HF -> ours


def from_hf(hf_dir: str, **overrides) -> tuple[LlamaConfig, dict]:
  """Reads an HF Llama checkpoint dir: (config, params pure dict of numpy arrays).

  Params come out in `config.param_dtype` (float32 unless overridden, e.g.
  param_dtype="bfloat16"), on the host, so a caller can `jax.device_put` them with whatever
  sharding it wants. Every name and shape is checked before anything big is allocated.
  """
  config = _config_of_dir(hf_dir, read_hf_config(hf_dir), **overrides)
  tensors = _index_tensors(hf_dir)  # hf name -> (file, shape)
  maps = _mappings(config)
  _check_tensors(config, maps, tensors)

  dtype = DTYPES[_dtype_name(config.param_dtype)]
  params = {}
  for path, shape in _param_shapes(config).items():
    _set(params, path, np.empty(shape, dtype))
  by_file = {}
  for m in maps:
    by_file.setdefault(tensors[m.hf_name][0], []).append(m)
  for file, file_maps in by_file.items():
    with _open(file) as f:
      for m in file_maps:
        dst = _get(params, m.path)
        if m.layer is not None:
          dst = dst[m.layer]
        # One source tensor is alive at a time; the cast happens during the copy.
        dst[...] = m.to_ours(f.get_tensor(m.hf_name))
  return config, params


def from_hf_model(hf_dir: str, **overrides):
  """The NNX `Llama` of an HF checkpoint dir (params moved to the default device)."""
  config, params = from_hf(hf_dir, **overrides)
  graphdef, _ = nnx.split(model_lib.abstract_model(config))
  # Leaf by leaf, dropping each host copy once it is on device, so the two don't coexist.
  leaves, treedef = jax.tree.flatten(params)
  del params
  for i in range(len(leaves)):
    leaves[i] = jax.device_put(leaves[i])
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _config_of_dir(hf_dir: str, hf: dict, **overrides) -> LlamaConfig:
  """config_from_hf, with a complaint about config.json naming HF_DIR/config.json."""
  try:
    return config_from_hf(hf, **overrides)
  except ValueError as e:
    message = str(e)
    if message.startswith("config.json"):
      message = paths.join(hf_dir, "config.json") + message.removeprefix("config.json")
    raise ValueError(message) from None


def read_hf_config(hf_dir: str) -> dict:
  """The dict of HF_DIR/config.json. Raises FileNotFoundError for a missing dir, ValueError for
  anything else that is not an HF checkpoint dir (a file, a llama_jax workdir, no config.json, bad JSON)."""
  if not paths.exists(hf_dir):
    raise FileNotFoundError(f"HF checkpoint dir not found: {hf_dir}")
  if not paths.isdir(hf_dir) or paths.isdir(paths.join(hf_dir, "checkpoints")):
    raise ValueError(f"--hf_dir {hf_dir} {config_file.describe_path(hf_dir)}, not a Hugging Face checkpoint "
                     "directory")
  path = paths.join(hf_dir, "config.json")
  if not paths.isfile(path):
    raise FileNotFoundError(f"{hf_dir} is not an HF checkpoint: no config.json")
  return _read_json(path)


def _read_json(path: str) -> dict:
  """A JSON object from `path`; ValueError naming the file when it is not one."""
  try:
    obj = json.loads(paths.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON: {e}") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object")
  return obj


def stop_ids_from_hf(hf_dir: str, hf: dict, vocab_size: int) -> list[int]:
  """The end-of-sequence ids transformers' generate stops at: generation_config.json's eos_token_id
  where it sets one, else config.json's (`hf`); each an int or a list. [] when neither sets one.
  Raises ValueError naming the file for an id that is not an int in [0, vocab_size)."""
  path = paths.join(hf_dir, "generation_config.json")
  generation = _read_json(path) if paths.isfile(path) else {}
  source, ids = (path, generation["eos_token_id"]) if generation.get("eos_token_id") is not None else (
      paths.join(hf_dir, "config.json"), hf.get("eos_token_id"))
  if ids is None:
    return []
  ids = [ids] if isinstance(ids, int) else ids
  if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
    raise ValueError(f"{source}: eos_token_id={ids!r} is not a token id or a list of them")
  bad = [t for t in ids if not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f"{source}: eos_token_id {bad[0]} is outside the vocabulary [0, {vocab_size})")
  return list(dict.fromkeys(ids))


def dtype_from_hf(hf: dict) -> str:
  """The dtype an HF checkpoint declares (config.json's `dtype`, transformers 4's `torch_dtype`);
  float32, what transformers loads, when it declares none. ValueError for one we do not compute in."""
  name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  name = str(name).removeprefix("torch.")
  if name not in DTYPES:
    raise ValueError(f"config.json dtype={name!r} is not one of {sorted(DTYPES)}; give --dtype")
  return name


def _index_tensors(hf_dir: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """hf tensor name -> (file, shape), from the safetensors headers only."""
  index = paths.join(hf_dir, INDEX_FILE)
  if paths.isfile(index):
    weight_map = json.loads(paths.read_text(index))["weight_map"]
    files = sorted({paths.join(hf_dir, name) for name in weight_map.values()})
    for file in files:
      if not paths.isfile(file):
        raise FileNotFoundError(f"{INDEX_FILE} in {hf_dir} names {paths.name(file)}, "
                                "which is missing")
  else:
    files = paths.glob(paths.join(hf_dir, "*.safetensors"))
  if not files:
    others = [n for n in paths.listdir(hf_dir) if n.endswith((".bin", ".pth", ".pt"))]
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(f"no *.safetensors files in {hf_dir}{hint}")
  tensors = {}
  for file in files:
    with _open(file) as f:
      for name, shape in f.shapes().items():
        tensors[name] = (file, shape)
  return tensors


def _check_tensors(config, maps, tensors):
  """Every expected tensor present with its shape, nothing unexpected; else name the culprit."""
  expected = {m.hf_name for m in maps}
  for m in maps:
    if m.hf_name not in tensors:
      raise ValueError(f"checkpoint lacks tensor {m.hf_name!r} (expected shape {m.hf_shape})")
    shape = tensors[m.hf_name][1]
    if shape != m.hf_shape:
      raise ValueError(f"tensor {m.hf_name!r} has shape {shape}, but config.json implies "
                       f"{m.hf_shape}")
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding).
  allowed = {"lm_head.weight"} if config.tie_embeddings else set()
  unexpected = sorted(n for n in tensors if n not in expected and n not in allowed
                      and not n.endswith(IGNORED_SUFFIXES))
  if unexpected:
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise ValueError(f"checkpoint has tensors this Llama config does not use: "
                     f"{unexpected[:5]}{more}")


def _open(file):
  """The safetensors file at `file` (local or on object storage): a context manager with shapes() and
  get_tensor(name)."""
  return _RemoteSafetensors(file) if paths.is_remote(file) else _LocalSafetensors(file)


class _LocalSafetensors:
  """A local safetensors file, through safetensors.safe_open."""

  def __init__(self, file):
    # pread copies each tensor into its own buffer: RSS does not grow with mapped file pages.
    try:
      self._file = safetensors.safe_open(file, framework="numpy", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument
      self._file = safetensors.safe_open(file, framework="numpy")

  def __enter__(self):
    self._file.__enter__()
    return self

  def __exit__(self, *exc):
    return self._file.__exit__(*exc)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}

  def get_tensor(self, name):
    return self._file.get_tensor(name)


# safetensors' dtype names (its format specification) -> numpy.
_SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                       "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
                       "BOOL": np.dtype(np.bool_)}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class _RemoteSafetensors:
  """A safetensors file on object storage, read by ranged reads: the header (its 8-byte length, then
  the JSON), then each tensor's bytes when asked for, so nothing but the tensors read is downloaded.
  Layout: the safetensors format (8-byte little-endian header size N, N bytes of JSON giving each
  tensor's dtype, shape and [begin, end) byte offsets after the header, then the data)."""

  def __init__(self, file):
    self._file, self._fs = paths.normalize(file), paths.filesystem(file)
    size = self._fs.size(self._file)
    n = int.from_bytes(self._fs.cat_file(self._file, 0, 8), "little") if size >= 8 else 0
    if not 2 <= n <= min(size - 8, _MAX_HEADER_BYTES):
      raise ValueError(f"{file} is not a safetensors file (a header of {n} bytes in a file of {size})")
    try:
      header = json.loads(self._fs.cat_file(self._file, 8, 8 + n))
    except (ValueError, UnicodeDecodeError):
      raise ValueError(f"{file} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
      raise ValueError(f"{file} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    self._data_start = 8 + n
    self._tensors = {}
    for name, info in header.items():
      try:
        dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
        ok = ok and end - begin == math.prod(shape) * dtype.itemsize and self._data_start + end <= size
      except (KeyError, TypeError, ValueError):
        ok = False
      if not ok:
        raise ValueError(f"{file}: tensor {name!r} has a bad safetensors header entry {info!r}")
      self._tensors[name] = (dtype, shape, begin, end)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, (_, shape, _, _) in self._tensors.items()}

  def get_tensor(self, name):
    """The tensor `name`, one ranged read of its bytes (a read-only array over them)."""
    dtype, shape, begin, end = self._tensors[name]
    raw = self._fs.cat_file(self._file, self._data_start + begin, self._data_start + end)
    return np.frombuffer(raw, dtype).reshape(shape)


# ---------------------------------------------------------------------------- ours -> HF


def to_hf(config: LlamaConfig, params: dict, hf_dir: str, dtype: str | None = None,
          max_shard_bytes: int = 2 * 2**30, **extra_config) -> list[str]:
  """Writes config.json and safetensors that `LlamaForCausalLM.from_pretrained` loads.

  params: our pure dict (numpy or jax arrays, stacked over layers). dtype: of the written
  tensors ("bfloat16", "float16", "float32"); None keeps each param's own dtype.
  Checkpoints over `max_shard_bytes` are split into shards plus model.safetensors.index.json;
  only one shard's tensors are materialised at a time. extra_config: more config.json fields,
  e.g. bos_token_id/eos_token_id of the tokenizer. Returns the files written.
  """
  maps = _mappings(config)
  _check_params(config, params)
  out_dtype = None if dtype is None else DTYPES[_dtype_name(dtype)]

  def tensor_dtype(m):
    return out_dtype or np.dtype(_get(params, m.path).dtype)

  def nbytes(m):
    return int(np.prod(m.hf_shape)) * tensor_dtype(m).itemsize

  shards = _plan_shards(maps, nbytes, max_shard_bytes)
  paths.makedirs(hf_dir)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    tensors = {m.hf_name: _hf_tensor(params, m, tensor_dtype(m)) for m in shard}
    _save_safetensors(tensors, paths.join(hf_dir, name))
    del tensors
  written = list(names)
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(nbytes(m) for m in maps)},
             "weight_map": {m.hf_name: name for name, shard in zip(names, shards) for m in shard}}
    _write_json(paths.join(hf_dir, INDEX_FILE), index)
    written.append(INDEX_FILE)
  dtypes = {tensor_dtype(m).name for m in maps}
  hf_config = config_to_hf(config, **({"dtype": dtypes.pop()} if len(dtypes) == 1 else {}))
  hf_config.update(extra_config)
  # Last: an HF dir without config.json is no checkpoint to anyone reading it (from_pretrained, import-hf).
  _write_json(paths.join(hf_dir, "config.json"), hf_config)
  written.append("config.json")
  return written


def _save_safetensors(tensors: dict, path: str):
  """One safetensors file at `path`; on object storage written to a local temporary file, then
  uploaded as one object (it appears whole, when the upload completes)."""
  if not paths.is_remote(path):
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, paths.name(path))
    safetensors.numpy.save_file(tensors, local, metadata={"format": "pt"})
    paths.filesystem(path).put_file(local, paths.normalize(path))


def _check_params(config, params):
  expected = _param_shapes(config)
  for path, shape in expected.items():
    try:
      value = _get(params, path)
    except (KeyError, TypeError):
      raise ValueError(f"params lack {'/'.join(path)} (expected shape {shape})") from None
    if tuple(value.shape) != shape:
      raise ValueError(f"param {'/'.join(path)} has shape {tuple(value.shape)}, but the config "
                       f"implies {shape}")


def _plan_shards(maps, nbytes, max_shard_bytes):
  """Consecutive groups of tensors, each under max_shard_bytes unless one tensor is larger."""
  shards, size = [[]], 0
  for m in maps:
    if shards[-1] and size + nbytes(m) > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(m)
    size += nbytes(m)
  return shards


def _hf_tensor(params, m, dtype):
  """The HF tensor of mapping m, contiguous, in `dtype`; copies only one layer's slice."""
  value = _get(params, m.path)
  if m.layer is not None:
    value = value[m.layer]
  value = np.asarray(value)  # a jax array comes to the host one layer at a time
  return np.ascontiguousarray(m.to_hf(value).astype(dtype, copy=False))


def _write_json(path, obj):
  paths.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- helpers


def _dtype_name(dtype) -> str:
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  return name


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------- command line


def import_hf(hf_dir: str, workdir: str, config_arg: str = "configs/llama.py", dtype: str | None = None):
  """Writes WORKDIR/checkpoints/0 from an HF checkpoint: train.py continues pretraining from it
  (with `--config configs/llama.py:<preset>` or any config of the same architecture) and eval.py
  scores it. The training config saved with it is `config_arg`'s with the HF model in it, and with
  data.seq_len lowered to the model's max_seq_len where it is longer (a note says so).

  The stored compute dtype (config.model.dtype) is `dtype`, else the checkpoint's own (config.json's
  `dtype` / `torch_dtype`); params are stored in float32. The tokenizer (HF_DIR/tokenizer.model or
  original/tokenizer.model) becomes WORKDIR/tokenizer.model, and the checkpoint's end-of-sequence ids
  (stop_ids_from_hf) WORKDIR/generation.json, which generation stops at.

  Everything is checked first (config.json, tensor names and shapes, the tokenizer and its vocabulary,
  the config file, the workdir: new or empty); the workdir is written through _staged, the checkpoint
  last, so a refused or failed import leaves nothing behind. HF_DIR and WORKDIR may each be local or on
  `gs://`. Raises ConfigError (or ValueError / FileNotFoundError from the HF files) naming the culprit.
  Returns (LlamaConfig, train state).
  """
  from llama_jax import checkpoint as ckpt_lib
  from llama_jax import config_lib, run_setup
  from llama_jax import sharding as sh
  from llama_jax.errors import ConfigError

  paths.check_bucket(workdir, "--workdir")
  config_lib.check_workdir(workdir)
  if ckpt_lib.has_checkpoints(workdir):
    raise ConfigError(f"--workdir {workdir} already has checkpoints; import into a new workdir")
  if paths.listdir(workdir):
    raise ConfigError(f"--workdir {workdir} is not empty (it has {paths.listdir(workdir)[:3]}); "
                      "import into a new or empty directory")
  if dtype is not None and dtype not in config_lib.COMPUTE_DTYPES:
    raise ConfigError(f"--dtype {dtype!r} is not one of {list(config_lib.COMPUTE_DTYPES)}")
  hf = read_hf_config(hf_dir)
  llama = _config_of_dir(hf_dir, hf)
  _check_tensors(llama, _mappings(llama), _index_tensors(hf_dir))
  compute_dtype = dtype or dtype_from_hf(hf)
  stop_ids = stop_ids_from_hf(hf_dir, hf, llama.vocab_size)
  candidates = (paths.join(hf_dir, "tokenizer.model"), paths.join(hf_dir, "original", "tokenizer.model"))
  tokenizer = next((path for path in candidates if paths.exists(path)), None)
  if tokenizer is not None:
    config_lib.check_vocab(config_lib.load_tokenizer(tokenizer, "--hf_dir"), llama, tokenizer)
  config = config_file.load_config_file(config_arg)
  model = config_lib.model_config_dict(llama)
  model.dtype = compute_dtype
  for key in ("scan_layers", "remat"):  # how to lay out the computation stays the config's choice
    model[key] = config.model[key]
  config.model = model
  if config.data.seq_len > llama.max_seq_len:  # rows the model can score (eval.py, a resumed run)
    print(f"note: data.seq_len {config.data.seq_len} of {config_arg} exceeds the model's max_seq_len; the saved "
          f"config has data.seq_len {llama.max_seq_len}")
    config.data.seq_len = llama.max_seq_len
    if config.train.loss_chunk_size and llama.max_seq_len % config.train.loss_chunk_size:
      config.train.loss_chunk_size = math.gcd(config.train.loss_chunk_size, llama.max_seq_len)
  # Checks the model divides over the config's mesh, on as many of the devices as it fits (the saved
  # config keeps its mesh).
  setup = run_setup.Setup(config, sh.fitting_devices(config.mesh, model_lib.abstract_model(llama)))

  llama, params = from_hf(hf_dir, dtype=compute_dtype)
  with _staged(paths.normalize(workdir), "importing") as tmp:
    paths.makedirs(tmp)
    if tokenizer is not None:
      paths.copy(tokenizer, run_setup.tokenizer_path(tmp))
    if stop_ids:
      run_setup.write_stop_ids(tmp, stop_ids)
    params = jax.tree.map(jax.device_put, params, setup.params_sharding)
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_sharding["opt_state"])(params)
    state = {"step": jax.device_put(np.zeros((), np.int32), setup.state_sharding["step"]), "params": params,
             "opt_state": opt_state}
    ckpt = ckpt_lib.Checkpointer(tmp)  # last: a workdir is a run once it has a checkpoint
    try:
      ckpt.save(0, state, config, force=True)
      ckpt.wait()
    finally:
      ckpt.close()
  if tokenizer is None:
    print(f"note: {hf_dir} has no tokenizer.model; put the model's tokenizer at {run_setup.tokenizer_path(workdir)}")
  return llama, state



@contextlib.contextmanager
def _staged(target: str, what: str):
  """Yields the directory to fill in place of `target` (new or an empty directory, as the caller
  checked); when the block raises, what it wrote is deleted, so a refused or failed write leaves nothing
  behind.

  On a local disk that is a temporary sibling renamed to `target` when the block ends: `target` appears
  whole or not at all. Object storage has no rename (a copy and a delete, not atomic), so there the
  block writes straight into `target` and writes last the file that makes it usable: import's checkpoint
  (orbax marks a step complete only when all of it is written) and export's config.json (to_hf), so a
  process killed half-way leaves a prefix that the tools refuse (no checkpoint; no config.json), which
  has to be deleted before another try.
  """
  if paths.is_remote(target):
    try:
      yield target
    except BaseException:
      with contextlib.suppress(Exception):  # the error that stopped the write is the one to report
        paths.remove(target)
      raise
    return
  tmp = paths.join(paths.parent(target), f".{paths.name(target)}.{what}-{os.getpid()}")
  with contextlib.suppress(OSError):
    paths.remove(tmp)
  try:
    yield tmp
    if paths.isdir(target):
      os.rmdir(target)  # empty, as checked: rmdir refuses anything else
    paths.move(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):  # the error that stopped the write is the one to report
      paths.remove(tmp)
    raise


def export_hf(workdir: str, hf_dir: str, step: int | None = None, dtype: str | None = "bfloat16"):
  """Writes WORKDIR's checkpoint (latest by default) as an HF Llama dir; returns the step.

  dtype: of the written tensors (None: the stored params' own). config.json's eos_token_id is the run's
  stop ids (run_setup.stop_ids: an int, or a list when there are several), also written to
  generation_config.json. HF_DIR must be new or empty; it is written through _staged, config.json last,
  so a refused or failed export leaves no half-written HF dir. WORKDIR and HF_DIR may each be local or
  on `gs://`. Raises ConfigError for a WORKDIR that holds no run, a missing step, an HF_DIR with files
  in it, or one whose parent directory (bucket, on object storage) does not exist.
  """
  from llama_jax import run_setup
  from llama_jax.errors import ConfigError

  hf_dir = paths.normalize(hf_dir)
  if paths.is_remote(hf_dir):
    paths.check_bucket(hf_dir, "--hf_dir")
  elif not paths.isdir(paths.parent(hf_dir)):
    raise ConfigError(f"--hf_dir {hf_dir}: parent directory {paths.parent(hf_dir)} does not exist")
  if paths.exists(hf_dir) and (not paths.isdir(hf_dir) or paths.listdir(hf_dir)):
    raise ConfigError(f"--hf_dir {hf_dir} {config_file.describe_path(hf_dir)}; export into a new or empty directory")
  setup, params, tok, step = run_setup.load_run(workdir, step)
  stop = run_setup.stop_ids(workdir, tok)
  eos = stop[0] if len(stop) == 1 else stop
  with _staged(hf_dir, "exporting") as tmp:
    paths.makedirs(tmp)
    paths.copy(run_setup.tokenizer_path(workdir), paths.join(tmp, "tokenizer.model"))
    _write_json(paths.join(tmp, "generation_config.json"), {"bos_token_id": tok.bos_id, "eos_token_id": eos})
    to_hf(setup.llama, jax.device_get(params), tmp, dtype=dtype, bos_token_id=tok.bos_id, eos_token_id=eos)
  return step


def max_logit_difference(hf_dir: str, config: LlamaConfig, params, seq_len: int = 16, seed: int = 0) -> float:
  """Runs transformers' LlamaForCausalLM (torch, fp32) and ours on the same random tokens."""
  import torch
  import transformers

  hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (2, seq_len))
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
  graphdef, _ = nnx.split(model_lib.abstract_model(dataclasses.replace(config, dtype="float32")))
  mine = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))
  return float(np.abs(mine - theirs).max())


def main():
  """`import-hf` or `export-hf`, then flags (absl; the error path of llama_jax.entry)."""
  from absl import flags

  from llama_jax import entry
  from llama_jax.errors import ConfigError

  hf_dir = flags.DEFINE_string("hf_dir", None, "The Hugging Face checkpoint directory (read or written; local "
                               "or gs://).")
  workdir = flags.DEFINE_string("workdir", None, "The llama_jax workdir (written or read; local or gs://).")
  config = flags.DEFINE_string("config", "configs/llama.py", "import-hf: training config to store with it (a "
                               "local file).")
  check = flags.DEFINE_bool("check", False, "import-hf: compare logits with transformers (needs torch, and a "
                            "local --hf_dir).")
  step = flags.DEFINE_integer("step", None, "export-hf: checkpoint step (default: the latest).")
  dtype = flags.DEFINE_enum("dtype", None, sorted(DTYPES),
                            "import-hf: the compute dtype stored with the model (default: the checkpoint's own, "
                            "config.json's dtype / torch_dtype); export-hf: the dtype of the written tensors "
                            "(default: bfloat16).")

  def run(argv):
    usage = "usage: python -m llama_jax.convert (import-hf | export-hf) --hf_dir=... --workdir=..."
    if len(argv) < 2:
      raise ConfigError(f"no subcommand given; {usage}")
    if len(argv) > 2 or argv[1] not in ("import-hf", "export-hf"):
      raise ConfigError(f"unknown subcommand {' '.join(argv[1:])!r}; {usage}")
    command = argv[1]
    missing = [f"--{f.name}" for f in (hf_dir, workdir) if f.value is None]
    if missing:
      raise ConfigError(f"{command}: {' and '.join(missing)} must be given; {usage}")
    if command == "import-hf":
      if check.value and paths.is_remote(hf_dir.value):  # transformers' from_pretrained reads a local dir
        raise ConfigError(f"--check compares with transformers, which reads a local directory, not --hf_dir "
                          f"{hf_dir.value}; drop --check or import from a local copy")
      llama, state = import_hf(hf_dir.value, workdir.value, config.value, dtype.value)
      print(f"wrote {workdir.value}/checkpoints/0 ({model_lib.count_params(llama):,} parameters, "
            f"computing in {llama.dtype})")
      if check.value:
        try:
          diff = max_logit_difference(hf_dir.value, llama, state["params"])
          print(f"check: max |logit difference| vs transformers = {diff:.2e}")
        except ImportError:
          print("check: skipped, torch and transformers are not installed")
    else:
      exported = export_hf(workdir.value, hf_dir.value, step.value, dtype.value or "bfloat16")
      print(f"wrote {hf_dir.value} from step {exported}")

  def run_reporting_bad_checkpoints(argv):
    try:
      run(argv)
    except ValueError as e:  # a bad or mismatched checkpoint, said in one line by from_hf / import_hf
      raise ConfigError(str(e)) from None

  entry.main(lambda argv: entry.run(lambda: run_reporting_bad_checkpoints(argv)))


if __name__ == "__main__":
  main()
