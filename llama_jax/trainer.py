"""train_and_evaluate(config, workdir): the training loop, from config to checkpoints and metrics.

The run's Setup (mesh, shardings, jitted steps) comes from run_setup.py."""

import functools
import inspect
import itertools
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config_lib
from llama_jax import data as data_lib
from llama_jax import evaluate as eval_lib
from llama_jax import flops
from llama_jax import generate as generate_lib
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib
from llama_jax import paths
from llama_jax import preemption
from llama_jax import profiler
from llama_jax import run_setup
from llama_jax import sharding as sh
from llama_jax.errors import StopRun


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None,
                       stop_after: int | None = None):
  """Trains per `config` in `workdir`, resuming from its latest good checkpoint; returns the final
  eval (None when the run stops early: `stop_after`, SIGTERM, a preemption notice): the step and the
  held-out report (evaluate.report: data.eval_corpus's scores, and per named set with their mean), and
  under "tasks" the scores of config.eval.tasks when this call trained and they ran.

  Held-out sets are scored every train.eval_every steps and at the end; config.eval.tasks (lm-eval,
  checked before anything compiles) every eval.harness_every steps and at the end, on the live params,
  written to metrics.jsonl and TensorBoard as "<task>/<metric>" at that step.

  A new run with config.init_from and config.init_from_state continues that checkpoint's run in
  `workdir`: its params, optimizer state, step and data position (a branched WSD cool-down, README);
  train.steps and optim may differ, the model, seed and data stream may not (ConfigError).

  A new run (no checkpoints in `workdir`) stopped by an error before its first step, e.g. a ConfigError
  about its data, tokenizer or sample prompt, or SIGTERM / Ctrl-C (while a tokenizer is trained, say),
  leaves no new file in `workdir` (a workdir it made is removed).

  SIGTERM / Ctrl-C (one process; preemption.py) during the final held-out eval or sample, once the
  last step is saved: the eval or sample stops, the checkpoint in flight is finished, one line says
  the last step is saved and what was interrupted, and it returns None (exit status 0, as for a
  preemption inside the loop). `python eval.py --workdir WORKDIR` scores that checkpoint.

  Args:
    devices: the devices of the mesh (default: all).
    stop_after: end this run (with a checkpoint) after this step, as a preempted job would.
  """
  # First: from here a signal (one process) raises StopRun until the first step, so the cleanup below runs.
  watch = preemption.PreemptionWatch()
  try:
    config_lib.check_workdir(workdir)
    llama = config_lib.check_config(config)
    data_lib.check_data_config(config.data)
    resuming = ckpt_lib.has_checkpoints(workdir)
    # init_from seeds a new run only: a workdir with checkpoints of its own resumes from them, even
    # where the run it started from has moved away.
    init_from = run_setup.check_init_from(config) if config.init_from and not resuming else None
    # Before the mesh: a process count that cannot read the checkpoint's stream is named as such.
    saved_stream = (_init_from_stream(init_from) if init_from and config.init_from_state
                    else _newest_stream(workdir, resuming))
    shards = data_lib.data_shards(config.data, jax.process_count(), *saved_stream)
    eval_lib.check_tasks(config_lib.eval_tasks(config.eval), config.eval.include_path, config.eval.num_fewshot,
                         config.eval.harness_limit or None)  # 0: every document
    setup = run_setup.Setup(config, devices)
    run_setup.check_batch(config, setup.mesh)
    if not config.init_from and config.data.format == "sft":
      metrics_lib.log("warning: fine-tuning from random weights (config.init_from is empty)")
    before = set(paths.listdir(workdir)) if paths.isdir(workdir) else None
    paths.makedirs(workdir)
    started = []  # non-empty once the first step runs: from then on what the workdir holds is the run's
    try:
      return _train_and_evaluate(config, workdir, setup, llama, init_from, shards, stop_after, started, watch)
    except BaseException:
      # A new run refused (bad data, tokenizer, sample prompt, a signal...) before its first step
      # leaves the workdir as it found it, so the corrected command starts clean.
      if not started and not resuming and jax.process_index() == 0:
        _remove_new_entries(workdir, before)
      watch.check()  # a signal's StopRun that a library wrapped in an error of its own is still the stop
      raise
  finally:
    watch.close()


