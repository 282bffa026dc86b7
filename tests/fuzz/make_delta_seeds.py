#!/usr/bin/env python3
"""Seed corpus for fuzz_delta: every adapter directory under tests/data/delta (tiny-llama's
golden deltas and the malformed ones) packed as u16 config length + config + safetensors."""
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fuzz" / "corpus" / "fuzz_delta"
OUT.mkdir(parents=True, exist_ok=True)
dirs = [ROOT / "tests/data/delta/tiny-llama/keep1", ROOT / "tests/data/delta/tiny-llama/bitfit"]
dirs += sorted(p for p in (ROOT / "tests/data/delta/bad").iterdir() if p.is_dir())
for d in dirs:
    cfg = (d / "adapter_config.json").read_bytes()
    st = (d / "adapter_model.safetensors").read_bytes()
    name = d.name if d.parent.name == "bad" else "good-" + d.name
    (OUT / name).write_bytes(struct.pack("<H", len(cfg)) + cfg + st)
print(len(dirs), "seeds")
