"""import-hf -> eval.py / train.py continue from it -> export-hf gives back the same tensors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_test_config, with_torch  # noqa: E402
from llama_jax import config_lib, corpus, tokenizer as tok_lib  # noqa: E402
from test_hf import hf_model, read_safetensors, save_hf  # noqa: E402
from test_train import ROOT, _flat  # noqa: E402


def _run(*args, env=None):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def test_import_train_eval_export(tmp_path):
  config = tiny_test_config(**{"data.eval_corpus": "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt"),
                               "train.steps": 2, "sample.max_new_tokens": 0})
  llama = config_lib.llama_config(config.model)
  hf = hf_model(llama)
  hf_dir = save_hf(hf, tmp_path / "hf")
  tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:2]),
                              llama.vocab_size, os.path.join(hf_dir, "tokenizer.model"))
  workdir = str(tmp_path / "run")
  overrides = [f"--config.{k}={v}" for k, v in _flat(config).items()]

  out = _run("-m", "llama_jax.convert", "import-hf", f"--hf_dir={hf_dir}", f"--workdir={workdir}",
             "--config=configs/tiny.py", "--check", env=with_torch(os.environ))  # --check runs transformers
  check = float(out.split("transformers = ")[1].split()[0])
  assert check < 1e-4, out

  out = _run("eval.py", f"--workdir={workdir}", f"--output={tmp_path / 'eval.json'}", "--dtype=bfloat16",
             f"--corpus={config.data.eval_corpus}")  # the held-out sample, not configs/tiny.py's held-out plays
  assert json.loads((tmp_path / "eval.json").read_text())["step"] == 0
  assert json.loads((tmp_path / "eval.json").read_text())["dtype"] == "bfloat16"
  assert out.splitlines()[0].endswith("| bfloat16")

  # Generation from the import: greedy ids equal transformers' greedy generate.
  import torch
  prompt = [1, 40, 41, 42, 43]
  out = _run("-m", "llama_jax.generate", f"--workdir={workdir}", f"--prompt_ids={' '.join(map(str, prompt))}",
             "--max_new_tokens=10", "--temperature=0", "--json")
  eos = tok_lib.load_tokenizer(os.path.join(hf_dir, "tokenizer.model")).eos_id
  with torch.no_grad():
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  assert json.loads(out)["ids"] == theirs[0, len(prompt):].tolist()

  out = _run("train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *overrides)
  assert "resumed from step 0" in out and "step 2/2" in out

  _run("-m", "llama_jax.convert", "export-hf", f"--workdir={workdir}", "--step=0", f"--hf_dir={tmp_path / 'back'}",
       "--dtype=float32")
  original, back = read_safetensors(hf_dir), read_safetensors(tmp_path / "back")
  assert set(original) == set(back)
  for name in original:
    np.testing.assert_array_equal(original[name].numpy(), back[name].numpy(), err_msg=name)


# ---------------------------------------------------------------------------- stop ids, dtype, leftovers

LLAMA2_TOKENIZER = os.path.join(ROOT, "artifacts", "tokenizers", "llama2.model")  # 32000 pieces


@pytest.fixture(scope="module")
def hf32(tmp_path_factory):
  """(hf_dir, the torch model): a tiny fp32 LlamaForCausalLM on random weights, saved with a 320-piece
  sentencepiece tokenizer (the tiny test config's vocabulary)."""
  llama = config_lib.llama_config(tiny_test_config().model)
  hf = hf_model(llama, seed=3)
  hf_dir = save_hf(hf, tmp_path_factory.mktemp("hf32") / "hf")
  tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:2]),
                              llama.vocab_size, os.path.join(hf_dir, "tokenizer.model"))
  return hf_dir, hf


def _hf_greedy(hf_dir, prompt, max_new, **kw):
  import torch
  import transformers
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw)
  return out[0, len(prompt):].tolist()


def _edit_json(path, **changes):
  obj = json.loads(open(path).read()) if os.path.exists(path) else {}
  obj.update(changes)
  with open(path, "w") as f:
    json.dump(obj, f)


def _leftovers(parent, *names):
  """Entries of `parent` other than `names`: a temporary sibling or a half-made dir left behind."""
  return sorted(set(os.listdir(parent)) - set(names))


