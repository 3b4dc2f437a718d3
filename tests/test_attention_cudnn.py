"""The cudnn kernel of attention.py, as far as a CPU can check it: segment ids to cuDNN's packed
layout (offsets, lengths) against a numpy reference; the whole path with cuDNN's call replaced by an
emulation of its packed layout (jax's own offset conversion, then each segment attended causally
within itself) against the dense float64 reference of test_attention, with gradients, grouped-query
heads, rows of more documents than the layout holds, and 8 devices; the lowering for CUDA (cuDNN's
custom calls with the packed, causal mask); and the one-line refusals.

What no test here runs is cuDNN itself: its kernels, and XLA's handling of its custom call.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_test_config
from test_attention import packed_segments, reference

from llama_jax import attention as attention_lib
from llama_jax import config_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sh
from llama_jax.errors import ConfigError

fused = attention_lib._cudnn_module()
H = 16


def runs_reference(segment_ids_BT, M):
  """(offsets [B, M + 1], seqlens [B, M], runs [B]) by walking each row in Python."""
  seg = np.asarray(segment_ids_BT)
  B, T = seg.shape
  offsets, seqlens, runs = np.full((B, M + 1), -1), np.full((B, M), -1), np.zeros(B, int)
  for b in range(B):
    starts = [t for t in range(T) if t == 0 or seg[b, t] != seg[b, t - 1]]
    runs[b] = len(starts)
    for m, (start, end) in enumerate(zip(starts, starts[1:] + [T])):
      if m < M:
        offsets[b, m], seqlens[b, m] = start, end - start
  return offsets, seqlens, runs


# Rows of 8 positions: documents and end padding (id 0), one document, 8 runs (exactly M for M = 8,
# more than M for M = 2 and 4), and rows padded by attend (id -1).
ROWS = [[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4],
        [1, 2, 3, 4, 5, 6, 7, 8], [1, 1, 2, 2, 3, 3, 4, 4], [1, 1, 2, 2, 3, 3, 0, -1],
        [1, 1, 2, 2, 0, -1, -1, -1], [1, 2, 2, 2, 2, 2, -1, -1]]


@pytest.mark.parametrize("M", [2, 4, 8])
def test_segment_runs_equal_a_walk_over_each_row(M):
  offsets, seqlens, runs = jax.jit(attention_lib.segment_runs, static_argnums=1)(jnp.asarray(ROWS, jnp.int32), M)
  ref_offsets, ref_seqlens, ref_runs = runs_reference(ROWS, M)
  assert offsets.dtype == seqlens.dtype == jnp.int32  # jax's cuDNN call takes int32 only
  np.testing.assert_array_equal(offsets, ref_offsets)
  np.testing.assert_array_equal(seqlens, ref_seqlens)
  np.testing.assert_array_equal(runs, ref_runs)


def emulated_cudnn(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
                   kv_offsets=None, fp8_params=None, *, scale=1.0, mask_type=None, seed=42, dropout_rate=0.0,
                   qkv_layout="BTNH", sliding_window_length=None, use_fp8=False, return_residual=False):
  """jax's private cuDNN attention with the packed layout, emulated in float32: jax's own conversion of
  the [B, M] lengths and [B, M + 1] offsets into cuDNN's (flat, in elements: _fix_seqlen_offsets), then
  what cuDNN's documentation says of that layout: sequence i holds the seqlen[i] tokens from element
  offset[i] of the flat BTNH buffer (q: N * H elements a token, k and v: K * H), each query sees the
  keys of its own sequence at its place or before (PADDING_CAUSAL), query head n reads kv head n // G;
  a query in no sequence gets 0."""
  assert bias is None and mask is None and fp8_params is None and not use_fp8 and not return_residual
  assert mask_type == fused.MaskType.PADDING_CAUSAL and qkv_layout == "BTNH" and dropout_rate == 0.0
  assert sliding_window_length is None and query.dtype in (jnp.bfloat16, jnp.float16)
  q_seqlen, kv_seqlen, q_offsets, kv_offsets = fused._fix_seqlen_offsets(
      q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
  B, T, N, _ = query.shape
  K = key.shape[2]
  S = q_seqlen.size  # B * M sequences

  def sequence_of_token(offsets, seqlens, per_token):
    start_S = offsets.reshape(-1)[:S] // per_token
    length_S = seqlens.reshape(-1)[:S]
    p_P = jnp.arange(B * T)
    inside_SP = (p_P >= start_S[:, None]) & (p_P < (start_S + length_S)[:, None])
    seq_P = jnp.where(inside_SP.any(0), jnp.argmax(inside_SP, 0), -1)
    return seq_P, p_P - start_S[seq_P]

  seq_q, place_q = sequence_of_token(q_offsets, q_seqlen, N * H)
  seq_k, place_k = sequence_of_token(kv_offsets, kv_seqlen, K * H)
  visible_PP = (seq_q[:, None] == seq_k[None]) & (seq_q[:, None] >= 0) & (place_k[None] <= place_q[:, None])
  q = query.reshape(B * T, N, H).astype(jnp.float32)
  k, v = (jnp.repeat(x.reshape(B * T, K, H).astype(jnp.float32), N // K, axis=1) for x in (key, value))
  s_NPP = jnp.where(visible_PP, jnp.einsum("pnh,qnh->npq", q, k) * scale, -1e30)
  e_NPP = jnp.exp(s_NPP - s_NPP.max(-1, keepdims=True)) * visible_PP
  total_NP = e_NPP.sum(-1, keepdims=True)
  p_NPP = e_NPP / jnp.where(total_NP > 0, total_NP, 1.0)
  return jnp.einsum("npq,qnh->pnh", p_NPP, v).reshape(B, T, N, H).astype(query.dtype)


@pytest.fixture
def on_gpu(monkeypatch):
  """attend as on a GPU, with cuDNN's call emulated (emulated_cudnn); the kv-head probe asked afresh."""
  attention_lib._kv_offsets_follow_kv_heads.cache_clear()
  monkeypatch.setattr(attention_lib, "platform", lambda: "gpu")
  monkeypatch.setattr(fused, "dot_product_attention", emulated_cudnn)


