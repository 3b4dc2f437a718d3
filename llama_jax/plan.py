"""Plans a training run for a TPU topology on this machine: compiles the train step ahead of time
(libtpu, as llama_jax.aot does) over attention kernel x remat policy x micro-batches x (fsdp, tensor)
split, prints what it compiled (per-chip memory against the chip's HBM, XLA's FLOP count, the global
batch) and why it compiled nothing else, then the train.py command line of the best candidate.

  python -m llama_jax.plan --config configs/llama.py:llama3-8b --topology v5p-64 [--seq_len 8192]

Best: the first candidate that fits, in this ranking:
  1. the least tensor parallelism (mesh.tensor): it all-reduces activations in every layer, on the
     critical path, and that communication is not in the estimate below; so tensor > 1 is chosen
     only where no candidate with a smaller one fits;
  2. the least estimated step time: XLA's FLOP count of the step (step_flops) / (chips x peak bf16
     FLOP/s of the chip, llama_jax/flops.py). A compute roofline: memory traffic and communication
     are not modelled, so it ranks remat policies (what they recompute) and nothing else;
  3. the fewest micro-batches (train.grad_accum_steps): larger matmuls, fewer weight gathers;
  4. the order of KERNELS (splash, the Pallas kernel "auto" picks on TPU, before xla).
A candidate fits when its compiled step's per-chip peak (aot.peak_bytes: arguments, outputs not
donated, temporaries) is at most the chip's HBM (CHIPS).

Search: the walk goes down the ranking, compiles, and stops at the first candidate that fits. It
compiles nothing it can rule out, and says why in the table: splits whose params do not divide over
(fsdp, tensor); micro-batches whose rows do not divide over the fsdp batch shards; candidates that
need at least the memory of a compiled one that did not fit, per-chip memory being taken to grow
with what the remat policy saves (REMATS, most first) and with the rows of a micro-batch, for one
kernel on one split (not across kernels: at T = 4096 the xla kernel needed less than splash); a
kernel's candidates after it failed to build. Going down the ranking costs little: the compiler
refuses a candidate within seconds when its temporaries alone exceed the HBM, while one that
builds takes about a minute for an 8B model on a 2-core CPU. After the best, the other kernels are
compiled with the best's settings, for comparison.

Bad input (a topology libtpu cannot describe or of an unknown chip, a batch no candidate mesh can
split, an unknown --kernels or --remats name) ends in one line before anything compiles.
"""

import copy
import dataclasses
import math
import re
import shlex
import sys
import time

import jax

from llama_jax import aot
from llama_jax import config_lib
from llama_jax import errors
from llama_jax import flops as flops_lib
from llama_jax import model as model_lib
from llama_jax import sharding as sh

# The attention kernels searched, in order of preference where the ranking ties.
KERNELS = ("splash", "xla")
# The remat policies searched (model.REMAT_POLICIES), from the one that saves the most for the
# backward pass (most memory, least recomputation) to the one that saves the least.
REMATS = ("none", "save_dots", "save_attn_out", "save_block_inputs", "full")


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int  # per chip
  source: str


GiB = 2**30
# libtpu's device_kind -> the chip. hbm_bytes: what XLA's TPU compiler lets a program use on one chip,
# from its RESOURCE_EXHAUSTED message ("exceeds available HBM (95.74G)", G = GiB) for an oversized
# program compiled for each chip by libtpu 0.0.42.1; a little under the capacity the Cloud TPU
# system architecture pages give (cloud.google.com/tpu/docs/<chip>).
CHIPS = {
    "TPU v4": Chip("v4", int(30.75 * GiB), "libtpu's limit; docs: HBM2 32 GiB"),
    "TPU v5 lite": Chip("v5e", int(15.75 * GiB), "libtpu's limit; docs: HBM 16 GB"),
    "TPU v5": Chip("v5p", int(95.74 * GiB), "libtpu's limit; docs: HBM2e 95 GB"),
    "TPU v6 lite": Chip("v6e", int(31.25 * GiB), "libtpu's limit; docs: HBM 32 GB"),
}


