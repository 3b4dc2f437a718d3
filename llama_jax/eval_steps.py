"""eval.py --all_steps: every checkpoint of a run scored once, on its held-out sets and, when asked, on
lm-eval tasks; one record per step in WORKDIR/eval_steps.jsonl, and WORKDIR/eval_steps.png.

  python eval.py --workdir runs/tiny --all_steps
  python eval.py --workdir runs/tiny --all_steps --tasks plays_speaker,plays_perplexity --limit 100

Each record: {"step", "request": what was asked, "scores": the held-out report's metrics (eval_loss,
eval_<name>_loss, eval_mean_loss, ...: evaluate.as_eval_metrics), "tasks": {"<task>/<metric>": value}
(harness.tasks.summary)}. A request has two parts, scored and cached apart: "corpora" (the held-out
sets, name -> spec, "" for data.eval_corpus or --corpus; the data format, compute dtype and seq_len)
is always scored, "tasks" (the task names, num_fewshot, limit, include_path, compute dtype and
context window, --seq_len) only with --tasks. A step whose part was scored before with the same part
of the request (a record of eval_steps.jsonl says so) is not scored again, so a second call with the
same flags scores nothing and says so; the row batch sizes are no part of a request (they do not
change a score). A record is appended (paths.append) as soon as its step is scored: a call that stops
keeps the steps done. SFT data's exact match (eval.py --exact_match) is not scored here.

The model is set up and compiled once: from the latest checkpoint's config (the held-out sets are
that config's), and every step's params are restored in turn onto the same shardings, so the
held-out program and the lm-eval backend's compile once for all steps. A step whose model differs
from the latest's is refused in one line. WORKDIR may be on object storage (llama_jax.paths).
"""

import json

import jax

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config_lib
from llama_jax import evaluate as eval_lib
from llama_jax import metrics as metrics_lib
from llama_jax import paths
from llama_jax import plot as plot_lib
from llama_jax import run_setup
from llama_jax.errors import ConfigError


def plot_path(workdir: str) -> str:
  return paths.join(workdir, "eval_steps.png")


def evaluate_all_steps(workdir: str, *, tasks: list[str] = (), include_path: str | None = None,
                       num_fewshot: int | None = None, limit: int | None = None, corpus_spec: str | None = None,
                       data_format: str | None = None, dtype: str | None = None, seq_len: int | None = None,
                       batch_size: int | None = None) -> dict:
  """Scores every checkpoint of WORKDIR not yet scored for this request (module docstring), appends a
  record per step scored to WORKDIR/eval_steps.jsonl, writes WORKDIR/eval_steps.png (plot.write_png
  of the run: training curves, held-out sets and task metrics against step) and logs a line per step.

  Args: as eval.py's flags; corpus_spec, data_format, dtype, seq_len and batch_size as in
    evaluate.load_for_eval; tasks, include_path, num_fewshot and limit as harness.tasks.run_tasks;
    batch_size also sets the lm-eval backend's rows per call (default: the run's eval.harness_batch_size)
    and seq_len its context window (default: the model's max_seq_len), as for eval.py --tasks.
  Returns {"steps": every checkpoint step, "scored": the records written, "path": eval_steps.jsonl}.
  Raises ConfigError before any model loads for a workdir without checkpoints, a bad --limit, an
  unknown task (harness.tasks.check_tasks) or a bad held-out set; during the work for a damaged step.
  """
  tasks = list(tasks)
  eval_lib.check_tasks(tasks, include_path, num_fewshot, limit)
  if not ckpt_lib.has_checkpoints(workdir):
    raise ConfigError(f"--workdir {workdir}: no checkpoints (not a llama_jax workdir, or nothing saved yet)")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:  # closed on every path: orbax's background threads must not outlive an error
    steps = checkpointer.all_steps()
    if not steps:
      raise ConfigError(f"--workdir {workdir}: no checkpoint saved yet")
    config = config_lib.with_added_keys(checkpointer.restore_config(steps[-1]))
    request = _request(config, tasks, include_path, num_fewshot, limit, corpus_spec, data_format, dtype, seq_len)
    path = metrics_lib.eval_steps_path(workdir)
    done = _done(metrics_lib.read_events(path) if paths.isfile(path) else [], request)
    todo = [(step, [part for part in request if step not in done[part]]) for step in steps]
    todo = [(step, parts) for step, parts in todo if parts]
    scored = []
    if todo:
      scored = _score(workdir, checkpointer, steps[-1], todo, request, tasks, include_path, num_fewshot, limit,
                      corpus_spec, data_format, dtype, seq_len, batch_size)
  finally:
    checkpointer.close()
  if not scored:
    metrics_lib.log(f"nothing scored: all {len(steps)} checkpoints (steps {', '.join(map(str, steps))}) were "
                    f"scored before for this request ({path})")
  else:
    metrics_lib.log(f"scored {len(scored)} of {len(steps)} checkpoints; records in {path}")
  if jax.process_index() == 0 and (scored or not paths.exists(plot_path(workdir))):
    plot_lib.write_png([workdir], plot_path(workdir))
    metrics_lib.log(f"wrote {plot_path(workdir)}")
  return {"steps": steps, "scored": scored, "path": path}


