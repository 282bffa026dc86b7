#!/usr/bin/env bash
# Issue 15: single-stream decode, deltaserve against llama.cpp on one GGUF, in alternating pairs.
# On a shared VM one run of each (bench/peer/quant_bench.sh) can land in different minutes of the
# host's load; here each pair runs llama-bench tgN then bench_pp_tg tgN back to back (the order
# flips every pair), so every ratio compares two neighbouring runs, and the spread of the ratios
# over many pairs says how far one run can be trusted.
#
#   bench/peer/decode_pairs.sh [--model FILE] [--pairs 10] [-n 64] [-t 2] [-d 0] [--int8] [--out DIR]
#
#   --model   default models/peer/llama-1b-rand-Q4_K_M.gguf (bench/peer/make_models.sh)
#   -d        context already in the cache (llama-bench -d, bench_pp_tg -d)
#   --int8    deltaserve with --int8-activations (llama.cpp's numerics) instead of exact fp32
# Raw outputs under DIR (default bench/results/decode-pairs-<UTC stamp>): pairs.tsv (pair, order,
# llama.cpp tok/s, deltaserve tok/s, ratio), meta.json, summary.md (median, min, max of the ratios).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
model=models/peer/llama-1b-rand-Q4_K_M.gguf pairs=10 n=64 t=2 d=0 int8=0 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;; --pairs) pairs=$2; shift 2 ;; -n) n=$2; shift 2 ;; -t) t=$2; shift 2 ;;
    -d) d=$2; shift 2 ;; --int8) int8=1; shift ;; --out) out=$2; shift 2 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;; *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
peer=$root/.peer
[ -f "$model" ] || { echo "$model is missing: bench/peer/make_models.sh" >&2; exit 1; }
[ -x "$peer/bin/llama-bench" ] || bench/peer/build_llamacpp.sh
[ -f build/build.ninja ] || [ -f build/Makefile ] || cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
nice -n 10 cmake --build build --target bench_pp_tg -j2
out=${out:-bench/results/decode-pairs-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
ds_args=(-m "$model" -p 0 -n "$n" -d "$d" -t "$t" -r 1)
[ "$int8" = 1 ] && ds_args+=(--int8-activations)
cmd="bench/peer/decode_pairs.sh --model $model --pairs $pairs -n $n -t $t -d $d$([ "$int8" = 1 ] && echo ' --int8' || true)"
cat > "$out/meta.json" <<EOF
{"commit": "$(git rev-parse HEAD)", "dirty": $([ -z "$(git status --porcelain -- src include)" ] && echo false || echo true),
 "llamacpp": "$(cat "$peer/VERSION" 2>/dev/null || echo unknown)", "date": "$(date -u +%FT%TZ)",
 "cpu": "$(lscpu | sed -n 's/^Model name: *//p' | head -1)", "cores": $(nproc),
 "load_before": "$(cut -d' ' -f1-3 /proc/loadavg)", "model": "$model", "threads": $t, "n_gen": $n, "depth": $d,
 "deltaserve_activations": "$([ "$int8" = 1 ] && echo int8 || echo 'fp32 (exact)')", "command": "$cmd"}
EOF
llama() { "$peer/bin/llama-bench" -m "$model" -p 0 -n "$n" -d "$d" -t "$t" -r 1 -o json 2>>"$out/llamacpp.log" |
  "$py" -c 'import json,sys; print("%.3f" % json.load(sys.stdin)[0]["avg_ts"])'; }
ds() { build/bench_pp_tg "${ds_args[@]}" 2>>"$out/deltaserve.log" |
  "$py" -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["tg_tps"])'; }
printf 'pair\torder\tllamacpp_tps\tdeltaserve_tps\tratio\n' > "$out/pairs.tsv"
for i in $(seq 1 "$pairs"); do
  if [ $((i % 2)) = 1 ]; then a=$(llama); b=$(ds); order=llama-first; else b=$(ds); a=$(llama); order=ds-first; fi
  r=$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f", b / a}')
  printf '%s\t%s\t%s\t%s\t%s\n' "$i" "$order" "$a" "$b" "$r" | tee -a "$out/pairs.tsv"
done
"$py" - "$out" <<'PY' | tee "$out/summary.md"
import json, statistics, sys
d = sys.argv[1]
meta = json.load(open(f"{d}/meta.json"))
rows = [l.split("\t") for l in open(f"{d}/pairs.tsv").read().split("\n")[1:] if l]
a = [float(r[2]) for r in rows]; b = [float(r[3]) for r in rows]; q = [float(r[4]) for r in rows]
print(f"### {d.rstrip('/').split('/')[-1]}\n")
print(f"{meta['model']}, tg{meta['n_gen']} at depth {meta['depth']}, {meta['threads']} threads, deltaserve "
      f"{meta['deltaserve_activations']}, {len(q)} alternating pairs; commit {meta['commit'][:10]}\n")
print("| | llama.cpp tok/s | deltaserve tok/s | ratio ds / llama.cpp |")
print("|---|---:|---:|---:|")
for name, f in (("median", statistics.median), ("min", min), ("max", max)):
    print(f"| {name} | {f(a):.2f} | {f(b):.2f} | {f(q):.3f} |")
print(f"\npairs with deltaserve ahead: {sum(x >= 1.0 for x in q)} of {len(q)}")
PY
echo "results in $out"
