"""The train step alone, on random tokens: compile time, step time, tokens/s, FLOP/s and the
fraction of the roof; optionally the input pipeline beside it, and a Hugging Face peer.

  python -m llama_jax.bench --config configs/tiny.py [--steps 20] [--config.model.dtype=bfloat16]
  python -m llama_jax.bench --config configs/peer_tiny.py --data [--workdir runs/peer_tiny]
  python -m llama_jax.bench --config configs/peer_tiny.py --peer hf [--steps 20] [--rounds 3]
  python -m llama_jax.bench --config configs/tiny.py --profile DIR

Step times are the median of --steps timed steps after two warm-up steps, each step waited for.
Model FLOPs per token are 6 * N_matmul + 6 * L * T * D (llama_jax/flops.py); the roof is the
vendors' dense bf16 peak on GPU/TPU and an fp32 matmul timed in this process on CPU.

--data times the training pipeline of llama_jax/data.py alone (the same iterator the trainer
reads) with the run's tokenizer: WORKDIR/tokenizer.model if --workdir has one, else the one
the trainer would take (data.tokenizer_path, or init_from's, copied; or one trained on the
corpus) into --workdir or a temporary directory. That tokenizer.model is all bench reads from or
writes to --workdir, which may be local or `gs://` (run_setup.prepare_tokenizer).

--peer hf builds the same model in transformers (LlamaForCausalLM, fp32, torch on all
cores) and times its train step (forward with labels, backward, clipping, AdamW) on the same
tokens, alternating --rounds rounds of --steps steps each: ours, then HF's. Needs the test
requirements (torch, transformers).

--profile DIR (local or `gs://`) traces the timed steps, every round (HF's too with --peer), with
jax.profiler into DIR/plugins/profile/<time>/ (llama_jax/profiler.py). Each of our steps is
annotated "train" with its number in this process: the two warm-up steps are 1 and 2, the timed
ones follow. Tracing costs host time: the step times printed beside a trace are slower than without.

The config is checked as train.py checks it (config_lib.check_config) before anything compiles;
--rounds and --hf_attention without --peer, and --data_batches and --workdir without --data, are
refused rather than ignored.
"""

import os
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llama_jax import config_lib
from llama_jax import data as data_lib
from llama_jax import entry
from llama_jax import flops
from llama_jax import profiler
from llama_jax import run_setup
from llama_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after two warm-up steps); per round with --peer.",
                              lower_bound=10)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "With --peer: alternating rounds of --steps steps each.", lower_bound=1)
_PEER = flags.DEFINE_enum("peer", None, ["hf"], "Also time this implementation of the same model.")
_HF_ATTENTION = flags.DEFINE_enum("hf_attention", "eager", ["eager", "sdpa"],
                                  "transformers' attention for --peer hf (eager and sdpa ran "
                                  "equally fast on peer-tiny on a 2-core CPU).")
_DATA = flags.DEFINE_bool("data", False, "Also time the input pipeline alone.")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 200, "Batches the pipeline is timed on.", lower_bound=1)
_PROFILE = flags.DEFINE_string("profile", None, "Trace the timed steps with jax.profiler into this directory "
                               "(local or gs://; view with xprof --logdir DIR).")
_WORKDIR = flags.DEFINE_string("workdir", None, "With --data: a run's workdir (local or gs://), for (or to "
                               "receive) its tokenizer.model (default: a local temporary directory).")
flags.mark_flags_as_required(["config"])

WARMUP_STEPS = 2


def random_windows(config) -> np.ndarray:
  """[B, T + 1] random tokens: inputs and targets of one batch, shared by every implementation."""
  B, T, V = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  return np.random.default_rng(0).integers(0, V, (B, T + 1), dtype=np.int32)


