#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine (as root): installs dependencies, fetches the
# default model, builds (Release and ASan+UBSan), runs every ctest and the Python server tests.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/install_deps.sh
scripts/fetch_model.sh >/dev/null
echo "== build (Release)"
scripts/build.sh "$here/build"
echo "== unit, golden and model tests"
ctest --test-dir build --output-on-failure -j 2 --timeout 1200
echo "== sanitizer build (ASan + UBSan)"
DS_BUILD_TYPE=Debug scripts/build.sh "$here/build-asan" -DDS_SANITIZE=ON
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j 2 --timeout 2400 -LE slow
echo "== fuzz targets (libFuzzer): replay the committed corpus, then ${DS_FUZZ_SECONDS:=20} s each"
CC=clang scripts/build.sh "$here/build-fuzz" -DDS_FUZZ=ON -DDS_CUDA=OFF >/dev/null
for f in build-fuzz/fuzz/fuzz_*; do
  name=$(basename "$f")
  work=$(mktemp -d)
  "$f" -runs=0 "tests/fuzz/corpus/$name" >/dev/null 2>&1 || { echo "corpus replay failed: $name"; exit 1; }
  opts=() # per-target flags, as bench/fuzz_long.sh uses them
  [ -f "tests/fuzz/options/$name" ] && mapfile -t opts <"tests/fuzz/options/$name"
  "$f" -max_total_time="$DS_FUZZ_SECONDS" -print_final_stats=0 "${opts[@]}" "$work" "tests/fuzz/corpus/$name" 2>&1 | tail -n 1
  rm -rf "$work"
done
if ls tests/server/test_*.py >/dev/null 2>&1; then
  echo "== server tests (real binary, openai client)"
  DS_BINARY="$here/build/deltaserve" .venv/bin/python -m pytest -q tests/server
fi
echo "== all tests passed"
