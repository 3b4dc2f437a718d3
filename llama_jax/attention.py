"""Causal self-attention over packed rows, by kernel: "xla" (blocked, plain JAX), "splash" (Pallas, TPU)
and "cudnn" (GPU); "auto" picks the one for the platform the model is traced for.

Every kernel computes, for each query head n (using kv head n // G, N = K * G):

  out[b, t, n] = sum_s softmax_s(q[b, t, n] . k[b, s, n // G] / sqrt(H)) v[b, s, n // G]
  over the keys s <= t with segment_ids[b, s] == segment_ids[b, t]

so a token attends to the earlier tokens of its own document in a packed row (data.py) and to nothing
else. No [B, T, S] mask is ever built: each kernel forms the mask of a block where it uses it. The
dense, masked softmax of the decoding path (a KV cache, generate.py) is `attend_cached`.

Dimension letters as in model.py; Q and C are a query block and a key block (model.attention_block_q,
model.attention_block_kv), i and j their indices.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding as sh

KERNELS = ("auto", "xla", "splash", "cudnn")


def platform() -> str:
  """The platform the current trace is for: the devices of the mesh set by jax.set_mesh (a TPU topology
  when compiling ahead of time on a CPU, aot.py), else the default backend's ("cpu", "gpu", "tpu")."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve(kernel: str, on: str, dtype: str | None = None, head_dim: int | None = None,
            compute_capability: str | None = None) -> str:
  """The kernel "auto" stands for on platform `on`: splash on TPU; on GPU cudnn where it can compute
  the model (cudnn_unsupported of the compute dtype, head dim and, where known, the GPU's compute
  capability), else xla; xla elsewhere. Any other kernel stands for itself."""
  if kernel != "auto":
    return kernel
  if on == "tpu":
    return "splash"
  if on in GPU_PLATFORMS and dtype is not None and head_dim is not None:
    return "xla" if cudnn_unsupported(dtype, head_dim, compute_capability) else "cudnn"
  return "xla"


# The splash kernel's blocks span whole vector registers of 128 lanes (its BlockSizes checks).
SPLASH_BLOCK_MULTIPLE = 128

# The platforms cudnn runs on: jax names an NVIDIA GPU's "gpu", and "cuda" when lowering for it by name.
GPU_PLATFORMS = ("gpu", "cuda")
# The documents per row cudnn's packed layout holds unless attend is told otherwise (cudnn_attention).
CUDNN_MAX_SEGMENTS = 64


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, kernel: str = "auto", block_q: int = 512,
           block_kv: int = 512, max_segments: int = CUDNN_MAX_SEGMENTS):
  """Causal attention within the documents of packed rows (the rule in the module docstring).

  Args:
    q_BTNH, k_BTKH, v_BTKH: queries, keys and values of the same T positions (RoPE applied).
    segment_ids_BT: int32, the document of each position; equal ids attend to each other.
    kernel: one of KERNELS. block_q, block_kv: the queries and keys a kernel works on at once
      (xla and splash; splash's must be multiples of SPLASH_BLOCK_MULTIPLE). A block longer than
      the row shrinks to it; a row that is not a multiple of the blocks is padded at its end (the
      padding is causally after every real position, so no real query sees it) and cut off again.
  Returns:
    out_BTNH in the dtype of q.
  Raises:
    ValueError for a kernel not in KERNELS or not built for this platform (cudnn off GPU), and for
    what cudnn cannot take (cudnn_unsupported), in one line naming the config key.
  """
  B, T = segment_ids_BT.shape
  on = platform()
  capability = getattr(jax.devices()[0], "compute_capability", None) if on == jax.default_backend() else None
  kernel = resolve(kernel, on, jnp.dtype(q_BTNH.dtype).name, q_BTNH.shape[-1], capability)
  if kernel == "xla":
    unit, fn = 1, blocked_attention
  elif kernel == "splash":
    unit = SPLASH_BLOCK_MULTIPLE
    fn = lambda q, k, v, seg, bq, bk: _sharded(
        functools.partial(splash_attention, block_q=bq, block_kv=bk, interpret=on != "tpu"), q, k, v, seg)
  elif kernel == "cudnn":
    if on not in GPU_PLATFORMS:
      raise ValueError(f"model.attention='cudnn' runs on GPU only, not on {on!r} (use 'auto' or 'xla')")
    # cuDNN takes rows of any length: no blocks, no padding.
    xla = functools.partial(attend, kernel="xla", block_q=block_q, block_kv=block_kv)
    # Asked here: the probe runs a computation, which jax cannot do inside shard_map.
    fn = functools.partial(cudnn_attention, max_segments=max_segments, fallback=xla,
                           repeat_kv=not _kv_offsets_follow_kv_heads())
    return _sharded(fn, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  else:
    raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")
  block_q, block_kv = min(block_q, _round_up(T, unit)), min(block_kv, _round_up(T, unit))
  pad = _round_up(T, math.lcm(block_q, block_kv)) - T
  if pad:
    q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BTKH, v_BTKH))
    segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=-1)
  out_BTNH = fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q, block_kv)
  return out_BTNH[:, :T]