def compile_train_step(config, windows):
  """(setup, step, compile seconds): `step()` runs one train step on `windows` and waits for it."""
  setup = run_setup.Setup(config)
  run_setup.check_batch(config, setup.mesh)
  state = setup.init_state()
  with jax.set_mesh(setup.mesh):
    batch = setup.global_batch(data_lib.dense_batch(windows))
    start = time.perf_counter()
    compiled = setup.jit_train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  current = {"state": state, "steps": 0}  # the state is donated: each step replaces it

  def step():
    current["steps"] += 1
    with jax.set_mesh(setup.mesh), jax.profiler.StepTraceAnnotation("train", step_num=current["steps"]):
      current["state"], metrics = compiled(current["state"], batch)
      jax.block_until_ready(metrics)

  return setup, step, compile_s


def hf_train_step(config, windows, attention: str):
  """(description, step) of transformers' LlamaForCausalLM with config's model and AdamW, fp32."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ConfigError(f"--peer hf needs torch and transformers: pip install -r requirements-test.txt ({e})")
  from llama_jax import convert

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(config.seed)
  llama = config_lib.llama_config(config.model)
  hf_config = transformers.LlamaConfig.from_dict(convert.config_to_hf(llama), attn_implementation=attention)
  model = transformers.LlamaForCausalLM(hf_config).float().train()
  o = config.optim
  # Weight decay as optim.decay_mask: every matrix but the token embedding.
  decayed = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
  others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
  optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
  # HF shifts labels itself: T inputs predict their T - 1 successors (ours: T + 1 tokens, T targets).
  input_ids = torch.from_numpy(windows[:, :-1].astype(np.int64))

  def step():
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    optimizer.zero_grad()

  description = (f"transformers {transformers.__version__} LlamaForCausalLM, attention {attention!r}, fp32; "
                 f"torch {torch.__version__}, torch.set_num_threads({os.cpu_count()}), AdamW with the "
                 f"same lr/betas/eps/weight decay, clipping at {o.grad_clip}")
  return description, step


def time_steps(step, n: int) -> list[float]:
  """Seconds of each of n calls of `step` (which waits for its own result)."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def time_rounds(step, peer_step, steps: int, rounds: int, trace: profiler.Trace | None = None
                ) -> tuple[list[float], list[float]]:
  """Step seconds of ours and of the peer (if any) after warm-up, in alternating rounds so that a
  busy moment of the machine hits both; the timed rounds inside `trace` if given."""
  steps_to_time = [s for s in (step, peer_step) if s]
  for s in steps_to_time:
    time_steps(s, WARMUP_STEPS)
  times = [[], []]
  if trace:
    trace.start()
  try:
    for _ in range(rounds):
      for i, s in enumerate(steps_to_time):
        times[i] += time_steps(s, steps)
  finally:
    if trace:
      trace.stop()
  return times[0], times[1]


def roof(setup) -> tuple[float, str]:
  """(peak FLOP/s of the mesh, what it is)."""
  device, dtype = setup.mesh.devices.flat[0], setup.llama.dtype
  peak = flops.mesh_peak_flops(setup.mesh, dtype)
  if device.platform == "cpu":
    return peak, f"a {dtype} 2048x2048 matmul timed in this process (best of 10)"
  return peak, f"the dense bf16 peak of {setup.mesh.size} x {device.device_kind}" if peak else "unknown device"


def peak_memory_bytes(setup) -> int | None:
  """The largest peak allocation over the mesh's devices; None where the backend reports none (CPU)."""
  stats = [d.memory_stats() for d in setup.mesh.devices.flat]
  if any(not s or "peak_bytes_in_use" not in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats)


def pipeline_throughput(config, workdir: str | None, num_batches: int) -> dict:
  """data.pipeline_stats of the training pipeline, with the tokenizer the trainer would use."""
  corpus = data_lib.open_corpus(config.data, "train_corpus")
  llama = config_lib.llama_config(config.model)
  with tempfile.TemporaryDirectory() as tmp:
    init_from = run_setup.parse_init_from(config.init_from)[0] if config.init_from else None
    tok = run_setup.prepare_tokenizer(config, workdir or tmp, corpus, llama, init_from)
    batches = data_lib.train_batches(corpus, tok, config.data)
    return data_lib.pipeline_stats(batches, num_batches, tok.bos_id)


