#!/usr/bin/env bash
# Checks the Prometheus rules (promtool check rules: syntax, PromQL, naming) and runs their unit tests
# (promtool test rules deploy/prometheus/tests/*.yml). ctest runs it as qforge_prometheus_rules_test; without
# promtool (Debian's prometheus package) it exits 77, which ctest reports as skipped.
set -euo pipefail
cd "$(dirname "$0")"
promtool=${PROMTOOL:-promtool}
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "promtool not found (install Debian's prometheus package): skipped"
  exit 77
fi
"$promtool" check rules qforge-rules.yml
"$promtool" test rules tests/*.yml
