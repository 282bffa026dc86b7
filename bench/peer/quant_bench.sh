#!/usr/bin/env bash
# Issue 15: deltaserve against llama.cpp on the same GGUF files, side by side in one run — prompt
# processing (ppN) and generation (tgN) tokens/s and resident memory. llama.cpp is a benchmark peer
# only (bench/peer/build_llamacpp.sh builds it into .peer/); deltaserve's side is build/bench_pp_tg,
# which measures what llama-bench measures (see bench/model/bench_pp_tg.c).
#
#   bench/peer/quant_bench.sh [-p 512] [-n 128] [-t 2] [-r 2] [--neighbour] [--models "A.gguf B.gguf"]
#                             [--build DIR] [--out DIR] [--int8]
#
#   --neighbour   also run everything again while bench/peer/memstream.c (one thread copying 1 GiB)
#                 runs beside it, and report both conditions
#   --models      default: models/SmolLM2-135M-Instruct.Q4_1.gguf and models/peer/llama-1b-rand-
#                 {Q4_K_M,Q8_0}.gguf (bench/peer/make_models.sh); missing files are skipped
#   --build       deltaserve's CMake build directory (default build); bench_pp_tg is built there
#   --out         result directory (default bench/results/quant-<UTC stamp>)
#   --int8        also run deltaserve with --int8-activations (int8-quantised activations, the
#                 numerics llama.cpp uses) right after its exact run: deltaserve8-*.json
#
# Raw outputs: llamacpp-<model>-<cond>.json (llama-bench -o json), deltaserve-<model>-<cond>.json
# (bench_pp_tg), *.time (GNU time: peak RSS of the whole process), memstream-*.txt, meta.json.
# bench/peer/summarize.py DIR prints the markdown table (run at the end).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
p=512 n=128 t=2 r=2 neighbour=0 int8=0 build=build out="" models=""
while [ $# -gt 0 ]; do
  case "$1" in
    -p) p=$2; shift 2 ;; -n) n=$2; shift 2 ;; -t) t=$2; shift 2 ;; -r) r=$2; shift 2 ;;
    --neighbour|--neighbor) neighbour=1; shift ;; --models) models=$2; shift 2 ;;
    --build) build=$2; shift 2 ;; --out) out=$2; shift 2 ;; --int8) int8=1; shift ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;; *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$models" ] || models="models/SmolLM2-135M-Instruct.Q4_1.gguf models/peer/llama-1b-rand-Q4_K_M.gguf models/peer/llama-1b-rand-Q8_0.gguf"
out=${out:-bench/results/quant-$(date -u +%Y%m%dT%H%M%SZ)}
peer=$root/.peer

[ -x "$peer/bin/llama-bench" ] || bench/peer/build_llamacpp.sh
[ -f "$build/build.ninja" ] || [ -f "$build/Makefile" ] || cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
nice -n 10 cmake --build "$build" --target bench_pp_tg -j2
mkdir -p "$peer/bin"
if [ ! -x "$peer/bin/memstream" ] || [ bench/peer/memstream.c -nt "$peer/bin/memstream" ]; then
  cc -O2 -std=c17 -o "$peer/bin/memstream" bench/peer/memstream.c
fi
# timed FILE CMD...: the process's peak RSS and times into FILE (GNU time; without it, nothing)
timed() {
  local f=$1; shift
  if [ -x /usr/bin/time ]; then /usr/bin/time -f '%M kB max RSS, %e s, %U user, %S sys' -o "$f" "$@"; else "$@"; fi
}

mkdir -p "$out"
cmd="bench/peer/quant_bench.sh -p $p -n $n -t $t -r $r$([ $neighbour = 1 ] && echo ' --neighbour' || true)$([ $int8 = 1 ] && echo ' --int8' || true) --models '$models'"
cat > "$out/meta.json" <<EOF
{"commit": "$(git rev-parse HEAD)", "dirty": $([ -z "$(git status --porcelain -- src include)" ] && echo false || echo true),
 "llamacpp": "$(cat "$peer/VERSION" 2>/dev/null || echo unknown)",
 "date": "$(date -u +%FT%TZ)", "cpu": "$(lscpu | sed -n 's/^Model name: *//p' | head -1)",
 "cores": $(nproc), "mem_total_kb": $(awk '/MemTotal/ {print $2}' /proc/meminfo),
 "load_before": "$(cut -d' ' -f1-3 /proc/loadavg)", "threads": $t, "n_prompt": $p, "n_gen": $n, "reps": $r,
 "build": "$build", "models": "$models", "command": "$cmd"}
EOF
lscpu > "$out/lscpu.txt"

run_one() { # model cond
  local m=$1 cond=$2 stem
  stem=$(basename "$m" .gguf)
  echo "== $stem ($cond): llama-bench"
  timed "$out/llamacpp-$stem-$cond.time" "$peer/bin/llama-bench" -m "$m" -p "$p" -n "$n" -t "$t" -r "$r" -o json \
    > "$out/llamacpp-$stem-$cond.json" 2> "$out/llamacpp-$stem-$cond.log" || echo "llama-bench failed on $m" >&2
  echo "== $stem ($cond): deltaserve bench_pp_tg"
  timed "$out/deltaserve-$stem-$cond.time" "$build/bench_pp_tg" -m "$m" -p "$p" -n "$n" -t "$t" -r "$r" \
    > "$out/deltaserve-$stem-$cond.json" 2> "$out/deltaserve-$stem-$cond.log" || echo "bench_pp_tg failed on $m" >&2
  if [ $int8 = 1 ]; then
    echo "== $stem ($cond): deltaserve bench_pp_tg --int8-activations"
    timed "$out/deltaserve8-$stem-$cond.time" "$build/bench_pp_tg" -m "$m" -p "$p" -n "$n" -t "$t" -r "$r" \
      --int8-activations > "$out/deltaserve8-$stem-$cond.json" 2> "$out/deltaserve8-$stem-$cond.log" ||
      echo "bench_pp_tg --int8-activations failed on $m" >&2
  fi
}

run_all() { # cond
  for m in $models; do
    if [ -f "$m" ]; then run_one "$m" "$1"; else echo "skipping $m (missing; bench/peer/make_models.sh makes the peer models)" >&2; fi
  done
}

run_all quiet
if [ $neighbour = 1 ]; then
  "$peer/bin/memstream" 1024 > "$out/memstream-neighbour.txt" 2>&1 &
  ms=$!
  trap 'kill $ms 2>/dev/null || true' EXIT
  sleep 2
  run_all neighbour
  kill -TERM $ms; wait $ms || true
  trap - EXIT
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/lscpu.txt"
py=python3; [ -x "$peer/venv/bin/python" ] && py=$peer/venv/bin/python
"$py" bench/peer/summarize.py "$out" | tee "$out/summary.md"
echo "results in $out"
