"""llama_jax/harness/lm.py, the lm-eval backend, against references that do not pack: each request scored
alone in its own row by a direct forward of the model, lm-eval's own rolling-window helpers, the KV-cache
Generator called directly, transformers' decode of the same tokenizer file, and one process against two.

Run as `python tests/test_harness_lm.py WORKER_ARGS...`, this file is one of the two processes of
test_two_processes_equal_one."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance

from llama_jax import generate as gen_lib
from llama_jax import run_setup
from llama_jax import tokenizer as tok_lib
from llama_jax.errors import ConfigError
from llama_jax.harness import lm as lm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 64  # max_seq_len of the test model = the backend's max_length
ROWS = 4  # batch_size: rows per compiled call


# Sampled generation, in test_generate_until_samples_with_its_seed and in both processes' calls (one
# compiled Generator program serves both). Collator runs the longest prompt first, and a row's draw
# depends on its place in the batch: the contexts are already in that order.
SAMPLED = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 0.9, "top_k": 20}
SAMPLED_CONTEXTS = ["JULIET. Good night, good night", "QUEEN. Good night", "ROMEO. Hi", "A"]


def _config():
  from conftest import tiny_test_config  # noqa: PLC0415  (not in the worker: conftest asks for 8 devices)
  return tiny_test_config(**{"model.max_seq_len": L, "model.n_layers": 1})


def _random_params(setup, seed=0, std=0.5):
  """Params drawn on the host (numpy: the same on every process, no init program to compile), placed as
  setup shards them. A large std makes a random model's predictions peaked, so that some continuations
  are its argmax."""
  rng = np.random.default_rng(seed)

  def place(a):
    x = (std * rng.standard_normal(a.shape)).astype(a.dtype)
    return jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx])

  return jax.tree.map(place, setup.abstract_state["params"])


def _make_lm(config, devices, tokenizer_path, **kwargs):
  setup = run_setup.Setup(config, devices)
  params = _random_params(setup)
  tok = tok_lib.load_tokenizer(tokenizer_path)
  return lm_lib.LlamaLM(setup, params, tok, batch_size=ROWS, max_gen_toks=12, seed=3, **kwargs), setup, params, tok


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  from llama_jax import corpus  # noqa: PLC0415
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:2]), 320, path)
  return path


@pytest.fixture(scope="module")
def harness(tokenizer_path):
  """(lm, setup, params, tok): 2 devices (fsdp 2), batches of 4 rows of 64 tokens."""
  return _make_lm(_config(), jax.devices()[:2], tokenizer_path)


@pytest.fixture(scope="module")
def direct(harness):
  """log_softmax of the model on one unpacked row (right-padded to L, causal: the padding is never
  seen), computed without segment ids or positions: the reference of every score below."""
  _, setup, params, _ = harness
  forward = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(setup.graphdef, p)(t).astype(jnp.float32)))

  def logprobs(inp):
    tokens = np.zeros((1, L), np.int32)
    tokens[0, :len(inp)] = inp
    return np.asarray(forward(params, tokens))[0, :len(inp)]

  return logprobs


def _alone(direct, ctx, cont):
  """(sum log p(cont | ctx), all greedy) with the request alone in its row, after lm-eval hf's left
  truncation (lm_eval/models/huggingface.py, _loglikelihood_tokens)."""
  window = (ctx + cont)[-(L + 1):]
  logp_TV = direct(window[:-1])[-len(cont):]
  return (float(logp_TV[np.arange(len(cont)), cont].sum()), bool((logp_TV.argmax(-1) == cont).all()))


def _requests(direct, n=14, seed=0):
  """Token-level (key, ctx, cont) requests of mixed lengths; every third continuation is the model's
  greedy one."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    ctx = rng.integers(3, 320, int(rng.integers(1, 30))).tolist()
    k = int(rng.integers(1, 5))
    if i % 3 == 0:
      cont = []
      for _ in range(k):
        cont.append(int(direct(ctx + cont)[-1].argmax()))
    else:
      cont = rng.integers(3, 320, k).tolist()
    out.append((None, ctx, cont))
  return out


# ---------------------------------------------------------------------------- loglikelihood


def test_packed_scores_equal_each_request_alone(harness, direct):
  lm = harness[0]
  requests = _requests(direct)
  _, _, rows = lm_lib.pack(np.array([len(c) + len(x) - 1 for _, c, x in requests]), L, 63)
  assert rows <= len(requests) // 3  # many requests per row
  ours = lm._loglikelihood_tokens(requests)
  alone = [_alone(direct, ctx, cont) for _, ctx, cont in requests]
  for (ours_lp, ours_greedy), (ref_lp, ref_greedy) in zip(ours, alone):
    assert ours_lp == pytest.approx(ref_lp, rel=1e-5)
    assert ours_greedy == ref_greedy
  assert 0 < sum(g for _, g in alone) < len(alone)  # both kinds of greedy flag were checked


