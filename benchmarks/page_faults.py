"""Minor page faults per train step, with glibc's default allocator and with entry.reuse_freed_memory().

  .venv-test/bin/python benchmarks/page_faults.py [--vocab_size 8192] [--steps 4] [--config configs/tiny.py]

Each mode runs in a fresh subprocess (mallopt has to come before JAX starts its threads): the
config's model with --vocab_size and --n_layers, --batch_size x --seq_len tokens, compiled by
llama_jax.bench, --steps warm-up steps, then getrusage(RUSAGE_SELF).ru_minflt and system time
around --steps more. Prints, per mode, the faults and system seconds per step, and the 4 KiB pages
of one [B, T, V] fp32 logits array for scale. A count of faults is a property of the machine (its
kernel, transparent huge pages, what else runs), which is why it is measured here and not
asserted in tests/.
"""

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import importlib.util, resource, sys
mode, config_path, vocab, layers, batch, seq, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
from llama_jax import entry
reused = entry.reuse_freed_memory() if mode == "reuse" else False
spec = importlib.util.spec_from_file_location("bench_config", config_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.model.vocab_size, config.model.n_layers = vocab, layers
config.data.batch_size, config.data.seq_len = batch, seq
from llama_jax import bench
_, step, _ = bench.compile_train_step(config, bench.random_windows(config))
for _ in range(steps):
  step()
before = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
  step()
after = resource.getrusage(resource.RUSAGE_SELF)
print(reused, (after.ru_minflt - before.ru_minflt) / steps, (after.ru_stime - before.ru_stime) / steps)
"""


def faults_per_step(mode: str, args) -> tuple[bool, float, float]:
  """(mallopt accepted, minor faults per step, system seconds per step) of one fresh process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", _CHILD, mode, args.config, str(args.vocab_size), str(args.n_layers),
                         str(args.batch_size), str(args.seq_len), str(args.steps)],
                        cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"error: the {mode} run failed:\n{proc.stderr}")
  reused, faults, system_s = proc.stdout.split()[-3:]
  return reused == "True", float(faults), float(system_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--n_layers", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=4, help="warm-up steps, then as many measured")
  args = parser.parse_args()
  pages = args.batch_size * args.seq_len * args.vocab_size * 4 // 4096
  print(f"model        {args.config} with vocab {args.vocab_size}, {args.n_layers} layers; "
        f"{args.batch_size} x {args.seq_len} tokens per step; one fp32 logits array = {pages:,} pages of 4 KiB")
  for mode in ("default", "reuse"):
    reused, faults, system_s = faults_per_step(mode, args)
    what = "glibc default" if mode == "default" else f"reused ({'mallopt accepted' if reused else 'mallopt REFUSED'})"
    print(f"{what:<30} {faults:>12,.0f} minor faults / step | {system_s * 1e3:8.1f} ms system time / step")


if __name__ == "__main__":
  main()
