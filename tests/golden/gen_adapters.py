#!/usr/bin/env python3
"""Golden-data generator for deltaserve's adapter support (PEFT + llama.cpp GGUF LoRA).

Writes, under tests/data/adapters/:
  <model>/<adapter>/adapter_config.json + adapter_model.safetensors   (PEFT save_pretrained)
  <model>/<adapter>/reference.json     logits of the PeftModel reloaded from those files
  <model>/mixed.json                   a mixed-batch manifest (adapter or null, case index)
  tiny-llama/lora-qv.gguf, lora-qk.gguf, tiny-qwen2/lora-qv.gguf   llama.cpp GGUF LoRA files
  smollm2/lora-a, smollm2/lora-b       LoRAs for the real SmolLM2-135M (greedy references)
  bad/<case>/ + bad/manifest.json + bad/README.md   malformed adapters for loader tests
for <model> in tiny-llama, tiny-qwen2 (tests/data/models/, made by gen_models.py).
The schema is documented in tests/golden/README.md and tests/data/adapters/README.md.

Usage (from the repo root):
  python3 tests/golden/gen_adapters.py                     # everything
  python3 tests/golden/gen_adapters.py --only tiny-llama   # one model (or: smollm2, bad)
  python3 tests/golden/gen_adapters.py --only lora-qv      # one adapter name, on every tiny model

Deterministic: fixed seeds, one CPU thread, eager attention, fp32.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_json import dump_json, round_row, write_text  # noqa: E402  (the golden JSON style)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
OUT = ROOT / "tests" / "data" / "adapters"
SMOLLM2_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import gguf  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import (  # noqa: E402
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

N_DECODE = 4
PROMPT_LENS = (6, 9, 1)
TINY = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gemma3")
ADAPTER_NAMES = ("lora-qv", "lora-qk", "lora-all", "lora-bias", "dora", "adalora", "adalora-full",
                 "ia3", "prompt-tuning", "p-tuning", "prefix", "prefix-proj", "lora-embed-head", "lora-head",
                 "lora-qkv")
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


# --------------------------------------------------------------------------------------------
# Small utilities (the JSON style is golden_json.py's, shared with gen_models.py and gen_bottleneck.py)
# --------------------------------------------------------------------------------------------
def seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head already = n_kv_head for K)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def load_base(name: str):
    model = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return model


def tensor_summary(path: Path) -> dict:
    """{key: [dtype, shape]} of a safetensors file, read from its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return {k: f"{v['dtype']} {v['shape']}" for k, v in sorted(hdr.items())}


def finish_dir(d: Path, rel_base: str, dtype: torch.dtype | None = None) -> None:
    """Post-process a save_pretrained directory: drop the model card, make the config portable,
    optionally re-store the tensors in a 16-bit dtype (values must already be representable)."""
    card = d / "README.md"
    if card.exists():
        card.unlink()
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = rel_base
    # PEFT stores target_modules (and, for all-linear, the resolved module list) from a Python set:
    # its order changes with PYTHONHASHSEED. Sort it so the file is reproducible.
    for k in ("target_modules", "feedforward_modules"):
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k])
    write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True))
    if dtype is not None:
        st = d / "adapter_model.safetensors"
        sd = load_file(st)
        out = {}
        for k, v in sd.items():
            c = v.to(dtype)
            assert torch.equal(c.to(v.dtype), v), f"{k} not representable in {dtype}"
            out[k] = c.contiguous()
        save_file(out, st, metadata={"format": "pt"})


def round_params_to(model, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p.to(dtype).to(p.dtype))


# --------------------------------------------------------------------------------------------
# Adapter definitions
# --------------------------------------------------------------------------------------------
def peft_config_for(adapter: str, model_name: str, cfg) -> object | None:
    qwen = model_name in ("tiny-qwen2", "tiny-qwen3")  # tied embeddings
    L = cfg.num_hidden_layers
    common = dict(task_type=TaskType.CAUSAL_LM)
    if model_name == "tiny-phi3":
        # Phi-3's PEFT module names: the fused qkv_proj and gate_up_proj, o_proj, down_proj
        if adapter == "lora-qkv":  # with lora_bias: its rows split with the fused output too
            return LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj"], lora_bias=True, lora_dropout=0.0,
                              **common)
        if adapter == "lora-all":
            return LoraConfig(
                r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, lora_dropout=0.0,
                rank_pattern={"qkv_proj": 6, f"model.layers.{L - 1}.self_attn.o_proj": 2},
                alpha_pattern={"down_proj": 3, "model.layers.0.mlp.gate_up_proj": 5}, **common)
        if adapter == "dora":
            return LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                              use_dora=True, lora_dropout=0.0, **common)
        if adapter == "ia3":  # feed-forward (input-side) on the fused gate_up_proj
            return IA3Config(target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                             feedforward_modules=["gate_up_proj", "down_proj"], **common)
    if adapter == "lora-qv":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **common)
    if adapter == "lora-qk":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_dropout=0.0, **common)
    if adapter == "lora-all":
        # NOTE: PEFT writes adapter_config.json with sort_keys=True, so the pattern dicts come back
        # in sorted key order; "first match wins" is evaluated in that order.  Insertion order here
        # is already sorted, so the in-memory model and the reloaded one agree.
        #   rank_pattern: layer 1 o_proj -> r 2 (exact path), every k_proj -> r 6
        #   alpha_pattern: "down_proj" (matches both layers' down_proj, and comes first) -> 3;
        #                  the later, more specific "model.layers.1.mlp.down_proj" key is dead (first
        #                  match wins, not most specific); layer 0 up_proj -> 5.
        return LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, lora_dropout=0.0,
            rank_pattern={"k_proj": 6, f"model.layers.{L - 1}.self_attn.o_proj": 2},
            alpha_pattern={"down_proj": 3, f"model.layers.{L - 1}.mlp.down_proj": 11,
                           "model.layers.0.mlp.up_proj": 5},
            **common)
    if adapter == "lora-bias":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                          lora_bias=True, lora_dropout=0.0, **common)
    if adapter == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                          use_dora=True, lora_dropout=0.0, **common)
    if adapter in ("adalora", "adalora-full"):
        return AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             total_step=100, tinit=10, tfinal=20, lora_dropout=0.0, **common)
    if adapter == "ia3":
        if model_name == "tiny-qwen2":  # PEFT defaults for qwen2: q_proj, v_proj, down_proj
            return IA3Config(**common)
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         **common)
    if adapter == "prompt-tuning":
        return PromptTuningConfig(num_virtual_tokens=5, **common)
    if adapter == "p-tuning":
        return PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="MLP",
                                   encoder_hidden_size=16, **common)
    if adapter == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=False, **common)
    if adapter == "prefix-proj":
        return PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=32, **common)
    if adapter == "lora-embed-head":
        if qwen:
            return None  # tied embeddings: see README (skipped)
        return LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"], lora_dropout=0.0,
                          **common)
    if adapter == "lora-head":  # LoRA on the (untied) lm_head next to a projection
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, **common)
    raise KeyError(adapter)


# which adapters each tiny model gets (lora-qk only on llama: exercises the K permutation of GGUF LoRA)
def adapters_for(model_name: str) -> list[str]:
    names = [a for a in ADAPTER_NAMES if not (a == "lora-qk" and model_name != "tiny-llama")]
    if model_name in ("tiny-qwen2", "tiny-qwen3"):  # tied embeddings
        names.remove("lora-embed-head")
        names.remove("lora-head")
    if model_name == "tiny-qwen3":  # the PEFT types people train on Qwen3; LoRA on q/k runs before q/k_norm
        names = [a for a in names if a in ("lora-qv", "lora-all", "dora", "ia3", "prompt-tuning", "prefix")]
    names = [a for a in names if a != "lora-qkv"]
    if model_name == "tiny-phi3":  # fused qkv_proj / gate_up_proj: LoRA, DoRA, IA3 split their rows
        names = ["lora-qkv", "lora-all", "dora", "ia3", "prompt-tuning", "prefix"]
    if model_name == "tiny-gemma3":  # soft prompts are not scaled like Gemma's token embeddings
        names = ["lora-qv", "lora-all", "dora", "ia3", "prompt-tuning"]
    return names


