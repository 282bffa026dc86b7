"""Random-weight Llama checkpoints for the llama.cpp peer benchmark (issue 15), in Hugging Face form
so that llama.cpp's own convert_hf_to_gguf.py makes the GGUF.

    make_models.py tokenizer --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR
    make_models.py model --shape 1b|8b --tokenizer DIR --out DIR [--seed 0]
    make_models.py lora --base DIR --out DIR --n 8 --rank 16 [--seed 0]

Tokenizer: SmolLM2's (vocab 49152), rebuilt from the GGUF's tokenizer.ggml.* arrays as a byte-level
BPE `tokenizers` object with SmolLM's pre-tokeniser (single digits, then GPT-2 byte level), saved
with PreTrainedTokenizerFast. convert_hf_to_gguf.py then recognises it by its hash as "smollm", so
the GGUF carries the same tokenizer that deltaserve and llama.cpp already read for SmolLM2, and
both servers detokenise real text. (The Llama 3 tokenizer, vocab 128256, is not on PyPI.)

Model: config.json from transformers' LlamaConfig with Llama-3.2-1B's or Llama-3-8B's dimensions
(vocab from the tokenizer), and weights N(0, 0.02) in fp16 (norms 1), generated one decoder layer
at a time and written as one safetensors shard per layer, so peak memory is one layer (8B: ~0.9 GB)
rather than the model. Speed and memory do not depend on the values; the output is gibberish.

LoRA: PEFT directories (adapter_config.json + adapter_model.safetensors), random rank-r A and B on
q,k,v,o of every layer, for convert_lora_to_gguf.py. B is non-zero so the adapters change the
output."""
import argparse
import json
import pathlib
import sys

SHAPES = {
    # Llama-3.2-1B: tied embeddings
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    # Llama-3-8B
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def cmd_tokenizer(a):
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = GGUFReader(a.gguf)

    def field(name):
        f = r.get_field(name)
        return None if f is None else f.contents()

    if field("tokenizer.ggml.model") != "gpt2":
        sys.exit(f"{a.gguf}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, want gpt2 (byte-level BPE)")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    # CONTROL (3) tokens are special added tokens (<|endoftext|>, <|im_start|>, ...); USER_DEFINED (4) plain added.
    from tokenizers import AddedToken
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def tid(key):
        v = field(key)
        return None if v is None else tokens[int(v)]

    kw = {k: tid(f"tokenizer.ggml.{g}_token_id") for k, g in
          (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    kw = {k: v for k, v in kw.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8192, clean_up_tokenization_spaces=False,
                                   add_bos_token=False, **kw)
    tmpl = field("tokenizer.chat_template")
    if tmpl:
        fast.chat_template = tmpl
    out = pathlib.Path(a.out)
    fast.save_pretrained(out)
    print(f"tokenizer: {len(tokens)} tokens, {len(merges)} merges, {len(special)} special -> {out}")


def _cfg(shape, tok_dir):
    from transformers import AutoTokenizer, LlamaConfig
    t = AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(t)
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       hidden_act="silu", bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                       torch_dtype="float16", **SHAPES[shape]), t


def _save_shards(out, shards):
    """shards: list of (file name, {tensor name: tensor}) generated lazily."""
    from safetensors.torch import save_file
    index, total = {}, 0
    for fname, tensors in shards:
        for k, v in tensors.items():
            index[k] = fname
            total += v.numel() * v.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        print(f"  {fname}: {len(tensors)} tensors", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))


def cmd_model(a):
    import torch
    cfg, t = _cfg(a.shape, a.tokenizer)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    # transformers 5 writes rope_theta inside rope_parameters; older readers want it at the top too
    cj = json.loads((out / "config.json").read_text())
    cj.setdefault("rope_theta", cfg.rope_theta if hasattr(cfg, "rope_theta") else 500000.0)
    (out / "config.json").write_text(json.dumps(cj, indent=2))
    t.save_pretrained(out)
    g = torch.Generator().manual_seed(a.seed)
    h, ff, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d_head = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d_head, cfg.num_key_value_heads * d_head

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).to(torch.float16)

    def ones(n):
        return torch.ones(n, dtype=torch.float16)

    def layer(i):
        p = f"model.layers.{i}."
        return {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                p + "mlp.gate_proj.weight": rnd(ff, h), p + "mlp.up_proj.weight": rnd(ff, h),
                p + "mlp.down_proj.weight": rnd(h, ff)}

    def shards():
        emb = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": ones(h)}
        if not cfg.tie_word_embeddings:
            emb["lm_head.weight"] = rnd(cfg.vocab_size, h)
        yield "model-embed.safetensors", emb
        for i in range(L):
            yield f"model-layer{i:03d}.safetensors", layer(i)

    n = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + L * (2 * h + 2 * h * q + 2 * h * kv + 3 * h * ff) + h
    print(f"model {a.shape}: {n / 1e9:.2f} B parameters, fp16 -> {out}", flush=True)
    _save_shards(out, shards())


def cmd_lora(a):
    import torch
    from safetensors.torch import save_file
    base = json.loads((pathlib.Path(a.base) / "config.json").read_text())
    h, L = base["hidden_size"], base["num_hidden_layers"]
    d_head = h // base["num_attention_heads"]
    q, kv = base["num_attention_heads"] * d_head, base["num_key_value_heads"] * d_head
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}  # (in, out)
    for n in range(a.n):
        g = torch.Generator().manual_seed(a.seed + n)
        d = pathlib.Path(a.out) / f"lora-{n}"
        d.mkdir(parents=True, exist_ok=True)
        t = {}
        for i in range(L):
            for proj in TARGETS:
                fin, fout = dims[proj]
                pre = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                t[pre + ".lora_A.weight"] = torch.randn(a.rank, fin, generator=g) * 0.02
                t[pre + ".lora_B.weight"] = torch.randn(fout, a.rank, generator=g) * 0.02
        save_file({k: v.to(torch.float16).contiguous() for k, v in t.items()}, str(d / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({
            "base_model_name_or_path": str(pathlib.Path(a.base).resolve()), "peft_type": "LORA",
            "task_type": "CAUSAL_LM", "r": a.rank, "lora_alpha": 2 * a.rank, "lora_dropout": 0.0,
            "target_modules": list(TARGETS), "bias": "none", "use_dora": False, "use_rslora": False,
            "fan_in_fan_out": False}, indent=1))
    print(f"{a.n} LoRA adapters, rank {a.rank}, q,k,v,o x {L} layers -> {a.out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tokenizer")
    s.add_argument("--gguf", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("model")
    s.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("lora")
    s.add_argument("--base", required=True, help="HF directory of the base (its config.json)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--rank", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    {"tokenizer": cmd_tokenizer, "model": cmd_model, "lora": cmd_lora}[a.cmd](a)


if __name__ == "__main__":
    main()
