#!/usr/bin/env bash
# One-shot check and measurement of the CUDA backend on a GPU machine, from the kit that
# scripts/gpu_kit.sh packed on a CPU machine (.gpu-kit/kit.tar.xz). Needs no compiler, no network.
#
#   scripts/gpu_check.sh [OUTDIR]        (default: $OUT — the device tool's result folder)
#
# Steps, in order, each under its own timeout and all under one deadline (DS_GPU_CHECK_SECONDS,
# default 450 s, so that a 600 s device call has room for the transfers):
#   info       driver and device (nvidia-smi), kit manifest, commit, command
#   kit        unpack, find libcublasLt.so.13 on this host, every library resolves
#   gpu        a GPU is present (nvidia-smi -L) and the CUDA backend comes up — else stop (exit 3)
#   ops        test_backend_ops cuda, test_backend_bn cuda, test_train_ops cuda (= ctest -L gpu; exit 77
#              here is a failure)
#   golden     test_llama_golden, test_adapter_golden, test_smollm2: every forward on the CPU and
#              on CUDA, CUDA's logits and greedy tokens against the CPU's (tests/unit/parity.h)
#   sgmv       bench_sgmv --shape llama3-8b: LoRA op per projection, rank 8/16/64 × 1/8/64
#              adapters × batch 1…256, beside the byte floor at the measured D2D copy bandwidth
#   model      bench_model --shape llama3-8b: random bf16 Llama-3-8B, batch-1 decode beside the
#              HBM floor; batch-128 decode with 0/1/10/100 rank-16 adapters on q,k,v,o and all 7
#   memcheck   compute-sanitizer --tool memcheck test_backend_ops cuda, then test_train_ops cuda
#              (with what time is left)
#
# Results (at most 8 files, the device tool's limit): log.txt (everything), summary.txt (one line
# per step), info.txt, bench_sgmv.json, bench_model.json. Exit: 0 all passed, 1 a step failed,
# 3 no GPU (stopped before the first GPU-only step), 2 usage or kit problems.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-}}
[ -n "$out" ] || { echo "usage: scripts/gpu_check.sh OUTDIR   (or set \$OUT)" >&2; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
kit_pack=${DS_GPU_KIT:-$here/.gpu-kit}/kit.tar.xz
kit=${DS_GPU_KIT_DIR:-/tmp/ds-gpu-kit}
deadline=$(( $(date +%s) + ${DS_GPU_CHECK_SECONDS:-450} ))
exec > >(tee -a "$out/log.txt") 2>&1
: > "$out/summary.txt"
failed=0

stdbuf=$(command -v stdbuf || true)
say() { printf '\n== %s\n' "$*"; }
note() { printf '%-9s %s\n' "$1" "$2" | tee -a "$out/summary.txt" >/dev/null; printf '>> %s: %s\n' "$1" "$2"; }
left() { echo $(( deadline - $(date +%s) )); }

# run NAME BUDGET_S CMD...: runs under min(budget, time left); prints the output; sets $rc.
run() {
  local name=$1 budget=$2 t
  shift 2
  t=$(left)
  [ "$budget" -lt "$t" ] && t=$budget
  if [ "$t" -lt 10 ]; then rc=125; echo "-- $name: not started, the deadline is near"; return; fi
  printf -- '-- %s (timeout %ss): %s\n' "$name" "$t" "$*"
  local t0=$(date +%s)
  # line-buffered stdout (stdbuf), so that a step killed at its timeout still shows how far it got
  timeout -k 5 "$t" ${stdbuf:+$stdbuf -oL -eL} "$@" 2>&1 | tee "$kit/step.txt"
  rc=${PIPESTATUS[0]}
  printf -- '-- %s: exit %s after %ss\n' "$name" "$rc" "$(( $(date +%s) - t0 ))"
}
verdict() { # NAME OK-CONDITION-RC-LIST DETAIL
  local name=$1 ok=$2 detail=${3:-}
  if [[ " $ok " == *" $rc "* ]]; then note "$name" "ok (exit $rc) $detail"
  else
    failed=1
    [ "$rc" = 124 ] && detail="TIMED OUT $detail"
    [ "$rc" = 125 ] && detail="NOT RUN: out of time (DS_GPU_CHECK_SECONDS) $detail"
    note "$name" "FAILED (exit $rc) $detail"
  fi
}

# ---- info ------------------------------------------------------------------------------------
say "info"
{
  echo "date:    $(date -u +%FT%TZ)"
  echo "host:    $(hostname), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel:  $(uname -r)"
  echo "command: $0 $*"
  echo "tree:    $(git -C "$here" rev-parse HEAD 2>/dev/null || echo 'no .git here (see the kit manifest)')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version | tail -n1
  else echo "compute-sanitizer: not found"; fi
  echo "--- kit manifest"
  [ -f "${kit_pack%/kit.tar.xz}/MANIFEST.txt" ] && cat "${kit_pack%/kit.tar.xz}/MANIFEST.txt"
} > "$out/info.txt" 2>&1
cat "$out/info.txt"

# ---- kit -------------------------------------------------------------------------------------
say "kit"
[ -f "$kit_pack" ] || { note kit "FAILED: $kit_pack missing (scripts/gpu_kit.sh, then carry .gpu-kit)"; exit 2; }
unpack() { # tar needs xz for -J; Python's tarfile (lzma) does without it
  if command -v xz >/dev/null; then tar -C "$kit" -xJf "$kit_pack"
  else python3 -c 'import sys, tarfile as t; t.open(sys.argv[1]).extractall(sys.argv[2], **({"filter": "data"} if hasattr(t, "data_filter") else {}))' "$kit_pack" "$kit"; fi
}
rm -rf "$kit" && mkdir -p "$kit" && unpack || { note kit "FAILED: cannot unpack $kit_pack"; exit 2; }
# libcublasLt.so.13 is too large to carry: the CUDA 13 toolkit or PyTorch's wheels have it.
find_cublaslt() {
  local d
  for d in "$kit/lib" /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublasLt.so.13" ] && { echo "$d"; return; }
  done
  d=$(ldconfig -p 2>/dev/null | awk '/libcublasLt\.so\.13/ {print $NF; exit}')
  [ -n "$d" ] && { dirname "$d"; return; }
  for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null || continue
    for d in $("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
      d=$(find "$d/nvidia" -maxdepth 4 -name 'libcublasLt.so.13*' 2>/dev/null | head -n1)
      [ -n "$d" ] && { dirname "$d"; return; }
    done
  done
}
lt=$(find_cublaslt)
export LD_LIBRARY_PATH="$kit/lib${lt:+:$lt}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DS_TEST_DATA="$here/tests/data" DS_MODELS_DIR=${DS_MODELS_DIR:-$here/models}
# The default model, when an earlier call on this machine left .gpu-model-a (gpu_kit.sh --model-parts).
if [ -f "$here/.gpu-model-a/part" ] && [ -f "$here/.gpu-model-b/part" ]; then
  read -r sum name < "$here/.gpu-model-b/SHA256"
  mkdir -p "$kit/models"
  cat "$here/.gpu-model-a/part" "$here/.gpu-model-b/part" > "$kit/models/$name"
  if [ "$(sha256sum < "$kit/models/$name" | cut -d' ' -f1)" = "$sum" ]; then
    DS_MODELS_DIR=$kit/models
    echo "model: $name joined from .gpu-model-a + .gpu-model-b (sha256 ok)"
  else
    echo "model: the joined parts do not match $name's sha256 (a part from another kit?): not used"
    rm -f "$kit/models/$name"
  fi
elif [ -f "$here/.gpu-model-b/part" ]; then
  echo "model: .gpu-model-b is here but .gpu-model-a is not (the machine was not warm from call 1): not used"
fi
echo "libcublasLt.so.13: ${lt:-NOT FOUND}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing=$(ldd "$kit"/bin/* | grep 'not found' | sort -u)
if [ -n "$missing" ]; then echo "$missing"; note kit "FAILED: libraries not found: $(echo "$missing" | awk '{print $1}' | sort -u | xargs)"; exit 2; fi
[ -d "$DS_TEST_DATA/models" ] || { note kit "FAILED: $DS_TEST_DATA/models missing (the tree travels with the call)"; exit 2; }
if ! "$kit/bin/deltaserve" --help > "$kit/start.txt" 2>&1; then
  head -n 5 "$kit/start.txt"
  note kit "FAILED: deltaserve does not start (glibc older than the kit's MANIFEST asks?)"
  exit 2
fi
note kit "ok: $(ls "$kit/bin" | wc -l) binaries, $(ls "$kit/lib" | wc -l) libraries, cublasLt from ${lt:-?}"

# ---- gpu -------------------------------------------------------------------------------------
say "gpu"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "NO GPU PRESENT: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -n1 || echo 'nvidia-smi not found')"
  run gpu 30 "$kit/bin/test_backend_ops" cuda   # prints the CUDA backend's own reason (exit 77)
  note gpu "NO GPU PRESENT: stopped before the first GPU-only step (test_backend_ops cuda exit $rc)"
  exit 3
fi
nvidia-smi -L

# ---- ops (ctest -L gpu) ----------------------------------------------------------------------
say "ops: test_backend_ops cuda (every backend op vs a double-precision reference)"
run ops 60 "$kit/bin/test_backend_ops" cuda
verdict ops "0" "$( [ "$rc" = 77 ] && echo '— 77: the CUDA backend did not come up on a GPU machine')"
say "ops: test_backend_bn cuda (the bottleneck kernel, cuda/bottleneck.cu, vs a double-precision reference)"
run ops_bn 30 "$kit/bin/test_backend_bn" cuda
verdict ops_bn "0"
say "ops: test_train_ops cuda (the training ops, cuda/train_ops.cu + train_attn.cu, vs a double-precision reference)"
run ops_train 60 "$kit/bin/test_train_ops" cuda
verdict ops_train "0"

# ---- golden parity ---------------------------------------------------------------------------
for t in test_llama_golden test_adapter_golden test_smollm2; do
  say "golden: $t (cpu vs HF, cuda vs cpu)"
  run "$t" 90 "$kit/bin/$t"
  detail=$(awk '/^parity cuda vs cpu/ {n++; r+=$6; for (i=1;i<=NF;i++) if ($i=="worst") w=($(i+2)>w?$(i+2):w);
                                      for (i=1;i<=NF;i++) if ($i ~ /near-ties/) t+=$(i-1)}
               END {if (n) printf "cuda vs cpu: %d runs, %d rows, worst |diff| %.3f of the tolerance, %d near-ties", n, r, w, t;
                    else printf "no cuda parity lines"}' "$kit/step.txt")
  ok="0"
  [ "$t" = test_smollm2 ] && [ ! -f "$DS_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ] && ok="77" &&
    detail="(skipped: the model is not in the kit, see MANIFEST)"
  # on a GPU machine a run that compared nothing on CUDA has not done its job
  [ "$ok" = 0 ] && [ "$rc" = 0 ] && ! grep -q '^parity cuda vs cpu' "$kit/step.txt" && rc=1 &&
    detail="no CUDA parity line: the cuda backend did not run ($(grep -m1 '^cuda: skipped' "$kit/step.txt"))"
  verdict "${t#test_}" "$ok" "$detail"
done

# ---- benchmarks ------------------------------------------------------------------------------
say "sgmv: bench_sgmv --shape llama3-8b"
run sgmv 90 "$kit/bin/bench_sgmv" --backend cuda --shape llama3-8b --ranks 8,16,64 --adapters 1,8,64 \
  --batches 1,2,4,8,16,32,64,128,256 --iters 20 --json "$out/bench_sgmv.json"
verdict sgmv "0"

say "model: bench_model --shape llama3-8b (random bf16 weights)"
run model 150 "$kit/bin/bench_model" --backend cuda --shape llama3-8b --batch 128 --adapters 1,10,100 \
  --targets both --rank 16 --steps 16 --json "$out/bench_model.json"
verdict model "0"

# ---- memcheck (with what time is left) --------------------------------------------------------
say "memcheck: compute-sanitizer --tool memcheck test_backend_ops cuda"
if command -v compute-sanitizer >/dev/null; then
  run memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 "$kit/bin/test_backend_ops" cuda
  verdict memcheck "0"
  run memcheck_train 60 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 "$kit/bin/test_train_ops" cuda
  verdict memcheck_train "0"
else
  note memcheck "not run: compute-sanitizer is not on this machine"
fi

say "summary"
cat "$out/summary.txt"
exit $failed