# Storage dtype of adapter_model.safetensors (values are rounded first so the reference is exact).
STORE_DTYPE = {
    ("tiny-qwen2", "lora-qv"): torch.float16,
    ("tiny-qwen2", "lora-all"): torch.bfloat16,
}


def randomize(pm, adapter: str, model_name: str, base_model) -> dict:
    """Overwrite every trainable parameter with seeded random values. Returns notes for the JSON."""
    g = torch.Generator().manual_seed(seed_of(model_name, adapter))
    notes = {}
    qwen = model_name in ("tiny-qwen2", "tiny-qwen3", "tiny-gemma3")  # tied embeddings

    def rn(shape, std):
        return std * torch.randn(tuple(shape), generator=g)

    with torch.no_grad():
        params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
        for n, p in params:
            if ".lora_magnitude_vector." in n:
                continue  # DoRA magnitude: set below from the randomized A/B
            if "lora_embedding_A" in n:
                v = rn(p.shape, 0.3)
            elif "lora_embedding_B" in n:
                v = rn(p.shape, 0.3)
            elif ".lora_A." in n:
                v = rn(p.shape, 0.12 if adapter.startswith("adalora") else 0.1)
            elif ".lora_B." in n and n.endswith(".bias"):
                v = rn(p.shape, 0.2)
            elif ".lora_B." in n:
                v = rn(p.shape, 0.12 if adapter.startswith("adalora") else 0.1)
            elif ".lora_E." in n:
                v = 0.7 + 0.5 * torch.rand(tuple(p.shape), generator=g)  # |E| in [0.7, 1.2)
                v = v * torch.where(torch.rand(tuple(p.shape), generator=g) < 0.5, -1.0, 1.0)
            elif ".ia3_l." in n:
                v = 1.0 + 0.3 * torch.randn(tuple(p.shape), generator=g)
            elif "prompt_encoder" in n:
                if adapter == "prompt-tuning":
                    v = rn(p.shape, 0.25 if qwen else 0.5)
                elif adapter == "p-tuning":
                    # embedding + MLP (Linear, ReLU, Linear, ReLU, Linear); keep the output at the
                    # scale of the token embeddings
                    if n.endswith("embedding.weight"):
                        v = rn(p.shape, 1.0)
                    elif n.endswith(".bias"):
                        v = rn(p.shape, 0.1)
                    else:
                        v = rn(p.shape, 1.0 / math.sqrt(p.shape[1]))
                elif adapter == "prefix":
                    v = rn(p.shape, 1.0)
                elif adapter == "prefix-proj":
                    if n.endswith("embedding.weight"):
                        v = rn(p.shape, 1.0)
                    elif n.endswith(".bias"):
                        v = rn(p.shape, 0.1)
                    else:
                        v = rn(p.shape, 1.5 / math.sqrt(p.shape[1]))
                else:
                    raise KeyError(n)
            else:
                raise KeyError(f"unexpected trainable parameter {n}")
            p.copy_(v.to(p.dtype))

        if adapter.startswith("adalora"):
            # prune ranks: zero some E entries (at least one kept per module except one fully pruned
            # module in "adalora")
            kept = {}
            for name, mod in pm.base_model.model.named_modules():
                if hasattr(mod, "lora_E") and "default" in mod.lora_E:
                    E = mod.lora_E["default"]
                    r = E.shape[0]
                    mask = torch.rand(r, generator=g) < 0.5
                    if mask.sum() == 0:
                        mask[0] = True
                    if adapter == "adalora" and name.endswith(f"layers.{pm.base_model.model.config.num_hidden_layers - 1}.self_attn.v_proj"):
                        mask[:] = False  # a fully pruned module: r' = 0
                    if adapter == "adalora" and name.endswith("layers.0.self_attn.q_proj"):
                        mask[:] = True   # nothing pruned: r' = init_r
                    E.mul_(mask.view(-1, 1).to(E.dtype))
                    kept[name] = [bool(b) for b in mask.tolist()]
            notes["kept_ranks"] = kept

        # DoRA magnitude: around the norm of the adapted weight, so the adapter is a sensible
        # reweighting rather than a huge rescale
        for name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                W = mod.get_base_layer().weight
                A = mod.lora_A["default"].weight
                B = mod.lora_B["default"].weight
                s = mod.scaling["default"]
                norm = torch.linalg.norm(W + s * (B @ A), dim=1)
                m = mod.lora_magnitude_vector["default"].weight
                m.copy_(norm * (1.0 + 0.2 * torch.randn(norm.shape, generator=g)))
    return notes


def set_adalora_rank_pattern(pm, kept: dict) -> None:
    """What AdaLoraModel.update_and_allocate stores after budget masking: keys are the lora_E
    parameter names relative to the transformers model (adapter name stripped at save)."""
    cfg = pm.peft_config["default"]
    cfg.rank_pattern = {f"{name}.lora_E.default": mask for name, mask in kept.items()}


