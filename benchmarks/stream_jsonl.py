"""Streaming a multi-GB JSONL corpus: start-up time, peak memory, pipeline vs training tokens/s.

  .venv-test/bin/python benchmarks/stream_jsonl.py [--dir /tmp/llama_jax_stream] [--sizes_gb 1,4]
  .venv-test/bin/python benchmarks/stream_jsonl.py --gcs [--sizes_gb 0.25,1]

Writes (once; reused when present) JSONL corpora of the given sizes, random slices of the 34
training plays, and a 1024-piece tokenizer; then for each size trains configs/tiny.py for 60
steps in a subprocess and reports the seconds to the "training from scratch" line (the corpus
is indexed by then) and to the first log line, the peak RSS (VmHWM) and the training tokens/s;
last, it times the input pipeline alone (`python -m llama_jax.data --stats`) on the largest
corpus. The claim checked: start-up under a minute, peak RSS flat in corpus size, and the
pipeline >= 5x the tokens/s the tiny model trains at.

With --gcs the corpora are uploaded (once; kept under DIR/gcs) to a local GCS API server
(tests/gcs_server.py: fake-gcs-server) and read as `jsonl:gs://...`. For each size it reports
the seconds and peak RSS of opening the corpus (indexing its lines with ranged reads), next to
the same files on the local disk, and the pipeline alone (`--stats N` and `--stats 2N`: tokens/s
and peak RSS); last it trains configs/tiny.py for --steps steps on the largest gs:// corpus (a
local workdir) for the training tokens/s the pipeline is compared with.
"""

import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llama_jax import corpus, tokenizer  # noqa: E402

MB = 1 << 20


def write_corpus(out_dir: str, size_bytes: int, file_bytes: int, plays: str, seed: int = 0):
  """~size_bytes of {"text": ...} lines in files of ~file_bytes; a DONE marker makes it reusable."""
  if os.path.exists(os.path.join(out_dir, "DONE")):
    return
  os.makedirs(out_dir, exist_ok=True)
  for stale in glob.glob(os.path.join(out_dir, "*.jsonl")):  # from an interrupted run
    os.remove(stale)
  rng = random.Random(seed)
  written, part = 0, 0
  while written < size_bytes:
    with open(os.path.join(out_dir, f"part-{part:04d}.jsonl"), "w") as f:
      in_file = 0
      while in_file < min(file_bytes, size_bytes - written):
        buf, buf_bytes = [], 0
        while buf_bytes < min(16 * MB, file_bytes - in_file, size_bytes - written - in_file):
          n = int(200 * 100 ** rng.random())  # log-uniform 200..20,000 chars: many short, some long
          start = rng.randrange(len(plays) - n)
          buf.append(json.dumps({"text": plays[start:start + n]}) + "\n")  # ASCII-escaped: len = bytes
          buf_bytes += len(buf[-1])
        f.write("".join(buf))  # one write per 16 MB: json.dumps is the cost, not I/O
        in_file += buf_bytes
    written += in_file
    part += 1
  open(os.path.join(out_dir, "DONE"), "w").close()
  print(f"wrote {written / 1e9:.2f} GB in {part} files to {out_dir}", flush=True)