def attend_cached(q_BTNH, k_BSKH, v_BSKH, positions_BT):
  """Decoding against a KV cache: query t (at position positions_BT[b, t]) sees cache slots s <=
  its position. A dense fp32 softmax with the mask formed inside; T is a prompt or one token.
  Returns out_BTNH in the dtype of q."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) / math.sqrt(H)
  visible_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
  scores_BKGTS = jnp.where(visible_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


# --- xla: blocked attention with an online softmax (memory O(T x block), not O(T^2)) ---------------
#
# The forward pass walks the key blocks j <= i of each query block i, keeping a running max m,
# normaliser l and unnormalised output o per query (Milakov & Gimelshein 2018, "Online normalizer
# calculation for softmax"; Dao et al. 2022, "FlashAttention", Algorithm 1). Blocks above the
# diagonal are never computed. The backward pass recomputes each block's probabilities from the
# saved log-sum-exp (FlashAttention-2, Dao 2023, Algorithm 2), so nothing of size T x S is stored.


def blocked_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q: int, block_kv: int):
  """The "xla" kernel: attend()'s rule in query blocks of block_q and key blocks of block_kv.
  Scores, softmax and accumulation in fp32; returns out_BTNH in q's dtype."""
  return _blocked(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q, block_kv)


def _split_heads(q_BTNH, K):
  B, T, N, H = q_BTNH.shape
  return q_BTNH.reshape(B, T, K, N // K, H)


def _block_visible(segment_ids_BT, i, j, Q, C):
  """[B, Q, C]: which keys of key block j each query of query block i sees (causal, same document)."""
  q_idx = i * Q + jnp.arange(Q)
  k_idx = j * C + jnp.arange(C)
  seg_q_BQ = jax.lax.dynamic_slice_in_dim(segment_ids_BT, i * Q, Q, axis=1)
  seg_k_BC = jax.lax.dynamic_slice_in_dim(segment_ids_BT, j * C, C, axis=1)
  causal_QC = k_idx[None, :] <= q_idx[:, None]
  return causal_QC[None] & (seg_q_BQ[:, :, None] == seg_k_BC[:, None, :])


def _block_scores(q_BQKGH, k_BCKH, visible_BQC, scale):
  """Masked fp32 scores [B, K, G, Q, C] of one (query block, key block); -inf where not visible."""
  s_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32) * scale
  return jnp.where(visible_BQC[:, None, None], s_BKGQC, -jnp.inf)


def _last_key_block(i, Q, C):
  """The last key block holding a key at or before the last query of query block i."""
  return ((i + 1) * Q - 1) // C


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, Q, C):
  return _blocked_fwd(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, Q, C)[0]


