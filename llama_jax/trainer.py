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
from llama_jax import preemption
from llama_jax import sharding as sh
from llama_jax import tokenizer as tok_lib
from llama_jax import train_step as step_lib
from llama_jax.errors import StopRun


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.model")


def prepare_tokenizer(config, workdir: str, train_corpus, llama):
  """The run's tokenizer, kept as WORKDIR/tokenizer.model so the workdir is self-contained.

  A given tokenizer is checked against the model before it is copied, so a wrong one leaves
  nothing behind and a corrected data.tokenizer_path then works.
  """
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    if config.data.tokenizer_path:
      config_lib.check_vocab(tok_lib.load_tokenizer(config.data.tokenizer_path), llama, config.data.tokenizer_path)
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
  tok = tok_lib.load_tokenizer(path)
  config_lib.check_vocab(tok, llama, path)
  return tok


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

  def jit_train_step(self):
    t = self.config.train
    step = step_lib.make_train_step(self.graphdef, self.tx, self.schedule, t.grad_accum_steps, t.loss_chunk_size,
                                    t.skip_nonfinite_steps)
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
  """Trains per `config` in `workdir`, resuming from its latest good checkpoint; returns the final
  eval (None when the run stops early: `stop_after`, SIGTERM, a preemption notice).

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
  tok = prepare_tokenizer(config, workdir, train_corpus, llama)
  evaluator = eval_lib.Evaluator(setup, tok, eval_corpus)
  evaluator.check_not_empty()
  stream = data_lib.stream_definition(config.data, jax.process_count())
  train_iter = iter(data_lib.train_batches(train_corpus, tok, config.data, jax.process_index(),
                                           jax.process_count()))
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train)
  writer = metrics_lib.MetricWriter(workdir)
  watch = preemption.PreemptionWatch()
  try:
    resumed = checkpointer.restore_latest(
        lambda step: _restore(checkpointer, step, setup, config, stream, train_iter))
    batches = itertools.chain([next(train_iter)], train_iter)  # unreadable data shows up now, before compiling
    if resumed is None:
      start, state = 0, setup.init_state()
      metrics_lib.log(f"{model_lib.count_params(llama):,} parameters; training from scratch")
    else:
      start, state = resumed
      metrics_lib.log(f"resumed from step {start} in {checkpointer.directory}")
    end = config.train.steps if stop_after is None else min(stop_after, config.train.steps)
    state, stopped_early = _train_loop(config, setup, state, start, end, batches, train_iter, stream,
                                       checkpointer, writer, watch, evaluator, train_corpus)
    if stopped_early or end < config.train.steps:
      return None
    result = evaluator(state["params"])
    if start < config.train.steps:
      writer.write(config.train.steps, eval_lib.as_eval_metrics(result))
    metrics_lib.log(f"held-out: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
                    f"{result['bits_per_byte']:.4f} bits/byte over {result['num_tokens']:,} tokens")
    if config.sample.max_new_tokens > 0:
      metrics_lib.log(f"sample:\n{generate_lib.sample_text(setup, state['params'], tok, config.sample)}")
    return {"step": config.train.steps, **result}
  finally:  # an error still finishes the save in flight, and stops the data threads
    watch.close()
    train_iter.close()
    try:
      checkpointer.wait()
    finally:
      checkpointer.close()
      writer.close()


def _restore(checkpointer, step, setup, config, stream, train_iter):
  """The state of checkpoint `step`, with the data iterator moved to its position; refuses a
  resume that would silently be another run (config_lib.check_resume, data.check_stream)."""
  changed = config_lib.check_resume(checkpointer.restore_config(step), config, step,
                                    model_only=not checkpointer.has_data(step))
  checkpointer.check_structure(step, setup.abstract_state)
  if checkpointer.has_data(step):  # (an HF import has no data position)
    saved_stream = checkpointer.restore_stream(step)
    if not changed:
      data_lib.check_stream(saved_stream, stream, step)
    if saved_stream == stream:
      checkpointer.restore_data(step, train_iter)
    else:
      metrics_lib.log("warning: the data stream changed (train.allow_config_change): it starts from the beginning")
  return checkpointer.restore_state(step, setup.abstract_state)


@jax.jit
def _first_bad_step(first_bad, nonfinite, step):
  return jnp.where((first_bad == 0) & nonfinite, step, first_bad)


def _train_loop(config, setup, state, start, end, batches, train_iter, stream, checkpointer, writer, watch,
                evaluator, train_corpus):
  """Steps start+1 .. end; saves per the policy, at the end, and when preempted. Returns
  (state, whether a preemption stopped it). Nothing non-finite is ever saved."""
  t = config.train
  llama = setup.llama
  tokens_per_step = config.data.batch_size * config.data.seq_len
  peak_flops = flops.peak_flops_per_device(jax.devices()[0]) * setup.mesh.size
  flops_per_token = flops.train_flops_per_token(llama, config.data.seq_len)
  progress = metrics_lib.ProgressLogger(start, t.steps)
  train_step = setup.jit_train_step()
  # Sums and flags stay on the device between log lines: no host sync per step.
  loss_sum, logged_at = 0.0, start
  skipped, first_bad = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)

  def check_finite():
    bad = int(sh.replicated_to_host(first_bad))
    if bad:
      checkpointer.wait()
      raise StopRun(f"loss or gradient norm is not finite at step {bad}; stopped without saving it; last good "
                    f"checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}")

  with jax.set_mesh(setup.mesh):
    for step in range(start, end):
      state, metrics = train_step(state, setup.global_batch(next(batches)))
      done = step + 1
      loss_sum = loss_sum + metrics["loss"]
      skipped = skipped + metrics["skipped"]
      first_bad = _first_bad_step(first_bad, metrics["nonfinite"], np.int32(done))
      preempted = watch.reached(done)
      if done % t.log_every == 0 or done == end or preempted:
        check_finite()
        metrics = sh.replicated_to_host(dict(metrics, loss=loss_sum / (done - logged_at), skipped_steps=skipped))
        loss_sum, logged_at = 0.0, done
        metrics = {k: v for k, v in metrics.items() if k not in ("nonfinite", "skipped")}
        metrics["tokens_per_sec"] = progress.tokens_per_sec(done, tokens_per_step)
        metrics["mfu"] = metrics["tokens_per_sec"] * flops_per_token / peak_flops if peak_flops else 0.0
        if train_corpus.skipped():
          metrics["skipped_documents"] = train_corpus.skipped()
        writer.write(done, metrics)
        metrics_lib.log(progress.line(done, metrics))
      if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        writer.write(done, eval_lib.as_eval_metrics(evaluator(state["params"])))
      if preempted or done == end or checkpointer.should_save(done):
        check_finite()
        checkpointer.save(done, state, config, train_iter, stream, force=True)
      if preempted:
        checkpointer.wait()
        metrics_lib.log(f"{watch.signal_name}: saved step {done} in {checkpointer.directory}; "
                        "run the same command to resume")
        return state, True
  return state, False


def load_run(workdir: str, step: int | None = None, devices=None):
  """(setup, params, tokenizer, step) of WORKDIR's checkpoint (latest by default), for eval/sampling."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise config_lib.ConfigError(f"--workdir {workdir}: no checkpoints directory")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:  # closed on every path: orbax's background threads must not outlive an error
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
  finally:
    checkpointer.close()
  return setup, params, tok, step