def scales_of(pm) -> dict:
    """module path -> scale PEFT applies (LoRA/DoRA: scaling; AdaLoRA: scaling/(ranknum+1e-5))."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "ranknum") and "default" in getattr(mod, "ranknum", {}):
            init_r = pm.peft_config["default"].init_r
            want = float(mod.scaling["default"] / (float(init_r) + 1e-5))
            if mod.lora_A["default"].shape[0] > 0:
                got = float(mod.scaling["default"] / (float(mod.ranknum["default"].item()) + 1e-5))
                assert abs(got - want) < 1e-9 * want, (name, got, want)
            # else: a fully pruned module (r' = 0): PEFT leaves ranknum = 0 there (scale alpha/1e-5)
            # but the delta is empty; record the init_r scale deltaserve uses everywhere
            out[name] = want
        elif hasattr(mod, "scaling") and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling \
                and hasattr(mod, "lora_A"):
            out[name] = float(mod.scaling["default"])
    return out


def expected_lora_scales(cfg_json: dict, st: dict) -> dict:
    """Scales computed the way deltaserve should: rank from the tensors, alpha from the pattern
    (first matching key of alpha_pattern as written in the file), rsLoRA -> alpha/sqrt(r)."""
    import re
    out = {}
    for k, v in st.items():
        if k.endswith(".lora_A.weight") or k.endswith(".lora_embedding_A"):
            path = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            r = v.shape[0]
            alpha = cfg_json["lora_alpha"]
            for pk, pv in (cfg_json.get("alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pk})$", path):
                    alpha = pv
                    break
            out[path] = alpha / math.sqrt(r) if cfg_json.get("use_rslora") else alpha / r
    return out


# --------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def full_logits(model, ids: list[int], n_virtual: int) -> np.ndarray:
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, attention_mask=torch.ones_like(x))
    lg = out.logits[0].to(torch.float32).numpy()
    assert lg.shape[0] == len(ids) + n_virtual, (lg.shape, len(ids), n_virtual)
    return lg[n_virtual:]


@torch.no_grad()
def run_case(model, prompt: list[int], n_virtual: int) -> dict:
    """Prefill logits of every real position, then N_DECODE greedy steps. Each step's logits come
    from a FULL forward of prompt + tokens so far (last position) -- identical by causality, and
    free of PEFT incremental-decoding special cases."""
    prefill = full_logits(model, prompt, n_virtual)
    last = prefill[-1]
    ids = list(prompt)
    decode, margins = [], []
    for _ in range(N_DECODE):
        s = np.sort(last)
        margins.append(float(s[-1] - s[-2]))
        tok = int(np.argmax(last))
        ids.append(tok)
        lg = full_logits(model, ids, n_virtual)
        # causality: the prefix positions are unchanged by appending a token
        assert np.max(np.abs(lg[:len(prompt)] - prefill)) <= 1e-4 * max(1.0, float(np.max(np.abs(prefill))))
        last = lg[-1].copy()
        decode.append({"token": tok, "logits": last})
    return {"prompt": prompt, "prefill": prefill, "decode": decode, "_margins": margins}


def pick_prompts(model, vocab: int, seed: int, n_virtual: int) -> list[list[int]]:
    prompts = []
    for pi, n in enumerate(PROMPT_LENS):
        best = None
        for attempt in range(200):
            rng = np.random.default_rng([seed, pi, attempt])
            ids = [int(i) for i in rng.integers(3, vocab, size=n)]
            if n >= 9:
                ids[4] = vocab - 1  # last embedding row
            case = run_case(model, ids, n_virtual)
            if min(case["_margins"]) < 2e-2:
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


def case_to_json(case: dict, base_model) -> dict:
    mx = max(float(np.max(np.abs(case["prefill"]))),
             max(float(np.max(np.abs(d["logits"]))) for d in case["decode"]))
    # base logits on the same token sequence (prompt + decoded tokens): rows 0..n-1 = prefill,
    # rows n..n+3 = the decode steps
    seq = list(case["prompt"]) + [d["token"] for d in case["decode"]]
    base = full_logits(base_model, seq, 0)
    mine = np.concatenate([case["prefill"], np.stack([d["logits"] for d in case["decode"]])], 0)
    return {
        "prompt": case["prompt"],
        "max_abs_logit": mx,
        "greedy_margins": [float(m) for m in case["_margins"]],
        "max_abs_delta_vs_base": float(np.max(np.abs(base - mine))),
        "prefill_logits": [round_row(r) for r in case["prefill"]],
        "decode": [{"token": d["token"], "logits": round_row(d["logits"])} for d in case["decode"]],
    }


TOL_NOTE = ("fp32 CPU logits from transformers {ver} + peft {pv} (eager attention, torch {tv}) of the "
            "PeftModel RELOADED from the files in this directory (PeftModel.from_pretrained on the "
            "base in tests/data/models/{base}), 7 significant digits. prefill_logits has one row per REAL "
            "prompt token (for prompt tuning / P-tuning the HF logits of the virtual positions are "
            "dropped: logits[:, P:]). decode[k].logits is the last row of a FULL forward of prompt + "
            "decode[0..k].token (no KV-cache/incremental path), decode[k].token = argmax of the previous "
            "logits. Expect agreement within about 1e-4 * max(1, max_abs_logit); greedy_margins >= 2e-2. "
            "max_abs_delta_vs_base = max |adapter - base| over all prefill and decode logits, base run "
            "on the same tokens (shows the adapter matters).")


# --------------------------------------------------------------------------------------------
# Tiny-model adapters
# --------------------------------------------------------------------------------------------
def gen_adapter(model_name: str, adapter: str, written: list[Path], report: dict) -> None:
    base = load_base(model_name)
    cfg = base.config
    pcfg = peft_config_for(adapter, model_name, cfg)
    d = OUT / model_name / adapter
    if pcfg is None:
        print(f"  {model_name}/{adapter}: skipped")
        return
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(seed_of(model_name, adapter, "init"))
    pm = get_peft_model(base, pcfg)
    notes = randomize(pm, adapter, model_name, base)
    if adapter == "adalora":
        set_adalora_rank_pattern(pm, notes["kept_ranks"])
    dtype = STORE_DTYPE.get((model_name, adapter))
    if dtype is not None:
        round_params_to(pm, dtype)
    pm.eval()
    pm.save_pretrained(d)
    finish_dir(d, f"tests/data/models/{model_name}", dtype)
    cfg_json = json.loads((d / "adapter_config.json").read_text())
    st = load_file(d / "adapter_model.safetensors")

    # reference = the model PEFT loads back from these files (what deltaserve must match)
    base2 = load_base(model_name)
    pm2 = PeftModel.from_pretrained(base2, d)
    pm2.eval()
    peft_type = cfg_json["peft_type"]
    n_virtual = cfg_json["num_virtual_tokens"] if peft_type in ("PROMPT_TUNING", "P_TUNING") else 0

    # in-memory model and reloaded model agree
    probe = [5, 17, 33, 250, 7, 99]
    a = full_logits(pm, probe, n_virtual)
    b = full_logits(pm2, probe, n_virtual)
    err = float(np.max(np.abs(a - b)))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(a)))), (model_name, adapter, err)

    base_ref = load_base(model_name)
    prompts = pick_prompts(pm2, cfg.vocab_size, seed_of(model_name, adapter, "prompts"), n_virtual)
    cases = [case_to_json(run_case(pm2, p, n_virtual), base_ref) for p in prompts]
    for c in cases:
        assert c["max_abs_delta_vs_base"] > 0.05, (model_name, adapter, c["max_abs_delta_vs_base"])

    ref = {
        "adapter": adapter,
        "base": model_name,
        "peft_type": peft_type,
        "n_vocab": cfg.vocab_size,
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tensors": tensor_summary(d / "adapter_model.safetensors"),
    }
    if peft_type in ("LORA", "ADALORA"):
        sc = scales_of(pm2)
        ref["scales"] = sc
        if peft_type == "LORA":
            exp = expected_lora_scales(cfg_json, st)
            assert set(exp) == set(sc), (set(exp) ^ set(sc))
            for k in sc:
                assert abs(exp[k] - sc[k]) < 1e-9, (k, exp[k], sc[k])
        else:
            ref["adalora_ranknum"] = cfg_json["init_r"]
            ref["adalora_scale_formula"] = "lora_alpha / (init_r + 1e-5), init_r even for pruned modules"
            if "kept_ranks" in notes:
                ref["kept_ranks"] = notes["kept_ranks"]
    if peft_type in PROMPT_LEARNING:
        ref["num_virtual_tokens"] = cfg_json["num_virtual_tokens"]
        if peft_type != "PREFIX_TUNING":
            ref["logits_note"] = ("HF logits have P + n rows (virtual tokens first); prefill_logits "
                                  "keeps rows P.. only")
    ref["tolerance_note"] = TOL_NOTE.format(ver=transformers.__version__, pv=peft.__version__,
                                            tv=torch.__version__, base=model_name)
    ref["cases"] = cases
    write_text(d / "reference.json", dump_json(ref) + "\n")

    extra_checks(model_name, adapter, pm, pm2, cfg_json, st, base_ref, report)
    report[f"{model_name}/{adapter}"] = {
        "config": {k: cfg_json.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                                                 "lora_bias", "init_r", "target_r", "rank_pattern",
                                                 "alpha_pattern", "num_virtual_tokens", "token_dim",
                                                 "num_attention_heads", "num_layers", "encoder_hidden_size",
                                                 "prefix_projection", "feedforward_modules", "target_modules")
                   if k in cfg_json},
        "tensors": ref["tensors"],
        "scales": ref.get("scales"),
        "delta": [c["max_abs_delta_vs_base"] for c in cases],
        "margins": [min(c["greedy_margins"]) for c in cases],
    }
    written += sorted(p for p in d.rglob("*") if p.is_file())
    print(f"  {model_name}/{adapter}: {peft_type}, {len(st)} tensors, "
          f"max|delta vs base| {', '.join('%.3g' % c['max_abs_delta_vs_base'] for c in cases)}")


@torch.no_grad()
def extra_checks(model_name, adapter, pm, pm2, cfg_json, st, base_model, report) -> None:
    """Re-derive the forward math (as PEFT's layers compute it) from the saved tensors where cheap."""
    cfg = base_model.config
    pt = cfg_json["peft_type"]
    if pt == "PREFIX_TUNING":
        emb = st["prompt_embeddings"]
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        token_dim = hd * cfg.num_key_value_heads
        assert cfg_json["token_dim"] == token_dim, (cfg_json["token_dim"], token_dim)
        assert cfg_json["num_attention_heads"] == cfg.num_key_value_heads
        assert tuple(emb.shape) == (cfg_json["num_virtual_tokens"], cfg.num_hidden_layers * 2 * token_dim)
    if pt == "P_TUNING":
        # saved prompt_embeddings == encoder OUTPUT of the in-memory (training-mode) model
        enc = pm.prompt_encoder["default"]
        tokens = torch.arange(cfg_json["num_virtual_tokens"]).unsqueeze(0)
        out = enc(tokens)[0]
        assert torch.allclose(out, st["prompt_embeddings"], atol=1e-6)
        assert not torch.allclose(enc.embedding.weight, st["prompt_embeddings"], atol=1e-3)
    if pt == "PREFIX_TUNING" and cfg_json.get("prefix_projection"):
        enc = pm.prompt_encoder["default"]
        out = enc(torch.arange(cfg_json["num_virtual_tokens"]).unsqueeze(0))[0]
        assert torch.allclose(out, st["prompt_embeddings"], atol=1e-6)
    if pt == "PROMPT_TUNING" or pt == "P_TUNING":
        # PEFT: [virtual rows ; token embeddings] with positions 0..P+n-1 through the plain model
        ids = [5, 17, 33]
        P = cfg_json["num_virtual_tokens"]
        # the embedding module, not its weight rows: Gemma 3's scales the token embeddings (not the prompt)
        emb = torch.cat([st["prompt_embeddings"].float(),
                         base_model.model.embed_tokens(torch.tensor(ids))], 0).unsqueeze(0)
        lg = base_model(inputs_embeds=emb).logits[0, P:]
        want = full_logits(pm2, ids, P)
        assert np.max(np.abs(lg.numpy() - want)) < 1e-4, "prompt tuning layout mismatch"
    if pt == "PREFIX_TUNING":
        # PEFT: view [P, 2L, H_kv, D]; layer l K = t 0, V = t 1; real tokens at positions P..
        from transformers import DynamicCache
        P = cfg_json["num_virtual_tokens"]
        L = cfg.num_hidden_layers
        H = cfg.num_key_value_heads
        D = cfg_json["token_dim"] // H
        kv = st["prompt_embeddings"].float().view(P, 2 * L, H, D)
        cache = DynamicCache(config=cfg)
        for layer in range(L):
            k = kv[:, 2 * layer].permute(1, 0, 2).unsqueeze(0)  # [1, H, P, D]
            v = kv[:, 2 * layer + 1].permute(1, 0, 2).unsqueeze(0)
            cache.update(k, v, layer)
        ids = [5, 17, 33]
        x = torch.tensor([ids])
        lg = base_model(input_ids=x, past_key_values=cache,
                        attention_mask=torch.ones(1, P + len(ids), dtype=torch.long),
                        position_ids=torch.arange(P, P + len(ids)).unsqueeze(0)).logits[0]
        want = full_logits(pm2, ids, 0)
        assert np.max(np.abs(lg.numpy() - want)) < 1e-4, "prefix layout mismatch"
    if pt == "IA3":
        ff = set(cfg_json["feedforward_modules"] if isinstance(cfg_json["feedforward_modules"], list)
                 else [cfg_json["feedforward_modules"]])
        for k, v in st.items():
            mod = k.removeprefix("base_model.model.").removesuffix(".ia3_l")
            leaf = mod.rsplit(".", 1)[1]
            lin = base_model.get_submodule(mod)
            if leaf in ff:
                assert tuple(v.shape) == (1, lin.in_features), (k, v.shape)
            else:
                assert tuple(v.shape) == (lin.out_features, 1), (k, v.shape)
    if pt == "LORA" and cfg_json.get("use_dora"):
        # PEFT DoRA: y = (m / ||W + sBA||_row) * (W x + s B A x) + b, bias unscaled
        for k, m in st.items():
            if not k.endswith(".lora_magnitude_vector"):
                continue
            mod = k.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
            lin = base_model.get_submodule(mod)
            A = st[f"base_model.model.{mod}.lora_A.weight"].float()
            B = st[f"base_model.model.{mod}.lora_B.weight"].float()
            s = cfg_json["lora_alpha"] / A.shape[0]
            Wp = lin.weight + s * (B @ A)
            x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(1))
            y = (m.float() / torch.linalg.norm(Wp, dim=1)) * (x @ Wp.T)
            if lin.bias is not None:
                y = y + lin.bias
            got = pm2.base_model.model.get_submodule(mod)(x)
            assert torch.allclose(got, y, atol=1e-5), (k, float((got - y).abs().max()))
    if pt == "LORA" and not cfg_json.get("use_dora"):
        # PEFT LoRA: y = base(x) + s * (B (A x) + b_B), s from expected_lora_scales;
        # embedding: y = E[tok] + s * (B A[:, tok])
        sc = expected_lora_scales(cfg_json, st)
        gen = torch.Generator().manual_seed(4)
        for mod, s in sc.items():
            lin = base_model.get_submodule(mod)
            got_mod = pm2.base_model.model.get_submodule(mod)
            if f"base_model.model.{mod}.lora_embedding_A" in st:
                A = st[f"base_model.model.{mod}.lora_embedding_A"].float()
                B = st[f"base_model.model.{mod}.lora_embedding_B"].float()
                tok = torch.tensor([[0, 7, 319]])
                y = lin(tok) + s * (B @ A[:, tok[0]]).T.unsqueeze(0)
                got = got_mod(tok)
            else:
                A = st[f"base_model.model.{mod}.lora_A.weight"].float()
                B = st[f"base_model.model.{mod}.lora_B.weight"].float()
                bb = st.get(f"base_model.model.{mod}.lora_B.bias")
                x = torch.randn(3, lin.in_features, generator=gen)
                d = (x @ A.T) @ B.T
                if bb is not None:
                    d = d + bb.float()
                y = lin(x) + s * d
                got = got_mod(x)
            assert torch.allclose(got, y, atol=1e-5), (mod, float((got - y).abs().max()))
    if pt == "IA3":
        gen = torch.Generator().manual_seed(5)
        for k, l in st.items():
            mod = k.removeprefix("base_model.model.").removesuffix(".ia3_l")
            lin = base_model.get_submodule(mod)
            x = torch.randn(3, lin.in_features, generator=gen)
            if l.shape[0] == 1:
                y = lin(x * l[0].float())          # feed-forward: scales the input
            else:
                y = lin(x) * l[:, 0].float()      # attention side: scales the output (bias included)
            got = pm2.base_model.model.get_submodule(mod)(x)
            assert torch.allclose(got, y, atol=1e-5), (k, float((got - y).abs().max()))
    if pt == "ADALORA":
        for k, E in st.items():
            if not k.endswith(".lora_E"):
                continue
            mod = k.removeprefix("base_model.model.").removesuffix(".lora_E")
            lin = base_model.get_submodule(mod)
            A = st[f"base_model.model.{mod}.lora_A"].float()
            B = st[f"base_model.model.{mod}.lora_B"].float()
            x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(2))
            y = lin(x) + (x @ (A * E.float()).T @ B.T) * cfg_json["lora_alpha"] / (cfg_json["init_r"] + 1e-5)
            got = pm2.base_model.model.get_submodule(mod)(x)
            assert torch.allclose(got, y, atol=1e-5), (k, float((got - y).abs().max()))


