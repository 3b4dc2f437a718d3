"""What a run is, from its config or its workdir: its tokenizer (prepare_tokenizer), Setup (mesh,
model structure, optimizer, shardings, jitted steps), load_run (a checkpoint's setup, params
and tokenizer) and stop_ids (the token ids that end a generated row).

Training (trainer.py), evaluation (evaluate.py), generation, the benchmark, AOT compilation and
HF conversion all start here; this module imports none of them.
"""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config_file
from llama_jax import config_lib
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import paths
from llama_jax import sharding as sh
from llama_jax import tokenizer as tok_lib
from llama_jax import train_step as step_lib


def tokenizer_path(workdir: str) -> str:
  return paths.join(workdir, "tokenizer.model")


def generation_path(workdir: str) -> str:
  """WORKDIR/generation.json: {"stop_ids": [...]}, written by an HF import whose checkpoint lists its
  end-of-sequence ids (Llama 3 instruct: <|end_of_text|> and <|eot_id|>), and copied into a run
  started from it (inherit_stop_ids)."""
  return paths.join(workdir, "generation.json")


def write_stop_ids(workdir: str, stop_ids: list[int]):
  paths.write_atomic(generation_path(workdir), json.dumps({"stop_ids": [int(t) for t in stop_ids]}) + "\n")


def stop_ids(workdir: str, tok, vocab_size: int | None = None) -> list[int]:
  """The token ids that end a generated row: WORKDIR/generation.json's list where one was written (an
  HF import whose checkpoint lists its end-of-sequence ids, or a run fine-tuned from one: inherit_stop_ids;
  it replaces the tokenizer's EOS, as in transformers' generate), else [tok.eos_id].

  Raises ConfigError naming the file when generation.json is not {"stop_ids": [int, ...]} with every id
  inside the vocabulary (`vocab_size`: the model's; default the tokenizer's).
  """
  path = generation_path(workdir)
  if not paths.exists(path):
    return [tok.eos_id]
  try:
    ids = json.loads(paths.read_text(path))["stop_ids"]
  except (ValueError, KeyError, TypeError, OSError) as e:  # UnicodeDecodeError is a ValueError
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise config_lib.ConfigError(f"{path} is not {{\"stop_ids\": [id, ...]}}: {reason}") from None
  if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
    raise config_lib.ConfigError(f"{path}: stop_ids={ids!r} is not a non-empty list of token ids")
  vocab_size = vocab_size or tok.vocab_size
  bad = [t for t in ids if not 0 <= t < vocab_size]
  if bad:
    raise config_lib.ConfigError(f"{path}: stop id {bad[0]} is outside the vocabulary [0, {vocab_size})")
  return list(ids)


def inherit_stop_ids(config, workdir: str, tok, llama, init_from: str | None = None) -> list[int]:
  """The stop ids of a training run: a run started from config.init_from with that run's tokenizer
  (prepare_tokenizer) also takes its generation.json, so that its samples, eval, generation and HF
  export stop where the model it was fine-tuned from does. Checks them (stop_ids) and returns them."""
  given = generation_path(init_from) if init_from and not config.data.tokenizer_path else ""
  path = generation_path(workdir)
  if given and paths.exists(given) and not paths.exists(path):
    ids = stop_ids(init_from, tok, llama.vocab_size)  # a bad file in init_from is named before anything is copied
    if jax.process_index() == 0:
      write_stop_ids(workdir, ids)
    _wait_for_file(path)
  return stop_ids(workdir, tok, llama.vocab_size)


def prepare_tokenizer(config, workdir: str, train_corpus, llama, init_from: str | None = None):
  """The run's tokenizer, kept as WORKDIR/tokenizer.model so the workdir is self-contained:
  data.tokenizer_path, else the tokenizer of the init_from run, else one trained on the corpus.

  A given tokenizer is checked against the model before it is copied, so a wrong one leaves
  nothing behind and a corrected data.tokenizer_path then works.
  """
  path = tokenizer_path(workdir)
  given = config.data.tokenizer_path or (tokenizer_path(init_from) if init_from else "")
  if not paths.exists(path):
    if given:
      name = "config.data.tokenizer_path" if config.data.tokenizer_path else f"config.init_from={init_from}"
      config_lib.check_vocab(config_lib.load_tokenizer(given, name), llama, given)
      if jax.process_index() == 0:
        paths.copy(given, path)
    else:
      metrics_lib.log(f"training a {config.model.vocab_size}-piece tokenizer on up to "
                      f"{config.data.tokenizer_sample_bytes:,} bytes of {config.data.train_corpus}")
      if jax.process_index() == 0:
        sample = train_corpus.sample(config.data.tokenizer_sample_bytes, config.data.shuffle_seed)
        tok_lib.train_sentencepiece(tok_lib.training_lines(sample), config.model.vocab_size, path)
  _wait_for_file(path)
  tok = config_lib.load_tokenizer(path, "--workdir")
  config_lib.check_vocab(tok, llama, path)
  return tok


