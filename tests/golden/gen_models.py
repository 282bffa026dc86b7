#!/usr/bin/env python3
"""Golden-data generator for the deltaserve model core.

Writes, under tests/data/models/:
  tiny-llama/   LlamaForCausalLM, untied, GQA, HF dir + model.gguf (F32) + model-q8_0.gguf
  tiny-qwen2/   Qwen2ForCausalLM, q/k/v bias, tied, GQA, HF dir + model.gguf (F32)
  tiny-llama3/  LlamaForCausalLM, llama3 rope scaling, head_dim 32 != hidden/heads, tied
  smollm2/      reference outputs of the real SmolLM2-135M-Instruct Q4_1 GGUF (if present)
and a reference.json per model (schema: tests/golden/README.md).

Usage (from the repo root):
  python3 tests/golden/gen_models.py                  # everything
  python3 tests/golden/gen_models.py --only tiny-qwen2
  python3 tests/golden/gen_models.py --verify         # only re-check files already written
  python3 tests/golden/gen_models.py --only smollm2 --smollm2-full-logits

Deterministic: fixed seeds, one CPU thread, eager attention, fp32.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_json import Exact, dump_json, round_row, write_text  # noqa: E402  (the golden JSON style)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "models"
SMOLLM2_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import gguf  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

N_DECODE = 4

# --------------------------------------------------------------------------------------------
# Model specs.  Sizes are chosen to keep tests/data/models small (F32 is stored twice: once
# as safetensors, once as GGUF).
# --------------------------------------------------------------------------------------------
SPECS = {
    "tiny-llama": dict(
        arch="llama",
        cls=LlamaForCausalLM,
        seed=1001,
        resid_std=0.1,
        # config.json is left exactly as transformers 5 writes it ("rope_parameters" style)
        legacy_config=False,
        q8=True,
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128,
            rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        ),
    ),
    "tiny-qwen2": dict(
        arch="qwen2",
        cls=Qwen2ForCausalLM,
        seed=2002,
        resid_std=0.3,
        # config.json rewritten in the hub style of real Qwen2.5 checkpoints (top-level rope_theta)
        legacy_config=True,
        q8=False,
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96,
            rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
            rope_theta=1000000.0, use_sliding_window=False, max_window_layers=2,
            bos_token_id=1, eos_token_id=2,
        ),
    ),
    "tiny-llama3": dict(
        arch="llama",
        cls=LlamaForCausalLM,
        seed=3003,
        resid_std=0.3,
        # config.json rewritten in the hub style of real Llama 3.x checkpoints
        # (top-level rope_theta + "rope_scaling" {rope_type: llama3, ...})
        legacy_config=True,
        q8=False,
        config=dict(
            vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, intermediate_size=64,
            rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64),
            bos_token_id=1, eos_token_id=2,
        ),
    ),
    "tiny-qwen3": dict(
        arch="qwen3",
        cls=Qwen3ForCausalLM,
        seed=4004,
        resid_std=0.3,
        # Qwen3: per-head RMSNorm of q and k (q_norm / k_norm) before RoPE, no biases, and a
        # head_dim (32) that is not hidden/heads (16) — as real Qwen3 checkpoints (128 vs 64..)
        legacy_config=True,
        q8=True,
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, intermediate_size=96,
            rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
            rope_theta=1000000.0, attention_bias=False, use_sliding_window=False,
            max_window_layers=2, bos_token_id=1, eos_token_id=2,
        ),
    ),
    "tiny-mistral": dict(
        arch="llama",  # llama.cpp converts Mistral checkpoints as llama
        cls=MistralForCausalLM,
        seed=5005,
        resid_std=0.3,
        # sliding_window 4 < the 7- and 12-token prompts: every later position attends to its last
        # 4 positions only (the GGUF carries llama.attention.sliding_window)
        legacy_config=True,
        q8=False,
        config=dict(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128,
            rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
            rope_theta=10000.0, sliding_window=4, bos_token_id=1, eos_token_id=2,
        ),
    ),
}

PROMPT_LENS = (7, 12, 1)


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head already = n_kv_head for K)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk: GGUF row 2i+j within a head -> HF row j*hd/2 + i."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------
def make_config(spec):
    cfg = dict(spec["config"])
    if spec["cls"] is LlamaForCausalLM:
        config = LlamaConfig(**cfg)
    elif spec["cls"] is Qwen3ForCausalLM:
        config = Qwen3Config(**cfg)
    elif spec["cls"] is MistralForCausalLM:
        config = MistralConfig(**cfg)
    else:
        config = Qwen2Config(**cfg)
    config.architectures = [spec["cls"].__name__]
    config.dtype = "float32"
    return config


def init_weights(model, seed: int, resid_std: float) -> None:
    """Deterministic non-trivial weights (named_parameters dedups tied embeddings).

    resid_std is the std of o_proj/down_proj: large enough that the layers, not the token's own
    embedding, dominate the residual stream (otherwise a tied model just repeats its input)."""
    g = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif name.endswith(".bias"):
                v = 0.2 * torch.randn(shape, generator=g)
            elif "embed_tokens" in name:
                v = (0.25 if tied else 0.5) * torch.randn(shape, generator=g)
            elif name.startswith("lm_head"):
                v = 0.15 * torch.randn(shape, generator=g)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = 0.15 * torch.randn(shape, generator=g)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                v = resid_std * torch.randn(shape, generator=g)
            else:
                v = 0.1 * torch.randn(shape, generator=g)
            p.copy_(v.to(torch.float32))


def legacy_config_json(config_dict: dict) -> dict:
    """Rewrite a transformers-5 config dict in the pre-v5 hub style (rope_theta/rope_scaling)."""
    d = dict(config_dict)
    rp = dict(d.pop("rope_parameters", None) or {})
    theta = rp.pop("rope_theta", None)
    out = {}
    for k, v in d.items():
        if k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    if theta is not None:
        out["rope_theta"] = theta
    if rp.get("rope_type", "default") != "default":
        out["rope_scaling"] = rp
    elif "rope_scaling" not in out:
        out["rope_scaling"] = None
    # drop v5-only keys that real hub configs of this family do not carry
    for k in ("layer_types",):
        out.pop(k, None)
    return dict(sorted(out.items()))


def load_hf(dirpath: Path):
    model = AutoModelForCausalLM.from_pretrained(dirpath, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return model


def hf_state(model) -> dict[str, np.ndarray]:
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v.detach().to(torch.float32).cpu().numpy().copy()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def hf_to_gguf_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[0] == "model" and parts[1] == "layers":
        i = int(parts[2])
        rest = ".".join(parts[3:])
        table = {
            "input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight",
            "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.o_proj.weight": "attn_output.weight",
            "self_attn.q_proj.bias": "attn_q.bias",
            "self_attn.k_proj.bias": "attn_k.bias",
            "self_attn.v_proj.bias": "attn_v.bias",
            "self_attn.q_norm.weight": "attn_q_norm.weight",
            "self_attn.k_norm.weight": "attn_k_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight",
        }
        if rest in table:
            return f"blk.{i}.{table[rest]}"
    return None


def gguf_tensor_order(config) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight",
                  p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias",
                  p + "self_attn.k_proj.weight", p + "self_attn.k_proj.bias",
                  p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias",
                  p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight",
                  p + "self_attn.o_proj.weight",
                  p + "post_attention_layernorm.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                  p + "mlp.down_proj.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_params(config) -> dict:
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if not rp and getattr(config, "rope_scaling", None):
        rp = dict(config.rope_scaling)
    if "rope_theta" not in rp:
        rp["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return rp


def llama3_rope_freqs(config) -> tuple[np.ndarray, list[str]]:
    """rope_freqs.weight as convert_hf_to_gguf.py LlamaModel.generate_extra_tensors computes it.

    NOTE: convert_hf_to_gguf.py reads original_max_position_embeddings from the TOP LEVEL of the
    hparams (default 8192), not from rope_scaling.  HF reads it from rope_scaling.  For real
    Llama 3.x both are 8192; for this tiny model we use the rope_scaling value (64) so the GGUF
    agrees with HF.
    """
    rp = rope_params(config)
    base = rp["rope_theta"]
    dim = head_dim_of(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low = rp.get("low_freq_factor", 1.0)
    high = rp.get("high_freq_factor", 4.0)
    old_ctx = rp["original_max_position_embeddings"]
    low_wl = old_ctx / low
    high_wl = old_ctx / high
    out, regions = [], []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1)
            regions.append("high_freq_keep")
        elif wl > low_wl:
            out.append(factor)
            regions.append("low_freq_divide")
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
            regions.append("blend")
    return np.array(out, dtype=np.float32), regions


def write_gguf(path: Path, name: str, arch: str, config, sd: dict[str, np.ndarray],
               qtype: gguf.GGMLQuantizationType | None = None,
               rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Write a GGUF the way convert_hf_to_gguf.py would. Returns {gguf_name: array as stored
    (F32, or dequantised for quantised tensors), still in GGUF (permuted) row order}."""
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads
    head_dim = head_dim_of(config)
    rp = rope_params(config)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if getattr(config, "sliding_window", None) and getattr(config, "model_type", "") == "mistral":
        w.add_sliding_window(int(config.sliding_window))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    stored: dict[str, np.ndarray] = {}
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
        stored["rope_freqs.weight"] = rope_freqs.astype(np.float32)
    for hf_name in gguf_tensor_order(config):
        if hf_name not in sd:
            continue
        gname = hf_to_gguf_name(hf_name)
        data = sd[hf_name].astype(np.float32)
        if arch == "llama":
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, n_kv)
        data = np.ascontiguousarray(data)
        add_tensor(w, stored, gname, data, qtype if data.ndim == 2 and not gname.endswith("_norm.weight") else None)
    return close_gguf(w, stored)


