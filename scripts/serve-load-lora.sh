#!/usr/bin/env bash
# LoRA serving load (docs/serving.md, "LoRA adapters"): the generated q4_k Llama of scripts/serve-load.sh served by one
# qforge-server with two random adapters loaded at run time (a GGUF LoRA of rank 8 on every linear, a PEFT adapter of
# rank 16 on q and v); qforge_serve_load runs 64 concurrent streams on the base model alone, then 64 round-robin
# over {base, GGUF adapter, PEFT adapter}, so every step mixes all three.
# Usage: bash scripts/serve-load-lora.sh [STREAMS] [MAX_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
streams=${1:-64}
max_tokens=${2:-32}
source scripts/serve-load-models.sh
mkdir -p "$work/adapters"
$q make-lora "$work/gen-q4_k.gguf" "$work/adapters/all-r8.gguf" --rank 8 --seed 1 >/dev/null
$q make-lora "$work/gen-q4_k.gguf" "$work/adapters/qv-r16" --rank 16 --targets q,v --seed 2 >/dev/null
rm -f "$work/ports"
build/services/qforge-server --grpc 127.0.0.1:0 --http 127.0.0.1:0 --port-file "$work/ports" --threads "$(nproc)" \
  --max-running 64 --adapter-root "$work/adapters" --model "genq4k=$work/gen-q4_k.gguf" 2>"$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -f "$work/ports" ] && break; sleep 0.1; done
read -r grpc_port http_port <"$work/ports"
curl -sf "http://127.0.0.1:$http_port/v1/adapters" -d '{"name": "all-r8", "path": "all-r8.gguf"}'; echo
curl -sf "http://127.0.0.1:$http_port/v1/adapters" -d '{"name": "qv-r16", "path": "qv-r16"}'; echo
# Warm-up (page-in of the weights, the kernels' first-use ISA timing), not reported.
build/bench/qforge_serve_load --server "127.0.0.1:$grpc_port" --model genq4k@file --label warm-up --streams 8 \
  --requests 1 --max-tokens 8 --adapters ",all-r8,qv-r16" >/dev/null
for run in 1 2; do
  build/bench/qforge_serve_load --server "127.0.0.1:$grpc_port" --model genq4k@file --label "base-$run" \
    --streams "$streams" --requests 1 --max-tokens "$max_tokens"
  build/bench/qforge_serve_load --server "127.0.0.1:$grpc_port" --model genq4k@file --label "mixed-$run" \
    --streams "$streams" --requests 1 --max-tokens "$max_tokens" --adapters ",all-r8,qv-r16"
done
