#!/usr/bin/env bash
# The distributed service as containers on one machine, end to end: a Debian 12 base image made with debootstrap
# (no registry needed), the qforge image on it (deploy/Dockerfile), then on one internal docker network the
# scheduler, two workers and the server; submits a quantize job for stories260K, waits for it, and asks the
# server for a chat completion of the result. Traffic stays between those containers and loopback: the network
# does no NAT and only the server's HTTP port is published, on 127.0.0.1.
#
#   bash deploy/run-containers.sh [--from-source] [--keep]
#     --from-source  compile inside the image (deploy/Dockerfile's build stage, ~10 min on 2 cores) instead of
#                    copying the host's build/ binaries (which need `bash scripts/build.sh` on Debian 12 first)
#     --keep         leave the containers running at the end (removed by the next run)
#
# Needs Debian's docker.io and debootstrap (apt-get install docker.io debootstrap), root (or sudo) for
# debootstrap, a running dockerd, and Debian's mirror for the image build's apt.
# Exit status: 0 the chat completion came back; 1 a step failed (the line says which, and why); 2 bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
from_source=0 keep=0
for a in "$@"; do
  case "$a" in
    --from-source) from_source=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: $0 [--from-source] [--keep]" >&2; exit 2 ;;
  esac
done
fail() { echo "run-containers: $*" >&2; exit 1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

command -v docker >/dev/null || fail "no docker client (apt-get install docker.io)"
if ! err=$(docker info 2>&1 >/dev/null); then
  fail "dockerd is not reachable, so no container can run here: $(echo "$err" | tail -1) (start it: sudo dockerd &)"
fi

base=qforge/debian:12 image=qforge:local net=qforge-net prefix=qforge-
models=$(realpath -m "$repo/../shared/models/stories260K")
[ -f "$models/stories260K.bin" ] || fail "$models/stories260K.bin is missing (the model the job quantizes)"

# 1. The base image, once: debootstrap's minimal Debian 12, imported.
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || fail "no debootstrap to make the base image (apt-get install debootstrap)"
  root=$(mktemp -d)
  echo "run-containers: debootstrap bookworm (a few minutes)"
  $SUDO debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 ||
    fail "debootstrap failed, see $root.log"
  $SUDO tar -C "$root" -c . | docker import - "$base" >/dev/null || fail "docker import of the base failed"
  $SUDO rm -rf "$root" "$root.log"
fi

# 2. The qforge image. BuildKit where the client has buildx; else the legacy builder, which builds every stage
# of a Dockerfile, so the prebuilt image then uses deploy/Dockerfile's runtime stage alone (cut out below).
if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
if [ "$from_source" -eq 1 ]; then
  docker build -q -f deploy/Dockerfile --build-arg BASE="$base" -t "$image" . >/dev/null ||
    fail "docker build (from source) failed"
else
  for b in services/qforge services/qforge-scheduler workers/qforge-worker services/qforge-server; do
    [ -x "build/$b" ] || fail "build/$b is not built (bash scripts/build.sh, or pass --from-source)"
  done
  context=$(mktemp -d)
  mkdir "$context/prebuilt"
  cp build/services/qforge build/services/qforge-scheduler build/workers/qforge-worker build/services/qforge-server \
    "$context/prebuilt/"
  # deploy/Dockerfile's runtime stage (from its last FROM on), after a stage named as its build stage that holds
  # the host's binaries: one package list, the Dockerfile's.
  { printf 'ARG BASE\nFROM ${BASE} AS build\nCOPY prebuilt/ /out/\n'
    awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' deploy/Dockerfile; } >"$context/Dockerfile"
  docker build -q -f "$context/Dockerfile" --build-arg BASE="$base" -t "$image" "$context" >/dev/null ||
    fail "docker build (prebuilt binaries) failed"
  rm -rf "$context"
fi

# 3. The cluster: a fresh internal network and four containers (an earlier run's are removed first).
cleanup() {
  docker rm -f "${prefix}scheduler" "${prefix}worker-1" "${prefix}worker-2" "${prefix}server" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  docker volume rm "${prefix}store" >/dev/null 2>&1 || true
}
cleanup
[ "$keep" -eq 1 ] || trap cleanup EXIT
# A bridge without masquerading: the containers reach each other and the host, nothing beyond it (no NAT), and
# a published port still works (an --internal network publishes none).
docker network create -o com.docker.network.bridge.enable_ip_masquerade=false "$net" >/dev/null ||
  fail "docker network create failed"
docker volume create "${prefix}store" >/dev/null
run() { docker run -d --network "$net" --read-only --tmpfs /tmp "$@" >/dev/null; }
run --name "${prefix}scheduler" -v "${prefix}store:/var/lib/qforge" -v "$models:/models:ro" "$image" \
  qforge-scheduler --store /var/lib/qforge --listen 0.0.0.0:7700 --allowed-roots /models ||
  fail "the scheduler container did not start"
for w in 1 2; do
  run --name "${prefix}worker-$w" -v "$models:/models:ro" "$image" \
    qforge-worker --scheduler "${prefix}scheduler:7700" --allowed-roots /models --name "worker-$w" ||
    fail "worker $w did not start"
done
# Published on loopback only; the other ports stay on the internal network.
docker run -d --name "${prefix}server" --network "$net" --read-only -p 127.0.0.1::7702 "$image" \
  qforge-server --scheduler "${prefix}scheduler:7700" --grpc 0.0.0.0:7701 --http 0.0.0.0:7702 >/dev/null ||
  fail "the server container did not start"
port=$(docker port "${prefix}server" 7702/tcp | head -1 | sed 's/.*://')
[ -n "$port" ] || fail "the server's HTTP port was not published"

# 4. A job: stories260K to q8_0, submitted from a one-off CLI container on the same network.
cli() { docker run --rm --network "$net" -v "$models:/models:ro" "$image" qforge "$@" --scheduler "${prefix}scheduler:7700"; }
for _ in $(seq 60); do cli jobs >/dev/null 2>&1 && break; sleep 1; done
out=$(cli submit /models/stories260K.bin --method q8_0 --tokenizer /models/tok512.bin --name stories260k --watch 2>&1) ||
  fail "the job failed: $(echo "$out" | tail -3)"
echo "$out" | tail -2

# 5. A chat completion of the stored version, through the published port.
body='{"model": "stories260k@1", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24}'
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
reply=$(curl -sf "http://127.0.0.1:$port/v1/chat/completions" -d "$body") ||
  fail "no chat completion from the server on 127.0.0.1:$port ($(docker logs --tail 3 "${prefix}server" 2>&1))"
echo "$reply" | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("run-containers: chat completion from stories260k@1 (%d prompt + %d completion tokens): %r" % (
    r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["choices"][0]["message"]["content"]))' ||
  fail "the reply is not a chat completion: $reply"