def _remove_new_entries(workdir: str, before: set[str] | None):
  """Deletes what this run added to `workdir` (all of it when `before` is None: the run made it).
  Best effort, as it runs while another error is on its way out: what cannot be listed or removed
  (a storage server that went away) is left there, and that error goes on."""
  try:
    added = [workdir] if before is None else [paths.join(workdir, n) for n in set(paths.listdir(workdir)) - before]
  except Exception:  # noqa: BLE001  (gcsfs raises more than OSError)
    return
  for path in added:
    try:
      if not paths.is_remote(path) and os.path.islink(path):
        os.remove(path)  # the link, not what it points to
      else:
        paths.remove(path)
    except Exception:  # noqa: BLE001
      pass


def _newest_stream(workdir: str, resuming: bool) -> tuple[dict | None, int | None]:
  """(stream definition, step) of the newest checkpoint in `workdir` that holds a data position;
  (None, None) for a new run or when none does (an HF import)."""
  found = ckpt_lib.newest_stream(workdir) if resuming else None
  return (found[1], found[0]) if found else (None, None)


def _init_from_stream(init_from: tuple[str, int]) -> tuple[dict, int]:
  """(stream definition, step) of config.init_from's checkpoint (run_setup.check_init_from's (workdir,
  step)), whose stream a run with config.init_from_state continues."""
  checkpointer = ckpt_lib.Checkpointer(init_from[0], read_only=True)
  try:
    return checkpointer.restore_stream(init_from[1]), init_from[1]
  finally:
    checkpointer.close()


