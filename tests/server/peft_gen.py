"""Small PEFT adapters for SmolLM2-135M, written in pure Python (safetensors by hand: u64 LE header
length + JSON header + raw little-endian F32 data; no numpy/torch). Weights are seeded random and
non-zero, so every adapter changes the model's output."""
import json
import random
import struct

# SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 KV heads of 64, 30 layers.
HIDDEN, FFN, Q_OUT, KV_OUT, LAYERS = 576, 1536, 576, 192, 30
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
WIDTHS = {"q_proj": (HIDDEN, Q_OUT), "k_proj": (HIDDEN, KV_OUT), "v_proj": (HIDDEN, KV_OUT),
          "o_proj": (Q_OUT, HIDDEN), "down_proj": (FFN, HIDDEN)}  # (in, out)


def write_safetensors(path, tensors):
    """tensors: {name: (shape, flat list of floats)}."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def _save(directory, config, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": BASE,
                                                               "task_type": "CAUSAL_LM", **config}, indent=1))
    write_safetensors(directory / "adapter_model.safetensors", tensors)


def _gauss(rng, n, std, mean=0.0):
    return [rng.gauss(mean, std) for _ in range(n)]


def _module(layer, proj):
    return f"base_model.model.model.layers.{layer}.{'mlp' if proj.endswith(('down_proj', 'up_proj', 'gate_proj')) else 'self_attn'}.{proj}"


def make_lora(directory, seed, rank=4, alpha=8, std=0.04, targets=("q_proj", "v_proj"), dora=False, adalora=False):
    """LoRA (optionally DoRA, or AdaLoRA's A/B/E form) on `targets` of every layer."""
    rng = random.Random(seed)
    t = {}
    for layer in range(LAYERS):
        for proj in targets:
            fin, fout = WIDTHS[proj]
            pre = _module(layer, proj)
            suffix = "" if adalora else ".weight"
            t[f"{pre}.lora_A{suffix}"] = ((rank, fin), _gauss(rng, rank * fin, std))
            t[f"{pre}.lora_B{suffix}"] = ((fout, rank), _gauss(rng, fout * rank, std))
            if adalora:
                t[f"{pre}.lora_E"] = ((rank, 1), _gauss(rng, rank, 0.5, 1.0))
            if dora:
                t[f"{pre}.lora_magnitude_vector"] = ((fout,), _gauss(rng, fout, 0.05, 1.0))
    config = {"peft_type": "ADALORA" if adalora else "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": list(targets), "bias": "none", "use_dora": dora, "use_rslora": False}
    if adalora:
        config.update({"init_r": rank, "target_r": rank})
    _save(directory, config, t)


def make_ia3(directory, seed):
    rng = random.Random(seed)
    t = {}
    for layer in range(LAYERS):
        t[f"{_module(layer, 'k_proj')}.ia3_l"] = ((KV_OUT, 1), _gauss(rng, KV_OUT, 0.3, 1.0))
        t[f"{_module(layer, 'v_proj')}.ia3_l"] = ((KV_OUT, 1), _gauss(rng, KV_OUT, 0.3, 1.0))
        t[f"{_module(layer, 'down_proj')}.ia3_l"] = ((1, FFN), _gauss(rng, FFN, 0.3, 1.0))
    _save(directory, {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                      "feedforward_modules": ["down_proj"]}, t)


def make_prompt(directory, seed, n_virtual=4, kind="PROMPT_TUNING"):
    """Prompt tuning, or P-tuning (PEFT saves the encoder's output: the same tensor)."""
    rng = random.Random(seed)
    config = {"peft_type": kind, "num_virtual_tokens": n_virtual, "token_dim": HIDDEN, "num_layers": LAYERS,
              "num_attention_heads": 9, "num_transformer_submodules": 1}
    if kind == "P_TUNING":
        config.update({"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 64})
    _save(directory, config, {"prompt_embeddings": ((n_virtual, HIDDEN), _gauss(rng, n_virtual * HIDDEN, 0.05))})


def make_prefix(directory, seed, n_virtual=4):
    rng = random.Random(seed)
    width = LAYERS * 2 * KV_OUT
    # PEFT >= 0.12 describes a GQA model's prefix by its K/V: token_dim = head_dim * num_key_value_heads
    # and num_attention_heads = num_key_value_heads.
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": n_virtual, "token_dim": KV_OUT,
              "num_layers": LAYERS, "num_attention_heads": 3, "num_transformer_submodules": 1,
              "encoder_hidden_size": HIDDEN, "prefix_projection": False}
    _save(directory, config, {"prompt_embeddings": ((n_virtual, width), _gauss(rng, n_virtual * width, 0.5))})


KINDS = {
    "dora": lambda d, s: make_lora(d, s, dora=True, targets=("q_proj", "v_proj", "o_proj")),
    "adalora": lambda d, s: make_lora(d, s, adalora=True),
    "ia3": make_ia3,
    "prompt-tuning": make_prompt,
    "p-tuning": lambda d, s: make_prompt(d, s, kind="P_TUNING"),
    "prefix": make_prefix,
}
