#!/usr/bin/env python3
"""SentencePiece-style tokenizer.json goldens (HF `tokenizers`) and the Gemma-style GGUF form.

Trains small sentencepiece models (BPE with byte fallback, with and without the dummy prefix, and a
Unigram model) on the corpus of tests/golden/gen_spm_golden.py, builds tokenizer.json files from
them with the `tokenizers` library in the shapes transformers' converters write
(transformers/convert_slow_tokenizer.py: LlamaConverter legacy and non-legacy, GemmaConverter, and a
Metaspace/Unigram tokenizer), and records the ids and decoded text `tokenizers` itself gives. The
Gemma-style model is also written as a vocab-only GGUF with tokenizer.ggml.add_space_prefix = false
and checked against sentencepiece's own ids.

    .peer/venv/bin/python tests/golden/gen_spm_hf_golden.py   # needs sentencepiece, tokenizers, gguf, transformers

Writes tests/data/tokenizer/spm_hf/<form>/{tokenizer.json, tokenizer_config.json}, gemma.gguf and
spm_hf_golden.json. Deterministic (one thread)."""
import json
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers.tokenization_utils_base import generate_merges

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_spm_golden import COMMON_TEXTS, encode_like_llama, train_spm, write_vocab_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "tokenizer" / "spm_hf"

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    *COMMON_TEXTS,
    "ÿ¿ control \u0007 bell",
    "<s> inside </s> text",
    "a<s>b",
    "<s>Hello",
    "<start_of_turn>user\nHi there<end_of_turn>\n",
    "sea▁shells",
    " ",
    "",
    # normalized added tokens: HF matches them by their normalised content ("▁<tool>" under Prepend)
    "call <tool> now",
    "<tool>x",
    "x<tool>",
    "a b c",
    "xa b",
]
ADDED = ("<tool>", "a b")


def pieces(sp):
    return [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]


def bpe_model(sp):
    vocab = {p: i for i, (p, _) in enumerate(pieces(sp))}
    merges = generate_merges(vocab, {p: s for p, s in pieces(sp)})
    return models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)


SPM_DECODER = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]


def with_specials(tok, extra=()):
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", *extra)])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in ADDED])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def llama_legacy(sp):
    tok = Tokenizer(bpe_model(sp))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(SPM_DECODER + [decoders.Strip(" ", 1, 0)])
    return with_specials(tok)


def llama_metaspace(sp):
    tok = Tokenizer(bpe_model(sp))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(SPM_DECODER + [decoders.Strip(" ", 1, 0)])
    return with_specials(tok)


def gemma(sp):
    tok = Tokenizer(bpe_model(sp))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence(SPM_DECODER)
    return with_specials(tok, ("<start_of_turn>", "<end_of_turn>"))


def unigram(sp, byte_fallback, decoder):
    tok = Tokenizer(models.Unigram(pieces(sp), unk_id=0, byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoder
    return with_specials(tok)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp_llama = train_spm(tmp, "llama", "bpe", True, 520)
        sp_gemma = train_spm(tmp, "gemma", "bpe", False, 520)
        sp_uni = train_spm(tmp, "uni", "unigram", True, 380)
        sp_uni_nobf = train_spm(tmp, "uni_nobf", "unigram", True, 120, byte_fallback=False)
    forms = {
        "llama_legacy": (llama_legacy(sp_llama), True),
        "llama_metaspace": (llama_metaspace(sp_llama), True),
        "gemma": (gemma(sp_gemma), True),
        "unigram": (unigram(sp_uni, True, decoders.Sequence(SPM_DECODER + [decoders.Strip(" ", 1, 0)])), True),
        "unigram_unk": (unigram(sp_uni_nobf, False, decoders.Metaspace(replacement="▁", prepend_scheme="always")),
                        False),
    }
    doc = {"generator": "tests/golden/gen_spm_hf_golden.py", "tokenizers": tokenizers.__version__,
           "sentencepiece": spm.__version__,
           "note": "ids without the post-processor's <s>; with_bos: with add_special (the <s> unless add_bos_token is false). decoded: tokenizers' decode of ids "
                   "(skip_special_tokens=False). gguf_ids: sentencepiece's ids for the Gemma-style GGUF.",
           "forms": {}}
    for name, (tok, add_bos) in forms.items():
        d = OUT / name
        d.mkdir(exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": add_bos}, indent=1) + "\n")
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))  # what the file itself gives
        cases = []
        for t in TEXTS:
            enc = tok.encode(t, add_special_tokens=False)
            cases.append({"text": t, "ids": enc.ids, "pieces": enc.tokens,
                          # transformers rebuilds the post-processor from add_bos_token (tokenizer_config.json)
                          "with_bos": tok.encode(t).ids if add_bos else enc.ids,
                          "decoded": tok.decode(enc.ids, skip_special_tokens=False)})
        doc["forms"][name] = {"vocab_size": tok.get_vocab_size(), "cases": cases}
    write_vocab_gguf(sp_gemma, OUT / "gemma.gguf", "spm-gemma-style", False)
    plain = [t for t in TEXTS if "<start_of_turn>" not in t and not any(a in t for a in ADDED)]
    doc["gguf_ids"] = [{"text": t, "ids": encode_like_llama(sp_gemma, t)} for t in plain]
    g = {c["text"]: c["ids"] for c in doc["forms"]["gemma"]["cases"]}
    agree = sum(g[s["text"]] == s["ids"] for s in doc["gguf_ids"])
    doc["gemma_hf_equals_sentencepiece"] = f"{agree}/{len(doc['gguf_ids'])}"
    (OUT / "spm_hf_golden.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    for name, f in doc["forms"].items():
        bf = sum(any(p.startswith("<0x") for p in c["pieces"]) for c in f["cases"])
        print(f"{name}: {len(f['cases'])} cases, {bf} with byte fallback, vocab {f['vocab_size']}")
    print("gemma HF ids equal to sentencepiece:", doc["gemma_hf_equals_sentencepiece"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
