#!/usr/bin/env python3
"""Golden data for training bottleneck adapters (tests/unit/test_train_bn.c) with the AdapterHub
`adapters` package, in its own environment .venv-adapters/ (adapters 1.3.0 pins its transformers;
see gen_bottleneck.py):
  .venv-adapters/bin/python tests/golden/gen_train_bottleneck.py

Writes, for each case below on tests/data/models/<model> (gen_models.py):
  tests/data/train/bottleneck/<model>/<case>/adapter_config.json + adapter.safetensors
      the package's config with seeded non-zero parameters (every tensor, the up-projection too),
      saved by model.save_adapter(dir, name, with_head=False, use_safetensors=True)
  tests/data/train/bottleneck/<model>/<case>/reference.json
      {"examples": [{"tokens", "labels"}], "loss": HF's masked mean CE of the right-padded batch,
       "grads": {key: d loss / d tensor}, "adamw": {lr, betas, eps, weight_decay, "params": {key: after
       one torch.optim.AdamW step on those gradients}}, versions}
Keys are the adapter.safetensors names. The micro-batch and loss conventions are train_batch.py's
(shared with gen_train_bitfit.py and gen_train_diff_pruning.py): two examples (7 and 5 tokens), the first 3 labels of each -100, labels[i] the target of position i-1.

Cases: every placement with two non-linearities between the two models (Llama: sequential relu,
Houlsby swish, parallel relu with scaling 4; Qwen2: sequential gelu_new, Houlsby tanh, parallel gelu).

  .venv-adapters/bin/python tests/golden/gen_train_bottleneck.py --check-saved DIR MODEL
loads an adapter deltaserve trained and saved (DIR: adapter_config.json + adapter.safetensors +
ds_logits.json, written by test_train_bn with DS_BN_EXPORT=DIR) into the package on
tests/data/models/MODEL and prints max|logits(package) − logits(deltaserve)| over the probe prompt.
Deterministic: fixed seeds, one CPU thread, eager attention, fp32 (the model and batch setup is
tests/golden/train_batch.py's).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_batch import ROOT, batch, load_frozen, make_examples, seed_of  # noqa: E402  (sets up torch first)
import torch  # noqa: E402
import transformers  # noqa: E402
import adapters  # noqa: E402
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

OUT = ROOT / "tests" / "data" / "train" / "bottleneck"
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

CASES = {
    "tiny-llama": {
        "seq-relu": SeqBnConfig(reduction_factor=16, non_linearity="relu"),
        "houlsby-swish": DoubleSeqBnConfig(reduction_factor=16, non_linearity="swish"),
        "par-relu": ParBnConfig(reduction_factor=16, scaling=4.0, non_linearity="relu"),
    },
    "tiny-qwen2": {
        "seq-gelu_new": SeqBnConfig(reduction_factor=16, non_linearity="gelu_new"),
        "houlsby-tanh": DoubleSeqBnConfig(reduction_factor=16, non_linearity="tanh"),
        "par-gelu": ParBnConfig(reduction_factor=16, scaling=4.0, non_linearity="gelu"),
    },
}


def load_base(name: str):
    m = load_frozen(name)
    adapters.init(m)
    return m


def rounded(t: torch.Tensor) -> list:
    return [float("%.8g" % v) for v in t.detach().reshape(-1).tolist()]


def adapter_params(model, name: str) -> dict:
    """The adapter's parameters by their adapter.safetensors key."""
    return {k: p for k, p in model.named_parameters() if f".adapters.{name}." in k}


def gen(model_name: str, case: str, cfg) -> None:
    d = OUT / model_name / case
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model = load_base(model_name)
    torch.manual_seed(seed_of("bn-train", model_name, case, "init"))
    model.add_adapter(case, config=cfg)
    model.set_active_adapters(case)
    params = adapter_params(model, case)
    g = torch.Generator().manual_seed(seed_of("bn-train", model_name, case))
    with torch.no_grad():  # non-zero everywhere, so every gradient is exercised
        for k, p in params.items():
            shape = tuple(p.shape)
            v = 0.1 * torch.randn(shape, generator=g) if len(shape) < 2 else \
                torch.randn(shape, generator=g) * (0.8 / math.sqrt(shape[-1]))
            p.copy_(v)
            p.requires_grad_(True)
    model.save_adapter(str(d), case, with_head=False, use_safetensors=True)
    cfg_json = json.loads((d / "adapter_config.json").read_text())
    cfg_json["model_name"] = f"tests/data/models/{model_name}"
    (d / "adapter_config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    saved = load_file(str(d / "adapter.safetensors"))
    assert set(saved) == set(params), (sorted(saved)[:3], sorted(params)[:3])

    rng = np.random.default_rng(seed_of("bn-train-data", model_name, case))
    examples = make_examples(rng, model.config.vocab_size)
    ids, mask, labels = batch(examples)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {k: rounded(p.grad) for k, p in sorted(params.items())}
    opt = torch.optim.AdamW(list(params.values()), **ADAM)
    opt.step()
    after = {k: rounded(p) for k, p in sorted(params.items())}
    ref = {"case": case, "base": model_name, "config": cfg_json["config"]["non_linearity"],
           "adapters_version": adapters.__version__, "transformers_version": transformers.__version__,
           "torch_version": torch.__version__,
           "examples": examples, "loss": float(loss), "grads": grads,
           "adamw": {"lr": ADAM["lr"], "betas": list(ADAM["betas"]), "eps": ADAM["eps"],
                     "weight_decay": ADAM["weight_decay"], "params": after}}
    (d / "reference.json").write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    print(f"  {model_name}/{case}: loss {float(loss):.6f}, {len(grads)} tensors, "
          f"{sum(p.numel() for p in params.values())} floats")


def check_saved(d: Path, model_name: str) -> None:
    model = load_base(model_name)
    name = model.load_adapter(str(d), use_safetensors=True)
    model.set_active_adapters(name)
    ref = json.loads((d / "ds_logits.json").read_text())
    ids = torch.tensor([ref["tokens"]])
    with torch.no_grad():
        got = model(input_ids=ids).logits[0].numpy()
    ours = np.array(ref["logits"], dtype=np.float32).reshape(got.shape)
    base = load_base(model_name)
    with torch.no_grad():
        plain = base(input_ids=ids).logits[0].numpy()
    print(f"{d}: adapter '{name}' on {model_name}: max|logits(adapters {adapters.__version__}) - logits(deltaserve)| "
          f"= {float(np.max(np.abs(got - ours))):.3g} (max|logit| {float(np.max(np.abs(got))):.3g}; "
          f"the adapter moves them by {float(np.max(np.abs(got - plain))):.3g} from the base)")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--check-saved":
        check_saved(Path(sys.argv[2]), sys.argv[3])
        return
    for model_name, cases in CASES.items():
        for case, cfg in cases.items():
            gen(model_name, case, cfg)


if __name__ == "__main__":
    main()
