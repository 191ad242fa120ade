#!/usr/bin/env bash
# Interop check of every ggml type qforge reads (not part of CI: it needs a llama.cpp build). Makes a small random
# Llama (qforge make-synthetic: dim 256, hidden 768, 2 layers, vocab 32000, the Llama 2 tokenizer), quantizes it
# with llama.cpp's llama-quantize to each type (llama.cpp's presets, and --pure for each single type; i-quants
# with an importance matrix from llama-imatrix on tinystories-calib.txt; MXFP4 on a 4-expert Mixture-of-Experts
# variant, since llama.cpp writes it for expert tensors only) and for each file checks in qforge:
#   types  the ggml types qforge reads in the file (qforge inspect);
#   deq    every tensor decodes to the same fp32 bits as llama.cpp's own dequantization of the file
#          (llama-quantize --allow-requantize FILE F32, compared by `qforge compare`);
#   KL     the mean KL divergence of FILE's next-token distribution from F32.gguf's on the same text (the first
#          40 KB of tinystories-eval.txt, 16 windows of 128 tokens), by qforge (`qforge eval FILE --base F32.gguf
#          --text T --window 128 --chunks 16`: every token of each window) and by llama.cpp (`llama-perplexity
#          --kl-divergence -c 128 --chunks 16`: the second half of each window, as it scores them), then qforge's
#          top-1 agreement. The two programs' numbers differ by their token sets and their activation rounding;
#          a type is in line when they are of one size;
#   greedy how many of the first 16 greedy tokens of `qforge generate FILE` equal llama-simple's on FILE (16, 8,
#          4, 2, 1: the longest run that gives the same text). The two do not compute the same logits: llama.cpp
#          multiplies these types with 8-bit activations (Q8_K / Q8_0 / Q8_1), qforge in fp32 for all but Q8_0 /
#          Q4_0 / Q4_K, and a random model's next-token distribution is flat, so the texts part after a few tokens;
#   g-deq  the same against llama-simple on llama.cpp's F32 dequantization of FILE: the same weights and fp32
#          activations on both sides (qforge's Q8_0 / Q4_0 / Q4_K still quantize activations);
#   write  qforge's writer: `qforge convert FILE` rewritten and run in llama-simple gives FILE's 16 tokens.
# A type passes when qforge reads the file, every tensor is bit-identical to llama.cpp's dequantization, eval runs,
# one of the two greedy comparisons agrees on at least 4 tokens, and the rewritten file runs the same in llama.cpp.
# Usage:
#   scripts/check-ggml-types.sh [LLAMA_BIN_DIR]   (default ~/.cache/qforge/peer-llama.cpp/src/build/bin)
# Environment: QFORGE (default build/services/qforge), QFORGE_SHARED (default ../shared), KEEP=DIR keeps the
# files there. Prints one line per file and exits 1 if any fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-$HOME/.cache/qforge/peer-llama.cpp/src/build/bin}
qforge=${QFORGE:-build/services/qforge}
shared=${QFORGE_SHARED:-../shared}
for tool in llama-quantize llama-simple llama-imatrix llama-perplexity; do
  [ -x "$bin/$tool" ] || { echo "no $bin/$tool" >&2; exit 2; }
done
[ -x "$qforge" ] || { echo "no $qforge (build services/qforge first)" >&2; exit 2; }
if [ -n "${KEEP:-}" ]; then work=$KEEP; mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
prompt="Once upon a time"
status=0

"$qforge" make-synthetic "$work/synthetic.gguf" --dim 256 --hidden 768 --layers 2 --vocab 32000 >/dev/null || exit 1
"$qforge" convert "$work/synthetic.gguf" "$work/F32.gguf" --tokenizer "$shared/models/llama2-tokenizer/tokenizer.model" \
  >/dev/null || exit 1
"$qforge" make-synthetic "$work/synthetic-moe.gguf" --dim 256 --hidden 768 --layers 2 --vocab 32000 --experts 4 \
  --experts-used 2 >/dev/null || exit 1
