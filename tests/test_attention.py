"""The attention kernels of attention.py against a dense float64 reference on packed rows (outputs and
gradients), documents that never see each other, and the splash kernel on 8 devices equal to one."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llama_jax import attention as attention_lib
from llama_jax import sharding as sh

H = 16
HEADS = {"gqa": (8, 2), "mha": (4, 4)}  # (N, K): G = 4 query heads per kv head, and G = 1


def packed_segments(T):
  """[2, T] int32 segment ids: row 0 packs documents 1, 2, 3 of uneven lengths (with blocks shorter
  than the row, one of them spans a block edge) and ends in a padding run of id 0, as data.py pads;
  row 1 is one document."""
  edges = [0, 3 * T // 10, T // 2 + 1, 17 * T // 20, T]
  row0 = np.zeros(T, np.int32)
  for doc, (start, end) in enumerate(zip(edges[:-2], edges[1:-1]), start=1):
    row0[start:end] = doc
  return np.stack([row0, np.full(T, 5, np.int32)])


def reference(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, dout_BTNH):
  """(out, (dq, dk, dv)) of softmax attention in float64 numpy: a dense [B, T, S] mask (causal and
  same segment), each kv head repeated for its G query heads; the gradients are the vector-Jacobian
  product with the cotangent dout, by the chain rule through out = p v, p = softmax(s), s = q k / sqrt(H)."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q_BTNH, k_BTKH, v_BTKH, dout_BTNH))
  B, T, N, _ = q.shape
  K = k.shape[2]
  G = N // K
  seg = np.asarray(segment_ids_BT)
  mask_BTS = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # query head n reads kv head n // G
  scale = 1 / np.sqrt(q.shape[-1])
  s = np.where(mask_BTS[:, None], np.einsum("btnh,bsnh->bnts", q, k_rep) * scale, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", p, v_rep)
  dp = np.einsum("btnh,bsnh->bnts", dout, v_rep)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))  # softmax's Jacobian: diag(p) - p p^T
  dq = np.einsum("bnts,bsnh->btnh", ds, k_rep) * scale
  fold = lambda x_BTNH: x_BTNH.reshape(B, T, K, G, -1).sum(3)  # the G query heads' share of a kv head
  dk = fold(np.einsum("bnts,btnh->bsnh", ds, q) * scale)
  dv = fold(np.einsum("bnts,btnh->bsnh", p, dout))
  return out, (dq, dk, dv)


def inputs(B, T, N, K, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, T, K, H)),
          jax.random.normal(keys[2], (B, T, K, H)), jax.random.normal(keys[3], (B, T, N, H)))


def kernel_vjp(kernel, block_q, block_kv):
  """jitted (q, k, v, segment_ids, dout) -> (out, (dq, dk, dv)) of attention.attend."""
  def run(q, k, v, segment_ids, dout):
    attend = lambda q, k, v: attention_lib.attend(q, k, v, segment_ids, kernel=kernel, block_q=block_q,
                                                  block_kv=block_kv)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)
  return jax.jit(run)


def test_the_reference_gradients_are_finite_differences_of_the_reference():
  rng = np.random.default_rng(0)
  q, k, v, dout = (rng.normal(size=(1, 6, n, 3)) for n in (4, 2, 2, 4))
  segments = np.array([[1, 1, 1, 2, 2, 0]])
  loss = lambda q, k, v: np.sum(reference(q, k, v, segments, dout)[0] * dout)
  _, grads = reference(q, k, v, segments, dout)
  eps = 1e-6
  for i, (x, grad) in enumerate(zip((q, k, v), grads)):
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      plus, minus = [a.copy() for a in (q, k, v)], [a.copy() for a in (q, k, v)]
      plus[i][idx] += eps
      minus[i][idx] -= eps
      numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
    assert np.abs(grad).max() > 0.1
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


