"""From the training config (ml_collections) to the objects it describes, and its checks.

Every check here runs before anything is compiled and raises ConfigError with one line
naming the culprit (config key, file or sizes).
"""

import dataclasses
import math
import re

import ml_collections

from llama_jax import attention as attention_lib
from llama_jax import config_file
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import paths
from llama_jax import profiler
from llama_jax import tokenizer as tok_lib
from llama_jax import trackers
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
  """ConfigError unless `workdir` is a directory or can be made as one, and is not a Hugging Face
  checkpoint directory (config.json and no checkpoints/: import it first). A local workdir can be
  made where its parent directory exists; a `gs://` one where its bucket exists and answers
  (paths.check_bucket, after the client's retries)."""
  if paths.is_remote(workdir):
    paths.check_bucket(workdir, "--workdir")
  else:
    parent = paths.parent(workdir)
    if not paths.isdir(parent):
      raise ConfigError(f"--workdir {workdir}: parent directory {parent} does not exist")
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} {config_file.describe_path(workdir)}, not a directory")
  looks = config_file.describe_path(workdir)
  if "Hugging Face" in looks:
    raise ConfigError(f"--workdir {workdir} {looks}, not a llama_jax workdir: import it with "
                      "python -m llama_jax.convert import-hf --hf_dir=... --workdir=NEW and give that workdir")


def check_tokenizer_file(path: str, name: str):
  """ConfigError, naming `name` (the flag or config key) and what `path` is instead, unless it may be a
  tokenizer file: not a directory, an empty file, a JSON or a safetensors file. Reads 64 bytes."""
  looks = config_file.describe_path(path)
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


_INT, _REAL = "an integer", "a finite number"

# (key, kind, low, high, low_open): every numeric key of the training config but config.mesh (checked
# where the mesh is built, llama_jax/sharding.py) and its valid range, low excluded where low_open,
# high None for no upper bound (high excluded for the keys of _OPEN_ABOVE). A new numeric key gets a row.
_RANGES = (
    ("seed", _INT, 0, None, False),
    ("model.vocab_size", _INT, 1, None, False),
    ("model.dim", _INT, 1, None, False),
    ("model.n_layers", _INT, 1, None, False),
    ("model.n_heads", _INT, 1, None, False),
    ("model.n_kv_heads", _INT, 1, None, False),
    ("model.ffw_dim", _INT, 1, None, False),
    ("model.norm_eps", _REAL, 0, None, True),
    ("model.rope_theta", _REAL, 0, None, True),
    ("model.max_seq_len", _INT, 1, None, False),
    ("model.init_std", _REAL, 0, None, True),
    ("model.attention_block_q", _INT, 1, None, False),
    ("model.attention_block_kv", _INT, 1, None, False),
    ("model.attention_max_segments", _INT, 1, None, False),
    ("model.rope_scaling.factor", _REAL, 0, None, True),
    ("model.rope_scaling.low_freq_factor", _REAL, 0, None, True),
    ("model.rope_scaling.high_freq_factor", _REAL, 0, None, True),
    ("model.rope_scaling.original_max_seq_len", _INT, 1, None, False),
    ("data.seq_len", _INT, 1, None, False),
    ("data.batch_size", _INT, 1, None, False),
    ("data.shuffle_seed", _INT, 0, None, False),
    ("data.shuffle_window", _INT, 0, None, False),
    ("data.pack_bins", _INT, 1, None, False),
    ("data.read_threads", _INT, 1, None, False),
    ("data.shards", _INT, 0, None, False),
    ("data.tokenizer_sample_bytes", _INT, 1, None, False),
    ("optim.learning_rate", _REAL, 0, None, True),
    ("optim.warmup_steps", _INT, 0, None, False),
    ("optim.min_lr_ratio", _REAL, 0, 1, False),
    ("optim.b1", _REAL, 0, 1, False),
    ("optim.b2", _REAL, 0, 1, False),
    ("optim.eps", _REAL, 0, None, True),
    ("optim.weight_decay", _REAL, 0, None, False),
    ("optim.grad_clip", _REAL, 0, None, True),
    ("optim.decay_fraction", _REAL, 0, 1, False),
    ("optim.z_loss", _REAL, 0, None, False),
    ("train.steps", _INT, 1, None, False),
    ("train.grad_accum_steps", _INT, 1, None, False),
    ("train.loss_chunk_size", _INT, 0, None, False),
    ("train.log_every", _INT, 1, None, False),
    ("train.eval_every", _INT, 0, None, False),
    ("train.checkpoint_every", _INT, 1, None, False),
    ("train.checkpoint_every_minutes", _REAL, 0, None, False),
    ("train.keep_checkpoints", _INT, 1, None, False),
    ("train.keep_every", _INT, 0, None, False),
    ("train.skip_nonfinite_steps", _INT, 0, None, False),
    ("train.storage_retries", _INT, 0, None, False),
    ("sample.max_new_tokens", _INT, 0, None, False),
    ("sample.temperature", _REAL, 0, None, False),
    ("sample.top_k", _INT, 0, None, False),
    ("sample.top_p", _REAL, 0, 1, True),
    ("sample.seed", _INT, 0, None, False),
    ("sample.every", _INT, 0, None, False),
    ("eval.harness_every", _INT, 0, None, False),
    ("eval.harness_limit", _INT, 0, None, False),
    ("eval.num_fewshot", _INT, 0, None, False),
    ("eval.harness_batch_size", _INT, 1, None, False),
)
# Keys that may be None (a default of their own: the task's few-shot count).
_MAY_BE_NONE = {"eval.num_fewshot"}
# Upper bounds that are open: b1 and b2 < 1 (Adam's bias correction divides by 1 - b**t).
_OPEN_ABOVE = {"optim.b1", "optim.b2"}


