"""lm-evaluation-harness tasks for a llama_jax model: checked before any model loads, run through
LlamaLM (harness/lm.py) with lm-eval's own evaluator, reported as lm-eval reports them.

  check_tasks(["plays", "hellaswag"], include_path=None, num_fewshot=None)   # ConfigError or None
  results = run_tasks(lm, ["plays"], limit=None)      # lm-eval's results dict (+ "truncated")
  print(table(results)); summary(results)             # {"plays_speaker/acc": 0.31, ...}

Tasks are lm-eval's names (a task, group or tag, or a glob of them, as `lm_eval --tasks` takes), from
lm-eval's own task folder, from `include_path` (a folder of lm-eval YAML) and from the shipped local
tasks (local_tasks/, always included; built from the embedded plays by build_tasks.py, tagged `plays`):
  plays_speaker     multiple choice, who speaks this line (acc, acc_norm)
  plays_perplexity  rolling log-likelihood of a held-out play's scenes (word_perplexity, byte_perplexity,
                    bits_per_byte)
  plays_continue    generate_until, a line's last word (exact_match)
Task folders are indexed local ones first: lm-eval's ~15k built-in tasks (~6 s to index) only when a
name is not among those.

Offline first: importing this module sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 where they are not
set (a value the user gave is kept; where `datasets` or `huggingface_hub` were imported before, their
offline switch is set too), so nothing reaches a hub at run time; a task whose dataset is not on disk is
one ConfigError saying what to fetch (once, online) into the HF cache.

The shipped tasks' YAML names its JSONL relative to the YAML file; lm-eval 0.4.13 hands data_files to
`datasets.load_dataset` as they are, which reads relative paths from the working directory, so
_manager gives lm-eval these tasks' configs with the absolute paths (their entries of lm-eval's task
index take the config in place of the YAML file). Tasks of `include_path` keep lm-eval's behaviour.

Truncation: a request longer than the model's window is cut from the left as lm-eval's `hf` backend
cuts it (LlamaLM's docstring); lm.truncated counts them per request type, and run_tasks puts that in
the results as "truncated".
"""

import os
import sys

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
  os.environ.setdefault(_var, "1")  # read by huggingface_hub and datasets when they are imported


def _offline_if_asked():
  """The offline switches of `huggingface_hub` and `datasets` set where the environment asks for them
  and those modules were imported before this one set it (they read it at their import)."""
  for var, module in (("HF_HUB_OFFLINE", "huggingface_hub.constants"), ("HF_DATASETS_OFFLINE", "datasets.config")):
    if os.environ[var].upper() in ("1", "ON", "YES", "TRUE") and module in sys.modules:
      sys.modules[module].HF_HUB_OFFLINE = True


_offline_if_asked()

import difflib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import yaml  # noqa: E402
from lm_eval import evaluator  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llama_jax import paths  # noqa: E402
from llama_jax.errors import ConfigError, first_line  # noqa: E402
from llama_jax.harness.build_tasks import LOCAL_TASKS_DIR  # noqa: E402

SHIPPED_TAG = "plays"  # the tag of the shipped tasks (their YAML says it)
_PACKAGED_BUILDERS = ("json", "csv", "text", "parquet", "arrow")  # datasets' builders of local files


# ------------------------------------------------------------------ resolving


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, defaults: bool) -> TaskManager:
  """lm-eval's TaskManager over the shipped tasks, `include_path` and (with `defaults`) lm-eval's
  own; the shipped tasks' entries carry their config with absolute data_files (module docstring)."""
  manager = TaskManager(include_path=[LOCAL_TASKS_DIR] + ([include_path] if include_path else []),
                        include_defaults=defaults)
  local = paths.normalize(LOCAL_TASKS_DIR)
  for entry in manager.task_index.values():
    if entry.yaml_path is not None and paths.normalize(paths.parent(str(entry.yaml_path))) == local:
      entry.cfg, entry.yaml_path = _shipped_config(str(entry.yaml_path)), None
  return manager