PROMPT, MAX_NEW = [1, 40, 41, 42, 43], 12


def test_import_keeps_the_checkpoints_stop_ids_and_fp32_and_greedy_equals_transformers(hf32, tmp_path):
  """Issue 15 case 3 (several EOS ids, Llama 3 instruct style) and case 6 (fp32 stays fp32)."""
  import jax

  from llama_jax import convert, generate, run_setup
  src, _ = hf32
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(src, hf_dir)
  free = _hf_greedy(hf_dir, PROMPT, MAX_NEW, eos_token_id=-1)  # where greedy decoding goes unstopped
  # b: a token the path reaches at step >= 3 (its first time); a: one it never produces. config.json
  # keeps eos 2: transformers' generate reads generation_config.json's list, and so must we.
  k = next(i for i in range(3, MAX_NEW) if free[i] not in free[:i])
  a, b = next(t for t in range(3, 320) if t not in free), free[k]
  _edit_json(os.path.join(hf_dir, "generation_config.json"), eos_token_id=[a, b])
  _edit_json(os.path.join(hf_dir, "config.json"), eos_token_id=2)
  theirs = _hf_greedy(hf_dir, PROMPT, MAX_NEW)
  assert theirs == free[:k + 1]  # transformers stopped at the second listed id

  workdir = str(tmp_path / "run")
  convert.import_hf(hf_dir, workdir)  # configs/llama.py: computes in bfloat16 unless the import says
  setup, params, tok, _ = run_setup.load_run(workdir, devices=jax.devices()[:1])
  assert setup.llama.dtype == "float32"  # config.json's dtype
  stop = run_setup.stop_ids(workdir, tok)
  assert stop == [a, b]
  ours = generate.Generator(setup.graphdef, setup.llama, setup.mesh)(params, [PROMPT], MAX_NEW, stop)
  assert ours.ids[0] == theirs

  # --dtype bfloat16 at import; and the stop ids round-trip through export-hf.
  convert.import_hf(hf_dir, str(tmp_path / "bf16"), dtype="bfloat16")
  assert run_setup.load_run(str(tmp_path / "bf16"), devices=jax.devices()[:1])[0].llama.dtype == "bfloat16"
  convert.export_hf(workdir, str(tmp_path / "back"), dtype="float32")
  assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == [a, b]
  assert _hf_greedy(str(tmp_path / "back"), PROMPT, MAX_NEW) == theirs

  # The command line: --stop_id adds one (a token before b on the path), --dtype is said on stderr.
  c = free[1]
  proc = subprocess.run([sys.executable, "-m", "llama_jax.generate", f"--workdir={workdir}", "--temperature=0",
                         f"--prompt_ids={' '.join(map(str, PROMPT))}", f"--max_new_tokens={MAX_NEW}", "--json",
                         f"--stop_id={c}", "--dtype=bfloat16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["ids"] == free[:free.index(c) + 1]
  assert "computing in bfloat16" in proc.stderr and f"stop ids [{a}, {b}, {c}]" in proc.stderr


def test_an_int_eos_in_config_json_is_the_stop_id(hf32, tmp_path):
  from llama_jax import convert
  src, _ = hf32
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(src, hf_dir)
  os.remove(os.path.join(hf_dir, "generation_config.json"))
  _edit_json(os.path.join(hf_dir, "config.json"), eos_token_id=7)
  assert convert.stop_ids_from_hf(hf_dir, convert.read_hf_config(hf_dir), 320) == [7]
  _edit_json(os.path.join(hf_dir, "config.json"), eos_token_id=[7, 400])
  with pytest.raises(ValueError, match=r"config.json: eos_token_id 400 is outside the vocabulary \[0, 320\)"):
    convert.stop_ids_from_hf(hf_dir, convert.read_hf_config(hf_dir), 320)


@pytest.mark.skipif(not os.path.exists(LLAMA2_TOKENIZER), reason="make test fetches artifacts/tokenizers")
def test_a_refused_import_leaves_nothing_and_the_corrected_one_works(hf32, tmp_path):
  """Issue 15 case 5: a tokenizer of another vocabulary is refused before anything is written."""
  from llama_jax import checkpoint as ckpt_lib, convert
  from llama_jax.errors import ConfigError
  src, _ = hf32
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(src, hf_dir)
  shutil.copyfile(LLAMA2_TOKENIZER, os.path.join(hf_dir, "tokenizer.model"))
  out = tmp_path / "out"
  out.mkdir()
  workdir = str(out / "run")
  with pytest.raises(ConfigError, match="vocab size 32000, but config.model.vocab_size=320"):
    convert.import_hf(hf_dir, workdir, "configs/tiny.py")
  assert _leftovers(out) == []
  shutil.copyfile(os.path.join(src, "tokenizer.model"), os.path.join(hf_dir, "tokenizer.model"))
  convert.import_hf(hf_dir, workdir, "configs/tiny.py")
  assert _leftovers(out, "run") == [] and ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [0]
  assert sorted(os.listdir(workdir)) == ["checkpoints", "generation.json", "tokenizer.model"]
  with pytest.raises(ConfigError, match="already has checkpoints"):
    convert.import_hf(hf_dir, workdir, "configs/tiny.py")

  # export-hf: into a non-empty dir it is refused untouched; a failed write leaves no HF dir.
  (out / "full").mkdir()
  (out / "full" / "mine.txt").write_text("keep")
  with pytest.raises(ConfigError, match="export into a new or empty directory"):
    convert.export_hf(workdir, str(out / "full"))
  assert os.listdir(out / "full") == ["mine.txt"]
  real_save = convert.safetensors.numpy.save_file

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  convert.safetensors.numpy.save_file = disk_full
  try:
    with pytest.raises(OSError, match="No space left"):
      convert.export_hf(workdir, str(out / "back"))
  finally:
    convert.safetensors.numpy.save_file = real_save
  assert _leftovers(out, "run", "full") == []
  convert.export_hf(workdir, str(out / "back"))
  assert sorted(os.listdir(out / "back")) == ["config.json", "generation_config.json", "model.safetensors",
                                              "tokenizer.model"]


# ---------------------------------------------------------------------------- files that are not what the flag says


@pytest.fixture(scope="module")
def imported(hf32, tmp_path_factory):
  """A llama_jax workdir imported from hf32 (configs/tiny.py's training config)."""
  from llama_jax import convert
  workdir = str(tmp_path_factory.mktemp("imported") / "run")
  convert.import_hf(hf32[0], workdir, "configs/tiny.py")
  return workdir


def _bad_file(kind, path, hf_dir):
  """Makes at `path` a thing that is not a tokenizer (or config) file; returns what it should be called."""
  if kind == "directory":
    os.makedirs(os.path.join(path, "sub"))
    return "is a directory"
  if kind == "json":
    open(path, "w").write('{"version": "1.0", "model": {"type": "BPE"}}')
    return "is a JSON file"
  if kind == "safetensors":
    shutil.copyfile(os.path.join(hf_dir, "model.safetensors"), path)
    return "is a safetensors file"
  open(path, "w").close()
  return "is an empty file"


def _call(entry, target, hf32_dir, workdir, tmp_path):
  """Runs the check `entry` makes on the file named by a flag, with `target` as that file."""
  from llama_jax import convert, run_setup
  if entry == "train":  # --config.data.tokenizer_path
    config_lib.check_config(tiny_test_config(**{"data.tokenizer_path": target}))
  elif entry == "import":  # --hf_dir
    convert.import_hf(target, str(tmp_path / "new"), "configs/tiny.py")
  elif entry == "import_config":  # --config
    convert.import_hf(hf32_dir, str(tmp_path / "new"), target)
  elif entry == "load_run":  # eval.py / generate --workdir
    run_setup.load_run(target)
  elif entry == "init_from":  # config.init_from
    config = tiny_test_config()
    config.init_from = target
    run_setup.check_init_from(config)


TOKENIZER_KINDS = ["directory", "json", "safetensors", "empty"]


@pytest.mark.parametrize("where", ["train", "import", "load_run"])
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_a_tokenizer_that_is_no_tokenizer_is_named_in_one_line(where, kind, hf32, imported, tmp_path):
  """Issue 15: data.tokenizer_path, an HF dir's tokenizer.model, a workdir's tokenizer.model."""
  from llama_jax.errors import ConfigError
  if where == "train":
    target = path = str(tmp_path / "tok.model")
  elif where == "import":
    target = str(tmp_path / "hf")
    shutil.copytree(hf32[0], target)
    path = os.path.join(target, "tokenizer.model")
    os.remove(path)
  else:
    target = str(tmp_path / "run")
    shutil.copytree(imported, target)
    path = os.path.join(target, "tokenizer.model")
    os.remove(path)
  looks = _bad_file(kind, path, hf32[0])
  with pytest.raises(ConfigError) as e:
    _call(where, target, hf32[0], imported, tmp_path)
  line = str(e.value)
  assert "\n" not in line and f"{path} {looks}" in line and "not a tokenizer file" in line, line
  assert not os.path.exists(tmp_path / "new")


def _not_llama(hf_dir):
  _edit_json(os.path.join(hf_dir, "config.json"), model_type="mistral")


def _no_safetensors(hf_dir):
  os.remove(os.path.join(hf_dir, "model.safetensors"))


def _no_config(hf_dir):
  os.remove(os.path.join(hf_dir, "config.json"))


def _bad_json(hf_dir):
  open(os.path.join(hf_dir, "config.json"), "w").write('{"model_type": "llama",')


@pytest.mark.parametrize("entry,make,culprit", [
    # --hf_dir
    ("import", lambda d, w, t: os.path.join(d, "model.safetensors"), "model.safetensors is a safetensors file, not a "
                                                                      "Hugging Face checkpoint directory"),
    ("import", lambda d, w, t: w, "is a llama_jax workdir (it has checkpoints/), not a Hugging Face checkpoint"),
    ("import", lambda d, w, t: (_no_config(d), d)[1], "is not an HF checkpoint: no config.json"),
    ("import", lambda d, w, t: (_not_llama(d), d)[1], "config.json has model_type='mistral', expected 'llama'"),
    ("import", lambda d, w, t: (_no_safetensors(d), d)[1], "no *.safetensors files in"),
    ("import", lambda d, w, t: (_bad_json(d), d)[1], "config.json is not JSON"),
    # --config of import-hf
    ("import_config", lambda d, w, t: d, "is a Hugging Face checkpoint directory (it has config.json), not a Python "
                                          "config file"),
    ("import_config", lambda d, w, t: os.path.join(d, "config.json"), "config.json is a JSON file, not a Python config"),
    ("import_config", lambda d, w, t: str(t / "nothing.py"), "nothing.py does not exist"),
    ("import_config", lambda d, w, t: (open(t / "c.py", "w").write("x = 1\n"), str(t / "c.py"))[1],
     "c.py has no get_config() function"),
    # --workdir of eval.py / generate
    ("load_run", lambda d, w, t: d, "is a Hugging Face checkpoint directory (it has config.json), not a llama_jax "
                                    "workdir: import it first"),
    ("load_run", lambda d, w, t: os.path.join(w, "tokenizer.model"), "tokenizer.model is a file: no checkpoints "
                                                                       "directory"),
    ("load_run", lambda d, w, t: (os.mkdir(t / "e"), str(t / "e"))[1], "is an empty directory: no checkpoints"),
    # config.init_from
    ("init_from", lambda d, w, t: d, "is a Hugging Face checkpoint directory (it has config.json), not a llama_jax "
                                     "workdir: import it"),
    ("init_from", lambda d, w, t: os.path.join(w, "tokenizer.model"), "which is a file (run it first"),
])
def test_a_path_that_is_not_what_the_flag_says_is_named_in_one_line(entry, make, culprit, hf32, imported, tmp_path):
  """Issue 15: --hf_dir, import-hf's --config, --workdir, config.init_from, before any work."""
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(hf32[0], hf_dir)
  target = make(hf_dir, imported, tmp_path)
  with pytest.raises((ValueError, FileNotFoundError)) as e:  # ConfigError is a ValueError
    _call(entry, target, hf_dir, imported, tmp_path)
  line = str(e.value)
  assert "\n" not in line and culprit in line and (str(target) in line or os.path.basename(target) in line), line
  assert not os.path.exists(tmp_path / "new")


def test_convert_cli_says_a_bad_hf_dir_in_one_line(imported, tmp_path):
  """The command line ends with the one line (status 1, no traceback), and writes nothing."""
  proc = subprocess.run([sys.executable, "-m", "llama_jax.convert", "import-hf", f"--hf_dir={imported}",
                         f"--workdir={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (f"error: --hf_dir {imported} is a llama_jax workdir (it has "
                                                  "checkpoints/), not a Hugging Face checkpoint directory")
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- a default import, eval.py's checks

def test_a_default_config_import_stores_rows_the_model_takes_and_eval_scores_it(hf32, tmp_path, capsys):
  """configs/llama.py's data.seq_len 4096 beside a model of max_seq_len 32 ran eval.py out of memory."""
  from llama_jax import checkpoint as ckpt_lib, convert, evaluate
  from llama_jax.errors import ConfigError
  workdir = str(tmp_path / "run")
  llama, _ = convert.import_hf(hf32[0], workdir)  # --config configs/llama.py
  assert "the saved config has data.seq_len 32" in capsys.readouterr().out
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert checkpointer.restore_config(0).data.seq_len == llama.max_seq_len == 32
  checkpointer.close()
  spec = "jsonl:" + str(tmp_path / "pairs.jsonl")
  (tmp_path / "pairs.jsonl").write_text('{"prompt": "Who is there?", "response": "Nay, answer me."}\n' * 3)
  result = evaluate.evaluate_checkpoint(workdir, corpus_spec=spec, exact_match_examples=3, data_format="sft")
  assert result["seq_len"] == 32 and result["exact_match_examples"] == 3 and result["num_tokens"] > 0
  with pytest.raises(ConfigError, match=r"^--seq_len=64 exceeds the model's max_seq_len=32$"):
    evaluate.evaluate_checkpoint(workdir, corpus_spec=spec, seq_len=64)
  # eval.py's --output: checked before anything is loaded or scored, in one line.
  with pytest.raises(ConfigError, match=r"^--output /nonexistent/x.json: directory /nonexistent does not exist$"):
    evaluate.check_output("/nonexistent/x.json")
  proc = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", f"--output={tmp_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == f"error: --output {tmp_path} is a directory; give a file name"


@pytest.mark.parametrize("content,culprit", [
    ('{"stop_ids": [999]}', "stop id 999 is outside the vocabulary [0, 320)"),
    ('{"stop_ids": [2, 5', 'is not {"stop_ids": [id, ...]}: '),
    (b'{"stop_ids": [2]}\xff', 'is not {"stop_ids": [id, ...]}: '),
    ('{"stop_ids": [true]}', "stop_ids=[True] is not a non-empty list of token ids"),
])
def test_a_bad_generation_json_is_named_in_one_line(content, culprit, hf32, tmp_path):
  from llama_jax import run_setup
  from llama_jax.errors import ConfigError
  path = tmp_path / "generation.json"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  tok = tok_lib.load_tokenizer(os.path.join(hf32[0], "tokenizer.model"))
  with pytest.raises(ConfigError) as e:
    run_setup.stop_ids(str(tmp_path), tok)
  assert str(e.value).startswith(str(path)) and culprit in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_failed_array_read_says_its_cause_not_the_tensorstore_spec():
  """orbax wraps tensorstore's error (which names the file) in one ending in a bound method's repr."""
  from llama_jax import checkpoint as ckpt_lib
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error reading local file "/w/checkpoints/3/state/d/ab": size 10\nmore')
    except ValueError as cause:
      raise Exception("Encountered error while reading array index: (slice(0, 4),). See full TensorStore "
                      "details: <bound method pybind11_detail_function_record_v1_.spec of Spec({...})>.") from cause
  except Exception as e:  # noqa: BLE001
    line = ckpt_lib._first_line(e)
  assert line == 'OUT_OF_RANGE: Error reading local file "/w/checkpoints/3/state/d/ab": size 10'


def test_convert_names_an_unknown_subcommand():
  proc = subprocess.run([sys.executable, "-m", "llama_jax.convert", "bogus"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown subcommand 'bogus'; usage: ")
