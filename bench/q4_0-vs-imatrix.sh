#!/usr/bin/env bash
# qforge's calibrated Q4_0 against llama.cpp's imatrix Q4_0, both judged by llama.cpp: the model converted to
# an f32 GGUF; llama-imatrix on the calibration text; llama-quantize --pure Q4_0 with and without that imatrix
# (token embeddings kept f32, as qforge keeps them); qforge's q4_0 and gptq_q4_0 (calibrated on the same text)
# with the rows llama.cpp cannot write as Q4_0 (not a multiple of 32) in f16, as llama-quantize writes them; then
# llama-perplexity --kl-divergence of every file against the f32 one on the evaluation text.
#   LLAMA_BIN=DIR bench/q4_0-vs-imatrix.sh [--model FILE] [--ctx 256] [--chunks 64] [--work DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$here/../shared/models/stories260K/stories260K.bin ctx=256 chunks=64 work=$(mktemp -d)
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;;
    --chunks) chunks=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "usage: LLAMA_BIN=DIR $0 [--model FILE] [--ctx 256] [--chunks 64] [--work DIR]" >&2; exit 2 ;;
  esac
done
bin=${LLAMA_BIN:-}
for tool in llama-quantize llama-imatrix llama-perplexity; do
  [ -x "$bin/$tool" ] || { echo "LLAMA_BIN has no $tool (../shared/tools/peer-llama-cpp.sh builds it)" >&2; exit 2; }
done
mkdir -p "$work"
qforge=$here/build/services/qforge
calib=$here/../shared/data/tinystories-calib.txt eval_text=$here/../shared/data/tinystories-eval.txt
run() { "$@" >"$work/log" 2>&1 || { echo "failed: $* ($(tail -3 "$work/log"))" >&2; exit 1; }; }

run "$qforge" convert "$model" "$work/F32.gguf" --type f32
run "$bin/llama-imatrix" -m "$work/F32.gguf" -f "$calib" -o "$work/imatrix.gguf" -c 128 --chunks 200
run "$bin/llama-quantize" --pure --token-embedding-type f32 "$work/F32.gguf" "$work/lc-q4_0.gguf" Q4_0
run "$bin/llama-quantize" --imatrix "$work/imatrix.gguf" --pure --token-embedding-type f32 "$work/F32.gguf" \
  "$work/lc-imatrix-q4_0.gguf" Q4_0
narrow='blk.*.ffn_down.weight=f16'  # the 172-wide rows of stories260K; harmless where rows are wider
run "$qforge" quantize --method q4_0 --pure --layers "$narrow" "$work/F32.gguf" "$work/qf-q4_0.gguf"
run "$qforge" quantize --method gptq_q4_0 --layers "$narrow" --calib-text "$calib" "$work/F32.gguf" \
  "$work/qf-gptq_q4_0.gguf"
run "$bin/llama-perplexity" -m "$work/F32.gguf" -f "$eval_text" -c "$ctx" --chunks "$chunks" \
  --kl-divergence-base "$work/base.kld"

echo "| file | bytes | llama-perplexity mean KL | PPL |"
echo "|---|---:|---:|---:|"
for f in lc-q4_0 lc-imatrix-q4_0 qf-q4_0 qf-gptq_q4_0; do
  run "$bin/llama-perplexity" -m "$work/$f.gguf" -f "$eval_text" -c "$ctx" --chunks "$chunks" \
    --kl-divergence-base "$work/base.kld" --kl-divergence
  kl=$(grep -E 'Mean +KLD' "$work/log" | awk '{print $3}')
  ppl=$(grep -E '^Mean PPL\(Q\) +:' "$work/log" | awk '{print $4}')
  echo "| $f | $(stat -c %s "$work/$f.gguf") | $kl | $ppl |"
done
