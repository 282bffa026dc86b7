#!/usr/bin/env bash
# Random-weight Llama GGUFs for the llama.cpp peer benchmark (issue 15), made by llama.cpp's own
# tools: bench/peer/make_models.py writes a Hugging Face checkpoint (SmolLM2's tokenizer, random fp16
# weights), convert_hf_to_gguf.py --outtype f16 makes the F16 GGUF, llama-quantize the rest.
#
#   bench/peer/make_models.sh [--shape 1b|8b] [--force]
#
#   1b (default, Llama-3.2-1B dims, 1.07 B parameters with vocab 49152):
#       models/peer/llama-1b-rand-{F16,Q8_0,Q4_K_M}.gguf          (2.1 GB, 1.1 GB, 0.7 GB)
#   8b (Llama-3-8B dims, 7.4 B parameters with vocab 49152):
#       models/peer/llama-8b-rand-Q4_K_M.gguf                     (~4.5 GB)
#       The HF checkpoint (15 GB) is deleted as soon as the F16 GGUF exists and the F16 GGUF (15 GB)
#       as soon as the Q4_K_M exists, so the peak is ~30 GB of disk; RAM stays at one layer.
#
# Needs bench/peer/build_llamacpp.sh (run here if .peer/bin is missing). The Python environment is
# .peer/venv (torch, transformers, safetensors, numpy, sentencepiece from PyPI, gguf from the sdist's
# vendored gguf-py), made on first use. Existing outputs are kept unless --force. The base's HF
# config stays in .peer/work/hf-SHAPE-config (for convert_lora_to_gguf.py --base).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
shape=1b force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=$2; shift 2 ;; --force) force=1; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;; *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$shape" in 1b|8b) ;; *) echo "--shape must be 1b or 8b" >&2; exit 2 ;; esac

peer=$root/.peer
[ -x "$peer/bin/llama-quantize" ] || bench/peer/build_llamacpp.sh
src=$peer/src/llama.cpp
py=$peer/venv/bin/python
if ! "$py" -c 'import torch, transformers, safetensors, numpy, gguf, tokenizers' 2>/dev/null; then
  [ -x "$py" ] || python3 -m venv "$peer/venv"
  # plain PyPI (the allowed registry); torch's default wheel is large but CPU use needs nothing else
  nice -n 10 "$py" -m pip install torch transformers safetensors numpy sentencepiece protobuf
  nice -n 10 "$py" -m pip install --no-deps "$src/gguf-py"
fi

work=$peer/work
out=models/peer
mkdir -p "$work" "$out"
base=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$base" ] || scripts/fetch_model.sh
tok=$work/tokenizer-smollm2
[ -f "$tok/tokenizer.json" ] || nice -n 10 "$py" bench/peer/make_models.py tokenizer --gguf "$base" --out "$tok"

name=llama-$shape-rand
f16=$out/$name-F16.gguf
if [ "$shape" = 1b ]; then quants="Q8_0 Q4_K_M"; else quants="Q4_K_M"; fi
need=0
for q in $quants; do [ -f "$out/$name-$q.gguf" ] && [ $force = 0 ] || need=1; done
[ "$shape" = 1b ] && { [ -f "$f16" ] && [ $force = 0 ] || need=1; }
if [ $need = 0 ]; then echo "already made:"; ls -la "$out"/$name-*.gguf; exit 0; fi

echo "df before:"; df -h "$root" | tail -1
if [ ! -f "$f16" ] || [ $force = 1 ]; then
  hf=$work/hf-$shape
  rm -rf "$hf"
  nice -n 10 "$py" bench/peer/make_models.py model --shape "$shape" --tokenizer "$tok" --out "$hf"
  nice -n 10 "$py" "$src/convert_hf_to_gguf.py" "$hf" --outtype f16 --model-name "$name" --outfile "$f16.tmp"
  mv "$f16.tmp" "$f16"
  # the HF weights are not needed once the F16 GGUF exists; the config (and tokenizer) stay for
  # convert_lora_to_gguf.py --base (bench/peer/serving_peer.sh)
  rm -rf "$hf-config" && mkdir -p "$hf-config"
  cp "$hf"/*.json "$hf"/*.jinja "$hf-config"/ 2>/dev/null || true
  rm -f "$hf-config/model.safetensors.index.json"
  rm -rf "$hf"
fi
for q in $quants; do
  dst=$out/$name-$q.gguf
  [ -f "$dst" ] && [ $force = 0 ] && continue
  nice -n 10 "$peer/bin/llama-quantize" "$f16" "$dst.tmp" "$q" 2
  mv "$dst.tmp" "$dst"
done
# the 8B's F16 (15 GB) is only an intermediate
[ "$shape" = 8b ] && rm -f "$f16"
echo "df after:"; df -h "$root" | tail -1
ls -la "$out"/$name-*.gguf