def _train_and_evaluate(config, workdir, setup, llama, init_from, shards, stop_after, started, watch):
  """train_and_evaluate after its checks, in an existing workdir, reading `shards` data shards
  (data.data_shards); appends to `started` at the first step."""
  train_corpus = data_lib.open_corpus(config.data, "train_corpus")
  eval_corpora = eval_lib.open_eval_sets(config.data)
  tok = run_setup.prepare_tokenizer(config, workdir, train_corpus, llama, init_from and init_from[0])
  watch.check()  # a signal's StopRun may have been lost in a gc callback (preemption.py)
  evaluator = eval_lib.EvalSets(setup, tok, eval_corpora)
  evaluator.check()
  stop_ids = run_setup.inherit_stop_ids(config, workdir, tok, llama, init_from and init_from[0])
  tasks = eval_lib.TaskEvaluator.from_config(setup, tok, stop_ids)  # None without config.eval.tasks
  sampler = generate_lib.TextSampler(setup, tok, config.sample, stop_ids)
  stream = data_lib.stream_definition(config.data, shards)
  overlong = data_lib.Overlong()
  writer = metrics_lib.MetricWriter(workdir, config)  # before the data threads: a W&B that cannot start stops here
  train_iter = data_lib.process_batches(train_corpus, tok, config.data, shards, jax.process_index(),
                                        jax.process_count(), overlong)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train)
  previous_hook = sys.unraisablehook
  sys.unraisablehook = _quiet_abandoned_reads(previous_hook)
  quiet, handlers = _StorageTracebacks(), list(logging.getLogger().handlers)  # absl's, in an entry point
  for handler in handlers:
    handler.addFilter(quiet)
  failed = False
  try:
    resumed = checkpointer.restore_latest(
        lambda step: _restore(checkpointer, step, setup, config, stream, train_iter))
    if resumed is None and config.init_from:
      init_from = init_from or run_setup.check_init_from(config)  # every checkpoint here was unreadable
    branched = resumed is None and config.init_from_state  # a new run continuing init_from's (a WSD cool-down)
    if branched:
      resumed = _restore_init_state(init_from, setup, config, stream, train_iter)
    batches = itertools.chain([next(train_iter)], train_iter)  # unreadable data shows up now, before compiling
    if resumed is None and config.init_from:
      start, state = 0, setup.state_from_params(run_setup.restore_init_params(*init_from, setup))
      metrics_lib.log(f"{model_lib.count_params(llama):,} parameters from step {init_from[1]} of {init_from[0]}")
      result = evaluator(state["params"])  # where fine-tuning starts from, on the held-out data
      writer.write(0, eval_lib.as_eval_metrics(result))
      metrics_lib.log(f"held-out before training: {eval_lib.describe(result)}")
    elif resumed is None:
      start, state = 0, setup.init_state()
      metrics_lib.log(f"{model_lib.count_params(llama):,} parameters; training from scratch")
    else:
      start, state = resumed
      metrics_lib.log(f"continuing step {start} of {init_from[0]} (config.init_from_state: its params, "
                      "optimizer state and data position)" if branched
                      else f"resumed from step {start} in {checkpointer.directory}")
    end = config.train.steps if stop_after is None else min(stop_after, config.train.steps)
    watch.check()
    started.append(start)
    state, stopped_early = _train_loop(config, setup, state, start, end, batches, train_iter, stream,
                                       checkpointer, writer, watch, evaluator, tasks, sampler, train_corpus, overlong)
    if stopped_early or end < config.train.steps:
      return None
    doing = "held-out eval"
    try:
      with watch.stop_at_once():  # the last step is saved (or in flight): a signal ends the run now
        result = evaluator(state["params"])
        if start < config.train.steps:
          writer.write(config.train.steps, eval_lib.as_eval_metrics(result))
        metrics_lib.log(f"held-out: {eval_lib.describe(result)}")
        if tasks is not None and start < config.train.steps:
          doing = "tasks"
          result = {**result, "tasks": _run_tasks(tasks, state["params"], config.train.steps, writer)}
        if config.sample.max_new_tokens > 0:
          doing = "final sample"
          _sample(sampler, state["params"], config.train.steps, writer if start < config.train.steps else None)
    except preemption.Interrupted as e:
      checkpointer.wait()
      again = {"held-out eval": "python eval.py --workdir {w} scores it",
               "tasks": "python eval.py --workdir {w} --tasks TASKS scores it",
               "final sample": "python -m llama_jax.generate --workdir {w} --prompt TEXT samples from it"}[doing]
      again = again.format(w=workdir)
      metrics_lib.log(f"{e}: training finished and step {checkpointer.latest_step()} is saved in "
                      f"{checkpointer.directory}; the {doing} was interrupted ({again})")
      return None
    return {"step": config.train.steps, **result}
  except BaseException:
    failed = True
    raise
  finally:  # an error still finishes the save in flight, sends the metrics not sent yet, and stops the data threads
    _close_all([train_iter.close, checkpointer.wait, checkpointer.close, functools.partial(writer.close, failed=failed),
                lambda: setattr(sys, "unraisablehook", previous_hook),
                *[functools.partial(handler.removeFilter, quiet) for handler in handlers]], failed)


def _close_all(closers, failed: bool):
  """Calls every closer, whatever fails. Raises the first failure, unless the run is already stopping
  on an error (`failed`): that error is the one reported, as what failed here follows from it (a
  storage server gone fails the save in flight and the metrics upload too)."""
  first = None
  for close in closers:
    try:
      close()
    except BaseException as e:  # noqa: BLE001  (a signal's StopRun too: raised after the rest is closed)
      if first is None:
        first = e
  if first is not None and not failed:
    raise first


class _StorageTracebacks(logging.Filter):
  """Drops the tracebacks that orbax, gcsfs and fsspec log about a failed read or write, one per
  thread or retry (a storage server gone: several before the run ends), and those asyncio logs for
  their futures that failed with no one left to ask (the reads of a damaged checkpoint that
  restore_latest gave up on, when they are collected). The failure itself reaches the run as an
  exception (CheckpointError, MetricsError), which it reports in one line: a warning where it falls
  back to an older checkpoint, the error that ends it otherwise. This package runs no event loop of
  its own, so every asyncio traceback is theirs."""

  def filter(self, record):
    return not (record.exc_info and any(f"{os.sep}{lib}{os.sep}" in record.pathname
                                        for lib in ("orbax", "gcsfs", "fsspec", "asyncio")))


