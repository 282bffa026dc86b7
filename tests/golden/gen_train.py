#!/usr/bin/env python3
"""Golden-data generator for deltaserve's adapter TRAINING core (src/train/).

For each case (a tiny base model + a PEFT adapter with NON-ZERO seeded initial weights, lora_B
included) it writes under tests/data/train/<case>/:
  adapter/adapter_config.json + adapter_model.safetensors   the initial adapter (save_pretrained)
  reference.json                                            loss, gradients, AdamW trajectory
and tests/data/train/schedules.json (HF learning-rate schedule multipliers).

reference.json schema (floats with 8 significant digits):
{
  "case", "model", "peft_type", "transformers_version", "torch_version", "peft_version",
  "examples": [{"tokens": [ids], "labels": [ids or -100]}],    // HF convention: labels[i] is the
        // target of the logits at position i-1 (HF shifts internally); prompt tuning adds P -100s
  "n_label_tokens": N,            // targets that count (after the shift)
  "loss": f,                      // HF loss of the padded batch = sum CE / N (masked mean)
  "grad_norm": f,                 // global L2 norm of every adapter gradient
  "params": {key: {"shape": [..], "values": [..]}},   // initial values, PEFT save keys
  "grads": {key: [..]},           // d loss / d param, flattened row-major
  "adamw": {"lr", "betas", "eps", "weight_decay",
            "steps": [{"loss": f, "params": {key: [..]}, "grads"?: {key: [..]}}]}
                                  // 3 steps on the same batch: loss before the step, parameters
                                  // after it, and (adapters <= 2048 floats) the gradient it used
}

Usage (from the repo root):
  python3 tests/golden/gen_train.py                 # every case (~20 s on 2 cores)
  python3 tests/golden/gen_train.py --only lora-qv  # one case
  python3 tests/golden/gen_train.py --verify-interop DIR
      DIR was written by test_train_interop (DS_TRAIN_INTEROP_DIR=DIR): each sub-directory holds an
      adapter deltaserve trained and saved (adapter_config.json + adapter_model.safetensors) plus
      deltaserve_logits.json (the base model, the prompt, deltaserve's logits); PEFT loads the
      adapter and must reproduce the logits within 1e-4 * max(1, max|logit|).

Deterministic: fixed seeds, one CPU thread, eager attention, fp32.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
OUT = ROOT / "tests" / "data" / "train"

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import (LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType,  # noqa: E402
                  get_peft_model)
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.optimization import (get_cosine_schedule_with_warmup,  # noqa: E402
                                       get_linear_schedule_with_warmup)

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

LENGTHS = (7, 10)
N_MASKED = 3          # the first 3 label positions of every example are -100 ("prompt")
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
N_ADAM_STEPS = 3
STEP_GRADS_MAX = 2048  # adapters up to this many floats record each AdamW step's gradient

# case -> (model, peft config factory, options)
CASES = {
    "lora-qv": ("tiny-llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type=TaskType.CAUSAL_LM), {}),
    "lora-all-rslora": ("tiny-llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         use_rslora=True, lora_dropout=0.0,
                                                         task_type=TaskType.CAUSAL_LM), {}),
    "lora-qwen2-qkvo": ("tiny-qwen2", lambda: LoraConfig(r=4, lora_alpha=16,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         lora_dropout=0.0, task_type=TaskType.CAUSAL_LM), {}),
    "lora-gate-head": ("tiny-llama", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "lm_head"],
                                                        lora_dropout=0.0, task_type=TaskType.CAUSAL_LM), {}),
    "lora-embed": ("tiny-llama", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"],
                                                    lora_dropout=0.0, task_type=TaskType.CAUSAL_LM), {}),
    "prompt-tuning": ("tiny-llama", lambda: PromptTuningConfig(num_virtual_tokens=4,
                                                               task_type=TaskType.CAUSAL_LM), {}),
    # every label kept: the last virtual row then predicts the first real token (PEFT pads the
    # labels with P x -100 before HF's shift)
    "prompt-tuning-nomask": ("tiny-llama", lambda: PromptTuningConfig(num_virtual_tokens=4,
                                                                      task_type=TaskType.CAUSAL_LM),
                             {"n_masked": 0, "adam": False}),
    "prefix": ("tiny-llama", lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=False,
                                                        task_type=TaskType.CAUSAL_LM), {}),
}


# --------------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError("non-finite value in golden data")
    s = "%.8g" % x
    return "0" if s == "-0" else s


def dump(obj, indent: int = 0) -> str:
    """Compact-but-diffable JSON: scalar lists on one line, everything else indented."""
    pad, pad2 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        return "{\n" + ",\n".join(f"{pad2}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in obj.items()) + \
            "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ",".join(dump(v) for v in obj) + "]"
        return "[\n" + ",\n".join(pad2 + dump(v, indent + 1) for v in obj) + "\n" + pad + "]"
    if isinstance(obj, bool) or obj is None:
        return json.dumps(obj)
    if isinstance(obj, float):
        return fmt(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    if isinstance(obj, str):
        return json.dumps(obj)
    raise TypeError(type(obj))


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def load_base(name: str):
    m = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32, attn_implementation="eager")
    m.eval()  # no dropout anywhere (all dropouts are 0 anyway); gradients still flow
    return m


def save_key(name: str) -> str:
    """named_parameters() name -> the key save_pretrained writes."""
    if name.startswith("prompt_encoder."):
        return "prompt_embeddings"
    return name.replace(".default", "")


def trainable(pm) -> list:
    return [(save_key(n), p) for n, p in pm.named_parameters() if p.requires_grad]


def randomize(pm, case: str) -> None:
    g = torch.Generator().manual_seed(seed_of("train", case))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_A." in n or ".lora_B." in n or ".lora_embedding_" in n:
                std = 0.1
            elif "prompt_encoder" in n:
                std = 1.0 if case.startswith("prefix") else 0.5
            else:
                raise KeyError(n)
            p.copy_(std * torch.randn(tuple(p.shape), generator=g))


def make_examples(case: str, vocab: int, n_masked: int) -> list:
    rng = np.random.default_rng(seed_of("train-examples", case))
    out = []
    for n in LENGTHS:
        ids = [int(v) for v in rng.integers(3, vocab, size=n)]
        labels = [-100] * n_masked + ids[n_masked:]
        out.append({"tokens": ids, "labels": labels})
    return out


def batch_loss(pm, examples: list):
    """HF's loss on a right-padded batch (pads: id 0, mask 0, label -100)."""
    T = max(len(e["tokens"]) for e in examples)
    ids = torch.zeros((len(examples), T), dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["tokens"])
        ids[i, :n] = torch.tensor(e["tokens"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return pm(input_ids=ids, attention_mask=mask, labels=labels).loss


def separate_loss(pm, examples: list, n_virtual: int) -> tuple[float, int]:
    """Independent check of the masked mean: per example, unpadded, CE summed by hand."""
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["tokens"]])
            logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
            lab = [-100] * n_virtual + e["labels"]
            for r in range(logits.shape[0] - 1):
                t = lab[r + 1]
                if t >= 0:
                    tot += float(torch.logsumexp(logits[r], 0) - logits[r, t])
                    cnt += 1
    return tot / cnt, cnt


