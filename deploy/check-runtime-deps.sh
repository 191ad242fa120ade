#!/usr/bin/env bash
# Checks deploy/Dockerfile's runtime package list against what the built binaries load: every shared library in
# `ldd` of qforge, qforge-scheduler and qforge-worker must belong (dpkg -S, after resolving symlinks such as the
# libblas.so.3 alternative) to a package the runtime stage installs. Packages listed but not needed are reported.
# Run on Debian 12 after `bash scripts/build.sh`; needs no Docker and installs nothing.
#
#   bash deploy/check-runtime-deps.sh [BUILD_DIR]      (default: build)
# Exit status: 0 covered, 1 a library is not covered or a package is unknown to apt, 2 binaries missing.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
binaries=("$build/services/qforge" "$build/services/qforge-scheduler" "$build/workers/qforge-worker" "$build/services/qforge-server")
for b in "${binaries[@]}"; do
  [ -x "$b" ] || { echo "check-runtime-deps: $b not built (bash scripts/build.sh)" >&2; exit 2; }
done

# The packages after `apt-get install` in the last stage's RUN (continuation lines joined, up to the next `&&`).
listed=$(python3 - deploy/Dockerfile <<'PY'
import re, sys
text = open(sys.argv[1]).read()
lines = [l for l in text.splitlines() if not l.lstrip().startswith("#")]  # Docker drops comment lines
joined = re.sub(r"\\\n", " ", "\n".join(lines))
stage = re.split(r"(?m)^FROM\s", joined)[-1]
for instr in re.findall(r"(?m)^RUN\s+(.*)$", stage):
    m = re.search(r"apt-get install((?:\s+\S+)+?)\s*(?:&&|$)", instr)
    if m:
        print("\n".join(t for t in m.group(1).split() if not t.startswith("-")))
PY
)
[ -n "$listed" ] || { echo "check-runtime-deps: no apt-get install found in the runtime stage" >&2; exit 1; }

status=0
declare -A needed=()
while read -r lib path; do
  real=$(readlink -f "$path")
  pkg=$(dpkg -S "$real" 2>/dev/null | head -1 | cut -d: -f1) || true
  [ -n "$pkg" ] || pkg=$(dpkg -S "$path" 2>/dev/null | head -1 | cut -d: -f1) || true
  if [ -z "$pkg" ]; then
    echo "check-runtime-deps: FAIL: $lib ($real) belongs to no Debian package" >&2
    status=1
    continue
  fi
  needed[$pkg]+=" $lib"
done < <(ldd "${binaries[@]}" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u)
if ldd "${binaries[@]}" | grep -q "not found"; then
  echo "check-runtime-deps: FAIL: unresolved libraries on this machine:" >&2
  ldd "${binaries[@]}" | grep "not found" >&2
  status=1
fi

for pkg in $(printf '%s\n' "${!needed[@]}" | sort); do
  if grep -qx "$pkg" <<<"$listed"; then
    echo "check-runtime-deps: ok   $pkg:${needed[$pkg]}"
  else
    echo "check-runtime-deps: FAIL: $pkg is needed for${needed[$pkg]} but deploy/Dockerfile does not install it" >&2
    status=1
  fi
done
for pkg in $listed; do
  if ! apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1; then
    echo "check-runtime-deps: FAIL: $pkg (deploy/Dockerfile) is not a package apt knows" >&2
    status=1
  elif [ -z "${needed[$pkg]+x}" ]; then
    echo "check-runtime-deps: note: $pkg is installed by deploy/Dockerfile but no binary loads a library from it"
  fi
done
[ $status -eq 0 ] && echo "check-runtime-deps: OK: $(wc -w <<<"$listed") packages cover every library of ${binaries[*]}"
exit $status
