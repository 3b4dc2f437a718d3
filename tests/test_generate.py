"""KV-cache decoding: HF greedy parity, cached logits = full-forward logits (scan, unrolled,
8 fake devices), sampling restricted to top-k / nucleus, reproducible seeds, bad requests."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from llama_jax import generate as gen_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sh
from llama_jax.errors import ConfigError

SMALL = model_lib.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffw_dim=160,
                              rope_theta=500000.0, max_seq_len=128, init_std=0.2)


def mesh_of(devices, data=1, fsdp=-1, tensor=1):
  return sh.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


def split(model):
  """(graphdef, params as a pure dict), the form training and checkpoints hold them in."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def prompts_of(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).tolist() for n in lengths]


# ---------------------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("case", ["gqa", "llama3.1_rope", "tied"])
def test_greedy_equals_transformers_generate(case, tmp_path):
  """A batch of prompts of different lengths (one past 300 tokens), decoded together, gives
  token for token what transformers' greedy generate gives for each prompt alone."""
  torch = pytest.importorskip("torch")
  from test_hf import CASES, hf_model, save_hf

  from llama_jax import convert

  config = CASES[case]
  if config.max_seq_len < 512:
    config = dataclasses.replace(config, max_seq_len=512)
  hf = hf_model(config, seed=1)
  model = convert.from_hf_model(save_hf(hf, tmp_path / "hf"))
  graphdef, params = split(model)
  prompts = prompts_of([5, 37, 301], config.vocab_size)
  max_new, eos = 16, hf.generation_config.eos_token_id
  ours = gen_lib.Generator(graphdef, model.config, mesh_of(jax.devices()[:1]))(params, prompts, max_new, eos)
  for prompt, new in zip(prompts, ours.ids):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert new == out[0, len(prompt):].tolist()
  assert len({tuple(ids) for ids in ours.ids}) == 3  # not one degenerate answer


# ---------------------------------------------------------------------------- cache vs full forward


def _cached_logits(model, prompts, max_new, feed):
  """Logits of every step of cached decoding as generate.py lays it out: right-padded prefill,
  then row b's token i at position len_b + i - 1; `feed[b]` are the tokens fed after the prompt."""
  B, P = len(prompts), max(len(p) for p in prompts)
  lengths = np.array([len(p) for p in prompts])
  tokens = np.zeros((B, P), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  prefill = jax.jit(lambda m, t, c: m.decode(t, jnp.broadcast_to(jnp.arange(P), (B, P)), c))
  step = jax.jit(lambda m, t, pos, c: m.decode(t[:, None], pos[:, None], c))
  logits = jax.jit(lambda m, x: m.logits(x))
  x, cache = prefill(model, tokens, model_lib.init_cache(model.config, B, P + max_new))
  out = [np.asarray(logits(model, x))[np.arange(B), lengths - 1]]
  for i in range(1, max_new):
    x, cache = step(model, np.array([f[i - 1] for f in feed], np.int32), jnp.asarray(lengths + i - 1), cache)
    out.append(np.asarray(logits(model, x))[:, 0])
  return np.stack(out, axis=1)  # [B, max_new, V]


# The full forward runs the config's kernel: xla in one block, xla in blocks of 32, and splash (interpret
# mode) on rows padded to 128 positions; the cached decoding always runs attention.attend_cached.
KERNEL_OF_LAYOUT = {"xla_blocks_of_32": ("xla", 32), "splash": ("splash", 128)}


@pytest.mark.parametrize("layout", ["scan", "unrolled", "scan_8_devices", "xla_blocks_of_32", "splash"])
def test_cached_decoding_gives_the_full_forward_logits(layout):
  kernel, blocks = KERNEL_OF_LAYOUT.get(layout, ("xla", 512))
  config = dataclasses.replace(SMALL, scan_layers=layout != "unrolled", attention=kernel, attention_block_q=blocks,
                               attention_block_kv=blocks, max_seq_len=max(SMALL.max_seq_len, 128))
  model = model_lib.init_model(config, seed=0)
  prompts = prompts_of([3, 11, 7, 9], config.vocab_size)
  max_new = 9
  feed = prompts_of([max_new] * 4, config.vocab_size, seed=1)  # any tokens: logits must match whatever is fed
  if layout == "scan_8_devices":
    mesh = mesh_of(jax.devices(), fsdp=4, tensor=2)
    graphdef, params = split(model)
    params = jax.device_put(params, sh.param_shardings(mesh, model_lib.abstract_model(config)))
    assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8
    with jax.set_mesh(mesh):
      cached = _cached_logits(nnx.merge(graphdef, params), prompts, max_new, feed)
  else:
    cached = _cached_logits(model, prompts, max_new, feed)
  forward = jax.jit(lambda m, t: m(t))  # a compile per row length, not one per op as an eager call makes
  for b, (prompt, fed) in enumerate(zip(prompts, feed)):
    sequence = np.array([prompt + fed[:max_new - 1]])
    padded = np.pad(sequence, ((0, 0), (0, 128 - sequence.shape[1])))  # later tokens change no earlier logit
    full = np.asarray(forward(model, padded if layout in KERNEL_OF_LAYOUT else sequence))
    full = full[0, len(prompt) - 1:sequence.shape[1]]
    assert np.abs(full).max() > 1.0
    np.testing.assert_allclose(cached[b], full, atol=1e-5, rtol=0)


def test_generator_on_8_devices_equals_one_device():
  """Greedy rows decoded on a sharded mesh (3 prompts padded to the 4 batch shards) equal one
  device's, and each equals greedy decoding by full forward passes."""
  model = model_lib.init_model(SMALL, seed=0)
  graphdef, params = split(model)
  prompts = prompts_of([4, 13, 6], SMALL.vocab_size)
  one = gen_lib.Generator(graphdef, SMALL, mesh_of(jax.devices()[:1]))(params, prompts, 8, stop_ids=-1)
  mesh = mesh_of(jax.devices(), fsdp=4, tensor=2)
  sharded = jax.device_put(params, sh.param_shardings(mesh, model_lib.abstract_model(SMALL)))
  eight = gen_lib.Generator(graphdef, SMALL, mesh)(sharded, prompts, 8, stop_ids=-1)
  assert eight.ids == one.ids
  forward = jax.jit(lambda m, t: m(t))
  for prompt, new in zip(prompts, one.ids):
    ids = np.zeros((1, 13 + 8), np.int32)  # causal: what follows position i never changes its logits
    ids[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + 8):
      ids[0, i] = np.argmax(np.asarray(forward(model, ids))[0, i - 1])
    assert ids[0, len(prompt):len(prompt) + 8].tolist() == new


def test_rows_stop_at_their_own_eos():
  model = model_lib.init_model(SMALL, seed=0)
  graphdef, params = split(model)
  generator = gen_lib.Generator(graphdef, SMALL, mesh_of(jax.devices()[:1]))
  prompts = prompts_of([4, 9], SMALL.vocab_size)
  free = generator(params, prompts, 12, stop_ids=-1).ids
  eos = free[0][3]  # make row 0's fourth token the EOS
  stopped = generator(params, prompts, 12, stop_ids=eos).ids
  assert stopped[0] == free[0][:4]
  cut = free[1].index(eos) + 1 if eos in free[1] else 12
  assert stopped[1] == free[1][:cut]
  # Several stop ids (Llama 3 instruct: <|end_of_text|>, <|eot_id|>): a row ends at the first it makes.
  stop = [free[1][6], free[0][2]]
  either = generator(params, prompts, 12, stop_ids=stop).ids
  for row, ids in zip(either, free):
    end = next((i for i, t in enumerate(ids) if t in stop), 11)
    assert row == ids[:end + 1]


# ---------------------------------------------------------------------------- sampling


def _allowed(logits_V, k=0, p=1.0):
  """The tokens top-k / top-p may draw, computed directly: the k largest, then the fewest
  largest whose softmax mass reaches p."""
  order = np.argsort(-logits_V)
  if k:
    order = order[:k]
  probs = np.exp(logits_V[order] - logits_V[order].max())
  probs /= probs.sum()
  n = int(np.searchsorted(np.cumsum(probs), p) + 1) if p < 1 else len(order)
  return set(order[:n].tolist())


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.6), (20, 0.3), (1, 1.0), (0, 1e-6)])
def test_sampled_tokens_lie_in_the_allowed_set(k, p):
  logits_BV = jax.random.normal(jax.random.key(0), (4, 64)) * 2.0
  sampling = gen_lib.Sampling(temperature=1.0, top_k=k, top_p=p)
  draw = jax.jit(lambda key: gen_lib.sample_tokens(logits_BV, key, sampling))
  drawn = np.stack([np.asarray(draw(jax.random.key(seed))) for seed in range(300)])
  for b in range(4):
    allowed = _allowed(np.asarray(logits_BV[b]), k, p)
    assert set(drawn[:, b].tolist()) <= allowed
    if len(allowed) > 1:
      assert len(set(drawn[:, b].tolist())) > 1  # it samples, not argmax
    else:  # k = 1 and p -> 0 are greedy
      assert allowed == {int(np.argmax(logits_BV[b]))}


