#!/usr/bin/env bash
# bench_model before (d472731, build-before/bench_model) and after (the plan, build/bench_model),
# alternating twice, same arguments; raw output and --json per run.
set -u
cd /work/wt-h17
args="--threads 2 --targets both --steps 16"
for r in 1 2; do
  for which in before after; do
    bin=build/bench_model; [ $which = before ] && bin=/tmp/h17-bench_model-before
    echo "== $which run $r: $bin $args ($(date -u +%H:%M:%SZ))"
    nice -n 10 $bin $args --json bench/results/bench_model-plan-20261202T155313Z/$which-r$r.json > bench/results/bench_model-plan-20261202T155313Z/$which-r$r.txt 2>&1
    echo "rc $?"
  done
done