def evict_from_page_cache(paths):
  """Drops these files' cached pages, so the index is built from disk as on a fresh machine."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def run_measured(cmd, marks):
  """Runs cmd; returns (output lines, {mark: seconds of its first line}, peak RSS bytes, exit code).

  The peak is the child's own VmHWM, polled: its ru_maxrss would include this parent's RSS at fork.
  """
  start = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
  peak = [0]

  def sample():
    while proc.poll() is None:
      try:
        with open(f"/proc/{proc.pid}/status") as f:
          hwm = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        peak[0] = max(peak[0], int(hwm.group(1)) * 1024 if hwm else 0)
      except (FileNotFoundError, ProcessLookupError):
        break
      time.sleep(0.1)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  lines, seen = [], {}
  for line in proc.stdout:
    lines.append(line.rstrip("\n"))
    for mark in marks:
      if mark in line and mark not in seen:
        seen[mark] = time.monotonic() - start
  code = proc.wait()
  sampler.join()
  return lines, seen, peak[0], code


def tokens_per_sec(line: str) -> float:
  return float(re.search(r"([\d,.]+) tok(?:ens)?/s", line).group(1).replace(",", ""))


def fail(what, lines, code):
  print("\n".join(lines[-40:]))
  sys.exit(f"{what} exited with {code}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", default="/tmp/llama_jax_stream", help="corpora, tokenizer and workdirs go here")
  parser.add_argument("--sizes_gb", default="1,4", help="corpus sizes, comma-separated")
  parser.add_argument("--file_mb", type=int, default=256, help="size of each JSONL file")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--stats_batches", type=int, default=2000)
  parser.add_argument("--gcs", action="store_true", help="read the corpora from a local GCS API server")
  parser.add_argument("--gcs_port", type=int, default=None, help="its port (default: a free one)")
  args = parser.parse_args()
  sizes = [float(s) for s in args.sizes_gb.split(",")]

  plays = corpus.shakespeare_plays("train")
  tok_path = os.path.join(args.dir, "tokenizer-1024.model")
  if not os.path.exists(tok_path):
    tokenizer.train_sentencepiece(tokenizer.training_lines(plays), 1024, tok_path)
  dirs = {}
  for gb in sizes:
    dirs[gb] = os.path.join(args.dir, f"corpus-{gb:g}gb")
    write_corpus(dirs[gb], int(gb * 1e9), args.file_mb * MB, "".join(plays))
  del plays
  if args.gcs:
    gcs_main(args, sizes, dirs, tok_path)
    return

  results = {}
  for gb in sizes:
    files = sorted(glob.glob(os.path.join(dirs[gb], "*.jsonl")))
    evict_from_page_cache(files)
    workdir = os.path.join(args.dir, f"run-{gb:g}gb-{int(time.time())}")  # fresh: no resume
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", workdir,
           f"--config.data.train_corpus=jsonl:{dirs[gb]}/*.jsonl", f"--config.data.tokenizer_path={tok_path}",
           "--config.data.eval_corpus=text:tests/data/heldout_sample.txt",  # keeps the final eval short
           f"--config.train.steps={args.steps}", "--config.train.log_every=20",
           "--config.train.checkpoint_every=1000", "--config.sample.max_new_tokens=0"]
    lines, seen, peak, code = run_measured(cmd, ["training from scratch", "step 20/"])
    if code:
      fail(f"train.py on {gb:g} GB", lines, code)
    steps = [l for l in lines if re.search(r"step \d+/", l)]
    results[gb] = (seen["training from scratch"], seen["step 20/"], peak, tokens_per_sec(steps[-1]))
    size = sum(os.path.getsize(f) for f in files)
    print(f"{size / 1e9:.2f} GB ({len(files)} files): 'training from scratch' at {results[gb][0]:.1f} s | "
          f"step 20 at {results[gb][1]:.1f} s | peak RSS {peak / 1e9:.2f} GB | "
          f"train {results[gb][3]:,.0f} tok/s (steps {args.steps - 20}-{args.steps})", flush=True)

  # --stats leaves the first batch untimed, and it holds the first fill of the (tumbling) chunk
  # shuffle window, ~1M tokens, so its rate is high by about one window in N batches. The
  # difference of an N- and a 2N-batch run is the steady rate (to about one window's fill).
  largest, runs = max(sizes), []
  for n in (args.stats_batches, 2 * args.stats_batches):
    cmd = [sys.executable, "-m", "llama_jax.data", "--config", "configs/tiny.py", "--stats", str(n),
           f"--config.data.train_corpus=jsonl:{dirs[largest]}/*.jsonl", f"--config.data.tokenizer_path={tok_path}"]
    lines, _, peak, code = run_measured(cmd, [])
    if code:
      fail("llama_jax.data --stats", lines, code)
    stats = [l for l in lines if "tokens/s" in l][-1]
    seconds = float(re.search(r"in ([\d.]+) s", stats).group(1))
    runs.append((seconds, tokens_per_sec(stats) * seconds))
    print(f"pipeline alone on {largest:g} GB: {stats.strip()} | peak RSS {peak / 1e9:.2f} GB", flush=True)
  reported = runs[0][1] / runs[0][0]
  steady = (runs[1][1] - runs[0][1]) / (runs[1][0] - runs[0][0])
  train = results[largest][3]
  print(f"pipeline / training tokens/s: --stats {args.stats_batches} {reported:,.0f} / {train:,.0f} = "
        f"{reported / train:.1f}x | steady {steady:,.0f} / {train:,.0f} = {steady / train:.1f}x")
  peaks = [r[2] for r in results.values()]
  print(f"first step < 60 s: {all(r[1] < 60 for r in results.values())} | peak RSS spread over sizes "
        f"{(max(peaks) - min(peaks)) / 1e6:.0f} MB | pipeline >= 5x (steady): {steady >= 5 * train}")


def upload(server, local_dir: str, url: str):
  """Copies local_dir's JSONL files to the prefix url, once: a DONE object marks a finished upload."""
  import fsspec  # noqa: PLC0415
  fs = fsspec.filesystem("gs")
  if fs.exists(f"{url}/DONE"):
    return
  start = time.monotonic()
  files = sorted(glob.glob(os.path.join(local_dir, "*.jsonl")))
  for f in files:
    fs.put_file(f, f"{url}/{os.path.basename(f)}")
  fs.pipe_file(f"{url}/DONE", b"")
  print(f"uploaded {len(files)} files to {url} in {time.monotonic() - start:.0f} s", flush=True)


