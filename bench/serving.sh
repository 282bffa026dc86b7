#!/usr/bin/env bash
# Serving benchmark: deltaserve on the default model with N random rank-R LoRA adapters (q,k,v,o),
# driven by ds-bench with zipf popularity at several request rates, plus a base-only run at the
# same rates — all in one invocation, so the ratios are side by side. Raw JSON and the terminal
# reports go to bench/results/serving-<date>/ with a meta.json (machine, commit, command).
#
#   bench/serving.sh [--adapters 16] [--rank 16] [--rates "0.5 1 2"] [--num-prompts 40]
#                    [--input-len 64] [--output-len 32] [--port 8123] [--build build]
#
#   --build DIR   the deltaserve build whose server is measured (default build); the load generator
#                 is always build/ds-bench, so two builds (before/after a change) are driven alike
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
adapters=16 rank=16 rates="0.5 1 2" num=40 in_len=64 out_len=32 port=8123 build=build
while [ $# -gt 0 ]; do
  case "$1" in
    --adapters) adapters=$2; shift 2 ;; --rank) rank=$2; shift 2 ;; --rates) rates=$2; shift 2 ;;
    --num-prompts) num=$2; shift 2 ;; --input-len) in_len=$2; shift 2 ;; --output-len) out_len=$2; shift 2 ;;
    --port) port=$2; shift 2 ;; --build) build=$2; shift 2 ;; *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
out="bench/results/serving-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
adir=$(mktemp -d)
trap 'kill $srv 2>/dev/null || true; rm -rf "$adir"' EXIT
"$py" - "$adir" "$adapters" "$rank" <<'PY'
import sys, pathlib
sys.path.insert(0, "tests/server")
import peft_gen
root, n, r = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    peft_gen.make_lora(root / f"lora-{i}", seed=1000 + i, rank=r, alpha=2 * r,
                       targets=("q_proj", "k_proj", "v_proj", "o_proj"))
PY
"$build/deltaserve" serve --port "$port" --adapter-dir "$adir" --max-adapters "$adapters" > "$out/server.log" 2>&1 &
srv=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 1; done
cat > "$out/meta.json" <<EOF2
{"commit": "$(git -C "$build/.." rev-parse HEAD 2>/dev/null || git rev-parse HEAD)", "server_build": "$build", "date": "$(date -u +%FT%TZ)", "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)",
 "cores": $(nproc), "backend": "cpu", "model": "SmolLM2-135M-Instruct Q4_1", "weights": "$(sed -n 's/.*model weights \(.*\), KV cache.*/\1/p' "$out/server.log" | head -1)",
 "adapters": $adapters, "rank": $rank, "targets": "q,k,v,o", "rates": "$rates", "num_prompts": $num,
 "input_len": $in_len, "output_len": $out_len,
 "command": "bench/serving.sh --adapters $adapters --rank $rank --rates '$rates' --num-prompts $num --input-len $in_len --output-len $out_len --build $build"}
EOF2
common=(--url "http://127.0.0.1:$port" --num-prompts "$num" --input-len "$in_len" --output-len "$out_len"
        --ignore-eos --seed 1 --no-progress)
for rate in $rates; do
  echo "== rate $rate: $adapters adapters, zipf:1.0"
  build/ds-bench "${common[@]}" --request-rate "$rate" --adapters "$adapters" --adapter-pattern 'lora-{i}' \
    --adapter-dist zipf:1.0 --json "$out/lora-rate$rate.json" | tee "$out/lora-rate$rate.txt"
  echo "== rate $rate: base model only"
  build/ds-bench "${common[@]}" --request-rate "$rate" --json "$out/base-rate$rate.json" | tee "$out/base-rate$rate.txt"
done
curl -s "http://127.0.0.1:$port/metrics" > "$out/metrics.txt"
echo "results in $out"
