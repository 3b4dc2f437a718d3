"""The tools that read or write a run's workdir, on a workdir on gs:// (a local GCS API server,
tests/gcs_server.py): eval, generate --json, convert export-hf / import-hf and plot give what they give
on the same workdir on a local disk, and tokenizers load from (and train into) gs://.

llama_jax.bench is not imported here: its module-level absl flags (--config) clash with llama_jax.aot's,
which test_aot.py imports into the same pytest process."""

import base64
import json
import os
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest

from conftest import tiny_test_config
from llama_jax import config_file, convert, evaluate, generate, paths, plot, run_setup, trainer
from llama_jax import tokenizer as tok_lib
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")
TEXT = "ROMEO. O, she doth teach the torches to burn bright! — «ça va», 東京 🙂\n"


def _files(root: str) -> dict[str, bytes]:
  """Every file under `root` (local or gs://), by its path relative to `root`."""
  return {p[len(root) + 1:]: paths.read_bytes(p) for p in paths.glob(paths.join(root, "**")) if paths.isfile(p)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, gcs_server):
  """(local workdir, its copy on gs://, the run's final eval): a tiny run of 4 steps trained on a local
  disk, uploaded as it is (the independent reference for every tool is the local copy, on which the
  tools work as before)."""
  local = str(tmp_path_factory.mktemp("tools") / "tiny")
  config = tiny_test_config(**{"data.eval_corpus": EVAL, "train.steps": 4, "train.checkpoint_every": 4,
                               "data.tokenizer_sample_bytes": 300_000})
  result = trainer.train_and_evaluate(config, local, devices=jax.devices()[:1])
  bucket = gcs_server.make_bucket(f"tools-run-{uuid.uuid4().hex[:8]}")
  remote = f"{bucket}/tiny"
  paths.filesystem(remote).put(local, remote, recursive=True)
  assert _files(remote) == _files(local)
  return local, remote, result


def test_eval_on_gs_scores_as_the_run_did_and_writes_its_json_there(run):
  local, remote, result = run
  evaluate.check_output(paths.join(remote, "eval_4.json"))
  got = evaluate.evaluate_checkpoint(remote)
  assert got == evaluate.evaluate_checkpoint(local)  # bit for bit
  assert got["num_tokens"] == result["num_tokens"] and got["loss"] == pytest.approx(result["loss"], rel=1e-6)
  evaluate.write_json(got, paths.join(remote, "eval_4.json"))
  assert json.loads(paths.read_text(paths.join(remote, "eval_4.json"))) == got
  assert not os.path.exists("gs:")  # nothing went to a local folder of that name
  with pytest.raises(ConfigError, match=r"^--output=gs://no-such-bucket/e.json: bucket gs://no-such-bucket does "
                                        r"not exist"):
    evaluate.check_output("gs://no-such-bucket/e.json")
  with pytest.raises(ConfigError, match=r"^--output gs://.*/tiny/checkpoints is a directory; give a file name$"):
    evaluate.check_output(paths.join(remote, "checkpoints"))


def test_generate_json_on_gs_equals_greedy_decoding_of_the_local_run(run):
  local, remote, _ = run
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "llama_jax.generate", f"--workdir={remote}", "--prompt=ROMEO.",
                         "--prompt=O, what a rogue", "--max_new_tokens=8", "--temperature=0", "--json"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]

  setup, params, tok, _ = run_setup.load_run(local, devices=jax.devices()[:1])
  stop = run_setup.stop_ids(local, tok)
  prompts = [tok.encode(p, bos=True) for p in ("ROMEO.", "O, what a rogue")]
  want = generate.Generator(setup.graphdef, setup.llama, setup.mesh)(params, prompts, 8, stop).ids
  assert [r["prompt_ids"] for r in rows] == prompts
  assert [r["ids"] for r in rows] == want
  assert [r["text"] for r in rows] == [tok.decode([t for t in ids if t not in stop]) for ids in want]


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  """(HF dir exported from the local workdir, from the gs:// one to gs://, and to a local dir)."""
  local, remote, _ = run
  out = tmp_path_factory.mktemp("exported")
  reference, to_gs, to_local = str(out / "reference"), paths.join(paths.parent(remote), "hf"), str(out / "from_gs")
  for workdir, hf_dir in ((local, reference), (remote, to_gs), (remote, to_local)):
    assert convert.export_hf(workdir, hf_dir, dtype="float32") == 4
  return reference, to_gs, to_local


def test_export_hf_from_gs_writes_the_files_of_the_local_export(exported):
  reference, to_gs, to_local = exported
  want = _files(reference)
  assert sorted(want) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model"]
  assert _files(to_gs) == want  # byte for byte
  assert _files(to_local) == want


def test_import_hf_from_gs_into_gs_holds_the_runs_params_and_files(run, exported):
  local, remote, _ = run
  _, hf_gs, _ = exported
  workdir = paths.join(paths.parent(remote), "imported")
  convert.import_hf(hf_gs, workdir, "configs/tiny.py")
  assert paths.listdir(workdir) == ["checkpoints", "generation.json", "tokenizer.model"]
  tokenizer = lambda w: paths.read_bytes(paths.join(w, "tokenizer.model"))
  assert tokenizer(workdir) == tokenizer(local)
  _, params, tok, step = run_setup.load_run(workdir, devices=jax.devices()[:1])
  assert step == 0 and run_setup.stop_ids(workdir, tok) == [tok.eos_id]
  _, want, _, _ = run_setup.load_run(local, devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, params, want)  # float32 out and back: exact
  with pytest.raises(ConfigError, match=r"is not empty|already has checkpoints"):
    convert.import_hf(hf_gs, workdir, "configs/tiny.py")
  with pytest.raises(ValueError, match=r"^--hf_dir gs://.*/tiny is a llama_jax workdir \(it has checkpoints/\), "
                                       r"not a Hugging Face checkpoint directory$"):
    convert.import_hf(remote, paths.join(paths.parent(remote), "other"), "configs/tiny.py")


