"""import-hf -> eval.py / train.py continue from it -> export-hf gives back the same tensors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_test_config  # noqa: E402
from llama_jax import config_lib, corpus, tokenizer as tok_lib  # noqa: E402
from test_hf import hf_model, read_safetensors, save_hf  # noqa: E402
from test_train import ROOT, _flat  # noqa: E402


def _run(*args):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
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
             "--config=configs/tiny.py", "--check")
  check = float(out.split("transformers = ")[1].split()[0])
  assert check < 1e-4, out

  _run("eval.py", f"--workdir={workdir}", f"--output={tmp_path / 'eval.json'}")
  assert json.loads((tmp_path / "eval.json").read_text())["step"] == 0

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
