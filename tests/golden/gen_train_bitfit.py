#!/usr/bin/env python3
"""Golden data for BitFit training (bias deltas, README "Delta adapters"): the loss and the gradient
of every bias delta in PyTorch, for tests/unit/test_train_bitfit.c.

Writes, for <model> in tiny-llama, tiny-qwen2 (tests/data/models/, gen_models.py):
  tests/data/train/bitfit/<model>/adapter_config.json + adapter_model.safetensors
      a delta adapter with a seeded non-zero bias delta (N(0, 0.1²), F32) on every projection
  tests/data/train/bitfit/<model>/reference.json
      {"examples": [{"tokens", "labels"}], "loss": HF's masked mean CE on the right-padded batch,
       "grads": {"<module>.bias_delta": [d loss / d b]}}
The bias delta is added to the projection's output by a forward hook (Llama has no biases: it is
the bias; Qwen2's q/k/v add it to theirs). Labels follow HF (labels[i] is the target of the logits
at i - 1); the first 3 of every example are -100.

Usage (from the repo root): .peer/venv/bin/python tests/golden/gen_train_bitfit.py
Deterministic: fixed seeds, one CPU thread, eager attention, fp32 (the model and batch setup is
tests/golden/train_batch.py's).
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_batch import ROOT, batch, load_frozen, make_examples, seed_of  # noqa: E402  (sets up torch first)
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

OUT = ROOT / "tests" / "data" / "train" / "bitfit"
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gen(name: str):
    model = load_frozen(name)
    rng = np.random.default_rng(seed_of("bitfit-train", name))
    params, hooks, tensors = {}, [], {}
    for l, layer in enumerate(model.model.layers):
        for p in PROJS:
            lin = getattr(layer.self_attn if p in PROJS[:4] else layer.mlp, p)
            key = f"model.layers.{l}.{'self_attn' if p in PROJS[:4] else 'mlp'}.{p}.bias_delta"
            b = (rng.standard_normal(lin.out_features) * 0.1).astype(np.float32)
            tensors[key] = b
            t = torch.tensor(b, requires_grad=True)
            params[key] = t
            hooks.append(lin.register_forward_hook(lambda mod, inp, out, t=t: out + t))
    examples = make_examples(rng, model.config.vocab_size)
    ids, mask, labels = batch(examples)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "adapter_type": "delta", "version": 1, "base_model_name_or_path": f"tests/data/models/{name}",
        "target_modules": list(PROJS), "source": "tests/golden/gen_train_bitfit.py"}, indent=1) + "\n")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    ref = {"model": name, "torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "examples": examples, "loss": float(loss),
           "grads": {k: [float(x) for x in t.grad.numpy()] for k, t in params.items()}}
    (d / "reference.json").write_text(json.dumps(ref, indent=0) + "\n")
    print(f"{name}: loss {float(loss):.6f}, {len(params)} bias deltas")


if __name__ == "__main__":
    for m in ("tiny-llama", "tiny-qwen2"):
        gen(m)
    sys.exit(0)
