#!/usr/bin/env bash
# Long libFuzzer runs, one target at a time, recorded under bench/results/fuzz-<stamp>/:
#   bench/fuzz_long.sh [target ...]        (default: every build-fuzz/fuzz/fuzz_* binary)
# Env: FUZZ_RUNS (default 10000000 executions), FUZZ_MAX_S (per-target wall cap, default 3600),
#      FUZZ_OUT (results dir; reuse one to add targets to the same record), BUILD (default build-fuzz).
# Each run mutates into a scratch corpus (first dir) seeded from the committed corpus (second dir,
# never written). A crash leaves its input in the results dir (crash-*) and a non-zero rc in meta.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
build=${BUILD:-build-fuzz}
runs=${FUZZ_RUNS:-10000000}
max_s=${FUZZ_MAX_S:-3600}
out=${FUZZ_OUT:-bench/results/fuzz-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include tests/fuzz || echo -dirty)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && for f in "$build"/fuzz/fuzz_*; do targets+=("$(basename "$f")"); done
for name in "${targets[@]}"; do
  bin="$build/fuzz/$name"
  [ -x "$bin" ] || { echo "no $bin" >&2; continue; }
  work=$(mktemp -d)
  start=$(date +%s)
  opts=() # per-target libFuzzer flags (tests/fuzz/options/<target>, one a line), as scripts/test.sh uses them
  [ -f "tests/fuzz/options/$name" ] && mapfile -t opts <"tests/fuzz/options/$name"
  "$bin" -runs="$runs" -max_total_time="$max_s" -print_final_stats=1 -artifact_prefix="$out/$name-" "${opts[@]}" \
    "$work" "tests/fuzz/corpus/$name" >"$out/$name.full" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  tail -n 40 "$out/$name.full" >"$out/$name.tail"
  rm -f "$out/$name.full"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$name.tail" | tail -n 1)
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/$name.tail" | tail -n 1)
  corpus=$(ls "$work" | wc -l)
  rm -rf "$work"
  printf '{"target":"%s","commit":"%s","started":"%s","rc":%d,"executions":%s,"exec_per_s":%s,"wall_s":%d,"runs_asked":%s,"max_s":%s,"nice":%d,"options":"%s","new_corpus_files":%d}\n' \
    "$name" "$commit" "$(date -u -d "@$start" +%Y-%m-%dT%H:%M:%SZ)" "$rc" "${execs:-null}" "${eps:-null}" "$secs" "$runs" \
    "$max_s" "$(nice)" "${opts[*]}" "$corpus" >>"$out/runs.jsonl"
  echo "$name rc=$rc execs=${execs:-?} exec/s=${eps:-?} ${secs}s"
done
# meta.json: the machine and commit, and one entry per run (each run names the commit it was built
# from; several invocations may share one FUZZ_OUT).
{
  printf '{"commit":"%s","host_cpus":%d,"clang":"%s","runs":[' "$(git rev-parse --short HEAD)" "$(nproc)" \
    "$(clang --version | head -n 1)"
  paste -sd, "$out/runs.jsonl"
  printf ']}\n'
} >"$out/meta.json"
