"""Fine-tuning the demo model on prompt/response pairs: name the speaker of a line.

  make demo                                                  # the base model, in runs/tiny
  python eval.py --workdir runs/tiny --corpus speakers:heldout --format sft   # before
  python train.py --config configs/sft_tiny.py --workdir runs/sft_tiny
  python eval.py --workdir runs/sft_tiny                     # held-out response loss, exact match

The pairs (corpus spec speakers:, llama_jax/corpus.py speaker_pairs) ask "Who speaks this line in
<play>, after <A> and <B>? <first line of a speech>" -> "<SPEAKER>", A and B the speakers of the two
speeches before it. Training pairs come from the 34 training plays less every 5th scene of each
(23,327 pairs); the held-out pairs from those scenes (4,026): their characters are the training
plays', so the task can be learned, and the base model saw their text in pretraining (its corpus,
shakespeare:train, is unchanged). speakers:unseen holds the pairs of the 4 held-out plays (3,413).
Only the response tokens and the EOS are targets. The run starts from the last checkpoint of
runs/tiny (its params and tokenizer; a fresh optimizer at step 0), scores the held-out pairs before
its first step, at step 400 and at the end. Without runs/tiny, add --config.init_from= to fine-tune
from random weights (a warning says so).

Measured (2-core CPU shared with other jobs, 2026-12-01; base model from configs/tiny.py, 2.1038
bits/byte on the held-out plays): 800 steps in 4.0 min (wall, evals included; 4.5-9.6k tokens/s).
The held-out response loss (nats per response token, EOS included; 24,363 tokens) falls from 4.671
(the base model) to 0.785 at step 400 and 0.616 at step 800; the training loss reaches 0.36. Exact
match of greedy answers on the first 500 held-out pairs (eval.py's default; the split's order is a
fixed pseudo-random one): 0.0% before, 43.2% at step 400, 54.6% at step 800. Chance on those 500:
1/(speakers of the play in the training pairs) averages 3.1%; always answering the play's most
frequent speaker of the training pairs, 10.8%; the most frequent speaker of each play among these
500 themselves, 33.6%. Answering A (the speaker two speeches back: turn-taking) would score 62.6%:
the model learns most of that from the training plays' dialogues, but not as a rule for new names:
on speakers:unseen it scores 8.8% (0.0% before; A would score 66.4%), its response loss 7.165 ->
4.021. With the prompt without A and B (learning rate 1e-3), 200 steps gave 5.0% and 1000 steps
11.6%: about the most-frequent-speaker rate.
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

  c.optim.learning_rate = 2e-3  # peak; half of pretraining's
  c.optim.warmup_steps = 50
  c.optim.min_lr_ratio = 0.1

  c.train.steps = 800  # ~1.3 epochs of the training pairs (8 rows of 256 tokens, ~5 pairs of ~53 tokens a row)
  c.train.log_every = 100
  c.train.eval_every = 400  # held-out response loss (also before the first step)
  c.train.checkpoint_every = 400

  c.sample.prompt = ("Who speaks this line in Hamlet, after KING CLAUDIUS and LORD POLONIUS? "
                     "To be, or not to be: that is the question:\n")  # a pair of speakers:unseen
  c.sample.max_new_tokens = 8
  c.sample.temperature = 0.0  # greedy: the model's answer
  return c
