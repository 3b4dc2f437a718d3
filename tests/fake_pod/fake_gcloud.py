"""A fake `gcloud` for the TPU commands that llama_jax's launcher runs: slices in a folder, workers as local processes.

It accepts the commands of the launcher's contract (tpu-vm create / describe / delete / list / ssh / scp,
queued-resources create / describe / delete / list, plus `gcloud version` and `gcloud config get-value
project`), with flags in any order as `--flag=value` or `--flag value`, and answers like gcloud: an unknown
flag or subcommand exits 2 with "ERROR: (gcloud.<command>) unrecognized arguments: ..." / "Invalid choice",
a missing slice exits 1 with NOT_FOUND, an existing one with ALREADY_EXISTS, an accelerator type outside the
table below with INVALID_ARGUMENT.

Environment: FAKE_GCLOUD_STATE (the state folder; required), FAKE_GCLOUD_PYTHON (the "image's" interpreter:
the gcloud wrapper runs this script with it, and the workers' `python` is it, with its packages),
FAKE_GCLOUD_CPU_DEVICES (jax CPU devices per worker; default 1), FAKE_GCLOUD_CREATE_S (seconds a slice stays
CREATING; default 0.2), FAKE_GCLOUD_QUEUE_S (seconds a queued resource waits, then provisions; default 0.5),
CLOUDSDK_CORE_PROJECT (the project when --project is not given; default "fake-project"). The call that
makes a slice or queued resource reads the FAKE_GCLOUD_* values it needs from its own environment.

State folder:
  calls.jsonl                one line per call, {"argv": [...], "exit": code} (code -N: killed by signal N;
                             a SIGKILLed call leaves no line)
  _incarnations              the last incarnation number given
  <name>/slice.json          name, zone, project, state, acceleratorType, runtimeVersion, spot, port (of the
                             jax coordinator, 127.0.0.1), incarnation (a new number per create), workers,
                             cpu_devices, python, queuedResource, ready_at
  <name>/worker-<i>/home/    the worker's HOME, fresh on each create, removed on delete
  <name>/worker-<i>/         a virtual environment over the image's packages (make_worker_python):
                             bin/python, python3, pip, pip3; a pip install stays in it
  <name>/worker-<i>/pgids/   one empty file per ssh session's process group
  _queued/<name>.json        a queued resource
Times are lazy: each call first moves CREATING slices past their ready time to READY and queued resources
from WAITING_FOR_RESOURCES to PROVISIONING (node CREATING) to ACTIVE (node READY); nothing runs between calls.

ssh runs `bash -c CMD` per worker in the worker's home, in a session of its own, with HOME, PATH (bin/
first), JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
PIP_NO_INDEX=1 and FAKE_GCLOUD_WORKER (the worker's tag, by which a kill finds every process it started)
over the caller's environment. Exit: the command's status; 255 when the slice is not READY, when the
command dies by a signal (as ssh reports a remote signal) or the slice was preempted/deleted under it. With
several workers: 255 if any gave 255, else the first non-zero status, else 0. A SIGTERM to this process
leaves the remote commands running, as with ssh.
"""

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

STATE_VAR = "FAKE_GCLOUD_STATE"
WORKER_VAR = "FAKE_GCLOUD_WORKER"
NODE_STATES = ("CREATING", "READY", "PREEMPTED", "TERMINATED", "STOPPED", "DELETING", "REPAIRING")
_NAME_RE = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_V5E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)


class Exit(Exception):
  """Ends the call with `code` after printing `message` (if any) on stderr."""

  def __init__(self, code, message=None):
    super().__init__(message)
    self.code, self.message = code, message


# ---------------------------------------------------------------------------------------------- table


