#!/usr/bin/env bash
# README command 2: install, build, and run every test on a fresh Debian 12 machine. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The openai npm client for the chat e2e test; without the registry that one test skips (it says so).
bash scripts/install-node-deps.sh || echo "run-tests: openai npm client not installed; its test will skip" >&2
bash scripts/build.sh
jobs=$(nproc 2>/dev/null || echo 2)
ctest --test-dir build --output-on-failure -j"$jobs" --timeout 900
