#!/usr/bin/env bash
# Installs what deltaserve needs to build and test on a fresh Debian machine (run as root):
# Debian packages for the build, and a Python venv (.venv) with the test-only tools.
# Safe to re-run: skips what is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs=(build-essential cmake ninja-build pkg-config git libuv1-dev libcjson-dev node-llhttp libopenblas-dev libopenblas-openmp-dev
      libpcre2-dev libutf8proc-dev python3 python3-venv python3-pip clang libclang-rt-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [ "${DS_SKIP_PYTHON:-0}" != 1 ]; then
  if [ ! -x "$here/.venv/bin/python" ]; then
    echo "creating Python venv for the tests in .venv" >&2
    python3 -m venv "$here/.venv"
  fi
  "$here/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/tests/requirements.txt" >&2
fi
