#!/usr/bin/env python3
"""Golden data for the GGUF reader, dequantisation and RoPE frequencies (tests/unit/test_gguf.c,
tests/unit/test_model_load.c).

Writes, under tests/data/quant/:
  blocks.json        raw ggml blocks (hex) + the floats gguf-py's gguf.quants.dequantize gives, for
                     F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (random bytes, fixed seed; the f16
                     scale fields are set to finite values so no NaN reaches JSON).
  rope.json          inv_freq from transformers' ROPE_INIT_FUNCTIONS (default and llama3).
  smollm2_rows.json  DEPENDS ON models/SmolLM2-135M-Instruct.Q4_1.gguf (size + sha256 recorded):
                     a few dequantised rows from gguf-py, in GGUF row order and, for attn_q/attn_k,
                     in Hugging Face row order (the convert_hf_to_gguf permutation undone).
                     Skipped with a message when the model file is absent.

Usage (repo root):  python3 tests/golden/gen_quant_golden.py
Deterministic: numpy default_rng(20240601).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "quant"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 20240601


def f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random block bytes; f16 scale fields replaced by finite values (d may be negative)."""
    blck, tsize = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    scale = lambda: f16_bytes(rng.normal(0, 0.02, size=n_blocks))  # noqa: E731
    if qtype in (T.Q8_0, T.Q4_0):
        raw[:, 0:2] = scale()
    elif qtype == T.Q4_1:
        raw[:, 0:2] = scale()
        raw[:, 2:4] = scale()
    elif qtype == T.Q4_K:
        raw[:, 0:2] = scale()
        raw[:, 2:4] = scale()
    elif qtype == T.Q6_K:
        raw[:, 208:210] = scale()
    return raw


def float_cases(rng: np.random.Generator) -> list[dict]:
    vals = rng.normal(0, 1, size=64).astype(np.float32)
    # Edge values: zeros of both signs, f16 subnormals, the largest f16, tiny/huge floats.
    vals[:8] = [0.0, -0.0, 5.96e-8, -6.0e-5, 65504.0, 1e-30, -3.4e38, 1.0]
    cases = []
    h = vals.copy()
    h[6] = -65504.0  # -3.4e38 would be -inf in f16
    for qtype, data in ((T.F32, vals.view(np.uint8)), (T.F16, h.astype(np.float16).view(np.uint8))):
        cases.append(case(qtype, data.reshape(-1), 64))
    # BF16: the top halves of the f32 bit patterns (truncation is fine: we only test decoding).
    bf = (vals.view(np.uint32) >> 16).astype(np.uint16)
    cases.append(case(T.BF16, bf.view(np.uint8), 64))
    return cases


def case(qtype: T, raw: np.ndarray, n: int) -> dict:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if qtype == T.BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        out = dequantize(raw, qtype).reshape(-1).astype(np.float32)
    assert out.size == n and np.all(np.isfinite(out)), qtype.name
    return {"type": int(qtype), "name": qtype.name, "n": n, "hex": raw.tobytes().hex(),
            "expected": [float(v) for v in out]}


def gen_blocks() -> dict:
    rng = np.random.default_rng(SEED)
    cases = float_cases(rng)
    for qtype, nb in ((T.Q8_0, 3), (T.Q4_0, 3), (T.Q4_1, 3), (T.Q4_K, 2), (T.Q6_K, 2)):
        blck = gguf.GGML_QUANT_SIZES[qtype][0]
        cases.append(case(qtype, random_blocks(rng, qtype, nb), nb * blck))
    return {"generator": "tests/golden/gen_quant_golden.py", "gguf_py": _version("gguf"), "seed": SEED,
            "cases": cases}


def gen_rope() -> dict:
    warnings.filterwarnings("ignore")
    import transformers
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    transformers.logging.set_verbosity_error()
    specs = [
        dict(theta=10000.0, head_dim=64, hidden=576, heads=9, max_pos=8192, scaling=None),
        dict(theta=100000.0, head_dim=64, hidden=576, heads=9, max_pos=8192, scaling=None),
        dict(theta=500000.0, head_dim=128, hidden=4096, heads=32, max_pos=131072,
             scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
        dict(theta=500000.0, head_dim=64, hidden=2048, heads=32, max_pos=131072,
             scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    ]
    out = []
    for s in specs:
        kw = dict(hidden_size=s["hidden"], num_attention_heads=s["heads"], head_dim=s["head_dim"],
                  max_position_embeddings=s["max_pos"], rope_theta=s["theta"])
        if s["scaling"]:
            kw["rope_scaling"] = dict(s["scaling"])
        cfg = LlamaConfig(**kw)
        # The buffer the model itself uses (default or ROPE_INIT_FUNCTIONS["llama3"]).
        inv = LlamaRotaryEmbedding(cfg).inv_freq
        out.append({**s, "inv_freq": [float(v) for v in inv.float().numpy()]})
    return {"generator": "tests/golden/gen_quant_golden.py", "transformers": transformers.__version__,
            "cases": out}


def _version(pkg: str) -> str:
    try:
        import importlib.metadata as md
        return md.version(pkg)
    except Exception:  # noqa: BLE001
        return "unknown"


def hf_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (reshape (h, 2, hd/2), swap axes 1 and 2)."""
    out = w.shape[0]
    hf = w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    fwd = hf.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(fwd, w)
    return hf


def gen_smollm2() -> dict | None:
    if not MODEL.exists():
        print(f"skipping smollm2_rows.json: {MODEL} is absent (scripts/fetch_model.sh fetches it)")
        return None
    r = gguf.GGUFReader(str(MODEL))
    tensors = {t.name: t for t in r.tensors}
    n_head, n_kv = 9, 3
    picks = [("token_embd.weight", [0, 7, 49151], None), ("blk.0.attn_q.weight", [0, 1, 32, 63, 64, 575], n_head),
             ("blk.0.attn_k.weight", [0, 33, 191], n_kv), ("blk.5.ffn_down.weight", [0, 575], None),
             ("output_norm.weight", [0], None), ("blk.29.attn_norm.weight", [0], None)]
    rows = []
    for name, idx, heads in picks:
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(-1, int(t.shape[0]))  # [rows][ne0]
        hf = hf_order(w, heads) if heads else w
        for i in idx:
            rows.append({"tensor": name, "type": t.tensor_type.name, "row": i, "ne0": int(t.shape[0]),
                         "gguf": [float(v) for v in w[i, :64]], "hf": [float(v) for v in hf[i, :64]]})
    h = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    return {"generator": "tests/golden/gen_quant_golden.py", "model": MODEL.name, "size": MODEL.stat().st_size,
            "sha256": h, "first_n": 64, "rows": rows}


def write(name: str, obj: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    p = OUT / name
    p.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"wrote {p.relative_to(ROOT)} ({p.stat().st_size} bytes)")


def main() -> int:
    write("blocks.json", gen_blocks())
    write("rope.json", gen_rope())
    s = gen_smollm2()
    if s:
        write("smollm2_rows.json", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