def _blocked_forward(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, Q, C):
  """(out_BTNH, lse_BKGT): the output and the fp32 log-sum-exp of every query's scores."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  scale = 1.0 / math.sqrt(H)
  q_BTKGH = _split_heads(q_BTNH, K)

  def query_block(_, i):
    q_BQKGH = jax.lax.dynamic_slice_in_dim(q_BTKGH, i * Q, Q, axis=1)

    def key_block(j, carry):
      m_BKGQ, l_BKGQ, o_BKGQH = carry
      k_BCKH = jax.lax.dynamic_slice_in_dim(k_BTKH, j * C, C, axis=1)
      v_BCKH = jax.lax.dynamic_slice_in_dim(v_BTKH, j * C, C, axis=1)
      s_BKGQC = _block_scores(q_BQKGH, k_BCKH, _block_visible(segment_ids_BT, i, j, Q, C), scale)
      m_new = jnp.maximum(m_BKGQ, jnp.max(s_BKGQC, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: nothing to rescale
      p_BKGQC = jnp.exp(s_BKGQC - m_safe[..., None])
      rescale_BKGQ = jnp.exp(m_BKGQ - m_safe)
      l_BKGQ = l_BKGQ * rescale_BKGQ + jnp.sum(p_BKGQC, axis=-1)
      pv_BKGQH = jnp.einsum("BKGQC,BCKH->BKGQH", p_BKGQC.astype(v_BCKH.dtype), v_BCKH,
                            preferred_element_type=jnp.float32)
      return m_new, l_BKGQ, o_BKGQH * rescale_BKGQ[..., None] + pv_BKGQH

    init = (jnp.full((B, K, G, Q), -jnp.inf), jnp.zeros((B, K, G, Q)), jnp.zeros((B, K, G, Q, H)))
    m_BKGQ, l_BKGQ, o_BKGQH = jax.lax.fori_loop(0, _last_key_block(i, Q, C) + 1, key_block, init)
    # Every query sees at least itself, so l > 0.
    out_BKGQH = o_BKGQH / l_BKGQ[..., None]
    return None, (out_BKGQH.astype(q_BTNH.dtype), m_BKGQ + jnp.log(l_BKGQ))

  _, (out_iBKGQH, lse_iBKGQ) = jax.lax.scan(query_block, None, jnp.arange(T // Q))
  out_BTNH = jnp.transpose(out_iBKGQH, (1, 0, 4, 2, 3, 5)).reshape(B, T, N, H)
  lse_BKGT = jnp.transpose(lse_iBKGQ, (1, 2, 3, 0, 4)).reshape(B, K, G, T)
  return out_BTNH, lse_BKGT


def _blocked_fwd(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, Q, C):
  out_BTNH, lse_BKGT = _blocked_forward(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, Q, C)
  return out_BTNH, (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, out_BTNH, lse_BKGT)


def _blocked_bwd(Q, C, residuals, dout_BTNH):
  """dq, dk, dv in one pass over key blocks j, each visiting the query blocks i that see it; dq
  is accumulated in place across key blocks."""
  q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, out_BTNH, lse_BKGT = residuals
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  scale = 1.0 / math.sqrt(H)
  q_BTKGH = _split_heads(q_BTNH, K)
  dout_BTKGH = _split_heads(dout_BTNH, K)
  # delta_t = sum_h dout_th out_th = sum_s p_ts dp_ts: the softmax's backward term per query.
  delta_BKGT = jnp.einsum("BTKGH,BTKGH->BKGT", dout_BTKGH.astype(jnp.float32),
                          _split_heads(out_BTNH, K).astype(jnp.float32))

  def key_block(dq_BTKGH, j):
    k_BCKH = jax.lax.dynamic_slice_in_dim(k_BTKH, j * C, C, axis=1)
    v_BCKH = jax.lax.dynamic_slice_in_dim(v_BTKH, j * C, C, axis=1)

    def query_block(i, carry):
      dq_BTKGH, dk_BCKH, dv_BCKH = carry
      q_BQKGH = jax.lax.dynamic_slice_in_dim(q_BTKGH, i * Q, Q, axis=1)
      dout_BQKGH = jax.lax.dynamic_slice_in_dim(dout_BTKGH, i * Q, Q, axis=1)
      lse_BKGQ = jax.lax.dynamic_slice_in_dim(lse_BKGT, i * Q, Q, axis=3)
      delta_BKGQ = jax.lax.dynamic_slice_in_dim(delta_BKGT, i * Q, Q, axis=3)
      s_BKGQC = _block_scores(q_BQKGH, k_BCKH, _block_visible(segment_ids_BT, i, j, Q, C), scale)
      p_BKGQC = jnp.exp(s_BKGQC - lse_BKGQ[..., None])  # 0 where not visible
      dv_BCKH += jnp.einsum("BKGQC,BQKGH->BCKH", p_BKGQC.astype(dout_BQKGH.dtype), dout_BQKGH,
                            preferred_element_type=jnp.float32)
      dp_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", dout_BQKGH, v_BCKH, preferred_element_type=jnp.float32)
      ds_BKGQC = (p_BKGQC * (dp_BKGQC - delta_BKGQ[..., None]) * scale).astype(q_BQKGH.dtype)
      dk_BCKH += jnp.einsum("BKGQC,BQKGH->BCKH", ds_BKGQC, q_BQKGH, preferred_element_type=jnp.float32)
      dq_BQKGH = jnp.einsum("BKGQC,BCKH->BQKGH", ds_BKGQC, k_BCKH, preferred_element_type=jnp.float32)
      dq_BTKGH = jax.lax.dynamic_update_slice_in_dim(
          dq_BTKGH, jax.lax.dynamic_slice_in_dim(dq_BTKGH, i * Q, Q, axis=1) + dq_BQKGH, i * Q, axis=1)
      return dq_BTKGH, dk_BCKH, dv_BCKH

    zeros_BCKH = jnp.zeros((B, C, K, H), jnp.float32)
    first_query_block = (j * C) // Q  # query blocks before it end before key block j starts
    dq_BTKGH, dk_BCKH, dv_BCKH = jax.lax.fori_loop(first_query_block, T // Q, query_block,
                                                   (dq_BTKGH, zeros_BCKH, zeros_BCKH))
    return dq_BTKGH, (dk_BCKH, dv_BCKH)

  dq_BTKGH, (dk_jBCKH, dv_jBCKH) = jax.lax.scan(
      key_block, jnp.zeros((B, T, K, G, H), jnp.float32), jnp.arange(T // C))
  unblock = lambda x_jBCKH: jnp.moveaxis(x_jBCKH, 0, 1).reshape(B, T, K, H)
  return (dq_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype), unblock(dk_jBCKH).astype(k_BTKH.dtype),
          unblock(dv_jBCKH).astype(v_BTKH.dtype), None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --- splash: the Pallas TPU kernel (jax.experimental.pallas.ops.tpu.splash_attention) --------------


def splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q: int, block_kv: int, interpret: bool):
  """The "splash" kernel on one device's rows and heads: a causal mask object (its fully masked blocks
  are skipped), segment ids for the documents, K kv heads shared by the N query heads (the kernel's
  grouped-query mode). interpret=True runs the kernel's Pallas program on a CPU."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                             block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                             block_q_dq=block_q, block_kv_dq=block_kv)
  mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * N)
  kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel takes one row: q [N, T, H], k and v [K, T, H]; it does not scale the scores.
  q_BNTH = jnp.swapaxes(q_BTNH * jnp.asarray(1.0 / math.sqrt(H), q_BTNH.dtype), 1, 2)
  k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)
  segments = splash.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
  out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH, segment_ids=segments)
  return jnp.swapaxes(out_BNTH, 1, 2).astype(q_BTNH.dtype)