def _shipped_config(yaml_path: str) -> dict:
  """A shipped task's YAML (plain keys, no !function) with its data_files made absolute."""
  config = yaml.safe_load(paths.read_text(yaml_path))
  files = config["dataset_kwargs"]["data_files"]
  config["dataset_kwargs"]["data_files"] = {split: paths.join(paths.parent(yaml_path), f) for split, f in files.items()}
  return config


def task_manager(tasks: list[str], include_path: str | None = None) -> TaskManager:
  """The lm-eval TaskManager that knows every name of `tasks` (lm-eval's own tasks indexed only when
  needed), with the shipped tasks' absolute data_files: what run_tasks hands simple_evaluate.

  Raises ConfigError: an empty list, an include_path that is not a local directory, or a name no task,
  group or tag has (with the closest names)."""
  if not tasks or not all(t.strip() for t in tasks):
    raise ConfigError(f"tasks {','.join(tasks)!r}: name one or more tasks, comma-separated")
  if include_path is not None and (paths.is_remote(include_path) or not paths.isdir(include_path)):
    raise ConfigError(f"include_path {include_path}: not a local directory (lm-eval reads task YAML from "
                      "a folder on this machine)")
  manager = _manager(include_path, False)
  if all(manager.match_tasks([t]) for t in tasks):
    return manager
  manager = _manager(include_path, True)
  for task in tasks:
    if not manager.match_tasks([task]):
      close = difflib.get_close_matches(task, manager.all_tasks, n=3, cutoff=0.6)
      hint = f" (did you mean {', '.join(close)}?)" if close else " (lm-eval list tasks names them)"
      where = f"lm-eval's tasks, {include_path} and" if include_path else "lm-eval's tasks and"
      raise ConfigError(f"unknown task {task!r}: not in {where} the shipped ones ({SHIPPED_TAG}: "
                        f"{', '.join(shipped_tasks())}){hint}")
  return manager


def shipped_tasks() -> list[str]:
  """Names of the shipped tasks (local_tasks/*.yaml), sorted."""
  return sorted(yaml.safe_load(paths.read_text(p))["task"] for p in paths.glob(paths.join(LOCAL_TASKS_DIR, "*.yaml")))


def _load(manager: TaskManager, name: str) -> dict:
  """lm-eval's TaskManager.load of one name: its tasks, built, their datasets read (offline).

  Raises ConfigError naming the task: what to fetch when a dataset is not on disk, else lm-eval's
  reason for not building it (a bad YAML of include_path, say)."""
  entry = manager.task_index.get(name)
  try:
    return manager.load([name])
  except OSError as e:  # datasets: ConnectionError (offline, not cached), FileNotFoundError (a data file)
    raise ConfigError(_missing_dataset(name, (entry.cfg or {}) if entry is not None else {}, e)) from None
  except Exception as e:  # noqa: BLE001  (lm-eval raises many kinds on a task it cannot build)
    raise ConfigError(f"task {name}: lm-eval cannot build it: {type(e).__name__}: {first_line(e)}") from None


def _missing_dataset(name: str, config: dict, error: OSError) -> str:
  """The line for a task whose dataset could not be read: what to fetch, or which file is missing."""
  path, subset = config.get("dataset_path"), config.get("dataset_name")
  if path in _PACKAGED_BUILDERS:
    fix = " (rebuild the shipped tasks' data: python -m llama_jax.harness.build_tasks)" if name in shipped_tasks() else ""
    return f"task {name}: a data file of its dataset is missing: {first_line(error)}{fix}"
  if path:
    args = ", ".join(repr(a) for a in (path, subset) if a)
    fetch = f"HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c \"import datasets; datasets.load_dataset({args})\""
    what = path + (f" ({subset})" if subset else "")
  else:  # a group or tag: lm-eval's error names the dataset
    fetch, what = "this command once with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0", "one of its datasets"
  return (f"task {name}: {what} is not on disk and nothing is downloaded at run time ({first_line(error)}): "
          f"fetch it into the HF cache once, online: {fetch}")


