"""Orbax checkpoints of the train state, the config and the data position, under WORKDIR/checkpoints/<step>/.

Each step holds four items: `state` ({"step", "params", "opt_state"}), `config` (the full
training config as JSON, so eval.py and resumption need nothing but the workdir), `data` (the
training stream's position: one grain iterator state per data shard, written by the process that
reads the shard, DataShardsHandler) and `stream` (what defines that stream, the shard count
included, data.stream_definition, compared when resuming). An HF import holds only the first two.

When to save and what to keep is orbax's policy: every `train.checkpoint_every` steps (and, if
set, every `train.checkpoint_every_minutes`), keeping the newest `train.keep_checkpoints` plus
every `train.keep_every`-th step for good. On a local disk a save is written to a temporary
directory and renamed when complete; on object storage (`gs://`, where a rename is a copy)
orbax writes the step in place and its commit_success.txt last, and a step directory without
it is no step. Either way an interrupted save leaves no step behind (on gs:// its half-written
directory is passed over, and written again in place when the run gets there). A step whose
files were damaged later is found by restoring it (`restore_latest`), moved to
WORKDIR/broken_checkpoints/ with a warning (on gs:// a copy and a delete), and the step before
it is used.

The workdir may be local or on `gs://` (llama_jax.paths; orbax takes the URL as it is). Transient
storage errors are retried by the client libraries, not here:
- gcsfs (our own files, and orbax's metadata, JSON items and commit files through etils.epath)
  tries a request that fails with a connection error, a timeout, 429 or 5xx 6 times, waiting
  1, 2, 4, 8 and 16 s (plus up to 1 s of jitter each) in between: ~31-36 s before it fails.
- tensorstore (the arrays, and orbax's merge of their OCDBT files when a save is finalized)
  retries as its gcs_request_retries context says, which `train.storage_retries` sets
  (set_storage_retries): that many retries after the first try, waiting 1 s, doubling up to
  32 s. The default here, 6, gives up after ~1 min (tensorstore's own, 32, after ~15 min:
  orbax's background save would hold the next save that long).
A request that still fails stops the run with one line (CheckpointError; a background save's
failure comes up at the next save or at the end), and the same command resumes from the last
complete step. gcsfs listings are not cached (`_fresh_listings`), so every listing sees what
other clients and processes wrote.
"""

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_jax import errors
from llama_jax import metrics as metrics_lib
from llama_jax import paths
from llama_jax.errors import ConfigError

_POLICIES = ocp.checkpoint_managers


def _fresh_listings():
  """Makes every gcsfs client made from here on list a directory afresh each time.

  gcsfs keeps each listing it made for the life of its client by default, and a client sees only its
  own changes: orbax lists steps through etils.epath's client, paths.move (the quarantine) goes through
  another, and on a pod other processes write the same directories. A listing kept from before such a
  change makes orbax take a step that was moved away for one still there (and fail reading it)."""
  import fsspec.config  # noqa: PLC0415
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_fresh_listings()  # at import: a client made before it keeps caching (a run imports this module before it makes any)


class CheckpointError(ConfigError):
  """A checkpoint that cannot be written or read, named in one line."""


def shard_file(shard: int, shard_count: int) -> str:
  """The file of one data shard's iterator state in a step's `data` item."""
  return f"shard-{shard:05d}-of-{shard_count:05d}.json"


def _grain_file(shard: int, shard_count: int) -> str:
  """grain's CheckpointHandler's file (process_<i>-of-<P>.json), which steps saved before data.shards
  hold: process i of P read what shard i of P reads now."""
  return f"process_{shard}-of-{shard_count}.json"


