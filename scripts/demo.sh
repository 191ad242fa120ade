#!/usr/bin/env bash
# The main job, embedded mode: `qforge up` runs the scheduler, the artifact store and two workers in one
# process; each method is submitted as a job (live progress), the new version is exported from the store and
# then generates text and is measured against fp32 on real text (the first windows of TinyStories evaluation
# text, never seen in calibration): perplexity before and after, KL-divergence and top-1 agreement.
set -euo pipefail
cd "$(dirname "$0")/.."
qforge=build/services/qforge
shared=${QFORGE_SHARED:-../shared}
model=$(realpath "$shared/models/stories260K/stories260K.bin" 2>/dev/null || true)
eval_text=$shared/data/tinystories-eval.txt
calib_text=$shared/data/tinystories-calib.txt
# 64 windows of 256 tokens (16k tokens): enough to rank the methods, quick on two cores.
eval_args=(--text "$eval_text" --window 256 --chunks 64 --streams 0)
work=${TMPDIR:-/tmp}/qforge-demo
[ -n "$model" ] && [ -f "$model" ] || { echo "qforge demo: stories260K.bin not found under $shared/models (shared/ must sit beside the checkout)" >&2; exit 1; }
[ -f "$eval_text" ] || { echo "qforge demo: $eval_text not found (shared/ must sit beside the checkout)" >&2; exit 1; }
rm -rf "$work"
mkdir -p "$work"

echo "== embedded mode: scheduler + store ($work/store) + 2 workers + inference server in one process"
$qforge up --store "$work/store" --listen 127.0.0.1:0 --serve-grpc 127.0.0.1:0 --serve-http 127.0.0.1:0 \
  --port-file "$work/port" --workers 2 >"$work/up.log" 2>&1 &
up_pid=$!
trap 'kill $up_pid 2>/dev/null; wait $up_pid 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -f "$work/port" ] && break; kill -0 $up_pid 2>/dev/null || break; sleep 0.05; done
[ -f "$work/port" ] || { echo "qforge demo: qforge up did not start:" >&2; cat "$work/up.log" >&2; exit 1; }
read -r scheduler_port serve_grpc_port serve_http_port <"$work/port"
export QFORGE_SCHEDULER=127.0.0.1:$scheduler_port
cat "$work/up.log"

echo
echo "== the source model"
$qforge inspect "$model"

# The checkpoint's tokenizer (tok512.bin beside it, as llama2.c's run.c reads it) travels with every version.
echo
echo "== fp32: greedy generation from BOS, and perplexity on $eval_text"
$qforge generate "$model" --max-tokens 48 --temperature 0
$qforge eval "$model" "${eval_args[@]}"

for spec in "q8_0" "q4_k" "q4_0" "nf4" "rtn --bits 4 --group 32" "gptq --bits 4 --group 32" \
            "rtn --bits 3 --group 32 --asym"; do
  echo
  echo "== $spec"
  calib=()
  case "$spec" in gptq*) calib=(--calib-text "$calib_text") ;; esac
  # shellcheck disable=SC2086
  $qforge submit "$model" --method $spec --name stories260k "${calib[@]}" --watch | tee "$work/submit.log"
  ref=$(sed -n 's/^job [0-9]* succeeded: \([a-z0-9._-]*@[0-9]*\) (.*/\1/p' "$work/submit.log")
  # GGUF has no type for qforge's rtn / gptq / nf4 encodings; those go to safetensors (with tokenizer.model).
  format=gguf
  case "$spec" in rtn*|nf4*|gptq*) format=safetensors ;; esac
  out="$work/${ref/@/-v}.$format"
  $qforge export "$ref" --format "$format" "$out"
  $qforge generate "$out" --max-tokens 48 --temperature 0   # the version carries the tokenizer's vocabulary
  $qforge eval "$out" --base "$model" "${eval_args[@]}"
done

echo
echo "== the store"
$qforge jobs
$qforge models

if command -v curl >/dev/null; then
  echo
  echo "== serving: stories260k@3 (q4_0) from the store, OpenAI-style completion over HTTP (port $serve_http_port)"
  curl -s "http://127.0.0.1:$serve_http_port/v1/completions" \
    -d '{"model": "stories260k@3", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'
  echo
  echo "== /metrics (excerpt)"
  curl -s "http://127.0.0.1:$serve_http_port/metrics" |
    grep -E '^qforge_(model_weight_bytes|model_fp16_bytes|tokens_total|energy_per_token_joules|cost_saved_dollars)' || true
fi
