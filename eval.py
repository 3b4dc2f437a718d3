"""Scores a checkpoint on the held-out corpus: loss, perplexity and bits per byte.

  python eval.py --workdir runs/tiny [--step N] [--output FILE]
"""

from absl import flags

from llama_jax import entry

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and tokenizer.model.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON result (default: WORKDIR/eval_<step>.json).")
_CORPUS = flags.DEFINE_string("corpus", None, "Corpus spec to score (default: the run's data.eval_corpus).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from llama_jax import evaluate

  def run():
    result = evaluate.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _CORPUS.value)
    print(f"step {result['step']}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
          f"bits/byte {result['bits_per_byte']:.4f} | {result['num_tokens']:,} tokens")
    evaluate.write_json(result, _OUTPUT.value or f"{_WORKDIR.value}/eval_{result['step']}.json")

  entry.run(run)


if __name__ == "__main__":
  entry.main(main)
