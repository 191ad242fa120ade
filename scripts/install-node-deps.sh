#!/usr/bin/env bash
# Installs the optional Node.js test dependency: the official `openai` npm client that tests/chat_test.cc
# (OpenAiNpmClientTest) drives qforge-server with. Goes to tests/openai/node_modules (git-ignored), pinned by
# tests/openai/package.json. Without it (or without node) that test skips; nothing downloads at build or test
# time. Needs node and npm (Debian 12: apt-get install nodejs npm) and network access once.
set -euo pipefail
cd "$(dirname "$0")/../tests/openai"
if ! command -v npm >/dev/null; then
  echo "install-node-deps: npm not found (apt-get install nodejs npm)" >&2
  exit 1
fi
npm install --no-audit --no-fund
echo "install-node-deps: openai $(node -p "require('./node_modules/openai/package.json').version") in $(pwd)/node_modules"
