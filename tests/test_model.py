"""The Llama module: shapes, causality, RoPE and GQA against direct references, layer loops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import model as model_lib

SMALL = model_lib.LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw_dim=48,
                              max_seq_len=64)


def _tokens(B=2, T=11, V=97, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_output_shape_and_dtype():
  model = model_lib.init_model(SMALL, 0)
  logits_BTV = model(_tokens(B=3, T=7))
  assert logits_BTV.shape == (3, 7, 97)
  assert logits_BTV.dtype == jnp.float32


def test_changing_a_future_token_never_changes_earlier_logits():
  model = model_lib.init_model(SMALL, 0)
  tokens = _tokens(B=1, T=12)
  base = model(tokens)
  for t in (3, 7, 11):
    changed = model(tokens.at[0, t].set((tokens[0, t] + 1) % 97))
    np.testing.assert_array_equal(np.asarray(base[:, :t]), np.asarray(changed[:, :t]))
    assert not np.allclose(base[:, t:], changed[:, t:])


@pytest.mark.parametrize("blocks", [512, 2])  # one block of all 10 positions; 5 x 5 blocks of 2
def test_documents_do_not_see_each_other(blocks):
  config = dataclasses.replace(SMALL, attention="xla", attention_block_q=blocks, attention_block_kv=blocks)
  model = model_lib.init_model(config, 0)
  tokens = _tokens(B=1, T=10)
  segments = jnp.array([[0] * 4 + [1] * 6])
  positions = jnp.array([list(range(4)) + list(range(6))])
  packed = model(tokens, positions, segments)
  second_alone = model(tokens[:, 4:])
  np.testing.assert_allclose(packed[:, 4:], second_alone, atol=1e-5)


def _complex_rope(x_BTNH, positions, inv_freq):
  """RoPE as a complex rotation of the pairs (x[i], x[i + H/2])."""
  half = x_BTNH.shape[-1] // 2
  z = x_BTNH[..., :half] + 1j * x_BTNH[..., half:]
  z = z * np.exp(1j * positions[:, :, None, None] * inv_freq[None, None, None, :])
  return np.concatenate([z.real, z.imag], axis=-1)


def _hf_inv_freq(head_dim, theta, scaling=None):
  """RoPE inverse frequencies as transformers computes them (its Llama-3.1 rule for `scaling`)."""
  from transformers import LlamaConfig as HFConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  if scaling is None:  # the published formula
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  params = {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len}
  hf = HFConfig(hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1, rope_parameters=params)
  return ROPE_INIT_FUNCTIONS["llama3"](hf)[0].double().numpy()


@pytest.mark.parametrize("scaling", [None, model_lib.RopeScaling(factor=8.0, original_max_seq_len=64),
                                     model_lib.RopeScaling(factor=32.0, original_max_seq_len=8192)])
def test_rope_matches_complex_rotation_at_transformers_frequencies(scaling):
  config = dataclasses.replace(SMALL, rope_scaling=scaling, rope_theta=500000.0)
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 9, 3, 8)), np.float64)
  positions = np.stack([np.arange(9), np.arange(100, 109)])
  inv_freq = _hf_inv_freq(config.head_dim, config.rope_theta, scaling)  # independent of the code under test
  np.testing.assert_allclose(model_lib.rope_frequencies(config), inv_freq, rtol=1e-6)
  ours = model_lib.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions),
                              model_lib.rope_frequencies(config))
  np.testing.assert_allclose(ours, _complex_rope(x, positions, inv_freq), atol=2e-4)


def test_llama31_frequencies_at_a_full_head_equal_transformers():
  scaling = model_lib.RopeScaling(factor=8.0, original_max_seq_len=8192)
  config = dataclasses.replace(SMALL, dim=128, n_heads=1, n_kv_heads=1, rope_theta=500000.0, rope_scaling=scaling)
  np.testing.assert_allclose(model_lib.rope_frequencies(config), _hf_inv_freq(128, 500000.0, scaling), rtol=1e-6)


def test_llama31_scaling_keeps_high_and_divides_low_frequencies():
  config = dataclasses.replace(SMALL, dim=128, n_heads=1, n_kv_heads=1, rope_theta=500000.0,
                               rope_scaling=model_lib.RopeScaling(factor=8.0, original_max_seq_len=8192))
  plain = np.asarray(model_lib.rope_frequencies(dataclasses.replace(config, rope_scaling=None)))
  scaled = np.asarray(model_lib.rope_frequencies(config))
  wavelen = 2 * np.pi / plain
  np.testing.assert_allclose(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
  np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)
  middle = (wavelen >= 8192 / 4) & (wavelen <= 8192)
  assert np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8))


def _reference_attention(attn, config, x_BTD):
  """Multi-head attention with each kv head repeated for its G query heads, in float64 numpy."""
  p = {k: np.asarray(v[...], np.float64) for k, v in
       dict(wq=attn.wq_DNH, wk=attn.wk_DKH, wv=attn.wv_DKH, wo=attn.wo_NHD).items()}
  x = np.asarray(x_BTD, np.float64)
  B, T, _ = x.shape
  G = config.n_heads // config.n_kv_heads
  positions = np.broadcast_to(np.arange(T), (B, T))
  inv_freq = np.asarray(model_lib.rope_frequencies(config), np.float64)
  q = _complex_rope(np.einsum("btd,dnh->btnh", x, p["wq"]), positions, inv_freq)
  k = _complex_rope(np.einsum("btd,dkh->btkh", x, p["wk"]), positions, inv_freq)
  v = np.einsum("btd,dkh->btkh", x, p["wv"])
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(config.head_dim)
  scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", probs, v)
  return np.einsum("btnh,nhd->btd", out, p["wo"])


@pytest.mark.parametrize("blocks", [512, 4])  # one block of all 8 positions; 2 x 2 blocks of 4
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_repeated_heads(n_kv_heads, blocks):
  config = dataclasses.replace(SMALL, n_kv_heads=n_kv_heads, attention="xla", attention_block_q=blocks,
                               attention_block_kv=blocks)
  attn = model_lib.Attention(config, nnx.Rngs(params=3))
  x_BTD = jax.random.normal(jax.random.key(2), (2, 8, 32))
  T = x_BTD.shape[1]
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  out_BTD, _ = attn(x_BTD, positions, jnp.zeros((2, T), jnp.int32))  # (output, cache): no cache here
  np.testing.assert_allclose(out_BTD, _reference_attention(attn, config, x_BTD),
                             atol=1e-5)


def _logits(config, params, tokens):
  graphdef, _ = nnx.split(model_lib.abstract_model(config))
  return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)


@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "full"), (False, "save_dots"),
                                               (True, "save_block_inputs"), (True, "save_attn_out")])
def test_layer_loop_and_remat_do_not_change_outputs_or_grads(scan_layers, remat):
  params = nnx.to_pure_dict(nnx.state(model_lib.init_model(SMALL, 0), nnx.Param))
  tokens = _tokens()
  other = dataclasses.replace(SMALL, scan_layers=scan_layers, remat=remat)

  def loss_and_grads(config):
    graphdef, _ = nnx.split(model_lib.abstract_model(config))
    f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(SMALL), loss_and_grads(other)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_a, grads_b)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_recomputes_the_forward_pass(scan_layers):
  """The compiled gradient does more FLOPs with remat (the forward runs again in the backward)."""
  params = nnx.to_pure_dict(nnx.state(model_lib.init_model(SMALL, 0), nnx.Param))
  tokens = _tokens()

  def flops(remat):
    graphdef, _ = nnx.split(model_lib.abstract_model(dataclasses.replace(SMALL, scan_layers=scan_layers, remat=remat)))
    grad = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2))
    return jax.jit(grad).lower(params).compile().cost_analysis()["flops"]

  none, dots, full = flops("none"), flops("save_dots"), flops("full")
  assert full > 1.1 * none
  assert none < dots < full


def test_tied_embeddings_have_no_lm_head_and_share_the_embedding():
  config = dataclasses.replace(SMALL, tie_embeddings=True)
  model = model_lib.init_model(config, 0)
  assert not hasattr(model, "lm_head_DV")
  assert model_lib.count_params(config) == model_lib.count_params(SMALL) - 97 * 32


def test_param_count_does_not_depend_on_sequence_length():
  assert model_lib.count_params(SMALL) == model_lib.count_params(dataclasses.replace(SMALL, max_seq_len=4096))


def test_params_carry_logical_axis_names():
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model_lib.abstract_model(SMALL), nnx.Param)))
  assert tuple(specs["embed_VD"]) == ("vocab", "embed")
  assert tuple(specs["blocks"]["attn"]["wq_DNH"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(specs["blocks"]["attn"]["wk_DKH"]) == ("layers", "embed", "kv_heads", "head_dim")
  assert tuple(specs["blocks"]["mlp"]["w_down_FD"]) == ("layers", "mlp", "embed")


def test_demo_config_is_the_tiny_preset():
  from configs import tiny
  from llama_jax import config_lib
  demo = config_lib.llama_config(tiny.get_config().model)
  # The demo unrolls its 4 layers and takes attention blocks of 256 (each faster on a CPU); the preset
  # keeps the defaults of these compute fields.
  assert not demo.scan_layers and demo.attention_block_q == demo.attention_block_kv == 256
  preset = model_lib.PRESETS["tiny"]
  assert dataclasses.replace(demo, scan_layers=True, attention_block_q=preset.attention_block_q,
                             attention_block_kv=preset.attention_block_kv) == preset