def chip_of(devices, topology: str) -> Chip:
  """The Chip of a TPU topology's devices; ConfigError naming --topology for any other device."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise errors.ConfigError(f"--topology {topology}: devices of kind {kind!r}, not a TPU chip the plan knows "
                             f"the HBM of ({', '.join(CHIPS)})")
  return CHIPS[kind]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One setting of the searched config keys (mesh.data is 1)."""
  kernel: str  # model.attention
  remat: str  # model.remat
  fsdp: int  # mesh.fsdp
  tensor: int  # mesh.tensor
  grad_accum: int  # train.grad_accum_steps

  def overrides(self) -> dict:
    return {"model.attention": self.kernel, "model.remat": self.remat, "train.grad_accum_steps": self.grad_accum,
            "mesh.data": 1, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}

  @property
  def family(self) -> tuple:
    """Candidates that differ only in their micro-batches."""
    return self.kernel, self.remat, self.fsdp, self.tensor


@dataclasses.dataclass
class Outcome:
  """What became of a candidate. status: compiled, "fits", "too big" (over the HBM, or refused by
  the compiler) or "failed" (did not lower or compile); not compiled, "bigger" (needs at least the
  memory of a candidate over the HBM), "kernel failed" (its kernel failed before) or "below" (ranked
  below the best)."""
  status: str
  peak_bytes: float | None = None  # per chip, where it compiled
  note: str = ""
  number: int = 0  # the compile's number in the table (compiled outcomes only)
  seconds: float = 0.0  # lower + compile


def with_overrides(config, overrides: dict):
  """A copy of `config` with {"section.key": value} set."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


# --- FLOPs -----------------------------------------------------------------------------------------


def _lowered_flops(config, overrides: dict) -> float:
  """XLA's FLOP count of the train step lowered for one CPU device, with `overrides` set."""
  c = with_overrides(config, {"model.scan_layers": False, "model.attention": "xla", "train.grad_accum_steps": 1,
                              "train.loss_chunk_size": 0, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                              **overrides})
  return aot.lower_train_step(c, jax.devices("cpu")[:1]).cost_analysis()["flops"]