def flat(t: torch.Tensor) -> list:
    return [float(v) for v in t.detach().to(torch.float32).reshape(-1).tolist()]


def finish_dir(d: Path, model_name: str) -> None:
    card = d / "README.md"
    if card.exists():
        card.unlink()
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"tests/data/models/{model_name}"
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def gen_case(case: str) -> None:
    model_name, make_cfg, opts = CASES[case]
    n_masked = opts.get("n_masked", N_MASKED)
    base = load_base(model_name)
    pm = get_peft_model(base, make_cfg())
    randomize(pm, case)
    cfg = pm.peft_config["default"]
    # rows of the logits that are virtual (prompt tuning only; a prefix adds no rows)
    n_virtual = cfg.num_virtual_tokens if cfg.peft_type.value == "PROMPT_TUNING" else 0
    examples = make_examples(case, base.config.vocab_size, n_masked)

    d = OUT / case
    if d.exists():
        shutil.rmtree(d)
    (d / "adapter").mkdir(parents=True)
    pm.save_pretrained(d / "adapter", save_embedding_layers=False)
    finish_dir(d / "adapter", model_name)

    params = trainable(pm)
    init = {k: {"shape": list(p.shape), "values": flat(p)} for k, p in params}
    assert len(init) == len(params), "duplicate save keys"

    pm.zero_grad()
    loss = batch_loss(pm, examples)
    loss.backward()
    sep, cnt = separate_loss(pm, examples, n_virtual)
    assert abs(sep - float(loss)) <= 1e-6 * abs(sep), (case, sep, float(loss))
    grads = {k: flat(p.grad) for k, p in params}
    gnorm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for _, p in params))

    ref = {"case": case, "model": model_name, "peft_type": str(cfg.peft_type.value),
           "transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "peft_version": importlib.metadata.version("peft"),
           "examples": examples, "n_label_tokens": cnt, "loss": float(loss), "grad_norm": gnorm,
           "params": init, "grads": grads}
    if opts.get("adam", True):
        ref["adamw"] = adam_trajectory(pm, params, examples)
    (d / "reference.json").write_text(dump(ref) + "\n")
    worst = min(min(abs(v) for v in g) / max(1e-30, max(abs(v) for v in g)) for g in grads.values())
    print(f"{case}: loss {float(loss):.6f} over {cnt} labels, {len(params)} tensors, grad norm {gnorm:.4g}, "
          f"min |g|/max|g| per tensor {worst:.2e}")


