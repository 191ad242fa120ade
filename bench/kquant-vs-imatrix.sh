#!/usr/bin/env bash
# qforge's GPTQ K-quants against llama.cpp's imatrix K-quants, both judged by llama.cpp: the model converted to an
# f32 GGUF; llama-imatrix on the calibration text (with the output tensor); for each type or preset, llama-quantize
# (--pure for a bare type) with and without that imatrix, and qforge's plain and --method gptq --ggml-type file
# (calibrated on the same text); then
# llama-perplexity --kl-divergence of every file against the f32 one on the evaluation text. The output tensor is
# quantized in every file; token embeddings (a lookup, which neither calibration sees) are f16 in every file.
#   LLAMA_BIN=DIR bench/kquant-vs-imatrix.sh [--model DIR|FILE] [--types "q4_k q3_k q2_k q4_k_m"] [--ctx 256]
#                                            [--chunks 64] [--work DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$here/models/qforge-tinystories-dense types="q4_k q3_k q2_k q4_k_m" ctx=256 chunks=64 work=$(mktemp -d)
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;;
    --chunks) chunks=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "usage: LLAMA_BIN=DIR $0 [--model M] [--types \"q4_k q3_k q2_k\"] [--ctx 256] [--chunks 64] [--work DIR]" >&2
       exit 2 ;;
  esac
done
bin=${LLAMA_BIN:-}
for tool in llama-quantize llama-imatrix llama-perplexity; do
  [ -x "$bin/$tool" ] || { echo "LLAMA_BIN has no $tool (../shared/tools/peer-llama-cpp.sh builds it)" >&2; exit 2; }
done
mkdir -p "$work"
qforge=$here/build/services/qforge
calib=$here/../shared/data/tinystories-calib.txt eval_text=$here/../shared/data/tinystories-eval.txt
embd="--quantize-embeddings --layers token_embd.weight=f16"
run() { "$@" >"$work/log" 2>&1 || { echo "failed: $* ($(tail -3 "$work/log"))" >&2; exit 1; }; }

[ -f "$work/F32.gguf" ] || run "$qforge" convert "$model" "$work/F32.gguf" --type f32
[ -f "$work/imatrix.gguf" ] || run "$bin/llama-imatrix" -m "$work/F32.gguf" -f "$calib" -o "$work/imatrix.gguf" \
  -c 128 --chunks 200 --process-output
[ -f "$work/base.kld" ] || run "$bin/llama-perplexity" -m "$work/F32.gguf" -f "$eval_text" -c "$ctx" \
  --chunks "$chunks" --kl-divergence-base "$work/base.kld"

echo "| type | file | bytes | llama-perplexity mean KL | PPL |"
echo "|---|---|---:|---:|---:|"
for t in $types; do
  T=$(echo "$t" | tr a-z A-Z)
  # A preset (q4_k_m ...) picks each tensor's type, in both programs; a bare type is written --pure.
  case "$t" in *_k_[sml]) pure= ;; *) pure=--pure ;; esac
  [ -f "$work/lc-$t.gguf" ] || run "$bin/llama-quantize" $pure --token-embedding-type f16 "$work/F32.gguf" \
    "$work/lc-$t.gguf" "$T"
  [ -f "$work/lc-imatrix-$t.gguf" ] || run "$bin/llama-quantize" --imatrix "$work/imatrix.gguf" $pure \
    --token-embedding-type f16 "$work/F32.gguf" "$work/lc-imatrix-$t.gguf" "$T"
  [ -f "$work/qf-$t.gguf" ] || run "$qforge" quantize --method "$t" $pure $embd "$work/F32.gguf" "$work/qf-$t.gguf"
  [ -f "$work/qf-gptq_$t.gguf" ] || run "$qforge" quantize --method gptq --ggml-type "$t" $pure $embd \
    --calib-text "$calib" "$work/F32.gguf" "$work/qf-gptq_$t.gguf"
  for f in lc-$t lc-imatrix-$t qf-$t qf-gptq_$t; do
    run "$bin/llama-perplexity" -m "$work/$f.gguf" -f "$eval_text" -c "$ctx" --chunks "$chunks" \
      --kl-divergence-base "$work/base.kld" --kl-divergence
    kl=$(grep -E 'Mean +KLD' "$work/log" | awk '{print $3}')
    ppl=$(grep -E '^Mean PPL\(Q\) +:' "$work/log" | awk '{print $4}')
    echo "| $t | $f | $(stat -c %s "$work/$f.gguf") | $kl | $ppl |"
  done
done
