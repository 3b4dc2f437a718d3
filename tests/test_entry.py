"""What the entry points set up for the process: freed host memory is reused, not faulted in again."""

import subprocess
import sys

from test_train import ROOT, subprocess_env

# Train steps of the demo model with a 8192-token vocabulary: each step's temporary buffers
# (the [8, 256, 8192] fp32 logits and their gradient among them) are allocated and freed anew.
_SCRIPT = """
import resource, sys
from llama_jax import entry
reused = sys.argv[1] == "reuse" and entry.reuse_freed_memory()
from configs import tiny
from llama_jax import bench
config = tiny.get_config()
config.model.vocab_size, config.model.n_layers = 8192, 1
config.data.batch_size, config.data.seq_len = 8, 256
setup, step, _ = bench.compile_train_step(config, bench.random_windows(config))
for _ in range(4):
  step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step()
print(reused, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""
LOGITS_PAGES = 8 * 256 * 8192 * 4 // 4096


def _faults_per_step(mode):
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  reused, faults = proc.stdout.split()
  return reused == "True", float(faults)


def test_reusing_freed_memory_removes_the_page_faults_of_a_train_step():
  reused, faults = _faults_per_step("reuse")
  assert reused, "mallopt was refused"
  _, default_faults = _faults_per_step("default")
  # glibc's default maps every large buffer afresh, a fault per 4 KiB page on first touch (fewer
  # where transparent huge pages are always on); reused, the pages are mapped already.
  assert faults < 0.01 * LOGITS_PAGES, (faults, default_faults)
  assert default_faults > faults
