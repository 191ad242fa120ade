#!/usr/bin/env bash
# The distributed MoE run with kills (docs/distributed.md): a generated Mixture-of-Experts GGUF (default 64 experts
# x 8 layers, 4.8 GB of f32) quantized once in one process (`qforge quantize`) and once through qforge-scheduler and
# two qforge-worker processes, with a worker SIGKILLed while it holds a lease (a third worker replaces it) and the
# scheduler SIGKILLed mid-job and restarted on the same store and port. Checks: the exported version (safetensors)
# holds the same tensor table, data bytes and metadata as the in-process file (only its `source` key, the input
# path `qforge quantize` records, differs) and the same config.json / tokenizer files beside it; no task
# committed before the scheduler crash is leased again; the killed worker's task was committed. Prints the
# times. The work directory is deleted at the end (--keep keeps it).
#
#   bash bench/moe-distributed.sh [--work DIR] [--experts N] [--layers N] [--dim N] [--hidden N] [--method M]
#                                 [--lease-ms MS] [--build DIR] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."

work=/work/qforge-moe-run
experts=64 layers=8 dim=512 hidden=1536 method=q4_k lease_ms=5000 build=build keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work) work=$2; shift 2 ;;
    --experts) experts=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --dim) dim=$2; shift 2 ;;
    --hidden) hidden=$2; shift 2 ;;
    --method) method=$2; shift 2 ;;
    --lease-ms) lease_ms=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
qforge=$PWD/$build/services/qforge
scheduler_bin=$PWD/$build/services/qforge-scheduler
worker_bin=$PWD/$build/workers/qforge-worker
for b in "$qforge" "$scheduler_bin" "$worker_bin"; do [[ -x $b ]] || { echo "missing $b (build first)" >&2; exit 2; }; done

