#!/usr/bin/env bash
# Byte-for-byte check of qforge's ggml encoders against ggml's reference quantizers (quantize_row_*_ref,
# quantize_iq4_nl / _xs without importance weights), without building llama.cpp: compiles ggml's ggml-quants.c
# from a ggml source tree with two stubs (scripts/interop/ggml_stubs.c), links it beside qforge's libraries into
# scripts/interop/ggml_reference_compare.cc and compares every block of 400 varied rows, then runs the negative
# control (one input changed on qforge's side must show). Not part of CI.
# Usage:
#   scripts/check-ggml-reference.sh [GGML_DIR]   (a ggml tree with src/ggml-quants.c and include/ggml.h; default
#                                                 ~/.cache/qforge/peer-llama.cpp/src/ggml, llama.cpp's copy)
# Environment: GGML_CFLAGS (default -O2: how llama.cpp builds ggml-base, x86-64 baseline, so no FMA contraction;
# try "-O3 -march=native" to see what contracted multiply-adds change). Needs build/ (ninja -C build qforge_quant).
set -uo pipefail
cd "$(dirname "$0")/.."
ggml=${1:-$HOME/.cache/qforge/peer-llama.cpp/src/ggml}
[ -f "$ggml/src/ggml-quants.c" ] || { echo "no $ggml/src/ggml-quants.c" >&2; exit 2; }
b=build
for lib in core/quant/libqforge_quant.a core/kernels/libqforge_kernels.a core/model/libqforge_model.a core/base/libqforge_base.a; do
  [ -f "$b/$lib" ] || { echo "no $b/$lib (build qforge first)" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086
gcc ${GGML_CFLAGS:--O2} -std=gnu11 -c -I"$ggml/include" -I"$ggml/src" "$ggml/src/ggml-quants.c" -o "$work/quants.o" || exit 1
gcc -O2 -c scripts/interop/ggml_stubs.c -o "$work/stubs.o" || exit 1
g++ -O2 -std=c++20 -I. scripts/interop/ggml_reference_compare.cc "$work/quants.o" "$work/stubs.o" \
  "$b/core/quant/libqforge_quant.a" "$b/core/kernels/libqforge_kernels.a" "$b/core/model/libqforge_model.a" \
  "$b/core/base/libqforge_base.a" $(pkg-config --libs absl_status absl_statusor absl_strings absl_str_format) \
  -lm -pthread -o "$work/compare" 2>"$work/link.log" || { cat "$work/link.log" >&2; exit 1; }
echo "qforge against ggml's reference ($ggml, ${GGML_CFLAGS:--O2}):"
"$work/compare"
status=$?
if "$work/compare" --perturb >/dev/null; then
  echo "negative control FAILED: a changed input went unnoticed" >&2
  exit 1
fi
echo "negative control: a changed input shows (as it must)"
exit $status
