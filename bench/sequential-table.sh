#!/usr/bin/env bash
# Sequential against one-pass calibration on the trained models, real text (docs/calibrated.md): each recipe is
# quantized twice by `qforge quantize`, calibrated on the first --calib-kib KiB of tinystories-calib.txt (64 KiB:
# about 64 windows of 256 tokens, as the method table calibrates) — one-pass (every block from the
# full-precision model's hidden states) and --calib-sequential (block i from the quantized blocks < i) — and
# judged with `qforge eval` on the first WINDOWS x 256 tokens of tinystories-eval.txt against the bf16 source.
#   bench/sequential-table.sh [--windows 64] [--calib-kib 64] [--threads 2] [--work DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
windows=64 calib_kib=64 threads=2 work=$(mktemp -d)
while [ $# -gt 0 ]; do
  case "$1" in
    --windows) windows=$2; shift 2 ;;
    --calib-kib) calib_kib=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "usage: $0 [--windows 64] [--calib-kib 64] [--threads 2] [--work DIR]" >&2; exit 2 ;;
  esac
done
qforge=$here/build/services/qforge
shared=$here/../shared/data
[ -d "$shared" ] || shared=/work/shared/data
experts='blk.*.ffn_*.*.weight'
mkdir -p "$work"
head -c $((calib_kib * 1024)) "$shared/tinystories-calib.txt" >"$work/calib.txt"
eval_args=(--text "$shared/tinystories-eval.txt" --window 256 --chunks "$windows" --streams 0 --threads "$threads")

# model dir | name | quantize arguments
configs=(
  "qforge-tinystories-dense|gptq 3-bit g32|--method gptq --bits 3 --group 32"
  "qforge-tinystories-dense|gptq 4-bit g32|--method gptq --bits 4 --group 32"
  "qforge-tinystories-dense|awq 3-bit g32|--method awq --bits 3 --group 32"
  "qforge-tinystories-moe|gptq 3-bit g32|--method gptq --bits 3 --group 32"
  "qforge-tinystories-moe|ternary experts, q8_0 elsewhere|--method q8_0 --pure --layers $experts=ternary"
)

echo "| model | recipe | calibration | perplexity | KL mean (nats) | top-1 | quantize s |"
echo "|---|---|---|---:|---:|---:|---:|"
for c in "${configs[@]}"; do
  IFS='|' read -r dir name args <<<"$c"
  model=$here/models/$dir
  for mode in one-pass sequential; do
    extra=()
    [ "$mode" = sequential ] && extra=(--calib-sequential)
    out_file=$work/$(echo "$dir $name $mode" | tr -c 'a-z0-9_\n' '_').safetensors
    start=$(date +%s.%N)
    # shellcheck disable=SC2086  # args is a word list
    "$qforge" quantize $args --calib-text "$work/calib.txt" "${extra[@]}" --threads "$threads" \
      "$model" "$out_file" >/dev/null
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    out=$("$qforge" eval "$out_file" --base "$model" "${eval_args[@]}")
    ppl=$(echo "$out" | grep -o 'model [0-9.]*' | head -1 | awk '{print $2}')
    kl=$(echo "$out" | grep -o 'mean [0-9.]*' | head -1 | awk '{print $2}')
    top1=$(echo "$out" | grep -o 'agreement [0-9.]*%' | head -1 | awk '{print $2}')
    echo "| $dir | $name | $mode | $ppl | $kl | $top1 | $secs |"
    rm -f "$out_file"
  done
done
for dir in qforge-tinystories-dense qforge-tinystories-moe; do
  fp=$("$qforge" eval "$here/models/$dir" "${eval_args[@]}" | grep -o 'perplexity [0-9.]*' | awk '{print $2}')
  echo "| $dir | bf16 source (f32 at run time) | - | $fp | 0 | 100% | - |"
done
