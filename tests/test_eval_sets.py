"""Named held-out sets (data.eval_corpora) per set with their macro mean, every checkpoint of a run scored
once (eval.py --all_steps), and lm-eval tasks during training (eval.tasks, eval.harness_every)."""

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_test_config
from llama_jax import config_lib, eval_steps, evaluate, plot, run_setup, trainer
from llama_jax import corpus as corpus_lib
from llama_jax import tokenizer as tok_lib
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")


def _write_sets(directory):
  """Two small held-out sets of other kinds of text than the plays: {name: spec}."""
  code = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(12)]
  (directory / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in code))
  (directory / "sonnet.txt").write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more "
                                        "temperate:\nRough winds do shake the darling buds of May,\n" * 4)
  return {"code": f"jsonl:{directory / 'code.jsonl'}", "verse": f"text:{directory / 'sonnet.txt'}"}


# A shipped lm-eval task with a continuous score (a rolling perplexity: scores from other params differ),
# on its first document only.
TASK, LIMIT = "plays_perplexity", 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run of 8 steps on one device with two named held-out sets beside data.eval_corpus, scored
  every 4 steps, and TASK every 4 steps; checkpoints at 2, 4, 6 and 8. Nothing reaches a hub meanwhile."""
  directory = tmp_path_factory.mktemp("sets")
  sets = _write_sets(directory)
  # A tokenizer trained on two plays: seconds less than on the run's whole training corpus.
  tokenizer = tok_lib.train_sentencepiece(tok_lib.training_lines(corpus_lib.shakespeare_plays("train")[:2]), 320,
                                          str(directory / "tok.model")).path
  config = tiny_test_config(**{"data.eval_corpus": HELDOUT, "data.eval_corpora": sets, "data.tokenizer_path": tokenizer,
                               "train.eval_every": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 4,
                               "eval.tasks": (TASK,), "eval.harness_every": 4, "eval.harness_limit": LIMIT})
  workdir = str(directory / "tiny")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()) as log:
      result = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    (directory / "stdout.txt").write_text(log.getvalue())  # the run's log lines, read by a test below
    yield workdir, sets, result


def _events(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_mid_run_eval_prints_its_sets_in_the_log(run):
  workdir, _, _ = run
  with open(os.path.join(os.path.dirname(workdir), "stdout.txt")) as f:
    log = f.read()
  (mid,) = [e for e in _events(workdir) if "eval_loss" in e and e["step"] == 4]
  assert f"held-out at step 4: loss {mid['eval_loss']:.4f} | perplexity {mid['eval_perplexity']:.3f}" in log, log
  assert f"code: loss {mid['eval_code_loss']:.4f}" in log, log
  assert "held-out at step 8" not in log  # the final eval prints as "held-out:" once


def test_each_named_set_is_reported_with_the_macro_mean(run):
  workdir, sets, result = run
  # The reference: each set scored alone by an Evaluator of its own, as eval.py --corpus scores one corpus.
  setup, params, tok, _ = run_setup.load_run(workdir, 8, devices=jax.devices()[:1])
  alone = {name: evaluate.Evaluator(setup, tok, corpus_lib.open_corpus(spec))(params)
           for name, spec in {"": HELDOUT, **sets}.items()}
  evals = {e["step"]: e for e in _events(workdir) if "eval_loss" in e}
  assert sorted(evals) == [4, 8]
  final = evals[8]
  for name, scores in alone.items():
    prefix = f"eval_{name}_" if name else "eval_"
    for k in ("loss", "perplexity", "bits_per_byte"):
      assert final[prefix + k] == pytest.approx(scores[k], rel=1e-5), (name, k)
    assert final[prefix + "num_tokens"] == scores["num_tokens"] > 0
  losses = np.array([s["loss"] for s in alone.values()])
  assert len(set(np.round(losses, 3))) == 3  # three different sets, so the mean is a real mean
  assert final["eval_mean_loss"] == pytest.approx(losses.mean(), rel=1e-5)
  assert final["eval_mean_bits_per_byte"] == pytest.approx(np.mean([s["bits_per_byte"] for s in alone.values()]),
                                                           rel=1e-5)
  geometric = np.exp(np.mean(np.log([s["perplexity"] for s in alone.values()])))
  assert final["eval_mean_perplexity"] == pytest.approx(geometric, rel=1e-5)
  # The trainer's result and eval.py's (evaluate_checkpoint without --corpus) hold the same report.
  assert result["sets"]["code"]["loss"] == final["eval_code_loss"]
  assert result["mean"]["loss"] == final["eval_mean_loss"]
  assert result["loss"] == final["eval_loss"]
  scored = evaluate.evaluate_checkpoint(workdir, 8)
  assert set(scored["sets"]) == {"code", "verse"}
  assert scored["sets"]["verse"]["bits_per_byte"] == pytest.approx(final["eval_verse_bits_per_byte"], rel=1e-5)
  assert scored["mean"]["perplexity"] == pytest.approx(final["eval_mean_perplexity"], rel=1e-5)

  fig = plot.plot_runs([workdir])
  eval_panel = fig.axes[1]
  assert [line.get_label() for line in eval_panel.get_lines()] == ["tiny: eval_corpus", "tiny: code", "tiny: verse"]
  assert [list(line.get_xdata()) for line in eval_panel.get_lines()] == [[4, 8]] * 3
  assert eval_panel.get_lines()[1].get_ydata()[1] == final["eval_code_bits_per_byte"]


@pytest.mark.parametrize("sets,message", [
    ({"bad-name": HELDOUT}, "config.data.eval_corpora.bad-name: the name must be letters, digits and _"),
    ({"2nd": HELDOUT}, "config.data.eval_corpora.2nd: the name must be"),
    ({"mean": HELDOUT}, "config.data.eval_corpora.mean: the name 'mean' is taken by the sets' macro mean"),
    ({"code": ""}, "config.data.eval_corpora.code='': must be a corpus spec"),
    ({"code": 3}, "config.data.eval_corpora.code=3: must be a corpus spec"),
])
def test_a_bad_named_set_is_one_line_naming_it(sets, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.check_config(tiny_test_config(**{"data.eval_corpora": sets}))


def test_a_named_set_that_cannot_be_opened_is_named_before_training(tmp_path):
  config = tiny_test_config(**{"data.eval_corpora": {"code": f"jsonl:{tmp_path}/none/*.jsonl"}})
  with pytest.raises(ConfigError, match=re.escape("config.data.eval_corpora.code: no files match")):
    trainer.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "w")


def test_no_held_out_set_at_all_is_refused():
  with pytest.raises(ConfigError, match="config.data.eval_corpus is empty and config.data.eval_corpora names no set"):
    config_lib.check_config(tiny_test_config(**{"data.eval_corpus": ""}))


def test_a_checkpoint_config_from_before_the_sets_and_tasks_still_loads():
  old = tiny_test_config().to_dict()
  del old["data"]["eval_corpora"], old["eval"]
  import ml_collections
  upgraded = config_lib.with_added_keys(ml_collections.ConfigDict(old))
  assert dict(upgraded.data.eval_corpora) == {} and tuple(upgraded.eval.tasks) == ()
  assert upgraded.eval.harness_every == 0 and upgraded.eval.num_fewshot is None
  config_lib.check_config(upgraded)
  assert config_lib.eval_set_specs(upgraded.data) == {"": "shakespeare:heldout"}


def test_macro_mean_is_the_mean_loss_and_the_geometric_mean_perplexity():
  scores = [evaluate.scores(2.0 * n, n, 8 * n) for n in (10.0, 30.0)]  # loss 2 (per token) twice
  scores.append(evaluate.scores(1.0 * 10, 10.0, 40))
  mean = evaluate.macro_mean(scores)
  assert mean["loss"] == pytest.approx(5 / 3)
  assert mean["perplexity"] == pytest.approx(math.exp(5 / 3))
  assert evaluate.macro_mean([evaluate.scores(1e6, 1.0, 1), scores[0]])["perplexity"] == math.inf


def _records(workdir):
  with open(os.path.join(workdir, "eval_steps.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_all_steps_scores_every_checkpoint_once_and_plots_them(run, tmp_path):
  workdir, sets, _ = run
  out = eval_steps.evaluate_all_steps(workdir)
  records = _records(workdir)
  assert [r["step"] for r in records] == [2, 4, 6, 8] == out["steps"]
  assert all(set(r["request"]) == {"corpora"} for r in records)
  assert records[0]["request"]["corpora"]["sets"] == {"": HELDOUT, **sets}
  final = [e for e in _events(workdir) if "eval_loss" in e][-1]  # the trainer's at step 8
  final = {k: v for k, v in final.items() if k.startswith("eval_")}
  assert records[-1]["scores"].keys() == final.keys()
  for k, v in final.items():
    assert records[-1]["scores"][k] == pytest.approx(v, rel=1e-5), k
  losses = [r["scores"]["eval_mean_loss"] for r in records]
  assert losses == sorted(losses, reverse=True)  # each checkpoint's own params: the loss falls
  png = os.path.join(workdir, "eval_steps.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  fig = plot.plot_runs([workdir])
  assert [list(line.get_xdata()) for line in fig.axes[1].get_lines()] == [[2, 4, 6, 8]] * 3
  # Again: nothing is scored, nothing is appended, and the output says so.
  again = eval_steps.evaluate_all_steps(workdir)
  assert again["scored"] == [] and _records(workdir) == records


def test_tasks_run_during_training_at_the_expected_steps(run):
  workdir, _, result = run
  events = [e for e in _events(workdir) if any("/" in k for k in e)]
  assert [e["step"] for e in events] == [4, 8]  # eval.harness_every, and the end
  metrics = {f"{TASK}/word_perplexity", f"{TASK}/byte_perplexity", f"{TASK}/bits_per_byte"}
  assert all(set(e) == {"step"} | metrics for e in events)
  assert events[1][f"{TASK}/bits_per_byte"] < events[0][f"{TASK}/bits_per_byte"]  # the live params: trained more
  assert result["tasks"] == {k: v for k, v in events[1].items() if k != "step"}


def _eval_py(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_all_steps_with_tasks_scores_each_checkpoint_once(run):
  """eval.py --all_steps --tasks: the task of every checkpoint (the held-out sets were scored by the test
  above, or are scored now), equal at steps 4 and 8 to what the trainer scored on its live params; a
  second call scores nothing."""
  workdir, _, _ = run
  eval_steps.evaluate_all_steps(workdir, tasks=[TASK], limit=LIMIT)
  records = [r for r in _records(workdir) if "tasks" in r["request"]]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert records[0]["request"]["tasks"] == {"tasks": [TASK], "num_fewshot": None, "limit": LIMIT,
                                            "include_path": None, "dtype": "float32", "max_length": None}
  trained = {e["step"]: e for e in _events(workdir) if any("/" in k for k in e)}
  for r in records[1::2]:
    for k, v in r["tasks"].items():
      assert v == pytest.approx(trained[r["step"]][k], rel=1e-4), (r["step"], k)
  bits = [r["tasks"][f"{TASK}/bits_per_byte"] for r in records]
  assert len(set(bits)) == 4  # each step's own params
  fig = plot.plot_runs([workdir])
  panel = next(ax for ax in fig.axes if ax.get_title() == f"{TASK}/bits_per_byte")
  assert list(panel.get_lines()[0].get_xdata()) == [2, 4, 6, 8]
  assert list(panel.get_lines()[0].get_ydata()) == pytest.approx(bits)

  before = open(os.path.join(workdir, "eval_steps.jsonl")).read()
  again = _eval_py(f"--workdir={workdir}", "--all_steps", f"--tasks={TASK}", f"--limit={LIMIT}")
  assert again.returncode == 0, again.stderr
  assert "nothing scored: all 4 checkpoints (steps 2, 4, 6, 8) were scored before" in again.stdout
  assert open(os.path.join(workdir, "eval_steps.jsonl")).read() == before


def test_all_steps_refuses_bad_task_flags_before_loading(run):
  with pytest.raises(ConfigError, match="num_fewshot 40: task plays_speaker has 32 few-shot examples"):
    eval_steps.evaluate_all_steps(run[0], tasks=["plays_speaker"], num_fewshot=40)
