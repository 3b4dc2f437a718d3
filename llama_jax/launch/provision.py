"""Bringing the slice to READY: create it when missing, delete and create it again when preempted or
stopped, wait while it is on its way.

With `tpu-vm create` (which returns once the slice is READY):
  node NOT_FOUND -> create; PREEMPTED / TERMINATED / STOPPED -> delete, then create; READY -> done;
  any other state (CREATING, STARTING, REPAIRING, DELETING, ...) -> describe again after poll_s.
With queued resources (`queued-resources create` returns at once; the node appears once the request is
ACTIVE):
  request NOT_FOUND -> create it; SUSPENDED / FAILED -> delete it (with its node), then create it; ACTIVE ->
  the node as above, except that a dead or missing node deletes and recreates the request; any other state
  (WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, DELETING, ...) -> describe again after poll_s.
Waiting is unbounded (capacity can take hours) and says each new state once.
"""

import time

from llama_jax.errors import ConfigError
from llama_jax.launch import gcloud
from llama_jax.launch.accelerators import Accelerator


def plan(where: gcloud.Slice, accelerator: Accelerator, version: str, spot: bool, queued: bool) -> list[list[str]]:
  """The commands that bring up a slice that does not exist yet, in order (for --dry_run)."""
  if queued:
    return [where.queued_describe(), where.queued_create(accelerator.name, version, spot), where.queued_describe(),
            where.describe()]
  return [where.describe(), where.create(accelerator.name, version, spot)]


def ensure_ready(runner: gcloud.Runner, where: gcloud.Slice, accelerator: Accelerator, version: str, spot: bool,
                 queued: bool, poll_s: float, say) -> int:
  """Makes the slice READY and returns its worker count (its describe's networkEndpoints; the accelerator
  table's hosts when it lists none). Raises GcloudError when a gcloud command fails, ConfigError when the
  slice that is there has another accelerator type."""
  last_state = None
  while True:
    if queued:
      state = gcloud.describe_queued(runner, where)
      if state is None:
        say(f"creating queued resource {where.name} ({accelerator.name}, {version}{', spot' if spot else ''})")
        gcloud.check(runner, where.queued_create(accelerator.name, version, spot), f"create queued resource {where.name}")
        continue
      if state in gcloud.DEAD_QUEUED_STATES:
        say(f"queued resource {where.name} is {state}: deleting it to create it again")
        gcloud.check(runner, where.queued_delete(), f"delete queued resource {where.name}")
        continue
      if state != gcloud.ACTIVE:
        if state != last_state:
          say(f"queued resource {where.name} is {state}: waiting")
        last_state = state
        time.sleep(poll_s)
        continue
    node = gcloud.describe_node(runner, where)
    if node is not None and node.state == gcloud.READY:
      if node.accelerator_type and node.accelerator_type != accelerator.name:
        raise ConfigError(f"slice {where.name} is a {node.accelerator_type}, not --accelerator_type="
                          f"{accelerator.name}: delete it or pass --accelerator_type={node.accelerator_type}")
      return node.workers or accelerator.hosts
    if node is None or node.state in gcloud.DEAD_NODE_STATES:
      if queued:
        say(f"slice {where.name} is {node.state if node else 'gone'}: deleting its queued resource to create it again")
        gcloud.check(runner, where.queued_delete(), f"delete queued resource {where.name}")
      elif node is None:
        say(f"creating slice {where.name} ({accelerator.name}, {version}{', spot' if spot else ''})")
        gcloud.check(runner, where.create(accelerator.name, version, spot), f"create {where.name}")
      else:
        say(f"slice {where.name} is {node.state}: deleting it to create it again")
        gcloud.check(runner, where.delete(), f"delete {where.name}")
      continue
    if node.state != last_state:
      say(f"slice {where.name} is {node.state}: waiting")
    last_state = node.state
    time.sleep(poll_s)