def check_flags(config):
  """ConfigError for a config out of range (config_lib.check_config; the tokenizer file only with
  --data, the one part that reads it) or a flag that the other flags given leave unread."""
  config_lib.check_config(config, tokenizer=_DATA.value)
  for flag, needs in (("rounds", "peer"), ("hf_attention", "peer"), ("data_batches", "data"), ("workdir", "data")):
    if flags.FLAGS[flag].present and not flags.FLAGS[needs].value:
      raise ConfigError(f"--{flag} is only read with --{needs}")
  if _WORKDIR.value:
    config_lib.check_workdir(_WORKDIR.value)
  if _PROFILE.value:
    profiler.check_trace_dir(_PROFILE.value, "--profile")


def main(argv):
  del argv

  def run():
    config = _CONFIG.value
    check_flags(config)
    B, T = config.data.batch_size, config.data.seq_len
    windows = random_windows(config)
    peer = hf_train_step(config, windows, _HF_ATTENTION.value) if _PEER.value else None  # a missing torch: now
    setup, step, compile_s = compile_train_step(config, windows)
    trace = profiler.Trace(_PROFILE.value) if _PROFILE.value else None
    ours_s, peer_s = time_rounds(step, peer and peer[1], _STEPS.value, _ROUNDS.value if peer else 1, trace)

    step_s = float(np.median(ours_s))
    tokens_per_sec = B * T / step_s
    flops_per_token = flops.train_flops_per_token(setup.llama, T)
    achieved = tokens_per_sec * flops_per_token
    peak, peak_what = roof(setup)
    fraction = f"{achieved / peak:.1%}" if peak else "n/a"
    memory = peak_memory_bytes(setup)
    print(f"config       {B} x {T} tokens per step | {flops.matmul_params(setup.llama):,} matmul parameters | "
          f"{setup.mesh.size} x {setup.mesh.devices.flat[0].device_kind} | {config.model.dtype} compute")
    print(f"compile      {compile_s:.1f} s (lower + compile)")
    print(f"step         {step_s * 1e3:.1f} ms median of {len(ours_s)} timed steps "
          f"(min {min(ours_s) * 1e3:.1f}, max {max(ours_s) * 1e3:.1f})")
    print(f"tokens/s     {tokens_per_sec:,.0f}")
    print(f"model FLOPs  {flops_per_token / 1e6:,.2f} MFLOP per token (6 * N_matmul + 6 * L * T * D)")
    print(f"achieved     {achieved / 1e9:,.2f} GFLOP/s")
    print(f"roof         {peak / 1e9:,.2f} GFLOP/s: {peak_what}")
    print(f"of the roof  {fraction} (model FLOPs); {fraction} counting matmul FLOPs only: the same number, "
          "as the formula counts nothing but matmuls")
    print(f"peak memory  {'n/a (not reported by this backend)' if memory is None else f'{memory / 2**20:,.0f} MiB'}")
    if trace:
      print(f"profile      {trace.describe()}")

    if peer:
      peer_step_s = float(np.median(peer_s))
      print(f"peer hf      {peer[0]}")
      print(f"rounds       {_ROUNDS.value} x ({_STEPS.value} steps ours, then {_STEPS.value} steps HF)")
      print(f"ours         {step_s * 1e3:.1f} ms median of {len(ours_s)} | {tokens_per_sec:,.0f} tokens/s")
      print(f"hf           {peer_step_s * 1e3:.1f} ms median of {len(peer_s)} | {B * T / peer_step_s:,.0f} tokens/s")
      print(f"ours / hf    {peer_step_s / step_s:.2f}x tokens/s")

    if _DATA.value:
      s = pipeline_throughput(config, _WORKDIR.value, _DATA_BATCHES.value)
      batches_per_sec = s["batches"] / s["seconds"]
      print(f"pipeline     {s['batches']} batches in {s['seconds']:.2f} s: {batches_per_sec:,.1f} batches/s | "
            f"{batches_per_sec * B * T:,.0f} tokens/s ({s['tokens_per_sec']:,.0f} not padding; "
            f"padding {s['padding_fraction']:.1%}) | {batches_per_sec * B * T / tokens_per_sec:,.1f}x the step's "
            "tokens/s")

  entry.run(run)


if __name__ == "__main__":
  entry.main(main)
