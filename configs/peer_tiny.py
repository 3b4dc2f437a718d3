"""peer-tiny: the model and batch that llama_jax, Hugging Face transformers and MaxText are timed on.

  python -m llama_jax.bench --config configs/peer_tiny.py --peer hf --steps 10 --rounds 2

A 19.5M-parameter Llama (11.4M of them in matmuls: 4 layers of dim 256, a 32000-token vocabulary
with an untied LM head), fp32 throughout, one batch of 8 x 256 tokens per step, AdamW as in
configs/tiny.py. On a 2-core CPU (2026-11-25; benchmarks/README.md): 1.03-1.09 s per step
(~1,900 tokens/s, 69.7 MFLOP per token, 61-65% of the measured fp32 matmul rate, compile
3.5-4.6 s); transformers in the same process 1.00-1.06 s (0.92-0.97x ours / HF).

Everything not set here is configs/tiny.py's; the data fields only matter to `bench --data` and
to training (`train.py --config configs/peer_tiny.py` trains a 32000-piece tokenizer on the
Shakespeare plays first).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.vocab_size = 32000  # V: Llama-2's vocabulary size
  c.model.dim = 256  # D
  c.model.ffw_dim = 688  # F: SwiGLU hidden size (~8/3 D, rounded up to a multiple of 16)
  c.model.n_layers = 4  # L
  c.model.n_heads = 4  # N: head dim D / N = 64
  c.model.n_kv_heads = 4  # K = N: plain multi-head attention, as MaxText's and HF's defaults
  c.model.max_seq_len = 256  # longest sequence the model is meant for
  c.model.tie_embeddings = False  # an LM head of its own (HF's and MaxText's Llama default)
  c.model.dtype = "float32"  # compute dtype: fp32, like the peers on CPU
  c.model.param_dtype = "float32"  # params and optimizer state in fp32

  c.data.seq_len = 256  # T, tokens per row
  c.data.batch_size = 8  # B: 2048 tokens per step
  return c
