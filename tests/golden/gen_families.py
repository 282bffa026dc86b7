#!/usr/bin/env python3
"""Golden data for the model families whose layout differs from Llama's (issue 12).

Writes, under tests/data/models/:
  tiny-phi3/    Phi3ForCausalLM: fused qkv_proj and gate_up_proj, sliding_window 5, untied;
                HF dir + model.gguf (F32) + model-q8_0.gguf (Q8_0) in llama.cpp's phi3 layout
  tiny-phi3-partial/  the same with partial_rotary_factor 0.75 (Phi-4-mini): RoPE on 12 of 16 values
  tiny-gemma3/  Gemma3ForCausalLM (gemma3_text): 6 layers = 5 local (window 4, RoPE base 1e4) + 1
                global (base 1e6, linear scaling 8), (1 + w) norms, post norms, GeGLU, q/k norms,
                head_dim 32 != hidden/heads, final logit soft-cap 15, tied; HF dir in the pre-v5 hub
                style (config.json) + config-v5.json (as transformers 5 saves it) + model.gguf (F32)
                + model-q8_0.gguf in llama.cpp's gemma3 layout (norms stored as 1 + w)
and a reference.json (+ reference-q8_0.json) per model, in gen_models.py's schema
(tests/golden/README.md).

Usage (from the repo root, with the .peer venv: torch, transformers 5.x, gguf):
  python3 tests/golden/gen_families.py                  # everything
  python3 tests/golden/gen_families.py --only tiny-phi3
  python3 tests/golden/gen_families.py --verify         # re-check the files already written

The GGUF files are written with gguf-py exactly as llama.cpp's convert_hf_to_gguf.py lays the
family out (Phi3MiniModel: attn_qkv, ffn_up = gate_up_proj, no Q/K permutation, rope.dimension_count,
rope.scaling.original_context_length, attention.sliding_window; no key_length), and checked
independently: transformers' own GGUF loader reads each file back and must reproduce the reference
logits. Deterministic: fixed seeds, one CPU thread, eager attention, fp32.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_models as G  # noqa: E402  (shared helpers: prompts, reference schema, JSON writer)

import gguf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
)

OUT = G.OUT

SPECS = {
    "tiny-phi3": dict(
        arch="phi3",
        cls=Phi3ForCausalLM,
        cfg_cls=Phi3Config,
        seed=6006,
        resid_std=0.3,
        # sliding_window 5 < the 7- and 12-token prompts (real Phi-3-mini-4k: 2047 < 4096), so
        # the window matters for these references too
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
            max_position_embeddings=256, original_max_position_embeddings=256,
            tie_word_embeddings=False, rope_theta=10000.0, sliding_window=5, hidden_act="silu",
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    ),
    # Phi-4-mini's shape of Phi-3: RoPE on 3/4 of each head (12 of 16 values), the rest passed through
    "tiny-phi3-partial": dict(
        arch="phi3",
        cls=Phi3ForCausalLM,
        cfg_cls=Phi3Config,
        seed=6016,
        resid_std=0.3,
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
            max_position_embeddings=256, original_max_position_embeddings=256,
            tie_word_embeddings=False, rope_theta=10000.0, sliding_window=5, hidden_act="silu",
            partial_rotary_factor=0.75, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    ),
    "tiny-gemma3": dict(
        arch="gemma3",
        cls=Gemma3ForCausalLM,
        cfg_cls=Gemma3TextConfig,
        seed=7007,
        resid_std=0.3,
        # 6 layers: llama.cpp's gemma3 fixes the local/global pattern at 6 (and the local RoPE base
        # at 1e4, the score scale at head_dim^-0.5 = query_pre_attn_scalar^-0.5 below 27B), so the
        # GGUF only agrees with transformers for such a config, as for the real checkpoints
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, intermediate_size=64, rms_norm_eps=1e-6,
            max_position_embeddings=256, tie_word_embeddings=True, query_pre_attn_scalar=32,
            sliding_window=4, final_logit_softcapping=15.0, attn_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            bos_token_id=2, eos_token_id=1, pad_token_id=0,
        ),
    ),
}


def gemma3_hub_config(d: dict) -> dict:
    """A transformers-5 Gemma 3 config dict in the pre-v5 hub style of the real checkpoints
    (google/gemma-3-*: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)."""
    out = {k: v for k, v in d.items() if k not in ("rope_parameters", "layer_types", "dtype") and not k.startswith("_")}
    rp = d["rope_parameters"]
    out["torch_dtype"] = d.get("dtype", "float32")
    out["rope_theta"] = rp["full_attention"]["rope_theta"]
    out["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    full = {k: v for k, v in rp["full_attention"].items() if k != "rope_theta"}
    out["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
    n = d["num_hidden_layers"]
    assert d["layer_types"] == ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    out["sliding_window_pattern"] = 6
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# GGUF layout per family (convert_hf_to_gguf.py)
# --------------------------------------------------------------------------------------------
def gguf_name(arch: str, hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf_name
    i, rest = int(parts[2]), ".".join(parts[3:])
    table = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if arch == "phi3":
        table.update({"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"})
    if arch == "gemma3":
        table.update({
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
            "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight",
            "post_attention_layernorm.weight": "post_attention_norm.weight",
            "pre_feedforward_layernorm.weight": "ffn_norm.weight",
            "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
        })
    return f"blk.{i}.{table[rest]}"


def norm_shift(arch: str, hf_name: str) -> float:
    """Gemma3Model.norm_shift: every *norm.weight is stored as 1 + w (Gemma3RMSNorm's (1 + w))."""
    return 1.0 if arch == "gemma3" and hf_name.endswith("norm.weight") else 0.0


def write_gguf(path: Path, name: str, arch: str, config, sd: dict[str, np.ndarray],
               qtype: gguf.GGMLQuantizationType | None = None) -> dict[str, np.ndarray]:
    """Returns {gguf name: the array as stored (dequantised for quantised tensors)}."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    rp = G.rope_params(config)
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters, in its order
        n_embd, n_head = config.hidden_size, config.num_attention_heads
        rot_pct = rp.get("partial_rotary_factor", 1.0)
        w.add_context_length(config.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(rp.get("original_max_position_embeddings",
                                               getattr(config, "original_max_position_embeddings")))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_rope_dimension_count(int(rot_pct * n_embd) // n_head)
        w.add_rope_freq_base(float(rp["rope_theta"]))
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_sliding_window(int(config.sliding_window or 0))
    if arch == "gemma3":  # TextModel + Gemma3Model.set_gguf_parameters
        full = config.rope_parameters["full_attention"]
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
        assert config.attn_logit_softcapping is None
        if config.final_logit_softcapping:
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        w.add_sliding_window(int(config.sliding_window))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    stored: dict[str, np.ndarray] = {}
    for hf_name, data in sd.items():
        gname = gguf_name(arch, hf_name)
        data = np.ascontiguousarray(data.astype(np.float32))
        if norm_shift(arch, hf_name):
            data = (torch.from_numpy(data) + norm_shift(arch, hf_name)).numpy()  # fp32, as the converter
        G.add_tensor(w, stored, gname, data, qtype if data.ndim == 2 else None)
    return G.close_gguf(w, stored)


def gguf_files(spec) -> list[tuple[str, str, gguf.GGMLQuantizationType | None]]:
    return [("model.gguf", "reference.json", None),
            ("model-q8_0.gguf", "reference-q8_0.json", gguf.GGMLQuantizationType.Q8_0)]


# --------------------------------------------------------------------------------------------
def full_attention_differs(spec, model, config, prompts) -> float:
    """The window matters for these prompts: the same weights with full attention give other logits."""
    # a window as long as the context: the same layers (and, for Gemma 3, the same local RoPE), no window
    full = spec["cls"](spec["cfg_cls"](**{**config.to_dict(), "sliding_window": config.max_position_embeddings}))
    full.load_state_dict(model.state_dict())
    full.to(torch.float32).eval()
    longest = max(prompts, key=len)
    with torch.no_grad():
        a = model(input_ids=torch.tensor([longest])).logits[0]
        b = full(input_ids=torch.tensor([longest])).logits[0]
    window = config.sliding_window
    same = float((a[:window] - b[:window]).abs().max())
    diff = float((a - b).abs().max())
    assert same < 1e-5, same  # inside the window both are the same computation
    assert diff > 1e-2, diff
    return diff


def gen_tiny(name: str, written: list[Path]) -> None:
    spec = SPECS[name]
    arch = spec["arch"]
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    config = spec["cfg_cls"](**spec["config"])
    config.architectures = [spec["cls"].__name__]
    config.dtype = "float32"
    torch.manual_seed(spec["seed"])
    model = spec["cls"](config)
    G.init_weights(model, spec["seed"], spec["resid_std"])
    if arch == "gemma3":  # Gemma3RMSNorm computes x̂·(1 + w): weights around 0, not 1
        g = torch.Generator().manual_seed(spec["seed"] + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(0.1 * torch.randn(tuple(p.shape), generator=g))
    model.save_pretrained(d)
    if arch == "gemma3":
        v5 = json.loads((d / "config.json").read_text())
        G.write_text(d / "config-v5.json", json.dumps(v5, indent=2, sort_keys=True) + "\n")
        G.write_text(d / "config.json", json.dumps(gemma3_hub_config(v5), indent=2, sort_keys=True) + "\n")
    model = G.load_hf(d)  # the reference is what transformers computes from the files as written
    config = model.config
    sd = G.hf_state(model)
    if arch == "gemma3":  # both config styles are the same model to transformers
        c5 = spec["cfg_cls"].from_dict(json.loads((d / "config-v5.json").read_text()))
        for k in ("layer_types", "rope_parameters", "sliding_window", "query_pre_attn_scalar",
                  "final_logit_softcapping", "head_dim", "tie_word_embeddings"):
            assert getattr(c5, k) == getattr(config, k), (k, getattr(c5, k), getattr(config, k))
    prompts = G.pick_prompts(model, config.vocab_size, spec["seed"])
    extra = {}
    if getattr(config, "sliding_window", None):
        extra["sliding_window"] = {"window": config.sliding_window,
                                   "full_attention_max_abs_diff": full_attention_differs(spec, model, config, prompts)}
    ref = G.build_reference(name, model, config, arch, prompts, extra)
    G.write_text(d / "reference.json", G.dump_json(ref) + "\n")
    for fname, refname, qtype in gguf_files(spec):
        stored = write_gguf(d / fname, name, arch, config, sd, qtype)
        if qtype is None:
            for k, v in sd.items():  # the F32 file holds the HF weights bit for bit (norms + shift)
                want = (torch.from_numpy(v) + norm_shift(arch, k)).numpy() if norm_shift(arch, k) else v
                assert np.array_equal(stored[gguf_name(arch, k)], want), k
            continue
        # the reference of the quantised file: transformers on its dequantised weights (norms stay F32)
        qm = spec["cls"](config)
        qm.load_state_dict({k: torch.from_numpy(stored[gguf_name(arch, k)].copy() if v.ndim == 2 else v.copy())
                            for k, v in sd.items()}, strict=False)
        if config.tie_word_embeddings:
            qm.tie_weights()
        qm.to(torch.float32).eval()
        qref = G.build_reference(name, qm, config, arch, prompts, {**extra, "gguf_file": fname})
        G.write_text(d / refname, G.dump_json(qref) + "\n")
    verify_tiny(name)
    written += sorted(p for p in d.rglob("*") if p.is_file())


def verify_tiny(name: str) -> None:
    spec = SPECS[name]
    d = OUT / name
    arch = spec["arch"]
    model = G.load_hf(d)
    config = model.config
    sd = G.hf_state(model)
    for fname, refname, qtype in gguf_files(spec):
        r = gguf.GGUFReader(str(d / fname))
        assert G.reader_field(r, "general.architecture") == arch
        tensors = {t.name: t for t in r.tensors}
        assert set(tensors) == {gguf_name(arch, k) for k in sd}, set(tensors) ^ {gguf_name(arch, k) for k in sd}
        for hf_name, want in sd.items():
            t = tensors[gguf_name(arch, hf_name)]
            a = G.reader_tensor_f32(t)
            assert a.shape == want.shape, (hf_name, a.shape, want.shape)
            if norm_shift(arch, hf_name):
                want = (torch.from_numpy(want) + norm_shift(arch, hf_name)).numpy()
            if qtype is None or want.ndim == 1:
                assert np.array_equal(a, want), hf_name
            else:
                assert t.tensor_type == qtype, hf_name
                assert np.array_equal(a, gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)), hf_name
        # Independent check: transformers' own GGUF loader reads the file's tensors (it maps
        # attn_qkv / ffn_up back to qkv_proj / gate_up_proj itself). The file has no tokenizer,
        # so the vocabulary size (and, for phi3, attention.sliding_window) are not in transformers'
        # GGUF config mapping: the directory's config is passed in.
        gm = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32, config=config,
                                                  attn_implementation="eager").eval()
        gref = json.loads((d / refname).read_text())
        for case in gref["cases"]:
            with torch.no_grad():
                lg = gm(input_ids=torch.tensor([case["prompt"]])).logits[0].numpy()
            err = float(np.max(np.abs(lg - np.array(case["prefill_logits"], dtype=np.float32))))
            assert err < 1e-5 * max(1.0, case["max_abs_logit"]), (fname, err)
    print(f"  verified {name}: GGUFs hold the HF weights; transformers' GGUF loader reproduces the references")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SPECS), action="append", help="one model (repeatable)")
    ap.add_argument("--verify", action="store_true", help="re-check the files already written")
    args = ap.parse_args()
    selected = args.only or list(SPECS)
    if args.verify:
        for n in selected:
            verify_tiny(n)
        return 0
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    written: list[Path] = []
    for n in selected:
        print(f"{n}:")
        gen_tiny(n, written)
    for p in written:
        print(f"  {p.relative_to(G.ROOT)}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
