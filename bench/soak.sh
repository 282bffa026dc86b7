#!/usr/bin/env bash
# Soak (issue 14): one server under adapter churn + fine-tuning jobs + mixed clients for
# SOAK_SECONDS (default 900 = 15 min), then its summary under bench/results/soak-<stamp>/:
# requests, statuses, non-2xx by status, unexpected 5xx, RSS start/middle/end, gauges after.
#   bench/soak.sh                         # Release build/deltaserve
#   BIN=build-asan/deltaserve bench/soak.sh   # ASan build (slower; leaks reported in server.log)
#   SOAK_SECONDS=60 bench/soak.sh         # a dry run
# Env: BIN, MODEL, SOAK_SECONDS, SOAK_CLIENTS (6), THREADS (server threads, 2), OUT, PYTHON.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bin=${BIN:-build/deltaserve}
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
secs=${SOAK_SECONDS:-900}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
out=${OUT:-bench/results/soak-$(date -u +%Y%m%dT%H%MZ)}
mkdir -p "$out"
work=$(mktemp -d)
pid=
trap 'set +e; [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT # set +e: see bench/train_coserve.sh
adir="$work/adapters"
mkdir -p "$adir/pool"
# 4 adapters served throughout (found by the start-up scan) and 8 more under pool/ to churn
"$py" - "$adir" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests/server")
from peft_gen import make_lora
d = Path(sys.argv[1])
for i in range(4):
    make_lora(d / f"stable{i}", seed=100 + i)
for i in range(8):
    make_lora(d / "pool" / f"p{i}", seed=200 + i, rank=4 + 4 * (i % 3))
PY
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" serve -m "$model" --port "$port" --threads "${THREADS:-2}" --adapter-dir "$adir" \
  --served-model-name smollm2 --adapter-budget-mb 64 >"$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  curl -sf "localhost:$port/health" >/dev/null 2>&1 && break
  kill -0 "$pid" || { echo "server died:"; tail -n 20 "$out/server.log"; exit 1; }
  sleep 1
done
pool=$(ls -d "$adir"/pool/p* | sed "s|$adir/||" | paste -sd,)
"$py" bench/soak/soak.py --port "$port" --pid "$pid" --seconds "$secs" --clients "${SOAK_CLIENTS:-6}" \
  --pool "$pool" --stable stable0,stable1,stable2,stable3 --out "$out/summary.json"
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
echo "server exit status after SIGTERM: $rc" | tee -a "$out/server.log"
{
  echo "{\"commit\":\"$(git rev-parse --short HEAD)\",\"binary\":\"$bin\",\"seconds\":$secs,"
  echo "\"cpus\":$(nproc),\"server_exit\":$rc,\"date\":\"$(date -u +%FT%TZ)\"}"
} >"$out/meta.json"
tail -n 200 "$out/server.log" >"$out/server-tail.log" && rm "$out/server.log"
echo "summary: $out/summary.json"
