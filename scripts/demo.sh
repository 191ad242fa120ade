#!/usr/bin/env bash
# The main job (embedded default, for now in one process per step): quantize stories260K from ../shared/models with
# several methods, and print for each a greedy generation and the quality before and after quantization:
# perplexity of token streams sampled from the fp32 model, KL-divergence and top-1 agreement against fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
qforge=build/services/qforge
shared=${QFORGE_SHARED:-../shared}
model=$shared/models/stories260K/stories260K.bin
tokenizer=$shared/models/stories260K/candidate-tok512/tok512.model
work=${TMPDIR:-/tmp}/qforge-demo
mkdir -p "$work"

[ -f "$model" ] || { echo "qforge demo: $model not found (shared/ must sit beside the checkout)" >&2; exit 1; }

echo "== the source model"
$qforge inspect "$model"

tok_args=()
[ -f "$tokenizer" ] && tok_args=(--tokenizer "$tokenizer")

echo
echo "== fp32: greedy generation from BOS"
$qforge generate "$model" "${tok_args[@]}" --max-tokens 48 --temperature 0

for spec in "q8_0" "q4_k" "q4_0" "nf4" "rtn --bits 4 --group 32" "rtn --bits 3 --group 32 --asym"; do
  name=$(echo "$spec" | tr -d '-' | tr ' ' '_')
  out="$work/stories260K-$name.gguf"
  case "$spec" in rtn*|nf4*) out="$work/stories260K-$name.safetensors" ;; esac
  echo
  echo "== $spec"
  # shellcheck disable=SC2086
  $qforge quantize --method $spec "$model" "$out"
  $qforge generate "$out" "${tok_args[@]}" --max-tokens 48 --temperature 0
  $qforge eval "$out" --base "$model" --streams 8 --stream-len 128 --seed 1
done
