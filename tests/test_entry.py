"""What the entry points set up for the process: malloc told to reuse freed memory, before JAX
starts; a warning where it cannot be. How many page faults that saves depends on the machine:
benchmarks/page_faults.py measures it."""

import json
import subprocess
import sys

from test_train import ROOT, subprocess_env

# Runs entry.run as every entry point does, recording in what order it calls reuse_freed_memory,
# distributed.initialize_from_flags and the work itself, and whether JAX had a backend by then.
# argv[1] == "refuse": reuse_freed_memory answers False, as it does off glibc.
_SCRIPT = """
import json, sys
from absl import flags
from jax._src import xla_bridge
from llama_jax import distributed, entry
calls = []
reuse, initialize = entry.reuse_freed_memory, distributed.initialize_from_flags

def spy_reuse():
  accepted = reuse() if sys.argv[1] == "accept" else False
  calls.append(["reuse_freed_memory", accepted, xla_bridge.backends_are_initialized()])
  return accepted

def spy_initialize():
  calls.append(["initialize_from_flags", xla_bridge.backends_are_initialized()])
  initialize()

entry.reuse_freed_memory, distributed.initialize_from_flags = spy_reuse, spy_initialize
flags.FLAGS(["entry"])
entry.run(lambda: calls.append(["fn"]))
print(json.dumps(calls))
"""


def _entry_run(mode):
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout), proc.stderr


def test_entry_run_has_mallopt_accepted_before_jax_starts():
  calls, stderr = _entry_run("accept")
  # glibc accepted all three mallopt settings, before the multi-host setup and before any JAX
  # backend (and so any of XLA's threads) existed; then the work ran.
  assert calls == [["reuse_freed_memory", True, False], ["initialize_from_flags", False], ["fn"]]
  assert "warning" not in stderr


def test_entry_run_warns_where_malloc_cannot_reuse_freed_memory():
  calls, stderr = _entry_run("refuse")
  assert calls == [["reuse_freed_memory", False, False], ["initialize_from_flags", False], ["fn"]]
  assert stderr.strip().splitlines() == [
      "warning: malloc cannot be told to reuse freed memory here (not glibc, or mallopt refused): "
      "each step's host buffers are mapped and faulted in afresh"]


def test_several_missing_required_flags_are_one_line():
  """absl names each missing flag on a line of its own; a launcher reading a worker's last line as its
  error (llama_jax/launch) would see only the last of them."""
  proc = subprocess.run([sys.executable, "-m", "llama_jax.plan"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: flag --config=None"), proc.stderr
  assert "--topology=None" in proc.stderr