def workers_of(accelerator_type):
  """Hosts of a slice type: v2/v3/v4/v5p-N (N TensorCores): N/8; v5litepod/v6e-N (N chips): 1 if N <= 8
  else N/4. None for a type outside this table."""
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type or "")
  if not m:
    return None
  family, n = m.group(1), int(m.group(2))
  if family in ("v5litepod", "v6e"):
    return None if n not in _V5E_SIZES else (1 if n <= 8 else n // 4)
  return n // 8 if n >= 8 and n % 8 == 0 else None


# ---------------------------------------------------------------------------------------------- state


def state_dir():
  path = os.environ.get(STATE_VAR)
  if not path:
    raise Exit(1, f"ERROR: (gcloud) fake gcloud: {STATE_VAR} is not set")
  return os.path.abspath(path)


@contextlib.contextmanager
def locked(root):
  """Every read-modify-write of the state happens under one flock of root/.lock."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _write_json(path, value):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def node_dir(root, name):
  return os.path.join(root, name)


def load_node(root, name):
  if not _NAME_RE.match(name or ""):
    return None
  return _read_json(os.path.join(node_dir(root, name), "slice.json"))


def save_node(root, node):
  _write_json(os.path.join(node_dir(root, node["name"]), "slice.json"), node)


def queued_path(root, name):
  return os.path.join(root, "_queued", f"{name}.json")


def load_queued(root, name):
  return _read_json(queued_path(root, name)) if _NAME_RE.match(name or "") else None


def save_queued(root, qr):
  os.makedirs(os.path.join(root, "_queued"), exist_ok=True)
  _write_json(queued_path(root, qr["name"]), qr)


def all_nodes(root):
  names = sorted(n for n in os.listdir(root) if _NAME_RE.match(n) and os.path.isdir(os.path.join(root, n))
                 ) if os.path.isdir(root) else []
  return [n for n in map(lambda name: load_node(root, name), names) if n]


def all_queued(root):
  folder = os.path.join(root, "_queued")
  names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
  return [q for q in map(lambda name: load_queued(root, name), names) if q]


def _next_incarnation(root):
  path = os.path.join(root, "_incarnations")
  value = (_read_json(path) or 0) + 1
  _write_json(path, value)
  return value


def _free_port(root):
  """A port free now on 127.0.0.1 and given to no other slice of this state folder."""
  taken = {n["port"] for n in all_nodes(root)}
  while True:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port not in taken:
      return port


def make_worker_python(worker):
  """Makes the folder `worker` a virtual environment layered over this interpreter's packages (the image's):
  bin/python and bin/python3 run this interpreter with the image's site-packages (their .pth files too)
  after the worker's own; bin/pip and bin/pip3 run `python -m pip`. So a `pip install` on a worker goes into
  the worker's folder (pip leaves the image's packages alone: "outside environment") and a no-op for what
  the image has; PIP_NO_INDEX=1 in the worker's environment keeps pip off the network."""
  version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
  base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
  site_packages = os.path.join(worker, "lib", version, "site-packages")
  os.makedirs(site_packages)
  os.makedirs(os.path.join(worker, "bin"))
  with open(os.path.join(worker, "pyvenv.cfg"), "w") as f:
    f.write(f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\n"
            f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
  import site
  with open(os.path.join(site_packages, "_fake_pod_image.pth"), "w") as f:
    f.write(f"import site; list(map(site.addsitedir, {site.getsitepackages()!r}))\n")
  for tool in ("python", "python3", version):
    os.symlink(base, os.path.join(worker, "bin", tool))
  for tool in ("pip", "pip3"):
    script = os.path.join(worker, "bin", tool)
    with open(script, "w") as f:
      f.write(f'#!/bin/sh\nexec "{os.path.join(worker, "bin", "python")}" -m pip "$@"\n')
    os.chmod(script, 0o755)


def make_node(root, name, zone, project, accelerator_type, version, spot, queued_resource=None):
  """A CREATING slice with fresh worker folders; READY after FAKE_GCLOUD_CREATE_S. Call under the lock."""
  path = node_dir(root, name)
  shutil.rmtree(path, ignore_errors=True)
  workers = workers_of(accelerator_type)
  for i in range(workers):
    worker = os.path.join(path, f"worker-{i}")
    os.makedirs(os.path.join(worker, "home"))
    os.makedirs(os.path.join(worker, "pgids"))
    make_worker_python(worker)
  node = {"name": name, "zone": zone, "project": project, "state": "CREATING",
          "acceleratorType": accelerator_type, "runtimeVersion": version, "spot": bool(spot),
          "port": _free_port(root), "incarnation": _next_incarnation(root), "workers": workers,
          "cpu_devices": int(os.environ.get("FAKE_GCLOUD_CPU_DEVICES") or 1), "python": sys.executable,
          "queuedResource": queued_resource,
          "ready_at": time.time() + float(os.environ.get("FAKE_GCLOUD_CREATE_S") or 0.2)}
  save_node(root, node)
  return node


def advance(root):
  """Moves every slice and queued resource along the states its elapsed time has reached. Under the lock."""
  now = time.time()
  for node in all_nodes(root):
    if node["state"] == "CREATING" and now >= node["ready_at"]:
      node["state"] = "READY"
      save_node(root, node)
  for qr in all_queued(root):
    if qr["state"] == "WAITING_FOR_RESOURCES" and now >= qr["provision_at"]:
      if load_node(root, qr["node_id"]) is None:
        make_node(root, qr["node_id"], qr["zone"], qr["project"], qr["acceleratorType"], qr["runtimeVersion"],
                  qr["spot"], queued_resource=qr["name"])
        qr["state"] = "PROVISIONING"
      else:  # the node's name is taken by a slice made another way
        qr["state"] = "FAILED"
      save_queued(root, qr)
    if qr["state"] == "PROVISIONING":
      node = load_node(root, qr["node_id"])
      if node is None or node["state"] == "READY":
        qr["state"] = "ACTIVE" if node else "SUSPENDED"
        save_queued(root, qr)


# ---------------------------------------------------------------------------------------------- processes


def worker_tag(root, name, worker, incarnation):
  """The FAKE_GCLOUD_WORKER value of every process that worker `worker` of this incarnation starts."""
  return f"{node_dir(root, name)}/worker-{worker}@{incarnation}"


def _proc_info(pid):
  """(environ dict, pgid, state letter) of a live process, or None (gone, a zombie, or not readable)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
      raw = f.read()
  except OSError:
    return None
  fields = stat[stat.rindex(")") + 2:].split()
  if fields[0] in ("Z", "X"):
    return None
  env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
  return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in env.items()}, int(fields[2]), fields[0]


def find_processes(match):
  """[(pid, pgid)] of live processes (not this one) whose environment satisfies match(env)."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == os.getpid():
      continue
    info = _proc_info(int(entry))
    if info and match(info[0]):
      found.append((int(entry), info[1]))
  return found


def kill_processes(match, pgid_dirs=()):
  """SIGKILLs every live process whose environment satisfies match(env), and the process groups recorded in
  pgid_dirs that hold one of them, until none is left. Raises RuntimeError if some survive 5 s."""
  recorded = set()
  for folder in pgid_dirs:
    with contextlib.suppress(OSError):
      recorded.update(int(f) for f in os.listdir(folder) if f.isdigit())
  deadline = time.time() + 5
  while True:
    victims = find_processes(match)
    if not victims:
      return
    if time.time() > deadline:
      raise RuntimeError(f"fake gcloud: processes {victims} survive SIGKILL")
    for pgid in {g for _, g in victims} & recorded:
      with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)
    for pid, _ in victims:
      with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.01)