rm -rf "$work"
mkdir -p "$work/models" "$work/in-process" "$work/distributed"
log=$work/tasks.log
: >"$log"

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

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
commits() { grep -c '^commit ' "$log" || true; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
address=127.0.0.1:$port

start_scheduler() {
  rm -f "$work/port"
  "$scheduler_bin" --store "$work/store" --listen "$address" --port-file "$work/port" --metrics 127.0.0.1:0 \
    --lease-ms "$lease_ms" --allowed-roots "$work/models" >>"$work/scheduler.log" 2>&1 &
  pid[scheduler]=$!
  for _ in $(seq 600); do [[ -s $work/port ]] && return 0; sleep 0.1; done
  echo "the scheduler did not start:" >&2; cat "$work/scheduler.log" >&2; exit 1
}
start_worker() {
  "$worker_bin" --scheduler "$address" --threads 1 --name "$1" --task-log "$log" --allowed-roots "$work/models" \
    >>"$work/$1.log" 2>&1 &
  pid[$1]=$!
}
kill9() {
  kill -9 "${pid[$1]}"
  wait "${pid[$1]}" 2>/dev/null || true
  pid[$1]=0
}

echo "== generate: $experts experts x $layers layers, dim $dim, expert hidden $hidden (f32 GGUF)"
t=$(now)
"$qforge" make-synthetic "$work/models/moe.gguf" --dim "$dim" --hidden "$hidden" --layers "$layers" --heads 8 \
  --experts "$experts" --experts-used 2 --vocab 4096 --seq-len 256 --seed 5
echo "generated $(du -BM --apparent-size "$work/models/moe.gguf" | cut -f1) in $(since "$t") s"

echo "== in process: qforge quantize --method $method --threads 2"
t=$(now)
"$qforge" quantize --method "$method" --threads 2 "$work/models/moe.gguf" "$work/in-process/model.safetensors" >"$work/quantize.log"
in_process_s=$(since "$t")
echo "in process: $in_process_s s"

echo "== distributed: scheduler + workers w1, w2 (1 thread each), lease $lease_ms ms"
start_scheduler
start_worker w1
start_worker w2
t=$(now)
job=$("$qforge" submit "$work/models/moe.gguf" --method "$method" --name moe --scheduler "$address" | awk '/submitted/ { print $2 }')
total=$("$qforge" jobs --scheduler "$address" | awk -v j="$job" '$1 == j { split($4, a, "/"); print a[2] }')
echo "job $job: $total tasks"

# Kill w1 right after it leased a task, once a quarter of the tasks are committed.
victim_pid=${pid[w1]}
held=
finished_early() { echo "the job finished before the $1 was killed: nothing was tested" >&2; exit 1; }
while [[ -z $held ]]; do
  done_now=$(commits)
  [[ $done_now -lt $total ]] || finished_early worker
  if [[ $done_now -ge $((total / 4)) ]]; then
    last=$(awk -v p="$victim_pid" '$NF == p { line = $0 } END { print line }' "$log")
    if [[ $last == lease* ]]; then
      kill9 w1
      held=$(awk '{ print $2 }' <<<"$last")
    fi
  fi
  sleep 0.005
done
echo "SIGKILL w1 (pid $victim_pid) holding task $held after $(commits) commits, at $(since "$t") s; starting w3"
start_worker w3

# Kill the scheduler once half of the tasks are committed; restart it on the same store and port.
while [[ $(commits) -lt $((total / 2)) ]]; do sleep 0.01; done
kill9 scheduler
[[ $(commits) -lt $total ]] || finished_early scheduler
crash_at=$(since "$t")
lines_at_crash=$(wc -l <"$log")
committed_before_crash=$(commits)
echo "SIGKILL scheduler after $committed_before_crash commits, at $crash_at s; restarting"
start_scheduler
"$qforge" watch "$job" --scheduler "$address" >"$work/watch.log" 2>&1
distributed_s=$(since "$t")
tail -1 "$work/watch.log"
echo "distributed: $distributed_s s (from submit to version)"

# Every task committed before the crash stays committed: none is leased after the restart.
leased_again=$(awk -v n="$lines_at_crash" 'NR <= n && $1 == "commit" { done[$2] = 1 }
                                           NR > n && $1 == "lease" && ($2 in done) { again++ }
                                           END { print again + 0 }' "$log")
leased_after=$(awk -v n="$lines_at_crash" 'NR > n && $1 == "lease" { k++ } END { print k + 0 }' "$log")
held_committed=$(awk -v h="$held" '($1 == "commit" || $1 == "duplicate") && $2 == h { k++ } END { print k + 0 }' "$log")
echo "after the restart: $leased_after leases, $leased_again of tasks committed before the crash"
echo "w1's task $held: $held_committed commit/duplicate lines by the other workers (0: w1 committed it before dying)"

"$qforge" export moe@1 --format safetensors "$work/distributed/model.safetensors" --scheduler "$address" >/dev/null
ls -l "$work/in-process/model.safetensors" "$work/distributed/model.safetensors" | awk '{ print $5, $9 }'
# The two files: the same tensor table (names, encodings, shapes, offsets), the same data bytes, the same
# metadata except `source`, which only `qforge quantize` records (the input path it was given).
identical=$(python3 - "$work/in-process/model.safetensors" "$work/distributed/model.safetensors" <<'PY'
import hashlib, json, struct, sys
def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    meta = header.pop("__metadata__", {})
    return header, meta, h.hexdigest()
(ta, ma, da), (tb, mb, db) = read(sys.argv[1]), read(sys.argv[2])
for m in (ma, mb):
    m.pop("qforge.meta.source", None)
print("tensors %d, data sha256 %s / %s" % (len(ta), da[:16], db[:16]), file=sys.stderr)
for what, a, b in (("tensor table", ta, tb), ("metadata", ma, mb), ("data", da, db)):
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) else []
        print("differ: %s %s" % (what, " ".join("%s=%r/%r" % (k, a.get(k), b.get(k)) for k in keys[:8])),
              file=sys.stderr)
        print("NO"); sys.exit(0)
print("yes")
PY
)
for f in config.json tokenizer.model tokenizer_config.json; do
  cmp "$work/in-process/$f" "$work/distributed/$f" || identical=NO
done
echo "byte-identical: $identical; leased again after the crash: $leased_again"
[[ $identical == yes && $leased_again -eq 0 ]]
