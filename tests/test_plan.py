"""python -m llama_jax.plan: the walk over candidates (with a made-up memory model, no compiler), XLA's
FLOP count with its loops unrolled, bad input in one line, and a real plan for a TPU topology whose
printed command compiles."""

import importlib.util
import subprocess
import sys

import pytest

from configs import tiny
from llama_jax import aot, flops, plan
from llama_jax import config_lib
from llama_jax.errors import ConfigError
from test_train import ROOT, subprocess_env

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


def _walk(usable, memory, hbm, kernels=("splash", "xla"), flops_by_remat=None, failing=()):
  """plan.search over `usable` splits with compile_fn answering memory(candidate) against `hbm` (a
  kernel in `failing` fails to build); returns (compiled candidates in order, outcomes, best)."""
  flops_by_remat = flops_by_remat or {"none": 1.0, "save_dots": 1.1, "full": 1.3}
  compiled = []

  def compile_fn(c):
    compiled.append(c)
    if c.kernel in failing:
      return plan.Outcome("failed", note="NotImplementedError: no")
    peak = memory(c)
    return plan.Outcome("fits" if peak <= hbm else "too big", peak_bytes=peak)

  ranked = plan.rank(usable, kernels, flops_by_remat)
  outcomes, best = plan.search(ranked, compile_fn, kernels)
  assert set(outcomes) == set(ranked)  # every candidate gets a row or a reason
  return compiled, outcomes, best


def C(kernel, remat, fsdp, tensor, grad_accum):
  return plan.Candidate(kernel, remat, fsdp, tensor, grad_accum)


# 8 rows over 4 chips: fsdp 4 takes 1 or 2 micro-batches, fsdp 2 x tensor 2 also 4. Memory: 1 + rows per
# chip x what the remat policy saves, xla 1.5x splash.
_SAVED = {"none": 10, "save_dots": 4, "full": 1}
_USABLE = {(4, 1): [1, 2], (2, 2): [1, 2, 4]}


def _memory(c):
  return 1 + _SAVED[c.remat] * 8 / c.grad_accum / c.fsdp * (1.5 if c.kernel == "xla" else 1)


def test_the_walk_goes_down_the_ranking_to_the_first_fit_then_compares_the_kernels():
  compiled, outcomes, best = _walk(_USABLE, _memory, hbm=6)
  assert compiled == [
      C("splash", "none", 4, 1, 1), C("xla", "none", 4, 1, 1),  # 21, 31
      C("splash", "none", 4, 1, 2), C("xla", "none", 4, 1, 2),  # 11, 16
      C("splash", "save_dots", 4, 1, 1), C("xla", "save_dots", 4, 1, 1),  # 9, 13
      C("splash", "save_dots", 4, 1, 2),  # 5: fits
      C("xla", "save_dots", 4, 1, 2),  # 7: the best's settings with the other kernel, the comparison row
  ]
  assert best == C("splash", "save_dots", 4, 1, 2)
  assert [outcomes[c].number for c in compiled] == list(range(1, 9))
  assert outcomes[C("xla", "save_dots", 4, 1, 2)].note == "the best's settings, for comparison"
  # full would fit with 1 micro-batch (3) but recomputes more, and tensor 2 is ranked after tensor 1.
  assert outcomes[C("splash", "full", 4, 1, 1)].status == "below"
  assert outcomes[C("splash", "none", 2, 2, 4)].status == "below"


def test_a_policy_saving_more_than_one_that_did_not_fit_is_not_compiled():
  # Ranked by these FLOPs, full comes before save_dots, which saves more for the backward pass.
  compiled, outcomes, best = _walk(_USABLE, _memory, hbm=1.5, kernels=("splash",),
                                   flops_by_remat={"full": 1.0, "save_dots": 1.1})
  assert best is None
  assert compiled[:2] == [C("splash", "full", 4, 1, 1), C("splash", "full", 4, 1, 2)]  # 3 and 2 > 1.5
  assert outcomes[C("splash", "save_dots", 4, 1, 1)].note == "needs at least the memory of #1"
  assert outcomes[C("splash", "save_dots", 4, 1, 2)].note == "needs at least the memory of #2"
  # Tensor 2 is another split: compiled, however few rows a chip holds.
  assert compiled[2:] == [C("splash", "full", 2, 2, 1), C("splash", "full", 2, 2, 2), C("splash", "full", 2, 2, 4)]


