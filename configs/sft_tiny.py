"""Fine-tuning the demo model on prompt/response pairs: name the speaker of a line.

  make demo                                                  # the base model, in runs/tiny
  python train.py --config configs/sft_tiny.py --workdir runs/sft_tiny
  python eval.py --workdir runs/sft_tiny                     # held-out response loss, exact match

The pairs ("Who speaks this line in <play>? <first line of a speech>" -> "<SPEAKER>", corpus
spec speakers:) come from the 34 training plays (27,353 pairs); the held-out pairs from the 4
held-out plays (3,413), whose characters the model has never seen, except that a play's
title often names one (Hamlet, Julius Caesar). Only the response tokens and the EOS are
targets. The run starts from the last checkpoint of runs/tiny (its params and tokenizer; a
fresh optimizer at step 0), scores the held-out pairs before its first step and at the end.
Without runs/tiny, add --config.init_from= to fine-tune from random weights (a warning says so).

Measured on a 2-core CPU (RESULTS below), 600 steps: see the docstring's numbers.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()  # the demo model, unchanged: init_from must hold the same architecture
  c.init_from = "runs/tiny"  # WORKDIR[:STEP] of the base model ("": random weights)

  c.data.format = "sft"  # (prompt, response) pairs; loss on the response and EOS only
  c.data.train_corpus = "speakers:train"  # or jsonl:GLOB with data.prompt_field / data.response_field
  c.data.eval_corpus = "speakers:heldout"
  c.data.tokenizer_path = ""  # "": the init_from run's tokenizer
  c.data.shuffle_window = 1024  # pairs are single chunks, already shuffled anew each epoch
  c.data.sft_overlong = "truncate_prompt"  # pairs longer than a row lose the start of the prompt

  c.optim.learning_rate = 1e-3  # peak; a quarter of pretraining's
  c.optim.warmup_steps = 50
  c.optim.min_lr_ratio = 0.1

  c.train.steps = 600  # ~1.5 epochs of the training pairs (8 rows of 256 tokens, ~8 pairs a row)
  c.train.log_every = 50
  c.train.eval_every = 200  # held-out response loss (also before the first step)
  c.train.checkpoint_every = 200

  c.sample.prompt = "Who speaks this line in Hamlet? To be, or not to be: that is the question:\n"
  c.sample.max_new_tokens = 8
  c.sample.temperature = 0.0  # greedy: the model's answer
  return c
