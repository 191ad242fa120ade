#!/usr/bin/env bash
# Quantize time against llama-quantize on the same f32 GGUF, same type and threads: the two tools alternate
# `--rounds` times per type (each writes a fresh file: no old file to replace), medians of the wall times, and
# `qforge compare` checks that the two outputs are the same bytes tensor by tensor.
#   LLAMA_BIN=DIR bench/quantize-vs-llama.sh MODEL.gguf [--types q8_0,q4_k] [--threads 2] [--rounds 5] [--work DIR]
# LLAMA_BIN: the bin directory ../shared/tools/peer-llama-cpp.sh prints.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: LLAMA_BIN=DIR $0 MODEL.gguf [--types q8_0,q4_k] [--threads 2] [--rounds 5] [--work DIR]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
model=$1; shift
types=q8_0,q4_k threads=2 rounds=5 work=$(mktemp -d)
while [ $# -gt 0 ]; do
  case "$1" in
    --types) types=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
[ -n "${LLAMA_BIN:-}" ] && [ -x "$LLAMA_BIN/llama-quantize" ] || { echo "LLAMA_BIN has no llama-quantize" >&2; exit 2; }
[ -f "$model" ] || { echo "no model file $model" >&2; exit 2; }
mkdir -p "$work"
qforge=$here/build/services/qforge
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
seconds() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>"$work/stderr" || { echo "failed: $* ($(tail -1 "$work/stderr"))" >&2; return 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}

echo "| type | threads | qforge s | llama-quantize s | qforge / llama-quantize | bytes |"
echo "|---|---:|---:|---:|---:|---|"
for type in ${types//,/ }; do
  upper=$(echo "$type" | tr a-z A-Z)
  a=() b=()
  for _ in $(seq "$rounds"); do
    rm -f "$work/qf.gguf" "$work/lc.gguf"
    a+=("$(seconds "$qforge" quantize --method "$type" --pure --quantize-embeddings --threads "$threads" "$model" "$work/qf.gguf")")
    b+=("$(seconds "$LLAMA_BIN/llama-quantize" --pure "$model" "$work/lc.gguf" "$upper" "$threads")")
  done
  same=$("$qforge" compare "$work/qf.gguf" "$work/lc.gguf" | tail -1 | grep -q ' 0 differ, 0 missing' && echo same || echo DIFFER)
  ma=$(printf '%s\n' "${a[@]}" | median) mb=$(printf '%s\n' "${b[@]}" | median)
  echo "| $type | $threads | $ma (${a[*]}) | $mb (${b[*]}) | $(awk -v a="$ma" -v b="$mb" 'BEGIN { printf "%.2f", a / b }') | $same |"
done
