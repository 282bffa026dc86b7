#!/usr/bin/env python3
"""A long greedy generation on tiny-mistral (sliding window 4 on every layer) from transformers, for
the test that the engine frees KV blocks behind the window and still computes the same thing
(tests/unit/test_kv_window.c).

Loads tests/data/models/tiny-mistral (written by tests/golden/gen_models.py), runs greedy decoding
for N_NEW tokens from a 12-token prompt — each step a full forward over the whole sequence with
eager attention, so the window is applied by the causal sliding-window mask and no cache is
involved — and records, per step, the greedy token, the top-5 log-softmax values and the margin
between the two best logits.

    .peer/venv/bin/python tests/golden/gen_window_golden.py   # needs torch, transformers

Writes tests/data/window/tiny-mistral-long.json. Deterministic (fp32, one thread)."""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "data" / "models" / "tiny-mistral"
OUT = ROOT / "tests" / "data" / "window" / "tiny-mistral-long.json"
PROMPT = [47, 252, 23, 0, 174, 186, 288, 307, 319, 238, 145, 193]
N_NEW = 120
TOP = 5


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    assert model.config.sliding_window == 4
    ids = list(PROMPT)
    steps = []
    with torch.no_grad():
        for _ in range(N_NEW):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(logits, TOP)
            tok = int(top.indices[0])
            steps.append({"token": tok, "margin": float(top.values[0] - top.values[1]),
                          "top": [[int(i), round(float(lp[i]), 7)] for i in top.indices]})
            ids.append(tok)
    doc = {"generator": "tests/golden/gen_window_golden.py", "transformers_version": transformers.__version__,
           "torch_version": torch.__version__, "model": "tiny-mistral", "sliding_window": 4, "prompt": PROMPT,
           "note": "greedy; top: [token, log-softmax] of the 5 best logits at each step, fp32 forward over the "
                   "whole sequence (no cache)",
           "steps": steps}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}: {len(steps)} steps, smallest margin {min(s['margin'] for s in steps):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
