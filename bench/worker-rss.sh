#!/usr/bin/env bash
# The worker's memory bound (docs/distributed.md): a worker's peak resident memory is one block's, independent of
# the model's depth. For each depth, a generated Llama (`qforge make-synthetic`, f32 GGUF) is quantized as a
# calibrated job (gptq 4-bit g128, calibrated on the first --text-kib KiB of tinystories-calib.txt, tokenized by
# stories260K's tok512) through qforge-scheduler and ONE qforge-worker, which therefore runs every task: the whole
# calibrate chain, every quantize task and the assemble. The worker's VmHWM (peak RSS, /proc) is read when the job
# has ended; beside it, the peak RSS of `qforge quantize` of the same recipe in one process (GNU time), which
# holds the whole model. The work directory is deleted at the end (--keep keeps it).
#
#   bash bench/worker-rss.sh [--layers "8 32"] [--dim 512] [--hidden 1536] [--text-kib 8] [--threads 2]
#                            [--work DIR] [--build DIR] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."

work=/work/qforge-rss-run
layers_list="8 32" dim=512 hidden=1536 text_kib=8 threads=2 build=build keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) layers_list=$2; shift 2 ;;
    --dim) dim=$2; shift 2 ;;
    --hidden) hidden=$2; shift 2 ;;
    --text-kib) text_kib=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
qforge=$PWD/$build/services/qforge
scheduler_bin=$PWD/$build/services/qforge-scheduler
worker_bin=$PWD/$build/workers/qforge-worker
for b in "$qforge" "$scheduler_bin" "$worker_bin"; do [[ -x $b ]] || { echo "missing $b (build first)" >&2; exit 2; }; done
shared=$(cd .. && pwd)/shared
[[ -d $shared ]] || shared=/work/shared
tokenizer=$shared/models/stories260K/tok512.bin

rm -rf "$work"
mkdir -p "$work/models"
head -c $((text_kib * 1024)) "$shared/data/tinystories-calib.txt" >"$work/models/calib.txt"
cp "$tokenizer" "$work/models/tok512.bin"

# Only the processes this script started are ever signalled, each by its pid.
declare -A pid
cleanup() {
  for name in "${!pid[@]}"; do
    if [[ ${pid[$name]} -gt 0 ]] && kill -0 "${pid[$name]}" 2>/dev/null; then
      kill -9 "${pid[$name]}" 2>/dev/null || true
      wait "${pid[$name]}" 2>/dev/null || true
    fi
  done
  if [[ $keep -eq 0 ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
address=127.0.0.1:$port
kib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

printf '| layers | model (MiB, f32) | tasks | worker peak RSS (MiB) | qforge quantize peak RSS (MiB) |\n|---|---|---|---|---|\n'
for layers in $layers_list; do
  model=$work/models/m$layers.gguf
  "$qforge" make-synthetic "$model" --dim "$dim" --hidden "$hidden" --layers "$layers" --vocab 512 --seq-len 256 \
    >/dev/null
  size=$(( $(stat -c %s "$model") / 1048576 ))
  run=$work/run$layers
  mkdir -p "$run"
  rm -f "$run/port"
  "$scheduler_bin" --store "$run/store" --listen "$address" --port-file "$run/port" --allowed-roots "$work/models" \
    >>"$run/scheduler.log" 2>&1 &
  pid[scheduler]=$!
  for _ in $(seq 600); do [[ -s $run/port ]] && break; sleep 0.1; done
  "$worker_bin" --scheduler "$address" --threads "$threads" --name w1 --allowed-roots "$work/models" \
    >>"$run/w1.log" 2>&1 &
  pid[w1]=$!
  "$qforge" submit "$model" --scheduler "$address" --method gptq --bits 4 --group 128 --name "m$layers" \
    --tokenizer "$work/models/tok512.bin" --calib-text "$work/models/calib.txt" --watch >"$run/submit.log" 2>&1 \
    || { echo "job failed:" >&2; tail -5 "$run/submit.log" >&2; tail -5 "$run/w1.log" >&2; exit 1; }
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/${pid[w1]}/status")
  tasks=$(grep -o '[0-9]*/[0-9]* tasks' "$run/submit.log" | tail -1 | cut -d/ -f2 | cut -d' ' -f1)
  for name in w1 scheduler; do kill -9 "${pid[$name]}"; wait "${pid[$name]}" 2>/dev/null || true; pid[$name]=0; done
  inproc=$( { /usr/bin/time -f '%M' "$qforge" quantize --method gptq --bits 4 --group 128 --threads "$threads" \
              --tokenizer "$work/models/tok512.bin" --calib-text "$work/models/calib.txt" "$model" \
              "$run/out.safetensors" >/dev/null; } 2>&1 | tail -1)
  printf '| %s | %s | %s | %s | %s |\n' "$layers" "$size" "${tasks:-?}" "$(kib "$hwm")" "$(kib "$inproc")"
  rm -f "$model" "$run/out.safetensors"
done