_MISSING = object()


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    if node is None or part not in node:
      return _MISSING
    node = node[part]
  return node


def _range_text(kind: str, low, high, low_open: bool, high_open: bool) -> str:
  if high is None:
    return f"{kind} {'>' if low_open else '>='} {low}"
  return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_ranges(config: ml_collections.ConfigDict):
  """ConfigError naming the first numeric key (of _RANGES) outside its valid range, with its value
  and the range: non-finite numbers, negative counts, a zero where it divides, b1/b2 >= 1, ..."""
  for key, kind, low, high, low_open in _RANGES:
    value = _lookup(config, key)
    if value is _MISSING or (value is None and (".rope_scaling." in key or key in _MAY_BE_NONE)):
      continue  # absent from an older config (with_added_keys), no rope scaling, or the default
    high_open = key in _OPEN_ABOVE
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and (isinstance(value, int) if kind == _INT else math.isfinite(value))
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
      raise ConfigError(f"config.{key}={value!r}: must be {_range_text(kind, low, high, low_open, high_open)}")
  scaling = _lookup(config, "model.rope_scaling")
  if scaling not in (None, _MISSING) and "low_freq_factor" in scaling and "high_freq_factor" in scaling:
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
      raise ConfigError(f"config.model.rope_scaling.high_freq_factor={scaling['high_freq_factor']!r} must "
                        f"exceed low_freq_factor={scaling['low_freq_factor']!r} (RoPE scaling divides by "
                        "their difference)")


def check_config(config: ml_collections.ConfigDict, tokenizer: bool = True):
  """Checks of the training config that need no data and no compilation: every numeric key in its
  valid range (check_ranges), then the cross-field ones; with `tokenizer`, that
  data.tokenizer_path (if set) may be a tokenizer file. Returns the LlamaConfig."""
  check_ranges(config)
  llama = llama_config(config.model)
  if config.data.seq_len > llama.max_seq_len:
    raise ConfigError(f"config.data.seq_len={config.data.seq_len} exceeds "
                      f"config.model.max_seq_len={llama.max_seq_len}")
  k = config.train.grad_accum_steps
  if config.data.batch_size % k:
    raise ConfigError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                      f"config.train.grad_accum_steps={k}")
  check_attention(llama)
  chunk = config.train.loss_chunk_size
  if chunk and config.data.seq_len % chunk:
    raise ConfigError(f"config.train.loss_chunk_size={chunk} must be 0 or divide "
                      f"config.data.seq_len={config.data.seq_len}")
  if tokenizer and config.data.tokenizer_path:
    check_tokenizer_file(config.data.tokenizer_path, "config.data.tokenizer_path")
  if llama.dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.model.dtype={llama.dtype!r} is not one of {list(COMPUTE_DTYPES)}")
  eval_set_specs(config.data)
  eval_tasks(config.eval)
  if config.init_from_state and not config.init_from:
    raise ConfigError("config.init_from_state=True needs config.init_from=WORKDIR[:STEP] (the run whose "
                      "train state it takes)")
  optim.check_config(config)
  profiler.check_profile_steps(config.train)
  trackers.check_trackers(config.metrics)
  return llama