def _wait_for_file(path, timeout_s=600):
  deadline = time.time() + timeout_s
  while not paths.exists(path):
    if time.time() > deadline:
      raise TimeoutError(f"{path} did not appear (written by process 0)")
    time.sleep(0.5)


class Setup:
  """Everything a run needs that follows from the config: mesh, model structure, optimizer,
  shardings, jitted steps. Shared by training, eval.py and generation."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    self.config = config
    self.llama = config_lib.llama_config(config.model)
    self.mesh = sh.make_mesh(config.mesh, devices)
    config_lib.check_attention(self.llama, self.mesh.devices.flat)  # "auto" as the devices resolve it
    abstract_model = model_lib.abstract_model(self.llama)
    self.graphdef, _ = nnx.split(abstract_model)
    sh.check_params_divisible(self.mesh, abstract_model)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps,
                                                  config.train.skip_nonfinite_steps)

    def init_state():
      params = nnx.to_pure_dict(nnx.state(model_lib.init_model(self.llama, config.seed), nnx.Param))
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    self._init_state = init_state
    abstract_state = jax.eval_shape(init_state)
    self.params_sharding = sh.param_shardings(self.mesh, abstract_model)
    self.state_sharding = sh.state_shardings(self.mesh, abstract_state, self.params_sharding, self.tx)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_sharding)
    self.batch_sharding = sh.batch_sharding(self.mesh)

  def init_state(self):
    """The initial train state, created directly sharded over the mesh."""
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init_state, out_shardings=self.state_sharding)()

  def state_from_params(self, params):
    """A train state at step 0 around given params (init_from): a fresh optimizer state, sharded."""
    def make(params):
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}
    with jax.set_mesh(self.mesh):
      return jax.jit(make, in_shardings=(self.params_sharding,), out_shardings=self.state_sharding)(params)

  def jit_train_step(self):
    t = self.config.train
    step = step_lib.make_train_step(self.graphdef, self.tx, self.schedule, t.grad_accum_steps, t.loss_chunk_size,
                                    t.skip_nonfinite_steps, self.config.optim.z_loss)
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=(self.state_sharding, None), donate_argnums=0)

  def jit_eval_step(self):
    return jax.jit(step_lib.make_eval_step(self.graphdef, self.config.train.loss_chunk_size),
                   in_shardings=(self.params_sharding, self.batch_sharding))

  def global_batch(self, local_batch):
    """Assembles this process's rows into global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}


def check_batch(config, mesh):
  shards = mesh.shape[sh.DATA] * mesh.shape[sh.FSDP]
  micro = config.data.batch_size // config.train.grad_accum_steps
  if micro % shards:
    raise config_lib.ConfigError(
        f"config.data.batch_size={config.data.batch_size} / train.grad_accum_steps="
        f"{config.train.grad_accum_steps} = {micro} rows per micro-batch is not divisible by the "
        f"{shards} batch shards (mesh data x fsdp)")


def _not_a_run(workdir: str) -> str:
  """Why `workdir` holds no run, in words that follow its name."""
  looks = config_file.describe_path(workdir)
  if "Hugging Face" in looks:
    return f"{looks}, not a llama_jax workdir: import it first with python -m llama_jax.convert import-hf"
  if looks.startswith("is a llama_jax workdir"):
    return "has an empty checkpoints directory: no checkpoint saved yet"
  return f"{looks}: no checkpoints directory, so it is not a llama_jax workdir"


