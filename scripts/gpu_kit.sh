#!/usr/bin/env bash
# Prepares, on a CPU machine, everything a one-shot GPU session needs to check and measure the CUDA
# backend (scripts/gpu_check.sh runs it there):
#
#   1. builds deltaserve with CUDA for sm_90 (Release, -DDS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
#      into build-gpukit/ (git-ignored);
#   2. assembles the kit: stripped binaries (deltaserve, the backend-op and golden test programs,
#      bench_sgmv, bench_model) and every shared library they need beyond what the GPU host has
#      (found with ldd; see HOST_LIBS), packed as .gpu-kit/kit.tar.xz beside a MANIFEST.txt;
#   3. runs from the unpacked kit what a CPU can: the test programs (their CUDA parts print why
#      they skip) and tiny benchmark runs;
#   4. checks the size: the kit plus the working tree that travels with it must stay under the
#      device tool's 64 MiB, else it fails.
#
#   scripts/gpu_kit.sh [--no-run] [--model-parts]
#                          DS_GPU_KIT (default .gpu-kit), DS_GPU_BUILD (default build-gpukit)
#
# --model-parts also splits the default model over .gpu-model-a/ and .gpu-model-b/ (git-ignored)
# for a two-call transfer on one warm machine (bench/README.md "GPU kit"): call 1 carries
# .gpu-model-a, call 2 (within the machine's 30 s warm window) carries .gpu-kit and .gpu-model-b;
# gpu_check.sh joins the parts and checks their sha256.
#
# Not in the kit, on purpose: the working tree travels with every device call anyway (scripts/,
# tests/data/ — the golden tests find it through $DS_TEST_DATA); libcublasLt.so.13 (541 MB, over the
# limit by itself; the GPU image has CUDA 13 and PyTorch's nvidia-cublas, gpu_check.sh finds it
# there); the default model GGUF (94 MiB, over the limit by itself: test_smollm2 skips there and
# says so). The NVIDIA driver (libcuda) is the host's.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
kit=${DS_GPU_KIT:-$here/.gpu-kit}
build=${DS_GPU_BUILD:-$here/build-gpukit}
stage=$build/kit-stage
limit_mib=64
run_checks=1
model_parts=0
for a in "$@"; do
  case $a in
    --no-run) run_checks=0 ;;
    --model-parts) model_parts=1 ;;
    *) echo "usage: scripts/gpu_kit.sh [--no-run] [--model-parts]" >&2; exit 2 ;;
  esac
done

BINS=(deltaserve tests/test_backend_ops tests/test_backend_bn tests/test_train_ops tests/test_llama_golden tests/test_adapter_golden tests/test_smollm2
      bench_sgmv bench_model)
# Libraries every Linux host (and the GPU image) has, or must not come from us: glibc's, the C++
# runtime, the dynamic loader, the NVIDIA driver. Everything else ldd finds goes into the kit.
HOST_LIBS='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|libcuda)\.'
# Found on the GPU host instead (too large to carry): see gpu_check.sh find_cublaslt.
HOST_CUDA_LIBS='^libcublasLt\.so'

say() { printf '== %s\n' "$*"; }
die() { printf 'gpu_kit: FAILED: %s\n' "$*" >&2; exit 1; }

# ---- 1. build --------------------------------------------------------------------------------
pkg-config --exists libuv libcjson libpcre2-8 libutf8proc || scripts/install_deps.sh
nvcc=$(command -v nvcc || true)
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
[ -n "$nvcc" ] || die "nvcc not found (PATH or /usr/local/cuda/bin): the kit needs the CUDA build"
say "build ($build, CUDA sm_90, Release) with $("$nvcc" --version | tail -n1)"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] || nice -n 10 cmake -S "$here" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DDS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$nvcc" >/dev/null
targets=()
for b in "${BINS[@]}"; do targets+=(--target "$(basename "$b")"); done
targets+=(--target ds_cuda) # the CUDA backend is a module the binaries dlopen (src/backend/backend.c)
nice -n 10 cmake --build "$build" -j "$(nproc)" "${targets[@]}"
grep -q 'DS_CUDA:STRING=ON' "$build/CMakeCache.txt" || die "$build is not a DS_CUDA=ON build"

