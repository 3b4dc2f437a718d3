"""The shipped lm-eval tasks and llama_jax.harness.tasks (issue 18): the committed data equal a rebuild;
the same numbers through our backend as through lm-eval's own `hf` backend on the HF checkpoint
(acceptance 1); one line for each bad input, before any model loads (acceptance 6)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llama_jax import paths
from llama_jax.errors import ConfigError
from llama_jax.harness import build_tasks
from llama_jax.harness import tasks as tasks_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["plays_continue", "plays_perplexity", "plays_speaker"]


# ---------------------------------------------------------------------------- the shipped data


def test_the_committed_task_data_equal_a_rebuild():
  built = build_tasks.task_files()
  committed = {paths.name(p) for p in paths.glob(paths.join(build_tasks.LOCAL_TASKS_DIR, "*.jsonl"))}
  assert committed == set(built)
  for name, text in built.items():
    assert paths.read_text(paths.join(build_tasks.LOCAL_TASKS_DIR, name)) == text, (
        f"{name} differs from a rebuild: run python -m llama_jax.harness.build_tasks")
  counts = {name: text.count("\n") for name, text in built.items()}
  assert counts == {"plays_speaker.jsonl": 200, "plays_speaker_fewshot.jsonl": 32, "plays_perplexity.jsonl": 18,
                    "plays_continue.jsonl": 200, "plays_continue_fewshot.jsonl": 32}


def test_the_shipped_tasks_load_from_any_working_directory(tmp_path, monkeypatch):
  """lm-eval reads data_files from the working directory; tasks.py hands it absolute paths."""
  monkeypatch.chdir(tmp_path)
  loaded = tasks_lib.task_manager([tasks_lib.SHIPPED_TAG]).load([tasks_lib.SHIPPED_TAG])["tasks"]
  assert sorted(loaded) == SHIPPED == tasks_lib.shipped_tasks()
  assert [len(loaded[t].eval_docs) for t in SHIPPED] == [200, 18, 200]
  for line in paths.read_text(paths.join(build_tasks.LOCAL_TASKS_DIR, "plays_speaker.jsonl")).splitlines():
    doc = json.loads(line)  # 4 different speakers of the same line, after a blank line
    assert doc["context"].endswith("\n\n") and len({c.split("\n")[1] for c in doc["choices"]}) == 1
    assert len({c.split("\n")[0] for c in doc["choices"]}) == 4 and 0 <= doc["label"] < 4


# ---------------------------------------------------------------------------- bad input


def test_an_unknown_task_names_the_closest(monkeypatch):
  with pytest.raises(ConfigError, match=r"unknown task 'plays_speakr'.*did you mean plays_speaker"):
    tasks_lib.check_tasks(["plays_speaker", "plays_speakr"])


def test_a_dataset_not_on_disk_says_what_to_fetch(tmp_path):
  (tmp_path / "mine.yaml").write_text(
      "task: mine_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {tmp_path / 'absent.jsonl'}\noutput_type: loglikelihood_rolling\ntest_split: test\n"
      "doc_to_text: ''\ndoc_to_target: text\n")
  (tmp_path / "hub.yaml").write_text(
      "task: mine_hub\ndataset_path: nobody-here/no-such-dataset\ndataset_name: small\n"
      "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: text\n")
  with pytest.raises(ConfigError, match=r"^task mine_local: a data file of its dataset is missing: .*absent\.jsonl"):
    tasks_lib.check_tasks(["mine_local"], include_path=str(tmp_path))
  with pytest.raises(ConfigError) as e:
    tasks_lib.check_tasks(["plays_speaker", "mine_hub"], include_path=str(tmp_path))
  line = str(e.value)
  assert "\n" not in line and line.startswith("task mine_hub: nobody-here/no-such-dataset (small) is not on disk")
  assert ("HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c \"import datasets; "
          "datasets.load_dataset('nobody-here/no-such-dataset', 'small')\"") in line
  with pytest.raises(ConfigError, match=f"include_path {tmp_path / 'none'}: not a local directory"):
    tasks_lib.check_tasks(["plays_speaker"], include_path=str(tmp_path / "none"))


def test_num_fewshot_over_what_a_task_has():
  tasks_lib.check_tasks(["plays"], num_fewshot=32)  # plays_perplexity keeps its 0 (lm-eval's rule)
  with pytest.raises(ConfigError, match=r"^num_fewshot 33: task plays_speaker has 32 few-shot examples "
                                        r"\(the fewshot split\)$"):
    tasks_lib.check_tasks(["plays_speaker", "plays_perplexity"], num_fewshot=33)
  with pytest.raises(ConfigError, match="num_fewshot -1: must be >= 0"):
    tasks_lib.check_tasks(["plays_speaker"], num_fewshot=-1)


def test_eval_py_refuses_bad_tasks_in_one_line_before_any_model_loads(tmp_path):
  """The workdir does not even exist: the task's error comes first."""
  proc = subprocess.run([sys.executable, "eval.py", f"--workdir={tmp_path / 'no_run'}", "--tasks=plays_continue",
                         "--num_fewshot=40"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: num_fewshot 40: task plays_continue has 32 few-shot examples (the fewshot split)"), proc.stderr
  assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- same numbers as lm-eval's hf backend

MAX_LENGTH = 128  # the window of both backends: long prompts are cut from the left (counted)
DOCS = {"plays_speaker": list(range(24)), "plays_perplexity": [0, 1], "plays_continue": list(range(8))}  # scored


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
  """(HFLM on a random-weight fp32 LlamaForCausalLM with a 320-piece sentencepiece tokenizer, our LlamaLM on
  its `convert import-hf` workdir). torch computes on one thread meanwhile: tiny matmuls on two threads of a
  shared 2-core machine ran 6x slower."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from lm_eval.models.huggingface import HFLM

  from llama_jax import convert, corpus, run_setup
  from llama_jax import tokenizer as tok_lib
  from llama_jax.harness.lm import LlamaLM
  from test_hf import hf_model, save_hf, tiny

  tmp = tmp_path_factory.mktemp("harness_tasks")
  hf_dir = save_hf(hf_model(tiny(vocab_size=320, n_kv_heads=2, max_seq_len=MAX_LENGTH, rope_theta=10000.0), seed=5),
                   tmp / "hf")
  tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")[:2]), 320,
                              os.path.join(hf_dir, "tokenizer.model"))
  workdir = str(tmp / "run")
  convert.import_hf(hf_dir, workdir)
  setup, params, tok, _ = run_setup.load_run(workdir, devices=jax.devices()[:1])
  assert setup.llama.dtype == "float32"
  ours = LlamaLM(setup, params, tok, batch_size=4, max_length=MAX_LENGTH,
                 stop_ids=run_setup.stop_ids(workdir, tok, setup.llama.vocab_size))
  hf = HFLM(pretrained=hf_dir, backend="causal", dtype=torch.float32, device="cpu", batch_size=1,
            max_length=MAX_LENGTH, add_bos_token=True)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield hf, ours
  torch.set_num_threads(threads)


def _truncated(hf, samples, budget):
  """Requests whose tokens (by the HF tokenizer: context + continuation, or the prompt to generate from)
  exceed `budget`: what both backends cut from the left."""
  cut = 0
  for sample in samples:
    for context, second in sample["arguments"]:  # (context, continuation) or (context, generation kwargs)
      cut += len(hf.tok_encode(context + second if isinstance(second, str) else context)) > budget
  return cut


def test_same_numbers_as_lm_evals_hf_backend(hf_and_ours):
  from lm_eval import evaluator
  hf, ours = hf_and_ours
  for text in ("Who speaks this line in Hamlet? To be, or not to be\nHAMLET", "  two  spaces\n\nand lines"):
    assert ours.tok_encode(text) == hf.tok_encode(text)  # the same tokens: differences below are the backends'

  names = list(DOCS)
  theirs = evaluator.simple_evaluate(model=hf, tasks=names, task_manager=tasks_lib.task_manager(names), samples=DOCS,
                                     random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                     log_samples=True)
  mine = tasks_lib.run_tasks(ours, names, samples=DOCS, log_samples=True)
  assert {t: mine["n-samples"][t]["effective"] for t in names} == {t: len(d) for t, d in DOCS.items()}

  def per_doc(results, task, read):
    return [read(s) for s in results["samples"][task]]

  # multiple choice: per-choice log-likelihoods, acc and acc_norm
  read = lambda s: [r[0] for r in s["filtered_resps"]]  # noqa: E731
  np.testing.assert_allclose(per_doc(mine, "plays_speaker", read), per_doc(theirs, "plays_speaker", read), rtol=1e-4)
  # rolling perplexity: per-document log-likelihoods and the perplexities
  read = lambda s: s["filtered_resps"][0]  # noqa: E731
  np.testing.assert_allclose(per_doc(mine, "plays_perplexity", read), per_doc(theirs, "plays_perplexity", read),
                             rtol=1e-4)
  for task, metrics in (("plays_speaker", ("acc", "acc_norm")),
                        ("plays_perplexity", ("word_perplexity", "byte_perplexity", "bits_per_byte"))):
    for metric in metrics:
      assert mine["results"][task][f"{metric},none"] == pytest.approx(theirs["results"][task][f"{metric},none"],
                                                                       rel=1e-4), (task, metric)
  # greedy generation: the same strings
  read = lambda s: s["resps"][0][0]  # noqa: E731
  generated = per_doc(theirs, "plays_continue", read)
  assert per_doc(mine, "plays_continue", read) == generated and any(generated)
  assert mine["results"]["plays_continue"]["exact_match,none"] == theirs["results"]["plays_continue"]["exact_match,none"]

  # truncation from the left, counted as many as the HF tokens say
  scored = _truncated(hf, theirs["samples"]["plays_speaker"], MAX_LENGTH + 1)
  prompts = _truncated(hf, theirs["samples"]["plays_continue"], MAX_LENGTH - 16)  # the task's max_gen_toks: 16
  assert scored > 0 and prompts > 0
  assert mine["truncated"] == {"loglikelihood": scored, "loglikelihood_rolling": 0, "generate_until": prompts}

  # what eval.py prints and writes
  summary = tasks_lib.summary(mine)
  assert set(summary) == {"plays_speaker/acc", "plays_speaker/acc_norm", "plays_perplexity/word_perplexity",
                          "plays_perplexity/byte_perplexity", "plays_perplexity/bits_per_byte",
                          "plays_continue/exact_match"}
  assert summary["plays_speaker/acc"] == mine["results"]["plays_speaker"]["acc,none"]
  assert all(t in tasks_lib.table(mine) for t in names)
  record = tasks_lib.record(mine)
  assert "samples" not in record and record["truncated"] == mine["truncated"]
  json.dumps(record, allow_nan=False)


def test_a_glob_of_tasks_runs_the_tasks_it_matches(hf_and_ours):
  """lm-eval's simple_evaluate takes names only: run_tasks expands a glob as check_tasks does (before the
  fix, 'plays_perp*' passed the check and raised KeyError inside lm-eval)."""
  _, ours = hf_and_ours
  tasks_lib.check_tasks(["plays_perp*"])
  results = tasks_lib.run_tasks(ours, ["plays_perp*"], limit=1)
  assert set(results["results"]) == {"plays_perplexity"}
