"""The model and micro-batch setup shared by the training goldens gen_train_bitfit.py,
gen_train_diff_pruning.py (both run by .peer/venv/bin/python) and gen_train_bottleneck.py (run by
.venv-adapters/bin/python): not a generator itself.

Importing it makes the run deterministic (one CPU thread, torch's deterministic algorithms), quiet
(warnings and transformers' logging off) and offline (HF_HUB_OFFLINE), so a generator imports it
before anything that imports transformers. The batch convention, which the C tests read back from
each reference.json: two examples of LENGTHS tokens drawn from [3, vocab), the first N_MASKED labels
of each -100, labels[i] the target of the logits at i - 1 (HF shifts internally), right-padded into
one batch whose loss is HF's masked mean cross-entropy.
"""
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data" / "models"
LENGTHS = (7, 5)
N_MASKED = 3

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def load_frozen(name: str):
    """tests/data/models/<name> in fp32 with eager attention, in eval mode, every weight frozen."""
    model = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_examples(rng: np.random.Generator, vocab_size: int) -> list:
    """[{"tokens", "labels"}] for each of LENGTHS, token ids drawn from rng in that order."""
    examples = []
    for n in LENGTHS:
        ids = [int(v) for v in rng.integers(3, vocab_size, size=n)]
        examples.append({"tokens": ids, "labels": [-100] * N_MASKED + ids[N_MASKED:]})
    return examples


def batch(examples):
    """The right-padded batch: (input_ids, attention_mask, labels), labels -100 on the padding."""
    T = max(len(e["tokens"]) for e in examples)
    ids = torch.zeros((len(examples), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e["tokens"])
        ids[i, :n] = torch.tensor(e["tokens"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return ids, mask, labels