def load_run(workdir: str, step: int | None = None, devices=None, dtype: str | None = None, check=None):
  """(setup, params, tokenizer, step) of WORKDIR's checkpoint (latest by default), for eval/sampling.

  Args:
    dtype: compute dtype for this call ("float32", "bfloat16", "float16"); None keeps the checkpoint's
      config.model.dtype. Params are restored in their stored dtype either way.
    check: called with the Setup before the tokenizer and params are read (eval.py's own checks of
      what it will run), so that its ConfigError comes before the slow part.
  Raises ConfigError (before anything compiles) for a WORKDIR that holds no run, a missing step, a bad
  tokenizer.model or dtype.
  """
  if dtype is not None and dtype not in config_lib.COMPUTE_DTYPES:
    raise config_lib.ConfigError(f"--dtype {dtype!r} is not one of {list(config_lib.COMPUTE_DTYPES)}")
  if not ckpt_lib.has_checkpoints(workdir):
    raise config_lib.ConfigError(f"--workdir {workdir} {_not_a_run(workdir)}")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:  # closed on every path: orbax's background threads must not outlive an error
    steps = checkpointer.all_steps()
    if not steps:
      raise config_lib.ConfigError(f"--workdir {workdir}: no checkpoint saved yet")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise config_lib.ConfigError(f"--step {step}: no such checkpoint in {workdir} (have {sorted(steps)})")
    config = config_lib.with_added_keys(checkpointer.restore_config(step))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1  # fsdp over as many devices as fit
    devices = sh.fitting_devices(config.mesh, model_lib.abstract_model(config_lib.llama_config(config.model)), devices)
    if dtype is not None:
      config.model.dtype = dtype
    setup = Setup(config, devices)
    if check is not None:
      check(setup)
    tok = config_lib.load_tokenizer(tokenizer_path(workdir), f"--workdir {workdir}")
    config_lib.check_vocab(tok, setup.llama, tokenizer_path(workdir))
    params = checkpointer.restore_params(step, setup.abstract_state["params"])
  finally:
    checkpointer.close()
  return setup, params, tok, step


def parse_init_from(init_from: str) -> tuple[str, int | None]:
  """config.init_from = WORKDIR[:STEP] -> (WORKDIR, STEP or None for the latest)."""
  workdir, sep, step = init_from.rpartition(":")
  if sep and step.isdigit():
    return workdir, int(step)
  return init_from, None


# The keys that shape the optimizer state (optim.make_optimizer): a train state taken over with
# config.init_from_state needs the values it was made with.
_OPT_STATE_KEYS = ("optim.optimizer", "train.skip_nonfinite_steps")


def check_init_from(config) -> tuple[str, int]:
  """(workdir, step) of config.init_from after checking, before anything compiles, that it holds a
  checkpoint of the architecture this config builds and a tokenizer; with config.init_from_state,
  also that the checkpoint holds a data position (not an HF import) and was made with this config's
  _OPT_STATE_KEYS. Raises ConfigError naming config.init_from (and the key) otherwise."""
  workdir, step = parse_init_from(config.init_from)
  name = f"config.init_from={config.init_from}"
  if not paths.isdir(ckpt_lib.checkpoint_dir(workdir)):
    looks = config_file.describe_path(workdir)
    if "Hugging Face" in looks:
      raise config_lib.ConfigError(f"{name}: {workdir} {looks}, not a llama_jax workdir: import it with "
                                   "python -m llama_jax.convert import-hf and give that workdir")
    raise config_lib.ConfigError(f"{name}: no checkpoints directory in {workdir}, which {looks} (run it first, "
                                 "or set config.init_from='' to start from random weights)")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if step is None and steps:
      step = max(steps)
    if step not in steps:
      raise config_lib.ConfigError(f"{name}: no checkpoint {'saved yet' if step is None else step} (have {steps})")
    saved = checkpointer.restore_config(step)
    has_data = checkpointer.has_data(step)
  finally:
    checkpointer.close()
  changes = config_lib.model_changes(saved, config)
  if changes:
    raise config_lib.ConfigError(f"{name}: its model differs from config.model: {'; '.join(changes)}")
  if not paths.isfile(tokenizer_path(workdir)):
    raise config_lib.ConfigError(f"{name}: no tokenizer.model in {workdir}")
  if config.init_from_state:
    if not has_data:
      raise config_lib.ConfigError(f"{name}: checkpoint {step} holds no data position (an HF import?): "
                                   "config.init_from_state=True has no run to continue (False: start from its params)")
    changed = config_lib.key_changes(config_lib.with_added_keys(saved), config, _OPT_STATE_KEYS)
    if changed:
      raise config_lib.ConfigError(f"{name} with config.init_from_state=True: its optimizer state is of another "
                                   f"optimizer ({'; '.join(changed)}); keep the same, or init_from_state=False "
                                   "for a fresh optimizer state")
    if config.train.steps <= step:
      raise config_lib.ConfigError(f"{name} with config.init_from_state=True: config.train.steps="
                                   f"{config.train.steps} does not go past its step {step}")
  return workdir, step


def restore_init_params(workdir: str, step: int, setup):
  """The params of checkpoint `step` of `workdir`, sharded as `setup` shards them."""
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.restore_params(step, setup.abstract_state["params"])
  finally:
    checkpointer.close()