def kernel_block_pairs(T: int, block_q: int, block_kv: int) -> tuple[int, int, int]:
  """(Q, C, pairs): the xla kernel's query and key block sizes for a row of T, and how many (query
  block, key block) pairs it computes: those holding a key at or before a query (attention.py)."""
  Q, C = min(block_q, T), min(block_kv, T)
  padded = -(-T // math.lcm(Q, C)) * math.lcm(Q, C)
  pairs = sum(((i + 1) * Q - 1) // C + 1 for i in range(padded // Q))
  return Q, C, pairs


def step_flops(config, remat: str) -> float:
  """XLA's FLOP count of one train step of `config` (its global batch, all chips) under `remat`.

  XLA's cost analysis counts a loop's body once, and the step loops over layers (scan),
  micro-batches, loss chunks and attention blocks. So the step is lowered for one CPU device with
  each loop unrolled or run once, and counted there: 1 and 2 unrolled layers (each further layer
  adds the same), one micro-batch (k micro-batches do the arithmetic of their rows together), the
  loss unchunked, and the xla attention kernel as one T x T block and in the config's blocks
  (counted as one block pair). The two attention counts give the cost of a block pair; the kernel
  computes the pairs on or below the diagonal (kernel_block_pairs). The splash kernel, a custom
  call XLA does not count, is taken to do the xla kernel's arithmetic: it skips the same blocks.

  Returns FLOPs (a multiply-add counts 2). Lowering only: ~0.5 s per count on a 2-core CPU.
  """
  T, L = config.data.seq_len, config.model.n_layers
  whole = {"model.remat": remat, "model.attention_block_q": T, "model.attention_block_kv": T}
  f1 = _lowered_flops(config, {**whole, "model.n_layers": 1})
  f2 = _lowered_flops(config, {**whole, "model.n_layers": 2})
  outside, layer = 2 * f1 - f2, f2 - f1
  Q, C, pairs = kernel_block_pairs(T, config.model.attention_block_q, config.model.attention_block_kv)
  if Q * C < T * T:  # one pair of the config's blocks counted instead of the T x T square
    f_pair = _lowered_flops(config, {"model.remat": remat, "model.n_layers": 1})
    per_pair = (f1 - f_pair) / (T * T - Q * C) * Q * C
    layer += per_pair * pairs - per_pair * T * T / (Q * C)
  return outside + L * layer


# --- candidates and the walk ---------------------------------------------------------------------------


def splits(config, num_devices: int, params_reason) -> tuple[dict, dict]:
  """({(fsdp, tensor): [grad_accum, ...]}, {(fsdp, tensor): reason}): the (fsdp, tensor) splits of
  the devices with the micro-batch counts whose rows divide over the fsdp batch shards, and the
  splits ruled out (params_reason(fsdp, tensor): why the params do not divide, or None)."""
  B = config.data.batch_size
  usable, ruled_out = {}, {}
  for tensor in (t for t in range(1, num_devices + 1) if num_devices % t == 0):
    fsdp = num_devices // tensor
    accums = [k for k in range(1, B + 1) if B % k == 0 and (B // k) % fsdp == 0]
    why = params_reason(fsdp, tensor) or (None if accums else (
        f"data.batch_size={B} has no micro-batch whose rows divide over the {fsdp} fsdp batch shards"))
    if why:
      ruled_out[(fsdp, tensor)] = why
    else:
      usable[(fsdp, tensor)] = accums
  return usable, ruled_out


def rank(usable: dict, kernels, flops_by_remat: dict) -> list:
  """Every candidate, best first, by the ranking of the module docstring."""
  ranked = [Candidate(k, r, fsdp, tensor, g) for (fsdp, tensor), accums in usable.items()
            for r in flops_by_remat for g in accums for k in kernels]
  return sorted(ranked, key=lambda c: (c.tensor, flops_by_remat[c.remat], REMATS.index(c.remat), c.grad_accum,
                                       kernels.index(c.kernel)))


def _at_least_as_big(c: Candidate, d: Candidate) -> bool:
  """Whether c needs at least d's memory under the module docstring's assumptions."""
  return ((c.kernel, c.fsdp, c.tensor) == (d.kernel, d.fsdp, d.tensor)
          and REMATS.index(c.remat) <= REMATS.index(d.remat) and c.grad_accum <= d.grad_accum)


def search(ranked: list, compile_fn, kernels) -> tuple[dict, Candidate | None]:
  """Walks `ranked` (best first) as the module docstring says, compiling with compile_fn(candidate)
  -> Outcome (status "fits", "too big" or "failed"). Returns ({candidate: Outcome} for every
  candidate, the best or None)."""
  outcomes: dict[Candidate, Outcome] = {}
  failed_kernels: dict[str, int] = {}

  def run(c):
    outcome = compile_fn(c)
    outcome.number = 1 + sum(1 for o in outcomes.values() if o.number)
    outcomes[c] = outcome
    if outcome.status == "failed":
      failed_kernels.setdefault(c.kernel, outcome.number)
    return outcome

  def ruled_out(c) -> Outcome | None:
    if c.kernel in failed_kernels:
      return Outcome("kernel failed", note=f"the {c.kernel} kernel failed in #{failed_kernels[c.kernel]}")
    for d, o in outcomes.items():
      if o.status == "too big" and _at_least_as_big(c, d):
        return Outcome("bigger", note=f"needs at least the memory of #{o.number}")
    return None

  best = None
  for c in ranked:
    outcomes[c] = ruled_out(c) or run(c)
    if outcomes[c].status == "fits":
      best = c
      break
  if best is not None:
    for k in kernels:
      other = dataclasses.replace(best, kernel=k)
      if k not in failed_kernels and not (other in outcomes and outcomes[other].number):
        run(other).note = "the best's settings, for comparison"
  for c in ranked:
    outcomes.setdefault(c, Outcome("below", note="ranked below the best"))
  return outcomes, best


# --- the table -------------------------------------------------------------------------------------

_FITS = {"fits": "yes", "too big": "no", "bigger": "no", "failed": "failed"}


def _gib(b) -> str:
  return "" if b is None else f"{b / GiB:.4g}"


def table(ranked, ruled_out, outcomes, batch_size: int, flops_by_remat, step_seconds) -> list[str]:
  """The table's lines: a row per compiled candidate, in walk order, and one per group of the others
  that were ruled out for one reason; step_seconds(flops) is the estimate."""
  lines = [f"{'#':>3}  {'kernel':<11}{'remat':<18}{'fsdp x tensor':<15}{'batch = ga x rows':<19}"
           f"{'peak GiB/chip':>14}  {'fits':<10}{'XLA PFLOP/step':>15}{'est s/step':>11}  note"]

  def line(number, kernel, remat, split, accums, peak, fits, note):
    batch = f"{batch_size} = {accums[0]} x {batch_size // accums[0]}" if len(accums) == 1 else \
        f"ga {','.join(map(str, accums))}" if accums else ""
    flops = flops_by_remat.get(remat)
    numbers = f"{flops / 1e15:>15.3g}{step_seconds(flops):>11.3g}" if flops else " " * 26
    lines.append(f"{number:>3}  {kernel:<11}{remat:<18}{split:<15}{batch:<19}{peak:>14}  {fits:<10}{numbers}  "
                 f"{note}".rstrip())

  groups: dict[tuple, list] = {}
  for c in ranked:
    o = outcomes[c]
    whole_split_below = all(outcomes[d].status == "below" for d in ranked if (d.fsdp, d.tensor) == (c.fsdp, c.tensor))
    key = (("compiled", o.number) if o.number else ("below", c.fsdp, c.tensor) if whole_split_below else
           ("below", c.fsdp, c.tensor, c.remat) if o.status == "below" else
           (o.status, o.note, c.kernel, c.remat, c.fsdp, c.tensor))
    groups.setdefault(key, []).append(c)
  for key, cs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "compiled", kv[0][1] if kv[0][0] == "compiled"
                                                          else ranked.index(kv[1][0]))):
    c, o = cs[0], outcomes[cs[0]]
    split = f"{c.fsdp} x {c.tensor}"
    accums = sorted({d.grad_accum for d in cs})
    kernels = ",".join(sorted({d.kernel for d in cs}, key=KERNELS.index))
    if key[0] == "compiled":
      line(f"#{o.number}", c.kernel, c.remat, split, accums, _gib(o.peak_bytes), _FITS[o.status],
           f"{o.seconds:.0f} s" + (f"; {o.note}" if o.note else ""))
    elif key[0] == "below" and len(key) == 3:
      line("-", kernels, "*", split, [], "", "", "not compiled: ranked below the best (more tensor parallelism)")
    elif key[0] == "below":
      line("-", kernels, c.remat, split, accums, "", "", "not compiled: ranked below the best")
    else:
      line("-", kernels, c.remat, split, accums, "", _FITS.get(o.status, ""), f"not compiled: {o.note}")
  for (fsdp, tensor), why in ruled_out.items():
    line("-", "*", "*", f"{fsdp} x {tensor}", [], "", "", f"not compiled: {why}")
  return lines


def _flat(config, prefix="") -> dict:
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def command(config_arg: str, file_config, config, best: Candidate) -> str:
  """The train.py command line of `best`: the config file, then the searched keys, then the keys
  in which `config` differs from the file's own `file_config` (--config.* and --seq_len /
  --batch_size given to the plan)."""
  searched = best.overrides()
  if config.mesh.data == 1:
    del searched["mesh.data"]
  file_values = _flat(file_config)
  given = {k: v for k, v in _flat(config).items() if k not in best.overrides() and file_values.get(k, v) != v}
  args = [f"--config.{k}={v}" for k, v in [*searched.items(), *sorted(given.items())]]
  return " ".join(["python train.py --config", shlex.quote(config_arg), "--workdir $WORKDIR",
                   *map(shlex.quote, args)])


# --- the whole plan ------------------------------------------------------------------------------------


def plan(config, topology: str, config_arg: str, file_config=None, kernels=None, remats=None, out=print):
  """Runs the plan for `config` on `topology` (all as the module docstring says), printing its lines
  through `out`; returns the best Candidate, or None when nothing fits.

  config_arg: the --config argument (FILE.py[:ARG]), for the command line; file_config: that file's
  own config, from which the command's further --config.* keys differ (default: none do).
  Raises ConfigError for bad input, before anything compiles.
  """
  kernels, remats = tuple(kernels or KERNELS), tuple(remats or REMATS)
  for name, given, known in (("--kernels", kernels, KERNELS), ("--remats", remats, REMATS)):
    bad = [v for v in given if v not in known]
    if bad:
      raise errors.ConfigError(f"{name}: {bad[0]!r} is not one of {', '.join(known)}")
  if topology == "cpu":
    raise errors.ConfigError("--topology cpu: the plan is for a TPU topology (a chip whose HBM it knows)")
  # The searched keys are checked per candidate; the rest as train.py checks it (not the tokenizer file: the pod's).
  llama = config_lib.check_config(with_overrides(config, {"train.grad_accum_steps": 1, "model.attention": "xla"}),
                                  tokenizer=False)
  devices = aot.tpu_devices(topology)
  chip = chip_of(devices, topology)
  n = len(devices)
  not_searched = {}
  for k in kernels:  # the splash kernel's block sizes
    try:
      config_lib.check_attention_blocks(dataclasses.replace(llama, attention=k))
    except errors.ConfigError as e:
      not_searched[k] = str(e)
  if len(not_searched) == len(kernels):
    raise errors.ConfigError(next(iter(not_searched.values())))
  kernels = tuple(k for k in kernels if k not in not_searched)
  indivisible = sh.indivisible_param(model_lib.abstract_model(llama))
  usable, ruled_out = splits(config, n, lambda fsdp, tensor: indivisible(
      {sh.DATA: 1, sh.FSDP: fsdp, sh.TENSOR: tensor}))
  if not usable:
    raise errors.ConfigError(f"no (fsdp, tensor) split of the {n} devices of --topology {topology} takes this "
                             f"config: {' / '.join(f'{f} x {t}: {why}' for (f, t), why in ruled_out.items())}")

  start = time.perf_counter()
  flops_by_remat = {r: step_flops(config, r) for r in remats}
  peak = flops_lib.peak_flops_per_device(devices[0], "bfloat16")
  T, B = config.data.seq_len, config.data.batch_size
  out(f"{topology}: {n} x {devices[0].device_kind} ({chip.name}), {chip.hbm_bytes / GiB:.2f} GiB HBM per chip "
      f"({chip.source}), peak {peak / 1e12:.0f} TFLOP/s bf16 per chip (llama_jax/flops.py)")
  out(f"{config_arg}: {model_lib.count_params(llama) / 1e9:.2f}B params, T = {T}, global batch {B} rows = "
      f"{B * T:,} tokens per step (FLOPs counted in {time.perf_counter() - start:.0f} s)")
  for k, why in not_searched.items():
    out(f"kernel {k} not searched: {why}")

  def compile_fn(c):
    print(f"compiling {c.kernel}, remat {c.remat}, fsdp {c.fsdp} x tensor {c.tensor}, grad_accum {c.grad_accum}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
      compiled = aot.lower_train_step(with_overrides(config, c.overrides()), devices).compile()
    except Exception as e:  # noqa: BLE001  (a candidate that does not build is a row of the table)
      seconds = time.perf_counter() - start
      if "RESOURCE_EXHAUSTED" in str(e):
        temporaries = re.search(r"memory required for HLO temporaries \(([\d.]+)G\)", str(e))
        why = f"temporaries alone {temporaries.group(1)} GiB" if temporaries else errors.first_line(e)
        return Outcome("too big", note=f"the compiler refused it: {why}", seconds=seconds)
      return Outcome("failed", note=f"{type(e).__name__}: {errors.first_line(e)}", seconds=seconds)
    peak_bytes = aot.peak_bytes(compiled.memory_analysis())
    return Outcome("fits" if peak_bytes <= chip.hbm_bytes else "too big", peak_bytes=peak_bytes,
                   seconds=time.perf_counter() - start)

  ranked = rank(usable, kernels, flops_by_remat)
  outcomes, best = search(ranked, compile_fn, kernels)
  step_seconds = lambda flops: flops / (n * peak)
  for line in table(ranked, ruled_out, outcomes, B, flops_by_remat, step_seconds):
    out(line)
  out("est s/step = XLA's FLOPs / (chips x peak): a compute roofline, no memory traffic or communication. "
      "Ranking: fits, then least tensor parallelism, then least est s/step, then fewest micro-batches, then "
      f"kernel ({', '.join(kernels)}); llama_jax/plan.py's docstring says why and what is assumed.")
  if best is None:
    out(f"no candidate fits in {chip.hbm_bytes / GiB:.2f} GiB per chip: try a larger topology, or a smaller "
        "--batch_size or --seq_len")
    return None
  o = outcomes[best]
  out(f"best: #{o.number}: {best.kernel}, remat {best.remat}, {best.grad_accum} micro-batch(es) of "
      f"{B // best.grad_accum} rows, fsdp {best.fsdp} x tensor {best.tensor}: {_gib(o.peak_bytes)} of "
      f"{chip.hbm_bytes / GiB:.2f} GiB per chip, est. {step_seconds(flops_by_remat[best.remat]):.2f} s per step")
  out(command(config_arg, config if file_config is None else file_config, config, best))
  return best


def main():
  """The command line; its flags are defined here, not at import, as in llama_jax.aot."""
  from absl import flags
  from ml_collections import config_flags

  from llama_jax import config_file, entry

  config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.")
  topology = flags.DEFINE_string("topology", None, "A TPU slice name (v4-8 ... v5p-128, v5e-4 ... v6e-256: "
                                 "aot.TOPOLOGIES) or a libtpu topology 'vN:AxBxC' (e.g. 'v5:2x4x4', 'v5e:4x4').")
  seq_len = flags.DEFINE_integer("seq_len", None, "Sets config.data.seq_len (T) for the plan and its command.")
  batch_size = flags.DEFINE_integer("batch_size", None, "Sets config.data.batch_size (global rows per step).")
  kernels = flags.DEFINE_list("kernels", None, f"Attention kernels to search (default: {','.join(KERNELS)}).")
  remats = flags.DEFINE_list("remats", None, f"Remat policies to search (default: {','.join(REMATS)}).")
  flags.mark_flags_as_required(["config", "topology"])

  def run():
    config = config_flag.value
    if seq_len.value is not None:
      config.data.seq_len = seq_len.value
    if batch_size.value is not None:
      config.data.batch_size = batch_size.value
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    if plan(config, topology.value, config_arg, config_file.load_config_file(config_arg), kernels.value,
            remats.value) is None:
      sys.exit(1)

  entry.main(lambda argv: entry.run(run))


if __name__ == "__main__":
  main()