# --------------------------------------------------------------------------------------------
# Mixed-batch manifests
# --------------------------------------------------------------------------------------------
MIXED = {
    "tiny-llama": [("lora-qv", 0), (None, 0), ("lora-all", 1), ("dora", 0), ("adalora", 2), ("ia3", 1),
                   ("prompt-tuning", 0), ("p-tuning", 2), ("prefix", 1), ("prefix-proj", 0),
                   ("lora-bias", 1), ("lora-qv", 1), (None, 2), ("lora-embed-head", 0), ("lora-head", 1)],
    "tiny-qwen2": [("prefix", 0), ("lora-all", 0), (None, 1), ("dora", 1), ("adalora-full", 0),
                   ("ia3", 2), ("prompt-tuning", 1), ("p-tuning", 0), ("lora-bias", 0), ("lora-qv", 2),
                   ("prefix-proj", 1), ("adalora", 1), ("lora-qv", 0)],
    "tiny-qwen3": [("lora-all", 0), (None, 1), ("prefix", 2), ("dora", 0), ("ia3", 1), ("lora-qv", 2),
                   ("prompt-tuning", 0), ("lora-qv", 1)],
    "tiny-phi3": [("lora-qkv", 0), ("prompt-tuning", 1), (None, 2), ("lora-all", 1), ("dora", 2), ("ia3", 0),
                  ("prefix", 1), ("lora-qkv", 2), ("lora-all", 0)],
    "tiny-gemma3": [("lora-all", 0), (None, 1), ("prompt-tuning", 2), ("dora", 1), ("ia3", 0), ("lora-qv", 2),
                    ("prompt-tuning", 0)],
}


def gen_mixed(model_name: str, written: list[Path]) -> None:
    entries = []
    for adapter, case in MIXED[model_name]:
        refp = (MODELS / model_name / "reference.json") if adapter is None else \
            (OUT / model_name / adapter / "reference.json")
        if not refp.is_file():
            raise RuntimeError(f"mixed.json needs {refp}")
        n_cases = len(json.loads(refp.read_text())["cases"])
        assert case < n_cases
        entries.append({"adapter": adapter, "case": case})
    doc = {
        "base": model_name,
        "note": ("Run all entries as ONE batch (one sequence each; the same adapter may appear twice). "
                 "adapter null = base model: compare with tests/data/models/<base>/reference.json "
                 "cases[case]; otherwise with tests/data/adapters/<base>/<adapter>/reference.json "
                 "cases[case] (prefill logits of every prompt position, then the 4 greedy decode steps)."),
        "entries": entries,
    }
    p = OUT / model_name / "mixed.json"
    write_text(p, dump_json(doc) + "\n")
    written.append(p)