def _fewshot_pool(task) -> tuple[int, str]:
  """(how many few-shot examples lm-eval can draw for one doc of `task`, from where): its few-shot
  docs (the fewshot split, else the training, validation or test docs: Task.fewshot_docs), less the
  doc itself where they are the docs scored (lm-eval leaves it out of its own context)."""
  docs = task.fewshot_docs()
  split = task.fewshot_cfg.split or next(
      (s for s in (task.config.training_split, task.config.validation_split, task.config.test_split) if s), None)
  if docs is None or split is None:
    return 0, "no few-shot docs"
  if task.fewshot_cfg.split == task.config.test_split:
    return max(0, len(docs) - 1), f"the {split} split less the doc scored"
  return len(docs), f"the {split} split"


def check_tasks(tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None) -> None:
  """Checks what run_tasks would run, before any model loads: every task exists, its dataset is on
  disk (each is read, offline), and num_fewshot is at most what each task can draw.

  Raises:
    ConfigError: one line naming the task (and the flag value): an unknown task (with close names), a
      dataset that is not on disk (what to fetch), a negative num_fewshot or one over a task's
      few-shot pool, a limit < 1.
  """
  if num_fewshot is not None and num_fewshot < 0:
    raise ConfigError(f"num_fewshot {num_fewshot}: must be >= 0")
  if limit is not None and limit < 1:
    raise ConfigError(f"limit {limit}: must be >= 1 (documents per task)")
  manager = task_manager(tasks, include_path)
  for name in tasks:
    for match in manager.match_tasks([name]):
      for task_name, task in _load(manager, match)["tasks"].items():
        shots = task.config.num_fewshot or 0
        if num_fewshot is not None and task.config.num_fewshot != 0:  # lm-eval keeps a task's own 0
          shots = num_fewshot
        if shots:
          pool, where = _fewshot_pool(task)
          if shots > pool:
            raise ConfigError(f"num_fewshot {shots}: task {task_name} has {pool} few-shot examples ({where})")


# ------------------------------------------------------------------ running


def run_tasks(lm, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
              limit: int | None = None, seed: int = 0, log_samples: bool = False,
              samples: dict[str, list[int]] | None = None) -> dict | None:
  """Runs lm-eval's simple_evaluate with `lm` (a LlamaLM) on `tasks` and returns lm-eval's results dict
  with "truncated" added (lm.truncated: requests cut from the left, per request type).

  Multi-host: process 0 drives lm-eval and returns the results; every other process serves the
  compiled calls (lm.serve()) and returns None. `limit` is the first documents per task (lm-eval's
  --limit), `samples` {task: document indices} instead (its --samples); `seed` seeds lm-eval's Python,
  NumPy and few-shot samplers; `log_samples` keeps lm-eval's per-document records under "samples".
  Call check_tasks first for one-line errors: here lm-eval raises its own.
  """
  if jax.process_index() != 0:
    lm.serve()
    return None
  before = dict(lm.truncated)  # an LlamaLM may have scored before (the trainer's, every harness_every)
  try:
    manager = task_manager(tasks, include_path)
    # lm-eval's simple_evaluate takes names, not globs: expand them as check_tasks does.
    names = list(dict.fromkeys(match for task in tasks for match in manager.match_tasks([task])))
    results = evaluator.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
        limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=None,
        fewshot_random_seed=seed, log_samples=log_samples, samples=samples)
  finally:
    lm.finish()
  results["truncated"] = {kind: n - before.get(kind, 0) for kind, n in lm.truncated.items()}
  return results


