#!/bin/sh
# deltaserve delta extract through the real binary, on the tiny golden models (tests/data/delta,
# tests/golden/gen_delta.py): the report, the files, a GGUF base giving the same delta as the HF
# directory, and refusals (bad options, a base of another architecture).
# usage: test_delta_extract.sh DELTASERVE DATA_DIR
bin=$1
data=$2
if [ ! -r "$data/delta/tiny-llama/tuned/config.json" ]; then
    echo "SKIP: no delta golden data (run tests/golden/gen_delta.py)"
    exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

base="$data/models/tiny-llama"
tuned="$data/delta/tiny-llama/tuned"
out=$("$bin" delta extract --base "$base" --tuned "$tuned" --keep 1% --out "$tmp/hf" 2>/dev/null)
rc=$?
echo "$out"
[ "$rc" -eq 0 ] || fail "extract from the HF base: rc=$rc"
echo "$out" | grep -q "^delta: 740 of 73728 projection entries kept" || fail "entry count line"
echo "$out" | grep -q "^preserved on [0-9]* positions: top-1 agreement" || fail "no preservation report"
[ -s "$tmp/hf/adapter_model.safetensors" ] && [ -s "$tmp/hf/adapter_config.json" ] || fail "files not written"
grep -q '"adapter_type": "delta"' "$tmp/hf/adapter_config.json" || fail "config lacks adapter_type"

# The F32 GGUF of the same base (Q/K rows un-permuted at load) gives the same delta, byte for byte.
"$bin" delta extract --base "$base/model.gguf" --tuned "$tuned" --keep 1% --out "$tmp/gguf" --no-eval >/dev/null 2>&1 ||
    fail "extract from the GGUF base"
cmp -s "$tmp/hf/adapter_model.safetensors" "$tmp/gguf/adapter_model.safetensors" || fail "GGUF base: another delta"

# --threshold
"$bin" delta extract --base "$base" --tuned "$tuned" --threshold 0.05 --out "$tmp/thr" --no-eval >/dev/null 2>&1 ||
    fail "--threshold"

expect_rc() {
    want=$1
    shift
    "$bin" "$@" >/dev/null 2>&1
    rc=$?
    [ "$rc" -eq "$want" ] || fail "deltaserve $*: rc=$rc, want $want"
}
expect_rc 2 delta
expect_rc 0 delta --help
expect_rc 2 delta frobnicate
expect_rc 2 delta extract --base "$base" --tuned "$tuned" --out "$tmp/x" --keep 0%
expect_rc 2 delta extract --base "$base" --tuned "$tuned" --out "$tmp/x" --keep 101%
expect_rc 2 delta extract --base "$base" --tuned "$tuned" --out "$tmp/x" --keep 1% --threshold 0.1
expect_rc 2 delta extract --base "$base" --tuned "$tuned"
expect_rc 1 delta extract --base "$base" --tuned "$data/models/tiny-qwen2" --out "$tmp/x" --keep 1%
msg=$("$bin" delta extract --base "$base" --tuned "$data/models/tiny-qwen2" --out "$tmp/x" --keep 1% 2>&1)
echo "$msg" | grep -q "not the base's architecture" || fail "mismatch message: $msg"

[ "$fails" -eq 0 ] && echo "delta extract: all checks passed"
exit "$fails"
