#!/usr/bin/env bash
# Runs build/bench_model on the default model and stores its raw output with the machine, commit
# and command under bench/results/model-<date>/.
#   bench/model_bench.sh [bench_model options, e.g. --steps 32 --rank 16 --backend cpu]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out="bench/results/model-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
cat > "$out/meta.json" <<EOF2
{"commit": "$(git rev-parse HEAD)", "date": "$(date -u +%FT%TZ)",
 "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)", "cores": $(nproc),
 "load_before": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "command": "build/bench_model --json $out/bench_model.json $*"}
EOF2
build/bench_model --json "$out/bench_model.json" "$@" 2>&1 | grep -v ' INFO ' | tee "$out/bench_model.txt"
echo "results in $out"
