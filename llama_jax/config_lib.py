"""From the training config (ml_collections) to the objects it describes, and its checks.

Every check here runs before anything is compiled and raises ConfigError with one line
naming the culprit (config key, file or sizes).
"""

import dataclasses
import os

import ml_collections

from llama_jax import model as model_lib
from llama_jax import tokenizer as tok_lib
from llama_jax.errors import ConfigError

# The compute dtypes a run may take (model.dtype, the --dtype flags).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def llama_config(model_config: ml_collections.ConfigDict) -> model_lib.LlamaConfig:
  """LlamaConfig from `config.model` (a ConfigDict or a dict)."""
  fields = dict(model_config)
  known = {f.name for f in dataclasses.fields(model_lib.LlamaConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ConfigError(f"config.model.{unknown[0]} is not a LlamaConfig field")
  scaling = fields.get("rope_scaling")
  if scaling is not None:
    try:
      fields["rope_scaling"] = model_lib.RopeScaling(**dict(scaling))
    except TypeError as e:
      raise ConfigError(f"config.model.rope_scaling: {e}") from None
  try:
    return model_lib.LlamaConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


def model_config_dict(config: model_lib.LlamaConfig) -> ml_collections.ConfigDict:
  """The inverse of `llama_config`: `config.model` for a LlamaConfig (e.g. a preset)."""
  fields = dataclasses.asdict(config)
  return ml_collections.ConfigDict(fields)


def check_workdir(workdir: str):
  """ConfigError unless `workdir` is a directory or can be made as one (its parent exists)."""
  parent = os.path.dirname(os.path.abspath(workdir))
  if not os.path.isdir(parent):
    raise ConfigError(f"--workdir {workdir}: parent directory {parent} does not exist")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} {describe_path(workdir)}, not a directory")


def describe_path(path: str) -> str:
  """What is at `path`, in a few words that finish "PATH ...", for a line saying a file is not
  what a flag or key says: "does not exist", "is a directory", "is a JSON file", ...

  Reads at most 64 bytes of a file; a directory is named by what marks it (checkpoints/ for a
  llama_jax workdir, config.json for a Hugging Face checkpoint).
  """
  if not os.path.exists(path):
    return "does not exist"
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if "checkpoints" in names:
      return "is a llama_jax workdir (it has checkpoints/)"
    if "config.json" in names:
      return "is a Hugging Face checkpoint directory (it has config.json)"
    return "is an empty directory" if not names else "is a directory"
  size = os.path.getsize(path)
  if size == 0:
    return "is an empty file"
  with open(path, "rb") as f:
    head = f.read(64)
  # safetensors: an 8-byte little-endian header length, then the JSON header.
  if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
    return "is a safetensors file"
  if head.lstrip()[:1] in (b"{", b"["):
    return "is a JSON file"
  return "is a file"


def check_tokenizer_file(path: str, name: str):
  """ConfigError, naming `name` (the flag or config key) and what `path` is instead, unless it may be a
  tokenizer file: not a directory, an empty file, a JSON or a safetensors file. Reads 64 bytes."""
  looks = describe_path(path)
  if looks == "does not exist":
    raise ConfigError(f"{name}: tokenizer file not found: {path}")
  if looks not in ("is a file",):
    hint = " (an HF tokenizer.json? give the model's tokenizer.model)" if looks == "is a JSON file" else ""
    raise ConfigError(f"{name}: {path} {looks}{hint}, not a tokenizer file (a sentencepiece model or "
                      "tiktoken ranks)")


def load_tokenizer(path: str, name: str):
  """The tokenizer at `path` (tokenizer.load_tokenizer), or ConfigError naming `name` (the flag, key or
  file) and what `path` is instead when it is not a sentencepiece model or tiktoken ranks file."""
  check_tokenizer_file(path, name)
  try:
    return tok_lib.load_tokenizer(path)
  except (RuntimeError, ValueError, OSError, UnicodeDecodeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    raise ConfigError(f"{name}: {path} is not a sentencepiece model or tiktoken ranks file ({reason})") from None


def check_config(config: ml_collections.ConfigDict):
  """Cross-field checks of the training config that need no data and no compilation."""
  llama = llama_config(config.model)
  if config.data.seq_len > llama.max_seq_len:
    raise ConfigError(f"config.data.seq_len={config.data.seq_len} exceeds "
                      f"config.model.max_seq_len={llama.max_seq_len}")
  for key in ("train.steps", "data.batch_size", "data.seq_len", "train.grad_accum_steps",
              "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "data.read_threads",
              "data.pack_bins"):
    section, name = key.split(".")
    if config[section][name] < 1:
      raise ConfigError(f"config.{key}={config[section][name]} must be >= 1")
  k = config.train.grad_accum_steps
  if config.data.batch_size % k:
    raise ConfigError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                      f"config.train.grad_accum_steps={k}")
  chunk = config.train.loss_chunk_size
  if chunk < 0 or (chunk and config.data.seq_len % chunk):
    raise ConfigError(f"config.train.loss_chunk_size={chunk} must be 0 or divide "
                      f"config.data.seq_len={config.data.seq_len}")
  if config.data.tokenizer_path:
    check_tokenizer_file(config.data.tokenizer_path, "config.data.tokenizer_path")
  if llama.dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.model.dtype={llama.dtype!r} is not one of {list(COMPUTE_DTYPES)}")
  return llama


def check_vocab(tokenizer, llama: model_lib.LlamaConfig, source: str):
  if tokenizer.vocab_size != llama.vocab_size:
    raise ConfigError(f"tokenizer {source} has vocab size {tokenizer.vocab_size}, but "
                      f"config.model.vocab_size={llama.vocab_size}")


# What a resumed run may change freely: how the model is computed (not what it is). The data
# stream is guarded by what each checkpoint records of it (data.stream_definition).
_COMPUTE_FIELDS = ("model.dtype", "model.scan_layers", "model.remat", "model.attention")


def _diff(a: dict, b: dict) -> list[str]:
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _architecture(c) -> dict:
  fields = {f"model.{k}": v.to_dict() if hasattr(v, "to_dict") else v for k, v in c.model.items()}
  return {k: v for k, v in fields.items() if k not in _COMPUTE_FIELDS}


def model_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """The model fields, other than how it is computed, that differ, as 'key: saved -> now'."""
  return _diff(_architecture(saved), _architecture(config))


def changed_on_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """The model fields (other than how it is computed) and the seed that differ between a checkpoint's
  config and this run's, as 'key: saved -> now'. Anything else (train.steps, optim, ...) may change."""
  return model_changes(saved, config) + _diff({"seed": saved.seed}, {"seed": config.seed})


# Keys added to the config after checkpoints were first written, with the values that keep an
# older checkpoint's run as it was (eval.py and generation read a checkpoint's own config).
_ADDED_KEYS = {
    "init_from": "",
    "data.format": "text", "data.prompt_field": "prompt", "data.response_field": "response",
    "data.sft_overlong": "truncate_prompt", "data.tfds_data_dir": "", "data.skip_bad_documents": False,
    "data.tokenizer_sample_bytes": 100_000_000, "data.shuffle_window": 0, "data.pack_bins": 64,
    "data.read_threads": 2,
    "train.checkpoint_every_minutes": 0.0, "train.keep_every": 0, "train.skip_nonfinite_steps": 0,
    "train.allow_config_change": False,
    "sample.top_k": 0, "sample.top_p": 1.0, "sample.every": 0,
}


def with_added_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A checkpoint's config with the keys it predates filled in (see _ADDED_KEYS)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in _ADDED_KEYS.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    if name not in node:
      node[name] = value
  return config
