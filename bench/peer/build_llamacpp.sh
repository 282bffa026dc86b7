#!/usr/bin/env bash
# Builds llama.cpp as a BENCHMARK PEER (issue 15), never as a dependency of deltaserve: the
# llama-cpp-python sdist from PyPI carries a pinned llama.cpp in vendor/llama.cpp; we build that,
# CPU only, Release, and install the tools into .peer/bin (git-ignored). Nothing here runs at
# deltaserve's build time.
#
#   bench/peer/build_llamacpp.sh [--version X.Y.Z] [--force]
#
# Output: .peer/bin/{llama-bench,llama-quantize,llama-server,llama-cli} (+ shared libs in .peer/lib),
# .peer/src/llama.cpp (the source tree, incl. convert_hf_to_gguf.py, convert_lora_to_gguf.py and
# gguf-py), .peer/VERSION. A second run reuses all of it unless --force.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
version="" force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;; --force) force=1; shift ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;; *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
peer=$root/.peer
mkdir -p "$peer/cache" "$peer/bin" "$peer/lib"
tools=(llama-bench llama-quantize llama-server llama-cli)

if [ $force = 0 ] && [ -x "$peer/bin/llama-bench" ] && [ -x "$peer/bin/llama-quantize" ] \
   && [ -x "$peer/bin/llama-server" ] && [ -d "$peer/src/llama.cpp" ]; then
  echo "llama.cpp peer already built: $(cat "$peer/VERSION" 2>/dev/null) (use --force to rebuild)"
  exit 0
fi

# 1. The sdist (cached): pip is the ordinary client for PyPI; --no-binary forces the source tarball.
sdist=$(ls "$peer"/cache/llama_cpp_python-${version:-*}.tar.gz 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$sdist" ]; then
  spec=llama-cpp-python${version:+==$version}
  nice -n 10 python3 -m pip download --no-deps --no-binary :all: "$spec" -d "$peer/cache"
  sdist=$(ls "$peer"/cache/llama_cpp_python-*.tar.gz | sort -V | tail -1)
fi
name=$(basename "$sdist" .tar.gz)
echo "sdist: $sdist"

# 2. Unpack only the vendored llama.cpp.
rm -rf "$peer/src" && mkdir -p "$peer/src"
tar -xzf "$sdist" -C "$peer/src" "$name/vendor/llama.cpp"
mv "$peer/src/$name/vendor/llama.cpp" "$peer/src/llama.cpp"
rm -rf "$peer/src/$name"
src=$peer/src/llama.cpp

# 3. Configure and build. CPU only; GGML_NATIVE=ON (-march=native) is fine for a peer measured on
# this machine. Static libs, so the binaries move into .peer/bin on their own. No network at build
# time: the server's web UI is neither built (npm) nor fetched (LLAMA_USE_PREBUILT_UI downloads it
# from Hugging Face), and no OpenSSL (the peer never downloads models).
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
nice -n 10 cmake -S "$src" -B "$peer/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
nice -n 10 cmake --build "$peer/build" --config Release -j2 --target "${tools[@]}"

for t in "${tools[@]}"; do
  if [ -x "$peer/build/bin/$t" ]; then install -m 755 "$peer/build/bin/$t" "$peer/bin/$t"
  else echo "warning: $t was not built" >&2; fi
done
echo "$name vendor/llama.cpp $("$peer/bin/llama-bench" --version 2>&1 | head -1 || true)" > "$peer/VERSION"
echo "built: $(cat "$peer/VERSION")"
ls -la "$peer/bin"
