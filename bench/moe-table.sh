#!/usr/bin/env bash
# The trained MoE quantized every way qforge can, judged on real text: for each configuration the expert and
# whole-model bits/parameter, perplexity, KL against the bf16 source and top-1 agreement on the first WINDOWS x 256
# tokens of tinystories-eval.txt; calibration (methods that need it) on tinystories-calib.txt only. Non-expert
# matrices (attention, routers) are q8_0 where the experts get a ternary method, embeddings and classifier f32.
# Then the speed of the fused qmoe matmul against q4_k's integer kernels: `qforge bench` on the two files that
# differ only in their experts (q4_k experts, qmoe experts), alternated 3 times, medians.
#   bench/moe-table.sh [--model DIR] [--windows 64] [--threads 2] [--work DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$here/models/qforge-tinystories-moe windows=64 threads=2 work=$(mktemp -d)
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --windows) windows=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "usage: $0 [--model DIR] [--windows 64] [--threads 2] [--work DIR]" >&2; exit 2 ;;
  esac
done
qforge=$here/build/services/qforge
shared=$here/../shared/data
experts='blk.*.ffn_*.*.weight'
calib=(--calib-text "$shared/tinystories-calib.txt")

# name | quantize arguments | output extension
configs=(
  "q8_0|--method q8_0 --pure|gguf"
  "q4_k|--method q4_k|gguf"
  "q4_k experts|--method q8_0 --pure --layers $experts=q4_k|gguf"
  "ternary (TQ2_0)|--method q8_0 --pure --layers $experts=ternary ${calib[*]}|gguf"
  "qmoe|--method q8_0 --pure --layers $experts=qmoe ${calib[*]}|safetensors"
  "bitnet (TQ2_0)|--method q8_0 --pure --layers $experts=bitnet|gguf"
  "billm|--method q8_0 --pure --layers $experts=billm ${calib[*]}|safetensors"
)

params=$("$qforge" inspect "$model" | grep -o '[0-9]* parameters' | head -1 | awk '{print $1}')
eval_args=(--text "$shared/tinystories-eval.txt" --window 256 --chunks "$windows" --streams 0 --threads "$threads")
fp=$("$qforge" eval "$model" "${eval_args[@]}" | grep -o 'perplexity [0-9.]*' | awk '{print $2}')

echo "| config | expert bits/param | model bits/param | perplexity | KL mean (nats) | top-1 |"
echo "|---|---:|---:|---:|---:|---:|"
echo "| bf16 source (f32 at run time) | 16 | 16 | $fp | 0 | 100% |"
for c in "${configs[@]}"; do
  IFS='|' read -r name args ext <<<"$c"
  dir=$work/$(echo "$name" | tr -c 'a-z0-9_\n' '_')
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # args is a word list
  report=$("$qforge" quantize $args --threads "$threads" "$model" "$dir/model.$ext")
  # Expert tensors' bytes over their weights, from the per-tensor lines (bytes is the 7th column).
  expert_bpw=$(echo "$report" | awk '$1 ~ /^blk\.[0-9]+\.ffn_(gate|up|down)\.[0-9]+\.weight$/ {
      split($2, s, "x"); n += s[1] * s[2]; b += $7 } END { printf "%.3f", 8 * b / n }')
  bytes=$(echo "$report" | awk '/^model bytes/ {print $5}')
  model_bpw=$(awk -v b="$bytes" -v p="$params" 'BEGIN { printf "%.3f", 8 * b / p }')
  out=$("$qforge" eval "$dir/model.$ext" --base "$model" "${eval_args[@]}")
  ppl=$(echo "$out" | grep -o 'model [0-9.]*' | head -1 | awk '{print $2}')
  kl=$(echo "$out" | grep -o 'mean [0-9.]*' | head -1 | awk '{print $2}')
  top1=$(echo "$out" | grep -o 'agreement [0-9.]*%' | head -1 | awk '{print $2}')
  echo "| $name | $expert_bpw | $model_bpw | $ppl | $kl | $top1 |"
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
rate() { grep -E "\| +$1 +\|" | awk -F'|' '{print $(NF-1)}' | awk '{print $1}'; }
q4k=$work/q4_k_experts/model.gguf qm=$work/qmoe/model.safetensors
echo
echo "| experts | threads | test | tokens/s | qmoe / q4_k |"
echo "|---|---:|---|---:|---:|"
for t in 1 2; do
  for test in pp128 tg64; do
    a=() b=()
    for _ in 1 2 3; do
      a+=("$("$qforge" bench "$q4k" --threads $t -p 128 -n 64 -r 1 | rate "$test")")
      b+=("$("$qforge" bench "$qm" --threads $t -p 128 -n 64 -r 1 | rate "$test")")
    done
    ma=$(printf '%s\n' "${a[@]}" | median) mb=$(printf '%s\n' "${b[@]}" | median)
    echo "| q4_k | $t | $test | $ma | |"
    echo "| qmoe | $t | $test | $mb | $(awk -v a="$ma" -v b="$mb" 'BEGIN { printf "%.2f", b / a }') |"
  done
done
