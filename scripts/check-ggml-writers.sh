#!/usr/bin/env bash
# Interop check of qforge's ggml *writers* against llama.cpp's llama-quantize (not part of CI: it needs a llama.cpp
# build; docs/quantizers.md "Checking against llama-quantize"). Makes a random 8-layer Llama (qforge make-synthetic:
# dim 256, hidden 768, vocab 32000, converted with the Llama 2 tokenizer; 8 layers so that use_more_bits picks
# layers 0, 3, 6, 7), then for each type and each preset writes one file with llama-quantize and one with qforge
# from the same F32 file, and compares them tensor by tensor with `qforge compare` (every tensor decoded to fp32
# by qforge's bit-exact dequantizers; equal values for every element means the same type and the same codes and
# scales, up to encodings of equal values such as a -0 scale):
#   pure types  llama-quantize --pure F32 L.gguf TYPE   vs   qforge quantize --method type --pure --quantize-embeddings
#   presets     llama-quantize F32 L.gguf PRESET         vs   qforge quantize --method preset
#   imatrix-*   llama-quantize --imatrix I F32 L PRESET  vs   qforge quantize --method preset --imatrix I
# (I: qforge imatrix's file for the model; the first two rows use no importance matrix, so llama-quantize runs
# ggml's quantize_row_*_ref there, qforge's targets), and the same on a 4-expert MoE with llama-imatrix's and
# qforge's importance matrices of tinystories-calib.txt (stacked expert entries).
# Usage:
#   scripts/check-ggml-writers.sh [LLAMA_BIN_DIR]   (default ~/.cache/qforge/peer-llama.cpp/src/build/bin)
# Environment: QFORGE (default build/services/qforge), QFORGE_SHARED (default ../shared), KEEP=DIR keeps the
# files there. Prints one line per file and exits 1 if any differs.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-$HOME/.cache/qforge/peer-llama.cpp/src/build/bin}
qforge=${QFORGE:-build/services/qforge}
shared=${QFORGE_SHARED:-../shared}
[ -x "$bin/llama-quantize" ] || { echo "no $bin/llama-quantize" >&2; exit 2; }
[ -x "$qforge" ] || { echo "no $qforge (build services/qforge first)" >&2; exit 2; }
if [ -n "${KEEP:-}" ]; then work=$KEEP; mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
status=0

"$qforge" make-synthetic "$work/synthetic.gguf" --dim 256 --hidden 768 --layers 8 --vocab 32000 >/dev/null || exit 1
"$qforge" convert "$work/synthetic.gguf" "$work/F32.gguf" --tokenizer "$shared/models/llama2-tokenizer/tokenizer.model" \
  >/dev/null || exit 1
src=$work/F32.gguf

printf '%-26s %-10s %s\n' file result "differing tensors (first 3)"
# compare LABEL LLAMA_TYPE QFORGE_ARGS...: one file from each tool, compared decoded.
compare() {
  local label=$1 type=$2
  shift 2
  local ours="$work/$label-qforge.gguf" theirs="$work/$label-llama.gguf"
  local -a llama_flags=()
  [[ $label == pure-* ]] && llama_flags=(--pure)
  [[ $label == imatrix-* ]] && llama_flags=(--imatrix "$imatrix")
  if ! "$bin/llama-quantize" "${llama_flags[@]}" "$src" "$theirs" "$type" >"$work/$label-llama.log" 2>&1; then
    printf '%-26s %-10s %s\n' "$label" REFUSED "llama-quantize: $(grep -m1 -iE 'error|failed|invalid' "$work/$label-llama.log")"
    status=1
    return
  fi
  if ! "$qforge" quantize "$@" "$src" "$ours" >"$work/$label-qforge.log" 2>&1; then
    printf '%-26s %-10s %s\n' "$label" FAILED "qforge: $(tail -1 "$work/$label-qforge.log")"
    status=1
    return
  fi
  local cmp
  if cmp=$("$qforge" compare "$theirs" "$ours" --quiet 2>&1); then
    printf '%-26s %-10s\n' "$label" same
  else
    printf '%-26s %-10s %s\n' "$label" DIFFER "$(echo "$cmp" | grep -E '^DIFFER|^missing' | head -3 | tr '\n' ';')"
    status=1
  fi
  [ -n "${KEEP:-}" ] || rm -f "$ours" "$theirs"
}

# q8_0, q4_0 and q4_k are the writers that existed before (the controls); the rest are new.
for type in Q8_0 Q4_0 Q4_K Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q5_K Q6_K IQ4_NL IQ4_XS; do
  lower=$(echo "$type" | tr 'A-Z' 'a-z')
  compare "pure-$type" "$type" --method "$lower" --pure --quantize-embeddings
done
presets="Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K IQ4_NL IQ4_XS"
for preset in $presets; do
  lower=$(echo "$preset" | tr 'A-Z' 'a-z')
  compare "$preset" "$preset" --method "$lower"
done
# With an importance matrix (qforge's, from random token streams: any values do): every type's weighted fit, and
# the presets' imatrix-dependent choices (Q4_0 / Q5_0 raise the first eighth of ffn_down, IQ4_* stop raising it).
imatrix=$work/imatrix.gguf
"$qforge" imatrix "$src" "$imatrix" --calib-streams 8 --calib-len 64 --calib-seed 5 >/dev/null || exit 1
for preset in $presets; do
  lower=$(echo "$preset" | tr 'A-Z' 'a-z')
  compare "imatrix-$preset" "$preset" --method "$lower" --imatrix "$imatrix"
done
# A Mixture of Experts (4 experts, 2 used per token), where importance matrices stack a layer's experts in one
# entry (blk.N.ffn_*_exps.weight, a row per expert): llama-imatrix's own file on real text, then qforge's of the
# same text, each given to both tools.
"$qforge" make-synthetic "$work/moe.gguf" --dim 256 --hidden 512 --layers 2 --vocab 32000 --experts 4 \
  --experts-used 2 >/dev/null || exit 1
"$qforge" convert "$work/moe.gguf" "$work/moe-F32.gguf" --tokenizer "$shared/models/llama2-tokenizer/tokenizer.model" \
  >/dev/null || exit 1
src=$work/moe-F32.gguf
calib=$shared/data/tinystories-calib.txt
"$bin/llama-imatrix" -m "$src" -f "$calib" -o "$work/moe-llama-imatrix.gguf" -c 128 --chunks 8 \
  >"$work/moe-llama-imatrix.log" 2>&1 || { echo "llama-imatrix failed on the MoE" >&2; exit 1; }
"$qforge" imatrix "$src" "$work/moe-qforge-imatrix.gguf" --calib-text "$calib" --window 128 --chunks 8 >/dev/null ||
  exit 1
for who in llama qforge; do
  imatrix=$work/moe-$who-imatrix.gguf
  for preset in Q4_K_M Q4_0 IQ4_XS; do
    lower=$(echo "$preset" | tr 'A-Z' 'a-z')
    compare "imatrix-moe-$who-$preset" "$preset" --method "$lower" --imatrix "$imatrix"
  done
done
exit $status