def _quiet_abandoned_reads(previous):
  """An unraisablehook for the run: a damaged checkpoint's failed restore (restore_latest warns
  once and falls back) leaves tensorstore reads in flight whose callbacks, and the coroutines
  awaiting them, end later in "RuntimeError: Event loop is closed" from orbax's finished event loop:
  ~200 lines of ignored tracebacks. Those are dropped; any other goes to `previous`."""
  def hook(unraisable):
    if ((isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value))
        or inspect.iscoroutine(unraisable.object)):
      return
    previous(unraisable)
  return hook


def _restore(checkpointer, step, setup, config, stream, train_iter, doing: str = ""):
  """The state of checkpoint `step`, with the data iterator moved to its position. A resume that
  would silently be another run (a changed model or seed: config_lib; a changed data stream:
  data.stream_changes) stops with one line listing every change, unless train.allow_config_change;
  the line starts with `doing` (default "resuming from checkpoint STEP")."""
  has_data = checkpointer.has_data(step)  # an HF import has no data position yet
  changes = config_lib.changed_on_resume(checkpointer.restore_config(step), config)
  stream_changes = data_lib.stream_changes(checkpointer.restore_stream(step), stream) if has_data else []
  if (changes or stream_changes) and not config.train.allow_config_change:
    raise config_lib.ConfigError(f"{doing or f'resuming from checkpoint {step}'} with a changed config: "
                                 f"{'; '.join(sorted(changes + stream_changes))} "
                                 "(--config.train.allow_config_change=True to resume anyway)")
  checkpointer.check_structure(step, setup.abstract_state)
  if stream_changes:
    metrics_lib.log("warning: the data stream changed (train.allow_config_change): it starts from the beginning")
  elif has_data:
    checkpointer.restore_data(step, train_iter)
  return checkpointer.restore_state(step, setup.abstract_state)


def _restore_init_state(init_from: tuple[str, int], setup, config, stream, train_iter):
  """(step, state) for config.init_from_state: the whole train state (params, optimizer state, step)
  of checkpoint init_from[1] of run init_from[0], with the data iterator moved to its position, after
  the checks of a resume (_restore: a changed model, seed or data stream is a ConfigError)."""
  workdir, step = init_from
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    doing = f"config.init_from_state=True from checkpoint {step} of {workdir}"
    return step, _restore(checkpointer, step, setup, config, stream, train_iter, doing)
  finally:
    checkpointer.close()


@jax.jit
def _accumulate(totals, metrics, step):
  """One dispatch per step: the sums since the last log line of the loss and of each other metric
  that `totals` holds a "<name>_sum" of (z_loss), skipped updates, and the first step whose update
  was not finite (0: none)."""
  bad = (totals["first_bad"] == 0) & metrics["nonfinite"]
  sums = {k: v + metrics[k[:-len("_sum")]] for k, v in totals.items() if k.endswith("_sum")}
  return {**sums, "skipped": totals["skipped"] + metrics["skipped"],
          "first_bad": jnp.where(bad, step, totals["first_bad"])}