def test_a_request_sees_only_itself(harness, direct):
  """Changing one request's context changes its score and no other's, by a single bit."""
  lm = harness[0]
  requests = _requests(direct, seed=1)
  before = lm._loglikelihood_tokens(requests)
  # The longest request is placed first, in row 0, with others after it.
  i = max(range(len(requests)), key=lambda j: len(requests[j][1]) + len(requests[j][2]))
  row_N, _, _ = lm_lib.pack(np.array([len(c) + len(x) - 1 for _, c, x in requests]), L, 63)
  assert (row_N == row_N[i]).sum() > 2
  key, ctx, cont = requests[i]
  changed = list(requests)
  changed[i] = (key, [(t + 1) % 320 for t in ctx], cont)
  after = lm._loglikelihood_tokens(changed)
  assert after[i][0] != before[i][0]
  assert [a for j, a in enumerate(after) if j != i] == [b for j, b in enumerate(before) if j != i]


def test_score_calls_hold_every_request_once_in_the_shortest_rows():
  """plan_calls: each call's rows are the shortest bucket that holds its longest request, every call
  has batch_size * max_length tokens, and the requests it holds do not overlap (numpy alone)."""
  rng = np.random.default_rng(3)
  lengths = np.concatenate([rng.integers(1, 257, 40), rng.integers(1, 30, 300)])
  assert lm_lib.row_buckets(256) == [256, 128, 64, 32] and lm_lib.row_buckets(100) == [100, 50]
  assert lm_lib.row_buckets(48) == [48]
  calls = lm_lib.plan_calls(lengths, 256, 4, max_per_row=5)
  seen = np.concatenate([index_M for _, _, index_M, _, _ in calls])
  assert sorted(seen.tolist()) == list(range(len(lengths)))
  for T, rows, index_M, row_M, offset_M in calls:
    assert rows * T == 4 * 256
    assert T == min(t for t in (32, 64, 128, 256) if t >= lengths[index_M].max())
    for r in range(rows):
      mine = row_M == r
      assert mine.sum() <= 5
      used = np.zeros(T, int)
      for o, n in zip(offset_M[mine], lengths[index_M][mine]):
        used[o:o + n] += 1
      assert used.max(initial=0) <= 1  # no overlap, nothing past the row's end (slicing would drop it)
      assert used.sum() == lengths[index_M][mine].sum()
  assert {T for T, *_ in calls} >= {32, 128, 256}  # long rows first, then shorter ones
  assert sum(lengths) / (len(calls) * 4 * 256) > 0.9  # short requests fill the gaps of long ones


