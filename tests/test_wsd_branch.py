"""Branching a WSD cool-down off a stable-phase checkpoint (config.init_from_state): the branch is the
straight run of its length, and what would make it another run is refused in one line."""

import os
import shutil

import jax
import pytest

from llama_jax import config_lib, trainer
from llama_jax.errors import ConfigError
from test_faults import _assert_same_params, _config, _metrics, _params

# N = 24 steps with decay_fraction 0.25 decays over the last 6 (from step 18); the long run of 40
# over the last 10 (from step 30). Both are stable from the warmup's end to beyond BRANCH_AT.
N, LONG, BRANCH_AT = 24, 40, 12


def _wsd_config(init_from="", **overrides):
  config = _config(**{"optim.schedule": "wsd", "optim.decay_fraction": 0.25, "train.steps": N,
                      "train.checkpoint_every": N, **overrides})
  config.init_from, config.init_from_state = init_from, bool(init_from)
  return config


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
  """The stable phase of a run of LONG steps, stopped (as a preempted run would) at BRANCH_AT, where it
  saved its checkpoint."""
  workdir = str(tmp_path_factory.mktemp("wsd") / "long")
  config = _wsd_config(**{"train.steps": LONG, "train.checkpoint_every": BRANCH_AT})
  assert trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1], stop_after=BRANCH_AT) is None
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(BRANCH_AT)]
  return workdir


def test_a_cool_down_branched_from_the_stable_phase_is_the_straight_run(long_run, tmp_path):
  straight, branch = str(tmp_path / "straight"), str(tmp_path / "branch")
  trainer.train_and_evaluate(_wsd_config(), straight, devices=jax.devices()[:1])
  config = _wsd_config(f"{long_run}:{BRANCH_AT}")
  trainer.train_and_evaluate(config, branch, devices=jax.devices()[:1])

  ours, theirs = _metrics(branch), _metrics(straight)
  assert sorted(ours) == list(range(BRANCH_AT + 1, N + 1))  # the branch logs its own steps only
  # Loss, grad norm, learning rate and targets of every step: the same data, optimizer state and schedule.
  assert ours == {step: theirs[step] for step in ours}
  lr = {step: metrics[2] for step, metrics in ours.items()}
  assert lr[N] < lr[N - 6] == lr[BRANCH_AT + 1]  # it did cool down: the decay is in what was compared
  _assert_same_params(_params(branch, N), _params(straight, N))


def test_init_from_state_without_init_from_is_one_line():
  config = _wsd_config()
  config.init_from_state = True
  with pytest.raises(ConfigError, match=r"config\.init_from_state=True needs config\.init_from"):
    config_lib.check_config(config, tokenizer=False)


@pytest.mark.parametrize("overrides,culprits", [
    ({"optim.optimizer": "lion"}, ["config.init_from_state=True", "optim.optimizer: 'adamw' -> 'lion'"]),
    ({"train.steps": BRANCH_AT}, [f"config.train.steps={BRANCH_AT} does not go past its step {BRANCH_AT}"]),
    ({"data.shuffle_seed": 7}, [f"config.init_from_state=True from checkpoint {BRANCH_AT} of ",
                                "data.shuffle_seed: 0 -> 7"]),
])
def test_a_branch_that_would_be_another_run_stops_in_one_line_leaving_nothing(long_run, tmp_path, overrides,
                                                                               culprits):
  """Another optimizer (its state would not fit), a branch that ends where it starts, another data order
  (the checks of a resume, trainer._restore): a ConfigError before the first step, and the new workdir
  is not made."""
  workdir = tmp_path / "branch"
  config = _wsd_config(f"{long_run}:{BRANCH_AT}", **overrides)
  with pytest.raises(ConfigError, match="init_from") as e:
    trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert all(c in str(e.value) for c in culprits) and "\n" not in str(e.value), e.value
  assert not workdir.exists()


def test_a_checkpoint_without_a_data_position_has_no_run_to_continue(long_run, tmp_path):
  """A step without its `data` item (what an HF import saves: checkpoint.py) is refused by name."""
  source = tmp_path / "imported"
  shutil.copytree(long_run, source)
  shutil.rmtree(source / "checkpoints" / str(BRANCH_AT) / "data")
  with pytest.raises(ConfigError, match=f"checkpoint {BRANCH_AT} holds no data position .*init_from_state=True"):
    trainer.train_and_evaluate(_wsd_config(f"{source}:{BRANCH_AT}"), str(tmp_path / "branch"),
                               devices=jax.devices()[:1])
  assert not (tmp_path / "branch").exists()