def add_tensor(w: gguf.GGUFWriter, stored: dict[str, np.ndarray], gname: str, data: np.ndarray,
               qtype: gguf.GGMLQuantizationType | None) -> None:
    """Adds one fp32 tensor to a GGUF being written, quantised to qtype unless it is None, and records
    in stored what a reader gets back (the dequantised values for a quantised tensor)."""
    if qtype is not None:
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(gname, q, raw_dtype=qtype)
        stored[gname] = gguf.quants.dequantize(q, qtype).astype(np.float32)
    else:
        w.add_tensor(gname, data)
        stored[gname] = data


def close_gguf(w: gguf.GGUFWriter, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Writes the header, key/values and tensors of w, closes it and returns stored."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def gguf_to_hf_state(stored: dict[str, np.ndarray], arch: str, config) -> dict[str, torch.Tensor]:
    """Map GGUF tensors (F32 / dequantised) back to an HF state dict, undoing the permutation."""
    inv = {}
    for hf_name in gguf_tensor_order(config):
        g = hf_to_gguf_name(hf_name)
        if g in stored:
            a = stored[g]
            if arch == "llama":
                if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    a = unpermute_qk(a, config.num_attention_heads)
                elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    a = unpermute_qk(a, config.num_key_value_heads)
            inv[hf_name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return inv


# --------------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------------
def pick_prompts(model, vocab: int, seed: int) -> list[list[int]]:
    """Deterministic prompts (lengths PROMPT_LENS) whose greedy decode steps have a clear argmax
    margin (>= 1e-2) and, where some seed gives it, 4 distinct decoded tokens (tiny random models,
    tied ones especially, like to repeat one token)."""
    prompts = []
    for pi, n in enumerate(PROMPT_LENS):
        best = None
        for attempt in range(200):
            rng = np.random.default_rng([seed, pi, attempt])
            ids = [int(i) for i in rng.integers(0, vocab, size=n)]
            if n >= 12:
                # edge rows of the embedding table: id 0 and id vocab-1
                ids[3] = 0
                ids[8] = vocab - 1
            case = run_case(model, ids)
            if min(case["_margins"]) < 1e-2:
                continue
            distinct = len({d["token"] for d in case["decode"]} - {ids[-1]})
            if best is None or distinct > best[0]:
                best = (distinct, ids)
            if distinct == N_DECODE:
                break
        if best is None:
            raise RuntimeError("could not find a prompt with clear greedy margins")
        prompts.append(best[1])
    return prompts


@torch.no_grad()
def run_case(model, prompt: list[int]) -> dict:
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    prefill = out.logits[0].to(torch.float32).numpy()
    pkv = out.past_key_values
    last = prefill[-1]
    decode = []
    margins = []
    all_ids = list(prompt)
    for _ in range(N_DECODE):
        s = np.sort(last)
        margins.append(float(s[-1] - s[-2]))
        tok = int(np.argmax(last))
        all_ids.append(tok)
        out = model(input_ids=torch.tensor([[tok]], dtype=torch.long), past_key_values=pkv,
                    use_cache=True)
        pkv = out.past_key_values
        last = out.logits[0, -1].to(torch.float32).numpy()
        decode.append({"token": tok, "logits": last.copy()})
    # consistency: decode logits with cache == full recompute without cache
    full = model(input_ids=torch.tensor([all_ids[:-1] + [all_ids[-1]]], dtype=torch.long),
                 use_cache=False).logits[0].numpy()
    for j, d in enumerate(decode):
        ref = full[len(prompt) + j]
        err = float(np.max(np.abs(ref - d["logits"])))
        assert err < 1e-4 * max(1.0, float(np.max(np.abs(ref)))), f"cache mismatch {err}"
    err = float(np.max(np.abs(full[:len(prompt)] - prefill)))
    assert err < 1e-4 * max(1.0, float(np.max(np.abs(prefill)))), f"prefill mismatch {err}"
    return {"prompt": prompt, "prefill": prefill, "decode": decode, "_margins": margins}


def case_to_json(case: dict) -> dict:
    mx = max(float(np.max(np.abs(case["prefill"]))),
             max(float(np.max(np.abs(d["logits"]))) for d in case["decode"]))
    return {
        "prompt": case["prompt"],
        "max_abs_logit": mx,
        "greedy_margins": [float(m) for m in case["_margins"]],
        "prefill_logits": [round_row(r) for r in case["prefill"]],
        "decode": [{"token": d["token"], "logits": round_row(d["logits"])} for d in case["decode"]],
    }


TOL_NOTE = ("fp32 CPU logits from transformers {ver} (eager attention, torch {tv}), printed with 7 "
            "significant digits. A correct fp32 implementation should agree within about "
            "1e-4 * max(1, max_abs_logit) absolute per logit (summation-order noise is ~1e-6 "
            "relative); 'decode[k].token' is the argmax of the previous logits (greedy), and "
            "'greedy_margins[k]' is the top1-top2 gap of the logits that chose decode[k].token, "
            "all >= 1e-2 so argmax ties are not an issue.")


def hparams_json(config, arch: str) -> dict:
    rp = rope_params(config)
    d = {
        "gguf_arch": arch,
        "n_layer": config.num_hidden_layers,
        "n_embd": config.hidden_size,
        "n_ff": config.intermediate_size,
        "n_head": config.num_attention_heads,
        "n_head_kv": config.num_key_value_heads,
        "head_dim": head_dim_of(config),
        "n_vocab": config.vocab_size,
        "n_ctx": config.max_position_embeddings,
        "rope_theta": float(rp["rope_theta"]),
        "rms_norm_eps": float(config.rms_norm_eps),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "qkv_bias": arch == "qwen2",
        "qk_norm": arch == "qwen3",
    }
    if rp.get("rope_type", "default") != "default":
        d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return d


def build_reference(name: str, model, config, arch: str, prompts, extra: dict | None = None) -> dict:
    cases = [case_to_json(run_case(model, p)) for p in prompts]
    for c in cases:
        assert min(c["greedy_margins"]) >= 1e-2, (name, c["prompt"], c["greedy_margins"])
    ref = {
        "model": name,
        "n_vocab": config.vocab_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "hparams": hparams_json(config, arch),
    }
    if extra:
        ref.update(extra)
    ref["tolerance_note"] = TOL_NOTE.format(ver=transformers.__version__, tv=torch.__version__)
    ref["cases"] = cases
    return ref


def gen_tiny(name: str, written: list[Path]) -> None:
    spec = SPECS[name]
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    config = make_config(spec)
    torch.manual_seed(spec["seed"])
    model = spec["cls"](config)
    init_weights(model, spec["seed"], spec["resid_std"])
    model.save_pretrained(d)
    if spec["legacy_config"]:
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text())
        write_text(cfg_path, json.dumps(legacy_config_json(cfg), indent=2, sort_keys=True) + "\n")

    # Reload from disk: the reference is what transformers computes from the files as written.
    model = load_hf(d)
    config = model.config
    sd = hf_state(model)
    assert head_dim_of(config) == spec["config"].get("head_dim", config.hidden_size // config.num_attention_heads)

    arch = spec["arch"]
    rope_freqs = None
    extra = {}
    if rope_params(config).get("rope_type") == "llama3":
        rope_freqs, regions = llama3_rope_freqs(config)
        hd = head_dim_of(config)
        base_inv = 1.0 / (rope_params(config)["rope_theta"]
                          ** (torch.arange(0, hd, 2, dtype=torch.int64).to(torch.float32) / hd))
        hf_inv = model.model.rotary_emb.inv_freq.detach().to(torch.float32)
        # GGUF divisors reproduce HF's scaled inv_freq
        np.testing.assert_allclose(base_inv.numpy() / rope_freqs, hf_inv.numpy(), rtol=1e-6)
        assert {"high_freq_keep", "blend", "low_freq_divide"} <= set(regions), regions
        extra["rope"] = {
            "base_inv_freq": [Exact(v) for v in base_inv.tolist()],
            "inv_freq": [Exact(v) for v in hf_inv.tolist()],
            "gguf_rope_freqs": [Exact(v) for v in rope_freqs.tolist()],
            "wavelen": [Exact(2 * math.pi / v) for v in base_inv.tolist()],
            "region": regions,
        }

    stored = write_gguf(d / "model.gguf", name, arch, config, sd, rope_freqs=rope_freqs)
    # the F32 GGUF, unpermuted, is bit-identical to the HF weights
    back = gguf_to_hf_state(stored, arch, config)
    for k, v in sd.items():
        assert np.array_equal(back[k].numpy(), v), k

    prompts = pick_prompts(model, config.vocab_size, spec["seed"])
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        # the window matters for these prompts: full attention gives other logits
        full = spec["cls"](config.__class__(**{**config.to_dict(), "sliding_window": None}))
        full.load_state_dict(model.state_dict())
        full.to(torch.float32).eval()
        longest = max(prompts, key=len)
        with torch.no_grad():
            a = model(input_ids=torch.tensor([longest])).logits[0]
            b = full(input_ids=torch.tensor([longest])).logits[0]
        diff = float((a - b).abs().max())
        assert len(longest) > config.sliding_window and diff > 1e-2, diff
        extra["sliding_window_vs_full_max_abs_diff"] = Exact(diff)
    ref = build_reference(name, model, config, arch, prompts, extra)
    write_text(d / "reference.json", dump_json(ref) + "\n")

    if spec["q8"]:
        qt = gguf.GGMLQuantizationType.Q8_0
        stored_q = write_gguf(d / "model-q8_0.gguf", name + "-q8_0", arch, config, sd, qtype=qt)
        qsd = gguf_to_hf_state(stored_q, arch, config)
        qmodel = spec["cls"](config)
        qmodel.load_state_dict(qsd, strict=False)
        if config.tie_word_embeddings:
            qmodel.tie_weights()
        qmodel.to(torch.float32).eval()
        for k, v in qsd.items():
            assert torch.equal(qmodel.state_dict()[k], v), k
        qref = build_reference(name + "-q8_0", qmodel, config, arch, prompts, {
            "quantization": "Q8_0 for every 2-D weight (token_embd, output, attn_*, ffn_*); norms F32. "
                            "Logits computed by transformers from the dequantised GGUF weights.",
        })
        write_text(d / "reference-q8_0.json", dump_json(qref) + "\n")

    verify_tiny(name)
    written += sorted(p for p in d.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Verification (also usable alone with --verify)
# --------------------------------------------------------------------------------------------
def reader_tensor_f32(t) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # torch order
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)


def reader_field(r: gguf.GGUFReader, key: str):
    f = r.fields.get(key)
    if f is None:
        return None
    return f.contents()


def verify_tiny(name: str) -> None:
    spec = SPECS[name]
    d = OUT / name
    arch = spec["arch"]
    model = load_hf(d)
    config = model.config
    sd = hf_state(model)
    rp = rope_params(config)
    files = [("model.gguf", None)]
    if spec["q8"]:
        files.append(("model-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0))
    for fname, qtype in files:
        r = gguf.GGUFReader(str(d / fname))
        assert reader_field(r, "general.architecture") == arch
        expect = {
            f"{arch}.block_count": config.num_hidden_layers,
            f"{arch}.context_length": config.max_position_embeddings,
            f"{arch}.embedding_length": config.hidden_size,
            f"{arch}.feed_forward_length": config.intermediate_size,
            f"{arch}.attention.head_count": config.num_attention_heads,
            f"{arch}.attention.head_count_kv": config.num_key_value_heads,
            f"{arch}.attention.key_length": head_dim_of(config),
            f"{arch}.attention.value_length": head_dim_of(config),
            f"{arch}.rope.dimension_count": head_dim_of(config),
            f"{arch}.vocab_size": config.vocab_size,
        }
        for k, v in expect.items():
            assert reader_field(r, k) == v, (fname, k, reader_field(r, k), v)
        assert np.float32(reader_field(r, f"{arch}.rope.freq_base")) == np.float32(rp["rope_theta"])
        assert np.float32(reader_field(r, f"{arch}.attention.layer_norm_rms_epsilon")) == \
            np.float32(config.rms_norm_eps)
        assert not any(k.startswith("tokenizer.") for k in r.fields), "tiny GGUFs carry no tokenizer"
        tensors = {t.name: t for t in r.tensors}
        expected_names = {hf_to_gguf_name(k) for k in sd}
        if rp.get("rope_type") == "llama3":
            expected_names.add("rope_freqs.weight")
        assert set(tensors) == expected_names, set(tensors) ^ expected_names
        for hf_name, ref in sd.items():
            t = tensors[hf_to_gguf_name(hf_name)]
            a = reader_tensor_f32(t)
            if arch == "llama":
                if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    a = unpermute_qk(a, config.num_attention_heads)
                elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    a = unpermute_qk(a, config.num_key_value_heads)
            assert a.shape == ref.shape, (hf_name, a.shape, ref.shape)
            if qtype is None or ref.ndim == 1:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, hf_name
                assert np.array_equal(a, ref), hf_name
            else:
                assert t.tensor_type == qtype, hf_name
                # exactly what quantising the HF weight gives (permutation commutes with Q8_0
                # since blocks run along each row) and close to the original
                want = gguf.quants.dequantize(gguf.quants.quantize(ref, qtype), qtype)
                assert np.array_equal(a, want), hf_name
                assert np.max(np.abs(a - ref)) <= np.max(np.abs(ref)) / 127 + 1e-6, hf_name
        if "rope_freqs.weight" in tensors:
            rf = reader_tensor_f32(tensors["rope_freqs.weight"])
            hd = head_dim_of(config)
            base_inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            np.testing.assert_allclose(base_inv.numpy() / rf,
                                       model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
        # Independent check: transformers' own GGUF loader (which undoes the Q/K permutation
        # itself) reproduces the reference logits from this file. transformers ignores
        # rope_freqs.weight, so for llama3 we patch its inv_freq with base_inv_freq / rope_freqs.
        # transformers' GGUF config mapping for qwen3 drops attention.key_length (head_dim falls
        # back to 128), so that family gets the directory's config; the weights still come from
        # the GGUF file through transformers' own loader.
        extra_kw = {"config": config} if arch == "qwen3" else {}
        gm = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32,
                                                  attn_implementation="eager", **extra_kw).eval()
        if config.model_type == "mistral":
            # the file is a llama GGUF; transformers reads it as Llama (full attention): its
            # weights go into the Mistral model of the directory's config (sliding window)
            mm = spec["cls"](config)
            mm.load_state_dict(gm.state_dict())
            gm = mm.to(torch.float32).eval()
        if "rope_freqs.weight" in tensors:
            rf = torch.from_numpy(reader_tensor_f32(tensors["rope_freqs.weight"]))
            hd = head_dim_of(config)
            base_inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            gm.model.rotary_emb.inv_freq.copy_(base_inv / rf)
            gm.model.rotary_emb.original_inv_freq = gm.model.rotary_emb.inv_freq.clone()
        gref = json.loads((d / ("reference.json" if qtype is None else "reference-q8_0.json")).read_text())
        for case in gref["cases"]:
            with torch.no_grad():
                lg = gm(input_ids=torch.tensor([case["prompt"]])).logits[0].numpy()
            err = float(np.max(np.abs(lg - np.array(case["prefill_logits"], dtype=np.float32))))
            assert err < 1e-5 * max(1.0, case["max_abs_logit"]), (fname, err)
        del gm
    # reference.json sanity: stored prefill logits reproduce
    ref = json.loads((d / "reference.json").read_text())
    case = ref["cases"][0]
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([case["prompt"]])).logits[0].numpy()
    assert np.max(np.abs(lg - np.array(case["prefill_logits"], dtype=np.float32))) < 1e-5 * max(1, case["max_abs_logit"])
    print(f"  verified {name}: {', '.join(f for f, _ in files)} match the HF weights; "
          "transformers' GGUF loader reproduces the reference logits")


# --------------------------------------------------------------------------------------------
# SmolLM2 (real model)
# --------------------------------------------------------------------------------------------
SMOLLM2_PROMPTS = [
    ("plain", "The capital of France is"),
    ("chat", None),  # chat template rendering of "What is 2+2?"
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("chinese", "今天天气很好，我们去公园散步吧。"),
]


def gen_smollm2(written: list[Path], full_logits: bool) -> None:
    if not SMOLLM2_GGUF.is_file():
        print(f"smollm2: skipped ({SMOLLM2_GGUF.relative_to(ROOT)} absent; run scripts/fetch_model.sh)")
        return
    from transformers import AutoTokenizer

    d = OUT / "smollm2"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    gdir, gname = str(SMOLLM2_GGUF.parent), SMOLLM2_GGUF.name
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    cfg = model.config
    n_vocab = cfg.vocab_size

    # Check transformers undid the llama Q/K permutation: compare with our own dequant+unpermute.
    r = gguf.GGUFReader(str(SMOLLM2_GGUF))
    tensors = {t.name: t for t in r.tensors}
    perm_checks = {}
    for layer in (0, cfg.num_hidden_layers - 1):
        for g, hf, nh in (("attn_q", "q_proj", cfg.num_attention_heads),
                          ("attn_k", "k_proj", cfg.num_key_value_heads)):
            raw = reader_tensor_f32(tensors[f"blk.{layer}.{g}.weight"])
            mine = unpermute_qk(raw, nh)
            theirs = getattr(model.model.layers[layer].self_attn, hf).weight.detach().numpy()
            assert np.array_equal(mine, theirs), f"transformers did not undo the permutation ({g})"
            assert not np.array_equal(raw, theirs)
            perm_checks[f"blk.{layer}.{g}.weight"] = "equal after numpy unpermute"
    emb = reader_tensor_f32(tensors["token_embd.weight"])
    assert np.array_equal(emb, model.model.embed_tokens.weight.detach().numpy())
    del r, tensors, emb

    rng = np.random.default_rng(20240601)
    probe_ids = sorted(int(i) for i in rng.choice(n_vocab, size=64, replace=False))

    prompts = []
    for kind, text in SMOLLM2_PROMPTS:
        if kind == "chat":
            msgs = [{"role": "user", "content": "What is 2+2?"}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=True)["input_ids"]
        prompts.append((kind, text, [int(i) for i in ids]))

    cases = []
    last_logits_p0 = None
    with torch.no_grad():
        for ci, (kind, text, ids) in enumerate(prompts):
            x = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids=x).logits[0].to(torch.float32).numpy()
            if ci == 0:
                last_logits_p0 = logits[-1].copy()
            positions = []
            for row in logits:
                order = np.argsort(-row, kind="stable")[:20]
                positions.append({
                    "max_abs_logit": float(np.max(np.abs(row))),
                    "top20": [[int(i), float(row[i])] for i in order],
                    "probe_logits": round_row(row[probe_ids]),
                })
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=20, pad_token_id=cfg.eos_token_id,
                                 output_scores=True, return_dict_in_generate=True)
            new = [int(t) for t in gen.sequences[0, len(ids):].tolist()]
            margins = []
            for sc in gen.scores:
                top2 = torch.topk(sc[0].to(torch.float32), 2).values
                margins.append(float(top2[0] - top2[1]))
            # transformers' generate must agree with the argmax of the full prefill's last logits
            assert new[0] == int(np.argmax(logits[-1]))
            cases.append({
                "kind": kind,
                "text": text,
                "prompt": ids,
                "positions": positions,
                "greedy": {
                    "max_new_tokens": 20,
                    "tokens": new,
                    "text": tok.decode(new, skip_special_tokens=False),
                    "stopped_at_eos": bool(new and new[-1] == cfg.eos_token_id),
                    "margins": margins,
                },
            })

    ref = {
        "model": "smollm2",
        "gguf_file": SMOLLM2_GGUF.name,
        "gguf_sha256": sha256_file(SMOLLM2_GGUF),
        "gguf_size": SMOLLM2_GGUF.stat().st_size,
        "n_vocab": n_vocab,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_py_version": importlib.metadata.version("gguf"),
        "loaded_with": "AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir, gguf_file=..., "
                       "dtype=float32, attn_implementation='eager'); transformers dequantises "
                       "Q4_1/Q8_0 and undoes the llama Q/K permutation itself "
                       "(LlamaTensorProcessor._reverse_permute_weights)",
        "qk_permutation_check": perm_checks,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "probe_ids": probe_ids,
        "tolerance_note": (
            "fp32 CPU logits from transformers (eager attention) on the dequantised Q4_1 weights, "
            "7 significant digits. An fp32 implementation that dequantises the same GGUF should "
            "agree within about 1e-3 * max(1, max_abs_logit) (30 layers of summation-order noise); "
            "compare top20 as a set where logits are within that tolerance of each other. "
            "'greedy' is model.generate(do_sample=False), stopping early at eos."),
        "cases": cases,
    }
    if full_logits:
        p = d / "last_logits_p0.f32"
        p.write_bytes(np.asarray(last_logits_p0, dtype="<f4").tobytes())
        ref["last_logits_p0"] = {"file": p.name, "dtype": "float32 little-endian",
                                 "count": n_vocab, "case": 0, "position": len(prompts[0][2]) - 1}
    write_text(d / "reference.json", dump_json(ref) + "\n")
    written += sorted(p for p in d.rglob("*") if p.is_file())
    for c in cases:
        print(f"  smollm2 {c['kind']}: {len(c['prompt'])} prompt tokens -> {c['greedy']['text']!r}")


# --------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(SPECS) + ["smollm2"]
    ap.add_argument("--only", choices=names, action="append",
                    help="generate only this model (repeatable)")
    ap.add_argument("--verify", action="store_true",
                    help="do not write anything; re-check the tiny GGUFs against the HF weights")
    ap.add_argument("--smollm2-full-logits", action="store_true",
                    help="also write smollm2/last_logits_p0.f32 (full-vocab logits, ~197 KB)")
    args = ap.parse_args()
    selected = args.only or names

    if args.verify:
        for n in selected:
            if n in SPECS:
                verify_tiny(n)
        return 0

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"gguf-py {importlib.metadata.version('gguf')}")
    written: list[Path] = []
    for n in selected:
        print(f"{n}:")
        if n == "smollm2":
            gen_smollm2(written, args.smollm2_full_logits)
        else:
            gen_tiny(n, written)
    print("wrote:")
    total = 0
    for p in written:
        sz = p.stat().st_size
        total += sz
        print(f"  {p.relative_to(ROOT)}  {sz} bytes")
    all_sz = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file()) if OUT.exists() else 0
    print(f"total written {total} bytes; tests/data/models now {all_sz} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