def test_head_at_slots_equals_numpy(harness):
  """make_head_fn, all slots at once and in chunks, against numpy's log-softmax of x @ lm_head."""
  _, setup, params, _ = harness
  rng = np.random.default_rng(4)
  x_ND = rng.standard_normal((40, setup.llama.dim)).astype(np.float32)
  index_S, targets_S = rng.integers(0, 40, 16).astype(np.int32), rng.integers(0, 320, 16).astype(np.int32)
  logits_SV = x_ND[index_S].astype(np.float64) @ np.asarray(params["embed_VD"]).T.astype(np.float64)  # tied head
  logsm_SV = logits_SV - np.log(np.exp(logits_SV - logits_SV.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits_SV.max(-1, keepdims=True)
  for chunk in (0, 4):
    logprob_S, greedy_S = jax.jit(lm_lib.make_head_fn(setup.graphdef, chunk))(params, x_ND, index_S, targets_S)
    np.testing.assert_allclose(logprob_S, logsm_SV[np.arange(16), targets_S], rtol=1e-5)
    assert (np.asarray(greedy_S) == (logits_SV.argmax(-1) == targets_S)).all()


def test_truncation_from_the_left_as_lm_eval(harness, direct):
  lm = harness[0]
  rng = np.random.default_rng(2)
  long_ctx, cont = rng.integers(3, 320, 90).tolist(), rng.integers(3, 320, 4).tolist()
  short = (None, [5, 6, 7], [8, 9])
  before = dict(lm.truncated)
  ours = lm._loglikelihood_tokens([(None, long_ctx, cont), short])
  assert lm.truncated["loglikelihood"] == before["loglikelihood"] + 1  # the long one only
  # lm-eval's rule, written out: the last L + 1 tokens, the last one only a target.
  inp = (long_ctx + cont)[-(L + 1):][:-1]
  assert len(inp) == L and inp[-1] == cont[-2]
  assert ours[0][0] == pytest.approx(_alone(direct, long_ctx, cont)[0], rel=1e-5)
  logp = direct(inp)[-4:]
  assert ours[0][0] == pytest.approx(float(logp[np.arange(4), cont].sum()), rel=1e-5)
  with pytest.raises(ConfigError, match="continuation of 65 tokens is longer than max_length=64"):
    lm._loglikelihood_tokens([(("ctx", "cont"), [1], [5] * (L + 1))])


def test_string_requests_through_lm_eval(harness, direct):
  """lm-eval's own loglikelihood (TemplateLM: context/continuation split, empty context) over ours."""
  lm, _, _, tok = harness
  pairs = [("ROMEO. What say you", " to this?"), ("", "JULIET."), ("Thou art  ", "x")]
  ours = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
  # By hand: BOS + the text; a context's trailing spaces move to the continuation (TemplateLM._encode_pair).
  expected = [  # (context ids, context + continuation ids)
      ([tok.bos_id] + tok.encode("ROMEO. What say you"), [tok.bos_id] + tok.encode("ROMEO. What say you to this?")),
      ([tok.bos_id], [tok.bos_id] + tok.encode("JULIET.")),
      ([tok.bos_id] + tok.encode("Thou art"), [tok.bos_id] + tok.encode("Thou art  x")),
  ]
  for (lp, _), (ctx, whole) in zip(ours, expected):
    assert lp == pytest.approx(_alone(direct, ctx, whole[len(ctx):])[0], rel=1e-5)


def test_rolling_equals_lm_eval_windows(harness, direct):
  lm, _, _, tok = harness
  docs = ["To be, or not to be, that is the question. " * 5, "Ay.", ""]
  ours = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)],
                                  disable_tqdm=True)
  for doc, total in zip(docs, ours):
    ids = [tok.bos_id] + tok.encode(doc)
    windows = list(map(lm_utils.make_disjoint_window,
                       lm_utils.get_rolling_token_windows(ids, tok.bos_id, L, context_len=1)))
    expected = 0.0
    for ctx, pred in windows:
      expected += _alone(direct, ctx, pred)[0]
    assert total == pytest.approx(expected, rel=1e-5)
  assert len(tok.encode(docs[0])) > 2 * L  # the first document spans several windows
  assert lm.truncated["loglikelihood_rolling"] == 0


# ---------------------------------------------------------------------------- generate_until


def test_generate_until_equals_the_generator(harness):
  lm, setup, params, tok = harness
  generator = gen_lib.Generator(setup.graphdef, setup.llama, setup.mesh)
  contexts = ["ROMEO.", "JULIET. Good night", "A" * 80, "KING. Speak"]  # "A" * 80: more than L - 12 tokens
  greedy = {"until": [], "max_gen_toks": 12}
  prompts = [tok.encode(c, bos=True)[-(L - 12):] for c in contexts]
  ref_ids = generator(params, prompts, 12, [tok.eos_id]).ids
  ref_texts = [lm.tok_decode(ids) for ids in ref_ids]
  assert all(len(ids) == 12 or ids[-1] == tok.eos_id for ids in ref_ids)
  before = lm.truncated["generate_until"]
  ours = lm.generate_until([Instance("generate_until", {}, (c, greedy), i) for i, c in enumerate(contexts)],
                           disable_tqdm=True)
  assert ours == ref_texts
  assert lm.truncated["generate_until"] == before + 1
  # A stop string taken from the middle of each text cuts it there.
  cuts = [{"until": [text[4:6]], "max_gen_toks": 12} for text in ref_texts]
  assert all(len(text) > 6 for text in ref_texts)
  ours = lm.generate_until([Instance("generate_until", {}, (c, k), i) for i, (c, k) in enumerate(zip(contexts, cuts))],
                           disable_tqdm=True)
  assert ours == [text.split(k["until"][0])[0] for text, k in zip(ref_texts, cuts)]
  assert all(len(o) <= 4 for o in ours)


