#!/usr/bin/env bash
# Co-serving benchmark: inference throughput and latency (ds-bench, 8 LoRA adapters, Poisson at
# --rate) without and then with a LoRA fine-tuning job running in the same server, side by side
# in one invocation, plus the job's training tokens/s. Results under bench/results/coserve-<date>/.
#   bench/train_coserve.sh [--rate 2] [--num-prompts 30] [--train-batch 4] [--train-budget 0.25] [--port 8125]
# Training steps run on the engine thread between inference steps (--train-budget share of its
# time while requests run), so one optimizer step bounds the worst inter-token gap.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
rate=2 num=30 port=8125 tbatch=4 budget=0.25
while [ $# -gt 0 ]; do
  case "$1" in --rate) rate=$2; shift 2 ;; --train-batch) tbatch=$2; shift 2 ;; --train-budget) budget=$2; shift 2 ;; --num-prompts) num=$2; shift 2 ;; --port) port=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;; esac
done
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
out="bench/results/coserve-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
adir=$(mktemp -d)
trap 'kill $srv 2>/dev/null || true; rm -rf "$adir"' EXIT
"$py" - "$adir" <<'PY'
import sys, pathlib, json
sys.path.insert(0, "tests/server")
import peft_gen
root = pathlib.Path(sys.argv[1])
for i in range(8):
    peft_gen.make_lora(root / f"lora-{i}", seed=2000 + i, rank=8, alpha=16)
# training data: 48 chat examples of a made-up task (tiny, so the job loops over epochs)
with open(root / "train.jsonl", "w") as f:
    for i in range(48):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Code word number {i}?"},
                                         {"role": "assistant", "content": f"The code word {i} is Zanzibar-{i * 7 % 97}."}]}) + "\n")
PY
build/deltaserve serve --port "$port" --adapter-dir "$adir" --train-budget "$budget" > "$out/server.log" 2>&1 &
srv=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 1; done
url="http://127.0.0.1:$port"
bench=(build/ds-bench --url "$url" --num-prompts "$num" --input-len 64 --output-len 32 --ignore-eos --seed 3
       --no-progress --request-rate "$rate" --adapters 8 --adapter-pattern 'lora-{i}' --adapter-dist uniform)
echo "== inference alone"
"${bench[@]}" --json "$out/infer-alone.json" | tee "$out/infer-alone.txt"
file_id=$(curl -s "$url/v1/files" -H 'Content-Type: application/json' \
  -d "$("$py" -c 'import json,sys; print(json.dumps({"filename":"train.jsonl","purpose":"fine-tune","content":open(sys.argv[1]).read()}))' "$adir/train.jsonl")" \
  | "$py" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
job=$(curl -s "$url/v1/fine_tuning/jobs" -H 'Content-Type: application/json' \
  -d "{\"model\":\"base\",\"training_file\":\"$file_id\",\"suffix\":\"coserve\",\"method\":{\"type\":\"lora\",\"lora\":{\"hyperparameters\":{\"n_epochs\":50,\"batch_size\":$tbatch,\"rank\":8}}}}")
job_id=$(echo "$job" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
sleep 3
echo "== inference while job $job_id trains"
"${bench[@]}" --json "$out/infer-with-job.json" | tee "$out/infer-with-job.txt"
curl -s "$url/v1/fine_tuning/jobs/$job_id" > "$out/job.json"
curl -s -X POST "$url/v1/fine_tuning/jobs/$job_id/cancel" > /dev/null
curl -s "$url/v1/fine_tuning/jobs/$job_id/events?limit=200" > "$out/job-events.json"
cat > "$out/meta.json" <<EOF2
{"commit": "$(git rev-parse HEAD)", "date": "$(date -u +%FT%TZ)", "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)",
 "cores": $(nproc), "backend": "cpu", "model": "SmolLM2-135M-Instruct Q4_1 (fp32 at run time)",
 "inference": "8 LoRA r8 q,v adapters, uniform, Poisson rate $rate, $num prompts, in 64 / out 32",
 "training": "LoRA r8 (q,v default targets), batch $tbatch, 48 chat examples, on the engine thread with --train-budget $budget",
 "command": "bench/train_coserve.sh --rate $rate --num-prompts $num --train-batch $tbatch --train-budget $budget"}
EOF2
"$py" - "$out" <<'PY'
import json, sys
d = sys.argv[1]
a, b, j = (json.load(open(f"{d}/{n}.json")) for n in ("infer-alone", "infer-with-job", "job"))
print(f"training: {j.get('tokens_per_second')} tokens/s, {j.get('trained_tokens')} tokens so far, status {j.get('status')}")
for name, r in (("alone", a), ("with job", b)):
    print(f"inference {name:9s}: {r['output_throughput']:.1f} out tok/s, p99 ITL {r['p99_itl_ms']:.0f} ms, "
          f"mean TPOT {r['mean_tpot_ms']:.0f} ms, mean TTFT {r['mean_ttft_ms']:.0f} ms, failed {r['failed']}")
PY
echo "results in $out"