def _request(config, tasks, include_path, num_fewshot, limit, corpus_spec, data_format, dtype, seq_len) -> dict:
  """What a call asks, as its records store it (JSON types: it is compared with records read back)."""
  dtype = dtype or config.model.dtype
  request = {"corpora": {"sets": config_lib.eval_set_specs(config.data, corpus_spec),
                         "format": data_format or config.data.format, "dtype": dtype,
                         "seq_len": seq_len or config.data.seq_len}}
  if tasks:
    request["tasks"] = {"tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
                        "include_path": include_path or None, "dtype": dtype, "max_length": seq_len}
  return json.loads(json.dumps(request))


def _done(records: list[dict], request: dict) -> dict[str, set[int]]:
  """part -> the steps of records that scored that part of `request`."""
  return {part: {r["step"] for r in records if r.get("request", {}).get(part) == asked}
          for part, asked in request.items()}


def _score(workdir, checkpointer, latest, todo, request, tasks, include_path, num_fewshot, limit, corpus_spec,
           data_format, dtype, seq_len, batch_size) -> list[dict]:
  """Loads the latest checkpoint once and scores the parts of `todo` ([(step, parts)]); the records."""
  setup, params, tok, _, corpora = eval_lib.load_for_eval(workdir, latest, corpus_spec=corpus_spec,
                                                          data_format=data_format, dtype=dtype, seq_len=seq_len,
                                                          batch_size=batch_size)
  del params  # each step's are restored in step order below, one step's at a time in memory
  held_out = eval_lib.EvalSets(setup, tok, corpora)
  task_eval = None
  if tasks:
    task_eval = eval_lib.TaskEvaluator(
        setup, tok, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
        batch_size=batch_size or setup.config.eval.harness_batch_size, max_length=seq_len,
        stop_ids=run_setup.stop_ids(workdir, tok, setup.llama.vocab_size))
  path = metrics_lib.eval_steps_path(workdir)
  records = []
  params = None
  for step, parts in todo:
    changes = config_lib.model_changes(checkpointer.restore_config(step), setup.config)
    if changes:
      raise ConfigError(f"checkpoint step {step} in {checkpointer.directory} has another model than step "
                        f"{latest}: {'; '.join(changes)}")
    params = None  # the previous step's go before this one's arrive
    params = checkpointer.restore_params(step, setup.abstract_state["params"])
    record = {"step": step, "request": {part: request[part] for part in parts}}
    lines = []
    if "corpora" in parts:
      result = held_out(params)
      record["scores"] = eval_lib.as_eval_metrics(result)
      lines.append(eval_lib.describe(result).replace("\n", "\n  "))
    if "tasks" in parts:
      record["tasks"] = eval_lib.task_metrics(task_eval(params))
      lines.append(" | ".join(f"{k} {v:.4f}" for k, v in record["tasks"].items()))
    if jax.process_index() == 0:
      paths.append(path, metrics_lib.dumps(record) + "\n")
    metrics_lib.log(f"step {step}: " + "\n  ".join(lines))
    records.append(record)
  return records