# --------------------------------------------------------------------------------------------
# llama.cpp GGUF LoRA (as convert_lora_to_gguf.py --outtype f32 writes it)
# --------------------------------------------------------------------------------------------
GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf_lora(path: Path, peft_dir: Path, arch: str, cfg, name: str, *,
                    override_type: str | None = None, tamper=None) -> None:
    """Mirror of llama.cpp convert_lora_to_gguf.py: general.type=adapter, adapter.type=lora,
    adapter.lora.alpha (f32), tensors '<base gguf name>.weight.lora_a' (torch [r, in] -> ne
    [in, r]) and '.lora_b' (torch [out, r] -> ne [r, out]), F32; for arch llama the q/k lora_b
    rows are permuted exactly like the base weight (LlamaModel.permute on a LoraTorchTensor
    permutes B only)."""
    lcfg = json.loads((peft_dir / "adapter_config.json").read_text())
    st = load_file(peft_dir / "adapter_model.safetensors")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(override_type or gguf.GGUFType.ADAPTER)
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lcfg["lora_alpha"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # converter order: keys in file order, A then B per module (tensor_map insertion order)
    mods = []
    for k in st:
        if k.endswith(".lora_A.weight"):
            mods.append(k.removesuffix(".lora_A.weight"))
    for mod in mods:
        parts = mod.removeprefix("base_model.model.").split(".")
        layer, leaf = int(parts[2]), parts[-1]
        gname = f"blk.{layer}.{GGUF_NAME[leaf]}.weight"
        a = st[f"{mod}.lora_A.weight"].float().numpy()
        b = st[f"{mod}.lora_B.weight"].float().numpy()
        if arch == "llama" and leaf == "q_proj":
            b = permute_qk(b, cfg.num_attention_heads)
        elif arch == "llama" and leaf == "k_proj":
            b = permute_qk(b, cfg.num_key_value_heads)
        if tamper is not None:
            a, b = tamper(gname, a, b)
        w.add_tensor(gname + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(gname + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_gguf_lora(model_name: str, adapter: str, written: list[Path]) -> None:
    arch = "llama" if model_name == "tiny-llama" else "qwen2"
    base = load_base(model_name)
    cfg = base.config
    d = OUT / model_name / adapter
    path = OUT / model_name / f"{adapter}.gguf"
    write_gguf_lora(path, d, arch, cfg, f"{model_name}-{adapter}")
    # verify: read back, un-permute, compare; and the math on the permuted base reproduces PEFT
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["general.architecture"] == arch
    st = load_file(d / "adapter_model.safetensors")
    lcfg = json.loads((d / "adapter_config.json").read_text())
    tensors = {t.name: t for t in r.tensors}
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for k in st:
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k.removesuffix(".lora_A.weight")
        parts = mod.removeprefix("base_model.model.").split(".")
        layer, leaf = int(parts[2]), parts[-1]
        gname = f"blk.{layer}.{GGUF_NAME[leaf]}.weight"
        ta, tb = tensors[gname + ".lora_a"], tensors[gname + ".lora_b"]
        A = st[k].float().numpy()
        B = st[mod + ".lora_B.weight"].float().numpy()
        assert [int(v) for v in ta.shape] == [A.shape[1], A.shape[0]]  # ne = reversed torch shape
        assert [int(v) for v in tb.shape] == [B.shape[1], B.shape[0]]
        ga = np.asarray(ta.data, dtype=np.float32).reshape(A.shape)
        gb = np.asarray(tb.data, dtype=np.float32).reshape(B.shape)
        assert np.array_equal(ga, A)
        nh = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(leaf)
        if arch == "llama" and nh:
            assert not np.array_equal(gb, B)
            assert np.array_equal(unpermute_qk(gb, nh), B)
            # permuted base + permuted delta == permute(adapted HF projection)
            W = base.get_submodule(mod.removeprefix("base_model.model.")).weight.detach().numpy()
            s = lcfg["lora_alpha"] / A.shape[0]
            lhs = permute_qk(W, nh) + s * gb @ ga
            rhs = permute_qk(W + s * B @ A, nh)
            assert np.allclose(lhs, rhs, atol=1e-6)
        else:
            assert np.array_equal(gb, B)
    written.append(path)
    print(f"  {path.relative_to(ROOT)}: {len(r.tensors)} tensors, alpha {lcfg['lora_alpha']}")


# --------------------------------------------------------------------------------------------
# SmolLM2 (real model) adapters
# --------------------------------------------------------------------------------------------
SMOL_ADAPTERS = {
    # name: (LoraConfig kwargs, std of A and B, storage dtype)
    # every other layer (size: 15 layers x r 8 x (576+576 + 576+192) x 2 bytes = 469 KB)
    "lora-a": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                    layers_to_transform=list(range(0, 30, 2)), layers_pattern="layers"),
               0.06, torch.bfloat16),
    # all-linear, spelled out: PEFT refuses layers_to_transform with the "all-linear" string
    "lora-b": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"],
                    layers_to_transform=[0, 10, 20, 29], layers_pattern="layers"),
               0.07, torch.float16),
}
SMOL_NEW_TOKENS = 16
SMOL_MIN_MARGIN = 5e-2  # every greedy step's top1-top2 gap, so a correct fp32 engine cannot flip a token


