"""End to end: train_and_evaluate, exact resume, eval.py, and bad input on the command line."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_test_config
from llama_jax import config_file, config_lib, run_setup, trainer
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def eval_corpus():
  """The first 3,000 characters of each held-out play: scored in a second."""
  return "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, eval_corpus):
  """One tiny run of 8 steps on one device; its workdir and result."""
  workdir = str(tmp_path_factory.mktemp("run") / "tiny")
  config = tiny_test_config(**{"data.eval_corpus": eval_corpus, "sample.every": 4, "sample.max_new_tokens": 5})
  result = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir, config, result


def _events(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_and_evaluate_logs_falling_loss_and_eval(trained):
  workdir, _, result = trained
  events = _events(workdir)
  train = [e for e in events if "loss" in e]
  assert [e["step"] for e in train] == list(range(1, 9))
  assert all({"learning_rate", "tokens_per_sec", "grad_norm"} <= set(e) for e in train)
  assert train[-1]["loss"] < train[0]["loss"] - 0.1
  (final,) = [e for e in events if "eval_loss" in e]
  assert final["step"] == 8
  assert final["eval_perplexity"] == pytest.approx(np.exp(final["eval_loss"]))
  assert 0 < final["eval_bits_per_byte"] < 8
  assert result["bits_per_byte"] == final["eval_bits_per_byte"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  samples = [e for e in events if "sample" in e]  # every sample.every steps, and at the end
  assert [e["step"] for e in samples] == [4, 8]
  assert all(e["sample"].startswith("ROMEO.\n") for e in samples)


def test_generate_cli_prints_json_per_prompt_and_decode_speed(trained):
  workdir, _, _ = trained
  proc = _run("-m", "llama_jax.generate", f"--workdir={workdir}", "--prompt=ROMEO.", "--prompt=O, what a rogue",
              "--max_new_tokens=6", "--temperature=0", "--json")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(rows) == 2 and all(set(r) == {"prompt_ids", "ids", "text"} for r in rows)
  assert all(1 <= len(r["ids"]) <= 6 for r in rows) and rows[0]["prompt_ids"][0] == 1  # BOS first
  again = _run("-m", "llama_jax.generate", f"--workdir={workdir}", "--prompt_ids=" + " ".join(map(str, rows[0]["prompt_ids"])),
               "--max_new_tokens=6", "--temperature=0", "--json")
  assert json.loads(again.stdout)["ids"] == rows[0]["ids"]  # ids in, the same greedy tokens out
  proc = _run("-m", "llama_jax.generate", f"--workdir={workdir}", "--prompt=ROMEO.", "--max_new_tokens=6",
              "--top_k=5", "--top_p=0.9")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("ROMEO.")
  assert "decode" in proc.stdout.splitlines()[-1] and "tokens/s" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("args,culprit", [
    (["--prompt="], "--prompt 1 is empty"),
    (["--prompt=ROMEO.", "--max_new_tokens=40"], "> the model's max_seq_len 32"),
    (["--prompt=ROMEO.", "--top_p=0"], "top_p=0.0: must lie in (0, 1]"),
    (["--prompt=a", "--prompt_ids=1 2"], "not both"),
    (["--prompt_ids=1 x"], "is not a list of integers"),
])
def test_generate_cli_bad_input_is_one_line(trained, args, culprit):
  proc = _run("-m", "llama_jax.generate", f"--workdir={trained[0]}", *args)
  assert proc.returncode != 0
  assert culprit in proc.stderr.strip().splitlines()[-1], proc.stderr
  assert "Traceback" not in proc.stderr


def test_resume_from_a_checkpoint_equals_training_straight(tmp_path, trained, eval_corpus):
  straight_dir, config, _ = trained
  config = config.copy_and_resolve_references()
  config.train.async_checkpoint = True  # the default: the data position is read when the save starts
  resumed_dir = str(tmp_path / "resumed")
  assert trainer.train_and_evaluate(config, resumed_dir, devices=jax.devices()[:1], stop_after=4) is None
  assert os.listdir(os.path.join(resumed_dir, "checkpoints")) == ["4"]
  trainer.train_and_evaluate(config, resumed_dir, devices=jax.devices()[:1])

  losses = lambda d: {e["step"]: e["loss"] for e in _events(d) if "loss" in e}
  assert losses(resumed_dir) == losses(straight_dir)
  _, params_a, _, _ = run_setup.load_run(straight_dir, 8, devices=jax.devices()[:1])
  _, params_b, _, _ = run_setup.load_run(resumed_dir, 8, devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_resume_with_the_splash_kernel_equals_training_straight(tmp_path, trained):
  """The splash kernel (Pallas interpret mode on a CPU) resumes exactly too. Two runs, not three: a
  straight run of 4 steps, and a copy of its workdir without checkpoint 4 (as if that save had never
  finished), resumed from checkpoint 2."""
  config = trained[1].copy_and_resolve_references()
  config.model.attention = "splash"
  config.train.steps, config.train.checkpoint_every, config.sample.max_new_tokens = 4, 2, 0
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train_and_evaluate(config, straight_dir, devices=jax.devices()[:1])
  shutil.copytree(straight_dir, resumed_dir)
  assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == ["2", "4"]
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))
  logged = len(_events(resumed_dir))
  trainer.train_and_evaluate(config, resumed_dir, devices=jax.devices()[:1])

  straight = {e["step"]: e["loss"] for e in _events(straight_dir) if "loss" in e}
  resumed = {e["step"]: e["loss"] for e in _events(resumed_dir)[logged:] if "loss" in e}  # this run's own
  assert resumed == {3: straight[3], 4: straight[4]}
  _, params_a, _, _ = run_setup.load_run(straight_dir, 4, devices=jax.devices()[:1])
  _, params_b, _, _ = run_setup.load_run(resumed_dir, 4, devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def _run(*args, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_eval_py_writes_the_json(trained, tmp_path):
  workdir, _, result = trained
  out = tmp_path / "eval.json"
  proc = _run("eval.py", f"--workdir={workdir}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  written = json.loads(out.read_text())
  assert set(written) == {"step", "dtype", "seq_len", "loss", "perplexity", "bits_per_byte", "num_tokens"}
  assert written["step"] == 8 and written["dtype"] == "float32"  # the run's model.dtype: no --dtype given
  assert written["bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-5)
  assert "bits/byte" in proc.stdout

  proc = _run("eval.py", f"--workdir={workdir}", "--step=5")
  assert proc.returncode != 0 and "--step 5: no such checkpoint" in proc.stderr


def test_second_run_resumes_and_finishes_at_once(trained):
  workdir, config, _ = trained
  before = _events(workdir)
  proc = _run("train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
              *[f"--config.{k}={v}" for k, v in _flat(config).items()])
  assert proc.returncode == 0, proc.stderr
  assert "resumed from step 8" in proc.stdout
  assert "step 1/" not in proc.stdout
  assert [e for e in _events(workdir) if "loss" in e] == [e for e in before if "loss" in e]


def train_cmd(workdir, config, *extra):
  """`python train.py` running `config` (as overrides of configs/tiny.py) in `workdir`."""
  return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in _flat(config).items()], *extra]


def subprocess_env(compilation_cache=None):
  """This session's environment without its 8 fake devices: a subprocess picks its own.

  compilation_cache: a directory for a JAX compilation cache that the processes of one test share, so
  that from the second on they load what the first compiled (most of a tiny train.py's time on a CPU).
  Only where no process is killed while it compiles: jax writes an entry from process 0 alone, right after
  its compile, and not atomically (jax/_src/lru_cache.py). A SIGTERM after a run's first step cuts no write short
  (it sets a flag; preemption.py), and a torn entry would be a warning and a fresh compile in the
  process that reads it (jax/_src/compiler.py: _cache_read), never a wrong program.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if compilation_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _flat(config):
  """The overrides that turn configs/tiny.py into `config`."""
  from configs import tiny
  base = tiny.get_config()
  out = {}
  for section in config:
    if hasattr(config[section], "items"):
      for k, v in config[section].items():
        if base[section][k] != v:
          out[f"{section}.{k}"] = v
  return out


@pytest.mark.parametrize("args,culprit", [
    (["--config.train.stepz=3"], "stepz"),
    (["--config.train.steps=many"], "train.steps"),
    (["--workdir=/no/such/parent/run"], "/no/such/parent"),
    (["--config.data.tokenizer_path=/no/such/tokenizer.model"], "/no/such/tokenizer.model"),
    (["--config.data.tokenizer_path={tokenizer}"], "vocab"),
    (["--config.data.tokenizer_path={tmp}"], "is a directory, not a tokenizer file"),
    (["--workdir={tmp}/empty.jsonl"], "empty.jsonl is a file, not a directory"),
    (["--config.init_from={tmp}/empty.jsonl"], "which is a file (run it first"),
    (["--config.model.n_kv_heads=3"], "n_kv_heads"),
    (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "needs 3 devices, but there are 8"),
    (["--config.mesh.tensor=8"], "not divisible by mesh axes tensor = 8"),
    (["--config.data.train_corpus=jsonl:/no/such/*.jsonl"], "config.data.train_corpus: no files match '/no/such/*.jsonl'"),
    (["--config.data.train_corpus=mix:shakespeare:train=0"], "needs a finite weight > 0"),
    (["--config.data.eval_corpus=tfds:wiki40b/en@train", "--config.data.tfds_data_dir={tmp}"],
     "tfds dataset 'wiki40b/en' is not prepared in"),
    (["--config.data.eval_corpus=jsonl:{tmp}/empty.jsonl"], "has no documents"),
    (["--config.data.train_corpus=jsonl:{tmp}/bad.jsonl"], "bad.jsonl:2: not JSON"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, trained, args, culprit):
  tokenizer = run_setup.tokenizer_path(trained[0])  # 320 pieces; configs/tiny.py wants 1024
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": tru\n')
  args = [a.format(tokenizer=tokenizer, tmp=tmp_path) for a in args]
  if any("bad.jsonl" in a for a in args):  # its tokenizer must match, to get as far as reading the data
    args.append(f"--config.data.tokenizer_path={tokenizer}")
    args.append("--config.model.vocab_size=320")
  workdir = [a for a in args if a.startswith("--workdir")] or [f"--workdir={tmp_path / 'w'}"]
  args = [a for a in args if not a.startswith("--workdir")]
  proc = _run("train.py", "--config=configs/tiny.py", *workdir, *args)  # its timeout is the hang guard
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert culprit in last, proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("overrides,message", [
    ({"model.n_layers": 0}, "config.model.n_layers=0: must be an integer >= 1"),
    ({"model.n_heads": 0}, "config.model.n_heads=0: must be an integer >= 1"),
    ({"model.rope_theta": 0.0}, "config.model.rope_theta=0.0: must be a finite number > 0"),
    ({"model.norm_eps": float("inf")}, "config.model.norm_eps=inf: must be a finite number > 0"),
    ({"model.rope_scaling": {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                             "original_max_seq_len": 16}}, "high_freq_factor=4.0 must exceed low_freq_factor=4.0"),
    ({"model.rope_scaling": {"factor": -1.0}}, "config.model.rope_scaling.factor=-1.0: must be a finite number > 0"),
    ({"optim.learning_rate": float("nan")}, "config.optim.learning_rate=nan: must be a finite number > 0"),
    ({"optim.grad_clip": -1.0}, "config.optim.grad_clip=-1.0: must be a finite number > 0"),
    ({"optim.warmup_steps": -5}, "config.optim.warmup_steps=-5: must be an integer >= 0"),
    ({"optim.b2": 1.0}, "config.optim.b2=1.0: must be a finite number in [0, 1)"),
    ({"optim.min_lr_ratio": 1.5}, "config.optim.min_lr_ratio=1.5: must be a finite number in [0, 1]"),
    ({"train.eval_every": -1}, "config.train.eval_every=-1: must be an integer >= 0"),
    ({"train.steps": 0}, "config.train.steps=0: must be an integer >= 1"),
    ({"optim.eps": 0.0}, "config.optim.eps=0.0: must be a finite number > 0"),
    ({"data.shuffle_seed": -1}, "config.data.shuffle_seed=-1: must be an integer >= 0"),
    ({"sample.top_p": 0.0}, "config.sample.top_p=0.0: must be a finite number in (0, 1]"),
    ({"sample.temperature": -0.5}, "config.sample.temperature=-0.5: must be a finite number >= 0"),
])
def test_check_config_refuses_a_number_out_of_its_range(overrides, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.check_config(tiny_test_config(**overrides))


@pytest.mark.parametrize("arg,message", [
    ("{tmp}/missing.py", "--config {tmp}/missing.py does not exist"),
    ("{tmp}", "--config {tmp} is a directory, not a Python config file"),
    ("{tmp}/some.jsonl", "--config {tmp}/some.jsonl is a JSON file, not a Python config file"),
    ("{tmp}/syn.py", "--config {tmp}/syn.py: line 1: "),
    ("{tmp}/noget.py", "--config {tmp}/noget.py has no get_config() function"),
    ("{tmp}/imports.py", "importing it raised ModuleNotFoundError: No module named 'no_such_module' (line 1)"),
    ("{tmp}/raises.py", "get_config() raised ZeroDivisionError: division by zero (line 2)"),
    ("configs/llama.py:bogus", "--config configs/llama.py:bogus: unknown preset 'bogus'; have llama1-7b"),
    ("configs/llama.py:", "--config configs/llama.py:: unknown preset ''"),
    ("configs/tiny.py:foo", "configs/tiny.py's get_config() takes no argument; drop ':foo'"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, arg, message):
  (tmp_path / "some.jsonl").write_text('{"text": "a"}\n')
  (tmp_path / "syn.py").write_text("def get_config(:\n")
  (tmp_path / "noget.py").write_text("x = 1\n")
  (tmp_path / "imports.py").write_text("import no_such_module\n")
  (tmp_path / "raises.py").write_text("def get_config():\n  return 1 / 0\n")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with pytest.raises(ConfigError, match=re.escape(message.format(tmp=tmp_path))):
      config_file.load_config_file(arg.format(tmp=tmp_path))
  finally:
    os.chdir(cwd)


def test_bench_with_a_missing_config_file_is_one_line(tmp_path):
  proc = _run("-m", "llama_jax.bench", f"--config={tmp_path}/missing.py")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [f"error: --config {tmp_path}/missing.py does not exist"], proc.stderr