"$qforge" convert "$work/synthetic-moe.gguf" "$work/F32-moe.gguf" \
  --tokenizer "$shared/models/llama2-tokenizer/tokenizer.model" >/dev/null || exit 1
head -c 40000 "$shared/data/tinystories-calib.txt" >"$work/calib.txt"
head -c 40000 "$shared/data/tinystories-eval.txt" >"$work/eval.txt"
"$bin/llama-imatrix" -m "$work/F32.gguf" -f "$work/calib.txt" -o "$work/imatrix.gguf" -c 128 --chunks 16 \
  >"$work/imatrix.log" 2>&1 || { echo "llama-imatrix failed: $(tail -3 "$work/imatrix.log")" >&2; exit 1; }

# The first n greedy tokens of qforge on $1 and llama.cpp on $2, as text (llama-simple's "<s> " echo of BOS and
# qforge's timing line removed).
same_text() {
  local file=$1 llama_file=$2 n=$3 want got
  want=$("$bin/llama-simple" -m "$llama_file" -n "$n" "$prompt" 2>/dev/null | sed '1s/^<s> //')
  got=$("$qforge" generate "$file" --prompt "$prompt" --max-tokens "$n" --temperature 0 | sed '/^-- [0-9]* prompt/d')
  [ "$want" == "$got" ]
}
# The longest of 16, 8, 4, 2, 1 greedy tokens with the same text (0: the first token differs).
same_tokens() {
  local n
  for n in 16 8 4 2 1; do
    if same_text "$1" "$2" $n; then echo $n; return; fi
  done
  echo 0
}

printf '%-16s %-38s %-10s %-34s %-7s %-7s %-6s %s\n' file "types (qforge inspect)" deq \
  "KL qforge / llama.cpp, top-1" greedy g-deq write result
# check LABEL TYPE [llama-quantize flags...]: quantizes $src (the F32 model) and checks the file.
src=$work/F32.gguf
check() {
  local label=$1 type=$2
  shift 2
  local file="$work/$label.gguf" deq="$work/$label-deq.gguf"
  if ! ("$bin/llama-quantize" "$@" "$src" "$file" "$type") >"$work/$label.log" 2>&1; then
    printf '%-16s llama-quantize refused: %s\n' "$label" "$(grep -m1 -iE 'error|failed|invalid' "$work/$label.log")"
    return
  fi
  local types deq_result eval_result greedy greedy_deq result=PASS
  if ! types=$("$qforge" inspect "$file" 2>&1); then
    printf '%-16s %-38s FAIL\n' "$label" "qforge cannot read it: $(echo "$types" | head -c 200)"
    status=1
    return
  fi
  types=$(echo "$types" | awk '/^  [a-z0-9_]+ +[0-9]+ params/ {printf "%s%s", sep, $1; sep=","}')
  "$bin/llama-quantize" --allow-requantize "$file" "$deq" F32 >"$work/$label-deq.log" 2>&1
  local cmp
  cmp=$("$qforge" compare "$file" "$deq" --quiet 2>&1)
  if [ $? -eq 0 ]; then
    deq_result="bit-exact"
  else
    deq_result="DIFFER"
    result=FAIL
    echo "$cmp" | grep -E '^DIFFER|^missing' | head -3 | sed "s/^/  $label: /" >&2
  fi
  local ev llama_kl
  if ev=$("$qforge" eval "$file" --base "$src" --text "$work/eval.txt" --window 128 --chunks 16 --streams 0 2>&1); then
    eval_result=$(echo "$ev" | sed -n 's/.*KL(base||model) mean \([0-9.e-]*\).*top-1 agreement \([0-9.]*%\).*/\1 TOP1 \2/p')
  else
    eval_result="FAILED"
    result=FAIL
  fi
  # llama.cpp's KL on the same text against the source's logits (saved once per source).
  [ -f "$src.kld" ] || "$bin/llama-perplexity" -m "$src" -f "$work/eval.txt" -c 128 --chunks 16 \
    --kl-divergence-base "$src.kld" >"$work/base-kld.log" 2>&1
  llama_kl=$("$bin/llama-perplexity" -m "$file" -f "$work/eval.txt" -c 128 --chunks 16 --kl-divergence-base "$src.kld" \
    --kl-divergence 2>&1 | awk '/Mean +KLD/ {print $3}')
  eval_result=${eval_result/ TOP1 / / ${llama_kl:-?}, }
  greedy=$(same_tokens "$file" "$file")
  greedy_deq=$(same_tokens "$file" "$deq")
  [ "$greedy" -ge 4 ] || [ "$greedy_deq" -ge 4 ] || result=FAIL
  local write=DIFFER
  if "$qforge" convert "$file" "$work/$label-qforge.gguf" >/dev/null 2>&1 &&
    [ "$("$bin/llama-simple" -m "$file" -n 16 "$prompt" 2>/dev/null)" == \
      "$("$bin/llama-simple" -m "$work/$label-qforge.gguf" -n 16 "$prompt" 2>/dev/null)" ]; then
    write=same
  else
    result=FAIL
  fi
  [ "$result" == PASS ] || status=1
  printf '%-16s %-38s %-10s %-34s %-7s %-7s %-6s %s\n' "$label" "$types" "$deq_result" "$eval_result" "$greedy/16" \
    "$greedy_deq/16" "$write" "$result"
  rm -f "$deq" "$work/$label-qforge.gguf"
}

