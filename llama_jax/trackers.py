"""The trackers behind metrics.MetricWriter besides metrics.jsonl: TensorBoard and Weights & Biases
(config.metrics.trackers), each with the MetricWriter's calls: write(step, metrics), write_text(step,
tag, text), flush() and close(failed).

TensorBoard (`TensorBoard`): event files under WORKDIR/tensorboard. On a local workdir tensorboardX's
SummaryWriter writes them, flushed at each event. On object storage (`gs://`), which has no append
and takes about one update of an object a second, the run's event file
WORKDIR/tensorboard/events.out.tfevents.<time>.<host> grows by paths.append at each MetricWriter
flush: its records (tensorboardX's Event protos in TFRecord framing, as its SummaryWriter writes them
to a local file) are made here and appended whole, so TensorBoard reads complete records there at
any moment. tensorboardX's own `gs://` writer was not taken: it uploads the whole event file again
on every flush (traffic growing with the run's length) through google-cloud-storage's Client, and
its SummaryWriter writes from a queue in a thread of its own, so that no flush of ours could say
which events are in.

Weights & Biases (`Wandb`, the `wandb` package, imported only when the tracker is on): one W&B run
per workdir. Its id is made at the first start and kept in WORKDIR/wandb_run_id, and every start
opens the run with that id and resume="allow", so a resumed training run appends to the same W&B
run. Online, W&B resumes the run on its server. Offline (config.metrics.wandb_mode="offline", for
machines without network), each start writes a directory of its own, WORKDIR/wandb/offline-run-
<time>-<id>, whose run record asks for a resume, and `wandb sync WORKDIR/wandb/offline-run-*`
uploads them later, the files of one run in the order they started (wandb 0.31's `wandb sync
--help`). W&B writes local files only: for a workdir on object storage they go under wandb's own
directory instead (the WANDB_DIR environment variable, else ./wandb in the current directory),
which the run's log line names.

Steps: W&B wants the `step=` of wandb.log to grow within a run, but a run resumed after a process
died without a checkpoint (SIGKILL, a lost machine) logs again the steps after its last checkpoint,
which W&B would drop. So every row is logged without `step=` (W&B numbers its rows itself, in
`_step`) and carries the train step as the value "step", which define_metric makes the x-axis of
every other value: the steps logged again show up as second points at those steps, as they do in
metrics.jsonl.

What goes to W&B, for each MetricWriter call: the numbers of write(step, metrics) as one row
(non-finite floats as they are); with the held-out scores in it (eval_loss, eval_<set>_bits_per_byte,
..., as evaluate.as_eval_metrics names them) also a wandb.Table "eval_sets" with a row per set (set,
loss, bits_per_byte, perplexity, num_tokens; the set "" is data.eval_corpus); write_text(step, tag,
text), a sample, as a wandb.Html page (the text in a <pre>) under `tag`. The whole config is the
run's config. wandb prints nothing (silent) and leaves stdout and stderr alone (console="off").
"""

import html
import socket
import struct
import time

from llama_jax import errors
from llama_jax import paths
from llama_jax.errors import ConfigError

TRACKERS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("online", "offline")
# The held-out scores of a set, as evaluate.as_eval_metrics writes them (eval_<field>, eval_<set>_<field>),
# in the column order of the W&B table.
EVAL_FIELDS = ("loss", "bits_per_byte", "perplexity", "num_tokens")
EVAL_TABLE = "eval_sets"
# Seconds between the writes of wandb's service process (wandb-core) to the run's .wandb file: it keeps the
# rows in a buffer until then (15 s by default in wandb 0.31) and writes nothing more when the training
# process dies without a word (SIGKILL), so a run killed there would lose up to that long of its rows in
# W&B, those before its last checkpoint too, which the resumed run does not log again.
WANDB_FLUSH_SECS = 0.1


