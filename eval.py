"""Scores a checkpoint on the held-out corpus: loss, perplexity and bits per byte (for SFT data:
of the responses, plus the exact-match accuracy of greedy answers).

  python eval.py --workdir runs/tiny [--step N] [--output FILE] [--corpus SPEC] [--dtype float32]
      [--seq_len 64] [--batch_size 8]
  python eval.py --workdir gs://bucket/run [--output gs://bucket/run/eval.json]

lm-evaluation-harness tasks instead (llama_jax/harness/tasks.py; the shipped ones: --tasks plays):

  python eval.py --workdir runs/tiny --tasks TASK[,TASK...] [--include_path DIR] [--num_fewshot K]
      [--limit N] [--batch_size B] [--seq_len T] [--output results.json]

prints lm-eval's result table and writes lm-eval's results JSON plus "step", "workdir", "max_length" and
"truncated" (requests cut from the left to fit the window, per request type) to --output (default:
WORKDIR/tasks_<step>.json). An unknown task, a dataset not on disk, a --num_fewshot over a task's
few-shot examples or a bad flag is one line before the model loads. With --tasks, --batch_size is packed
rows per scoring call (default: the checkpoint's eval.harness_batch_size) and --seq_len the context window
(default: the model's max_seq_len).

Every checkpoint of the run, each scored once (llama_jax/eval_steps.py): the held-out sets, and the
--tasks when given; one record per step in WORKDIR/eval_steps.jsonl, a plot in WORKDIR/eval_steps.png;
a step already scored for the same request is skipped (a second call scores nothing and says so):

  python eval.py --workdir runs/tiny --all_steps [--tasks TASK[,TASK...] --limit N] [--corpus SPEC]

Without --corpus the run's held-out sets are scored: data.eval_corpus (the first line) and each of
data.eval_corpora (a line each, then their macro mean); the JSON has the named sets under "sets" and
the mean under "mean" (llama_jax/evaluate.py). The line printed and the JSON written name the compute
dtype that ran ("dtype"). Rows are the checkpoint's data.seq_len tokens, data.batch_size /
train.grad_accum_steps at a time, unless --seq_len / --batch_size say otherwise; a seq_len over the
model's max_seq_len, or an --output that cannot be written (a directory, a missing parent directory or
bucket), is one line before anything is scored. --workdir and --output may be local or on object
storage (llama_jax.paths); the JSON is written with paths.write_atomic (a reader sees the old file or
the whole new one).
"""

from absl import flags

from llama_jax import entry

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and tokenizer.model.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON result (default: WORKDIR/eval_<step>.json).")
_CORPUS = flags.DEFINE_string("corpus", None, "Corpus spec to score (default: the run's data.eval_corpus).")
_FORMAT = flags.DEFINE_enum("format", None, ["text", "sft"], "What --corpus holds (default: the run's data.format); "
                            "sft scores a base model on prompt/response pairs.")
_EXACT_MATCH = flags.DEFINE_integer("exact_match", 500, "SFT data: answer this many prompts greedily and count "
                                    "the exact responses (0: skip).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16", "float32"],
                           "Compute dtype for this call (default: the checkpoint's config.model.dtype).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per packed row (default: the checkpoint's data.seq_len; "
                                "at most the model's max_seq_len).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Rows scored at once (default: the checkpoint's "
                                   "data.batch_size / train.grad_accum_steps); lower it if memory runs out.")
_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated lm-eval tasks, groups or tags to run instead of the "
                             "corpus (e.g. plays, the shipped ones; hellaswag once its dataset is on disk).")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "--tasks: a folder of lm-eval task YAML to add.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "--tasks: few-shot examples per prompt (default: each "
                                    "task's own).")
_LIMIT = flags.DEFINE_integer("limit", None, "--tasks: score only the first N documents of each task.")
_ALL_STEPS = flags.DEFINE_boolean("all_steps", False, "Score every checkpoint not scored before for the same "
                                  "request (held-out sets, and --tasks when given) into WORKDIR/eval_steps.jsonl "
                                  "and WORKDIR/eval_steps.png.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from llama_jax import evaluate, paths

  def run_tasks():
    from llama_jax.errors import ConfigError
    from llama_jax.harness import tasks
    if _CORPUS.value or _FORMAT.value:
      raise ConfigError("--tasks runs lm-eval tasks instead of a corpus: --corpus and --format go without it")
    if _OUTPUT.value:
      evaluate.check_output(_OUTPUT.value)
    names = [t.strip() for t in _TASKS.value.split(",")]
    results = tasks.evaluate_checkpoint(_WORKDIR.value, names, step=_STEP.value,
                                        include_path=_INCLUDE_PATH.value, num_fewshot=_NUM_FEWSHOT.value,
                                        limit=_LIMIT.value, batch_size=_BATCH_SIZE.value, max_length=_SEQ_LEN.value,
                                        dtype=_DTYPE.value)
    if results is not None:  # process 0
      print(f"step {results['step']}:\n{tasks.table(results)}")
      if note := tasks.truncation_note(results):
        print(note)
      evaluate.write_json(tasks.record(results), _OUTPUT.value or paths.join(_WORKDIR.value,
                                                                              f"tasks_{results['step']}.json"))

  def run():
    if _OUTPUT.value:
      evaluate.check_output(_OUTPUT.value)
    result = evaluate.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _CORPUS.value, _EXACT_MATCH.value,
                                          _FORMAT.value, dtype=_DTYPE.value, seq_len=_SEQ_LEN.value,
                                          batch_size=_BATCH_SIZE.value)
    scores = (f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | bits/byte "
              f"{result['bits_per_byte']:.4f} | {result['num_tokens']:,} tokens | " if "loss" in result else "")
    line = f"step {result['step']}: {scores}{result['dtype']}"
    if "exact_match" in result:
      line += f" | exact match {result['exact_match']:.1%} of {result['exact_match_examples']:,}"
    print(line)
    if "sets" in result:  # data.eval_corpora
      print(evaluate.describe(result, main_line=False))
    evaluate.write_json(result, _OUTPUT.value or paths.join(_WORKDIR.value, f"eval_{result['step']}.json"))

  def run_all_steps():
    from llama_jax import eval_steps
    from llama_jax.errors import ConfigError
    if _STEP.value is not None or _OUTPUT.value:
      raise ConfigError("--all_steps scores every checkpoint into WORKDIR/eval_steps.jsonl: --step and --output "
                        "go without it")
    eval_steps.evaluate_all_steps(_WORKDIR.value, tasks=_TASKS.value.split(",") if _TASKS.value else [],
                                  include_path=_INCLUDE_PATH.value, num_fewshot=_NUM_FEWSHOT.value,
                                  limit=_LIMIT.value, corpus_spec=_CORPUS.value, data_format=_FORMAT.value,
                                  dtype=_DTYPE.value, seq_len=_SEQ_LEN.value, batch_size=_BATCH_SIZE.value)

  entry.run(run_all_steps if _ALL_STEPS.value else run_tasks if _TASKS.value is not None else run)


if __name__ == "__main__":
  entry.main(main)
