#!/usr/bin/env bash
# Issue 15, server level: deltaserve against llama.cpp's llama-server on the same GGUF, one server at
# a time, both driven by ds-bench over /v1/completions with the same synthetic prompts:
#   single  one client (closed loop): mean TPOT
#   base8   8 clients (closed loop), base model: output tokens/s
#   lora8   8 clients over 8 random rank-16 LoRA adapters (q,k,v,o; round-robin): output tokens/s
# plus the server's VmRSS after start and VmHWM at the end (/proc/PID/status). Two rounds by
# default; the order of the servers alternates between rounds.
#
#   bench/peer/serving_peer.sh [--model models/peer/llama-1b-rand-Q4_K_M.gguf] [--lora-base DIR]
#       [--rounds 2] [--single-prompts 8] [--num-prompts 32] [--input-len 128] [--output-len 64]
#       [-t 2] [--port 8131] [--build build] [--out DIR] [--no-lora] [--only llamacpp|deltaserve]
#       [--ds-args "ARGS"]
#
#   --lora-base   Hugging Face config directory of the base (config.json), for the adapters' shapes
#                 and convert_lora_to_gguf.py; default .peer/work/hf-1b-config (make_models.sh)
#   --out         default bench/results/serving-peer-<UTC stamp>
#   --ds-args     extra arguments for `deltaserve serve`, e.g. "--int8-activations --kv-cache-mb 64"
#
# Adapters: bench/peer/make_models.py lora writes 8 PEFT directories, llama.cpp's
# convert_lora_to_gguf.py turns them into GGUF LoRA files; both servers load the same GGUF files
# (deltaserve: --adapter-dir, ids lora-0..7 in `model`; llama-server: --lora-scaled F0:0,...,F7:0,
# selected per request by `"lora": [{"id": i, "scale": 1.0}]`).
# llama-server gets 8 slots (-np 8) and a context of 8 x (input + output + 64) tokens.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
model=models/peer/llama-1b-rand-Q4_K_M.gguf lora_base=.peer/work/hf-1b-config rounds=2 single=8 num=32
in_len=128 out_len=64 t=2 port=8131 build=build out="" lora=1 only="" ds_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model|-m) model=$2; shift 2 ;; --lora-base) lora_base=$2; shift 2 ;; --rounds) rounds=$2; shift 2 ;;
    --single-prompts) single=$2; shift 2 ;; --num-prompts) num=$2; shift 2 ;;
    --input-len) in_len=$2; shift 2 ;; --output-len) out_len=$2; shift 2 ;; -t) t=$2; shift 2 ;;
    --port) port=$2; shift 2 ;; --build) build=$2; shift 2 ;; --out) out=$2; shift 2 ;;
    --no-lora) lora=0; shift ;; --only) only=$2; shift 2 ;; --ds-args) ds_args=$2; shift 2 ;;
    -h|--help) sed -n 2,27p "$0"; exit 0 ;; *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
