#!/usr/bin/env bash
# More pairs (DS_RUNS, default 1..5), interleaved, on a smaller configuration (16 adapters on q,k,v,o only, 8 decode
# steps) so that each run is short and both binaries meet the same background load; the summary
# takes the best of them per binary and figure (the run least disturbed by other processes).
set -u
cd /work/wt-h17
args="--threads 2 --adapters 16 --targets qkvo --steps 8"
for r in ${DS_RUNS:-1 2 3 4 5}; do
  for which in before after; do
    bin=build/bench_model; [ $which = before ] && bin=/tmp/h17-bench_model-before
    echo "== $which small run $r: $bin $args ($(date -u +%H:%M:%SZ))"
    nice -n 10 $bin $args > bench/results/bench_model-plan-20261202T155313Z/$which-small-r$r.txt 2>&1
    echo "rc $?"
  done
done
