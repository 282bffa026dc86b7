#!/usr/bin/env python3
"""Golden-data generator for deltaserve's bottleneck adapters (AdapterHub `adapters` package).

Runs in its own environment, .venv-adapters/ (the package pins its own transformers):
  python3 -m venv .venv-adapters
  .venv-adapters/bin/pip install adapters==1.3.0 torch==2.15.0
  .venv-adapters/bin/python tests/golden/gen_bottleneck.py

Writes, under tests/data/adapters/bottleneck/:
  <model>/bn-<kind>/adapter_config.json + adapter.safetensors   (model.save_adapter(..., use_safetensors=True))
  <model>/bn-<kind>/reference.json    logits of the model with the adapter RELOADED from those files
  <model>/mixed.json                  a mixed-batch manifest: bottleneck adapters beside the PEFT
                                      LoRA / IA³ / prompt / prefix adapters of gen_adapters.py
                                      (tests/data/adapters/<model>/<name>) and base-only sequences
  bad/<case>/ + manifest.json         malformed or unsupported AdapterHub directories
  activations.json                    every accepted non_linearity on a grid of inputs
  smollm2/bn-*/                       adapters for models/SmolLM2-135M-Instruct.Q4_1.gguf (bf16) with the
                                      package's greedy continuations (needs `gguf` and `accelerate` too;
                                      argument smollm2=<name> makes that one only)
for <model> in tiny-llama, tiny-qwen2 (tests/data/models/, made by gen_models.py). reference.json has
the schema of gen_adapters.py's (cases → prompt, prefill_logits, decode[{token, logits}]).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_json import dump_json, round_row, write_text  # noqa: E402  (the golden JSON style)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
PEFT = ROOT / "tests" / "data" / "adapters"   # gen_adapters.py's PEFT adapters (for the mixed batch)
OUT = PEFT / "bottleneck"

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import adapters  # noqa: E402
from adapters import (  # noqa: E402
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    ConfigUnion,
    DoubleSeqBnConfig,
    LoRAConfig,
    MAMConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    UniPELTConfig,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

N_DECODE = 4
PROMPT_LENS = (7, 1)


# ---- utilities (the JSON style is golden_json.py's: it needs only numpy, no peft or gguf) ----
def seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def tensor_summary(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return {k: f"{v['dtype']} {v['shape']}" for k, v in sorted(hdr.items())}


def load_base(name: str):
    m = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


# ---- the adapters ----
# name → (config, models). Every kind the slice supports, with non-default options spread over them.
def configs() -> dict:
    return {
        # Pfeiffer: FFN output only, input o + x (original_ln_before), relu
        "bn-seq": (SeqBnConfig(reduction_factor=8), ("tiny-llama", "tiny-qwen2")),
        # Houlsby: attention and FFN outputs, input o, swish
        "bn-double-seq": (DoubleSeqBnConfig(reduction_factor=8), ("tiny-llama", "tiny-qwen2")),
        # parallel, scaling 1
        "bn-par": (ParBnConfig(reduction_factor=4, scaling=1.0), ("tiny-llama",)),
        # scaled parallel (He et al.: s = 4), on both sites
        "bn-par-scaled": (ParBnConfig(reduction_factor=4, scaling=4.0, mh_adapter=True), ("tiny-llama",)),
        # scaled parallel with a learned scalar, tanh
        "bn-par-learned": (ParBnConfig(reduction_factor=4, scaling="learned", non_linearity="tanh"),
                           ("tiny-llama", "tiny-qwen2")),
        # per-layer reduction factors, erf gelu, both sites
        "bn-rf-dict": (SeqBnConfig(reduction_factor={"1": 4, "default": 32}, mh_adapter=True,
                                   non_linearity="gelu"), ("tiny-llama",)),
        # leave_out layer 0, tanh-approximate gelu
        "bn-leave-out": (DoubleSeqBnConfig(reduction_factor=16, leave_out=[0], non_linearity="gelu_new"),
                         ("tiny-llama", "tiny-qwen2")),
        # the adapter's own LayerNorm after the bottleneck, residual inside it, channel scaling,
        # residual = the adapter input (residual_before_ln false), sigmoid
        "bn-ln": (BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=8, non_linearity="sigmoid",
                           original_ln_before=True, residual_before_ln=False, ln_after=True,
                           adapter_residual_before_ln=True, scaling="channel"), ("tiny-llama", "tiny-qwen2")),
        # AdapterPlus: original_ln_after false (Llama only: the package refuses it on hooked models
        # such as Qwen2), channel scaling, gelu; stochastic depth is training-only (0 here: it needs torchvision)
        "bn-plus": (AdapterPlusConfig(reduction_factor=8, stochastic_depth=0.0), ("tiny-llama",)),
        # the adapter's own LayerNorm BEFORE the bottleneck, quick_gelu. The package cannot write this
        # one as safetensors (adapter_down.0 IS adapter_norm_before: shared tensors), so it is saved as
        # pytorch_adapter.bin and re-saved as safetensors with both names, as a user would.
        "bn-ln-before": (SeqBnConfig(reduction_factor=8, ln_before=True, original_ln_before=False,
                                     non_linearity="quick_gelu"), ("tiny-llama",)),
        # MAM (He et al.): prefix tuning (reparametrised by its tanh MLP; a smaller bottleneck than the
        # default 800 to keep the files small) + a scaled parallel adapter (s = 4) on the FFN. The package
        # supports prefix tuning on Llama only (its Qwen2 interface lists no prefix_tuning).
        "bn-mam": (MAMConfig(PrefixTuningConfig(bottleneck_size=48, prefix_length=12)), ("tiny-llama",)),
        # a union of a flat prefix (longer than a KV block) and a sequential adapter with erf gelu
        "bn-union-seq": (ConfigUnion(PrefixTuningConfig(flat=True, prefix_length=19),
                                     SeqBnConfig(reduction_factor=8, non_linearity="gelu")), ("tiny-llama",)),
        # AdapterHub prefix tuning alone (relu MLP), beside PEFT's prefix tuning in the mixed batch
        "ah-prefix": (PrefixTuningConfig(prefix_length=20, bottleneck_size=32, non_linearity="relu"),
                      ("tiny-llama",)),
    }


def randomize(model, name: str, seed: int, amp: float = 1.0) -> None:
    """Non-zero random values in every adapter parameter (the package's inits zero the up-projection);
    amp scales the projection weights. Prefix-tuning parameters (one shared pool, listed once by
    named_parameters) get K/V of order amp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".prefix_tunings.{name}." in n:
                shape = tuple(p.shape)
                if n.endswith("wte.weight") or n.endswith("control_trans"):
                    v = torch.randn(shape, generator=g)
                elif n.endswith("bias"):
                    v = 0.1 * torch.randn(shape, generator=g)
                else:  # the MLP's Linear weights; amp scales the prefix K/V it makes
                    v = torch.randn(shape, generator=g) * ((amp if n.endswith("2.weight") else 1.0) * 1.5
                                                           / math.sqrt(shape[-1]))
                p.copy_(v)
                continue
            if f".adapters.{name}." not in n:
                continue
            shape = tuple(p.shape)
            if n.endswith("scaling"):
                v = (1.5 + 0.5 * torch.rand(shape, generator=g)) if p.numel() == 1 else \
                    (1.0 + 0.3 * torch.randn(shape, generator=g))
            elif "adapter_norm" in n and n.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(shape, generator=g)
            elif n.endswith("bias") or len(shape) < 2:
                v = 0.1 * torch.randn(shape, generator=g)
            else:  # Linear weight [out, in]
                v = torch.randn(shape, generator=g) * (amp * 0.8 / math.sqrt(shape[-1]))
            p.copy_(v)


@torch.no_grad()
def full_logits(model, ids) -> np.ndarray:
    x = torch.tensor([ids], dtype=torch.long)
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().numpy()


@torch.no_grad()
def run_case(model, prompt) -> dict:
    prefill = full_logits(model, prompt)
    last, ids, decode, margins = prefill[-1], list(prompt), [], []
    for _ in range(N_DECODE):
        s = np.sort(last)
        margins.append(float(s[-1] - s[-2]))
        tok = int(np.argmax(last))
        ids.append(tok)
        lg = full_logits(model, ids)
        assert np.max(np.abs(lg[:len(prompt)] - prefill)) <= 1e-4 * max(1.0, float(np.max(np.abs(prefill))))
        last = lg[-1].copy()
        decode.append({"token": tok, "logits": last})
    return {"prompt": prompt, "prefill": prefill, "decode": decode, "_margins": margins}


def pick_prompts(model, vocab: int, seed: int) -> list:
    prompts = []
    for pi, n in enumerate(PROMPT_LENS):
        best = None
        for attempt in range(200):
            rng = np.random.default_rng([seed, pi, attempt])
            ids = [int(i) for i in rng.integers(3, vocab, size=n)]
            if n >= 7:
                ids[4] = vocab - 1
            case = run_case(model, ids)
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
    mx = max(float(np.max(np.abs(case["prefill"]))), max(float(np.max(np.abs(d["logits"]))) for d in case["decode"]))
    seq = list(case["prompt"]) + [d["token"] for d in case["decode"]]
    base = full_logits(base_model, seq)
    mine = np.concatenate([case["prefill"], np.stack([d["logits"] for d in case["decode"]])], 0)
    return {
        "prompt": case["prompt"],
        "max_abs_logit": mx,
        "greedy_margins": case["_margins"],
        "max_abs_delta_vs_base": float(np.max(np.abs(base - mine))),
        "prefill_logits": [round_row(r) for r in case["prefill"]],
        "decode": [{"token": d["token"], "logits": round_row(d["logits"])} for d in case["decode"]],
    }


def check_base(model_name: str, base) -> None:
    """This transformers (pinned by `adapters`) must compute the base model as the base reference does."""
    ref = json.loads((MODELS / model_name / "reference.json").read_text())
    c = ref["cases"][0]
    lg = full_logits(base, c["prompt"])
    want = np.asarray(c["prefill_logits"], dtype=np.float32)
    err = float(np.max(np.abs(lg - want)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), (model_name, err)


def has_shared_tensors(cfg) -> bool:
    """Configs whose saved state dict has one tensor under several names: ln_before (adapter_down.0 IS
    adapter_norm_before) and prefix tuning (the pool is referenced from every layer)."""
    members = list(cfg.configs) if isinstance(cfg, ConfigUnion) else [cfg]
    return any(m.architecture == "prefix_tuning" or (m.architecture in (None, "bottleneck") and m["ln_before"])
               for m in members)


def ds_type(cfg) -> str:
    """The type deltaserve reports for the config (ds_adapter.peft_type, /v1/adapters)."""
    members = list(cfg.configs) if isinstance(cfg, ConfigUnion) else [cfg]
    prefix = any(m.architecture == "prefix_tuning" for m in members)
    bn = [m for m in members if m.architecture in (None, "bottleneck")]
    if not prefix:
        return "BOTTLENECK"
    return "AH_PREFIX_TUNING" if not bn else "MAM" if bn[0]["is_parallel"] else "PREFIX+BOTTLENECK"


def save_st(model, d: Path, name: str, shared: bool, pool_only: bool = False) -> None:
    """save_adapter as safetensors. The package refuses safetensors for shared tensors, so those are
    saved as pytorch_adapter.bin and re-saved as safetensors with every name, as a user would;
    pool_only keeps the prefix pool's tensors under model.prefix_tuning.* only (one copy instead of
    one per layer, as safetensors' save_model would dedupe them; the package loads either)."""
    if not shared:
        model.save_adapter(str(d), name, with_head=False, use_safetensors=True)
        return
    model.save_adapter(str(d), name, with_head=False, use_safetensors=False)
    sd = torch.load(d / "pytorch_adapter.bin", weights_only=True)  # our own file, just written
    if pool_only:
        sd = {k: v for k, v in sd.items() if ".self_attn.prefix_tuning.pool." not in k}
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, d / "adapter.safetensors")
    (d / "pytorch_adapter.bin").unlink()


def gen_one(model_name: str, name: str, cfg, written: list) -> None:
    d = OUT / model_name / name
    if d.exists():
        shutil.rmtree(d)
    base = load_base(model_name)
    check_base(model_name, base)
    adapters.init(base)
    torch.manual_seed(seed_of(model_name, name, "init"))
    base.add_adapter(name, config=cfg)
    randomize(base, name, seed_of(model_name, name))
    base.set_active_adapters(name)
    base.eval()
    d.mkdir(parents=True)
    save_st(base, d, name, shared=has_shared_tensors(cfg))
    cfg_json = json.loads((d / "adapter_config.json").read_text())
    cfg_json["model_name"] = f"tests/data/models/{model_name}"
    write_text(d / "adapter_config.json", json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")

    # reference = the adapter as the package loads it back from these files
    m2 = load_base(model_name)
    adapters.init(m2)
    loaded = m2.load_adapter(str(d), use_safetensors=True)
    m2.set_active_adapters(loaded)
    m2.eval()
    probe = [5, 17, 33, 250, 7, 99]
    a, b = full_logits(base, probe), full_logits(m2, probe)
    assert float(np.max(np.abs(a - b))) <= 1e-5 * max(1.0, float(np.max(np.abs(a)))), (model_name, name)

    base_ref = load_base(model_name)
    vocab = base_ref.config.vocab_size
    prompts = pick_prompts(m2, vocab, seed_of(model_name, name, "prompts"))
    cases = [case_to_json(run_case(m2, p), base_ref) for p in prompts]
    for c in cases:
        assert c["max_abs_delta_vs_base"] > 0.05, (model_name, name, c["max_abs_delta_vs_base"])
    ref = {
        "adapter": name,
        "base": model_name,
        "peft_type": ds_type(cfg),
        "n_vocab": vocab,
        "adapters_version": adapters.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tensors": tensor_summary(d / "adapter.safetensors"),
        "tolerance_note": ("fp32 CPU logits of the base with the adapter RELOADED by the `adapters` package "
                           "(load_adapter on these files, eager attention); decode[k].logits is the last row of "
                           "a full forward of prompt + decode[0..k].token. Expect 1e-4 * max(1, max_abs_logit)."),
        "cases": cases,
    }
    write_text(d / "reference.json", dump_json(ref) + "\n")
    written += sorted(p for p in d.rglob("*") if p.is_file())
    print(f"  {model_name}/{name}: {len(ref['tensors'])} tensors, max|delta vs base| "
          + ", ".join("%.3g" % c["max_abs_delta_vs_base"] for c in cases))


MIXED = {
    "tiny-llama": [("bn-seq", 0), ("lora-qv", 0), ("bn-double-seq", 1), ("ia3", 1), ("bn-par-learned", 0),
                   ("prompt-tuning", 0), ("bn-par-scaled", 1), ("prefix", 0), ("bn-rf-dict", 0), (None, 0),
                   ("bn-leave-out", 1), ("bn-ln", 0), ("dora", 1), ("bn-plus", 0), ("bn-par", 1),
                   ("bn-ln-before", 0), ("bn-mam", 0), ("ah-prefix", 1), ("bn-union-seq", 0), ("bn-mam", 1)],
    "tiny-qwen2": [("bn-seq", 0), ("lora-qv", 0), ("bn-double-seq", 1), ("ia3", 1), ("bn-par-learned", 0),
                   ("prompt-tuning", 0), ("bn-leave-out", 1), ("prefix", 0), (None, 0), ("bn-ln", 0),
                   ("bn-seq", 1)],
}


def gen_mixed(model_name: str, written: list) -> None:
    entries = []
    for adapter, case in MIXED[model_name]:
        refp = (MODELS / model_name / "reference.json") if adapter is None else \
            (OUT / model_name / adapter / "reference.json") if adapter.startswith(("bn-", "ah-")) else \
            (PEFT / model_name / adapter / "reference.json")
        assert refp.is_file(), refp
        assert case < len(json.loads(refp.read_text())["cases"])
        entries.append({"adapter": adapter, "case": case})
    doc = {"base": model_name,
           "note": ("Run all entries as ONE batch; bn-* / ah-* are the AdapterHub adapters beside this file, the others "
                    "PEFT LoRA / IA3 / prompt-tuning / prefix adapters under tests/data/adapters/<base>/ "
                    "(gen_adapters.py); null = base-only (tests/data/models/<base>/reference.json)."),
           "entries": entries}
    p = OUT / model_name / "mixed.json"
    write_text(p, dump_json(doc) + "\n")
    written.append(p)


# ---- activations: every non_linearity name the package accepts (but the learned ones) ----
ACT_NAMES = ["relu", "ReLU", "relu2", "relu6", "leaky_relu", "leakyrelu", "gelu", "gelu_python", "gelu_10",
             "gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate", "gelu_fast", "quick_gelu",
             "silu", "swish", "sigmoid", "tanh", "mish", "laplace", "linear", None]


def gen_activations(written: list) -> None:
    from adapters.methods.modeling import Activation_Function_Class
    x = torch.tensor([-30.0, -12.0] + [float(v) for v in np.linspace(-8, 8, 33)] + [12.0, 30.0, 1e-3, -1e-3])
    out = {"note": ("y = the package's Activation_Function_Class(non_linearity)(x), fp32; non_linearity null "
                    "is the identity (key \"null\"); names are lower-cased by the package"),
           "x": [float(v) for v in x], "y": {}}
    for name in ACT_NAMES:
        with torch.no_grad():
            y = Activation_Function_Class(name.lower() if name else None)(x)
        out["y"][name if name else "null"] = [float(v) for v in y.float()]
    p = OUT / "activations.json"
    write_text(p, dump_json(out) + "\n")
    written.append(p)


# ---- SmolLM2-135M-Instruct (the default model): greedy continuations ----
SMOLLM2_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_NEW_TOKENS = 16
SMOL_MIN_MARGIN = 0.05


def smol_configs(n_layer: int) -> dict:
    def only(*keep):
        return [i for i in range(n_layer) if i not in keep]
    # a few layers each, to keep the files small (bf16, bottleneck 18 = 576 / 32)
    # name → (config, amplitude of the random projection weights: weak enough that the continuation
    # stays language, strong enough to change it)
    return {
        "bn-seq": (SeqBnConfig(reduction_factor=32, leave_out=only(0, 10, 20, 29)), 0.6),
        "bn-double-seq": (DoubleSeqBnConfig(reduction_factor=32, leave_out=only(5, 15, 25)), 1.0),
        "bn-par-scaled": (ParBnConfig(reduction_factor=32, scaling=4.0, mh_adapter=True,
                                      leave_out=only(2, 12, 22)), 0.3),
        # MAM: a short prefix on every layer (its reparametrisation MLP kept small) + the scaled
        # parallel adapter on a few FFNs
        "bn-mam": (MAMConfig(PrefixTuningConfig(bottleneck_size=16, prefix_length=6),
                             ParBnConfig(reduction_factor=32, leave_out=only(4, 14, 24))), 0.3),
    }


def gen_smollm2(written: list, names=()) -> None:
    if not SMOLLM2_GGUF.is_file():
        print(f"smollm2: skipped ({SMOLLM2_GGUF.relative_to(ROOT)} absent; run scripts/fetch_model.sh)")
        return
    gdir, gname = str(SMOLLM2_GGUF.parent), SMOLLM2_GGUF.name

    def load():
        m = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                 attn_implementation="eager")
        m.eval()
        return m

    # the prompts (ids) and base greedy tokens of tests/data/models/smollm2/reference.json
    mref = json.loads((MODELS / "smollm2" / "reference.json").read_text())
    prompts = [(c["kind"], c["prompt"]) for c in mref["cases"] if c["kind"] in ("plain", "chat")]
    base = load()
    eos = base.config.eos_token_id

    @torch.no_grad()
    def greedy(model, ids):
        x = torch.tensor([ids])
        # use_cache=False: in adapters 1.3.0 + transformers 4.57.6 the Llama decoder layer with adapters
        # takes `past_key_value` while LlamaModel passes `past_key_values`, so a cached decode step
        # attends to itself only (logits off by ~3.5 on tiny-llama, any adapter type). Without the
        # cache every step is a full forward: the adapter math as the package defines it.
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=SMOL_NEW_TOKENS, pad_token_id=eos, use_cache=False)
        return [int(t) for t in gen[0, len(ids):].tolist()]

    @torch.no_grad()
    def margins_of(model, ids, new):
        out, seq = [], list(ids)
        for t in new:
            x = torch.tensor([seq])
            last = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float().numpy()
            s = np.sort(last)
            out.append(float(s[-1] - s[-2]) if int(np.argmax(last)) == t else -1.0)  # -1: generate disagrees
            seq.append(t)
        return out

    base_greedy = {k: greedy(base, ids) for k, ids in prompts}
    for c in mref["cases"]:
        if c["kind"] in base_greedy:
            assert base_greedy[c["kind"]] == c["greedy"]["tokens"][:SMOL_NEW_TOKENS], c["kind"]
    for name, (cfg, amp) in smol_configs(base.config.num_hidden_layers).items():
        if names and name not in names:
            continue
        d = OUT / "smollm2" / name
        if d.exists():
            shutil.rmtree(d)
        chosen = None
        for attempt in range(12):
            m = load()
            adapters.init(m)
            m.add_adapter(name, config=cfg)
            randomize(m, name, seed_of("smollm2", name, attempt), amp=amp)
            with torch.no_grad():  # stored as bf16: round first so that the reference is exact
                for n, p in m.named_parameters():
                    if f".adapters.{name}." in n:
                        p.copy_(p.to(torch.bfloat16).float())
            m.set_active_adapters(name)
            m.eval()
            outs = {k: greedy(m, ids) for k, ids in prompts}
            if all(outs[k] != base_greedy[k] for k in outs):
                mm = min(min(margins_of(m, ids, outs[k])) for k, ids in prompts)
                print(f"  smollm2/{name} attempt {attempt}: min margin {mm:.3g}")
                if mm >= SMOL_MIN_MARGIN:
                    chosen = m
                    break
        if chosen is None:
            raise RuntimeError(f"smollm2/{name}: no seed changed the output with clear margins")
        d.mkdir(parents=True)
        save_st(chosen, d, name, shared=has_shared_tensors(cfg), pool_only=True)
        sd = load_file(d / "adapter.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, d / "adapter.safetensors")
        cfg_json = json.loads((d / "adapter_config.json").read_text())
        cfg_json["model_name"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        write_text(d / "adapter_config.json", json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        m2 = load()
        adapters.init(m2)
        m2.set_active_adapters(m2.load_adapter(str(d), use_safetensors=True))
        m2.eval()
        cases = []
        for kind, ids in prompts:
            new = greedy(m2, ids)
            cases.append({"kind": kind, "prompt": ids,
                          "greedy": {"max_new_tokens": SMOL_NEW_TOKENS, "tokens": new,
                                     "stopped_at_eos": bool(new and new[-1] == eos),
                                     "margins": margins_of(m2, ids, new)},
                          "base_greedy_tokens": base_greedy[kind]})
            assert min(cases[-1]["greedy"]["margins"]) >= SMOL_MIN_MARGIN, (name, kind)
        ref = {"adapter": name, "base": "smollm2", "base_file": f"models/{SMOLLM2_GGUF.name}",
               "peft_type": "BOTTLENECK", "adapters_version": adapters.__version__,
               "transformers_version": transformers.__version__, "torch_version": torch.__version__,
               "storage_dtype": "bfloat16", "tensors": tensor_summary(d / "adapter.safetensors"),
               "tolerance_note": ("greedy.tokens from generate(do_sample=False) with the adapter reloaded from "
                                  "this directory (bf16 tensors upcast to fp32) on transformers' dequantisation "
                                  "of the Q4_1 GGUF, fp32 CPU, eager attention; checked equal to the argmax of a "
                                  "full forward at every step; margins = top1 - top2 at each step."),
               "cases": cases}
        write_text(d / "reference.json", dump_json(ref) + "\n")
        written += sorted(p for p in d.rglob("*") if p.is_file())
        print(f"  smollm2/{name}: " + "; ".join(f"{c['kind']} {c['greedy']['tokens'][:6]}... (base "
                                               f"{c['base_greedy_tokens'][:6]}...)" for c in cases))


# ---- malformed / unsupported directories ----
def gen_bad(written: list) -> None:
    root = OUT / "bad"
    if root.exists():
        shutil.rmtree(root)
    manifest = []

    def saved(case: str, cfg, expect: str, note: str, mutate=None, model_name="tiny-llama"):
        m = load_base(model_name)
        adapters.init(m)
        torch.manual_seed(seed_of("bad", case, "init"))  # the parameters randomize() leaves (Compacter's)
        m.add_adapter("a", config=cfg)
        randomize(m, "a", seed_of("bad", case))
        d = root / case
        d.mkdir(parents=True, exist_ok=True)
        m.save_adapter(str(d), "a", with_head=False, use_safetensors=True)
        if mutate:
            mutate(d)
        manifest.append({"case": case, "base": model_name, "expect": expect, "note": note})

    def config_only(case: str, cfg, expect: str, note: str):
        """Configs whose weights the package cannot write as safetensors (tensors shared between
        modules): the real adapter_config.json beside a small placeholder tensor file."""
        import tempfile
        m = load_base("tiny-llama")
        adapters.init(m)
        m.add_adapter("a", config=cfg)
        with tempfile.TemporaryDirectory() as tmp:
            m.save_adapter(tmp, "a", with_head=False, use_safetensors=False)
            d = root / case
            d.mkdir(parents=True)
            shutil.copy(Path(tmp) / "adapter_config.json", d / "adapter_config.json")
        save_file({"placeholder": torch.zeros(1)}, d / "adapter.safetensors")
        manifest.append({"case": case, "base": "tiny-llama", "expect": expect, "note": note})

    def edit_cfg(fn):
        def go(d):
            c = json.loads((d / "adapter_config.json").read_text())
            fn(c)
            (d / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        return go

    def edit_st(fn):
        def go(d):
            sd = load_file(d / "adapter.safetensors")
            fn(sd)
            save_file(sd, d / "adapter.safetensors")
        return go

    saved("compacter", CompacterConfig(reduction_factor=4), "Compacter|phm", "CompacterConfig (PHM layers)")
    config_only("unipelt", UniPELTConfig(), "UniPELT", "UniPELTConfig (a union of LoRA, prefix tuning and a "
                "sequential adapter, with gating)")
    config_only("prefix-gating", PrefixTuningConfig(use_gating=True), "use_gating", "prefix tuning with gating")
    config_only("prefix-leave-out", PrefixTuningConfig(leave_out=[0]), "leave_out",
                "prefix tuning on some layers only (leave_out [0])")
    config_only("union-two-bn", ConfigUnion(SeqBnConfig(mh_adapter=False, output_adapter=True),
                                            ParBnConfig(mh_adapter=True, output_adapter=False)),
                "member", "a union of two bottleneck configs")
    saved("gating", SeqBnConfig(use_gating=True), "use_gating", "SeqBnConfig with use_gating (UniPELT gate)")
    saved("inv-adapter", SeqBnInvConfig(), "inv_adapter", "SeqBnInvConfig: invertible adapter after the embeddings")
    saved("lora", LoRAConfig(), "lora", "AdapterHub LoRA: not a bottleneck")
    saved("post-add", SeqBnConfig(), "post_add", "residual_before_ln \"post_add\" (the package itself fails on "
          "Llama/Qwen2: no layer norm to add after)", edit_cfg(lambda c: c["config"].update(residual_before_ln="post_add")))
    saved("prelu", SeqBnConfig(), "prelu", "non_linearity prelu (a learned activation)",
          edit_cfg(lambda c: c["config"].update(non_linearity="prelu")))
    saved("bad-act", SeqBnConfig(), "non_linearity", "non_linearity \"foo\"",
          edit_cfg(lambda c: c["config"].update(non_linearity="foo")))
    saved("unknown-key", SeqBnConfig(), "frobnicate", "unknown config key \"frobnicate\"",
          edit_cfg(lambda c: c["config"].update(frobnicate=True)))
    saved("hidden-size", SeqBnConfig(), "hidden_size", "hidden_size 48 in the config",
          edit_cfg(lambda c: c.update(hidden_size=48)))
    saved("rf-mismatch", SeqBnConfig(reduction_factor=8), "reduction_factor|shape",
          "config reduction_factor 4 but tensors of bottleneck 8",
          edit_cfg(lambda c: c["config"].update(reduction_factor=4)))
    saved("missing-up", SeqBnConfig(), "adapter_up", "layers.1 adapter_up.weight removed",
          edit_st(lambda sd: sd.pop("model.layers.1.output_adapters.adapters.a.adapter_up.weight")))
    saved("wrong-shape", SeqBnConfig(), "shape", "layers.0 adapter_down.0.weight [4, 32]",
          edit_st(lambda sd: sd.update({"model.layers.0.output_adapters.adapters.a.adapter_down.0.weight":
                                        torch.ones(4, 32)})))
    saved("leave-out-tensors", SeqBnConfig(leave_out=[]), "leave_out",
          "config leave_out [0] but tensors for layer 0",
          edit_cfg(lambda c: c["config"].update(leave_out=[0])))
    saved("layer-range", SeqBnConfig(), "layer", "tensors for model.layers.7 on a 2-layer base",
          edit_st(lambda sd: sd.update({k.replace("layers.1.", "layers.7."): v.clone() for k, v in list(sd.items())
                                        if "layers.1." in k})))
    saved("nan", SeqBnConfig(), "finite", "a NaN in layers.0 adapter_up.bias",
          edit_st(lambda sd: sd["model.layers.0.output_adapters.adapters.a.adapter_up.bias"].__setitem__(0, float("nan"))))
    saved("orig-ln-after-qwen2", SeqBnConfig(), "original_ln_after",
          "original_ln_after false on Qwen2 (the package refuses it on hooked models)",
          edit_cfg(lambda c: c["config"].update(original_ln_after=False)), model_name="tiny-qwen2")

    # a MAM adapter whose layer-1 copy of the shared prefix pool differs from the others
    def mam_saved(case, expect, note, mutate, model_name="tiny-llama", cfg_edit=None):
        m = load_base("tiny-llama")
        adapters.init(m)
        m.add_adapter("a", config=MAMConfig(PrefixTuningConfig(bottleneck_size=8, prefix_length=3)))
        randomize(m, "a", seed_of("bad", case))
        d = root / case
        d.mkdir(parents=True)
        save_st(m, d, "a", shared=True)
        if mutate:
            mutate(d)
        if cfg_edit:
            edit_cfg(cfg_edit)(d)
        manifest.append({"case": case, "base": model_name, "expect": expect, "note": note})

    mam_saved("prefix-copy-differs", "differs", "MAM: layer 1's copy of the prefix pool's wte differs",
              edit_st(lambda sd: sd["model.layers.1.self_attn.prefix_tuning.pool.prefix_tunings.a.self_prefix."
                                    "wte.weight"].__setitem__((0, 0), 9.0)))
    mam_saved("prefix-missing", "missing", "MAM without the prefix MLP's second layer (every copy removed)",
              edit_st(lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("control_trans.2.weight")]))
    mam_saved("mam-qwen2", "Llama only", "MAM on Qwen2 (the package supports prefix tuning on Llama only)", None,
              model_name="tiny-qwen2", cfg_edit=lambda c: c.update(model_type="qwen2"))

    # pytorch_adapter.bin only: deltaserve must refuse it without unpickling (the bytes are not even a pickle)
    d = root / "pytorch-bin"
    d.mkdir(parents=True)
    shutil.copy(root / "compacter" / "adapter_config.json", d / "adapter_config.json")
    c = json.loads((d / "adapter_config.json").read_text())
    c["config"] = SeqBnConfig().to_dict()
    (d / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (d / "pytorch_adapter.bin").write_bytes(b"not a pickle: deltaserve must never open this as one\n")
    manifest.append({"case": "pytorch-bin", "base": "tiny-llama", "expect": "safetensors",
                     "note": "only pytorch_adapter.bin (refused, with how to re-save as safetensors)"})

    for case_dir in sorted(root.iterdir()):
        for f in case_dir.iterdir():
            if f.name == "adapter_config.json":
                c = json.loads(f.read_text())
                c["model_name"] = "tests/data/models/" + next(m["base"] for m in manifest if m["case"] == case_dir.name)
                f.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
            if f.name == "adapter_interface.json":
                pass
    write_text(root / "manifest.json", dump_json({"note": "ds_adapter_load must fail; the message must match "
                                                  "`expect` (a regex, case-insensitive)", "cases": manifest}) + "\n")
    written += sorted(p for p in root.rglob("*") if p.is_file())
    print(f"  bad: {len(manifest)} cases")


def main() -> int:
    only = sys.argv[1:]
    written: list = []
    for name, (cfg, models) in configs().items():
        if only and name not in only and "all" not in only:
            continue
        for m in models:
            gen_one(m, name, cfg, written)
    if not only or "all" in only:
        for m in MIXED:
            gen_mixed(m, written)
    if not only or "bad" in only or "all" in only:
        gen_bad(written)
    if not only or "activations" in only or "all" in only:
        gen_activations(written)
    smol = [a.split("=", 1)[1] for a in only if a.startswith("smollm2=")]  # e.g. smollm2=bn-mam
    if not only or "smollm2" in only or "all" in only or smol:
        gen_smollm2(written, smol)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files, {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
