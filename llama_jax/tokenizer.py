"""Tokenizers behind one interface: encode, decode, bos/eos/pad ids, vocab size.

`SentencePieceTokenizer` loads any sentencepiece `.model` (the Llama-1/2 tokenizer, or one
trained here); `TiktokenTokenizer` loads Llama 3's tiktoken ranks file. `load_tokenizer`
picks the class from the file's contents. `train_sentencepiece` trains a BPE model with byte
fallback on a corpus:

  python -m llama_jax.tokenizer train --input shakespeare:train --vocab_size 512 --output tok.model

`--input` is a corpus spec (see corpus.py); a shuffled sample of up to `--sample_bytes` of it is used.

Tokenizer files are read and written through llama_jax.paths, so each may be local or on object
storage (`gs://bucket/tok.model`): a file is read whole into memory (sentencepiece takes the bytes of
its model, tiktoken the ranks), and a trained model is written in one piece.

What decode(encode(text)) gives back, for any valid Unicode `text` (encode raises ConfigError
on a lone surrogate, which no UTF-8 text holds):
  - a model trained here, and Llama-2's (identity normalisation, byte fallback):
    text.replace("\u2581", " "), since sentencepiece writes a space as U+2581 "▁" and turns
    every ▁ back into a space. A sentencepiece model with another normaliser (nmt_nfkc, say)
    also gives back what it normalises, changed.
  - Llama-3's tiktoken ranks (byte-level BPE): text itself.
"""

import base64
import concurrent.futures
import io
import os
import re

import sentencepiece as spm

from llama_jax import paths
from llama_jax.errors import ConfigError


def _check_unicode(text: str):
  """Raises ConfigError on text that is not valid Unicode (sentencepiece cannot take it, tiktoken
  would encode U+FFFD in its place)."""
  if not text.isascii():
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ConfigError(f"text to encode is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} "
                        f"at character {e.start}") from None


class SentencePieceTokenizer:
  """A sentencepiece model: Llama-1/2's `tokenizer.model`, or one trained by this module."""

  def __init__(self, path: str):
    if not paths.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = path
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=paths.read_bytes(path))
    except RuntimeError:  # sentencepiece's words for bytes it cannot parse name its own source line
      raise RuntimeError(f"could not parse a sentencepiece ModelProto from {path}") from None

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """Padding id; falls back to eos where the model defines none (Llama-2 has none)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.eos_id

  @property
  def special_tokens(self) -> dict[str, int]:
    """The control and unknown pieces by text ({"<unk>": 0, "<s>": 1, "</s>": 2} for Llama 2): the ids
    transformers' tokenizer of this file marks special and drops when decoding with skip_special_tokens."""
    return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i)}

  @property
  def byte_pieces(self) -> dict[int, int]:
    """The byte-fallback pieces <0x00> .. <0xFF>: {id: byte value} (empty without byte fallback)."""
    return {i: int(self._sp.id_to_piece(i)[3:5], 16) for i in range(self.vocab_size) if self._sp.is_byte(i)}

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """The ids of `text` (valid Unicode, else ConfigError), with BOS / EOS if asked."""
    _check_unicode(text)
    ids = self._sp.encode(text)
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    for text in texts:
      _check_unicode(text)
    return self._sp.encode(texts, num_threads=os.cpu_count())

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str):
  """Loads the tokenizer file at `path` (local or `gs://`): a sentencepiece model or a tiktoken ranks file."""
  if not paths.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  if is_tiktoken_file(path):
    return TiktokenTokenizer(path)
  return SentencePieceTokenizer(path)


MAX_SENTENCE_BYTES = 1 << 16  # sentencepiece's max_sentence_length: it skips longer sentences
INPUT_SENTENCE_SIZE = 10_000_000  # sentences sentencepiece keeps (a uniform sample) when given more