def bf16_inputs(B, T, N, K, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shapes = ((B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H))
  return [jax.random.normal(key, shape).astype(jnp.bfloat16) for key, shape in zip(keys, shapes)]


def cudnn_vjp(max_segments):
  """jitted (q, k, v, segment_ids, dout) -> (out, (dq, dk, dv)) of attend(kernel="cudnn")."""
  def run(q, k, v, segment_ids, dout):
    attend = lambda q, k, v: attention_lib.attend(q, k, v, segment_ids, kernel="cudnn", block_q=64, block_kv=64,
                                                  max_segments=max_segments)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)
  return jax.jit(run)


def reference_of(q, k, v, segments, dout):
  """test_attention's float64 (out, (dq, dk, dv)) of the bfloat16 inputs."""
  as_f32 = lambda x: np.asarray(x, np.float32)
  return reference(as_f32(q), as_f32(k), as_f32(v), segments, as_f32(dout))


def assert_close_to_reference(out, grads, q, k, v, segments, dout):
  ref_out, ref_grads = reference_of(q, k, v, segments, dout)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2, rtol=2e-2)
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad, atol=3e-2, rtol=3e-2, err_msg=name)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_cudnn_path_equals_the_dense_reference_on_packed_rows(on_gpu, heads):
  """Row 0 packs 3 documents and a padding run, row 1 is one document. max_segments >= T: every row
  fits, attend calls cuDNN without a fallback (the 8-device test below has one)."""
  N, K = heads
  T = 40
  q, k, v, dout = bf16_inputs(2, T, N, K)
  segments = packed_segments(T)
  out, grads = cudnn_vjp(64)(q, k, v, jnp.asarray(segments), dout)
  assert_close_to_reference(out, grads, q, k, v, segments, dout)


def test_the_fallback_runs_exactly_when_a_row_has_more_runs_than_max_segments(on_gpu):
  T, (N, K) = 16, (8, 2)
  q, k, v, dout = bf16_inputs(2, T, N, K)
  sentinel = lambda q, k, v, segment_ids: jnp.full_like(q, 7.0)
  run = jax.jit(lambda q, k, v, s: attention_lib.cudnn_attention(q, k, v, s, 4, fallback=sentinel, repeat_kv=True))
  row0 = [1] * 4 + [2] * 4 + [3] * 4 + [0] * 4  # 4 runs
  four_runs = np.array([row0, [1] * 16], np.int32)
  five_runs = np.array([row0, [1] * 3 + [2] * 3 + [3] * 2 + [4] * 2 + [5] * 6], np.int32)
  out = np.asarray(run(q, k, v, jnp.asarray(four_runs)), np.float32)
  np.testing.assert_allclose(out, reference_of(q, k, v, four_runs, dout)[0], atol=2e-2, rtol=2e-2)
  np.testing.assert_array_equal(run(q, k, v, jnp.asarray(five_runs)), jnp.full_like(q, 7.0))