def check_trackers(metrics_config):
  """Raises ConfigError naming the key: config.metrics.trackers not a tuple of distinct TRACKERS
  names that holds "jsonl" (plot.py, eval.py and resumes read metrics.jsonl), or, with "wandb",
  config.metrics.wandb_mode not one of WANDB_MODES or config.metrics.wandb_project empty."""
  trackers = metrics_config.trackers
  if not isinstance(trackers, (tuple, list)) or not all(isinstance(t, str) for t in trackers):
    raise ConfigError(f"config.metrics.trackers={trackers!r} is not a tuple of names from {list(TRACKERS)}")
  unknown = [t for t in trackers if t not in TRACKERS]
  if unknown:
    raise ConfigError(f"config.metrics.trackers has {', '.join(map(repr, unknown))}, not one of {list(TRACKERS)}")
  if len(set(trackers)) != len(trackers):
    raise ConfigError(f"config.metrics.trackers={tuple(trackers)!r} names a tracker twice")
  if "jsonl" not in trackers:
    raise ConfigError(f"config.metrics.trackers={tuple(trackers)!r} leaves out \"jsonl\": metrics.jsonl is "
                      "always written (plots, eval.py and resumed runs read it)")
  if "wandb" in trackers:
    if metrics_config.wandb_mode not in WANDB_MODES:
      raise ConfigError(f"config.metrics.wandb_mode={metrics_config.wandb_mode!r} is not one of {list(WANDB_MODES)}")
    if not isinstance(metrics_config.wandb_project, str) or not metrics_config.wandb_project:
      raise ConfigError(f"config.metrics.wandb_project={metrics_config.wandb_project!r} is not a W&B project name")


def _numbers(metrics: dict) -> dict:
  """The int and float values of `metrics` (not bools, lists or text)."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
  """Scalars and texts in TensorBoard event files under WORKDIR/tensorboard (see the module docstring)."""

  def __init__(self, workdir: str):
    self._remote = paths.is_remote(workdir)
    if self._remote:
      self._records = _TensorBoardRecords()
      self.path = paths.join(workdir, "tensorboard", f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    else:
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (imported here: processes > 0 never need it)
      self.path = paths.join(workdir, "tensorboard")
      self._writer = SummaryWriter(self.path)

  def write(self, step: int, metrics: dict):
    target = self._records if self._remote else self._writer
    for k, v in _numbers(metrics).items():
      target.add_scalar(k, v, step)
    if not self._remote:
      self._writer.flush()

  def write_text(self, step: int, tag: str, text: str):
    target = self._records if self._remote else self._writer
    target.add_text(tag, text, step)
    if not self._remote:
      self._writer.flush()

  def flush(self):
    """On object storage: appends the records not sent yet to the event file (raises what the upload
    raises). Locally every event is in the file already."""
    if self._remote:
      records = self._records.take()
      if records:
        paths.append(self.path, records)

  def close(self, failed: bool = False):  # noqa: ARG002  (the trackers' common signature)
    if not self._remote:
      self._writer.close()


class _TensorBoardRecords:
  """TensorBoard events kept in memory as the bytes of an event file: the records tensorboardX's
  SummaryWriter writes (its summary protos; a length, the data and their masked CRC32Cs, little-endian),
  starting with the file-version event that opens each file."""

  def __init__(self):
    from tensorboardX.proto import event_pb2  # noqa: PLC0415  (imported here: processes > 0 never need it)
    self._event = event_pb2.Event
    self._pending = bytearray()
    self._add(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def add_scalar(self, tag: str, value: float, step: int):
    from tensorboardX import summary  # noqa: PLC0415
    self._add(self._event(wall_time=time.time(), step=int(step), summary=summary.scalar(tag, value)))

  def add_text(self, tag: str, text: str, step: int):
    from tensorboardX import summary  # noqa: PLC0415
    self._add(self._event(wall_time=time.time(), step=int(step), summary=summary.text(tag, text)))

  def _add(self, event):
    from tensorboardX.record_writer import masked_crc32c  # noqa: PLC0415
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._pending += header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))

  def take(self) -> bytes:
    """The records added since the last take."""
    records, self._pending = bytes(self._pending), bytearray()
    return records


def wandb_run_id_path(workdir: str) -> str:
  """WORKDIR/wandb_run_id: the id of the workdir's W&B run, one line."""
  return paths.join(workdir, "wandb_run_id")