def _sharded(kernel_fn, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
  """kernel_fn on each device's rows (batch over data x fsdp) and heads (over tensor), through
  shard_map: a Pallas call is not partitioned by XLA. Outside a mesh, kernel_fn itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel_fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
  q_spec = sh.logical_to_mesh((sh.BATCH, sh.SEQ, sh.HEADS, sh.HEAD_DIM))
  kv_spec = sh.logical_to_mesh((sh.BATCH, sh.SEQ, sh.KV_HEADS, sh.HEAD_DIM))
  seg_spec = sh.logical_to_mesh((sh.BATCH, sh.SEQ))
  return jax.shard_map(kernel_fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


# --- cudnn: cuDNN's fused flash attention (GPU), documents in its packed layout ------------------
#
# jax's public jax.nn.dot_product_attention(implementation="cudnn") takes documents only as a dense
# [B, N, T, S] mask or as one length per row. cuDNN's packed ("THD", ragged) layout, in which a row is
# a list of segments (start and length) each attended within itself, is reached only through jax's
# private jax._src.cudnn.fused_attention_stablehlo.dot_product_attention (q_seqlen, kv_seqlen,
# q_offsets, kv_offsets; the same code in jax 0.10.2 and 0.11.0). _cudnn_module finds it, and
# cudnn_unsupported says in one line where it is missing.

# cuDNN's flash attention takes fp16 or bf16 inputs and a head dim that is a multiple of 8, at most
# 256 (on Hopper; 128 before it); its packed layout needs Hopper, compute capability 9.0 (jax's
# check_layout and check_is_flash_attention).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 256
CUDNN_MIN_COMPUTE_CAPABILITY = (9, 0)
_CUDNN_ARGS = ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type")


def _cudnn_module():
  """jax's private cuDNN attention module, or None where it lacks the packed layout's arguments."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused
  except ImportError:
    return None
  sdpa = getattr(fused, "dot_product_attention", None)
  if sdpa is None or not hasattr(fused, "MaskType"):
    return None
  if not set(_CUDNN_ARGS) <= set(inspect.signature(sdpa).parameters):
    return None
  return fused


def cudnn_unsupported(dtype: str, head_dim: int, compute_capability: str | None = None) -> str | None:
  """Why the cudnn kernel cannot compute this model, in words naming the config key; None if it can.

  Args:
    dtype: the compute dtype (model.dtype). head_dim: H (model.dim / model.n_heads).
    compute_capability: the GPU's, as jax's device reports it ("9.0"); None where unknown.
  """
  if _cudnn_module() is None:
    return (f"jax {jax.__version__} lacks cuDNN's packed attention (jax._src.cudnn.fused_attention_stablehlo."
            "dot_product_attention with q_offsets and kv_offsets, as in jax 0.10 and 0.11)")
  if dtype not in CUDNN_DTYPES:
    return f"model.dtype={dtype!r}: cuDNN's fused attention takes {' or '.join(CUDNN_DTYPES)} only"
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return (f"head dim {head_dim} (model.dim / model.n_heads): cuDNN's fused attention needs a multiple of 8, "
            f"at most {CUDNN_MAX_HEAD_DIM}")
  if compute_capability is not None:
    major_minor = tuple(int(x) for x in compute_capability.split(".")[:2])
    if major_minor < CUDNN_MIN_COMPUTE_CAPABILITY:
      return (f"the GPU's compute capability is {compute_capability}: cuDNN's packed layout (documents in "
              "a row) needs 9.0 (Hopper) or newer")
  return None


def segment_runs(segment_ids_BT, max_segments: int):
  """Each row's runs of equal segment id, in order, as cuDNN's packed layout describes them:
  (offsets_BM1, seqlens_BM, runs_B), M = max_segments.

  A run is a document (data.py packs each contiguously), a row's end padding (id 0) or attend's own
  padding (-1): every position lies in exactly one run, so cuDNN computes every output.
  offsets_BM1[b, m] is where run m of row b starts and seqlens_BM[b, m] its length, for m < runs_B[b];
  the entries after a row's last run are -1, and column M always is (jax's q_offsets [B, M + 1] and
  q_seqlen [B, M]). runs_B counts every run; the runs past the M-th of a row are left out.
  """
  B, T = segment_ids_BT.shape
  M = max_segments
  changes_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
  starts_BT = jnp.concatenate([jnp.ones((B, 1), bool), changes_BT], axis=1)
  ends_BT = jnp.concatenate([changes_BT, jnp.ones((B, 1), bool)], axis=1)
  run_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1
  runs_B = run_BT[:, -1] + 1
  rows_B1 = jnp.arange(B)[:, None]
  t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  # A run's first (last) position goes to its run's column; any other position, and the runs past
  # the M-th, to column M + 1, which is out of bounds and dropped.
  kept_BT = run_BT < M
  offsets_BM1 = jnp.full((B, M + 1), -1, jnp.int32).at[
      rows_B1, jnp.where(starts_BT & kept_BT, run_BT, M + 1)].set(t_BT, mode="drop")
  ends_BM = jnp.full((B, M), -1, jnp.int32).at[
      rows_B1, jnp.where(ends_BT & kept_BT, run_BT, M + 1)].set(t_BT + 1, mode="drop")
  seqlens_BM = jnp.where(jnp.arange(M) < runs_B[:, None], ends_BM - offsets_BM1[:, :M], -1)
  return offsets_BM1, seqlens_BM, runs_B


@functools.cache
def _kv_offsets_follow_kv_heads() -> bool:
  """Whether this jax turns kv_offsets (tokens) into element offsets with the keys' own head count K.
  jax up to 0.11.0 multiplies them by the queries' N (corrected by jax-ml/jax pull request 39521),
  which moves every segment's keys when K < N; cudnn_attention then hands cuDNN one kv head per
  query head (repeat_kv). Runs jax's own conversion (_fix_seqlen_offsets) on a two-segment row with
  K = 1, N = 2, so it is asked outside shard_map."""
  fix = getattr(_cudnn_module(), "_fix_seqlen_offsets", None)
  if fix is None:
    return False
  seqlens, offsets = np.array([[2, 2]], np.int32), np.array([[0, 2, -1]], np.int32)
  H = 8
  q, k = np.zeros((1, 4, 2, H), np.float32), np.zeros((1, 4, 1, H), np.float32)
  with jax.ensure_compile_time_eval():  # a value even when asked while tracing
    kv_offsets = jax.jit(lambda *args: fix(*args)[3])(seqlens, seqlens, offsets, offsets, q, k)
    return int(np.asarray(kv_offsets).reshape(-1)[1]) == 2 * 1 * H


def cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, max_segments: int, fallback, repeat_kv: bool):
  """The "cudnn" kernel on one device's rows and heads: each run of equal segment ids (segment_runs)
  is one segment of cuDNN's packed layout, with cuDNN's PADDING_CAUSAL mask, which is causal within
  each segment (its diagonal starts at the segment's first position). K kv heads serve the N query
  heads (cuDNN's grouped-query mode), or with repeat_kv each is repeated for its N / K query heads
  (for a jax that addresses grouped kv heads' segments wrong: _kv_offsets_follow_kv_heads).

  M = max(2, min(max_segments, T)) is static: jax allocates cuDNN's softmax statistics as
  [B * M, N, T] float32 and keeps them for the backward pass, 4 M bytes per query and head (at
  M = 64 and H = 128 as much as q itself in bfloat16). When one of the rows has more than M runs,
  `fallback(q, k, v, segment_ids)` (attend's xla kernel) computes all of them instead, through
  lax.cond: both are compiled and one runs. With M >= T every row fits and there is no fallback.

  Returns out_BTNH in q's dtype. Raises ValueError, at trace time, with cudnn_unsupported's line.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  reason = cudnn_unsupported(jnp.dtype(q_BTNH.dtype).name, H)
  if reason:
    raise ValueError(f"model.attention='cudnn': {reason}")
  fused = _cudnn_module()
  M = max(2, min(max_segments, T))  # M = 1 would be read as jax's unpacked layout
  offsets_BM1, seqlens_BM, runs_B = segment_runs(segment_ids_BT, M)

  def packed(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, offsets_BM1, seqlens_BM):
    del segment_ids_BT  # described by offsets and seqlens
    if K != N and repeat_kv:
      k_BTKH, v_BTKH = (jnp.repeat(x, N // K, axis=2) for x in (k_BTKH, v_BTKH))
    return fused.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, None, None, seqlens_BM, seqlens_BM, offsets_BM1, offsets_BM1,
        scale=1.0 / math.sqrt(H), mask_type=fused.MaskType.PADDING_CAUSAL).astype(q_BTNH.dtype)

  operands = (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, offsets_BM1, seqlens_BM)
  if M >= T:
    return packed(*operands)
  unpacked = lambda q, k, v, segment_ids, *_: fallback(q, k, v, segment_ids).astype(q.dtype)
  return jax.lax.cond(jnp.max(runs_B) <= M, packed, unpacked, *operands)