def test_more_tensor_parallelism_only_where_less_cannot_fit():
  # 4 more on tensor 1 (say, weights gathered whole): 1 micro-batch per fsdp-4 chip needs 9 > 6.
  memory = lambda c: 1 + 4 * 8 / c.grad_accum / c.fsdp + 4 * (c.tensor == 1)
  compiled, outcomes, best = _walk(_USABLE, memory, hbm=6, kernels=("xla",), flops_by_remat={"full": 1.0})
  assert compiled == [C("xla", "full", 4, 1, 1), C("xla", "full", 4, 1, 2), C("xla", "full", 2, 2, 1),
                      C("xla", "full", 2, 2, 2), C("xla", "full", 2, 2, 4)]
  assert best == C("xla", "full", 2, 2, 4)


def test_a_kernel_that_fails_to_build_is_tried_once():
  compiled, outcomes, best = _walk({(4, 1): [1, 2]}, lambda c: 1.0, hbm=6, failing=("splash",))
  assert compiled == [C("splash", "none", 4, 1, 1), C("xla", "none", 4, 1, 1)]
  assert best == C("xla", "none", 4, 1, 1)
  assert outcomes[C("splash", "none", 4, 1, 1)].status == "failed"
  assert outcomes[C("splash", "none", 4, 1, 2)].status == "below"
  compiled, outcomes, best = _walk({(4, 1): [1, 2]}, lambda c: 10.0, hbm=6, failing=("splash",))
  assert outcomes[C("splash", "full", 4, 1, 2)].note == "the splash kernel failed in #1"


def test_nothing_fits():
  compiled, outcomes, best = _walk({(4, 1): [1, 2]}, lambda c: 10.0, hbm=6)
  assert best is None
  # Down the ranking each candidate saves less or holds fewer rows than those before it, so none is
  # ruled out by another: all 3 policies x 2 micro-batch counts x 2 kernels are compiled (a refusal
  # costs the compiler seconds).
  assert {o.status for o in outcomes.values()} == {"too big"}
  assert len(compiled) == 12


def test_the_table_names_every_split_and_every_reason():
  usable = {(4, 1): [1, 2], (2, 2): [1, 2, 4]}
  flops_by_remat = {"full": 1.0, "save_dots": 1.1}
  _, outcomes, _ = _walk(usable, _memory, hbm=1.5, kernels=("splash",), flops_by_remat=flops_by_remat)
  _, outcomes_fit, _ = _walk(usable, _memory, hbm=6)
  ranked = plan.rank(usable, ("splash",), flops_by_remat)
  lines = plan.table(ranked, {(1, 4): "param x: no"}, outcomes, 8, {"full": 1e15, "save_dots": 1.1e15},
                     lambda f: f / 1e15)
  text = "\n".join(lines)
  numbers = sorted(o.number for o in outcomes.values() if o.number)
  for number in numbers:
    assert sum(line.lstrip().startswith(f"#{number} ") for line in lines) == 1
  assert "needs at least the memory of #1" in text
  assert any("1 x 4" in line and "param x: no" in line for line in lines)
  ranked = plan.rank(usable, plan.KERNELS, {"none": 1.0, "save_dots": 1.1, "full": 1.3})
  text = "\n".join(plan.table(ranked, {}, outcomes_fit, 8, {"none": 1e15, "save_dots": 1.1e15, "full": 1.3e15},
                              lambda f: f / 1e15))
  assert "not compiled: ranked below the best (more tensor parallelism)" in text and " 2 x 2 " in text


def test_kernel_block_pairs_are_the_blocks_on_or_below_the_diagonal():
  assert plan.kernel_block_pairs(4096, 512, 512) == (512, 512, 36)  # 8 query blocks: 1 + 2 + ... + 8
  assert plan.kernel_block_pairs(256, 512, 512) == (256, 256, 1)  # a row shorter than a block: one block
  assert plan.kernel_block_pairs(1024, 512, 256) == (512, 256, 6)  # query block 0 sees key blocks 0-1, 1 sees 0-3