def gen_smollm2(written: list[Path], report: dict) -> None:
    if not SMOLLM2_GGUF.is_file():
        print(f"smollm2: skipped ({SMOLLM2_GGUF.relative_to(ROOT)} absent; run scripts/fetch_model.sh)")
        return
    from transformers import AutoTokenizer
    gdir, gname = str(SMOLLM2_GGUF.parent), SMOLLM2_GGUF.name
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)

    def load():
        m = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                 attn_implementation="eager")
        m.eval()
        return m

    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    prompts = [("plain", "The capital of France is"), ("chat", chat)]
    prompts = [(k, t, [int(i) for i in tok(t, add_special_tokens=True)["input_ids"]]) for k, t in prompts]

    base = load()
    eos = base.config.eos_token_id

    @torch.no_grad()
    def greedy(model, ids):
        x = torch.tensor([ids])
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=SMOL_NEW_TOKENS, pad_token_id=eos)
        return [int(t) for t in gen[0, len(ids):].tolist()]

    @torch.no_grad()
    def check_steps(model, ids, new):
        """argmax of a full forward at every step == generate's token; returns margins + top20 of
        the prefill's last position."""
        margins = []
        seq = list(ids)
        top = None
        for t in new:
            x = torch.tensor([seq])
            last = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float().numpy()
            if top is None:
                order = np.argsort(-last, kind="stable")[:20]
                top = ([[int(i), float(last[i])] for i in order], float(np.max(np.abs(last))))
            s = np.sort(last)
            margins.append(float(s[-1] - s[-2]))
            assert int(np.argmax(last)) == t, "generate disagrees with full-forward argmax"
            seq.append(t)
        return margins, top

    base_greedy = {k: greedy(base, ids) for k, _, ids in prompts}
    # same base as gen_models.py's smollm2 reference (same prompts -> same ids and greedy tokens)
    mref = MODELS / "smollm2" / "reference.json"
    if mref.is_file():
        mcases = {c["kind"]: c for c in json.loads(mref.read_text())["cases"]}
        for k, _, ids in prompts:
            if k in mcases:
                assert mcases[k]["prompt"] == ids, f"smollm2 {k}: prompt ids differ from {mref}"
                want = mcases[k]["greedy"]["tokens"][:SMOL_NEW_TOKENS]
                assert base_greedy[k][:len(want)] == want, f"smollm2 {k}: base greedy differs from {mref}"
        print(f"  base greedy tokens agree with {mref.relative_to(ROOT)}")
    for name, (kw, std, dtype) in SMOL_ADAPTERS.items():
        d = OUT / "smollm2" / name
        if d.exists():
            shutil.rmtree(d)
        chosen = None
        base0 = load()
        for attempt in range(10):
            base = copy.deepcopy(base0)
            torch.manual_seed(seed_of("smollm2", name, "init", attempt))
            pm = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, lora_dropout=0.0, **kw))
            g = torch.Generator().manual_seed(seed_of("smollm2", name, attempt))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if p.requires_grad:
                        p.copy_((std * torch.randn(tuple(p.shape), generator=g)).to(dtype).float())
            pm.eval()
            outs = {k: greedy(pm, ids) for k, _, ids in prompts}
            changed = all(outs[k] != base_greedy[k] for k in outs)
            margins = {k: check_steps(pm, ids, outs[k])[0] for k, _, ids in prompts}
            mm = min(min(v) for v in margins.values())
            print(f"  smollm2/{name} attempt {attempt}: changed={changed} min margin {mm:.3g}")
            if changed and mm >= SMOL_MIN_MARGIN:
                chosen = (attempt, pm)
                break
        if chosen is None:
            raise RuntimeError(f"smollm2/{name}: no seed gave a changed output with clear margins")
        attempt, pm = chosen
        pm.save_pretrained(d)
        finish_dir(d, "HuggingFaceTB/SmolLM2-135M-Instruct", dtype)
        cfg_json = json.loads((d / "adapter_config.json").read_text())
        st = load_file(d / "adapter_model.safetensors")
        pm2 = PeftModel.from_pretrained(load(), d)
        pm2.eval()
        cases = []
        for kind, text, ids in prompts:
            new = greedy(pm2, ids)
            margins, (top20, mx) = check_steps(pm2, ids, new)
            cases.append({
                "kind": kind,
                "text": text,
                "prompt": ids,
                "prefill_last_max_abs_logit": mx,
                "prefill_last_top20": top20,
                "greedy": {
                    "max_new_tokens": SMOL_NEW_TOKENS,
                    "tokens": new,
                    "text": tok.decode(new, skip_special_tokens=False),
                    "stopped_at_eos": bool(new and new[-1] == eos),
                    "margins": margins,
                },
                "base_greedy_tokens": base_greedy[kind],
                "base_greedy_text": tok.decode(base_greedy[kind], skip_special_tokens=False),
            })
        sc = scales_of(pm2)
        exp = expected_lora_scales(cfg_json, st)
        assert set(sc) == set(exp) and all(abs(sc[k] - exp[k]) < 1e-9 for k in sc)
        ref = {
            "adapter": name,
            "base": "smollm2",
            "base_file": f"models/{SMOLLM2_GGUF.name}",
            "peft_type": cfg_json["peft_type"],
            "peft_version": peft.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "storage_dtype": str(dtype).removeprefix("torch."),
            "tensors": tensor_summary(d / "adapter_model.safetensors"),
            "scales": sorted(set(sc.values())),
            "base_weights": ("transformers' dequantisation of the Q4_1 GGUF (from_pretrained(dir, gguf_file=..., "
                             "dtype=float32)); Q/K permutation undone by transformers, so PEFT q/k lora_B rows "
                             "are in HF order"),
            "tolerance_note": ("greedy.tokens from PeftModel.generate(do_sample=False) of the adapter reloaded "
                               "from this directory (16-bit tensors upcast to fp32), fp32 CPU, eager attention; "
                               "checked equal to the argmax of a full forward at every step; greedy.margins = "
                               "top1-top2 gap at each step. prefill_last_top20 = top 20 logits of the last "
                               "prompt position (tolerance ~1e-3 * max(1, max_abs_logit)). base_greedy_* = "
                               "the same without the adapter (shows the adapter changes the output)."),
            "cases": cases,
        }
        write_text(d / "reference.json", dump_json(ref) + "\n")
        report[f"smollm2/{name}"] = {"tensors_count": len(st), "scales": ref["scales"],
                                     "example_tensors": dict(list(ref["tensors"].items())[:4]),
                                     "min_margin": min(min(c["greedy"]["margins"]) for c in cases)}
        written += sorted(p for p in d.rglob("*") if p.is_file())
        for c in cases:
            print(f"  smollm2/{name} {c['kind']}: {c['greedy']['text']!r} (base: {c['base_greedy_text']!r})")


# --------------------------------------------------------------------------------------------
# Malformed adapters
# --------------------------------------------------------------------------------------------
def _lora_cfg(**over) -> dict:
    cfg = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tests/data/models/tiny-llama",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "lora_alpha": 8,
        "lora_bias": False, "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": 4,
        "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
    }
    cfg.update(over)
    return dict(sorted(cfg.items()))


def _lora_tensors(g, layers=(0,), mods=("q_proj", "v_proj"), hidden=64, r=4, outs=None) -> dict:
    outs = outs or {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64}
    sd = {}
    for i in layers:
        for m in mods:
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            sd[f"{p}.lora_A.weight"] = 0.1 * torch.randn(r, hidden, generator=g)
            sd[f"{p}.lora_B.weight"] = 0.1 * torch.randn(outs[m], r, generator=g)
    return sd


def _write_bad(name: str, cfg, tensors, written: list[Path], raw_config: str | None = None,
               raw_weights: bytes | None = None) -> Path:
    d = OUT / "bad" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if raw_config is not None:
        write_text(d / "adapter_config.json", raw_config)
    elif cfg is not None:
        write_text(d / "adapter_config.json", json.dumps(cfg, indent=2, sort_keys=True))
    if raw_weights is not None:
        (d / "adapter_model.safetensors").write_bytes(raw_weights)
    elif tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, d / "adapter_model.safetensors",
                  metadata={"format": "pt"})
    written += sorted(p for p in d.rglob("*") if p.is_file())
    return d


BAD_README_HEAD = """# Malformed adapters (loader tests)

Generated by `tests/golden/gen_adapters.py` (`--only bad`). Every directory here is an adapter that
deltaserve must REFUSE to load against the base `tests/data/models/tiny-llama` (hidden 64, 2
layers, 4 heads / 2 KV heads, head_dim 16, intermediate 128, vocab 320): the load must fail with an
error (HTTP 400 from `/v1/load_lora_adapter`), never crash, never half-register the adapter. A
test should check that the error message contains the keyword (case-insensitive; any one of the
listed alternatives). `manifest.json` has the same table in machine-readable form.

NaN/Inf values in weights are NOT malformed and are deliberately absent here.

| case | what is wrong | expected error keyword |
|---|---|---|
"""


