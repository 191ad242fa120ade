#!/usr/bin/env bash
# Cross-checks GGUF files qforge writes with an independent reader: Hugging Face's @huggingface/gguf
# (npm), which parses the header, metadata and tensor infos the way llama.cpp's loader expects them.
# Usage: scripts/check-gguf-interop.sh FILE.gguf...   (needs node + npm; installs into a temp dir)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { echo "usage: $0 FILE.gguf..." >&2; exit 2; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$here/interop/gguf-check.mjs" "$dir/"
(cd "$dir" && npm install --silent --no-audit --no-fund @huggingface/gguf@0.4.6 >/dev/null 2>&1)
for f in "$@"; do
  echo "== $f"
  node "$dir/gguf-check.mjs" "$(realpath "$f")"
done