# The source itself: qforge and llama.cpp on the same F32 file.
printf '%-16s %-38s %-10s %-34s %-7s %-7s %-6s %s\n' F32 f32 - - "$(same_tokens "$work/F32.gguf" "$work/F32.gguf")/16" \
  - - -

# llama.cpp's presets (its per-tensor mixes; Q4_0's default preset writes output.weight as q6_k).
for preset in Q4_0 Q5_0 Q4_K_M Q5_K_M Q3_K_M Q2_K Q6_K IQ4_NL IQ4_XS; do
  check "$preset" "$preset"
done
# One type for every tensor (--pure), the i-quants with the importance matrix llama-quantize needs for them.
for type in F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS TQ1_0 TQ2_0; do
  check "pure-$type" "$type" --pure
done
# llama-quantize refuses IQ2_XXS / IQ2_XS / IQ2_S / IQ1_S without importance data, and llama-imatrix has none for
# token_embd.weight (a lookup, not a product) nor output.weight: under --pure those two stay q8_0 for these types.
# llama.cpp's IQ2_S file type puts IQ2_XS on its tensors and IQ2_M puts IQ2_S: pure-IQ2_M is the all-IQ2_S file.
for type in IQ3_XXS IQ3_S IQ1_M IQ2_M; do
  check "pure-$type" "$type" --pure --imatrix "$work/imatrix.gguf"
done
for type in IQ2_XXS IQ2_XS IQ2_S IQ1_S; do
  check "pure-$type" "$type" --pure --imatrix "$work/imatrix.gguf" --token-embedding-type q8_0 --output-tensor-type q8_0
done
# The i-quant presets (their mixes put other types on some tensors).
for preset in IQ2_XXS IQ2_M IQ3_XXS IQ3_M IQ1_S IQ1_M; do
  check "$preset" "$preset" --imatrix "$work/imatrix.gguf"
done
# Mixture of Experts: MXFP4 (llama.cpp's MXFP4_MOE: the experts' stacked tensors in mxfp4, the rest q8_0) and a
# K-quant mix, each expert a slice of llama.cpp's stacked tensor.
src=$work/F32-moe.gguf
check "moe-MXFP4_MOE" MXFP4_MOE
check "moe-Q4_K_M" Q4_K_M
exit $status