def test_generate_until_samples_with_its_seed(harness):
  _, setup, params, tok = harness
  sampled = lm_lib.LlamaLM(setup, params, tok, batch_size=ROWS, max_gen_toks=12, seed=7)
  assert np.all(np.diff([len(tok.encode(c)) for c in SAMPLED_CONTEXTS]) < 0)
  requests = [Instance("generate_until", {}, (c, SAMPLED), i) for i, c in enumerate(SAMPLED_CONTEXTS)]
  ours = sampled.generate_until(requests, disable_tqdm=True)
  # The n-th Generator call of a LlamaLM uses seed + n; this is its first.
  generator = gen_lib.Generator(setup.graphdef, setup.llama, setup.mesh)
  ref = generator(params, [tok.encode(c, bos=True) for c in SAMPLED_CONTEXTS], 10, [tok.eos_id],
                  gen_lib.Sampling(0.9, 20, 1.0), seed=7).ids
  assert ours == [sampled.tok_decode(ids) for ids in ref]
  other_seed = lm_lib.LlamaLM(setup, params, tok, batch_size=ROWS, max_gen_toks=12, seed=8)
  assert other_seed.generate_until(requests, disable_tqdm=True) != ours
  with pytest.raises(ConfigError, match="gen_kwargs 'num_beams' is not supported"):
    sampled.generate_until([Instance("generate_until", {}, ("A", {"until": [], "num_beams": 2}), 0)])


def test_decode_equals_transformers(tokenizer_path, harness, tmp_path):
  """tok_decode against transformers' decode (skip_special_tokens) of the same tokenizer.model, on
  random ids: byte-fallback runs that are not UTF-8, special ids, ordinary pieces."""
  transformers = pytest.importorskip("transformers")
  lm = harness[0]
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}))
  (tmp_path / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  rng = np.random.default_rng(0)
  for _ in range(300):
    ids = rng.integers(0, 320, int(rng.integers(1, 12))).tolist()
    assert lm.tok_decode(ids) == hf.decode(ids, skip_special_tokens=True), ids
  assert lm.tok_decode(lm.eot_token_id, skip_special_tokens=False) == hf.decode(2)


# ---------------------------------------------------------------------------- two processes


def _calls(lm):
  """The backend's three request types, as lm-eval makes them, on a fixed set of texts."""
  pairs = [("ROMEO. What say you", " to this?"), ("JULIET. " * 30, " Good night"), ("", "KING."),
           ("A", " B C")] * 3
  ll = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
  docs = ["To be, or not to be, that is the question. " * 4, "Ay."]
  rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)],
                                     disable_tqdm=True)
  # Two groups of gen_kwargs, one Generator program: sampling settings travel to process 1 in the header.
  cut = dict(SAMPLED, until=["o"])
  gen = lm.generate_until([Instance("generate_until", {}, (c, k), i)
                           for i, (c, k) in enumerate((c, k) for k in (SAMPLED, cut) for c in SAMPLED_CONTEXTS)],
                          disable_tqdm=True)
  return {"loglikelihood": ll, "rolling": rolling, "generate": gen, "truncated": lm.truncated}


def _worker(port, process_id, config_path, tokenizer_path, out_path):
  import ml_collections  # noqa: PLC0415
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  lm = _make_lm(config, jax.devices(), tokenizer_path)[0]
  if process_id != 0:
    lm.serve()
    return
  try:
    results = _calls(lm)
  finally:
    lm.finish()
  with open(out_path, "w") as f:
    json.dump(results, f)


def test_two_processes_equal_one(tokenizer_path, harness, tmp_path):
  """Process 0 drives, process 1 serves (2 CPU devices each): the results of one process."""
  import portpicker  # noqa: PLC0415
  from test_train import subprocess_env  # noqa: PLC0415
  config = _config()
  config_path, out_path = tmp_path / "config.json", tmp_path / "out.json"
  config_path.write_text(config.to_json())
  port = portpicker.pick_unused_port()
  env = subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), str(config_path),
                             tokenizer_path, str(out_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  # One process: the module's model (the same params, on 2 devices), a LlamaLM of its own.
  _, setup, params, tok = harness
  one = _calls(lm_lib.LlamaLM(setup, params, tok, batch_size=ROWS, max_gen_toks=12, seed=3))
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=120)[0])
    finally:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  two = json.loads(out_path.read_text())
  assert [lp for lp, _ in two["loglikelihood"]] == pytest.approx([lp for lp, _ in one["loglikelihood"]], rel=1e-5)
  assert [g for _, g in two["loglikelihood"]] == [g for _, g in one["loglikelihood"]]
  assert two["rolling"] == pytest.approx(one["rolling"], rel=1e-5)
  assert two["generate"] == one["generate"]
  assert two["truncated"] == one["truncated"] and one["truncated"]["loglikelihood"] == 3


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
