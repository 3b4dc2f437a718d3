"""Pretraining config for any published Llama size, named after the colon.

  python train.py --config configs/llama.py:llama3-8b --workdir /mnt/shared/run \
      --config.data.tokenizer_path=/path/to/llama3/tokenizer.model \
      --config.data.train_corpus='mix:jsonl:/data/web/*.jsonl=0.7,tfds:wiki40b/en@train=0.3' \
      --config.data.tfds_data_dir=/data/tfds --config.data.eval_corpus='jsonl:/data/heldout/*.jsonl'

Presets: see llama_jax.model.PRESETS (llama1-7b ... llama3.1-405b, llama3.2-1b/3b). The model is
the preset's architecture with bf16 compute, fp32 params and optimizer state, scan over
layers, remat that keeps only matmul outputs and the platform's fused attention kernel (splash on
TPU, cuDNN on GPU); params and optimizer state are sharded over
all devices (fsdp). Set data.tokenizer_path to the model family's tokenizer (its vocabulary
must equal the preset's) and point data.train_corpus / data.eval_corpus at your text
(corpus specs: README, llama_jax/corpus.py). More held-out sets, each reported with their macro mean,
and lm-eval tasks on the live params (configs/tiny.py documents the eval section):
  --config.data.eval_corpora="{'code': 'jsonl:/data/heldout_code/*.jsonl'}" \
      --config.eval.tasks=hellaswag,arc_easy --config.eval.harness_every=5000 --config.eval.harness_limit=1000
(a task's dataset must be on disk: nothing reaches a hub at run time).
Everything else is configs/tiny.py's, with the schedule of a real run.
"""

from configs import tiny
from llama_jax import config_lib
from llama_jax import model as model_lib


def get_config(preset: str = "llama3-8b"):
  if preset not in model_lib.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; have {', '.join(model_lib.PRESETS)}")
  c = tiny.get_config()
  c.model = config_lib.model_config_dict(model_lib.PRESETS[preset])
  c.model.dtype = "bfloat16"  # compute in bf16, params and optimizer state stay fp32
  c.model.scan_layers = True  # one compiled block for all layers
  c.model.remat = "save_dots"  # recompute everything in the backward pass but matmul outputs
  c.model.attention = "auto"  # splash on TPU, cudnn on GPU (bf16), xla elsewhere (llama_jax/attention.py)
  c.model.attention_block_q = c.model.attention_block_kv = 512  # splash's blocks (multiples of 128)

  c.data.seq_len = 4096  # T
  c.data.batch_size = 256  # 1M tokens per step
  c.data.read_threads = 8  # tokenizing threads per process (sentencepiece/tiktoken release the GIL)
  c.data.shuffle_window = 16384  # chunks shuffled together before packing
  c.data.pack_bins = 256  # rows open for first-fit packing
  c.train.loss_chunk_size = 512  # never the whole [B, T, 128k] fp32 logits at once
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  c.train.steps = 100_000
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.sample.prompt = "The meaning of life is"
  return c