# The name data.eval_corpus goes by among the held-out sets, and the name of their macro mean.
DEFAULT_SET, MEAN_SET = "", "mean"
_SET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def eval_set_specs(data_config, corpus_spec: str | None = None) -> dict[str, str]:
  """The held-out sets of a run, name -> corpus spec: data.eval_corpus under DEFAULT_SET ("") when
  it is set, then data.eval_corpora's. With `corpus_spec` (eval.py --corpus) that corpus alone.

  Raises ConfigError, one line naming config.data.eval_corpora.<name>, for a name that is not
  identifier-like (letters, digits and _, not starting with a digit; its metrics are
  eval_<name>_loss, ...) or is "mean" (the macro mean's name), or a spec that is not a non-empty
  string; and when there is no set at all."""
  if corpus_spec:
    return {DEFAULT_SET: corpus_spec}
  named = data_config.eval_corpora
  if not hasattr(named, "items"):
    raise ConfigError(f"config.data.eval_corpora={named!r}: must be a dict of name -> corpus spec")
  specs = {DEFAULT_SET: data_config.eval_corpus} if data_config.eval_corpus else {}
  for name, spec in named.items():
    key = f"config.data.eval_corpora.{name}"
    if not _SET_NAME.fullmatch(name):
      raise ConfigError(f"{key}: the name must be letters, digits and _ (not starting with a digit)")
    if name == MEAN_SET:
      raise ConfigError(f"{key}: the name {MEAN_SET!r} is taken by the sets' macro mean (eval_mean_*); "
                        "choose another")
    if not isinstance(spec, str) or not spec:
      raise ConfigError(f"{key}={spec!r}: must be a corpus spec (text:, jsonl:, parquet:, tfds:, mix:, ...)")
    specs[name] = spec
  if not specs:
    raise ConfigError("config.data.eval_corpus is empty and config.data.eval_corpora names no set: "
                      "nothing to evaluate on")
  return specs


def eval_tasks(eval_config) -> list[str]:
  """config.eval.tasks as a list of task names; an entry "a,b" counts as two. ConfigError naming the key
  when it is not a tuple/list of strings, or config.eval.include_path not a string. (Whether the tasks
  exist is checked by llama_jax.harness.tasks.check_tasks.)"""
  tasks = eval_config.tasks
  if isinstance(tasks, str):
    tasks = (tasks,)
  if not isinstance(tasks, (tuple, list)) or not all(isinstance(t, str) for t in tasks):
    raise ConfigError(f"config.eval.tasks={tasks!r}: must be a tuple of task names")
  if not isinstance(eval_config.include_path, str):
    raise ConfigError(f"config.eval.include_path={eval_config.include_path!r}: must be a folder path or ''")
  return [name.strip() for entry in tasks for name in entry.split(",") if name.strip()]


def check_attention(llama: model_lib.LlamaConfig, devices=None):
  """ConfigError, one line naming the key, for an attention kernel that cannot run this model: the
  splash kernel's blocks (check_attention_blocks); for the cudnn kernel, what
  attention.cudnn_unsupported names (model.dtype bf16 or fp16, the head dim, jax's API).

  With `devices` (the run's mesh's) "auto" is checked as the kernel it stands for on their platform
  (attention.resolve), "cudnn" off GPU is refused, and so is a GPU too old for cuDNN's packed layout.
  """
  kernel, platform, capability = llama.attention, None, None
  if devices is not None:
    device = next(iter(devices))
    platform, capability = device.platform, getattr(device, "compute_capability", None)
    if kernel == "cudnn" and platform not in attention_lib.GPU_PLATFORMS:
      raise ConfigError(f"config.model.attention='cudnn' runs on GPU only, but the devices are {platform!r} "
                        "(use 'auto' or 'xla')")
    kernel = attention_lib.resolve(kernel, platform, llama.dtype, llama.head_dim, capability)
  check_attention_blocks(dataclasses.replace(llama, attention=kernel))
  if kernel == "cudnn":
    reason = attention_lib.cudnn_unsupported(llama.dtype, llama.head_dim, capability)
    if reason:
      raise ConfigError(f"config.model.attention='cudnn': {reason}")


