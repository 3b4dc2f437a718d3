"""Llama in Flax NNX, top to bottom: RMSNorm, RoPE, Attention, MLP, Block, Llama.

Dimension letters: B batch, T query positions, S key positions, D model, F ffw, N query
heads, K kv heads, G query heads per kv head (N = K * G), H head dim, L layers, V vocab.
Parameters are stored in float32 (`param_dtype`) and cast to `dtype` for compute. The
layers are stored stacked (leading L axis) and run with `jax.lax.scan` or unrolled.

Attention (attention.py) keeps a token within its own document of a packed row: the model
takes segment ids and positions, never a [B, T, S] mask. Decoding (generate.py) passes a KV
cache {"k", "v"} of [L, B, S, K, H] arrays: a token at position p writes its keys and values to
slot p of its row and attends to slots <= p.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax import attention as attention_lib
from llama_jax import sharding as sh


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 frequency-dependent RoPE scaling."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_seq_len: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture, plus how to compute it (dtype, scan, remat)."""

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffw_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  dtype: str = "float32"  # compute dtype of matmuls and activations
  param_dtype: str = "float32"
  scan_layers: bool = True  # lax.scan over the stacked layers (fast compile) or unroll
  remat: str = "none"  # one of REMAT_POLICIES
  attention: str = "auto"  # kernel, one of attention.KERNELS: auto (splash on TPU, cudnn on GPU, else xla)
  attention_block_q: int = 512  # queries per block of the xla and splash kernels (the whole row if shorter)
  attention_block_kv: int = 512  # keys per block
  attention_max_segments: int = 64  # cudnn: documents per row its packed layout holds (more: xla runs)
  init_std: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def __post_init__(self):
    if self.dim % self.n_heads:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head dim {self.head_dim} (model.dim / model.n_heads) must be even for RoPE")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.attention not in attention_lib.KERNELS:
      raise ValueError(f"model.attention={self.attention!r} is not one of {', '.join(attention_lib.KERNELS)}")
    for key in ("attention_block_q", "attention_block_kv", "attention_max_segments"):
      if getattr(self, key) < 1:
        raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")


# What the backward pass may keep from the forward pass of a block; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_block_inputs": jax.checkpoint_policies.save_only_these_names("block_input"),
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("block_input", "attn_out"),
}


def _param(rngs, shape, names, std, dtype):
  """A normally initialised parameter annotated with logical axis names."""
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  # The names are only recorded here; the jitted init's out_shardings place the values.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(sh.EMBED,),
                           eager_sharding=False)

  def __call__(self, x_BTD):
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x_BTD.dtype) * x.astype(x_BTD.dtype)


def rope_frequencies(config: LlamaConfig):
  """Inverse frequencies (H/2,) of the rotary embedding, with Llama-3.1 scaling if set."""
  H = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  s = config.rope_scaling
  if s is None:
    return inv_freq
  # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
  wavelen = 2 * math.pi / inv_freq
  blend = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
  low_freq = wavelen > s.original_max_seq_len / s.low_freq_factor
  high_freq = wavelen < s.original_max_seq_len / s.high_freq_factor
  return jnp.where(low_freq, inv_freq / s.factor, jnp.where(high_freq, inv_freq, blended))


