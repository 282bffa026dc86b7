#!/usr/bin/env bash
# Configures and builds deltaserve into build/ (or $1). Extra args go to cmake.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here/build}
shift || true
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
if [ ! -f "$dir/CMakeCache.txt" ]; then
  cmake -S "$here" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=${DS_BUILD_TYPE:-Release} "$@"
fi
cmake --build "$dir" -j "$(nproc)"