def test_step_flops_counts_every_layer_micro_batch_and_only_the_causal_blocks():
  c = tiny.get_config()
  c.model.update(dim=512, n_heads=4, n_kv_heads=2, ffw_dim=1536, n_layers=6, vocab_size=1024, max_seq_len=2048,
                 scan_layers=True, attention_block_q=256, attention_block_kv=256)
  c.data.seq_len, c.data.batch_size = 2048, 4
  c.train.grad_accum_steps, c.train.loss_chunk_size = 2, 512
  llama = config_lib.llama_config(c.model)
  model_flops = flops.train_flops_per_token(llama, 2048) * 4 * 2048  # 6 N + 6 L T D (causal half) per token
  none = plan.step_flops(c, "none")
  # XLA also counts elementwise ops and the masked half of the diagonal blocks (1.08 here); a loop
  # counted once would be 6x (layers) or 2x (micro-batches) short, the whole T x T square 1.33.
  assert 1.0 < none / model_flops < 1.15
  # Full remat recomputes each layer's forward pass: about a third more of the layers' arithmetic.
  assert 1.2 < plan.step_flops(c, "full") / none < 1.34


@needs_libtpu
def test_more_slice_names_and_libtpu_names_for_v5e_and_v6e():
  assert [d.device_kind for d in aot.tpu_devices("v5e-4")] == ["TPU v5 lite"] * 4
  assert len(aot.tpu_devices("v6e:2x4")) == 8 and aot.tpu_devices("v6e:2x4")[0].device_kind == "TPU v6 lite"
  assert plan.chip_of(aot.tpu_devices("v5p-8"), "v5p-8").name == "v5p"


@pytest.mark.parametrize("topology, culprit", [("v9x-8", "--topology 'v9x-8': not a slice name"),
                                               ("cpu", "--topology cpu: the plan is for a TPU topology")])
def test_a_topology_that_is_no_tpu_is_one_line(topology, culprit):
  with pytest.raises(ConfigError, match=culprit):
    plan.plan(tiny.get_config(), topology, "configs/tiny.py", out=lambda line: pytest.fail(line))


@needs_libtpu
def test_a_batch_no_split_takes_is_one_line_before_compiling():
  c = tiny.get_config()
  c.data.batch_size = 3  # 4 chips: fsdp 4 and 2 do not divide 3 rows; tensor 4 does not divide 2 kv heads
  with pytest.raises(ConfigError, match=r"no \(fsdp, tensor\) split of the 4 devices of --topology v5p-8 takes "
                                        r"this config: 4 x 1: data.batch_size=3 has no micro-batch .* / 1 x 4: param "):
    plan.plan(c, "v5p-8", "configs/tiny.py", out=lambda line: pytest.fail(line))


def test_an_unknown_kernel_is_one_line():
  with pytest.raises(ConfigError, match="--kernels: 'flash' is not one of splash, xla"):
    plan.plan(tiny.get_config(), "v5p-8", "configs/tiny.py", kernels=["xla", "flash"])


def test_the_command_line_says_a_bad_topology_in_one_line():
  result = subprocess.run([sys.executable, "-m", "llama_jax.plan", "--config", "configs/tiny.py", "--topology", "v5q-8"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: --topology 'v5q-8': not a slice name")
  assert result.stdout == ""


@pytest.mark.slow
@needs_libtpu
def test_the_printed_command_compiles_for_the_topology():
  c = tiny.get_config()
  c.data.batch_size = 16  # differs from the file: the command must say so
  lines = []
  best = plan.plan(c, "v5p-8", "configs/tiny.py", tiny.get_config(), remats=["save_dots", "full"], out=lines.append)
  assert best is not None
  command = lines[-1]
  assert command.startswith("python train.py --config configs/tiny.py --workdir $WORKDIR --config.model.attention=")
  overrides = dict(arg[len("--config."):].split("=", 1) for arg in command.split() if arg.startswith("--config."))
  assert overrides["data.batch_size"] == "16"
  assert set(overrides) == {"model.attention", "model.remat", "train.grad_accum_steps", "mesh.fsdp", "mesh.tensor",
                            "data.batch_size"}
  config = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = type(config[section][name])(value)
  assert (config.model.attention, config.model.remat, config.train.grad_accum_steps, config.mesh.fsdp,
          config.mesh.tensor) == (best.kernel, best.remat, best.grad_accum, best.fsdp, best.tensor)
  devices = aot.tpu_devices("v5p-8")
  peak = aot.peak_bytes(aot.lower_train_step(config, devices).compile().memory_analysis())
  best_row = next(line for line in lines if line.startswith("best: #"))
  assert f": {peak / 2**30:.4g} of 95.74 GiB per chip" in best_row  # the plan's number is this compile's