def apply_rope(x_BTNH, positions_BT, inv_freq):
  """Rotates pairs (x[i], x[i + H/2]) by angle position * inv_freq[i] (the HF layout)."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BTh)[:, :, None, :].astype(x_BTNH.dtype)
  sin = jnp.sin(angles_BTh)[:, :, None, :].astype(x_BTNH.dtype)
  x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
  """Causal self-attention with grouped-query heads (K kv heads shared by G = N/K queries)."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    D, N, K, H = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    std, out_std, pd = config.init_std, config.init_std / math.sqrt(2 * config.n_layers), config.param_dtype
    self.config = config
    self.wq_DNH = _param(rngs, (D, N, H), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), std, pd)
    self.wk_DKH = _param(rngs, (D, K, H), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), std, pd)
    self.wv_DKH = _param(rngs, (D, K, H), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), std, pd)
    self.wo_NHD = _param(rngs, (N, H, D), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), out_std, pd)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
    """Each token attends to the earlier tokens of its document (equal segment_ids_BT) through the
    config's kernel. With a cache (k, v of [B, S, K, H]) instead, the new keys and values go to
    the slots of their positions, the queries attend to every slot up to their own position, and
    the updated cache comes back too."""
    c = self.config
    dt = x_BTD.dtype
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...].astype(dt))
    k_BSKH = jnp.einsum("BSD,DKH->BSKH", x_BTD, self.wk_DKH[...].astype(dt))
    v_BSKH = jnp.einsum("BSD,DKH->BSKH", x_BTD, self.wv_DKH[...].astype(dt))
    inv_freq = rope_frequencies(c)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BSKH = apply_rope(k_BSKH, positions_BT, inv_freq)
    if cache is None:
      out_BTNH = attention_lib.attend(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kernel=c.attention,
                                      block_q=c.attention_block_q, block_kv=c.attention_block_kv,
                                      max_segments=c.attention_max_segments)
    else:
      k_BSKH, v_BSKH = (_write_slots(cache_BSKH, new_BTKH.astype(cache_BSKH.dtype), positions_BT[:, 0])
                        for cache_BSKH, new_BTKH in zip(cache, (k_BSKH, v_BSKH)))
      cache = (k_BSKH, v_BSKH)
      out_BTNH = attention_lib.attend_cached(q_BTNH, k_BSKH, v_BSKH, positions_BT)
    return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.wo_NHD[...].astype(dt)), cache


def _write_slots(cache_BSKH, new_BTKH, start_B):
  """Row b of the cache with new_BTKH[b] written to slots start_B[b] .. start_B[b] + T - 1."""
  write = lambda c_SKH, n_TKH, s: jax.lax.dynamic_update_slice_in_dim(c_SKH, n_TKH, s, axis=0)
  return jax.vmap(write)(cache_BSKH, new_BTKH, start_B)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    D, F, pd = config.dim, config.ffw_dim, config.param_dtype
    std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layers)
    self.w_gate_DF = _param(rngs, (D, F), (sh.EMBED, sh.MLP), std, pd)
    self.w_up_DF = _param(rngs, (D, F), (sh.EMBED, sh.MLP), std, pd)
    self.w_down_FD = _param(rngs, (F, D), (sh.MLP, sh.EMBED), out_std, pd)

  def __call__(self, x_BTD):
    dt = x_BTD.dtype
    gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.w_gate_DF[...].astype(dt))
    up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.w_up_DF[...].astype(dt))
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, self.w_down_FD[...].astype(dt))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
    self.attn = Attention(config, rngs)
    self.mlp_norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
    self.mlp = MLP(config, rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
    x_BTD = sh.constrain(x_BTD, (sh.BATCH, sh.SEQ, sh.ACT_EMBED))
    x_BTD = checkpoint_name(x_BTD, "block_input")
    attn_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, cache)
    h_BTD = x_BTD + checkpoint_name(attn_BTD, "attn_out")
    return h_BTD + self.mlp(self.mlp_norm(h_BTD)), cache


