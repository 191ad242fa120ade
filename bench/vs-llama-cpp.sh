#!/usr/bin/env bash
# qforge against llama.cpp on the same GGUF files, measured side by side: for every file and thread count the two
# tools' prompt (ppP) and decode (tgN) runs alternate ROUNDS times, and the table gives each tool's median tokens/s
# and their ratio (qforge / llama-bench). Alternating keeps the shared machine's load changes from favouring one.
#   bench/vs-llama-cpp.sh [--threads 1,2] [-p 512] [-n 128] [--rounds 5] FILE.gguf...
# LLAMA_BIN (default: what ../shared/tools/peer-llama-cpp.sh builds) names llama.cpp's bin directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
threads=1,2 p=512 n=128 rounds=5 files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    -p) p=$2; shift 2 ;;
    -n) n=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
[ ${#files[@]} -gt 0 ] || { echo "usage: $0 [--threads 1,2] [-p 512] [-n 128] [--rounds 5] FILE.gguf..." >&2; exit 2; }
bin=${LLAMA_BIN:-$(bash "$here/../shared/tools/peer-llama-cpp.sh")}
qforge=$here/build/services/qforge

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# The t/s column of a test's row in either tool's markdown table.
rate() { grep -E "\| +$1 +\|" | awk -F'|' '{print $(NF-1)}' | awk '{print $1}'; }

echo "| file | threads | test | qforge t/s | llama-bench t/s | qforge / llama.cpp |"
echo "|---|---:|---|---:|---:|---:|"
for f in "${files[@]}"; do
  for t in ${threads//,/ }; do
    declare -A q=() l=()
    for _ in $(seq "$rounds"); do
      qo=$("$qforge" bench "$f" --threads "$t" -p "$p" -n "$n" -r 1)
      lo=$("$bin/llama-bench" -m "$f" -t "$t" -p "$p" -n "$n" -r 1 2>/dev/null)
      for test in "pp$p" "tg$n"; do
        q[$test]+="$(echo "$qo" | rate "$test") "
        l[$test]+="$(echo "$lo" | rate "$test") "
      done
    done
    for test in "pp$p" "tg$n"; do
      qm=$(echo "${q[$test]}" | tr ' ' '\n' | grep . | median)
      lm=$(echo "${l[$test]}" | tr ' ' '\n' | grep . | median)
      echo "| $(basename "$f") | $t | $test | $qm | $lm | $(awk -v a="$qm" -v b="$lm" 'BEGIN {printf "%.2f", a / b}') |"
    done
    unset q l
  done
done