def _run_tasks(tasks, params, step, writer) -> dict:
  """config.eval.tasks on `params`: their "<task>/<metric>" scores (harness.tasks.summary) written at
  `step` and logged, and returned ({} on processes other than 0)."""
  scores = eval_lib.task_metrics(tasks(params))
  if scores:
    writer.write(step, scores)
    metrics_lib.log(f"tasks at step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
  return scores


def _sample(sampler, params, step, writer):
  text = sampler(params)
  if writer is not None:
    writer.write_text(step, "sample", text)
  metrics_lib.log(f"sample at step {step}:\n{text}")


def _train_loop(config, setup, state, start, end, batches, train_iter, stream, checkpointer, writer, watch,
                evaluator, tasks, sampler, train_corpus, overlong):
  """Steps start+1 .. end, tracing train.profile_steps (profiler.ProfileWindow); saves per the policy,
  at the end, and when preempted. Returns (state, whether a preemption stopped it). Nothing
  non-finite is ever saved."""
  t = config.train
  llama = setup.llama
  tokens_per_step = config.data.batch_size * config.data.seq_len
  peak_flops = flops.mesh_peak_flops(setup.mesh, llama.dtype)
  flops_per_token = flops.train_flops_per_token(llama, config.data.seq_len)
  progress = metrics_lib.ProgressLogger(start, t.steps)
  train_step = setup.jit_train_step()
  # Sums and flags stay on the device between log lines: no host sync per step.
  zero_loss = jnp.zeros((), jnp.float32)
  totals = {"loss_sum": zero_loss, "skipped": jnp.zeros((), jnp.int32), "first_bad": jnp.zeros((), jnp.int32)}
  if config.optim.z_loss:  # logged as the loss is: its mean over the steps since the last log line
    totals["z_loss_sum"] = zero_loss
  logged_at = start

  def off_the_clock():
    """Evals, samples and checkpoint saves stay out of tokens/s and MFU: the steps dispatched before
    them are waited for (and counted), then the clock pauses."""
    jax.block_until_ready(state)
    return progress.paused()

  def check_finite():
    bad = int(sh.replicated_to_host(totals["first_bad"]))
    if bad:
      checkpointer.wait()
      raise StopRun(f"loss or gradient norm is not finite at step {bad}; stopped without saving it; last good "
                    f"checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}")

  # The profile window (train.profile_steps) stops its trace however the loop ends.
  with jax.set_mesh(setup.mesh), profiler.ProfileWindow(t.profile_steps, start, checkpointer.workdir) as window:
    for step in range(start, end):
      done = step + 1
      window.before(done, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=done):  # names the step in a trace
        state, metrics = train_step(state, setup.global_batch(next(batches)))
      window.after(done, state)
      totals = _accumulate(totals, metrics, np.int32(done))
      preempted = watch.reached(done)
      if done % t.log_every == 0 or done == end or preempted:
        check_finite()
        means = {k[:-len("_sum")]: v / (done - logged_at) for k, v in totals.items() if k.endswith("_sum")}
        metrics = sh.replicated_to_host(dict(metrics, **means, skipped_steps=totals["skipped"]))
        totals, logged_at = dict(totals, **{f"{k}_sum": zero_loss for k in means}), done
        metrics = {k: v for k, v in metrics.items() if k not in ("nonfinite", "skipped")}
        metrics["tokens_per_sec"] = progress.tokens_per_sec(done, tokens_per_step)
        metrics["mfu"] = metrics["tokens_per_sec"] * flops_per_token / peak_flops if peak_flops else float("nan")
        if train_corpus.skipped():
          metrics["skipped_documents"] = train_corpus.skipped()
        if overlong.truncated or overlong.skipped:  # SFT pairs longer than a row, so far in this run
          metrics.update(truncated_examples=overlong.truncated, skipped_examples=overlong.skipped)
        writer.write(done, metrics)
        metrics_lib.log(progress.line(done, metrics))
      if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        with off_the_clock():
          result = evaluator(state["params"])
          writer.write(done, eval_lib.as_eval_metrics(result))
        metrics_lib.log(f"held-out at step {done}: {eval_lib.describe(result)}")
      if tasks is not None and config.eval.harness_every and done % config.eval.harness_every == 0 and done != t.steps:
        with off_the_clock():
          _run_tasks(tasks, state["params"], done, writer)
      if config.sample.every and done % config.sample.every == 0 and done != t.steps and config.sample.max_new_tokens:
        with off_the_clock():
          _sample(sampler, state["params"], done, writer)
      if preempted or done == end or checkpointer.should_save(done):
        check_finite()
        with off_the_clock():
          writer.flush()  # on object storage: the metrics up to this step go up with its checkpoint
          checkpointer.save(done, state, config, train_iter, stream, force=True)
      if preempted:
        checkpointer.wait()
        metrics_lib.log(f"{watch.signal_name}: saved step {done} in {checkpointer.directory}; "
                        "run the same command to resume")
        return state, True
  return state, False