# ---- 2. assemble -----------------------------------------------------------------------------
say "assemble the kit"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/lib" "$kit"
declare -A seen=()
for b in "${BINS[@]}"; do
  [ -x "$build/$b" ] || die "missing binary $build/$b"
  cp "$build/$b" "$stage/bin/"
  strip --strip-unneeded "$stage/bin/$(basename "$b")"
  while read -r name path; do
    [[ $name =~ $HOST_LIBS || $name =~ $HOST_CUDA_LIBS || -n ${seen[$name]:-} ]] && continue
    [ -f "$path" ] || die "ldd: $b needs $name, not found here"
    seen[$name]=1
    cp -L "$path" "$stage/lib/$name"
  done < <(ldd "$build/$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
done
# libds_cuda.so goes beside the binaries (where backend.c looks first), with the CUDA libraries it links.
cp "$build/libds_cuda.so" "$stage/bin/"
while read -r name path; do
  [[ $name =~ $HOST_LIBS || $name =~ $HOST_CUDA_LIBS || -n ${seen[$name]:-} ]] && continue
  seen[$name]=1
  cp -L "$path" "$stage/lib/$name"
done < <(ldd "$build/libds_cuda.so" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
chmod u+w "$stage"/lib/*
strip --strip-unneeded "$stage"/lib/* 2>/dev/null || true
commit=$(git rev-parse HEAD 2>/dev/null || echo "unknown (no git)")
dirty=$( (git status --porcelain --untracked-files=no 2>/dev/null || true) | wc -l)
{
  echo "deltaserve GPU kit"
  echo "built:    $(date -u +%FT%TZ) on $(hostname) ($(nproc) cores)"
  echo "commit:   $commit$( [ "$dirty" -gt 0 ] && echo " + $dirty locally modified tracked files")"
  echo "cmake:    -DCMAKE_BUILD_TYPE=Release -DDS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90"
  echo "nvcc:     $("$nvcc" --version | tail -n1)"
  echo "src root: $here (compiled-in data paths; gpu_check.sh overrides them with DS_TEST_DATA/DS_MODELS_DIR)"
  echo "host libs expected on the GPU machine: glibc >= $(for f in "$stage"/bin/* "$stage"/lib/*; do objdump -T "$f" 2>/dev/null |
    grep -oE 'GLIBC_[0-9.]+'; done | sort -uV | tail -n1 | cut -d_ -f2), libstdc++, libgcc_s, the NVIDIA driver (libcuda),"
  echo "          libcublasLt.so.13 (CUDA 13 toolkit or PyTorch's nvidia-cublas wheel)"
  echo "model:    not in the kit ($(du -m models/*.gguf 2>/dev/null | awk '{print $1" MiB"}' | head -n1); a call carries 64 MiB in all; see --model-parts)"
  echo "files (bytes, sha256):"
  (cd "$stage" && find bin lib -type f | sort | while read -r f; do
     printf '  %-40s %10d %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)"; done)
} > "$stage/MANIFEST.txt"
cp "$stage/MANIFEST.txt" "$kit.manifest.tmp"
rm -rf "$kit"
mkdir -p "$kit"
mv "$kit.manifest.tmp" "$kit/MANIFEST.txt"
say "pack (xz)"
tar -C "$stage" -cf - MANIFEST.txt bin lib | nice -n 10 xz -6 -T2 > "$kit/kit.tar.xz"
cat "$kit/MANIFEST.txt"

# ---- 3. what a CPU can run, from the packed kit ---------------------------------------------
if [ $run_checks = 1 ]; then
  say "CPU checks from the unpacked kit (CUDA parts must print why they skip)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tar -C "$tmp" -xJf "$kit/kit.tar.xz"
  export LD_LIBRARY_PATH="$tmp/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DS_TEST_DATA="$here/tests/data" \
         DS_MODELS_DIR="$here/models" OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  if ldd "$tmp"/bin/* | grep 'not found' | grep -v libcublasLt; then die "the kit misses a library"; fi
  cpu_run() { # name expected-status command...
    local name=$1 want=$2 rc=0
    shift 2
    echo "-- $name: $*"
    nice -n 10 timeout 1200 "$@" > "$tmp/out.txt" 2>&1 || rc=$?
    grep -iE 'skip|^[0-9]+ checks|parity|cuda|bench_|decode|prefill' "$tmp/out.txt" | grep -v ' INFO ' | tail -n 12
    [ "$rc" = "$want" ] || { tail -n 30 "$tmp/out.txt"; die "$name exited $rc, expected $want"; }
  }
  cpu_run "backend ops, every backend" 0 "$tmp/bin/test_backend_ops"
  cpu_run "backend ops, cuda only (ctest -L gpu)" 77 "$tmp/bin/test_backend_ops" cuda
  cpu_run "bottleneck op, every backend" 0 "$tmp/bin/test_backend_bn"
  cpu_run "training ops, every backend" 0 "$tmp/bin/test_train_ops"
  cpu_run "training ops, cuda only (ctest -L gpu)" 77 "$tmp/bin/test_train_ops" cuda
  cpu_run "golden forward" 0 "$tmp/bin/test_llama_golden"
  cpu_run "golden adapters" 0 "$tmp/bin/test_adapter_golden"
  # the comparison path the GPU run takes (tests/unit/parity.h), here a second CPU backend vs the first
  cpu_run "golden forward, parity path (cpu vs cpu)" 0 env DS_PARITY_BACKENDS=cpu,cpu "$tmp/bin/test_llama_golden"
  cpu_run "golden adapters, parity path (cpu vs cpu)" 0 env DS_PARITY_BACKENDS=cpu,cpu "$tmp/bin/test_adapter_golden"
  smol=0
  [ -f "$here/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] || smol=77
  cpu_run "SmolLM2" $smol "$tmp/bin/test_smollm2"
  echo "(benchmark smoke runs: they check that the programs work; on a shared CPU their numbers are noise)"
  cpu_run "bench_sgmv tiny" 0 "$tmp/bin/bench_sgmv" --shape tiny --ranks 8 --adapters 1,4 --batches 1,8 --iters 2 --copy-mb 8
  cpu_run "bench_model tiny" 0 "$tmp/bin/bench_model" --shape tiny --batch 8 --adapters 1,4 --steps 2 --copy-mb 8
fi

# ---- 4. size ---------------------------------------------------------------------------------
kit_b=$(du -cb "$kit" | tail -n1 | cut -f1)
tracked_b=$( (git ls-files -z 2>/dev/null || true) | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
limit_b=$((limit_mib * 1048576))
awk -v k="$kit_b" -v t="$tracked_b" -v l=$limit_mib 'BEGIN {
  printf "kit %.1f MiB + tracked tree %.1f MiB = %.1f MiB of the %d MiB a device call carries\n", k/1048576, t/1048576, (k+t)/1048576, l }'
[ $((kit_b + tracked_b)) -le $limit_b ] || die "kit + tracked tree over $limit_mib MiB"
# Untracked files that git does not ignore travel too: name the big ones (not the kit's to fix).
big=$( (git ls-files -z -o --exclude-standard --directory 2>/dev/null || true) | xargs -0 -r du -sk 2>/dev/null | awk '$1 >= 1024 {printf "%d\t%s\n", $1 / 1024, $2}' | sort -rn | head)
if [ -n "$big" ]; then
  echo "WARNING: untracked, not ignored, and travelling with every device call (MiB):"
  echo "$big" | sed 's/^/  /'
  echo "  add them to .git/info/exclude before the GPU session, or the call is refused over 64 MiB"
fi
if [ $model_parts = 1 ]; then
  model=$here/models/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$model" ] || model=$(scripts/fetch_model.sh)
  model_b=$(stat -c %s "$model")
  # part a travels with the tree alone, part b with the tree and the kit; the slack left over is
  # shared evenly, for untracked files that travel too
  slack=$((2 * limit_b - 2 * tracked_b - kit_b - model_b))
  [ $slack -ge 2097152 ] ||
    die "--model-parts: the model ($((model_b >> 20)) MiB) does not fit in two calls beside the tree and the kit"
  a_b=$((limit_b - tracked_b - slack / 2))
  b_b=$((model_b - a_b))
  rm -rf "$here/.gpu-model-a" "$here/.gpu-model-b"
  mkdir -p "$here/.gpu-model-a" "$here/.gpu-model-b"
  head -c "$a_b" "$model" > "$here/.gpu-model-a/part"
  tail -c "$b_b" "$model" > "$here/.gpu-model-b/part"
  echo "$(sha256sum < "$model" | cut -d' ' -f1)  $(basename "$model")" > "$here/.gpu-model-b/SHA256"
  printf 'model parts: .gpu-model-a %d MiB (call 1), .gpu-model-b %d MiB (call 2, with .gpu-kit); %d MiB to spare in each call\n' \
    $((a_b >> 20)) $((b_b >> 20)) $((slack >> 21))
fi
say "kit ready: $kit (device tool: carry \".gpu-kit\", command \"scripts/gpu_check.sh \$OUT\")"
