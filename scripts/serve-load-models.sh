# Sourced by scripts/serve-load*.sh: the generated Llama those load tests serve (dim 1024, 6 layers, vocabulary
# 4096, context 512, 340 MB in f32) and its q4_k, made once under $work (${TMPDIR:-/tmp}/qforge-serve-load) and
# kept for the next run. Sets work and q (the qforge CLI).
work=${TMPDIR:-/tmp}/qforge-serve-load
mkdir -p "$work"
q=build/services/qforge
[ -f "$work/gen-f32.gguf" ] || $q make-synthetic "$work/gen-f32.gguf" --dim 1024 --hidden 2816 --layers 6 --heads 16 \
  --vocab 4096 --seq-len 512 --seed 7 >/dev/null
[ -f "$work/gen-q4_k.gguf" ] || $q quantize --method q4_k "$work/gen-f32.gguf" "$work/gen-q4_k.gguf" >/dev/null