class _Sentences:
  """The training sentences, each over MAX_SENTENCE_BYTES of UTF-8 cut (at character boundaries)
  into pieces that are not, so that sentencepiece skips none; counts what it sees and cuts.

  An exception from `texts` (a DataError, a StopRun from a signal, KeyboardInterrupt...) is kept
  in `error`: sentencepiece turns it into a RuntimeError holding only its text and stack."""

  def __init__(self, texts):
    self._texts = texts
    self.count = self.cut = 0
    self.error = None

  def __iter__(self):
    try:
      yield from self._sentences()
    except GeneratorExit:
      raise
    except BaseException as e:
      self.error = e
      raise

  def _sentences(self):
    for text in self._texts:
      self.count += 1
      if len(text) * 4 <= MAX_SENTENCE_BYTES or len(text.encode("utf-8")) <= MAX_SENTENCE_BYTES:
        yield text
        continue
      self.cut += 1
      raw, start = text.encode("utf-8"), 0
      while start < len(raw):
        end = min(start + MAX_SENTENCE_BYTES, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # not inside a character
          end -= 1
        yield raw[start:end].decode("utf-8")
        start = end


def train_sentencepiece(texts, vocab_size: int, output: str) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model with byte fallback on `texts` (an iterable of str), and writes it
  to `output` (local or `gs://`) with paths.write_atomic: a reader sees no file or the whole model.

  Identity normalisation and kept whitespace make decode(encode(text)) == text for every valid
  Unicode text without U+2581 "▁" (that comes back as a space), so bits per byte are measured
  against the raw UTF-8 bytes.

  A text over MAX_SENTENCE_BYTES of UTF-8 (which sentencepiece would skip) is cut into pieces
  that are not; over INPUT_SENTENCE_SIZE texts, sentencepiece trains on a uniform sample of
  that many. Either is logged with its count.

  Raises:
    ConfigError: sentencepiece cannot train on them (a vocabulary too large for the text, say).
    Whatever reading `texts` raised (a DataError naming file:line, a StopRun, KeyboardInterrupt),
    as itself.
  """
  from llama_jax import metrics as metrics_lib

  model = io.BytesIO()
  sentences = _Sentences(texts)
  try:
    _train(sentences, vocab_size, model)
  except BaseException as e:
    if sentences.error is not None and sentences.error is not e:  # sentencepiece wrapped it
      raise sentences.error.with_traceback(sentences.error.__traceback__) from None
    if not isinstance(e, RuntimeError):
      raise
    # sentencepiece's own words, e.g. a vocabulary too small for the corpus
    raise ConfigError(f"training a {vocab_size}-piece tokenizer failed: {str(e).splitlines()[-1]}") from None
  if sentences.cut:
    metrics_lib.log(f"tokenizer training: cut {sentences.cut:,} of {sentences.count:,} lines longer than "
                    f"{MAX_SENTENCE_BYTES:,} bytes into pieces (sentencepiece skips longer ones)")
  if sentences.count > INPUT_SENTENCE_SIZE:
    metrics_lib.log(f"tokenizer training: sentencepiece kept a uniform sample of {INPUT_SENTENCE_SIZE:,} "
                    f"of {sentences.count:,} lines")
  paths.makedirs(paths.parent(output))
  paths.write_atomic(output, model.getvalue())  # sentencepiece wrote the model into memory
  return SentencePieceTokenizer(output)


def _train(texts, vocab_size, model_writer):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model_writer,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      max_sentence_length=MAX_SENTENCE_BYTES,
      input_sentence_size=INPUT_SENTENCE_SIZE,
      shuffle_input_sentence=True,
      character_coverage=0.9995,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      num_threads=os.cpu_count(),
      minloglevel=2,
  )


def training_lines(texts):
  """Splits documents into lines (sentencepiece trains on sentences), keeping the newlines."""
  for text in texts:
    yield from text.splitlines(keepends=True)


def main():
  """`train`, then flags (absl; the error path of llama_jax.entry)."""
  from absl import flags

  from llama_jax import corpus, entry

  source = flags.DEFINE_string("input", None, "Corpus spec (e.g. shakespeare:train, jsonl:web/*.jsonl).")
  sample_bytes = flags.DEFINE_integer("sample_bytes", 100_000_000, "Train on a shuffled sample this large.")
  vocab_size = flags.DEFINE_integer("vocab_size", None, "Pieces in the vocabulary.")
  output = flags.DEFINE_string("output", None, "Path of the .model file to write (local or gs://).")
  flags.mark_flags_as_required(["input", "vocab_size", "output"])

  def run(argv):
    if argv[1:] != ["train"]:
      raise ConfigError("usage: python -m llama_jax.tokenizer train --input=SPEC --vocab_size=N --output=FILE")
    texts = corpus.open_corpus(source.value, name="--input").sample(sample_bytes.value)
    tok = train_sentencepiece(training_lines(texts), vocab_size.value, output.value)
    print(f"wrote {output.value} (vocab {tok.vocab_size})")

  entry.main(lambda argv: entry.run(lambda: run(argv)))


# ---------------------------------------------------------------------------- Llama 3


# Llama-3's pre-tokenizer: contractions, words with one leading non-letter, 1-3 digit groups,
# punctuation runs, newlines, other whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
# Named special tokens from id 128000 on (Llama 3.1 onward; 3.0 called the same ids
# reserved, except bos/eos, the header ids and eot). The other ids are reserved tokens.
LLAMA3_NAMED_SPECIAL = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
    10: "<|python_tag|>",
}
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


def llama3_special_tokens(first_id: int) -> dict[str, int]:
  """Llama 3's 256 special tokens: the named ones, and <|reserved_special_token_N|> in between."""
  tokens, n_reserved = {}, 0
  for i in range(LLAMA3_NUM_SPECIAL):
    name = LLAMA3_NAMED_SPECIAL.get(i)
    if name is None:
      name = f"<|reserved_special_token_{n_reserved}|>"
      n_reserved += 1
    tokens[name] = first_id + i
  return tokens


def is_tiktoken_file(path: str) -> bool:
  """A tiktoken ranks file is text lines `<base64 token> <rank>`; a sentencepiece one is protobuf."""
  with paths.open(path, "rb") as f:
    head = f.read(1024)
  return _TIKTOKEN_LINE.match(head) is not None


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
  ranks = {}
  with io.BytesIO(paths.read_bytes(path)) as f:  # one read (a few MB), then lines as a local file gives them
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}:{n} is not a '<base64 token> <rank>' line: {line[:80]!r}") from e
  return ranks


