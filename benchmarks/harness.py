"""Requests per second of the shipped multiple-choice task (plays_speaker: 200 lines x 4 speakers = 800
loglikelihood requests) through our lm-eval backend (llama_jax/harness/lm.py) and through lm-eval's own
`hf` backend (transformers, torch) on the same CPU and the same weights, in fp32.

  .venv-test/bin/python benchmarks/harness.py                       # configs/tiny.py's model, random weights
  .venv-test/bin/python benchmarks/harness.py --workdir runs/tiny   # a trained run (exported to HF for hf)
  .venv-test/bin/python benchmarks/harness.py --hf_batch_sizes 1,16,64 --batch_size 8 --rounds 3

The random model is configs/tiny.py's (1024-piece tokenizer trained on the plays here, max_seq_len 256);
its HF copy is written with convert.to_hf, as export-hf writes one. Both backends score the same
Instances, which lm-eval builds from the task (zero-shot), with the context window of the model; hf
loads the copy with add_bos_token=True (the BOS our backend prepends). Each round times ours once and hf
once per batch size, after one untimed warm-up of each (ours: the whole task, so that every call shape
it uses is compiled; hf: 64 requests); the median and the best round are printed, with the largest
relative difference of the log-likelihoods, and the shapes of our score calls. Needs
requirements-test.txt (torch, transformers) and accelerate (lm-eval's hf backend imports it).
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ and llama_jax/

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from llama_jax import convert, run_setup  # noqa: E402
from llama_jax import tokenizer as tok_lib  # noqa: E402
from llama_jax.harness import lm as lm_lib  # noqa: E402
from llama_jax.harness import tasks as tasks_lib  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (default: configs/tiny.py's model, random weights).")
_TASK = flags.DEFINE_string("task", "plays_speaker", "A multiple-choice (loglikelihood) task.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Ours: batch_size * max_seq_len tokens per score call.")
_HF_BATCH_SIZES = flags.DEFINE_list("hf_batch_sizes", ["1", "8", "32", "64"], "hf: requests per forward pass.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (each: ours, then hf at every batch size).")


def _random_tiny(tmp: str):
  """configs/tiny.py's model with random weights and a tokenizer trained on the plays."""
  from configs import tiny  # noqa: PLC0415
  from llama_jax import corpus  # noqa: PLC0415
  config = tiny.get_config()
  tok = tok_lib.train_sentencepiece(tok_lib.training_lines(corpus.shakespeare_plays("train")),
                                    config.model.vocab_size, os.path.join(tmp, "tokenizer.model"))
  setup = run_setup.Setup(config)
  return setup, setup.init_state()["params"], tok


def _hf_dir(setup, params, tok, tokenizer_path: str, hf_dir: str):
  convert.to_hf(setup.llama, jax.device_get(params), hf_dir, dtype="float32", bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id)
  shutil.copy(tokenizer_path, os.path.join(hf_dir, "tokenizer.model"))


def _instances(task_name: str):
  """The task's loglikelihood Instances, as lm-eval's evaluator builds them (zero-shot)."""
  task = tasks_lib.task_manager([task_name]).load([task_name])["tasks"][task_name]
  task.set_config(key="num_fewshot", value=0)
  task.build_all_requests(rank=0, world_size=1)
  return [inst for inst in task.instances if inst.request_type == "loglikelihood"]


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  import torch  # noqa: PLC0415
  from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

  tmp = tempfile.mkdtemp(prefix="harness-bench-")
  try:
    if _WORKDIR.value:
      setup, params, tok, step = run_setup.load_run(_WORKDIR.value, dtype="float32")
      what = f"{_WORKDIR.value} step {step}"
      tokenizer_path = run_setup.tokenizer_path(_WORKDIR.value)
    else:
      setup, params, tok = _random_tiny(tmp)
      what = "configs/tiny.py's model, random weights"
      tokenizer_path = tok.path
    hf_dir = os.path.join(tmp, "hf")
    _hf_dir(setup, params, tok, tokenizer_path, hf_dir)
    L = setup.llama.max_seq_len
    requests = _instances(_TASK.value)
    ours = lm_lib.LlamaLM(setup, params, tok, batch_size=_BATCH_SIZE.value)
    hfs = {int(b): HFLM(pretrained=hf_dir, add_bos_token=True, dtype="float32", batch_size=int(b), max_length=L,
                        device="cpu") for b in _HF_BATCH_SIZES.value}
    n = len(requests)
    print(f"{_TASK.value}: {n} loglikelihood requests | {what} | {setup.llama.dtype} | max_length {L} | "
          f"{len(jax.devices())} JAX device(s), torch {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    ours.loglikelihood(requests, disable_tqdm=True)  # compiles every call shape the task uses
    for hf in hfs.values():
      hf.loglikelihood(requests[:64], disable_tqdm=True)
    times = {"ours": [], **{b: [] for b in hfs}}
    results = {}
    for _ in range(_ROUNDS.value):
      ours.score_calls.clear()
      results["ours"], t = _timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
      times["ours"].append(t)
      for b, hf in hfs.items():
        results[b], t = _timed(lambda hf=hf: hf.loglikelihood(requests, disable_tqdm=True))
        times[b].append(t)
    # On a shared machine torch's threads can stall for seconds behind other jobs' (its rounds vary 10x
    # there): each line gives the median and the best round.
    shapes = ", ".join(f"{k} x [{rows}, {T}]" for (rows, T), k in ours.score_calls.items())
    ours_s, ours_best = statistics.median(times["ours"]), min(times["ours"])
    print(f"  ours (batch_size {ours.batch_size}: calls of {ours.batch_size * L} tokens, {shapes} "
          f"[rows, T]): median {n / ours_s:7.1f} requests/s, best {n / ours_best:7.1f} (rounds "
          f"{', '.join(f'{t:.2f}' for t in times['ours'])} s)")
    for b in hfs:
      s, best = statistics.median(times[b]), min(times[b])
      ref = np.array([lp for lp, _ in results[b]])
      diff = np.max(np.abs(np.array([lp for lp, _ in results["ours"]]) - ref) / np.abs(ref))
      print(f"  hf batch_size {b:3d}: median {n / s:7.1f} requests/s, best {n / best:7.1f} (rounds "
            f"{', '.join(f'{t:.2f}' for t in times[b])} s) | ours/hf: median {s / ours_s:.1f}x, best "
            f"{best / ours_best:.1f}x | max rel diff {diff:.1e}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
