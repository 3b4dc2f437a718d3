"""Peak memory of convert.from_hf (and optionally to_hf) on a full-size random checkpoint.

  python tests/measure_convert_rss.py --preset llama3.2-1b
  python tests/measure_convert_rss.py --preset llama2-7b --param_dtype bfloat16 --export

Writes a random safetensors checkpoint of the preset's shapes (bf16 by default) shard by
shard into a temp dir (in a subprocess, so making it needs about one shard of memory), then
runs the conversion in another subprocess and reports its peak RSS (that child's
ru_maxrss, and the parent's RUSAGE_CHILDREN one) against the checkpoint and params sizes. Linux carries a parent's peak RSS over
into a forked child's ru_maxrss, hence the parent here never holds anything big. The random values are tiled from a small pool: what is
measured is memory, not numerics.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax import convert  # noqa: E402
from llama_jax.model import PRESETS  # noqa: E402

GB = 1e9


def write_checkpoint(config, hf_dir, dtype, shard_bytes, seed=0):
  """A random HF checkpoint of config's shapes, one shard in memory at a time."""
  np_dtype = convert.DTYPES[dtype]
  pool = (0.02 * np.random.default_rng(seed).standard_normal(1 << 24, np.float32)).astype(np_dtype)
  maps = convert._mappings(config)
  shards = convert._plan_shards(maps, lambda m: int(np.prod(m.hf_shape)) * np_dtype.itemsize,
                                shard_bytes)
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  offset = 0
  for name, shard in zip(names, shards):
    tensors = {}
    for m in shard:
      n = int(np.prod(m.hf_shape))
      tensors[m.hf_name] = np.resize(np.roll(pool, -offset), n).reshape(m.hf_shape)
      offset = (offset + 7919) % pool.size
    convert.safetensors.numpy.save_file(tensors, os.path.join(hf_dir, name), metadata={"format": "pt"})
    del tensors
  total = sum(os.path.getsize(os.path.join(hf_dir, n)) for n in names)
  weight_map = {m.hf_name: name for name, shard in zip(names, shards) for m in shard}
  with open(os.path.join(hf_dir, convert.INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(convert.config_to_hf(config), f)
  return total


# Runs in the child: its own peak RSS before and after, so the import baseline shows.
CHILD = r"""
import json, resource, sys, time
from llama_jax import convert
import jax
hf_dir, param_dtype, export_dir = sys.argv[1:4]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"baseline": rss()}
t = time.time()
config, params = convert.from_hf(hf_dir, param_dtype=param_dtype, dtype=param_dtype)
out["from_hf_s"] = time.time() - t
out["after_from_hf"] = rss()
out["params_bytes"] = sum(p.nbytes for p in jax.tree.leaves(params))
if export_dir:
  t = time.time()
  convert.to_hf(config, params, export_dir)
  out["to_hf_s"] = time.time() - t
  out["after_to_hf"] = rss()
print("RESULT " + json.dumps(out))
"""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="llama3.2-1b", choices=sorted(PRESETS))
  parser.add_argument("--ckpt_dtype", default="bfloat16", choices=sorted(convert.DTYPES))
  parser.add_argument("--param_dtype", default="float32", choices=sorted(convert.DTYPES),
                      help="params (and compute) dtype that from_hf converts into")
  parser.add_argument("--shard_gb", type=float, default=2.0, help="checkpoint shard size")
  parser.add_argument("--export", action="store_true", help="also time and measure to_hf")
  parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
  parser.add_argument("--write_to", default=None, help=argparse.SUPPRESS)  # the writer child
  args = parser.parse_args(argv)

  config = PRESETS[args.preset]
  if args.write_to:
    write_checkpoint(config, args.write_to, args.ckpt_dtype, int(args.shard_gb * GB))
    return
  root = tempfile.mkdtemp(prefix="rss_", dir=args.dir)
  hf_dir = os.path.join(root, "hf")
  export_dir = os.path.join(root, "export") if args.export else ""
  os.makedirs(hf_dir)
  try:
    t = time.time()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
    subprocess.run([sys.executable, __file__, "--preset", args.preset, "--ckpt_dtype",
                    args.ckpt_dtype, "--shard_gb", str(args.shard_gb), "--write_to", hf_dir],
                   check=True, env=env)
    ckpt_bytes = sum(os.path.getsize(os.path.join(hf_dir, n)) for n in os.listdir(hf_dir)
                     if n.endswith(".safetensors"))
    print(f"{args.preset}: wrote {ckpt_bytes / GB:.2f} GB {args.ckpt_dtype} checkpoint in "
          f"{time.time() - t:.0f}s to {hf_dir}", flush=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, hf_dir, args.param_dtype, export_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    if proc.returncode:
      sys.exit(f"child failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.split("RESULT ", 1)[1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    params = result["params_bytes"]
    print(f"  from_hf -> {args.param_dtype} params: {result['from_hf_s']:.1f}s")
    print(f"  checkpoint {ckpt_bytes / GB:.2f} GB, params {params / GB:.2f} GB, "
          f"child baseline RSS (imports) {result['baseline'] / GB:.2f} GB")
    print(f"  peak RSS after from_hf {result['after_from_hf'] / GB:.2f} GB = "
          f"{result['after_from_hf'] / ckpt_bytes:.2f}x checkpoint, "
          f"{result['after_from_hf'] / params:.2f}x params, "
          f"{(result['after_from_hf'] - result['baseline']) / params:.2f}x params over baseline")
    if export_dir:
      print(f"  to_hf ({args.param_dtype}): {result['to_hf_s']:.1f}s, peak RSS after to_hf "
            f"{result['after_to_hf'] / GB:.2f} GB = {result['after_to_hf'] / params:.2f}x params")
    print(f"  RUSAGE_CHILDREN ru_maxrss (max of writer and converter): {peak / GB:.2f} GB")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