class TrackerError(ConfigError):
  """A tracker that cannot start (W&B not logged in, say), named in one line with the config key."""


class Wandb:
  """The workdir's W&B run (see the module docstring): started (or resumed) here, finished by close.

  Raises TrackerError naming config.metrics.wandb_mode when wandb.init fails (online without an API
  key or network, say); what an upload of WORKDIR/wandb_run_id raises goes on as it is."""

  def __init__(self, workdir: str, config):
    import wandb  # noqa: PLC0415  (only when the tracker is on)
    from wandb.sdk.lib import runid  # noqa: PLC0415  (the ids wandb.init makes: 8 base-36 characters)
    self._wandb = wandb
    m = config.metrics
    id_path = wandb_run_id_path(workdir)
    run_id = paths.read_text(id_path).strip() if paths.isfile(id_path) else ""
    if not run_id:  # written before the run starts: a run killed at once still resumes under this id
      run_id = runid.generate_id()
      paths.write_atomic(id_path, run_id + "\n")
    try:
      self._run = wandb.init(
          project=m.wandb_project, entity=m.wandb_entity or None, name=m.wandb_name or paths.name(workdir),
          config=config.to_dict(), id=run_id, resume="allow", mode=m.wandb_mode,
          dir=None if paths.is_remote(workdir) else workdir,  # None: WANDB_DIR, else ./wandb
          settings=wandb.Settings(silent=True, console="off",
                                  x_transaction_log_flush_interval=WANDB_FLUSH_SECS))
    except Exception as e:  # noqa: BLE001  (wandb raises its own errors, and others from its service)
      raise TrackerError(f"W&B could not start run {run_id} (config.metrics.wandb_mode={m.wandb_mode!r}): "
                         f"{errors.first_line(e)}") from e
    self._run.define_metric("step")
    self._run.define_metric("*", step_metric="step")
    self.path = self._run.settings.sync_dir  # the run's local directory (offline-run-<time>-<id>, run-...)
    self.mode = m.wandb_mode

  def describe(self) -> str:
    """A log line: the run, where its files are, and for an offline run how to upload it."""
    if self.mode == "offline":
      return (f"W&B run {self._run.id} (offline) in {self.path}; upload with `wandb sync "
              f"{paths.join(paths.parent(self.path), 'offline-run-*-' + self._run.id + '*')}`")  # wandb adds -1, -2.. to a second start in the same second
    return f"W&B run {self._run.id}: {self._run.url} (local files in {self.path})"

  def write(self, step: int, metrics: dict):
    row = {**_numbers(metrics), "step": int(step)}
    sets = _eval_sets(metrics)
    if sets:
      row[EVAL_TABLE] = self._wandb.Table(
          columns=["set", *EVAL_FIELDS], data=[[name, *(s.get(f) for f in EVAL_FIELDS)] for name, s in sets.items()])
    self._run.log(row)

  def write_text(self, step: int, tag: str, text: str):
    self._run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>"), "step": int(step)})

  def flush(self):
    """Nothing to do: wandb's service process writes and uploads each row itself."""

  def close(self, failed: bool = False):
    """Finishes the run (W&B marks it failed when `failed`: exit code 1; finished otherwise), then
    stops wandb's service process (wandb.teardown), which writes the run's files to their end first:
    run.finish returns before they are complete, and the trainer may remove them next (a refused
    new run)."""
    try:
      self._run.finish(exit_code=1 if failed else 0)
    finally:
      self._wandb.teardown()


def _eval_sets(metrics: dict) -> dict[str, dict]:
  """The held-out scores in `metrics`, by set ("" for data.eval_corpus): {set: {field: value}}."""
  sets = {}
  for key, value in metrics.items():
    if not key.startswith("eval_"):
      continue
    for field in sorted(EVAL_FIELDS, key=len, reverse=True):
      if key == f"eval_{field}":
        sets.setdefault("", {})[field] = value
        break
      if key.endswith(f"_{field}"):
        sets.setdefault(key[len("eval_"):-len(field) - 1], {})[field] = value
        break
  return sets