def kill_node_processes(root, name):
  """Kills every process any worker of slice `name` started (any incarnation)."""
  prefix = node_dir(root, name) + "/worker-"
  pgid_dirs = [os.path.join(node_dir(root, name), w, "pgids") for w in os.listdir(node_dir(root, name))
               if w.startswith("worker-")] if os.path.isdir(node_dir(root, name)) else []
  kill_processes(lambda env: env.get(WORKER_VAR, "").startswith(prefix), pgid_dirs)


def preempt(root, name):
  """The slice -> PREEMPTED (its queued resource -> SUSPENDED) and every worker process SIGKILLed.
  Raises KeyError if no such slice."""
  with locked(root):
    advance(root)
    node = load_node(root, name)
    if node is None:
      raise KeyError(name)
    node["state"] = "PREEMPTED"
    save_node(root, node)
    kill_node_processes(root, name)
    qr = node["queuedResource"] and load_queued(root, node["queuedResource"])
    if qr:
      qr["state"] = "SUSPENDED"
      save_queued(root, qr)


def delete_node(root, name):
  """Kills the slice's workers and removes it; its queued resource (if any) -> SUSPENDED. Under the lock."""
  node = load_node(root, name)
  node["state"] = "DELETING"
  save_node(root, node)
  kill_node_processes(root, name)
  shutil.rmtree(node_dir(root, name))
  qr = node["queuedResource"] and load_queued(root, node["queuedResource"])
  if qr and qr["state"] not in ("DELETING",):
    qr["state"] = "SUSPENDED"
    save_queued(root, qr)


