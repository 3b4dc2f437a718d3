"""Training curves of one or more runs from WORKDIR/metrics.jsonl, as one PNG.

  python -m llama_jax.plot runs/tiny [runs/other ...] --output run.png
  python -m llama_jax.plot gs://bucket/tiny --output gs://bucket/tiny/run.png

Four panels against step: train loss (the mean over each log interval), held-out bits per
byte (one line per held-out set: data.eval_corpus and each of data.eval_corpora), learning rate and
tokens/s; then one panel per lm-eval task metric ("<task>/<metric>": config.eval.tasks during
training, or eval.py --all_steps) where a run has any. Each run is one line in every panel, in the
same colour, named by its workdir in the legend. The records of WORKDIR/eval_steps.jsonl (eval.py
--all_steps: every checkpoint's held-out and task scores) join the run's metrics.jsonl. Workdirs and
--output may be local or on object storage (llama_jax.paths): metrics.jsonl is read whole, the image
is rendered in memory and written in one piece.
"""

import io
import os
import re

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
  """The events of WORKDIR/metrics.jsonl, in the order they were written, then those of
  WORKDIR/eval_steps.jsonl (eval.py --all_steps), each record as one event: its step, its held-out
  scores (eval_* keys) and its task scores ("<task>/<metric>").

  ConfigError when the workdir has neither file. A last line that is not JSON (a run killed mid-write
  leaves one cut short) is skipped with a warning on stderr; any other line that is not a UTF-8 JSON
  object is ConfigError `PATH:LINE: ...` (metrics.read_events).
  """
  path, steps_path = metrics_lib.metrics_path(workdir), metrics_lib.eval_steps_path(workdir)
  has_metrics, has_steps = paths.isfile(path), paths.isfile(steps_path)
  if not (has_metrics or has_steps):
    raise ConfigError(f"{workdir}: no metrics.jsonl (not a training workdir, or no step logged yet)")
  events = metrics_lib.read_events(path) if has_metrics else []
  if has_steps:
    events += [{"step": r["step"], **r.get("scores", {}), **r.get("tasks", {})}
               for r in metrics_lib.read_events(steps_path)]
  return events


def series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps its last value.
  Non-finite values, written as "inf", "-inf" or "nan" (metrics.dumps), come back as floats; the
  panels leave them out (matplotlib draws no point there)."""
  by_step = {e["step"]: metrics_lib.number(e[key]) for e in events if key in e}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def eval_sets(events: list[dict]) -> list[str]:
  """The held-out sets whose bits/byte the events hold: "" (data.eval_corpus: eval_bits_per_byte) first,
  then the named ones (eval_<name>_bits_per_byte; evaluate.as_eval_metrics) in the order first seen;
  the macro mean (eval_mean_*) is not one."""
  found = {}
  for e in events:
    for key in e:
      m = _SET_KEY.fullmatch(key)
      if m and m.group(1) != "mean":
        found.setdefault(m.group(1) or "", None)
  return sorted(found, key=lambda name: name != "")


def task_metrics(events: list[dict]) -> list[str]:
  """The "<task>/<metric>" keys with numbers (harness.tasks.summary, in metrics.jsonl or eval_steps.jsonl),
  sorted; standard errors left out."""
  keys = {k for e in events for k, v in e.items()
          if "/" in k and not k.endswith("_stderr") and isinstance(metrics_lib.number(v), (int, float))}
  return sorted(keys)


def plot_runs(workdirs: list[str]) -> Figure:
  """PANELS, then one panel per task metric ("<task>/<metric>", task_metrics), two per row (each row 3.5
  inches high at 100 dpi: 1000 x 700 pixels for PANELS alone), one line per run in each, in the run's
  colour. The eval panel has one line per run and held-out set (eval_sets: data.eval_corpus and each
  named set of data.eval_corpora, told apart by line style and marker, labelled "RUN: SET" where a run
  has named sets). Raises ConfigError for a run with nothing to plot (no event with any of these keys)."""
  runs = [(_label(w, workdirs), read_metrics(w)) for w in workdirs]
  tasks = task_metrics([e for _, events in runs for e in events])
  sets = eval_sets([e for _, events in runs for e in events])
  for w, (_, events) in zip(workdirs, runs):
    wanted = {key for key, _ in PANELS} | set(tasks) | {_set_key(name) for name in sets}
    if not any(key in e for e in events for key in wanted):
      raise ConfigError(f"{paths.join(w, 'metrics.jsonl')}: nothing to plot (no logged step)")
  panels = list(PANELS) + [(key, key) for key in tasks]
  rows = -(-len(panels) // 2)
  fig = Figure(figsize=(10, 3.5 * rows), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = list(fig.subplots(rows, 2, sharex=True, squeeze=False).flat)  # a lone eval point is placed within the run
  for ax, (key, title) in zip(axes, panels):
    for i, (label, events) in enumerate(runs):
      if key == "eval_bits_per_byte" and any(sets):  # named sets: a line per set
        for j, name in enumerate(sets):
          steps, values = series(events, _set_key(name))
          if steps:
            ax.plot(steps, values, color=f"C{i}", linestyle=_STYLES[j % len(_STYLES)],
                    marker=_MARKERS[j % len(_MARKERS)], label=f"{label}: {name or 'eval_corpus'}")
        continue
      steps, values = series(events, key)
      # Markers: the held-out score and task scores are often a few points (the final eval).
      ax.plot(steps, values, color=f"C{i}", label=label, marker=None if key in _CURVES else "o")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  for ax in axes[len(panels):]:  # an odd number of panels leaves one empty
    ax.remove()
  for ax in fig.axes[-2:]:
    ax.set_xlabel("step")
  fig.axes[0].legend()
  if any(sets):
    fig.axes[1].legend(fontsize="small")
  return fig


_CURVES = ("loss", "learning_rate", "tokens_per_sec")  # logged at every log line: no markers
_SET_KEY = re.compile(r"eval_(?:(\w+)_)?bits_per_byte")
_STYLES, _MARKERS = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v")


def _set_key(name: str) -> str:
  return f"eval_{name}_bits_per_byte" if name else "eval_bits_per_byte"


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