def adam_trajectory(pm, params: list, examples: list) -> dict:
    """3 AdamW steps on the same batch. Small adapters also record the gradient each step used, so
    the optimizer can be checked on its own (an element whose gradient is near 0 amplifies any
    gradient difference through m/(sqrt(v)+eps) -- see README)."""
    opt = torch.optim.AdamW([p for _, p in params], **ADAM)
    steps = []
    small = sum(p.numel() for _, p in params) <= STEP_GRADS_MAX
    for _ in range(N_ADAM_STEPS):
        opt.zero_grad()
        loss = batch_loss(pm, examples)
        loss.backward()
        grads = {k: flat(p.grad) for k, p in params} if small else None
        opt.step()
        st = {"loss": float(loss), "params": {k: flat(p) for k, p in params}}
        if grads is not None:
            st["grads"] = grads
        steps.append(st)
    return {"lr": ADAM["lr"], "betas": list(ADAM["betas"]), "eps": ADAM["eps"],
            "weight_decay": ADAM["weight_decay"], "steps": steps}


def gen_schedules() -> None:
    """LambdaLR multipliers of HF's schedules for optimizer steps 0..11 (warm-up 3, total 10)."""
    p = torch.nn.Parameter(torch.zeros(1))
    out = {"warmup_steps": 3, "total_steps": 10}
    for name, fn in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        opt = torch.optim.SGD([p], lr=1.0)
        sch = fn(opt, num_warmup_steps=3, num_training_steps=10)
        vals = []
        for _ in range(12):
            vals.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            sch.step()
        out[name] = vals
    # clip_grad_norm_ on two tensors: factor = max_norm / (norm + 1e-6) when < 1
    g = torch.Generator().manual_seed(7)
    ts = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3))]
    for t in ts:
        t.grad = torch.randn(t.shape, generator=g)
    before = [flat(t.grad) for t in ts]
    norm = float(torch.nn.utils.clip_grad_norm_(ts, max_norm=0.5))
    out["clip"] = {"max_norm": 0.5, "grads": before, "norm": norm, "clipped": [flat(t.grad) for t in ts]}
    (OUT / "schedules.json").write_text(dump(out) + "\n")


# --------------------------------------------------------------------------------------------
def verify_interop(root: Path) -> int:
    bad = 0
    for d in sorted(p for p in root.iterdir() if (p / "deltaserve_logits.json").exists()):
        info = json.loads((d / "deltaserve_logits.json").read_text())
        base = load_base(Path(info["base"]).name)
        pm = PeftModel.from_pretrained(base, d)
        pm.eval()
        cfg = pm.peft_config["default"]
        nv = cfg.num_virtual_tokens if cfg.is_prompt_learning and cfg.peft_type.value == "PROMPT_TUNING" else 0
        ids = torch.tensor([info["prompt"]])
        with torch.no_grad():
            lg = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, nv:].numpy()
        ours = np.array(info["logits"], dtype=np.float64)
        diff = float(np.abs(lg - ours).max())
        tol = 1e-4 * max(1.0, float(np.abs(lg).max()))
        ok = diff <= tol
        bad += not ok
        print(f"{d.name}: {cfg.peft_type.value}, max|PEFT - deltaserve| = {diff:.3g} (tol {tol:.3g}) "
              f"{'OK' if ok else 'FAIL'}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", help="case name (repeatable)")
    ap.add_argument("--verify-interop", metavar="DIR")
    a = ap.parse_args()
    if a.verify_interop:
        return verify_interop(Path(a.verify_interop))
    OUT.mkdir(parents=True, exist_ok=True)
    for case in a.only or CASES:
        gen_case(case)
    if not a.only:
        gen_schedules()
    return 0


if __name__ == "__main__":
    sys.exit(main())
