"""HF interop: presets vs transformers' param counts, logits parity with LlamaForCausalLM,
bit-exact round trips through safetensors, and clear errors on bad checkpoints."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_torch = pytest.importorskip("safetensors.torch")

from flax import nnx  # noqa: E402

from llama_jax import convert  # noqa: E402
from llama_jax import model as model_lib  # noqa: E402
from llama_jax.model import PRESETS, LlamaConfig, RopeScaling  # noqa: E402

SEQ_LEN = 13  # odd on purpose
LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_seq_len=8192)


def tiny(**kw) -> LlamaConfig:
  # theta 500k makes head dim 16's wavelengths (6 ... 6e5) span all three bands of the
  # Llama-3.1 scaling (< 2048 kept, 2048-8192 blended, > 8192 slowed).
  base = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffw_dim=160,
              norm_eps=1e-5, rope_theta=500000.0, max_seq_len=256)
  return LlamaConfig(**{**base, **kw})


CASES = {
    "mha": tiny(),
    "gqa": tiny(n_kv_heads=2),
    "mqa": tiny(n_kv_heads=1),
    "llama3.1_rope": tiny(n_kv_heads=2, rope_scaling=LLAMA31_ROPE, max_seq_len=131072),
    "tied": tiny(n_kv_heads=2, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-6),
}


def hf_model(config: LlamaConfig, seed: int = 0, dtype=torch.float32):
  """A randomly initialised LlamaForCausalLM, with weights large enough that mistakes show."""
  torch.manual_seed(seed)
  hf_config = transformers.LlamaConfig.from_dict(convert.config_to_hf(config))
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))  # not all ones, so a swapped norm shows
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return model.to(dtype)


def save_hf(model, path) -> str:
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


def tokens(config, batch=2, seq_len=SEQ_LEN, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len))


def hf_logits(model, toks, positions=None):
  kw = {} if positions is None else {"position_ids": torch.from_numpy(positions)}
  with torch.no_grad():
    return model(torch.from_numpy(toks), **kw).logits.float().numpy()


def read_safetensors(hf_dir) -> dict:
  out = {}
  for name in sorted(os.listdir(hf_dir)):
    if name.endswith(".safetensors"):
      out.update(st_torch.load_file(os.path.join(hf_dir, name)))
  return out


def assert_tensors_identical(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
    # Compare bits, not values: -0.0 vs 0.0 or a changed NaN would count.
    bits = {2: torch.int16, 4: torch.int32}[a[name].element_size()]
    assert torch.equal(a[name].view(bits), b[name].view(bits)), name


def assert_params_identical(a: dict, b: dict):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_transformers(name):
  config = PRESETS[name]
  hf_config = transformers.LlamaConfig.from_dict(convert.config_to_hf(config))
  with torch.device("meta"):  # shapes only, nothing allocated
    model = transformers.LlamaForCausalLM(hf_config)
  assert model_lib.count_params(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_config_round_trips(name):
  config = PRESETS[name]
  hf = json.loads(json.dumps(convert.config_to_hf(config)))  # as written to config.json
  assert convert.config_from_hf(hf) == config


def test_presets_published_dims():
  p = PRESETS
  assert model_lib.count_params(p["llama2-7b"]) == 6_738_415_616
  assert model_lib.count_params(p["llama3-8b"]) == 8_030_261_248
  assert model_lib.count_params(p["llama3.1-405b"]) == 405_853_388_800
  assert model_lib.count_params(p["llama3.2-1b"]) == 1_235_814_400
  assert p["llama3.2-3b"].tie_embeddings and p["llama3.2-3b"].rope_scaling.factor == 32.0
  assert p["llama3.1-70b"].rope_scaling == LLAMA31_ROPE
  assert p["llama1-7b"].norm_eps == 1e-6 and p["llama1-65b"].norm_eps == 1e-5
  defaults = LlamaConfig(vocab_size=1, dim=2, n_layers=1, n_heads=1, n_kv_heads=1, ffw_dim=1)
  for name, config in p.items():
    for field in ("dtype", "param_dtype", "scan_layers", "remat", "init_std"):
      assert getattr(config, field) == getattr(defaults, field), (name, field)


# ---------------------------------------------------------------------------- config.json

# The config.json files Meta published on the HF hub (transformers 4 spelling).
HUB_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000}
HUB_LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}


def test_hub_configs_are_presets():
  assert convert.config_from_hf(HUB_LLAMA2_7B) == PRESETS["llama2-7b"]
  assert convert.config_from_hf(HUB_LLAMA32_1B) == PRESETS["llama3.2-1b"]
  hf_31_8b = {**HUB_LLAMA32_1B, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "head_dim": 128, "tie_word_embeddings": False,
              "rope_scaling": {**HUB_LLAMA32_1B["rope_scaling"], "factor": 8.0}}
  assert convert.config_from_hf(hf_31_8b) == PRESETS["llama3.1-8b"]



def test_config_matches_what_transformers_reads():
  config = CASES["llama3.1_rope"]
  hf = transformers.LlamaConfig.from_dict(convert.config_to_hf(config))
  assert hf.rope_parameters["rope_type"] == "llama3"
  assert hf.rope_parameters["rope_theta"] == config.rope_theta
  assert hf.rope_parameters["factor"] == 8.0
  assert hf.rope_parameters["original_max_position_embeddings"] == 8192
  assert hf.head_dim == 16 and hf.num_key_value_heads == 2


def test_config_from_transformers_4_and_5_spellings():
  v5 = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)).to_dict()
  assert "rope_parameters" in v5
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  v4["rope_theta"] = 500000.0
  v4["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  expected = tiny(n_kv_heads=2, rope_scaling=LLAMA31_ROPE, max_seq_len=131072, norm_eps=1e-6)
  assert convert.config_from_hf(v5) == expected
  assert convert.config_from_hf(v4) == expected
  # Llama-2 style: no rope fields at all.
  plain = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
  assert convert.config_from_hf(plain) == dataclasses.replace(expected, rope_theta=10000.0,
                                                             rope_scaling=None)


# ---------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, scan_layers, tmp_path):
  check_logits_match_transformers(CASES[case], tmp_path, SEQ_LEN, scan_layers=scan_layers)


def test_logits_match_transformers_with_the_splash_kernel(tmp_path):
  """The splash kernel (Pallas interpret mode off TPU) in blocks of 128 on rows of 200 positions,
  which it pads to 256: two query blocks, two key blocks. Positions from 0 only: from 5000 the
  float32 RoPE angles alone differ from transformers' by ~1e-4 in the logits at this length, on
  every kernel."""
  check_logits_match_transformers(CASES["gqa"], tmp_path, 200, far=False, attention="splash",
                                  attention_block_q=128, attention_block_kv=128)


def check_logits_match_transformers(config, tmp_path, seq_len, far=True, **overrides):
  """Our logits equal LlamaForCausalLM's at positions from 0 (and, if `far`, from 5000), computed as
  `overrides` (compute fields of the config) say."""
  hf = hf_model(config)
  hf_dir = save_hf(hf, tmp_path / "hf")
  model = convert.from_hf_model(hf_dir, **overrides)
  assert model.config == dataclasses.replace(config, **overrides)
  toks = tokens(config, seq_len=seq_len)
  ours = np.asarray(model(toks))
  theirs = hf_logits(hf, toks)
  assert ours.shape == theirs.shape == (2, seq_len, config.vocab_size)
  assert np.abs(theirs).max() > 1.0  # the comparison is not between near-zero logits
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)
  if not far:
    return
  # Far positions, where RoPE (and the Llama-3.1 scaling of long wavelengths) matters most.
  positions = np.broadcast_to(np.arange(seq_len) + 5000, toks.shape).copy()
  ours = np.asarray(model(toks, positions_BT=positions))
  np.testing.assert_array_less(np.abs(ours - hf_logits(hf, toks, positions)).max(), 1e-4)


def test_exported_model_loads_in_transformers(tmp_path):
  """ours -> sharded safetensors -> LlamaForCausalLM.from_pretrained gives our logits."""
  config = CASES["llama3.1_rope"]
  model = model_lib.init_model(dataclasses.replace(config, init_std=0.3), seed=1)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  written = convert.to_hf(config, params, str(tmp_path), max_shard_bytes=64 * 1024,
                          bos_token_id=0, eos_token_id=1)
  assert convert.INDEX_FILE in written and sum(w.endswith(".safetensors") for w in written) > 2
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert hf.config.eos_token_id == 1
  toks = tokens(config)
  np.testing.assert_array_less(np.abs(np.asarray(model(toks)) - hf_logits(hf, toks)).max(), 1e-4)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", ["gqa", "tied"])
def test_hf_ours_hf_is_bit_exact(case, dtype, tmp_path):
  config = CASES[case]
  src = save_hf(hf_model(config, dtype=getattr(torch, dtype)), tmp_path / "src")
  loaded_config, params = convert.from_hf(src)  # float32 params
  assert jax.tree.leaves(params)[0].dtype == np.float32
  convert.to_hf(loaded_config, params, str(tmp_path / "dst"), dtype=dtype, max_shard_bytes=32 * 1024)
  assert_tensors_identical(read_safetensors(src), read_safetensors(tmp_path / "dst"))


def test_hf_ours_hf_in_bfloat16_params(tmp_path):
  """With param_dtype=bfloat16 no float32 copy is made; dtype=None keeps it."""
  config = CASES["mqa"]
  src = save_hf(hf_model(config, dtype=torch.bfloat16), tmp_path / "src")
  loaded_config, params = convert.from_hf(src, param_dtype="bfloat16", dtype="bfloat16")
  assert {str(p.dtype) for p in jax.tree.leaves(params)} == {"bfloat16"}
  convert.to_hf(loaded_config, params, str(tmp_path / "dst"))
  assert json.load(open(tmp_path / "dst" / "config.json"))["dtype"] == "bfloat16"
  assert_tensors_identical(read_safetensors(src), read_safetensors(tmp_path / "dst"))


@pytest.mark.parametrize("case", ["gqa", "tied", "llama3.1_rope"])
def test_ours_hf_ours_is_bit_exact(case, tmp_path):
  config = CASES[case]
  params = nnx.to_pure_dict(nnx.state(model_lib.init_model(config, seed=3), nnx.Param))
  convert.to_hf(config, params, str(tmp_path), max_shard_bytes=48 * 1024)
  config2, params2 = convert.from_hf(str(tmp_path))
  assert config2 == config
  assert_params_identical(params, params2)


def test_hf_tied_checkpoint_with_lm_head_copy_loads(tmp_path):
  """Some tied checkpoints still store lm_head.weight; it is accepted and ignored."""
  config = CASES["tied"]
  src = save_hf(hf_model(config), tmp_path)
  file = os.path.join(src, "model.safetensors")
  tensors = st_torch.load_file(file)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
  st_torch.save_file(tensors, file, metadata={"format": "pt"})
  _, params = convert.from_hf(src)
  assert "lm_head_DV" not in params


# ---------------------------------------------------------------------------- bad inputs


@pytest.fixture
def good_dir(tmp_path):
  return save_hf(hf_model(CASES["gqa"]), tmp_path / "hf")


def _edit_config(hf_dir, **changes):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    hf = json.load(f)
  hf.update(changes)
  hf = {k: v for k, v in hf.items() if v is not ...}  # ... deletes the key
  with open(path, "w") as f:
    json.dump(hf, f)


def _edit_tensors(hf_dir, fn):
  file = os.path.join(hf_dir, "model.safetensors")
  tensors = st_torch.load_file(file)
  fn(tensors)
  st_torch.save_file(tensors, file, metadata={"format": "pt"})


def test_error_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    convert.from_hf(str(tmp_path / "nowhere"))


def test_error_no_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    convert.from_hf(str(tmp_path))


def test_error_not_llama(good_dir):
  _edit_config(good_dir, model_type="mistral")
  with pytest.raises(ValueError, match="model_type='mistral'"):
    convert.from_hf(good_dir)


def test_error_no_safetensors(good_dir):
  os.remove(os.path.join(good_dir, "model.safetensors"))
  open(os.path.join(good_dir, "pytorch_model.bin"), "wb").close()
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
    convert.from_hf(good_dir)


def test_error_index_names_missing_shard(tmp_path):
  config = CASES["gqa"]
  params = nnx.to_pure_dict(nnx.state(model_lib.init_model(config, seed=0), nnx.Param))
  written = convert.to_hf(config, params, str(tmp_path), max_shard_bytes=64 * 1024)
  shard = written[1]
  os.remove(tmp_path / shard)
  with pytest.raises(FileNotFoundError, match=shard):
    convert.from_hf(str(tmp_path))


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0}])
def test_error_unsupported_rope(good_dir, rope):
  _edit_config(good_dir, rope_scaling=rope)
  kind = rope.get("rope_type", rope.get("type"))
  with pytest.raises(ValueError, match=f"rope_type='{kind}'"):
    convert.from_hf(good_dir)


@pytest.mark.parametrize("changes, match", [
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"num_hidden_layers": ...}, "num_hidden_layers"),
])
def test_error_unsupported_config(good_dir, changes, match):
  _edit_config(good_dir, **changes)
  with pytest.raises(ValueError, match=match):
    convert.from_hf(good_dir)


def test_error_missing_tensor(good_dir):
  _edit_tensors(good_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    convert.from_hf(good_dir)


def test_error_missing_lm_head_untied(good_dir):
  _edit_tensors(good_dir, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ValueError, match="'lm_head.weight'"):
    convert.from_hf(good_dir)


def test_error_shape_mismatch_names_tensor_and_shapes(good_dir):
  _edit_config(good_dir, intermediate_size=128)
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                       r"\(160, 64\).*\(128, 64\)"):
    convert.from_hf(good_dir)


def test_error_unexpected_tensor(good_dir):
  _edit_tensors(good_dir, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
  with pytest.raises(ValueError, match=r"q_proj\.bias"):
    convert.from_hf(good_dir)


def test_old_rotary_buffers_are_ignored(good_dir):
  _edit_tensors(good_dir, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
  convert.from_hf(good_dir)


def test_error_unknown_override(good_dir):
  with pytest.raises(ValueError, match="scan_layer"):
    convert.from_hf(good_dir, scan_layer=False)


def test_error_to_hf_bad_params(tmp_path):
  config = CASES["gqa"]
  params = nnx.to_pure_dict(nnx.state(model_lib.init_model(config, seed=0), nnx.Param))
  good_wk = params["blocks"]["attn"]["wk_DKH"]
  params["blocks"]["attn"]["wk_DKH"] = np.zeros((2, 64, 4, 16), np.float32)
  with pytest.raises(ValueError, match=r"blocks/attn/wk_DKH has shape \(2, 64, 4, 16\).*\(2, 64, 2, 16\)"):
    convert.to_hf(config, params, str(tmp_path))
  params["blocks"]["attn"]["wk_DKH"] = good_wk
  with pytest.raises(ValueError, match="int8"):
    convert.to_hf(config, params, str(tmp_path), dtype="int8")
  del params["embed_VD"]
  with pytest.raises(ValueError, match="lack embed_VD"):
    convert.to_hf(config, params, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written before the checks