peer=$root/.peer
py=$peer/venv/bin/python
src=$peer/src/llama.cpp
[ -x "$peer/bin/llama-server" ] || bench/peer/build_llamacpp.sh
[ -f "$model" ] || { echo "$model is missing: bench/peer/make_models.sh" >&2; exit 1; }
nice -n 10 cmake --build "$build" --target deltaserve ds-bench -j2
out=${out:-bench/results/serving-peer-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
stem=$(basename "$model" .gguf)

# ---- adapters (cached per base config) ----
ldir=""
if [ $lora = 1 ]; then
  [ -f "$lora_base/config.json" ] || { echo "$lora_base/config.json is missing (make_models.sh keeps it)" >&2; exit 1; }
  ldir=$peer/work/lora-gguf-$(basename "$lora_base")
  if [ ! -f "$ldir/lora-7.gguf" ]; then
    pdir=$peer/work/lora-peft-$(basename "$lora_base")
    rm -rf "$pdir" "$ldir" && mkdir -p "$ldir"
    nice -n 10 "$py" bench/peer/make_models.py lora --base "$lora_base" --out "$pdir" --n 8 --rank 16
    for i in $(seq 0 7); do
      nice -n 10 "$py" "$src/convert_lora_to_gguf.py" "$pdir/lora-$i" --base "$lora_base" --outtype f16 \
        --outfile "$ldir/lora-$i.gguf" > "$ldir/convert-$i.log" 2>&1 || { cat "$ldir/convert-$i.log" >&2; exit 1; }
    done
    rm -rf "$pdir"
  fi
fi

cat > "$out/meta.json" <<EOF
{"commit": "$(git rev-parse HEAD)", "llamacpp": "$(cat "$peer/VERSION" 2>/dev/null || echo unknown)",
 "date": "$(date -u +%FT%TZ)", "cpu": "$(lscpu | sed -n 's/^Model name: *//p' | head -1)", "cores": $(nproc),
 "threads": $t, "model": "$model", "lora": $lora, "rounds": $rounds, "single_prompts": $single, "num_prompts": $num,
 "input_len": $in_len, "output_len": $out_len,
 "command": "bench/peer/serving_peer.sh --model $model --rounds $rounds --single-prompts $single --num-prompts $num --input-len $in_len --output-len $out_len -t $t$([ $lora = 0 ] && echo ' --no-lora')${ds_args:+ --ds-args '$ds_args'}"}
EOF

srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; true' EXIT

# "VmRSS VmHWM" in kB
mem() { awk '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2} END {print r, h}' "/proc/$1/status" 2>/dev/null; }

start() { # server round
  local which=$1 log=$out/$1-r$2.server.log
  if [ "$which" = deltaserve ]; then
    "$build/deltaserve" serve -m "$model" --port "$port" -t "$t" ${ldir:+--adapter-dir "$ldir" --max-adapters 8} \
      --max-seqs 8 $ds_args > "$log" 2>&1 &
  else
    # All 8 in one comma-separated list (a repeated --lora keeps only the last file), ids 0..7 =
    # lora-0..7, each at scale 0: a request without a "lora" field runs on the slot's default
    # scales (--lora-init-without-apply leaves those at 1, i.e. every adapter on every base
    # request), and a request's "lora" list sets the scales of the ones it names.
    local loras=(); if [ -n "$ldir" ]; then
      loras=(--lora-scaled "$(printf "$ldir/lora-%d.gguf:0.0," 0 1 2 3 4 5 6 7 | sed 's/,$//')"); fi
    "$peer/bin/llama-server" -m "$model" -t "$t" --port "$port" -np 8 -c $((8 * (in_len + out_len + 64))) \
      "${loras[@]}" > "$log" 2>&1 &
  fi
  srv=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 && return 0
    kill -0 $srv 2>/dev/null || { echo "$which exited; see $log" >&2; tail -5 "$log" >&2; return 1; }
    sleep 0.5
  done
  echo "$which did not become healthy; see $log" >&2; return 1
}

stop() { kill -TERM $srv 2>/dev/null || true; wait $srv 2>/dev/null || true; srv=""; }

bench_run() { # server round scenario args...
  local which=$1 rnd=$2 sc=$3; shift 3
  echo "== round $rnd, $which, $sc"
  "$build/ds-bench" --url "http://127.0.0.1:$port" --model "$stem" --input-len "$in_len" --output-len "$out_len" \
    --ignore-eos --seed "$rnd" --no-progress --request-rate inf "$@" --json "$out/$which-r$rnd-$sc.json" \
    > "$out/$which-r$rnd-$sc.txt" 2>&1 || echo "ds-bench failed ($which $sc)" >&2
  grep -E 'Successful|Failed|Output token throughput|Mean TPOT' "$out/$which-r$rnd-$sc.txt" | sed 's/^/   /' || true
}

for rnd in $(seq 1 "$rounds"); do
  order="llamacpp deltaserve"; [ $((rnd % 2)) = 0 ] && order="deltaserve llamacpp"
  [ -n "$only" ] && order=$only
  for which in $order; do
    start "$which" "$rnd" || continue
    sleep 1
    start_rss=$(mem $srv | cut -d' ' -f1)
    # what each server says it loaded (adapter ids), for the record
    if [ "$which" = llamacpp ]; then curl -s "http://127.0.0.1:$port/lora-adapters" > "$out/$which-r$rnd.adapters.json" || true
    else curl -s "http://127.0.0.1:$port/v1/models" > "$out/$which-r$rnd.adapters.json" || true; fi
    bench_run "$which" "$rnd" single --max-concurrency 1 --num-prompts "$single"
    bench_run "$which" "$rnd" base8 --max-concurrency 8 --num-prompts "$num"
    if [ -n "$ldir" ]; then
      if [ "$which" = deltaserve ]; then
        bench_run "$which" "$rnd" lora8 --max-concurrency 8 --num-prompts "$num" --adapters 8 \
          --adapter-pattern 'lora-{i}' --adapter-dist round-robin
      else
        bench_run "$which" "$rnd" lora8 --max-concurrency 8 --num-prompts "$num" --adapters 8 \
          --adapter-pattern 'lora-{i}' --adapter-dist round-robin \
          --adapter-field lora --adapter-value '[{"id":{i},"scale":1.0}]'
      fi
    fi
    # VmRSS after start, VmHWM (peak) at the end
    echo "$start_rss $(mem $srv | cut -d' ' -f2)" > "$out/$which-r$rnd.rss"
    stop
  done
done
"$py" bench/peer/summarize.py "$out" | tee "$out/summary.md"
echo "results in $out"
