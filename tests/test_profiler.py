"""train.profile_steps: a jax.profiler trace of exactly the requested train steps, read back with jax's
own trace reader (jax.profiler.ProfileData over the written xplane.pb)."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_test_config
from llama_jax import config_lib, paths, profiler, trainer
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trace_files(profile_dir) -> list[str]:
  """The xplane.pb files under profile_dir, one per traced window (jax's plugins/profile/<run>/<host>)."""
  return sorted(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb")))


def events(xplane_path) -> list[tuple[str, dict]]:
  """(name, stats) of every event in the trace, over all planes and lines."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  return [(e.name, dict(e.stats)) for plane in data.planes for line in plane.lines for e in line.events]


def step_numbers(xplane_path) -> list[int]:
  """The step_num of each "train" step annotation (jax.profiler.StepTraceAnnotation) in the trace."""
  return sorted(s["step_num"] for name, s in events(xplane_path) if name == "train" and "step_num" in s)


def executions(xplane_path, module: str) -> set[int]:
  """The run ids of the executions of the XLA program `module` in the trace (each op of an
  execution carries its program's name and the execution's run id)."""
  return {s["run_id"] for _, s in events(xplane_path) if s.get("hlo_module") == module and "run_id" in s}


def test_a_run_traces_exactly_the_requested_steps(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = tiny_test_config(**{"train.profile_steps": (3, 5), "train.checkpoint_every": 8,
                               "data.tokenizer_sample_bytes": 300_000,
                               "data.eval_corpus": "text:" + os.path.join(ROOT, "tests", "data", "heldout_sample.txt")})
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  (trace,) = trace_files(os.path.join(workdir, "profile"))
  assert step_numbers(trace) == [3, 4, 5]
  assert len(executions(trace, "jit_train_step")) == 3  # the steps' device work, nothing of steps 2 or 6
  assert any("train_step" in name for name, _ in events(trace) if name != "jit_train_step")  # host side too
  run_dir = os.path.dirname(trace)
  assert os.path.isfile(os.path.join(run_dir, "perfetto_trace.json.gz"))
  out = capsys.readouterr().out
  assert re.search(rf"profile of steps 3-5: {re.escape(run_dir)}; view it with `xprof --logdir "
                   rf"{re.escape(os.path.join(workdir, 'profile'))}`", out), out


def _run_steps(window, state, first: int, last: int, fail_at: int | None = None):
  """Steps first..last of a stand-in train loop (a jitted `train_step` on a small array), told to
  `window` as the trainer tells it."""
  train_step = jax.jit(lambda x: x @ x / jnp.linalg.norm(x))
  for step in range(first, last + 1):
    window.before(step, state)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state = train_step(state)
    if step == fail_at:
      raise RuntimeError("boom")
    window.after(step, state)
  return state


def test_a_resume_inside_the_window_traces_from_its_first_step(tmp_path, capsys):
  with profiler.ProfileWindow((3, 6), 4, str(tmp_path)) as window:  # resumed after step 4
    _run_steps(window, jnp.eye(8), 5, 8)
  (trace,) = trace_files(tmp_path / "profile")
  assert step_numbers(trace) == [5, 6]
  out = capsys.readouterr().out
  assert "this run starts after step 4, inside the window: tracing steps 5-6" in out
  assert "profile of steps 5-6" in out


def test_a_resume_past_the_window_traces_nothing(tmp_path, capsys):
  with profiler.ProfileWindow((3, 5), 5, str(tmp_path)) as window:
    _run_steps(window, jnp.eye(8), 6, 8)
  assert not os.path.exists(tmp_path / "profile")
  assert "this run starts after step 5, past the window: no trace" in capsys.readouterr().out


def test_a_run_that_stops_inside_the_window_keeps_its_trace(tmp_path, capsys):
  with pytest.raises(RuntimeError, match="boom"), profiler.ProfileWindow((2, 6), 0, str(tmp_path)) as window:
    _run_steps(window, jnp.eye(8), 1, 8, fail_at=4)
  (trace,) = trace_files(tmp_path / "profile")
  assert step_numbers(trace) == [2, 3, 4]
  assert "profile of steps 2-3" in capsys.readouterr().out  # step 4 never finished
  with profiler.ProfileWindow((1, 1), 0, str(tmp_path / "again")) as window:  # the profiler is free again
    _run_steps(window, jnp.eye(8), 1, 1)
  assert len(trace_files(tmp_path / "again" / "profile")) == 1


def test_a_gcs_workdir_gets_the_trace(gcs_bucket, capsys):
  workdir = gcs_bucket + "/run"
  with profiler.ProfileWindow((1, 2), 0, workdir) as window:
    _run_steps(window, jnp.eye(8), 1, 2)
  (run,) = paths.listdir(workdir + "/profile/plugins/profile")
  names = paths.listdir(f"{workdir}/profile/plugins/profile/{run}")
  (xplane,) = [n for n in names if n.endswith(".xplane.pb")]
  data = jax.profiler.ProfileData.from_serialized_xspace(
      paths.read_bytes(f"{workdir}/profile/plugins/profile/{run}/{xplane}"))
  steps = [dict(e.stats)["step_num"] for p in data.planes for line in p.lines for e in line.events if e.name == "train"]
  assert sorted(steps) == [1, 2]
  assert "perfetto_trace.json.gz" in names
  assert f"profile of steps 1-2: {workdir}/profile/plugins/profile/{run};" in capsys.readouterr().out


@pytest.mark.parametrize("steps, message", [
    ((3,), r"config.train.profile_steps=\(3,\): must be \(first, last\)"),
    ((3, 5.0), r"must be \(first, last\), two step numbers"),
    ((True, 5), r"must be \(first, last\), two step numbers"),
    ((0, 5), r"config.train.profile_steps=\(0, 5\): steps count from 1"),
    ((5, 3), r"config.train.profile_steps=\(5, 3\): the first step is after the last"),
    ((3, 9), r"config.train.profile_steps=\(3, 9\): the last step is after config.train.steps=8"),
])
def test_a_bad_window_is_named(steps, message):
  config = tiny_test_config(**{"train.profile_steps": steps})
  with pytest.raises(ConfigError, match=message):
    config_lib.check_config(config)


def test_the_whole_run_is_a_window():
  config_lib.check_config(tiny_test_config(**{"train.profile_steps": (1, 8)}))
  config_lib.check_config(tiny_test_config(**{"train.profile_steps": ()}))


def test_a_bad_bench_profile_dir_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match=r"^--profile .*/file is a file, not a directory$"):
    profiler.check_trace_dir(str(tmp_path / "file"), "--profile")
  with pytest.raises(ConfigError, match=r"^--profile /nonexistent/dir/p: directory /nonexistent/dir does not exist$"):
    profiler.check_trace_dir("/nonexistent/dir/p", "--profile")
  profiler.check_trace_dir(str(tmp_path / "new"), "--profile")
