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

Measured (2-core CPU shared with other jobs, 2026-11-24; 200 steps in 3.5 min at ~2.5k tokens/s):
the held-out response loss (nats per response token, EOS included) falls from 7.556 (the base
model: 8.23 bits per response byte) to 3.898 at step 100 and 4.000 at step 200 (4.36 bits/byte);
the training loss reaches 0.95. Exact match of greedy answers: 0.0% of the 3,413 held-out pairs
(the model answers with a training play's character: "KING HENRY V" for Hamlet's "To be, or not
to be"), and 0.0% of the first 500 training pairs; 600 steps reach 9.0% on those training
pairs but a worse held-out loss (4.43): the task mostly tests memorised speakers.
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

  c.train.steps = 200  # ~half an epoch of the training pairs (8 rows of 256 tokens, ~8 pairs a row);
  #   longer runs overfit the training plays' speakers (held-out loss 4.06 at step 200, 4.43 at 600)
  c.train.log_every = 50
  c.train.eval_every = 100  # held-out response loss (also before the first step)
  c.train.checkpoint_every = 100

  c.sample.prompt = "Who speaks this line in Hamlet? To be, or not to be: that is the question:\n"
  c.sample.max_new_tokens = 8
  c.sample.temperature = 0.0  # greedy: the model's answer
  return c
