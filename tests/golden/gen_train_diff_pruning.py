#!/usr/bin/env python3
"""Golden data for diff-pruning training (src/train/train_dp.c): three optimizer steps of a dense
weight delta δ in PyTorch, with the mask fixed after a one-step dense warm-up, for
tests/unit/test_train_diff_pruning.c.

For each case (tiny-llama: k,o,up,down_proj without bias deltas; tiny-qwen2: q,v,gate_proj with
bias deltas, which add to Qwen2's own q/v biases), on tests/data/models/<model> (gen_models.py).
A k_proj bias delta is left out: softmax is nearly invariant to it (exactly, but for RoPE), so its
gradient is at rounding level and AdamW's normalised update turns that noise into lr-sized steps.
  - δ0 ~ N(0, 0.02²) on every target projection (and b0 ~ N(0, 0.02²) when bias deltas train),
    added by forward hooks: y = W x (+ b) + δ x (+ b_δ);
  - step 0: loss and dense gradients; AdamW (torch.optim.AdamW, single-tensor path, weight decay
    0.01) with lr 0 (the C side's HF linear warm-up of one step: step 0 has lr 0) — the moments move,
    the values do not; clipping by global L2 norm 1.0 before every step;
  - then per module the mask: the k = min(ceil(density·numel − 1e-9), #nonzero) largest |δ|, ties to
    the lower row-major index (as delta_extract.c / gen_delta.py prune); δ and both AdamW moments are
    zeroed outside it;
  - steps 1 and 2 at lr 1e-3: gradients multiplied by the mask after backward;
  - the logits of base + δ (+ b_δ) after step 2 on two prompts.

Writes tests/data/train/diff_pruning/<model>/:
  init.safetensors   δ0 ("<module>.weight_delta" [out][in]) and b0 ("<module>.bias_delta"), F32
  grad0.safetensors  step 0's dense gradients under the same names
  reference.json     {"config", "examples", "loss": [3], "modules": {name: {"kept": [flat indices],
                      "grad1", "grad2", "value1", "value2": [at the kept entries]}},
                      "bias": {name: {"grad1", "grad2", "value1", "value2"}},
                      "cases": [{"prompt", "prefill_logits"}]}

Usage (from the repo root): .peer/venv/bin/python tests/golden/gen_train_diff_pruning.py
Deterministic: fixed seeds, one CPU thread, eager attention, fp32 (the model and batch setup is
tests/golden/train_batch.py's).
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_batch import ROOT, batch, load_frozen, make_examples, seed_of  # noqa: E402  (sets up torch first)
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

OUT = ROOT / "tests" / "data" / "train" / "diff_pruning"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = {
    "tiny-llama": {"targets": ["k_proj", "o_proj", "up_proj", "down_proj"], "bias": False},
    "tiny-qwen2": {"targets": ["q_proj", "v_proj", "gate_proj"], "bias": True},
}
DENSITY = 0.05
LR = 1e-3
WD = 0.01
PROMPTS = ([5, 17, 99, 200, 31, 8], [250, 3, 3, 140])


def f9(x) -> float:
    """An fp32 value in 9 significant digits (exact for fp32, half the JSON of a double's repr)."""
    return float(f"{float(x):.9g}")


def top_mask(d: np.ndarray) -> np.ndarray:
    flat = d.reshape(-1)
    k = min(math.ceil(DENSITY * flat.size - 1e-9), int(np.count_nonzero(flat)))
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
    m = np.zeros(flat.size, dtype=bool)
    m[order] = True
    return m.reshape(d.shape)


def gen(name: str, case: dict):
    model = load_frozen(name)
    rng = np.random.default_rng(seed_of("diff-pruning-train", name))
    deltas, biases, init = {}, {}, {}
    for l, layer in enumerate(model.model.layers):
        for p in case["targets"]:
            lin = getattr(layer.self_attn if p in ATTN else layer.mlp, p)
            mod = f"model.layers.{l}.{'self_attn' if p in ATTN else 'mlp'}.{p}"
            d0 = (rng.standard_normal((lin.out_features, lin.in_features)) * 0.02).astype(np.float32)
            init[mod + ".weight_delta"] = d0
            d = torch.tensor(d0, requires_grad=True)
            deltas[mod + ".weight_delta"] = d
            b = None
            if case["bias"]:
                b0 = (rng.standard_normal(lin.out_features) * 0.02).astype(np.float32)
                init[mod + ".bias_delta"] = b0
                b = torch.tensor(b0, requires_grad=True)
                biases[mod + ".bias_delta"] = b

            def hook(m, inp, out, d=d, b=b):
                out = out + torch.nn.functional.linear(inp[0], d)
                return out + b if b is not None else out
            lin.register_forward_hook(hook)
    examples = make_examples(rng, model.config.vocab_size)
    ids, am, labels = batch(examples)
    params = list(deltas.values()) + list(biases.values())
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, foreach=False)
    masks, losses, grad0 = {}, [], {}
    rec = {k: {} for k in list(deltas) + list(biases)}
    for step in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        losses.append(float(loss))
        for k, d in deltas.items():
            if masks:
                d.grad.mul_(torch.tensor(masks[k], dtype=torch.float32))
        if step == 0:
            grad0 = {k: t.grad.numpy().copy() for k, t in list(deltas.items()) + list(biases.items())}
        else:
            for k, d in deltas.items():
                rec[k][f"grad{step}"] = [f9(x) for x in d.grad.numpy()[masks[k]]]
            for k, b in biases.items():
                rec[k][f"grad{step}"] = [f9(x) for x in b.grad.numpy()]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = 0.0 if step == 0 else LR
        opt.step()
        if step == 0:  # the warm-up is over: fix the masks, zero δ and its moments outside them
            with torch.no_grad():
                for k, d in deltas.items():
                    masks[k] = top_mask(d.numpy())
                    keep = torch.tensor(masks[k], dtype=torch.float32)
                    d.mul_(keep)
                    opt.state[d]["exp_avg"].mul_(keep)
                    opt.state[d]["exp_avg_sq"].mul_(keep)
        else:
            for k, d in deltas.items():
                rec[k][f"value{step}"] = [f9(x) for x in d.detach().numpy()[masks[k]]]
            for k, b in biases.items():
                rec[k][f"value{step}"] = [f9(x) for x in b.detach().numpy()]
    for k in deltas:
        rec[k]["kept"] = [int(i) for i in np.flatnonzero(masks[k].reshape(-1))]
    cases = []
    with torch.no_grad():
        for pr in PROMPTS:
            logits = model(input_ids=torch.tensor([pr])).logits[0]
            cases.append({"prompt": list(pr), "prefill_logits": [[f9(x) for x in row] for row in logits]})
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    save_file(init, str(d / "init.safetensors"))
    save_file(grad0, str(d / "grad0.safetensors"))
    ref = {"model": name, "torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "source": "tests/golden/gen_train_diff_pruning.py",
           "config": {"targets": case["targets"], "bias": case["bias"], "density": DENSITY, "dp_warmup_steps": 1,
                      "lr": LR, "lr_warmup_steps": 1, "weight_decay": WD, "max_grad_norm": 1.0},
           "examples": examples, "loss": losses,
           "modules": {k: rec[k] for k in deltas}, "bias": {k: rec[k] for k in biases}, "cases": cases}
    (d / "reference.json").write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    kept = sum(len(rec[k]["kept"]) for k in deltas)
    total = sum(t.numel() for t in deltas.values())
    print(f"{name}: losses {', '.join(f'{x:.6f}' for x in losses)}; {len(deltas)} modules, {kept}/{total} kept")


if __name__ == "__main__":
    for m, c in CASES.items():
        gen(m, c)
    sys.exit(0)
