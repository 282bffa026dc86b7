#!/usr/bin/env python3
"""Golden-data generator for deltaserve's delta adapters (sparse weight deltas and bias deltas).

Writes, for <model> in tiny-llama, tiny-qwen2 (bases from tests/data/models/, gen_models.py):
  tests/data/delta/<model>/tuned/        a "fully fine-tuned" copy: base + a seeded perturbation of
                                          every projection weight (heavy-tailed: Gaussian plus rare
                                          large entries) and, on Qwen2, of the q/k/v biases;
                                          HF dir (config.json + model.safetensors, F32)
  tests/data/delta/<model>/full/reference.json    the tuned model's logits (what a 100%-keep
                                          extraction must reproduce)
  tests/data/delta/<model>/keep1/        the 1%-keep delta computed here in PyTorch/numpy, written
                                          in deltaserve's delta format (CSR, F32), + reference.json:
                                          logits of base weights + that pruned delta (+ the bias deltas)
  tests/data/delta/<model>/bitfit/       a bias-only delta (F16 values) on every projection; for
                                          tiny-llama (no biases) the bias IS the delta, for Qwen2 it
                                          adds to q/k/v's biases; reference.json from forward hooks
  tests/data/delta/bad/<case>/ + manifest.json    malformed delta adapters for the loader tests

Pruning rule (the C extraction, src/adapter/delta_extract.c, must give the same entries): per
module, δ = tuned - base in fp32; k = min(ceil(keep · numel - 1e-9), #nonzero); keep the k largest
|δ|, ties broken by the lower row-major index; biases are kept whole.

Usage (from the repo root, with the peer venv):  .peer/venv/bin/python tests/golden/gen_delta.py
Deterministic: fixed seeds, one CPU thread, eager attention, fp32.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
OUT = ROOT / "tests" / "data" / "delta"

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

MODELS_DONE = ("tiny-llama", "tiny-qwen2")
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_LENS = (6, 9, 1)
N_DECODE = 4
KEEP = 0.01


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def fmt(x: float) -> str:
    s = "%.7g" % float(x)
    return "0" if s == "-0" else s


def dump(obj, indent=0) -> str:
    pad, pad2 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        return "{\n" + ",\n".join(f"{pad2}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in obj.items()) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ",".join(dump(v) for v in obj) + "]"
        return "[\n" + ",\n".join(pad2 + dump(v, indent + 1) for v in obj) + "\n" + pad + "]"
    if isinstance(obj, float):
        return fmt(obj)
    if isinstance(obj, (bool,)) or obj is None:
        return json.dumps(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    return json.dumps(obj)


def module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if proj in PROJS[:4] else 'mlp'}.{proj}"


def load(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def linears(model):
    n_layer = model.config.num_hidden_layers
    for l in range(n_layer):
        layer = model.model.layers[l]
        for p in PROJS:
            yield l, p, getattr(layer.self_attn if p in PROJS[:4] else layer.mlp, p)


def prune(d: np.ndarray, keep: float):
    """The k largest |d| (ties: lower row-major index), as CSR (indptr, indices, values)."""
    flat = d.reshape(-1)
    k = min(math.ceil(keep * flat.size - 1e-9), int(np.count_nonzero(flat)))
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    mask = mask.reshape(d.shape)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    rows, cols = np.nonzero(mask)
    return indptr, cols.astype(np.int32), d[rows, cols].astype(np.float32), mask


def run_cases(model, prompts, hooks=None):
    """Prefill logits of every prompt position, then N_DECODE greedy steps (full forwards)."""
    handles = [mod.register_forward_hook(h) for mod, h in (hooks or [])]
    cases = []
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            pre = model(torch.tensor([seq])).logits[0].numpy()
            dec = []
            tok = int(pre[-1].argmax())
            for _ in range(N_DECODE):
                seq.append(tok)
                row = model(torch.tensor([seq])).logits[0, -1].numpy()
                dec.append({"token": tok, "logits": [float(v) for v in row]})
                tok = int(row.argmax())
            cases.append({"prompt": list(ids), "max_abs_logit": float(np.abs(pre).max()),
                          "prefill_logits": [[float(v) for v in r] for r in pre], "decode": dec})
    for h in handles:
        h.remove()
    return cases


def write_ref(path: Path, what: str, model_name: str, cases, extra=None):
    ref = {"adapter": what, "base": model_name, "torch_version": torch.__version__,
           "transformers_version": transformers.__version__}
    ref.update(extra or {})
    ref["cases"] = cases
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(ref) + "\n")


def write_adapter(d: Path, tensors: dict, targets, density, source):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"adapter_type": "delta", "version": 1, "base_model_name_or_path": "tests/data/models/" + d.parent.name,
           "target_modules": list(targets), "density": density, "source": source}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    save_file(tensors, str(d / "adapter_model.safetensors"))


def gen_model(name: str):
    out = OUT / name
    base = load(MODELS / name)
    V = base.config.vocab_size
    rng = np.random.default_rng(seed_of("prompts", name))
    prompts = [rng.integers(3, V, size=n).tolist() for n in PROMPT_LENS]

    # The "fully fine-tuned" copy.
    tuned = load(MODELS / name)
    rng = np.random.default_rng(seed_of("tuned", name))
    with torch.no_grad():
        for l, p, lin in linears(tuned):
            w = lin.weight.numpy()
            rms = float(np.sqrt((w.astype(np.float64) ** 2).mean()))
            noise = rng.standard_normal(w.shape) * 0.05 * rms
            spikes = rng.random(w.shape) < 0.01
            noise[spikes] *= 20.0
            lin.weight.copy_(torch.from_numpy((w + noise.astype(np.float32)).astype(np.float32)))
            if lin.bias is not None:
                b = lin.bias.numpy()
                lin.bias.copy_(torch.from_numpy((b + rng.standard_normal(b.shape).astype(np.float32) * 0.1)))
    tdir = out / "tuned"
    if tdir.exists():
        shutil.rmtree(tdir)
    tuned.save_pretrained(tdir, safe_serialization=True)
    for extra in ("generation_config.json",):
        if (tdir / extra).exists():
            (tdir / extra).unlink()
    tuned = load(tdir)  # what the C side reads
    write_ref(out / "full" / "reference.json", "tuned (extract at 100% keep)", name, run_cases(tuned, prompts))

    # 1% keep: pruned weight deltas + whole bias deltas, applied to the base in PyTorch.
    ref_model = load(MODELS / name)
    tensors, nnz, total = {}, 0, 0
    tl = {(l, p): lin for l, p, lin in linears(tuned)}
    with torch.no_grad():
        for l, p, lin in linears(ref_model):
            t = tl[(l, p)]
            d = t.weight.numpy() - lin.weight.numpy()  # fp32, as the C extraction computes it
            indptr, idx, val, mask = prune(d, KEEP)
            m = module_name(l, p)
            tensors[m + ".delta_indptr"] = indptr
            tensors[m + ".delta_indices"] = idx
            tensors[m + ".delta_values"] = val
            nnz += len(val)
            total += d.size
            lin.weight.copy_(lin.weight + torch.from_numpy(np.where(mask, d, 0).astype(np.float32)))
            if t.bias is not None:
                db = t.bias.numpy() - (lin.bias.numpy() if lin.bias is not None else 0)
                tensors[m + ".bias_delta"] = db.astype(np.float32)
                lin.bias.copy_(lin.bias + torch.from_numpy(db))
    kdir = out / "keep1"
    write_adapter(kdir, tensors, PROJS, KEEP, "tests/golden/gen_delta.py")
    write_ref(kdir / "reference.json", "keep1", name, run_cases(ref_model, prompts),
              {"keep": KEEP, "nnz": nnz, "params": total})

    # Bias-only delta (BitFit-shaped), F16 values; the reference adds the F16-rounded values.
    rng = np.random.default_rng(seed_of("bitfit", name))
    tensors, hooks = {}, []
    for l, p, lin in linears(base):
        b = (rng.standard_normal(lin.out_features) * 0.3).astype(np.float16)
        tensors[module_name(l, p) + ".bias_delta"] = b
        bt = torch.from_numpy(b.astype(np.float32))
        hooks.append((lin, lambda mod, inp, o, bt=bt: o + bt))
    bdir = out / "bitfit"
    write_adapter(bdir, tensors, PROJS, None, "tests/golden/gen_delta.py (bias deltas only)")
    write_ref(bdir / "reference.json", "bitfit", name, run_cases(base, prompts, hooks))
    print(f"{name}: tuned, full, keep1 ({nnz}/{total} entries), bitfit")


def gen_bad():
    """Malformed adapters against tiny-llama (2 layers, d 64, q 64, kv 32, ff 128)."""
    out = OUT / "bad"
    if out.exists():
        shutil.rmtree(out)
    m = "model.layers.0.self_attn.q_proj"
    good_ptr = np.array([0] + [1] * 64, dtype=np.int32)  # one entry, row 0
    good = {m + ".delta_indptr": good_ptr, m + ".delta_indices": np.array([3], dtype=np.int32),
            m + ".delta_values": np.array([0.5], dtype=np.float32)}
    cases = {}

    def case(name, tensors, expect, cfg=None):
        d = out / name
        write_adapter(d, tensors, ["q_proj", "v_proj"], None, "bad")
        if cfg is not None:
            (d / "adapter_config.json").write_text(cfg)
        cases[name] = expect

    def mod(**kw):
        t = dict(good)
        for k, v in kw.items():
            t[m + "." + k] = v
        return t

    case("col-out-of-range", mod(delta_indices=np.array([64], dtype=np.int32)), "out of range")
    case("col-negative", mod(delta_indices=np.array([-1], dtype=np.int32)), "out of range")
    two = np.array([0] + [2] * 64, dtype=np.int32)
    case("cols-unsorted", mod(delta_indptr=two, delta_indices=np.array([5, 2], dtype=np.int32),
                              delta_values=np.array([1, 2], dtype=np.float32)), "strictly ascending")
    case("cols-duplicate", mod(delta_indptr=two, delta_indices=np.array([5, 5], dtype=np.int32),
                               delta_values=np.array([1, 2], dtype=np.float32)), "strictly ascending")
    dec = np.array([0, 2, 1] + [2] * 62, dtype=np.int32)
    case("indptr-decreasing", mod(delta_indptr=dec, delta_indices=np.array([1, 2], dtype=np.int32),
                                  delta_values=np.array([1, 2], dtype=np.float32)), "decrease")
    case("indptr-bad-end", mod(delta_indptr=np.array([0] + [2] * 64, dtype=np.int32)), "end at")
    case("indptr-wrong-rows", mod(delta_indptr=np.array([0] + [1] * 32, dtype=np.int32)), "shape")
    case("values-count", mod(delta_values=np.array([1, 2], dtype=np.float32)), "shape")
    case("values-int", mod(delta_values=np.array([1], dtype=np.int32)), "dtype")
    case("indices-i64", mod(delta_indices=np.array([3], dtype=np.int64)), "dtype I64")
    case("values-nan", mod(delta_values=np.array([np.nan], dtype=np.float32)), "non-finite")
    case("missing-values", {k: v for k, v in good.items() if not k.endswith("values")}, "needs all of")
    case("bias-wrong-shape", {m + ".bias_delta": np.zeros(32, dtype=np.float32)}, "shape")
    case("layer-out-of-range", {k.replace("layers.0", "layers.2"): v for k, v in good.items()}, "not a delta tensor")
    case("not-a-target", {k.replace("q_proj", "o_proj"): v for k, v in good.items()}, "not in target_modules")
    case("unknown-tensor", dict(good, **{m + ".lora_A.weight": np.zeros((4, 64), dtype=np.float32)}),
         "not a delta tensor")
    case("no-tensors", {"x": np.zeros(1, dtype=np.float32)}, "not a delta tensor")
    base_cfg = {"adapter_type": "delta", "target_modules": ["q_proj"]}
    case("config-unknown-key", good, "unknown key", json.dumps(dict(base_cfg, rank=4)))
    case("config-bad-target", good, "not a projection", json.dumps(dict(base_cfg, target_modules=["lm_head"])))
    case("config-bad-type", good, 'must be "delta"', json.dumps(dict(base_cfg, adapter_type="sparse")))
    case("config-version", good, "version", json.dumps(dict(base_cfg, version=2)))
    case("config-density", good, "density", json.dumps(dict(base_cfg, density=3)))
    (out / "manifest.json").write_text(dump({"base": "tiny-llama", "note": "each case must be refused; the error "
                                             "message contains `expect`", "cases": cases}) + "\n")
    print(f"bad: {len(cases)} cases")


def main():
    for name in MODELS_DONE:
        gen_model(name)
    gen_bad()


if __name__ == "__main__":
    sys.exit(main())
