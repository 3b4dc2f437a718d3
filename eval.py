"""Scores a checkpoint on the held-out corpus: loss, perplexity and bits per byte (for SFT data:
of the responses, plus the exact-match accuracy of greedy answers).

  python eval.py --workdir runs/tiny [--step N] [--output FILE] [--corpus SPEC] [--dtype float32]
      [--seq_len 64] [--batch_size 8]
  python eval.py --workdir gs://bucket/run [--output gs://bucket/run/eval.json]

The line printed and the JSON written name the compute dtype that ran ("dtype"). Rows are the
checkpoint's data.seq_len tokens, data.batch_size / train.grad_accum_steps at a time, unless
--seq_len / --batch_size say otherwise; a seq_len over the model's max_seq_len, or an --output that
cannot be written (a directory, a missing parent directory or bucket), is one line before anything is
scored. --workdir and --output may be local or on object storage (llama_jax.paths); the JSON is written
with paths.write_atomic (a reader sees the old file or the whole new one).
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
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from llama_jax import evaluate, paths

  def run():
    if _OUTPUT.value:
      evaluate.check_output(_OUTPUT.value)
    result = evaluate.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _CORPUS.value, _EXACT_MATCH.value,
                                          _FORMAT.value, dtype=_DTYPE.value, seq_len=_SEQ_LEN.value,
                                          batch_size=_BATCH_SIZE.value)
    line = (f"step {result['step']}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
            f"bits/byte {result['bits_per_byte']:.4f} | {result['num_tokens']:,} tokens | {result['dtype']}")
    if "exact_match" in result:
      line += f" | exact match {result['exact_match']:.1%} of {result['exact_match_examples']:,}"
    print(line)
    evaluate.write_json(result, _OUTPUT.value or paths.join(_WORKDIR.value, f"eval_{result['step']}.json"))

  entry.run(run)


if __name__ == "__main__":
  entry.main(main)
