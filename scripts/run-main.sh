#!/usr/bin/env bash
# README command 1: install, build, and run the main job on a fresh Debian 12 machine.
# The main job (embedded default): quantize stories260K from ../shared/models with several methods and print,
# for each, a generation and perplexity / KL before and after quantization.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
exec bash scripts/demo.sh