def test_the_kv_head_probe_says_whether_jax_addresses_grouped_kv_heads_right(on_gpu, monkeypatch):
  """Without the repeated kv heads, the packed grouped-query call is right exactly where the probe
  says jax's offsets follow the kv heads (jax 0.10.2 and 0.11.0: they do not)."""
  follows = attention_lib._kv_offsets_follow_kv_heads()
  monkeypatch.setattr(attention_lib, "_kv_offsets_follow_kv_heads", lambda: True)  # never repeat
  T, (N, K) = 40, (8, 2)
  q, k, v, dout = bf16_inputs(2, T, N, K)
  segments = packed_segments(T)
  out = jax.jit(lambda q, k, v, s: attention_lib.attend(q, k, v, s, kernel="cudnn"))(q, k, v, jnp.asarray(segments))
  ref_out, _ = reference_of(q, k, v, segments, dout)
  assert np.allclose(np.asarray(out, np.float32), ref_out, atol=2e-2, rtol=2e-2) == follows


def test_cudnn_path_on_8_devices_equals_the_reference(on_gpu):
  """Rows over fsdp (4), heads over tensor (2), through attend's shard_map, with max_segments = 4:
  three devices' rows fit (cuDNN inside lax.cond), the fourth's row has 8 documents (the xla kernel).
  Forward only, to stay cheap: the gradients' path on 8 devices is lowered below."""
  mesh = sh.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)), jax.devices())
  T, (N, K) = 40, (8, 2)
  q, k, v, dout = bf16_inputs(4, T, N, K)
  many = np.repeat(np.arange(1, 9, dtype=np.int32), T // 8)[None]
  segments = np.concatenate([packed_segments(T), packed_segments(T)[::-1][:1], many])
  attend = jax.jit(lambda q, k, v, s: attention_lib.attend(q, k, v, s, kernel="cudnn", block_q=64, block_kv=64,
                                                           max_segments=4))
  with jax.set_mesh(mesh):
    put = lambda x, names: jax.device_put(x, sh.named(mesh, names))
    q_heads, kv_heads = (sh.BATCH, sh.SEQ, sh.HEADS, sh.HEAD_DIM), (sh.BATCH, sh.SEQ, sh.KV_HEADS, sh.HEAD_DIM)
    out = attend(put(q, q_heads), put(k, kv_heads), put(v, kv_heads), put(jnp.asarray(segments), (sh.BATCH, sh.SEQ)))
  assert out.addressable_shards[0].data.shape == (1, T, N // 2, H)
  ref_out, _ = reference_of(q, k, v, segments, dout)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2, rtol=2e-2)


def lowered_for_cuda(monkeypatch, T, max_segments, mesh=None):
  """The StableHLO text of attend(kernel="cudnn")'s forward and backward on 4 rows, 8 query and 2 kv
  heads, lowered for CUDA on this CPU: jax's real cuDNN call, with its two questions to a GPU (cuDNN's
  version, the compute capability) answered as on a Hopper GPU with cuDNN 9.10."""
  monkeypatch.setattr(attention_lib, "platform", lambda: "gpu")
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
  attention_lib._kv_offsets_follow_kv_heads.cache_clear()  # asked afresh, in this trace
  B, N, K = 4, 8, 2
  q_heads, kv_heads = (sh.BATCH, sh.SEQ, sh.HEADS, sh.HEAD_DIM), (sh.BATCH, sh.SEQ, sh.KV_HEADS, sh.HEAD_DIM)
  arg = lambda shape, names, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sh.named(mesh, names) if mesh else None)
  args = (arg((B, T, N, H), q_heads), arg((B, T, K, H), kv_heads), arg((B, T, K, H), kv_heads),
          arg((B, T), (sh.BATCH, sh.SEQ), jnp.int32), arg((B, T, N, H), q_heads))
  if mesh is None:
    return cudnn_vjp(max_segments).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  with jax.set_mesh(mesh):
    return cudnn_vjp(max_segments).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_lowers_for_cuda_on_8_devices_to_cudnn_calls_with_the_packed_causal_layout(monkeypatch):
  mesh = sh.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)), jax.devices())
  text = lowered_for_cuda(monkeypatch, T=40, max_segments=8, mesh=mesh)
  calls = [line for line in text.splitlines() if "stablehlo.custom_call @__cudnn$fmha" in line]
  assert [c.split("@")[1].split("(")[0] for c in calls] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
  for call in calls:
    assert '\\22mask_type\\22: \\22PADDING_CAUSAL\\22' in call
    assert '\\22max_seg_per_batch\\22: 8' in call
    # One device's share: 1 row, 4 query heads, the kv heads repeated to 4 on a jax that needs it
    # (repeat_kv), lengths [1, M] and offsets [1, M + 1] as operands; the statistics [M, 4, T].
    kv = 4 if not attention_lib._kv_offsets_follow_kv_heads() else 1
    assert f"tensor<1x40x4x16xbf16>, tensor<1x40x{kv}x16xbf16>" in call
    assert "tensor<1x8xi32>, tensor<1x8xi32>, tensor<1x9xi32>, tensor<1x9xi32>" in call
    assert "tensor<8x4x40xf32>" in call
  assert "sdy.manual_computation" in text  # attend's shard_map
  assert "stablehlo.case" in text or "stablehlo.if" in text  # the xla kernel for rows of more documents