class DataShardsHandler(ocp.CheckpointHandler):
  """The training stream's position in a step's `data` item: one JSON file per data shard
  (shard_file), each written by the process that reads the shard and read by whichever process reads
  it on resume, so a run on any process count that divides the shard count continues the stream.

  Modelled on grain.checkpoint.CheckpointHandler (one JSON file per process), whose files a step
  saved before data.shards holds: such a file stands for the shard of the same index.
  The item is a data.ShardedBatches; each state is read when the save is asked for (DataSave), so
  reading on while orbax finishes the save does not move the saved position.
  """

  def save(self, directory, args: "DataSave"):
    for shard, state in args.states.items():
      with paths.open(paths.join(str(directory), shard_file(shard, args.shard_count)), "w") as f:
        f.write(json.dumps(state, indent=2))

  def restore(self, directory, args: "DataRestore"):
    """Moves args.item (a fresh data.ShardedBatches of the same stream) to the saved position.
    Raises ValueError naming the file of a shard the step does not hold."""
    batches, states = args.item, {}
    for shard in batches.shards:
      path = paths.join(str(directory), shard_file(shard, batches.shard_count))
      if not paths.exists(path):
        old = paths.join(str(directory), _grain_file(shard, batches.shard_count))
        if not paths.exists(old):
          raise ValueError(f"{path} does not exist")
        path = old
      states[shard] = json.loads(paths.read_text(path))
    batches.set_shard_states(states)
    batches.start_prefetch()
    return batches

  def metadata(self, directory):
    return None


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  """The states to save, {shard index: grain iterator state}, of the shards this process reads."""
  states: dict
  shard_count: int


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any  # a data.ShardedBatches


# train.storage_retries where a training config predates the key.
STORAGE_RETRIES = 6


def set_storage_retries(retries: int):
  """Sets how often tensorstore retries a failed GCS request of orbax's array files in this process
  (its gcs_request_retries context resource: `retries` retries 1 s apart, the wait doubling up to 32 s).

  orbax takes no tensorstore context from its caller: every context it makes is a copy of the two
  module-level dicts of orbax.checkpoint._src.serialization.tensorstore_utils (with and without
  OCDBT), so the setting goes into both."""
  from orbax.checkpoint._src.serialization import tensorstore_utils  # noqa: PLC0415
  setting = {"max_retries": int(retries), "initial_delay": "1s", "max_delay": "32s"}
  for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # noqa: SLF001
    context["gcs_request_retries"] = setting


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.normalize(workdir), "checkpoints")


def has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds any checkpoint directory yet (finished or not)."""
  return bool(paths.listdir(checkpoint_dir(workdir)))


def newest_stream(workdir: str) -> tuple[int, dict] | None:
  """(step, stream definition) of the newest step in `workdir` that holds a data position and whose
  `stream` item reads; None when there is none (no checkpoints, or an HF import's only)."""
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    for step in reversed(checkpointer.all_steps()):
      if checkpointer.has_data(step):
        try:
          return step, checkpointer.restore_stream(step)
        except CheckpointError:  # restore_latest will move it aside and fall back
          continue
    return None
  finally:
    checkpointer.close()


def broken_dir(workdir: str) -> str:
  return paths.join(paths.normalize(workdir), "broken_checkpoints")


def _options(train_config, read_only: bool) -> ocp.CheckpointManagerOptions:
  if train_config is None:  # reading, or one explicit save (an HF import)
    return ocp.CheckpointManagerOptions(create=False, read_only=read_only, enable_async_checkpointing=False)
  t = train_config
  save = [_POLICIES.FixedIntervalPolicy(t.checkpoint_every)]
  if t.checkpoint_every_minutes:
    save.append(_POLICIES.ContinuousCheckpointingPolicy(minimum_interval_secs=int(t.checkpoint_every_minutes * 60)))
  keep = [_POLICIES.LatestN(t.keep_checkpoints)]
  if t.keep_every:
    keep.append(_POLICIES.EveryNSteps(t.keep_every))
  # The directory is made by the first save, so a run that stops on bad input leaves none.
  return ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=t.async_checkpoint,
      save_decision_policy=_POLICIES.AnySavePolicy(save), preservation_policy=_POLICIES.AnyPreservationPolicy(keep))


def _first_line(e: BaseException) -> str:
  """The reason in one readable line: tensorstore appends its whole JSON spec to the first, and orbax
  wraps a failed read in "Encountered error while reading array index: ... See full TensorStore
  details: <bound method ...>", whose cause (tensorstore's, naming the file) is what is worth saying."""
  line = errors.first_line(e)
  line = line.split(" [tensorstore_spec")[0]
  if "See full TensorStore details" in line or line.startswith("Encountered error while reading array"):
    cause = e.__cause__ or e.__context__
    if cause is not None and cause is not e:
      return _first_line(cause)
    line = line.split(" See full TensorStore details")[0]
  return line


