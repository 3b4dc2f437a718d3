"""Training curves of one or more runs from WORKDIR/metrics.jsonl, as one PNG.

  python -m llama_jax.plot runs/tiny [runs/other ...] --output run.png
  python -m llama_jax.plot gs://bucket/tiny --output gs://bucket/tiny/run.png

Four panels against step: train loss (the mean over each log interval), held-out bits per
byte, learning rate and tokens/s; each run is one line in every panel, in the same colour,
named by its workdir in the legend. Workdirs and --output may be local or on object storage
(llama_jax.paths): metrics.jsonl is read whole, the image is rendered in memory and written in one piece.
"""

import io
import json
import os
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llama_jax import metrics as metrics_lib
from llama_jax import paths
from llama_jax.errors import ConfigError

# (metrics.jsonl key, panel title): train events carry the first, third and fourth
# (trainer.py), eval events the second (evaluate.as_eval_metrics).
PANELS = (("loss", "train loss"), ("eval_bits_per_byte", "eval bits/byte"),
          ("learning_rate", "learning rate"), ("tokens_per_sec", "tokens/s"))


def read_metrics(workdir: str) -> list[dict]:
  """The events of WORKDIR/metrics.jsonl, in the order they were written.

  A last line that is not JSON (a run killed mid-write leaves one cut short) is skipped with a
  warning on stderr; any other line that is not a UTF-8 JSON object is ConfigError `PATH:LINE: ...`.
  """
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.isfile(path):
    raise ConfigError(f"{workdir}: no metrics.jsonl (not a training workdir, or no step logged yet)")
  lines = [(n, line) for n, line in enumerate(paths.read_bytes(path).split(b"\n"), 1) if line.strip()]
  events = []
  for n, raw in lines:
    try:
      event = json.loads(raw.decode("utf-8"))
      why = None if isinstance(event, dict) and "step" in event else "not a JSON object with a step"
    except UnicodeDecodeError:
      why = "not UTF-8"
    except ValueError:
      why = "not JSON"
    if why is None:
      events.append(event)
    elif n == lines[-1][0]:
      print(f"warning: {path}:{n}: {why}; skipped it as a last line cut short (a run stopped mid-write)",
            file=sys.stderr)
    else:
      raise ConfigError(f"{path}:{n}: {why}")
  return events


def series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps its last value.
  Non-finite values, written as "inf", "-inf" or "nan" (metrics.dumps), come back as floats; the
  panels leave them out (matplotlib draws no point there)."""
  by_step = {e["step"]: metrics_lib.number(e[key]) for e in events if key in e}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_runs(workdirs: list[str]) -> Figure:
  """A 2 x 2 figure (1000 x 700 pixels at its 100 dpi) of PANELS, one line per run in each.
  Raises ConfigError for a run with nothing to plot (no event with any of the PANELS' keys)."""
  runs = [(_label(w, workdirs), read_metrics(w)) for w in workdirs]
  for w, (_, events) in zip(workdirs, runs):
    if not any(key in e for e in events for key, _ in PANELS):
      raise ConfigError(f"{paths.join(w, 'metrics.jsonl')}: nothing to plot (no logged step)")
  fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 2, sharex=True)  # a lone eval point is placed within the run
  for ax, (key, title) in zip(axes.flat, PANELS):
    for i, (label, events) in enumerate(runs):
      steps, values = series(events, key)
      # Markers: the held-out score is often a single point (the final eval).
      ax.plot(steps, values, color=f"C{i}", label=label, marker="o" if key.startswith("eval_") else None)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  for ax in axes[1]:
    ax.set_xlabel("step")
  axes[0, 0].legend()
  return fig


def _label(workdir: str, workdirs: list[str]) -> str:
  """The workdir's name; its whole path where two runs share a name."""
  name = lambda w: paths.name(_shown(w))
  return name(workdir) if [name(w) for w in workdirs].count(name(workdir)) == 1 else _shown(workdir)


def _shown(workdir: str) -> str:
  """The workdir as given, tidied: a URL without a trailing '/', a local path normalised (a string
  operation: nothing on disk is read)."""
  return paths.normalize(workdir) if paths.is_remote(workdir) else os.path.normpath(workdir)


def main():
  """The command line (absl flags and the error path of llama_jax.entry); workdirs are positional."""
  from absl import flags

  from llama_jax import entry

  output = flags.DEFINE_string("output", None, "The PNG to write.")
  flags.mark_flags_as_required(["output"])

  def run(workdirs):
    if not workdirs:
      raise ConfigError("give at least one WORKDIR: python -m llama_jax.plot WORKDIR [WORKDIR ...] --output FILE")
    write_png(workdirs, output.value)
    print(f"wrote {output.value}")

  entry.main(lambda argv: entry.run(lambda: run(argv[1:])))


def write_png(workdirs: list[str], output: str):
  """plot_runs(workdirs) written to `output` (a PNG; another image format for another extension),
  local or `gs://`. --output is checked first (ConfigError for a directory, a missing parent directory
  or bucket, an extension matplotlib does not write); the image is rendered in memory and written with
  paths.write_atomic, so a reader sees the old file or the whole new one."""
  paths.check_output_file(output, "--output")
  kind = os.path.splitext(paths.name(output))[1][1:].lower() or "png"  # as savefig picks it: by the extension
  if kind not in FigureCanvasAgg.get_supported_filetypes():
    raise ConfigError(f"--output {output}: .{kind} is not an image format matplotlib writes (give a .png name)")
  image = io.BytesIO()
  plot_runs(workdirs).savefig(image, format=kind)
  paths.write_atomic(output, image.getvalue())


if __name__ == "__main__":
  main()
