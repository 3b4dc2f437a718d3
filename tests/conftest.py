"""Eight fake CPU devices for the sharding tests (set before jax is imported), one compilation cache
for the session, subprocesses without torch, and tiny configs."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import tiny  # noqa: E402

# JAX's persistent compilation cache, for this pytest process only, in a directory of its own that goes
# at exit: the tiny runs here compile the same init, train and eval programs again and again (XLA's
# compile is ~3/4 of a tiny run's time on a CPU: ~11 of 14 s); from the second time they load them. An
# entry's key is the program's HLO with its devices and compile options, so a program that differs
# in any way compiles afresh. Set through jax.config, not the environment: subprocesses (train.py,
# eval.py...) do not inherit it, and one process alone writes here, so no reader sees a half-written
# entry.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="llama-jax-tests-xla-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_configure(config):
  _subprocesses_without_torch(config)
  # A program compiled for a TPU topology without a TPU (test_aot, test_plan) is stored in the cache too,
  # but no TPU client is here to load it back: jax says so in this warning and compiles it again, as it
  # would with no cache. Any other failure to read an entry is still shown.
  config.addinivalue_line("filterwarnings", "ignore:Error reading persistent compilation cache entry for "
                          ".*PjRtCompiler must be constructed with a Client:UserWarning")

# Subprocesses start without torch (tests/no_torch/sitecustomize.py says why); with_torch undoes it.
NO_TORCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_torch")


def _subprocesses_without_torch(config):
  """Puts NO_TORCH first on the PYTHONPATH of the subprocesses of the processes that run tests: not in
  pytest-xdist's controller (-n), whose subprocesses are the workers, which compare with torch."""
  if config.getoption("numprocesses", default=None) and not os.environ.get("PYTEST_XDIST_WORKER"):
    return
  kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  os.environ["PYTHONPATH"] = os.pathsep.join([NO_TORCH, *kept])


def with_torch(env: dict) -> dict:
  """`env`, a subprocess's environment, with torch importable: NO_TORCH taken off its PYTHONPATH."""
  kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != NO_TORCH]
  env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
  return {**env, "PYTHONPATH": os.pathsep.join(kept)} if kept else env


def tiny_test_config(**overrides):
  """configs/tiny.py shrunk to seconds: 1 layer, short windows, small batches."""
  c = tiny.get_config()
  c.model.vocab_size = 320
  c.model.dim = 32
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.ffw_dim = 64
  c.model.max_seq_len = 32
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.eval_corpus = "shakespeare:heldout"
  c.optim.warmup_steps = 2
  c.train.steps = 8
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.train.async_checkpoint = False
  c.sample.max_new_tokens = 0  # no sample (a generator compile per run); tests of samples turn it on
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """One local GCS API server (tests/gcs_server.py) for the session, started by the first test that
  asks for it; the clients of this process and of the subprocesses it starts are pointed at it."""
  from tests.gcs_server import GcsServer  # noqa: PLC0415
  server = GcsServer(str(tmp_path_factory.mktemp("gcs"))).start()
  saved = {k: os.environ.get(k) for k in server.env()}
  os.environ.update(server.env())
  _clear_gcs_clients()
  yield server
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  _clear_gcs_clients()


def _clear_gcs_clients():
  """Forgets gcsfs clients made for another endpoint (fsspec caches them)."""
  import gcsfs  # noqa: PLC0415
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def gcs_bucket(gcs_server, request):
  """A new, empty bucket on the session's server: 'gs://<name>'."""
  import re  # noqa: PLC0415
  import uuid  # noqa: PLC0415
  name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
  return gcs_server.make_bucket(name)


@pytest.fixture(scope="session")
def straight_two_process_run(tmp_path_factory):
  """(workdir, compilation cache) of test_faults.two_process_config trained without interruption by 2 local
  processes of 2 CPU devices each: the reference of the tests that stop and resume such a run (a SIGTERM to
  one process, a preempted simulated pod), trained once per session."""
  from test_faults import two_process_config, two_process_run  # noqa: PLC0415
  root = tmp_path_factory.mktemp("straight_two_process")
  cache = root / "jax-cache"  # later runs of the same program load what this one compiled
  two_process_run(root / "run", two_process_config(), cache)
  return root / "run", cache


@pytest.fixture
def one_device():
  return jax.devices()[:1]


class ByteTokenizer:
  """UTF-8 bytes as tokens (id = byte + 3): a tokenizer whose output a test can predict."""

  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

  def encode(self, text):
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


# `make test` runs the suite on 2 pytest-xdist workers, each test module one unit of work (_Units), so its
# module fixtures are made once. The modules whose tests run several jax processes that talk to each other
# form one unit, so that two such tests never run at once: a process whose peers are slowed by other
# processes past gloo's fixed 30 s wait for them fails (jaxlib's CPU collectives take no timeout). That unit
# also makes the straight two-process run that test_faults and test_launch_pod share
# (conftest.straight_two_process_run) once. libtpu, which describes TPU topologies, takes a lock file that
# one process at a time may hold: its tests are one unit too. Units start longest first (a worker that gets
# a long unit last finishes long after the other; --no-loadscope-reorder keeps this order): these, in this
# order, then the rest as collected.
_MULTI_PROCESS = "multi_process"
_UNITS = {**{m: _MULTI_PROCESS for m in ("test_faults", "test_launch_pod", "test_multiprocess", "test_fake_pod",
                                         "test_harness_lm")},
          "test_aot": "libtpu", "test_plan": "libtpu"}
_LONGEST_FIRST = (_MULTI_PROCESS, "test_convert_cli", "test_train", "libtpu", "test_gcs_faults",
                  "test_eval_sets", "test_bench", "test_sft", "test_sharding", "test_data", "test_gcs_data",
                  "test_data_shards")


def _unit(nodeid: str) -> str:
  """The unit of work of a test, from its node id (tests/test_x.py::test_y[...])."""
  module = nodeid.split("::")[0].rpartition("/")[2].removesuffix(".py")
  return _UNITS.get(module, module)


def pytest_collection_modifyitems(items):
  def rank(item):
    unit = _unit(item.nodeid)
    return _LONGEST_FIRST.index(unit) if unit in _LONGEST_FIRST else len(_LONGEST_FIRST)
  items.sort(key=rank)  # stable: the order within a unit and among the rest is the collection's


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_make_scheduler(config, log):
  """xdist's scheduling by scope (whole scopes to a worker, the next when it runs low), the scope a unit
  of _UNITS. (xdist's own --dist loadgroup marks node ids with their group, which pytest 9 no longer lets
  a plugin change.)"""
  from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415

  class _Units(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return _unit(nodeid)

  return _Units(config, log)


def pytest_terminal_summary(terminalreporter):
  """Skipped tests are named in the last lines, never passed over in silence."""
  skipped = terminalreporter.stats.get("skipped", [])
  if skipped:
    reasons = sorted({str(r.longrepr[-1]) for r in skipped if isinstance(r.longrepr, tuple)})
    terminalreporter.write_line(f"NOTE: {len(skipped)} tests did not run: {'; '.join(reasons)}", yellow=True)
