#!/usr/bin/env bash
# From a fresh Debian machine (as root): installs build dependencies, builds deltaserve, fetches
# the default model (SmolLM2-135M-Instruct Q4_1) and serves it. Extra args go to `deltaserve serve`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
DS_SKIP_PYTHON=1 scripts/install_deps.sh
model=$(scripts/fetch_model.sh)
scripts/build.sh "$here/build" >/dev/null
exec build/deltaserve serve --model "$model" "$@"
