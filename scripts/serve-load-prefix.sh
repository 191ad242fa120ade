#!/usr/bin/env bash
# Prefix-caching load (docs/serving.md, "Prefix caching"): the generated q4_k Llama of scripts/serve-load.sh served
# by two qforge-servers on 127.0.0.1, one with the prefix cache (the default) and one with --no-prefix-cache. Every
# request sends the same long prompt (a system prompt, ~400 tokens) ending in its own " #stream.request", as chat
# clients do; qforge_serve_load runs STREAMS concurrent streams of REQUESTS requests against each server in turn,
# twice (ABAB, since these machines are shared and noisy), and the script prints the reused-token counters.
# Usage: bash scripts/serve-load-prefix.sh [STREAMS] [REQUESTS_PER_STREAM] [MAX_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
streams=${1:-8}
requests=${2:-4}
max_tokens=${3:-16}
source scripts/serve-load-models.sh
# The shared prefix: the start of the evaluation text, cut to fit the context with the answer.
prompt=$(head -c 600 ../shared/data/tinystories-eval.txt | tr '\n' ' ')
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done' EXIT
declare -A grpc http
for mode in cached plain; do
  flag=""
  [ "$mode" = plain ] && flag="--no-prefix-cache"
  rm -f "$work/ports-$mode"
  build/services/qforge-server --grpc 127.0.0.1:0 --http 127.0.0.1:0 --port-file "$work/ports-$mode" \
    --threads "$(nproc)" --max-running 32 $flag --model "genq4k=$work/gen-q4_k.gguf" 2>"$work/server-$mode.log" &
  pids+=($!)
  for _ in $(seq 600); do [ -f "$work/ports-$mode" ] && break; sleep 0.1; done
  read -r grpc[$mode] http[$mode] <"$work/ports-$mode"
  # Warm-up (page-in, the kernels' first-use ISA timing; for the cached server also the first sight of the prefix).
  build/bench/qforge_serve_load --server "127.0.0.1:${grpc[$mode]}" --model genq4k@file --label warm-up \
    --streams "$streams" --requests 1 --max-tokens 4 --prompt "$prompt" --unique-suffix >/dev/null
done
for run in 1 2; do
  for mode in cached plain; do
    build/bench/qforge_serve_load --server "127.0.0.1:${grpc[$mode]}" --model genq4k@file --label "$mode-$run" \
      --streams "$streams" --requests "$requests" --max-tokens "$max_tokens" --prompt "$prompt" --unique-suffix
  done
done
for mode in cached plain; do
  echo "$mode: $(curl -s "http://127.0.0.1:${http[$mode]}/metrics" | grep -E '^qforge_prefix_cache_(hits|tokens)_total' | tr '\n' ' ')"
done