def check_attention_blocks(llama: model_lib.LlamaConfig):
  """ConfigError naming the key unless, for the splash kernel, model.attention_block_q and _kv are
  multiples of attention.SPLASH_BLOCK_MULTIPLE (any block works for xla)."""
  if llama.attention != "splash":
    return
  for key in ("attention_block_q", "attention_block_kv"):
    if getattr(llama, key) % attention_lib.SPLASH_BLOCK_MULTIPLE:
      raise ConfigError(f"config.model.{key}={getattr(llama, key)}: the splash kernel's blocks must be "
                        f"multiples of {attention_lib.SPLASH_BLOCK_MULTIPLE}")


def check_vocab(tokenizer, llama: model_lib.LlamaConfig, source: str):
  if tokenizer.vocab_size != llama.vocab_size:
    raise ConfigError(f"tokenizer {source} has vocab size {tokenizer.vocab_size}, but "
                      f"config.model.vocab_size={llama.vocab_size}")


# What a resumed run may change freely: how the model is computed (not what it is). The data
# stream is guarded by what each checkpoint records of it (data.stream_definition).
_COMPUTE_FIELDS = ("model.dtype", "model.scan_layers", "model.remat", "model.attention",
                   "model.attention_block_q", "model.attention_block_kv", "model.attention_max_segments")


def _diff(a: dict, b: dict) -> list[str]:
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _architecture(c) -> dict:
  fields = {f"model.{k}": v.to_dict() if hasattr(v, "to_dict") else v for k, v in c.model.items()}
  return {k: v for k, v in fields.items() if k not in _COMPUTE_FIELDS}


def model_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """The model fields, other than how it is computed, that differ, as 'key: saved -> now'."""
  return _diff(_architecture(saved), _architecture(config))


def key_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, keys) -> list[str]:
  """The values of the dotted `keys` (e.g. "optim.optimizer") that differ between a checkpoint's
  config and this run's, as 'key: saved -> now'."""
  return _diff({k: _lookup(saved, k) for k in keys}, {k: _lookup(config, k) for k in keys})


def changed_on_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """The model fields (other than how it is computed) and the seed that differ between a checkpoint's
  config and this run's, as 'key: saved -> now'. Anything else (train.steps, optim, ...) may change."""
  return model_changes(saved, config) + _diff({"seed": saved.seed}, {"seed": config.seed})


# Keys added to the config after checkpoints were first written, with the values that keep an
# older checkpoint's run as it was (eval.py and generation read a checkpoint's own config).
_ADDED_KEYS = {
    "init_from": "", "init_from_state": False,
    "data.format": "text", "data.prompt_field": "prompt", "data.response_field": "response",
    "data.sft_overlong": "truncate_prompt", "data.tfds_data_dir": "", "data.skip_bad_documents": False,
    "data.tokenizer_sample_bytes": 100_000_000, "data.shuffle_window": 0, "data.pack_bins": 64,
    "data.read_threads": 2, "data.shards": 0,
    "train.checkpoint_every_minutes": 0.0, "train.keep_every": 0, "train.skip_nonfinite_steps": 0,
    "train.allow_config_change": False,
    "sample.top_k": 0, "sample.top_p": 1.0, "sample.every": 0,
    "model.attention_block_q": 512, "model.attention_block_kv": 512, "model.attention_max_segments": 64,
    "data.eval_corpora": {},
    "eval.tasks": (), "eval.harness_every": 0, "eval.harness_limit": 0, "eval.num_fewshot": None,
    "eval.include_path": "", "eval.harness_batch_size": 8,
    "optim.optimizer": "adamw", "optim.schedule": "cosine", "optim.decay_fraction": 0.2,
    "optim.decay_shape": "linear", "optim.decay_mask": ("norms", "embedding"), "optim.z_loss": 0.0,
    "train.profile_steps": (),
    "metrics.trackers": ("jsonl", "tensorboard"), "metrics.wandb_project": "llama_jax",
    "metrics.wandb_entity": "", "metrics.wandb_name": "", "metrics.wandb_mode": "online",
}
# Values an older checkpoint's config may hold, and what they are called now: its two attention
# paths computed what the xla kernel computes.
_RENAMED_VALUES = {"model.attention": {"einsum": "xla", "dot_product": "xla"}}


def with_added_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A checkpoint's config with the keys it predates filled in (see _ADDED_KEYS; a section it
  predates, such as config.eval, is added too) and the values renamed since under their names of
  today (_RENAMED_VALUES)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in _ADDED_KEYS.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if name not in node:
      node[name] = value
  for key, renames in _RENAMED_VALUES.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = renames.get(node[name], node[name])
  return config
