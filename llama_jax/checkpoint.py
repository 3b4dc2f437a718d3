"""Orbax checkpoints of the train state and the config, under WORKDIR/checkpoints/<step>/.

Each step holds two items: `state` ({"step", "params", "opt_state"}) and `config` (the full
training config as JSON, so eval.py and resumption need nothing but the workdir).
"""

import os

import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves (asynchronously if asked), keeps the newest `max_to_keep`, restores onto any sharding."""

  def __init__(self, workdir: str, max_to_keep: int | None = None, async_save: bool = True,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=("state", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, config: ml_collections.ConfigDict, force: bool = False):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config.to_dict())), force=force)

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

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

