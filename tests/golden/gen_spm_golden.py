#!/usr/bin/env python3
"""SentencePiece (Llama-2 / Mistral v0.1 / TinyLlama style) tokenizer golden for the GGUF loader.

Trains a small SentencePiece BPE model with byte fallback the way Llama's tokenizer is configured
(identity normalisation, dummy prefix, digits split, whitespace kept), writes it as the tokenizer of
a vocab-only GGUF the way llama.cpp's convert_hf_to_gguf.py writes SentencePiece vocabularies
(tokenizer.ggml.model = "llama", tokens, scores, token types, <unk>/<s>/</s> ids), and records the
ids sentencepiece itself gives for test texts (Chinese and emoji fall back to bytes, as they are not
in the training text). Texts with "<s>" / "</s>" are split there first and every piece is encoded on
its own, which is how transformers' (legacy) LlamaTokenizer and llama.cpp treat special tokens.

    .peer/venv/bin/python tests/golden/gen_spm_golden.py     # needs sentencepiece, gguf, numpy

Writes tests/data/tokenizer/spm/{tokenizer.gguf, spm_golden.json}. Deterministic (one thread)."""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import gguf

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "tokenizer" / "spm"

CORPUS = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello world! This is a small corpus for a tiny tokenizer, trained only for tests.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
Numbers like 12345 and 2024 are split into single digits by the Llama tokenizer.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.
In the beginning was the word, and the word was with the tokenizer.
Machine learning models read text as tokens: words, pieces of words and bytes.
Adapters are small trained modules that change what a frozen base model does.
""" * 20

# spaces, whitespace runs, digits, text outside the corpus (byte fallback), code: gen_spm_hf_golden.py
# checks them too, in its own list
COMMON_TEXTS = [
    "two  spaces  here",
    "trailing space ",
    "\n\nnewlines\tand\ttabs\n",
    "The year 2024 and 12345.",
    "数字和中文，还有标点。",
    "emoji 🙂👍 and café naïve",
    "def f(x):\n    return x**2",
    "unknown wordsXyzzy qwertyuiop",
]

TEXTS = [
    "Hello world",
    "Hello world!",
    " leading space",
    *COMMON_TEXTS,
    "<s> inside </s> text",
    "</s>",
    "a<s>b",
    "",
]

SPECIAL = ("<s>", "</s>")


def encode_like_llama(sp, text):
    """Split at the special tokens, encode each other piece with sentencepiece (dummy prefix each)."""
    ids, i, start = [], 0, 0
    while i < len(text):
        hit = next((s for s in SPECIAL if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            ids += sp.encode(text[start:i])
        ids.append(sp.piece_to_id(hit))
        i += len(hit)
        start = i
    if start < len(text):
        ids += sp.encode(text[start:])
    return ids


def token_type(sp, i):
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL


def train_spm(tmp, name, model_type, dummy_prefix, vocab_size, byte_fallback=True):
    """A sentencepiece model trained on CORPUS in directory tmp, configured the way Llama's is."""
    corpus = Path(tmp) / "corpus.txt"
    corpus.write_text(CORPUS)
    prefix = str(Path(tmp) / name)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=byte_fallback, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_vocab_gguf(sp, path, name, add_space_prefix):
    """sp's vocabulary as a vocab-only llama GGUF (convert_hf_to_gguf.py's SentencePiece layout)."""
    n = sp.get_piece_size()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 8), ("feed_forward_length", 16)):
        w.add_uint32(f"llama.{k}", v)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i).encode() for i in range(n)])
    w.add_token_scores([float(sp.get_score(i)) for i in range(n)])
    w.add_token_types([int(token_type(sp, i)) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(add_space_prefix)
    # the loader sizes the vocabulary from token_embd (the tokenizer needs no other tensor)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_spm(tmp, "spm", "bpe", True, 520)
    n = sp.get_piece_size()
    write_vocab_gguf(sp, OUT / "tokenizer.gguf", "spm-tiny", True)

    cases = []
    for t in TEXTS:
        ids = encode_like_llama(sp, t)
        pieces = [sp.id_to_piece(i) for i in ids]
        cases.append({"text": t, "ids": ids, "pieces": pieces,
                      "byte_fallback": any(sp.is_byte(i) for i in ids)})
    assert any(c["byte_fallback"] for c in cases), "the golden must exercise byte fallback"
    doc = {"generator": "tests/golden/gen_spm_golden.py", "sentencepiece": spm.__version__, "vocab_size": n,
           "bos": 1, "eos": 2, "unk": 0,
           "note": "ids without BOS; encoding with add_special prepends 1. Special tokens split the text "
                   "and each other piece gets sentencepiece's dummy prefix.",
           "cases": cases}
    (OUT / "spm_golden.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}/tokenizer.gguf ({n} tokens) and spm_golden.json ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