class Checkpointer:
  """Saves per the run's policy (asynchronously if asked) and restores onto any sharding."""

  def __init__(self, workdir: str, train_config: ml_collections.ConfigDict | None = None,
               read_only: bool = False):
    self.workdir = workdir
    self.directory = checkpoint_dir(workdir)
    self._in_flight = None  # the step of the last save started, until wait() has seen it end
    if train_config is not None:
      set_storage_retries(train_config.get("storage_retries", STORAGE_RETRIES))
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "data": DataShardsHandler(), "stream": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=_options(train_config, read_only),
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, config: ml_collections.ConfigDict, data_iter=None, stream: dict | None = None,
           force: bool = False):
    """Saves the state, the config and, when given, the data position (the iterator's state, read now)."""
    items = dict(state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config.to_dict()))
    if data_iter is not None:
      items.update(data=DataSave(data_iter.shard_states(), data_iter.shard_count), stream=ocp.args.JsonSave(stream))
    self.wait()  # the save in flight first (orbax would wait for it too): its failure is named as its step's
    try:
      paths.makedirs(self.directory)
      # An unwritable directory fails here, at once: orbax's async save would wait minutes for
      # a step directory that its background thread could not create.
      probe = paths.join(self.directory, f".write-test-{jax.process_index()}")
      with paths.open(probe, "w"):
        pass
      paths.remove(probe)
      self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001  (a full disk, a read-only mount: say so in one line)
      raise CheckpointError(f"saving step {step} in {self.directory} failed: {_first_line(e)}") from e
    self._in_flight = step

  def wait(self):
    """Waits for the save in flight; a failure of the background write is reported here."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      which = "" if step is None else f"step {step} "
      raise CheckpointError(f"saving {which}in {self.directory} failed: {_first_line(e)}") from e

  def has_data(self, step: int) -> bool:
    return paths.isdir(paths.join(self.directory, str(step), "data"))

  def _restore(self, step: int, **items):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001  (tensorstore and orbax raise many kinds)
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {_first_line(e)}") from e

  def check_structure(self, step: int, abstract_state):
    """Stops (ConfigError) if step's params or optimizer state differ in shape from what this run
    builds: a changed model, not a damaged file, and no reason to fall back to an older step."""
    try:
      saved = self.manager.item_metadata(step)["state"].tree
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {_first_line(e)}") from e
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)
                           for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = shapes(saved["params"]), shapes(abstract_state["params"])
    diff = sorted(set(have.items()) ^ set(want.items()))
    if diff:
      key = diff[0][0]
      raise ConfigError(f"checkpoint step {step} in {self.directory} has params of other shapes than this config "
                        f"builds (params{key}: {have.get(key)} saved, {want.get(key)} now)")
    if len(jax.tree.leaves(saved["opt_state"])) != len(jax.tree.leaves(abstract_state["opt_state"])):
      raise ConfigError(f"checkpoint step {step} in {self.directory} has another optimizer state structure "
                        "(optim or train.skip_nonfinite_steps changed)")

  def restore_state(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    return self._restore_tree(step, abstract_state)

  def restore_params(self, step: int, abstract_params):
    """Restores only state["params"] (no optimizer moments are read), onto their shardings."""
    return self._restore_tree(step, {"params": abstract_params}, partial=True)["params"]

  def _restore_tree(self, step, target, partial=False):
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)
    return self._restore(step, state=args)["state"]

  def restore_data(self, step: int, data_iter):
    """Moves `data_iter` (a fresh data.ShardedBatches of the same stream) to where step `step` left it."""
    self._restore(step, data=DataRestore(data_iter))
    return data_iter

  def restore_stream(self, step: int) -> dict:
    return self._restore(step, stream=ocp.args.JsonRestore())["stream"]

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self._restore(step, config=ocp.args.JsonRestore())["config"])

  def restore_latest(self, restore_fn):
    """(step, restore_fn(step)) for the newest step that restores; None if there is none.

    A step that fails to restore is moved to WORKDIR/broken_checkpoints/ (kept for a look, and
    out of the way of the steps this run will save) with one warning, and the one before it is tried.
    """
    for step in reversed(self.all_steps()):
      try:
        return step, restore_fn(step)
      except CheckpointError as e:
        target = paths.join(broken_dir(self.workdir), f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
          paths.makedirs(broken_dir(self.workdir))
          paths.move(paths.join(self.directory, str(step)), target)
        multihost_utils.sync_global_devices(f"moved broken checkpoint {step}")
        metrics_lib.log(f"warning: {e}; moved it to {target}, resuming from the checkpoint before it")
        self.manager.reload()
    return None

  def close(self):
    self.manager.close()
