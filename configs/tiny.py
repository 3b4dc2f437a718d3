"""The demo: a ~1M-parameter Llama trained on the embedded Shakespeare corpus on a CPU.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python eval.py --workdir runs/tiny

On a 2-core CPU, 1800 steps train in about 6 minutes (10.4-11.6k tokens/s here): the logged train
loss (a mean over 100 steps) falls from 5.76 at step 100 to 2.96 at step 1800, the held-out
bits/byte, evaluated every 300 steps, from 2.50 at step 300 to 2.10, and eval.py reports 2.1038
bits/byte (perplexity 28.33 over 217,595 tokens, each play's EOS included) on the 4 held-out plays
(`make demo` from a fresh clone, 2026-12-01: 7.6 min, install included).
The plays stream through the packed pipeline of llama_jax/data.py; the
tokenizer (1024-piece BPE with byte fallback) is trained on them at the start of the run and
saved as runs/tiny/tokenizer.model.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter initialisation
  c.init_from = ""  # WORKDIR[:STEP]: start from that run's params (fresh optimizer, step 0); "": random
  c.init_from_state = False  # with init_from: also take its optimizer state, step and data position
  #   (a branch of that run, e.g. a WSD cool-down from a stable-phase checkpoint)

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 1024  # must equal the tokenizer's vocabulary
  c.model.dim = 128  # D
  c.model.n_layers = 4  # L
  c.model.n_heads = 4  # N
  c.model.n_kv_heads = 2  # K: grouped-query attention
  c.model.ffw_dim = 384  # F, SwiGLU hidden size
  c.model.norm_eps = 1e-5  # RMSNorm epsilon
  c.model.rope_theta = 10000.0  # RoPE base
  c.model.rope_scaling = None  # or a dict of model.RopeScaling fields (Llama-3.1 style)
  c.model.tie_embeddings = True  # LM head = embedding transposed
  c.model.max_seq_len = 256  # longest sequence the model is meant for
  c.model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision)
  c.model.param_dtype = "float32"  # storage dtype of params and optimizer state
  c.model.scan_layers = False  # unrolled: 4 small layers run ~1.15x faster than under lax.scan on a
  #   CPU and compile as fast (configs/llama.py scans: one compiled block for 32-126 layers)
  c.model.remat = "none"  # rematerialisation policy: none, full, save_dots, ...
  c.model.attention = "auto"  # kernel: "auto" (splash on TPU, cudnn on GPU, else xla), "xla", "splash", "cudnn"
  c.model.attention_block_q = 256  # queries per block of the xla and splash kernels (all T if T is shorter):
  c.model.attention_block_kv = 256  #   and keys; 256 ran fastest on a 2-core CPU (benchmarks/attention.py)
  c.model.attention_max_segments = 64  # cudnn: documents per row in cuDNN's packed layout (rows with more run xla)
  c.model.init_std = 0.02  # std of the normal initialisation (output projections / sqrt(2L))

  c.data = ml_collections.ConfigDict()
  c.data.train_corpus = "shakespeare:train"  # corpus spec: text:, jsonl:, parquet:, tfds:, mix: (llama_jax/corpus.py)
  c.data.eval_corpus = "shakespeare:heldout"  # scored by eval.py and the in-training eval ("": none)
  c.data.eval_corpora = ml_collections.ConfigDict()  # named held-out sets scored beside it, name -> corpus spec
  #   (names: letters, digits, _; not "mean"), e.g. --config.data.eval_corpora="{'code': 'jsonl:/data/code/*.jsonl'}":
  #   each reported as eval_<name>_loss, _perplexity, _bits_per_byte, _num_tokens, and their macro mean as
  #   eval_mean_* (llama_jax/evaluate.py)
  c.data.format = "text"  # documents to pretrain on; "sft": (prompt, response) pairs, loss on the response
  c.data.prompt_field = "prompt"  # sft: the JSONL fields of a pair
  c.data.response_field = "response"
  c.data.sft_overlong = "truncate_prompt"  # sft: a pair longer than a row loses its prompt's start, or "skip"
  c.data.tfds_data_dir = ""  # where tfds: corpora were prepared (array_record format)
  c.data.skip_bad_documents = False  # skip (and count) unreadable documents instead of stopping
  c.data.tokenizer_path = ""  # a tokenizer file; "" trains one on train_corpus into the workdir
  c.data.tokenizer_sample_bytes = 100_000_000  # text of train_corpus a new tokenizer is trained on
  c.data.seq_len = 256  # T, tokens per packed row
  c.data.batch_size = 8  # global batch size B (rows per step, all processes together)
  c.data.shuffle_seed = 0  # document order (a new permutation each epoch), chunk and row shuffles
  c.data.shuffle_window = 7504  # chunks shuffled together before packing: one epoch of the plays' chunks
  #   (with this tokenizer), so each epoch is one global shuffle and windows never straddle epochs
  c.data.pack_bins = 64  # rows open at once for first-fit packing (more: less padding)
  c.data.read_threads = 2  # threads reading and tokenizing documents (per data shard)
  c.data.shards = 0  # the stream's shards, each packing its own rows; a resume may run on any process count
  #   that divides it. 0: the process count at the run's start, or on resume the checkpoint's (llama_jax/data.py)

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adamw"  # "adamw", "adafactor", "lion" or "muon" (llama_jax/optim.py)
  c.optim.learning_rate = 4e-3  # peak learning rate
  c.optim.warmup_steps = 200  # linear warmup from 0
  c.optim.schedule = "cosine"  # after warmup: "cosine", "wsd" (warmup-stable-decay), "linear" or "constant"
  c.optim.min_lr_ratio = 0.1  # cosine, linear and wsd decay to learning_rate * min_lr_ratio at train.steps
  c.optim.decay_fraction = 0.2  # wsd: the last this-fraction of train.steps decays (the rest is stable)
  c.optim.decay_shape = "linear"  # wsd: the decay's shape, "linear", "cosine" or "1-sqrt"
  c.optim.b1 = 0.9  # AdamW, Lion and Muon's first moment
  c.optim.b2 = 0.95  # AdamW and Lion's second
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1  # decoupled weight decay, not applied to the groups of optim.decay_mask
  c.optim.decay_mask = ("norms", "embedding")  # parameter groups without weight decay: "norms",
  #   "embedding", "lm_head" (an untied head)
  c.optim.grad_clip = 1.0  # global-norm clipping
  c.optim.z_loss = 0.0  # coefficient of the auxiliary z-loss, mean log(Z)^2 over targets (0: off)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1800  # total optimizer steps
  c.train.grad_accum_steps = 1  # micro-batches per step (data.batch_size must divide evenly)
  c.train.loss_chunk_size = 0  # positions whose logits exist at once in the loss (0: all T)
  c.train.log_every = 100  # steps between log lines / metrics.jsonl train events
  c.train.eval_every = 300  # steps between held-out evaluations (0: only at the end)
  c.train.checkpoint_every = 500  # steps between checkpoints (and one at the end, and on SIGTERM)
  c.train.checkpoint_every_minutes = 0.0  # also save when this many minutes have passed (0: off)
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.keep_every = 0  # also keep every this-many-th step for good (0: none)
  c.train.async_checkpoint = True  # save in the background while training goes on
  c.train.storage_retries = 6  # tensorstore's retries of a failed checkpoint request on gs:// (~1 min; checkpoint.py)
  c.train.skip_nonfinite_steps = 0  # skip up to this many non-finite updates in a row (0: stop at the first)
  c.train.allow_config_change = False  # resume even if the model, data order or seeds changed
  c.train.profile_steps = ()  # (first, last): a jax.profiler trace of these steps in WORKDIR/profile (): none

  c.metrics = ml_collections.ConfigDict()
  c.metrics.trackers = ("jsonl", "tensorboard")  # where metrics go: "jsonl" (metrics.jsonl, always),
  #   "tensorboard", "wandb" (Weights & Biases, process 0)
  c.metrics.wandb_project = "llama_jax"
  c.metrics.wandb_entity = ""  # "": the W&B account's default
  c.metrics.wandb_name = ""  # the run's display name ("": the workdir's name)
  c.metrics.wandb_mode = "online"  # "online", or "offline": files under WORKDIR/wandb for `wandb sync` later

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel replicas
  c.mesh.fsdp = -1  # params and optimizer state sharded over this axis (-1: all other devices)
  c.mesh.tensor = 1  # heads / ffw / vocab split over this axis

  c.eval = ml_collections.ConfigDict()  # lm-evaluation-harness tasks on the live params during training
  c.eval.tasks = ()  # lm-eval task names (the shipped plays_* tasks, or any on disk), run at the end of
  #   training and every eval.harness_every steps; e.g. --config.eval.tasks=plays_speaker,plays_perplexity; (): none
  c.eval.harness_every = 0  # steps between task runs during training (0: only at the end)
  c.eval.harness_limit = 0  # examples per task (lm-eval's limit; 0: all of them)
  c.eval.num_fewshot = ml_collections.config_dict.placeholder(int)  # few-shot examples (None: each task's own)
  c.eval.include_path = ""  # a folder of extra lm-eval task YAMLs (the shipped local tasks are always found)
  c.eval.harness_batch_size = 8  # packed rows of model.max_seq_len tokens per scoring call of the lm-eval backend

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "ROMEO.\n"  # continued at the end of training (and every sample.every steps)
  c.sample.max_new_tokens = 200  # 0: no sample
  c.sample.temperature = 0.8  # 0: greedy
  c.sample.top_k = 0  # sample among the k most likely tokens (0: all)
  c.sample.top_p = 1.0  # sample from the smallest set of tokens with this probability (1: all)
  c.sample.seed = 0
  c.sample.every = 0  # steps between samples during training, logged and in TensorBoard (0: only at the end)
  return c