class Llama(nnx.Module):
  """tokens_BT -> logits_BTV."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    V, D, pd = config.vocab_size, config.dim, config.param_dtype
    self.embed_VD = _param(rngs, (V, D), (sh.VOCAB, sh.EMBED), config.init_std, pd)

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: sh.LAYERS})
    def make_blocks(rngs):
      return Block(config, rngs)

    self.blocks = make_blocks(rngs)  # every parameter has a leading L axis
    self.final_norm = RMSNorm(D, config.norm_eps, pd)
    if not config.tie_embeddings:
      self.lm_head_DV = _param(rngs, (D, V), (sh.EMBED, sh.VOCAB), config.init_std, pd)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    return self.logits(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT))

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """The final-normed hidden states x_BTD that the LM head turns into logits. Without positions
    and segment ids, each row is one document starting at position 0."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.zeros(tokens_BT.shape, jnp.int32)
    x_BTD, _ = self._blocks(self._embed(tokens_BT), positions_BT, segment_ids_BT, None)
    return self.final_norm(sh.constrain(x_BTD, (sh.BATCH, sh.SEQ, sh.ACT_EMBED)))

  def decode(self, tokens_BT, positions_BT, cache):
    """(x_BTD, cache): hidden states (as hidden_states; `logits` of them as needed) of tokens at
    consecutive positions per row, which attend to themselves and to what the cache holds at
    earlier positions; their keys and values are written into the cache."""
    x_BTD, (k, v) = self._blocks(self._embed(tokens_BT), positions_BT, None, (cache["k"], cache["v"]))
    return self.final_norm(x_BTD), {"k": k, "v": v}

  def _embed(self, tokens_BT):
    return self.embed_VD[...].astype(jnp.dtype(self.config.dtype))[tokens_BT]

  def _blocks(self, x_BTD, positions_BT, segment_ids_BT, cache):
    """The L blocks in turn; cache (k, v of [L, B, S, K, H]) or None, updated per layer."""
    c = self.config
    block_graph, block_params = nnx.split(self.blocks)

    def block_fn(x_BTD, params_and_cache):
      params, layer_cache = params_and_cache
      return nnx.merge(block_graph, params)(x_BTD, positions_BT, segment_ids_BT, layer_cache)

    if c.remat != "none":
      block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      return jax.lax.scan(block_fn, x_BTD, (block_params, cache))
    layer_caches = []
    for i in range(c.n_layers):
      x_BTD, layer_cache = block_fn(x_BTD, jax.tree.map(lambda a: a[i], (block_params, cache)))
      layer_caches.append(layer_cache)
    if cache is None:
      return x_BTD, None
    return x_BTD, jax.tree.map(lambda *layers: jnp.stack(layers), *layer_caches)

  def lm_head(self):
    """The LM head [D, V] in param dtype: its own matrix, or the embedding transposed if tied."""
    return self.embed_VD[...].T if self.config.tie_embeddings else self.lm_head_DV[...]

  def logits(self, x_BTD):
    return head_logits(x_BTD, self.lm_head().astype(x_BTD.dtype))


def head_logits(x_BTD, lm_head_DV):
  """x_BTD @ lm_head_DV, the logits sharded over the vocabulary."""
  return sh.constrain(jnp.einsum("BTD,DV->BTV", x_BTD, lm_head_DV), (sh.BATCH, sh.SEQ, sh.VOCAB))


def init_model(config: LlamaConfig, seed: int) -> Llama:
  return Llama(config, nnx.Rngs(params=seed))


def abstract_model(config: LlamaConfig) -> Llama:
  """The model with ShapeDtypeStructs for parameters: nothing is allocated. A mesh set around the call
  (jax.set_mesh: the trainer's loop) is hidden from it: nnx would shard the variables' logical axis names
  over it as if they were its mesh axes, and fail."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return nnx.eval_shape(lambda: init_model(config, 0))


def init_cache(config: LlamaConfig, batch_size: int, length: int):
  """An empty KV cache for `batch_size` rows of `length` positions (zeros; slots are written
  before they are read)."""
  shape = (config.n_layers, batch_size, length, config.n_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}


def count_params(config: LlamaConfig) -> int:
  params = nnx.state(abstract_model(config), nnx.Param)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


# Published Llama sizes by name: architecture fields only, the compute fields (dtype, scan,
# remat) stay at their defaults. Dims follow Meta's params.json / the HF config.json of each
# release; Llama-1 33B is the model Meta's repo calls 30B.
_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072)
_LLAMA32 = dict(_LLAMA3, rope_scaling=RopeScaling(factor=32.0), max_seq_len=131072,
                tie_embeddings=True)

PRESETS: dict[str, LlamaConfig] = {
    "llama1-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffw_dim=11008, **_LLAMA1),
    "llama1-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffw_dim=13824, **_LLAMA1),
    "llama1-33b": LlamaConfig(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, ffw_dim=17920, **_LLAMA1),
    "llama1-65b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, ffw_dim=22016,
                              **dict(_LLAMA1, norm_eps=1e-5)),
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffw_dim=11008, **_LLAMA2),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffw_dim=13824, **_LLAMA2),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffw_dim=28672, **_LLAMA2),
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffw_dim=14336, **_LLAMA3),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffw_dim=28672, **_LLAMA3),
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffw_dim=14336, **_LLAMA31),
    "llama3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffw_dim=28672, **_LLAMA31),
    "llama3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffw_dim=53248,
                                 **_LLAMA31),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffw_dim=8192, **_LLAMA32),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffw_dim=8192, **_LLAMA32),
    # The demo model of configs/tiny.py: ~0.9M parameters, trains on a laptop CPU in minutes.
    "tiny": LlamaConfig(vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffw_dim=384,
                        tie_embeddings=True, max_seq_len=256),
}