_OPEN_SCRIPT = """
import sys, time
from llama_jax import corpus
start = time.perf_counter()
c = corpus.open_corpus(sys.argv[1])
print(f"opened: {len(c):,} lines in {time.perf_counter() - start:.2f} s")
"""


def pipeline_stats(spec, tok_path, batches):
  """(seconds, tokens, peak RSS, the stats line) of `llama_jax.data --stats batches` on spec."""
  cmd = [sys.executable, "-m", "llama_jax.data", "--config", "configs/tiny.py", "--stats", str(batches),
         f"--config.data.train_corpus={spec}", f"--config.data.tokenizer_path={tok_path}"]
  lines, _, peak, code = run_measured(cmd, [])
  if code:
    fail("llama_jax.data --stats", lines, code)
  line = [l for l in lines if "tokens/s" in l][-1].strip()
  seconds = float(re.search(r"in ([\d.]+) s", line).group(1))
  return seconds, tokens_per_sec(line) * seconds, peak, line


def gcs_main(args, sizes, dirs, tok_path):
  """The --gcs benchmark (see the module docstring)."""
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from gcs_server import GcsServer  # noqa: PLC0415
  server = GcsServer(os.path.join(args.dir, "gcs"), port=args.gcs_port).start()
  os.environ.update(server.env())
  try:
    try:
      server.make_bucket("stream")
    except OSError:  # kept from an earlier run (409: it exists)
      pass
    urls = {gb: f"gs://stream/corpus-{gb:g}gb" for gb in sizes}
    for gb in sizes:
      upload(server, dirs[gb], urls[gb])
    rates, peaks = {}, {}
    for gb in sizes:
      for where, spec in (("local disk", f"jsonl:{dirs[gb]}/*.jsonl"), ("gs://", f"jsonl:{urls[gb]}/*.jsonl")):
        if where == "local disk":
          evict_from_page_cache(sorted(glob.glob(os.path.join(dirs[gb], "*.jsonl"))))
        lines, _, peak, code = run_measured([sys.executable, "-c", _OPEN_SCRIPT, spec], [])
        if code:
          fail(f"opening {spec}", lines, code)
        print(f"{gb:g} GB on {where}: {[l for l in lines if l.startswith('opened')][-1]} | peak RSS "
              f"{peak / 1e6:.0f} MB", flush=True)
      runs = []
      for n in (args.stats_batches, 2 * args.stats_batches):
        seconds, tokens, peak, line = pipeline_stats(f"jsonl:{urls[gb]}/*.jsonl", tok_path, n)
        runs.append((seconds, tokens))
        peaks[gb] = max(peaks.get(gb, 0), peak)
        print(f"pipeline alone on {gb:g} GB gs://: {line} | peak RSS {peak / 1e6:.0f} MB", flush=True)
      rates[gb] = (runs[1][1] - runs[0][1]) / (runs[1][0] - runs[0][0])
      print(f"pipeline alone on {gb:g} GB gs://: steady {rates[gb]:,.0f} tokens/s (difference of the two runs)",
            flush=True)
    largest = max(sizes)
    workdir = os.path.join(args.dir, f"run-gcs-{largest:g}gb-{int(time.time())}")  # fresh: no resume
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", workdir,
           f"--config.data.train_corpus=jsonl:{urls[largest]}/*.jsonl", f"--config.data.tokenizer_path={tok_path}",
           "--config.data.eval_corpus=text:tests/data/heldout_sample.txt",
           f"--config.train.steps={args.steps}", "--config.train.log_every=20",
           "--config.train.checkpoint_every=1000", "--config.sample.max_new_tokens=0"]
    lines, _, peak, code = run_measured(cmd, [])
    if code:
      fail(f"train.py on {largest:g} GB gs://", lines, code)
    train = tokens_per_sec([l for l in lines if re.search(r"step \d+/", l)][-1])
    print(f"train.py on {largest:g} GB gs://: {train:,.0f} tokens/s (steps {args.steps - 20}-{args.steps}) | "
          f"peak RSS {peak / 1e6:.0f} MB", flush=True)
    for gb in sizes:
      print(f"{gb:g} GB: pipeline / training tokens/s = {rates[gb]:,.0f} / {train:,.0f} = {rates[gb] / train:.1f}x "
            f"| pipeline peak RSS {peaks[gb] / 1e6:.0f} MB")
  finally:
    server.stop()


if __name__ == "__main__":
  main()