def test_lowers_on_one_device_without_a_fallback_where_every_row_fits(monkeypatch):
  text = lowered_for_cuda(monkeypatch, T=6, max_segments=64)
  assert '\\22max_seg_per_batch\\22: 6' in text and "tensor<4x6xi32>" in text
  assert "stablehlo.case" not in text and "stablehlo.if" not in text


def first_line_of(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_cudnn_off_gpu_is_refused_in_one_line():
  q = jnp.zeros((1, 8, 4, H), jnp.bfloat16)
  k = jnp.zeros((1, 8, 2, H), jnp.bfloat16)
  with pytest.raises(ValueError) as e:
    attention_lib.attend(q, k, k, jnp.ones((1, 8), jnp.int32), kernel="cudnn")
  assert "model.attention='cudnn' runs on GPU only, not on 'cpu'" in first_line_of(e)


def test_cudnn_refuses_float32_in_one_line_at_trace_time(on_gpu):
  q = jnp.zeros((1, 8, 4, H), jnp.float32)
  k = jnp.zeros((1, 8, 2, H), jnp.float32)
  with pytest.raises(ValueError) as e:
    jax.jit(lambda q, k: attention_lib.attend(q, k, k, jnp.ones((1, 8), jnp.int32), kernel="cudnn")).trace(q, k)
  assert "model.dtype='float32'" in first_line_of(e)


def llama(**fields):
  return model_lib.LlamaConfig(**{**dict(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffw_dim=64,
                                         dtype="bfloat16", attention="cudnn"), **fields})


class FakeDevice:
  def __init__(self, platform, compute_capability=None):
    self.platform = platform
    if compute_capability:
      self.compute_capability = compute_capability


REFUSALS = {
    "float32": (dict(dtype="float32"), None, "config.model.attention='cudnn': model.dtype='float32'"),
    "head-dim-not-a-multiple-of-8": (dict(dim=40), None, "config.model.attention='cudnn': head dim 10"),
    "head-dim-over-256": (dict(dim=2048), None, "config.model.attention='cudnn': head dim 512"),
    "cpu": ({}, jax.devices(), "config.model.attention='cudnn' runs on GPU only, but the devices are 'cpu'"),
    "before-hopper": ({}, [FakeDevice("gpu", "8.0")], "compute capability is 8.0"),
}


@pytest.mark.parametrize("fields,devices,expected", REFUSALS.values(), ids=REFUSALS.keys())
def test_config_check_refuses_what_cudnn_cannot_run_in_one_line(fields, devices, expected):
  with pytest.raises(ConfigError) as e:
    config_lib.check_attention(llama(**fields), devices)
  assert expected in first_line_of(e)


def test_check_config_refuses_cudnn_for_a_float32_model_before_anything_compiles():
  with pytest.raises(ConfigError) as e:
    config_lib.check_config(tiny_test_config(**{"model.attention": "cudnn"}), tokenizer=False)  # tiny: float32
  assert first_line_of(e).startswith("config.model.attention='cudnn': model.dtype='float32'")


@pytest.mark.parametrize("dtype,dim,capability,expected", [
    ("bfloat16", 512, "9.0", "cudnn"), ("float16", 512, None, "cudnn"),  # head dim 128
    ("float32", 512, "9.0", "xla"), ("bfloat16", 40, "9.0", "xla"), ("bfloat16", 512, "8.0", "xla")])
def test_auto_on_a_gpu_is_cudnn_where_it_can_compute_the_model_else_xla(dtype, dim, capability, expected):
  assert attention_lib.resolve("auto", "gpu", dtype, dim // 4, capability) == expected
  config_lib.check_attention(llama(attention="auto", dtype=dtype, dim=dim), [FakeDevice("gpu", capability)])


def test_config_check_passes_what_cudnn_runs():
  config_lib.check_attention(llama(), [FakeDevice("gpu", "9.0")])
  config_lib.check_attention(llama(attention="auto", dtype="float32"), jax.devices())  # xla on CPU
  config_lib.check_attention(llama(dim=128 * 4), None)  # head dim 128


def test_a_jax_without_the_packed_api_is_refused_in_one_line(monkeypatch):
  monkeypatch.setattr(fused, "dot_product_attention", lambda query, key, value, bias=None, mask=None: None)
  with pytest.raises(ConfigError) as e:
    config_lib.check_attention(llama(), None)
  assert f"jax {jax.__version__} lacks cuDNN's packed attention" in first_line_of(e)
