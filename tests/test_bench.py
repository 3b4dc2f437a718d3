"""The bench command prints every figure it promises, with transformers beside it, on a tiny model."""

import re
import subprocess
import sys

import pytest

from conftest import with_torch
from test_profiler import executions, step_numbers, trace_files
from test_train import ROOT, subprocess_env

pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = ["--config.model.vocab_size=320", "--config.model.dim=32", "--config.model.n_layers=2",
        "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.ffw_dim=64",
        "--config.model.max_seq_len=32", "--config.data.seq_len=32", "--config.data.batch_size=4"]


def test_bench_prints_the_figures_and_the_hf_ratio(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "llama_jax.bench", "--config=configs/tiny.py", *TINY, "--steps=10",
                         "--rounds=1", "--peer=hf", "--data", "--data_batches=20", f"--workdir={tmp_path}",
                         f"--profile={tmp_path / 'profile'}"],
                        cwd=ROOT, env=with_torch(subprocess_env()), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for label in ("compile", "step", "tokens/s", "model FLOPs", "achieved", "roof", "of the roof", "peak memory",
                "ours", "hf", "ours / hf", "pipeline", "profile"):
    assert re.search(rf"^{re.escape(label)} ", out, re.M), f"no '{label}' line in:\n{out}"
  assert "median of 10 timed steps" in out
  ours = float(re.search(r"^ours .* \| ([\d,]+) tokens/s", out, re.M).group(1).replace(",", ""))
  hf = float(re.search(r"^hf .* \| ([\d,]+) tokens/s", out, re.M).group(1).replace(",", ""))
  ratio = float(re.search(r"^ours / hf +([\d.]+)x", out, re.M).group(1))
  assert ratio == pytest.approx(ours / hf, rel=0.02)
  # 6 * N_matmul + 6 * L * T * D for this model, counted by hand: per layer q, k, v, o = 32*8*(2*4 + 2*2),
  # gate/up/down 3*32*64; the tied head 32*320.
  n_matmul = 2 * (32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 64) + 32 * 320
  flops = 6 * n_matmul + 6 * 2 * 32 * 32
  assert f"{flops / 1e6:,.2f} MFLOP per token" in out
  (trace,) = trace_files(tmp_path / "profile")  # the timed steps only: 10 after the 2 warm-up steps
  assert step_numbers(trace) == list(range(3, 13))
  assert len(executions(trace, "jit_train_step")) == 10
