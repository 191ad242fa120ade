#!/usr/bin/env bash
# Serving load test (docs/serving.md): a generated Llama (dim 1024, 6 layers, 340 MB f32) served as f32 and as
# q4_k by one qforge-server on 127.0.0.1; qforge_serve_load runs 1, 8 and 32 concurrent streams against each.
# Usage: bash scripts/serve-load.sh [REQUESTS_PER_STREAM] [MAX_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-2}
max_tokens=${2:-32}
source scripts/serve-load-models.sh
rm -f "$work/ports"
build/services/qforge-server --grpc 127.0.0.1:0 --http 127.0.0.1:0 --port-file "$work/ports" --threads "$(nproc)" \
  --max-running 32 --model "genf32=$work/gen-f32.gguf,genq4k=$work/gen-q4_k.gguf" 2>"$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -f "$work/ports" ] && break; sleep 0.1; done
read -r grpc_port http_port <"$work/ports"
for model in genf32 genq4k; do
  build/bench/qforge_serve_load --server "127.0.0.1:$grpc_port" --model "$model@file" --streams 1,8,32 \
    --requests "$requests" --max-tokens "$max_tokens"
done
curl -s "http://127.0.0.1:$http_port/metrics" | grep -E '^qforge_(model_weight_bytes|model_fp16_bytes|cost_per_million|energy_per_token|power_watts)' || true
