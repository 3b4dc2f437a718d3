"""Trains a Llama per a config file, resuming from the workdir's latest checkpoint.

  python train.py --config configs/tiny.py --workdir runs/tiny [--config.train.steps=100 ...]
"""

from absl import flags
from ml_collections import config_flags

from llama_jax import entry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from llama_jax import trainer
  entry.run(lambda: trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  entry.main(main)