class TiktokenTokenizer:
  """Llama 3's tokenizer: byte-level BPE over a tiktoken ranks file, plus 256 special tokens.

  encode() treats special-token text in its input ("<|eot_id|>") as ordinary text, as Meta's
  tokenizer does by default, so documents cannot inject control tokens.
  """

  # tiktoken slows down (quadratically) on very long pre-tokens and very long inputs; Meta's
  # reference cuts inputs at these sizes, so do we.
  max_chars = 400_000
  max_run = 25_000

  def __init__(self, path: str):
    import tiktoken

    if not paths.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = path
    ranks = load_tiktoken_ranks(path)
    self.special_tokens = llama3_special_tokens(len(ranks))
    self._enc = tiktoken.Encoding(
        name=paths.name(path), pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
        special_tokens=self.special_tokens)

  @property
  def vocab_size(self) -> int:
    return self._enc.n_vocab

  @property
  def bos_id(self) -> int:
    return self.special_tokens["<|begin_of_text|>"]

  @property
  def eos_id(self) -> int:
    return self.special_tokens["<|end_of_text|>"]

  @property
  def eot_id(self) -> int:
    """End of a chat turn (Llama-3 instruct models stop on it)."""
    return self.special_tokens["<|eot_id|>"]

  @property
  def pad_id(self) -> int:
    """<|finetune_right_pad_id|>: Llama 3 reserves an id for padding, distinct from eos."""
    return self.special_tokens["<|finetune_right_pad_id|>"]

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """The ids of `text` (valid Unicode, else ConfigError), with BOS / EOS if asked."""
    _check_unicode(text)
    ids = []
    for piece in self._pieces(text):
      ids.extend(self._enc.encode_ordinary(piece))
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    # tiktoken releases the GIL while encoding, so threads run in parallel.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      return list(pool.map(self.encode, texts))

  def decode(self, ids) -> str:
    return self._enc.decode([int(i) for i in ids])

  def _pieces(self, text: str):
    """Cuts text so no piece is over max_chars long or has a same-class run over max_run.

    Long inputs are cut where a space follows a non-space: no pre-token spans such a point,
    so the tokens are those of the uncut text. Over-long runs (a 25k-character "word") are
    cut anywhere, as in Meta's reference.
    """
    if len(text) <= self.max_run:
      yield text
      return
    start = 0
    for run in self._long_runs(text):
      yield from self._cut_long(text[start:run.start()])
      for i in range(run.start(), run.end(), self.max_run):
        yield text[i:min(i + self.max_run, run.end())]
      start = run.end()
    yield from self._cut_long(text[start:])

  def _long_runs(self, text: str):
    # The lookbehinds make each match start at the beginning of a run: one linear scan.
    n = self.max_run + 1
    return re.finditer(rf"(?<!\S)\S{{{n},}}|(?<!\s)\s{{{n},}}", text)

  def _cut_long(self, text: str):
    while len(text) > self.max_chars:
      cut = _last_word_start(text, self.max_chars)
      yield text[:cut]
      text = text[cut:]
    if text:
      yield text


def _last_word_start(text: str, limit: int) -> int:
  """The last i <= limit where text[i] is a space after a non-space, else limit."""
  i = text.rfind(" ", 1, limit + 1)
  while i > 0:
    if not text[i - 1].isspace():
      return i
    i = text.rfind(" ", 1, i)
  return limit


if __name__ == "__main__":
  main()