def test_a_failed_export_to_gs_leaves_nothing_and_a_used_hf_dir_is_refused(run, exported, monkeypatch):
  _, remote, _ = run
  _, hf_gs, _ = exported
  with pytest.raises(ConfigError, match=r"^--hf_dir gs://.*/hf is a Hugging Face checkpoint directory \(it has "
                                        r"config.json\); export into a new or empty directory$"):
    convert.export_hf(remote, hf_gs)
  target = paths.join(paths.parent(remote), "failed")

  def fail(tensors, path):
    raise OSError("upload failed")

  monkeypatch.setattr(convert, "_save_safetensors", fail)
  with pytest.raises(OSError, match="upload failed"):
    convert.export_hf(remote, target)
  assert not paths.exists(target)  # the tokenizer and generation_config.json it wrote first are gone


def test_safetensors_on_gs_are_read_by_ranges_as_the_local_files(exported):
  reference, to_gs, _ = exported
  name = "model.safetensors"
  with convert._open(os.path.join(reference, name)) as want, convert._open(paths.join(to_gs, name)) as got:
    assert got.shapes() == want.shapes()
    for tensor in want.shapes():
      np.testing.assert_array_equal(got.get_tensor(tensor), want.get_tensor(tensor))
  bad = paths.join(to_gs, "tokenizer.model")  # not a safetensors file
  with pytest.raises(ValueError, match=r"tokenizer.model is not a safetensors file"):
    convert._open(bad)

  # Sharded, with its index: written to gs:// and read back.
  config, params = convert.from_hf(reference)
  sharded = paths.join(paths.parent(to_gs), "sharded")
  written = convert.to_hf(config, params, sharded, max_shard_bytes=40_000)
  assert convert.INDEX_FILE in written and len(written) > 3
  assert paths.listdir(sharded) == sorted(written)
  got_config, got = convert.from_hf(sharded)
  assert got_config == config
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_plot_reads_metrics_on_gs_and_writes_the_png_of_the_local_run(run, tmp_path):
  local, remote, _ = run
  assert plot.read_metrics(remote) == plot.read_metrics(local)
  output = paths.join(remote, "run.png")
  plot.write_png([remote], output)
  plot.write_png([local], str(tmp_path / "run.png"))
  assert paths.read_bytes(output) == (tmp_path / "run.png").read_bytes()  # same lines, same label "tiny"
  with pytest.raises(ConfigError, match=r"^--output=gs://no-such-bucket/run.png: bucket gs://no-such-bucket"):
    plot.write_png([remote], "gs://no-such-bucket/run.png")


def test_tokenizers_on_gs_load_and_encode_as_the_local_files(run, tmp_path, gcs_bucket):
  local, remote, _ = run
  sp_local, sp_gs = (paths.join(w, "tokenizer.model") for w in (local, remote))
  # A tiktoken ranks file: the 256 bytes, then merges.
  ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b"or", b"RO"]
  tiktoken_local = tmp_path / "ranks.tiktoken"
  tiktoken_local.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
  tiktoken_gs = f"{gcs_bucket}/ranks.tiktoken"
  paths.copy(str(tiktoken_local), tiktoken_gs)
  for want_path, got_path, kind in ((sp_local, sp_gs, tok_lib.SentencePieceTokenizer),
                                    (str(tiktoken_local), tiktoken_gs, tok_lib.TiktokenTokenizer)):
    want, got = tok_lib.load_tokenizer(want_path), tok_lib.load_tokenizer(got_path)
    assert type(got) is type(want) is kind
    assert (got.vocab_size, got.bos_id, got.eos_id, got.pad_id) == (want.vocab_size, want.bos_id, want.eos_id,
                                                                    want.pad_id)
    assert got.encode(TEXT, bos=True) == want.encode(TEXT, bos=True)
    assert got.decode(got.encode(TEXT)) == want.decode(want.encode(TEXT))

  # Trained into gs://: the bytes of the same training written locally.
  lines = paths.read_text(os.path.join(ROOT, "tests", "data", "heldout_sample.txt")).splitlines(keepends=True)
  trained = tok_lib.train_sentencepiece(lines, 400, f"{gcs_bucket}/new/tok.model")
  tok_lib.train_sentencepiece(lines, 400, str(tmp_path / "tok.model"))
  assert paths.read_bytes(f"{gcs_bucket}/new/tok.model") == (tmp_path / "tok.model").read_bytes()
  assert trained.encode(TEXT) == tok_lib.load_tokenizer(str(tmp_path / "tok.model")).encode(TEXT)
  assert paths.listdir(f"{gcs_bucket}/new") == ["tok.model"]  # written in one piece, nothing beside it


def test_a_config_file_on_gs_is_one_line(gcs_bucket):
  with pytest.raises(ConfigError) as e:
    config_file.load_config_file(f"{gcs_bucket}/configs/tiny.py:small")
  assert str(e.value) == (f"--config {gcs_bucket}/configs/tiny.py:small: a config file is imported as Python, so it "
                          "must be a local file; copy it to this machine and give its local path")
