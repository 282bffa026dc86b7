#!/usr/bin/env bash
# A third pair, before then after, same arguments, under /usr/bin/time: both binaries do the same
# work, so their CPU seconds are a second (also noisy, but less preemption-bound) comparison.
set -u
cd /work/wt-h17
args="--threads 2 --targets both --steps 16"
for which in before after; do
  bin=build/bench_model; [ $which = before ] && bin=/tmp/h17-bench_model-before
  echo "== $which run 3: $bin $args ($(date -u +%H:%M:%SZ))"
  nice -n 10 /usr/bin/time -f "time: %U s user, %S s sys, %e s wall" $bin $args --json bench/results/bench_model-plan-20261202T155313Z/$which-r3.json > bench/results/bench_model-plan-20261202T155313Z/$which-r3.txt 2>&1
  echo "rc $?"
done
