#!/usr/bin/env bash
# bench_model before the per-step plan (d472731, built as /tmp/h17-bench_model-before) and after
# (main at 6ef078d: plan + this session's kernel changes), alternating, quiet machine.
args="--threads 2 --targets both --steps 16"
for r in 1 2; do for which in before after; do
  bin=build/bench_model; [ $which = before ] && bin=/tmp/h17-bench_model-before
  echo "== $which r$r"; $bin $args > bench/results/bench_model-plan-quiet-20261202T171408Z/$which-r$r.txt 2>&1
done; done