def evaluate_checkpoint(workdir: str, tasks: list[str], *, step: int | None = None, include_path: str | None = None,
                        num_fewshot: int | None = None, limit: int | None = None, batch_size: int | None = None,
                        max_length: int | None = None, dtype: str | None = None, seed: int = 0,
                        log_samples: bool = False, devices=None) -> dict | None:
  """eval.py --tasks: check_tasks, then the checkpoint (run_setup.load_run: the latest without `step`),
  an LlamaLM on it and run_tasks. Returns run_tasks' results with "step", "workdir" and "max_length"
  added (process 0; None on the others); record() makes them JSON.

  batch_size: packed rows per scoring call (default the checkpoint's config.eval.harness_batch_size);
  max_length: the context window in tokens (default and at most the model's max_seq_len); generation
  stops at the run's stop ids (run_setup.stop_ids) as well as EOS.
  Raises ConfigError (one line) before the params are read: bad tasks or flags (check_tasks), a
  max_length over the model's max_seq_len, a batch_size < 1, and load_run's errors.
  """
  from llama_jax import run_setup  # noqa: PLC0415  (only eval.py's path loads a checkpoint here)
  from llama_jax.harness import lm as lm_lib  # noqa: PLC0415

  check_tasks(tasks, include_path, num_fewshot, limit)

  def check(setup):
    if max_length is not None and not 1 <= max_length <= setup.llama.max_seq_len:
      raise ConfigError(f"--seq_len {max_length}: the context window must lie in [1, model.max_seq_len="
                        f"{setup.llama.max_seq_len}]")
    if batch_size is not None and batch_size < 1:
      raise ConfigError(f"--batch_size {batch_size}: must be >= 1")

  setup, params, tok, step = run_setup.load_run(workdir, step, devices=devices, dtype=dtype, check=check)
  lm = lm_lib.LlamaLM(setup, params, tok, batch_size=batch_size or setup.config.eval.harness_batch_size,
                      max_length=max_length, stop_ids=run_setup.stop_ids(workdir, tok, setup.llama.vocab_size),
                      seed=seed)
  results = run_tasks(lm, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed,
                      log_samples=log_samples)
  if results is None:
    return None
  return {**results, "step": step, "workdir": workdir, "max_length": lm.max_length}


# ------------------------------------------------------------------ reporting


def summary(results: dict) -> dict[str, float]:
  """{"<task>/<metric>": value} of every numeric metric of results["results"] (tasks and groups), the
  standard errors left out; a metric of a filter other than lm-eval's "none" is "<metric>,<filter>"."""
  flat = {}
  for task, metrics in sorted(results["results"].items()):
    for key, value in metrics.items():
      metric, _, filt = key.partition(",")
      if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      flat[f"{task}/{metric}" if filt == "none" else f"{task}/{metric},{filt}"] = float(value)
  return flat


def table(results: dict) -> str:
  """lm-eval's result table (lm_eval.utils.make_table), its group table after it where there is one."""
  text = lm_utils.make_table(results)
  if results.get("groups"):
    text += "\n" + lm_utils.make_table(results, "groups")
  return text


def truncation_note(results: dict) -> str | None:
  """The line that says how many requests of evaluate_checkpoint's results were cut from the left to
  their max_length, or None when none was."""
  cut = {kind: n for kind, n in results["truncated"].items() if n}
  if not cut:
    return None
  counts = ", ".join(f"{n} {kind}" for kind, n in sorted(cut.items()))
  return (f"note: requests cut from the left to the {results['max_length']}-token window, as lm-eval's hf backend "
          f"cuts them: {counts}")


def record(results: dict) -> dict:
  """lm-eval's results as JSON, as its CLI writes them (values JSON cannot hold through
  lm_eval.utils.handle_non_serializable), without the per-document "samples"."""
  kept = {k: v for k, v in results.items() if k != "samples"}
  return json.loads(json.dumps(kept, default=lm_utils.handle_non_serializable))
