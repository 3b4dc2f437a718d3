"""Orbax checkpoints of the train state and the config, under WORKDIR/checkpoints/<step>/.

Each step holds four items: `state` ({"step", "params", "opt_state"}), `config` (the full
training config as JSON, so eval.py and resumption need nothing but the workdir), `data` (the
grain iterator state of the training stream, one file per process) and `stream` (what defines
that stream, data.stream_definition, compared when resuming).
"""

import os

import grain
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves (asynchronously if asked), keeps the newest `max_to_keep`, restores onto any sharding."""

  def __init__(self, workdir: str, max_to_keep: int | None = None, async_save: bool = True,
               read_only: bool = False):
    # The directory is made by the first save, so a run that stops on bad input leaves none.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=False, read_only=read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "config", "data", "stream"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, config: ml_collections.ConfigDict, data_iter=None, stream: dict | None = None,
           force: bool = False):
    """Saves the state, the config and, when given, the data position (the iterator's state, read now).

    A checkpoint without a data position (an HF import) starts its data stream from the beginning.
    """
    os.makedirs(self.directory, exist_ok=True)
    items = dict(state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config.to_dict()))
    if data_iter is not None:
      items.update(data=grain.checkpoint.CheckpointSave(data_iter), stream=ocp.args.JsonSave(stream))
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def has_data(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), "data"))

  def restore_state(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    return self._restore_tree(step, abstract_state)

  def restore_params(self, step: int, abstract_params):
    """Restores only state["params"] (no optimizer moments are read), onto their shardings."""
    return self._restore_tree(step, {"params": abstract_params}, partial=True)["params"]

  def _restore_tree(self, step, target, partial=False):
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial)))
    return restored["state"]

  def restore_data(self, step: int, data_iter):
    """Moves `data_iter` (a fresh grain iterator of the same stream) to where step `step` left it."""
    self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    return data_iter

  def restore_stream(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(stream=ocp.args.JsonRestore()))["stream"]

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