def test_a_seed_reproduces_the_sample():
  model = model_lib.init_model(SMALL, seed=0)
  graphdef, params = split(model)
  generator = gen_lib.Generator(graphdef, SMALL, mesh_of(jax.devices()[:1]))
  prompts = prompts_of([4, 9], SMALL.vocab_size)
  sampling = gen_lib.Sampling(temperature=1.0, top_k=40, top_p=0.95)
  a, b, c = (generator(params, prompts, 10, -1, sampling, seed) .ids for seed in (7, 7, 8))
  assert a == b
  assert a != c


# ---------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("prompts,max_new,sampling,culprit", [
    ([[5, 6], []], 4, {}, "prompt 2 is empty"),
    ([[5] * 120], 9, {}, "120 tokens + max_new_tokens=9 = 129 > the model's max_seq_len 128"),
    ([[5]], 4, {"top_p": 0.0}, "top_p=0.0: must lie in (0, 1]"),
    ([[5]], 4, {"top_p": 1.5}, "top_p=1.5"),
    ([[5]], 4, {"top_k": -1}, "top_k=-1: must be >= 0"),
    ([[5, 96]], 4, {}, "token id 96 is outside the vocabulary [0, 96)"),
])
def test_bad_requests_fail_in_one_line_before_compiling(prompts, max_new, sampling, culprit):
  model = model_lib.init_model(SMALL, seed=0)
  graphdef, params = split(model)
  generator = gen_lib.Generator(graphdef, SMALL, mesh_of(jax.devices()[:1]))
  with pytest.raises(ConfigError, match=None) as e:
    generator(params, prompts, max_new, -1, gen_lib.Sampling(temperature=1.0, **sampling))
  assert culprit in str(e.value) and "\n" not in str(e.value)
  assert not generator._compiled


def test_an_empty_prompt_is_named_by_its_flag():
  """generate's --prompt_ids, not --prompt, when the ids given are none."""
  with pytest.raises(ConfigError, match=r"^--prompt_ids is empty$"):
    gen_lib.prompts_of(None, [], [""], 4, SMALL)
  with pytest.raises(ConfigError, match=r"^--prompt_ids: token id 100 is outside the vocabulary \[0, 96\)$"):
    gen_lib.prompts_of(None, [], ["1 100"], 4, SMALL)