# ---------------------------------------------------------------------------------------------- output


def node_json(node):
  resource = f"projects/{node['project']}/locations/{node['zone']}"
  out = {"name": f"{resource}/nodes/{node['name']}", "acceleratorType": node["acceleratorType"],
         "runtimeVersion": node["runtimeVersion"], "state": node["state"], "health": "HEALTHY",
         "networkEndpoints": [{"ipAddress": f"10.0.0.{2 + i}", "port": 8470} for i in range(node["workers"])],
         "schedulingConfig": {"spot": True} if node["spot"] else {}}
  if node["queuedResource"]:
    out["queuedResource"] = f"{resource}/queuedResources/{node['queuedResource']}"
  return out


def queued_json(qr):
  resource = f"projects/{qr['project']}/locations/{qr['zone']}"
  out = {"name": f"{resource}/queuedResources/{qr['name']}", "state": {"state": qr["state"]},
         "tpu": {"nodeSpec": [{"nodeId": qr["node_id"], "parent": resource,
                               "node": {"acceleratorType": qr["acceleratorType"],
                                        "runtimeVersion": qr["runtimeVersion"]}}]}}
  if qr["spot"]:
    out["spot"] = {}
  return out


def _yaml(value, indent=""):
  if isinstance(value, dict):
    lines = []
    for k, v in value.items():
      if isinstance(v, (dict, list)) and v:
        lines.append(f"{indent}{k}:\n{_yaml(v, indent + '  ')}")
      else:
        lines.append(f"{indent}{k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return "\n".join(lines)
  if isinstance(value, list):
    return "\n".join(f"{indent}- " + _yaml(v, indent + "  ").lstrip() for v in value)
  return f"{indent}{value}"


def emit(value, fmt, command):
  """Prints value as gcloud's --format would: json, yaml (the default) or value(a.b)."""
  fmt = fmt or "yaml"
  if fmt == "json":
    print(json.dumps(value, indent=2))
  elif fmt == "yaml":
    items = value if isinstance(value, list) else [value]
    print("\n---\n".join(_yaml(v) for v in items))
  elif (m := re.fullmatch(r"value\(([\w.]+)\)", fmt)):
    for item in value if isinstance(value, list) else [value]:
      for key in m.group(1).split("."):
        item = item.get(key, "") if isinstance(item, dict) else ""
      print(item)
  else:
    raise Exit(1, f"ERROR: ({command}) fake gcloud: --format={fmt} is not simulated (json, yaml, value(...))")


# ---------------------------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise Exit(2, message)


def _flags(command, spec, args):
  """Parses args (gcloud's flags of one command) against spec: {flag: "value"|"bool"|"NAME"|"NAMES"}, plus
  the global --project, --format, --quiet, --verbosity. Exit 2 as gcloud for anything else."""
  parser = _Parser(prog="gcloud", add_help=False, allow_abbrev=False)
  spec = {**spec, "--project": "value", "--format": "value", "--quiet": "bool", "--verbosity": "value"}
  for flag, kind in spec.items():
    if kind == "bool":
      parser.add_argument(flag, action="store_true")
    elif kind == "NAMES":
      parser.add_argument(flag, nargs="*")
    elif kind == "NAME":
      parser.add_argument(flag, nargs="?")
    else:
      parser.add_argument(flag)
  try:
    values, unknown = parser.parse_known_args(args)
  except Exit as e:
    raise Exit(2, f"ERROR: ({command}) {e.message}") from None
  if unknown:
    raise Exit(2, f"ERROR: ({command}) unrecognized arguments: {' '.join(unknown)}\n\n"
                  "To search the help text of gcloud commands, run:\n  gcloud help -- SEARCH_TERMS")
  return values


def _require(command, values, *names):
  for name in names:
    if getattr(values, name.lstrip("-").replace("-", "_")) in (None, []):
      label = name if name.startswith("-") else name.upper()
      raise Exit(2, f"ERROR: ({command}) argument {label}: Must be specified.")


def _where(command, values):
  """(zone, project) of the call; gcloud fails without a zone when none is configured."""
  if not values.zone:
    raise Exit(1, f"ERROR: ({command}) Error parsing [tpu].\nThe [tpu] resource is not properly specified.\n"
                  "Failed to find attribute [zone]. The attribute can be set in the following ways:\n"
                  "- provide the argument `--zone` on the command line\n- set the property `compute/zone`")
  return values.zone, values.project or default_project()


def default_project():
  return os.environ.get("CLOUDSDK_CORE_PROJECT") or "fake-project"


def _not_found(command, kind, zone, project, name):
  raise Exit(1, f"ERROR: ({command}) NOT_FOUND: Resource 'projects/{project}/locations/{zone}/{kind}/{name}' "
                "was not found")


def _found_node(command, root, name, zone, project):
  """The slice `name` in zone/project, or exit 1 NOT_FOUND."""
  node = load_node(root, name)
  if node is None or (node["zone"], node["project"]) != (zone, project):
    _not_found(command, "nodes", zone, project, name)
  return node


def _check_type(command, accelerator_type, zone):
  if workers_of(accelerator_type) is None:
    raise Exit(1, f"ERROR: ({command}) INVALID_ARGUMENT: Cloud TPU received a bad request. "
                  f"the accelerator {accelerator_type} was not found in zone {zone}")


def _check_name(command, name):
  if not _NAME_RE.match(name):
    raise Exit(1, f"ERROR: ({command}) INVALID_ARGUMENT: Invalid resource name '{name}': it must match "
                  f"[a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters")


# ---------------------------------------------------------------------------------------------- commands


def tpu_vm_create(command, args):
  v = _flags(command, {"NAME": "NAME", "--zone": "value", "--accelerator-type": "value", "--version": "value",
                       "--spot": "bool"}, args)
  _require(command, v, "NAME", "--version")
  zone, project = _where(command, v)
  accelerator_type = v.accelerator_type or "v2-8"  # gcloud's default
  _check_name(command, v.NAME)
  _check_type(command, accelerator_type, zone)
  root = state_dir()
  with locked(root):
    advance(root)
    if load_node(root, v.NAME) is not None:
      raise Exit(1, f"ERROR: ({command}) ALREADY_EXISTS: Resource "
                    f"'projects/{project}/locations/{zone}/nodes/{v.NAME}' already exists")
    node = make_node(root, v.NAME, zone, project, accelerator_type, v.version, v.spot)
  operation = f"projects/{project}/locations/{zone}/operations/operation-{node['incarnation']}"
  print(f"Create request issued for: [{v.NAME}]", file=sys.stderr)
  print(f"Waiting for operation [{operation}] to complete...", end="", file=sys.stderr, flush=True)
  time.sleep(max(0.0, node["ready_at"] - time.time()))
  with locked(root):
    advance(root)
    now = load_node(root, v.NAME)
  if now is None or now["incarnation"] != node["incarnation"]:
    raise Exit(1, f"failed.\nERROR: ({command}) ABORTED: the node was deleted while it was being created")
  print(f"done.\nCreated tpu [{v.NAME}].", file=sys.stderr)
  return 0


def tpu_vm_describe(command, args):
  v = _flags(command, {"NAME": "NAME", "--zone": "value"}, args)
  _require(command, v, "NAME")
  zone, project = _where(command, v)
  root = state_dir()
  with locked(root):
    advance(root)
    node = _found_node(command, root, v.NAME, zone, project)
  emit(node_json(node), v.format, command)
  return 0


def tpu_vm_list(command, args):
  v = _flags(command, {"--zone": "value"}, args)
  zone, project = _where(command, v)
  root = state_dir()
  with locked(root):
    advance(root)
    nodes = [n for n in all_nodes(root) if (n["zone"], n["project"]) == (zone, project)]
  emit([node_json(n) for n in nodes], v.format, command)
  return 0


def tpu_vm_delete(command, args):
  v = _flags(command, {"NAME": "NAME", "--zone": "value"}, args)
  _require(command, v, "NAME")
  zone, project = _where(command, v)
  root = state_dir()
  with locked(root):
    advance(root)
    _found_node(command, root, v.NAME, zone, project)
    if not v.quiet:
      print(f"Your TPU [{v.NAME}] will be deleted.\n\nDo you want to continue (Y/n)?  Y", file=sys.stderr)
    delete_node(root, v.NAME)
  print(f"Delete request issued for: [{v.NAME}]\nDeleted tpu [{v.NAME}].", file=sys.stderr)
  return 0


def _workers(command, spec, count):
  """The worker indices of --worker (all, i, or i,j,...) on a slice of `count` workers."""
  if spec == "all":
    return list(range(count))
  try:
    chosen = [int(w) for w in spec.split(",")]
  except ValueError:
    chosen = None
  if not chosen or any(not 0 <= w < count for w in chosen):
    raise Exit(1, f"ERROR: ({command}) Invalid value for [--worker]: worker specified was [{spec}], "
                  f"it must be 'all' or a comma-separated list of indices in [0, {count - 1}]")
  return chosen


def _host(v_name):
  """NAME of [USER@]NAME."""
  return v_name.rsplit("@", 1)[-1]


def _worker_env(root, node, worker):
  home = os.path.join(node_dir(root, node["name"]), f"worker-{worker}", "home")
  env = {k: val for k, val in os.environ.items() if k not in ("PWD", "OLDPWD")}
  env.update(HOME=home, PATH=os.path.join(node_dir(root, node["name"]), f"worker-{worker}", "bin")
             + os.pathsep + env.get("PATH", "/usr/bin:/bin"),
             JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(node["cpu_devices"]),
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{node['port']}", JAX_NUM_PROCESSES=str(node["workers"]),
             JAX_PROCESS_ID=str(worker), PIP_NO_INDEX="1",
             **{WORKER_VAR: worker_tag(root, node["name"], worker, node["incarnation"])})
  return home, env


def _connection_refused(node, workers):
  for w in workers:
    print(f"ssh: connect to host 10.0.0.{2 + w} port 22: Connection refused", file=sys.stderr)
  raise Exit(255)


def _announce(tool, label, workers):
  """gcloud's progress lines on stderr before it connects."""
  sep = " " if tool == "ssh" else ""  # sic: gcloud's scp line has no space after the first period
  print(f"Using {tool} batch size of 1.{sep}Attempting to {label} into 1 nodes with a total of {len(workers)} "
        "workers.", file=sys.stderr)
  for w in workers:
    print(f"{label}: Attempting to connect to worker {w}...", file=sys.stderr)
  sys.stderr.flush()


def tpu_vm_ssh(command, args):
  v = _flags(command, {"NAME": "NAME", "--zone": "value", "--worker": "value", "--command": "value",
                       "--strict-host-key-checking": "value"}, args)
  _require(command, v, "NAME")
  zone, project = _where(command, v)
  if v.strict_host_key_checking not in (None, "yes", "no", "ask"):
    raise Exit(2, f"ERROR: ({command}) argument --strict-host-key-checking: Invalid choice: "
                  f"'{v.strict_host_key_checking}'.")
  if v.command is None:
    raise Exit(1, f"ERROR: ({command}) fake gcloud: an interactive ssh session is not simulated; give --command")
  root, name = state_dir(), _host(v.NAME)
  procs = {}
  with locked(root):
    advance(root)
    node = _found_node(command, root, name, zone, project)
    workers = _workers(command, v.worker or "0", node["workers"])
    if node["state"] != "READY":
      _connection_refused(node, workers)
    _announce("ssh", "SSH", workers)
    for w in workers:  # started under the lock, so a preemption either comes first or finds them
      home, env = _worker_env(root, node, w)
      procs[w] = subprocess.Popen(["bash", "-c", v.command], cwd=home, env=env, start_new_session=True)
      open(os.path.join(node_dir(root, name), f"worker-{w}", "pgids", str(procs[w].pid)), "w").close()
  codes = {}

  def wait(w):
    code = procs[w].wait()
    with locked(root):
      advance(root)
      now = load_node(root, name)
    lost = now is None or now["incarnation"] != node["incarnation"] or now["state"] != "READY"
    if lost or code < 0:
      print(f"Connection to 10.0.0.{2 + w} closed by remote host.", file=sys.stderr, flush=True)
      code = 255
    codes[w] = code

  threads = [threading.Thread(target=wait, args=(w,), daemon=True) for w in workers]
  for t in threads:
    t.start()
  for t in threads:
    while t.is_alive():
      t.join(0.2)  # a bounded join, so that a signal reaches its handler at once
  if 255 in codes.values():
    return 255
  return next((codes[w] for w in workers if codes[w]), 0)


def tpu_vm_scp(command, args):
  v = _flags(command, {"PATHS": "NAMES", "--zone": "value", "--worker": "value", "--recurse": "bool",
                       "--strict-host-key-checking": "value"}, args)
  if not v.PATHS or len(v.PATHS) < 2:
    raise Exit(2, f"ERROR: ({command}) argument [[USER@]INSTANCE:]SRC [[[USER@]INSTANCE:]SRC ...] "
                  "[[USER@]INSTANCE:]DEST: Must be specified.")
  zone, project = _where(command, v)
  *sources, dest = v.PATHS
  if ":" not in dest or any(":" in s for s in sources):
    raise Exit(1, f"ERROR: ({command}) fake gcloud: only copies from local files to [USER@]NAME:PATH are "
                  "simulated")
  name, remote = dest.split(":", 1)
  name = _host(name)
  if remote.startswith("~/"):
    remote = remote[2:]
  if os.path.isabs(remote) or ".." in remote.split("/"):
    raise Exit(1, f"ERROR: ({command}) fake gcloud: the remote path must lie under the worker's home: {remote}")
  for s in sources:
    if not os.path.exists(s):
      raise Exit(1, f"ERROR: ({command}) [{s}] does not exist.")
    if os.path.isdir(s) and not v.recurse:
      raise Exit(1, f"scp: {s}: not a regular file")
  root = state_dir()
  with locked(root):
    advance(root)
    node = _found_node(command, root, name, zone, project)
    workers = _workers(command, v.worker or "0", node["workers"])
    if node["state"] != "READY":
      _connection_refused(node, workers)
    _announce("scp", "SCP", workers)
    for w in workers:
      home = os.path.join(node_dir(root, name), f"worker-{w}", "home")
      target = os.path.join(home, remote) if remote else home
      for s in sources:
        into = os.path.join(target, os.path.basename(s.rstrip("/"))) if os.path.isdir(target) else target
        if not os.path.isdir(os.path.dirname(into) or home):
          raise Exit(1, f"scp: {remote}: No such file or directory")
        if os.path.isdir(s):
          shutil.copytree(s, into, dirs_exist_ok=True)
        else:
          shutil.copyfile(s, into)
  return 0


def queued_create(command, args):
  v = _flags(command, {"NAME": "NAME", "--node-id": "value", "--zone": "value", "--accelerator-type": "value",
                       "--runtime-version": "value", "--spot": "bool"}, args)
  _require(command, v, "NAME", "--node-id", "--runtime-version")
  zone, project = _where(command, v)
  accelerator_type = v.accelerator_type
  _require(command, v, "--accelerator-type")
  _check_name(command, v.NAME)
  _check_name(command, v.node_id)
  _check_type(command, accelerator_type, zone)
  root = state_dir()
  with locked(root):
    advance(root)
    if load_queued(root, v.NAME) is not None:
      raise Exit(1, f"ERROR: ({command}) ALREADY_EXISTS: Resource "
                    f"'projects/{project}/locations/{zone}/queuedResources/{v.NAME}' already exists")
    save_queued(root, {"name": v.NAME, "node_id": v.node_id, "zone": zone, "project": project,
                       "acceleratorType": accelerator_type, "runtimeVersion": v.runtime_version,
                       "spot": bool(v.spot), "state": "WAITING_FOR_RESOURCES",
                       "provision_at": time.time() + float(os.environ.get("FAKE_GCLOUD_QUEUE_S") or 0.5)})
  print(f"Create request issued for: [{v.NAME}]", file=sys.stderr)
  return 0


def _found_queued(command, root, name, zone, project):
  qr = load_queued(root, name)
  if qr is None or (qr["zone"], qr["project"]) != (zone, project):
    _not_found(command, "queuedResources", zone, project, name)
  return qr


def queued_describe(command, args):
  v = _flags(command, {"NAME": "NAME", "--zone": "value"}, args)
  _require(command, v, "NAME")
  zone, project = _where(command, v)
  root = state_dir()
  with locked(root):
    advance(root)
    qr = _found_queued(command, root, v.NAME, zone, project)
  emit(queued_json(qr), v.format, command)
  return 0


def queued_list(command, args):
  v = _flags(command, {"--zone": "value"}, args)
  zone, project = _where(command, v)
  root = state_dir()
  with locked(root):
    advance(root)
    qrs = [q for q in all_queued(root) if (q["zone"], q["project"]) == (zone, project)]
  emit([queued_json(q) for q in qrs], v.format, command)
  return 0


def queued_delete(command, args):
  v = _flags(command, {"NAME": "NAME", "--zone": "value", "--force": "bool", "--async": "bool"}, args)
  _require(command, v, "NAME")
  zone, project = _where(command, v)
  root = state_dir()
  with locked(root):
    advance(root)
    qr = _found_queued(command, root, v.NAME, zone, project)
    node = load_node(root, qr["node_id"])
    owned = node is not None and node["queuedResource"] == qr["name"]
    if owned and not v.force:
      raise Exit(1, f"ERROR: ({command}) FAILED_PRECONDITION: Queued resource {v.NAME} still has node "
                    f"{qr['node_id']}; delete the node first or pass --force")
    qr["state"] = "DELETING"
    save_queued(root, qr)
    if owned:
      delete_node(root, qr["node_id"])
    os.remove(queued_path(root, v.NAME))
  print(f"Deleted queued resource [{v.NAME}].", file=sys.stderr)
  return 0


def config_get_value(command, args):
  v = _flags(command, {"PROPERTY": "NAME"}, args)
  _require(command, v, "PROPERTY")
  if v.PROPERTY in ("project", "core/project"):
    print(default_project())
  else:
    print("(unset)", file=sys.stderr)
  return 0


def version(command, args):
  _flags(command, {}, args)
  print("Google Cloud SDK 999.0.0 (the simulated pod of llama_jax's tests)")
  return 0


COMMANDS = {"compute": {"tpus": {"tpu-vm": {"create": tpu_vm_create, "describe": tpu_vm_describe,
                                            "list": tpu_vm_list, "delete": tpu_vm_delete, "ssh": tpu_vm_ssh,
                                            "scp": tpu_vm_scp},
                                 "queued-resources": {"create": queued_create, "describe": queued_describe,
                                                      "list": queued_list, "delete": queued_delete}}},
            "config": {"get-value": config_get_value},
            "version": version}
_GLOBAL_VALUE_FLAGS = ("--project", "--format", "--verbosity")


def dispatch(argv):
  """Walks argv's leading words down COMMANDS (global flags may come before them) and runs the command."""
  node, path, rest, i = COMMANDS, ["gcloud"], [], 0
  while isinstance(node, dict):
    if i == len(argv):
      raise Exit(2, f"ERROR: ({'.'.join(path)}) Command name argument expected.")
    word = argv[i]
    if word == "--version" and len(path) == 1:
      return version("gcloud.version", [])
    if word.startswith("-"):
      rest.append(word)
      if word in _GLOBAL_VALUE_FLAGS and i + 1 < len(argv):
        rest.append(argv[i + 1])
        i += 1
      i += 1
      continue
    if word not in node:
      raise Exit(2, f"ERROR: ({'.'.join(path)}) Invalid choice: '{word}'.")
    node, i = node[word], i + 1
    path.append(word)
  return node(".".join(path), rest + argv[i:])


def main(argv):
  root = None
  code = 1

  def record(exit_code):
    # One O_APPEND write per call, without the lock: a signal may come while this process holds it.
    if root:
      os.makedirs(root, exist_ok=True)
      fd = os.open(os.path.join(root, "calls.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        os.write(fd, (json.dumps({"argv": argv, "exit": exit_code}) + "\n").encode())
      finally:
        os.close(fd)

  def on_signal(signum, frame):
    record(-signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

  for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, on_signal)
  try:
    root = state_dir()
    code = dispatch(argv)
  except Exit as e:
    if e.message:
      print(e.message, file=sys.stderr)
    code = e.code
  sys.stdout.flush()
  record(code)
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