# (kernel, T, block_q, block_kv, heads): blocks smaller than T, unequal either way, a T no block divides
# (padded at the row's end), one block of the whole row; splash's blocks are multiples of 128. The xla
# and splash GQA cases on T = 50 and 200 have the shapes of the document test below, whose programs then
# come from the session's compilation cache (conftest.py).
CASES = [("xla", 48, 16, 8, "gqa"), ("xla", 40, 8, 16, "mha"), ("xla", 50, 16, 12, "gqa"), ("xla", 50, 512, 512, "mha"),
         ("splash", 200, 128, 128, "gqa"), ("splash", 256, 128, 128, "mha")]


@pytest.mark.parametrize("kernel,T,block_q,block_kv,heads", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_kernel_equals_the_dense_reference_on_packed_rows(kernel, T, block_q, block_kv, heads):
  N, K = HEADS[heads]
  q, k, v, dout = inputs(2, T, N, K)
  segments = packed_segments(T)
  out, grads = kernel_vjp(kernel, block_q, block_kv)(q, k, v, jnp.asarray(segments), dout)
  ref_out, ref_grads = reference(q, k, v, segments, dout)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("kernel,T,block_q,block_kv", [("xla", 50, 16, 12), ("splash", 200, 128, 128)])
def test_changing_one_document_leaves_the_others_bit_identical(kernel, T, block_q, block_kv):
  N, K = HEADS["gqa"]
  q, k, v, dout = inputs(2, T, N, K)
  segments = packed_segments(T)
  doc2_BT = np.zeros((2, T), bool)
  doc2_BT[0] = segments[0] == 2  # the middle document of the packed row: others before and after it
  new_q, new_k, new_v, _ = inputs(2, T, N, K, seed=1)
  where = jnp.asarray(doc2_BT)[:, :, None, None]
  changed = [jnp.where(where, new, old) for new, old in ((new_q, q), (new_k, k), (new_v, v))]
  run = kernel_vjp(kernel, block_q, block_kv)
  out, grads = run(q, k, v, jnp.asarray(segments), dout)
  out_changed, grads_changed = run(*changed, jnp.asarray(segments), dout)
  others = ~doc2_BT
  assert not np.allclose(out[doc2_BT], out_changed[doc2_BT])  # the change reached document 2
  np.testing.assert_array_equal(np.asarray(out)[others], np.asarray(out_changed)[others])
  for name, grad, grad_changed in zip(("dq", "dk", "dv"), grads, grads_changed):
    np.testing.assert_array_equal(np.asarray(grad)[others], np.asarray(grad_changed)[others], err_msg=name)


def test_splash_on_8_devices_equals_one_device():
  assert len(jax.devices()) == 8  # conftest's fake CPU devices
  mesh = sh.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)), jax.devices())
  N, K = HEADS["gqa"]
  T = 100  # padded to one block of 128
  q, k, v, dout = inputs(4, T, N, K)
  segments = jnp.asarray(np.concatenate([packed_segments(T), packed_segments(T)[::-1]]))
  run = kernel_vjp("splash", 128, 128)
  one_out, one_grads = run(q, k, v, segments, dout)
  with jax.set_mesh(mesh):
    # Rows over fsdp (4 of them), heads over tensor (8 query and 2 kv heads in 2 shards).
    put = lambda x, names: jax.device_put(x, sh.named(mesh, names))
    q_heads, kv_heads = (sh.BATCH, sh.SEQ, sh.HEADS, sh.HEAD_DIM), (sh.BATCH, sh.SEQ, sh.KV_HEADS, sh.HEAD_DIM)
    out, grads = run(put(q, q_heads), put(k, kv_heads), put(v, kv_heads), put(segments, (sh.BATCH, sh.SEQ)),
                     put(dout, q_heads))
  assert len(out.sharding.device_set) == 8 and out.addressable_shards[0].data.shape == (1, T, N // 2, H)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(one_out))
  for name, grad, one_grad in zip(("dq", "dk", "dv"), grads, one_grads):
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(one_grad), err_msg=name)
  ref_out, _ = reference(q, k, v, segments, dout)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