def gen_bad(written: list[Path]) -> None:
    bad_root = OUT / "bad"
    if bad_root.exists():
        shutil.rmtree(bad_root)
    g = torch.Generator().manual_seed(seed_of("bad"))
    entries = []

    def add(name, what, keyword, path_suffix=""):
        entries.append({"case": name + path_suffix, "what": what, "keyword": keyword})

    # 1. rank mismatch between lora_A and lora_B
    t = _lora_tensors(g, layers=(0, 1))
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = 0.1 * torch.randn(32, 3, generator=g)
    _write_bad("rank-mismatch", _lora_cfg(), t, written)
    add("rank-mismatch", "layers.1 v_proj: lora_A [4,64] but lora_B [32,3]", "rank|shape")

    # 2. missing lora_B for one module
    t = _lora_tensors(g)
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    _write_bad("missing-lora-b", _lora_cfg(), t, written)
    add("missing-lora-b", "layers.0 q_proj has lora_A but no lora_B", "lora_B|missing")

    # 3. missing lora_A
    t = _lora_tensors(g, layers=(0, 1))
    del t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    _write_bad("missing-lora-a", _lora_cfg(), t, written)
    add("missing-lora-a", "layers.1 q_proj has lora_B but no lora_A", "lora_A|missing")

    # 4. bad JSON
    good = json.dumps(_lora_cfg(), indent=2, sort_keys=True)
    _write_bad("bad-json", None, _lora_tensors(g), written, raw_config=good[: len(good) // 2])
    add("bad-json", "adapter_config.json truncated mid-object", "json")

    # 5. config is JSON but not an object
    _write_bad("config-not-object", None, _lora_tensors(g), written, raw_config='["LORA", 4, 8]\n')
    add("config-not-object", "adapter_config.json is a JSON array", "json|object|config")

    # 6. unknown peft_type
    _write_bad("unknown-peft-type", _lora_cfg(peft_type="SUPER_LORA"), _lora_tensors(g), written)
    add("unknown-peft-type", "peft_type SUPER_LORA", "peft_type|unsupported|unknown")

    # 7. a real PEFT type deltaserve does not implement (LoHa), saved by PEFT itself
    base = load_base("tiny-llama")
    torch.manual_seed(seed_of("bad", "loha"))
    pm = get_peft_model(base, LoHaConfig(r=2, alpha=4, target_modules=["q_proj"], task_type=TaskType.CAUSAL_LM))
    d = bad_root / "unsupported-peft-type-loha"
    pm.save_pretrained(d)
    finish_dir(d, "tests/data/models/tiny-llama")
    written += sorted(p for p in d.rglob("*") if p.is_file())
    add("unsupported-peft-type-loha", "peft_type LOHA (hada_w1_a/... tensors), saved by PEFT",
        "peft_type|unsupported|LOHA")

    # 8. missing peft_type
    c = _lora_cfg()
    del c["peft_type"]
    _write_bad("missing-peft-type", c, _lora_tensors(g), written)
    add("missing-peft-type", "adapter_config.json without peft_type", "peft_type")

    # 9. DoRA + lora_bias (PEFT refuses this combination: 'lora_bias=True is not supported for DoRA')
    t = _lora_tensors(g)
    for i in (0,):
        for m, o in (("q_proj", 64), ("v_proj", 32)):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[f"{p}.lora_B.bias"] = 0.1 * torch.randn(o, generator=g)
            t[f"{p}.lora_magnitude_vector"] = 1.0 + 0.1 * torch.randn(o, generator=g)
    _write_bad("dora-lora-bias", _lora_cfg(use_dora=True, lora_bias=True), t, written)
    add("dora-lora-bias", "use_dora=true together with lora_bias=true (PEFT rejects it)", "dora|lora_bias")

    # 10. layer_replication
    _write_bad("layer-replication", _lora_cfg(layer_replication=[[0, 2], [1, 2]]), _lora_tensors(g), written)
    add("layer-replication", "layer_replication [[0,2],[1,2]] (adapter expects a re-stacked base)",
        "layer_replication")

    # 11. PiSSA init (adapter only matches a mutated base)
    _write_bad("init-pissa", _lora_cfg(init_lora_weights="pissa"), _lora_tensors(g), written)
    add("init-pissa", "init_lora_weights \"pissa\" (residual base, not convertible at load)",
        "pissa|init_lora_weights")

    # 12. OLoRA / LoftQ / CorDA for completeness
    _write_bad("init-olora", _lora_cfg(init_lora_weights="olora"), _lora_tensors(g), written)
    add("init-olora", "init_lora_weights \"olora\"", "olora|init_lora_weights")
    _write_bad("init-loftq", _lora_cfg(init_lora_weights="loftq",
                                       loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
               _lora_tensors(g), written)
    add("init-loftq", "init_lora_weights \"loftq\"", "loftq|init_lora_weights")

    # 13. aLoRA / target_parameters / QALoRA
    _write_bad("alora", _lora_cfg(alora_invocation_tokens=[5, 6, 7]), _lora_tensors(g), written)
    add("alora", "alora_invocation_tokens set (activated LoRA)", "alora")
    _write_bad("target-parameters", _lora_cfg(target_parameters=["mlp.experts.gate_up_proj"]),
               _lora_tensors(g), written)
    add("target-parameters", "target_parameters set (LoRA on raw nn.Parameters)", "target_parameters")
    _write_bad("use-qalora", _lora_cfg(use_qalora=True, qalora_group_size=16), _lora_tensors(g), written)
    add("use-qalora", "use_qalora true", "qalora")

    # 14. tensor for a module the base does not have
    t = _lora_tensors(g)
    t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = 0.1 * torch.randn(4, 64, generator=g)
    t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] = 0.1 * torch.randn(128, 4, generator=g)
    _write_bad("unknown-module", _lora_cfg(target_modules=["q_proj", "v_proj", "qkv_proj"]), t, written)
    add("unknown-module", "tensors for model.layers.0.self_attn.qkv_proj (no such module)", "module|qkv_proj")

    # 15. layer index out of range
    t = _lora_tensors(g, layers=(0, 5))
    _write_bad("layer-out-of-range", _lora_cfg(), t, written)
    add("layer-out-of-range", "tensors for model.layers.5 on a 2-layer base", "layer")

    # 16. wrong hidden size: a real PEFT LoRA for a hidden-48 Llama
    from transformers import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=320, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=12, intermediate_size=96, tie_word_embeddings=False)
    torch.manual_seed(seed_of("bad", "hidden48"))
    m48 = LlamaForCausalLM(lc).eval()
    pm = get_peft_model(m48, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        task_type=TaskType.CAUSAL_LM))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(tuple(p.shape), generator=g))
    d = bad_root / "wrong-hidden-size"
    pm.save_pretrained(d)
    finish_dir(d, "some-org/tiny-llama-hidden48")
    written += sorted(p for p in d.rglob("*") if p.is_file())
    add("wrong-hidden-size", "PEFT LoRA saved for a hidden-48 Llama: lora_A [4,48], q lora_B [48,4]",
        "shape|hidden|dimension")

    # 17. wrong output dim only (lora_B rows)
    t = _lora_tensors(g)
    t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = 0.1 * torch.randn(64, 4, generator=g)
    _write_bad("wrong-out-features", _lora_cfg(), t, written)
    add("wrong-out-features", "layers.0 v_proj lora_B [64,4] but v_proj has 32 outputs", "shape|out")

    # 18. 1-D lora_A / 3-D lora_B
    t = _lora_tensors(g)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(256, generator=g)
    _write_bad("lora-a-1d", _lora_cfg(), t, written)
    add("lora-a-1d", "layers.0 q_proj lora_A is 1-D [256]", "shape|dim|rank")

    # 19. integer dtype
    t = _lora_tensors(g)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 64, dtype=torch.int32)
    _write_bad("int-dtype", _lora_cfg(), t, written)
    add("int-dtype", "layers.0 q_proj lora_A stored as I32", "dtype")

    # 20. no adapter_config.json / no weights / empty weights
    _write_bad("missing-config", None, _lora_tensors(g), written)
    add("missing-config", "no adapter_config.json", "adapter_config")
    _write_bad("missing-weights", _lora_cfg(), None, written)
    add("missing-weights", "no adapter_model.safetensors (nor .bin)", "adapter_model|safetensors|weights")
    _write_bad("no-tensors", _lora_cfg(), {}, written)
    add("no-tensors", "adapter_model.safetensors holds zero tensors", "tensor|empty")

    # 21. corrupt safetensors
    buf = bytearray(open(OUT / "bad" / "rank-mismatch" / "adapter_model.safetensors", "rb").read())
    _write_bad("safetensors-truncated", _lora_cfg(), None, written, raw_weights=bytes(buf[: len(buf) // 2]))
    add("safetensors-truncated", "adapter_model.safetensors cut in half (data offsets past EOF)",
        "safetensors|truncated|offset")
    bogus = bytearray(buf)
    bogus[0:8] = struct.pack("<Q", 1 << 40)
    _write_bad("safetensors-bad-header", _lora_cfg(), None, written, raw_weights=bytes(bogus))
    add("safetensors-bad-header", "safetensors header length field = 2^40", "safetensors|header")
    pfx = "base_model.model.model.layers.0.self_attn.q_proj"
    hdr = json.dumps({f"{pfx}.lora_A.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 999999]},
                      f"{pfx}.lora_B.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [0, 1024]}},
                     separators=(",", ":")).encode()
    _write_bad("safetensors-bad-offsets", _lora_cfg(), None, written,
               raw_weights=struct.pack("<Q", len(hdr)) + hdr + b"\0" * 64)
    add("safetensors-bad-offsets", "tensor data_offsets beyond the file / not matching shape*dtype",
        "safetensors|offset|size")

    # 22. prompt learning shape errors
    _write_bad("prompt-tuning-wrong-dim",
               {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5,
                "token_dim": 48, "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
                "inference_mode": True, "base_model_name_or_path": "tests/data/models/tiny-llama"},
               {"prompt_embeddings": 0.1 * torch.randn(5, 48, generator=g)}, written)
    add("prompt-tuning-wrong-dim", "prompt_embeddings [5,48] for a hidden-64 base", "shape|hidden|token_dim")
    _write_bad("prompt-tuning-count-mismatch",
               {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5,
                "token_dim": 64, "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
                "inference_mode": True, "base_model_name_or_path": "tests/data/models/tiny-llama"},
               {"prompt_embeddings": 0.1 * torch.randn(7, 64, generator=g)}, written)
    add("prompt-tuning-count-mismatch", "num_virtual_tokens 5 but prompt_embeddings has 7 rows",
        "num_virtual_tokens|shape")
    _write_bad("prefix-wrong-width",
               {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
                "token_dim": 32, "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2,
                "prefix_projection": False, "encoder_hidden_size": 32, "inference_mode": True,
                "base_model_name_or_path": "tests/data/models/tiny-llama"},
               {"prompt_embeddings": 0.1 * torch.randn(3, 2 * 2 * 64, generator=g)}, written)
    add("prefix-wrong-width", "prefix prompt_embeddings [3,256] but 2 layers x 2 x (2 kv heads x 16) = 128 "
        "(pre-GQA-fix layout with token_dim = hidden)", "shape|prefix|token_dim")
    _write_bad("missing-prompt-embeddings",
               {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5,
                "token_dim": 64, "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
                "inference_mode": True, "base_model_name_or_path": "tests/data/models/tiny-llama"},
               {"other": torch.zeros(5, 64)}, written)
    add("missing-prompt-embeddings", "PROMPT_TUNING without a prompt_embeddings tensor", "prompt_embeddings")

    # 23. IA3 wrong shape
    _write_bad("ia3-wrong-shape",
               {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"], "fan_in_fan_out": False, "inference_mode": True,
                "init_ia3_weights": True, "modules_to_save": None,
                "base_model_name_or_path": "tests/data/models/tiny-llama"},
               {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.ones(33, 1),
                "base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(1, 128)}, written)
    add("ia3-wrong-shape", "layers.0 k_proj ia3_l [33,1] (k_proj has 32 outputs)", "shape|ia3")

    # 24. AdaLoRA with inconsistent kept ranks
    _write_bad("adalora-rank-mismatch",
               {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": 6, "target_r": 3, "lora_alpha": 8,
                "r": 8, "target_modules": ["q_proj"], "rank_pattern": None, "inference_mode": True,
                "total_step": 100, "base_model_name_or_path": "tests/data/models/tiny-llama"},
               {"base_model.model.model.layers.0.self_attn.q_proj.lora_A": torch.randn(3, 64, generator=g),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_E": torch.randn(2, 1, generator=g),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B": torch.randn(64, 3, generator=g)},
               written)
    add("adalora-rank-mismatch", "AdaLoRA lora_A [3,64], lora_E [2,1], lora_B [64,3]", "rank|shape|lora_E")

    # 25. GGUF LoRA files
    base = load_base("tiny-llama")
    qv = OUT / "tiny-llama" / "lora-qv"
    if (qv / "adapter_model.safetensors").is_file():
        p = bad_root / "gguf-wrong-arch.gguf"
        write_gguf_lora(p, qv, "qwen2", base.config, "wrong-arch")
        written.append(p)
        add("gguf-wrong-arch", "GGUF LoRA with general.architecture=qwen2 for the llama base",
            "architecture|arch", ".gguf")
        p = bad_root / "gguf-not-adapter.gguf"
        write_gguf_lora(p, qv, "llama", base.config, "not-adapter", override_type=gguf.GGUFType.MODEL)
        written.append(p)
        add("gguf-not-adapter", "GGUF with general.type=model (a base model, not an adapter)",
            "adapter|general.type", ".gguf")

        def tamper_rank(gname, a, b):
            return (a, b[:, :3]) if gname == "blk.1.attn_v.weight" else (a, b)
        p = bad_root / "gguf-rank-mismatch.gguf"
        write_gguf_lora(p, qv, "llama", base.config, "rank-mismatch", tamper=tamper_rank)
        written.append(p)
        add("gguf-rank-mismatch", "blk.1.attn_v.weight.lora_a ne [64,4] but lora_b ne [3,32]", "rank|shape",
            ".gguf")

        p = bad_root / "gguf-unknown-tensor.gguf"
        w_tmp = bad_root / "gguf-unknown-tensor.tmp"
        write_gguf_lora(w_tmp, qv, "llama", base.config, "unknown-tensor")
        # rewrite with one extra, unknown tensor name
        r = gguf.GGUFReader(str(w_tmp))
        w = gguf.GGUFWriter(str(p), "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name("unknown-tensor")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            w.add_tensor(t.name, np.asarray(t.data, dtype=np.float32).reshape(shape))
        w.add_tensor("blk.0.attn_qkv.weight.lora_a", np.zeros((4, 64), dtype=np.float32))
        w.add_tensor("blk.0.attn_qkv.weight.lora_b", np.zeros((128, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        del r
        w_tmp.unlink()
        written.append(p)
        add("gguf-unknown-tensor", "GGUF LoRA with blk.0.attn_qkv.weight.lora_a/b (no such base tensor)",
            "tensor|attn_qkv", ".gguf")
        p = bad_root / "gguf-truncated.gguf"
        data = (OUT / "tiny-llama" / "lora-qv.gguf").read_bytes() if (OUT / "tiny-llama" / "lora-qv.gguf").is_file() \
            else (bad_root / "gguf-rank-mismatch.gguf").read_bytes()
        p.write_bytes(data[: len(data) - 1000])
        written.append(p)
        add("gguf-truncated", "GGUF LoRA cut 1000 bytes short (tensor data past EOF)", "gguf|truncated|offset",
            ".gguf")

    manifest = {"base": "tiny-llama", "note": "every case must be refused; keyword = any of the |-separated "
                "words, case-insensitive, should appear in the error message", "cases": entries}
    write_text(bad_root / "manifest.json", dump_json(manifest) + "\n")
    rows = "".join(f"| `{e['case']}` | {e['what']} | "
                   f"{' / '.join('`' + k + '`' for k in e['keyword'].split('|'))} |\n" for e in entries)
    write_text(bad_root / "README.md", BAD_README_HEAD + rows)
    written += [bad_root / "manifest.json", bad_root / "README.md"]
    print(f"  bad: {len(entries)} malformed adapters")


# --------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append",
                    help="a model (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-phi3, tiny-gemma3, smollm2), 'bad', or an adapter name "
                         f"({', '.join(ADAPTER_NAMES)}); repeatable")
    ap.add_argument("--report", type=Path, help="also write a JSON summary of keys/shapes/scales here")
    args = ap.parse_args()
    only = set(args.only or [])
    valid = set(TINY) | {"smollm2", "bad"} | set(ADAPTER_NAMES)
    if only - valid:
        ap.error(f"unknown --only {sorted(only - valid)}; choose from {sorted(valid)}")
    # --only MODEL and/or --only ADAPTER: the named tiny models (all if none named but an adapter
    # is), restricted to the named adapters (all if none named)
    if not only:
        models_sel = list(TINY)
    elif only & set(TINY):
        models_sel = [m for m in TINY if m in only]
    elif only & set(ADAPTER_NAMES):
        models_sel = list(TINY)
    else:
        models_sel = []
    adapters_sel = (only & set(ADAPTER_NAMES)) or set(ADAPTER_NAMES)

    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"gguf-py {importlib.metadata.version('gguf')}")
    written: list[Path] = []
    report: dict = {}
    for m in models_sel:
        print(f"{m}:")
        for a in adapters_for(m):
            if a in adapters_sel:
                gen_adapter(m, a, written, report)
        if m == "tiny-llama":
            for a in ("lora-qv", "lora-qk"):
                if a in adapters_sel:
                    gen_gguf_lora(m, a, written)
        if m == "tiny-qwen2" and "lora-qv" in adapters_sel:
            gen_gguf_lora(m, "lora-qv", written)
        if all((OUT / m / a / "reference.json").is_file() for a, _ in MIXED[m] if a is not None):
            gen_mixed(m, written)
    if not only or "smollm2" in only:
        print("smollm2:")
        gen_smollm2(written, report)
    if not only or "bad" in only:
        print("bad:")
        gen_bad(written)

    print("wrote:")
    total = 0
    for p in written:
        sz = p.stat().st_size
        total += sz
        print(f"  {p.relative_to(ROOT)}  {sz} bytes")
    all_sz = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file()) if OUT.exists() else 0
    print(f"total written {total} bytes; tests/data/adapters now {all_sz} bytes")
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
