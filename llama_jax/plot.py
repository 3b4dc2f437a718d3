"""Training curves of one or more runs from WORKDIR/metrics.jsonl, as one PNG.

  python -m llama_jax.plot runs/tiny [runs/other ...] --output run.png

Four panels against step: train loss (the mean over each log interval), held-out bits per
byte, learning rate and tokens/s; each run is one line in every panel, in the same colour,
named by its workdir in the legend.
"""

import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llama_jax import metrics as metrics_lib
from llama_jax.errors import ConfigError

# (metrics.jsonl key, panel title): train events carry the first, third and fourth
# (trainer.py), eval events the second (evaluate.as_eval_metrics).
PANELS = (("loss", "train loss"), ("eval_bits_per_byte", "eval bits/byte"),
          ("learning_rate", "learning rate"), ("tokens_per_sec", "tokens/s"))


def read_metrics(workdir: str) -> list[dict]:
  """The events of WORKDIR/metrics.jsonl, in the order they were written."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir}: no metrics.jsonl (not a training workdir, or no step logged yet)")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps its last value.
  Non-finite values, written as "inf", "-inf" or "nan" (metrics.dumps), come back as floats; the
  panels leave them out (matplotlib draws no point there)."""
  by_step = {e["step"]: metrics_lib.number(e[key]) for e in events if key in e}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_runs(workdirs: list[str]) -> Figure:
  """A 2 x 2 figure (1000 x 700 pixels at its 100 dpi) of PANELS, one line per run in each."""
  runs = [(_label(w, workdirs), read_metrics(w)) for w in workdirs]
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
  name = lambda w: os.path.basename(os.path.normpath(w))
  return name(workdir) if [name(w) for w in workdirs].count(name(workdir)) == 1 else os.path.normpath(workdir)


def main():
  """The command line (absl flags and the error path of llama_jax.entry); workdirs are positional."""
  from absl import flags

  from llama_jax import entry

  output = flags.DEFINE_string("output", None, "The PNG to write.")
  flags.mark_flags_as_required(["output"])

  def run(workdirs):
    if not workdirs:
      raise ConfigError("give at least one WORKDIR: python -m llama_jax.plot WORKDIR [WORKDIR ...] --output FILE")
    plot_runs(workdirs).savefig(output.value)
    print(f"wrote {output.value}")

  entry.main(lambda argv: entry.run(lambda: run(argv[1:])))


if __name__ == "__main__":
  main()
