"""train_and_evaluate(config, workdir): the training loop, from config to checkpoints and metrics."""

import itertools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config_lib
from llama_jax import data as data_lib
from llama_jax import evaluate as eval_lib
from llama_jax import flops
from llama_jax import generate as generate_lib
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import sharding as sh
from llama_jax import tokenizer as tok_lib
from llama_jax import train_step as step_lib


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.model")


def prepare_tokenizer(config, workdir: str, train_corpus):
  """The run's tokenizer, kept as WORKDIR/tokenizer.model so the workdir is self-contained."""
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    if config.data.tokenizer_path:
      if jax.process_index() == 0:
        shutil.copyfile(config.data.tokenizer_path, path + ".tmp")
        os.replace(path + ".tmp", path)
    else:
      metrics_lib.log(f"training a {config.model.vocab_size}-piece tokenizer on up to "
                      f"{config.data.tokenizer_sample_bytes:,} bytes of {config.data.train_corpus}")
      if jax.process_index() == 0:
        sample = train_corpus.sample(config.data.tokenizer_sample_bytes, config.data.shuffle_seed)
        tok_lib.train_sentencepiece(tok_lib.training_lines(sample), config.model.vocab_size, path)
  _wait_for_file(path)
  return tok_lib.load_tokenizer(path)


def _wait_for_file(path, timeout_s=600):
  deadline = time.time() + timeout_s
  while not os.path.exists(path):
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
    abstract_model = model_lib.abstract_model(self.llama)
    self.graphdef, _ = nnx.split(abstract_model)
    sh.check_params_divisible(self.mesh, abstract_model)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)

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

  def jit_train_step(self):
    t = self.config.train
    step = step_lib.make_train_step(self.graphdef, self.tx, self.schedule, t.grad_accum_steps, t.loss_chunk_size)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None,
                       stop_after: int | None = None):
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the final eval.

  Args:
    devices: the devices of the mesh (default: all).
    stop_after: end this run (with a checkpoint) after this step, as a preempted job would.
  """
  config_lib.check_workdir(workdir)
  llama = config_lib.check_config(config)
  setup = Setup(config, devices)
  check_batch(config, setup.mesh)
  os.makedirs(workdir, exist_ok=True)

  train_corpus = data_lib.open_corpus(config.data, "train_corpus")
  eval_corpus = data_lib.open_corpus(config.data, "eval_corpus")
  tok = prepare_tokenizer(config, workdir, train_corpus)
  config_lib.check_vocab(tok, llama, tokenizer_path(workdir))
  evaluator = eval_lib.Evaluator(setup, tok, eval_corpus)
  evaluator.check_not_empty()
  stream = data_lib.stream_definition(config.data, jax.process_count())
  train_iter = iter(data_lib.train_batches(train_corpus, tok, config.data, jax.process_index(),
                                           jax.process_count()))

  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints, config.train.async_checkpoint)
  writer = metrics_lib.MetricWriter(workdir)
  try:
    start = checkpointer.latest_step()
    if start is not None and checkpointer.has_data(start):  # (an HF import has no data position)
      data_lib.check_stream(checkpointer.restore_stream(start), stream, start)
      checkpointer.restore_data(start, train_iter)
    # Unreadable data shows up here, before anything compiles.
    batches = itertools.chain([next(train_iter)], train_iter)
    if start is None:
      state = setup.init_state()
      start = 0
      metrics_lib.log(f"{model_lib.count_params(llama):,} parameters; training from scratch")
    else:
      state = checkpointer.restore_state(start, setup.abstract_state)
      metrics_lib.log(f"resumed from step {start} in {ckpt_lib.checkpoint_dir(workdir)}")

    total = config.train.steps
    tokens_per_step = config.data.batch_size * config.data.seq_len
    peak_flops = flops.peak_flops_per_device(jax.devices()[0]) * setup.mesh.size
    flops_per_token = flops.train_flops_per_token(llama, config.data.seq_len)
    progress = metrics_lib.ProgressLogger(start, total)
    train_step = setup.jit_train_step()
    end = total if stop_after is None else min(stop_after, total)
    loss_sum, logged_at = 0.0, start  # the logged loss is the mean since the previous log line
    with jax.set_mesh(setup.mesh):
      for step in range(start, end):
        state, metrics = train_step(state, setup.global_batch(next(batches)))
        loss_sum = loss_sum + metrics["loss"]  # stays on device: no sync per step
        done = step + 1
        if done % config.train.log_every == 0 or done in (total, end):
          metrics = sh.replicated_to_host(dict(metrics, loss=loss_sum / (done - logged_at)))
          loss_sum, logged_at = 0.0, done
          if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {done}; last good checkpoint: "
                                     f"{checkpointer.latest_step()}")
          metrics["tokens_per_sec"] = progress.tokens_per_sec(done, tokens_per_step)
          metrics["mfu"] = metrics["tokens_per_sec"] * flops_per_token / peak_flops if peak_flops else 0.0
          if train_corpus.skipped():
            metrics["skipped_documents"] = train_corpus.skipped()
          writer.write(done, metrics)
          metrics_lib.log(progress.line(done, metrics))
        if config.train.eval_every and done % config.train.eval_every == 0 and done != total:
          writer.write(done, eval_lib.as_eval_metrics(evaluator(state["params"])))
        if done % config.train.checkpoint_every == 0 or done in (total, end):
          checkpointer.save(done, state, config, train_iter, stream)
    result = None
    if end == total:
      result = evaluator(state["params"])
      if start < total:
        writer.write(total, eval_lib.as_eval_metrics(result))
      metrics_lib.log(f"held-out: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
                      f"{result['bits_per_byte']:.4f} bits/byte over {result['num_tokens']:,} tokens")
      if config.sample.max_new_tokens > 0:
        metrics_lib.log(f"sample:\n{generate_lib.sample_text(setup, state['params'], tok, config.sample)}")
      result = {"step": total, **result}
    return result
  finally:  # an error still finishes the save in flight and stops the data threads
    checkpointer.wait()
    checkpointer.close()
    train_iter.close()
    writer.close()


def load_run(workdir: str, step: int | None = None, devices=None):
  """(setup, params, tokenizer, step) of WORKDIR's checkpoint (latest by default), for eval/sampling."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise config_lib.ConfigError(f"--workdir {workdir}: no checkpoints directory")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  steps = checkpointer.all_steps()
  if not steps:
    raise config_lib.ConfigError(f"--workdir {workdir}: no checkpoint saved yet")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise config_lib.ConfigError(f"--step {step}: no such checkpoint in {workdir} (have {sorted(steps)})")
  config = checkpointer.restore_config(step)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1  # whatever devices are here
  setup = Setup(config, devices)
  tok = tok_lib.load_tokenizer(tokenizer_path(workdir))
  config_lib.check_vocab(tok, setup.llama, tokenizer_path(workdir))
  params = checkpointer.restore_params(step, setup.abstract_state["params"])
  checkpointer.close()
  return setup, params, tok, step
