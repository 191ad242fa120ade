#!/usr/bin/env bash
# Installs every Debian 12 package qforge needs to build, test and run. Idempotent: packages
# already present are left as they are. Needs root (or sudo).
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  clang libclang-rt-14-dev            # libFuzzer targets (-fsanitize=fuzzer)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev
  libboost-dev
  libopenblas-dev liblapacke-dev
  librocksdb-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libsentencepiece-dev
  libzstd-dev libxxhash-dev libssl-dev
  prometheus                          # promtool and a real server for the metrics tests
  nodejs                              # the official openai npm client drives the server in a test
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# Debian's nodejs comes without npm (its own package); some nodejs builds carry npm inside.
command -v npm >/dev/null || dpkg-query -W -f='${Status}' npm 2>/dev/null | grep -q "ok installed" || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${#missing[@]} packages"
