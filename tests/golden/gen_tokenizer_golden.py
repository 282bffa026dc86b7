#!/usr/bin/env python3
"""Golden data for the tokenizer and chat-template tests (tests/unit/test_tokenizer*.c, test_chat_template.c).

    python3 tests/golden/gen_tokenizer_golden.py [--retrain]

Needs `tokenizers`, `transformers` (+ `gguf`) and models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_model.sh).
The C tests need none of these: they read only the committed files below plus the GGUF itself.

Committed, under tests/data/tokenizer/:
  corpus.json               the test strings (English, Chinese, code, emoji, digits, whitespace, special tokens, ...)
  golden_ids.json           exact HF `tokenizers` ids / decodes for every corpus line and tokenizer
  chat_golden.json          HF apply_chat_template output for ChatML (SmolLM2's real template), Llama-3,
                            Llama-3.1, Phi-3, Phi-3.5, Gemma 3,
                            Llama-2 and Mistral templates
  {llama3,qwen2,gpt2}_tokenizer.json (+ _config.json)
                            small BPE tokenizers TRAINED here, shaped exactly like Llama-3 (Split regex
                            Isolated + ByteLevel, ignore_merges, BOS via TemplateProcessing), Qwen2 (NFC,
                            single-digit regex, no BOS, "a b" string merges) and GPT-2 (ByteLevel regex only).
                            They are only retrained with --retrain (or when missing), so goldens stay stable.
Git-ignored, under models/ (lets the C test also exercise ds_tokenizer_load_json on the real vocab):
  SmolLM2-135M-Instruct.tokenizer.json / .tokenizer_config.json

SmolLM2 reference: the tokenizer transformers builds from the GGUF, with its pre-tokenizer set to what the
Hub's SmolLM2 tokenizer.json ships: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
transformers' GGUF path (v5) uses plain ByteLevel there, which differs e.g. on "a  1" (Ġ Ġ 1 vs ĠĠ 1);
the Hub file (what the model was trained with, and what llama.cpp's `smollm` pre-tokenizer does) wins.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
DATA = os.path.join(ROOT, "tests", "data", "tokenizer")
MODELS = os.path.join(ROOT, "models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it; she'd agree.",
    "DON'T SHOUT. IT'S LOUD. They'RE here, we'LL see, I'D say.",
    "rock'n'roll isn't 'quoted' text",
    "参数高效微调（PEFT）是一种只训练少量参数就能适配大模型的方法。",
    "LoRA 把权重更新分解成两个低秩矩阵，显著降低了显存占用。",
    "大语言模型的推理服务需要高效的批处理和KV缓存管理。",
    "混合文本: LoRA适配器rank=16, alpha=32, 学习率2e-4。",
    "日本語のテキストとカタカナ、ひらがなも含みます。",
    "한국어 텍스트입니다. 안녕하세요!",
    "Россия и Україна — кириллица; Ελληνικά γράμματα.",
    "مرحبا بالعالم، هذا نص عربي.",
    "हिन्दी में कुछ पाठ।",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "def foo(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "{\"name\": \"deltaserve\", \"version\": [0, 1, 0], \"ok\": true}",
    "if __name__ == \"__main__\":\n    main()\n\n\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "git commit -m 'fix: handle \\r\\n line endings' && ls -la ~/src/*.c | grep -v test",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "Emoji: 😀 👍🏽 ❤️ 🎉🎉🎉",
    "Family ZWJ: 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👩🏾‍💻",
    "Flags: 🇺🇸🇯🇵🇩🇪🇨🇳 keycap 1️⃣ #️⃣",
    "12345678901234567890",
    "Pi is 3.14159265358979, e is 2.71828; 1,000,000 and 1.000.000,00",
    "Phone: +1 (555) 123-4567, year 2024, v0.1.0",
    "Arabic-Indic ٣٤٥ and superscripts x² y³ and roman Ⅻ ⅷ and fraction ½",
    "a   b",
    "a\tb\t\tc",
    "line1\nline2\n\nline3\n",
    "trailing spaces   ",
    "   leading spaces",
    "windows\r\nline\r\nendings",
    "\n\n\n",
    "  \t  \n  mixed whitespace \t\n",
    "a \n b",
    "word  1  22  333  4444",
    "x1y22z333",
    "nbsp\u00a0here and ideographic\u3000space and thin\u2009space",
    "zero\u200bwidth\u200cjoiner\u200dhere",
    "café naïve résumé façade Ångström",
    "cafe\u0301 and e\u0301te\u0301 (decomposed)",
    "\u1112\u1161\u11ab\u1100\u1173\u11af (Hangul jamo)",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∫f(x)dx ≠ ∞",
    "URL https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
    "email: someone.else+tag@example.co.uk",
    "**Markdown** _text_ with `code` and [link](http://a.b) > quote\n- item\n1. first",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababababababababababababababababababab",
    "                                                                                                    x",
    "!!!???...---((()))[[[]]]{{{}}}",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|im_start|>",
    "partial <|im_start and <|im_end| markers",
    "<|begin_of_text|>Hello<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "a  <|mask|>  b",
    "x<|mask|>y",
    "a [WORD] b",
    "a[WORD]b",
    "[WORD]",
    "<think>reasoning</think> answer",
    "call <tool_call>{\"name\": \"f\"}</tool_call> now",
    "café and cafe\u0301 as added tokens",
    "<repo_name>deltaserve<file_sep>main.c",
    "Mixed 中文 English 日本語 한국어 العربية 123 😀!",
    "Tabs\tand\tspaces    mixed\t \tup",
    "  ",
    "\t",
    "\u2028line separator and\u2029paragraph",
    "ʼapostrophe ’curly’ ‘quotes’ «guillemets» „German“",
    "don’t won’t can't",
    "ſ long s, ﬁ ligature, Ａ fullwidth, ｶﾀｶﾅ halfwidth",
    "Ω ohm Å angstrom K kelvin",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛",
]

def random_lines(n, seed=20241122):
    """Random mixes of the characters pre-tokenisers disagree about most (whitespace kinds, marks, digits of
    several scripts, newly assigned code points, added-token fragments): a differential fuzz against HF
    found Unicode-version differences here that the hand-written lines missed."""
    import random

    rng = random.Random(seed)
    pool = list(" \t\n\r  abexZ'stlLSTDMVR19.,!?<|>_-()[]{}\"#@$%^&*+=/\\~`") + [chr(c) for c in (
        0xA0, 0x3000, 0x2028, 0x2029, 0x85, 0x1680, 0x180E, 0x200B, 0x2009, 0x202F, 0x205F, 0xFEFF, 0x4E2D, 0x6587,
        0x53C2, 0xE9, 0x301, 0x1F600, 0x1F3FD, 0x200D, 0x1F1FA, 0x1F1F8, 0x663, 0xB2, 0x216B, 0xFF21, 0xE01, 0x5D0,
        0x17F, 0x2019, 0xAC00, 0x1100, 0x1161, 0x11DE0, 0x16FF4, 0x0B, 0x0C, 0x1C, 0x1F, 0x212A, 0x130, 0x131, 0xDF,
        0x1E9E, 0x2160, 0xBD, 0x3007, 0x10400, 0x1D7CE, 0x345, 0xE31, 0xE47, 0x105C0, 0x10D40, 0x13460, 0x1C89)]
    pieces = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>", "<|mask|>", "[WORD]",
              "<think>", "café", "<tool_call>", "'s", "'LL", "'Re", "  ", "\t\n", " \n ", "\r\n", "\u3000 "]
    lines = []
    for _ in range(n):
        out = []
        for _ in range(rng.randint(1, 60)):
            r = rng.random()
            out.append(rng.choice(pieces) if r < 0.15 else chr(rng.choice([c for c in range(0x20, 0x2FFFF)
                                                                            if not 0xD800 <= c < 0xE000]))
                       if r < 0.25 else rng.choice(pool))
        lines.append("".join(out))
    return lines


UNREACHABLE = ["Ġdeltaserve", "Ġunreachable", "ZZZZ", "ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ"]
CORPUS.append("welcome to deltaserve unreachable ZZZZ" + " " * 33 + "x")
CORPUS += random_lines(12)

CHINESE_TRAIN = """
参数高效微调是一类只更新少量参数的方法，例如低秩适配、前缀微调和提示微调。低秩适配把权重的更新量分解为两个低秩矩阵的乘积，
训练时冻结原始权重，只训练这两个小矩阵，因此显存占用和存储成本都大幅降低。推理时可以把适配器合并回原始权重，
也可以在同一个基础模型上同时服务多个适配器。大语言模型的推理服务需要考虑批处理、键值缓存、调度和内存管理。
连续批处理允许新的请求在任何一步加入批次，分页注意力把键值缓存切分成固定大小的块，从而减少内存碎片。
我们的服务器使用纯C语言编写，支持多个适配器并发推理，并提供与开放接口兼容的聊天补全接口。
模型的分词器采用字节级别的字节对编码，先按照正则表达式做预分词，再按合并规则的优先级逐步合并相邻的符号。
中文文本通常没有空格，所以一个预分词片段可能包含很长的一串汉字。测试需要覆盖中文、英文、代码、表情符号和数字。
日本語のテキストも少し含めます。ひらがなとカタカナと漢字を混ぜて書きます。
한국어 문장도 조금 포함합니다. 토크나이저는 모든 언어를 처리해야 합니다.
"""

ENGLISH_TRAIN = """
Parameter-efficient fine-tuning trains a small number of extra parameters while the base model stays frozen.
LoRA factorises the weight update into two low-rank matrices A and B, scaled by alpha over r. At inference time
many adapters can share one base model: requests for different adapters are batched together, and a segmented
gather matrix-vector kernel applies each request's adapter to its own rows. The server speaks an OpenAI-compatible
HTTP API with streaming responses, so tokens must be detokenised incrementally without ever splitting a UTF-8
character. I'm sure you'll agree it's important; we've tested it, they'd say, and don't worry.
The quick brown fox jumps over the lazy dog. Numbers like 2024, 3.14159 and 1,000,000 appear in text.
"""


def training_text():
    """Text the small tokenizers learn from: the corpus, hand-written paragraphs, and a few stdlib sources."""
    parts = list(CORPUS) * 3 + [CHINESE_TRAIN * 4, ENGLISH_TRAIN * 4]
    import inspect, json as _j, textwrap, argparse as _a, unittest.case as _u  # noqa: E401
    for mod in (_j.decoder, _j.encoder, textwrap, _a, _u):
        parts.append(inspect.getsource(mod))
    return parts


def add_unreachable_tokens(tok):
    """Vocab entries no merge sequence produces, as tiktoken-converted vocabs (Llama-3) have: only
    ignore_merges emits them, so the golden ids pin that behaviour down."""
    from tokenizers import Tokenizer

    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    for t in UNREACHABLE:
        if t not in vocab:
            vocab[t] = len(vocab)
    return Tokenizer.from_str(json.dumps(j))


def train_tokenizer(kind, vocab_size):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel
    tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
    if kind == "gpt2":
        tok.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
    else:
        split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            byte_level(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=byte_level.alphabet(), special_tokens=[])
    tok.train_from_iterator(training_text(), trainer=trainer)
    if kind == "llama3":
        tok = add_unreachable_tokens(tok)

    if kind == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|reserved_special_token_2|>", "<|eot_id|>"]
        tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
        # Exotic added-token options, to pin down HF's lstrip / rstrip / single_word handling.
        tok.add_special_tokens([AddedToken("<|mask|>", lstrip=True, rstrip=True, normalized=False, special=True),
                                AddedToken("[WORD]", single_word=True, normalized=False, special=True)])
        tok.add_tokens([AddedToken("<think>", normalized=False, special=False),
                        AddedToken("</think>", normalized=False, special=False)])
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
    elif kind == "qwen2":
        tok.add_special_tokens([AddedToken(s, normalized=False, special=True)
                                for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
        tok.add_tokens([AddedToken("<tool_call>", normalized=False, special=False),
                        AddedToken("</tool_call>", normalized=False, special=False),
                        # normalized=True: matched on the NFC-normalised text, so "cafe\u0301" matches too
                        AddedToken("café", normalized=True, special=False)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.add_special_tokens([AddedToken("<|endoftext|>", normalized=False, special=True)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    j = json.loads(tok.to_str())
    if kind == "qwen2":  # the older "a b" merges form, which Qwen2's shipped file uses
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    return j


TOKENIZER_CONFIGS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
               "model_max_length": 8192, "tokenizer_class": "PreTrainedTokenizerFast"},
    "qwen2": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "errors": "replace", "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer"},
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"},
}


def ensure_trained(retrain):
    sizes = {"llama3": 3000, "qwen2": 3000, "gpt2": 1000}
    for kind, size in sizes.items():
        path = os.path.join(DATA, f"{kind}_tokenizer.json")
        if retrain or not os.path.exists(path):
            j = train_tokenizer(kind, size)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
            print(f"trained {path}: {len(j['model']['vocab'])} vocab, {len(j['model']['merges'])} merges")
        cfg = os.path.join(DATA, f"{kind}_tokenizer_config.json")
        with open(cfg, "w", encoding="utf-8") as f:
            json.dump(TOKENIZER_CONFIGS[kind], f, indent=2)


def smollm2_tokenizer():
    """SmolLM2's tokenizer from the GGUF (see module docstring for the pre-tokenizer fix-up)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    backend = hf.backend_tokenizer
    plain_gguf = json.loads(backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    # Export for the C test's tokenizer.json path (git-ignored, ~3.5 MB).
    backend.save(os.path.join(MODELS, "SmolLM2-135M-Instruct.tokenizer.json"))
    with open(os.path.join(MODELS, "SmolLM2-135M-Instruct.tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
                   "chat_template": hf.chat_template}, f, indent=2)
    return backend, plain_gguf, hf.chat_template


def golden_for(tok):
    out = {"ids": [], "ids_nobos": [], "ids_plain": [], "decoded": [], "decoded_skip": []}
    for text in CORPUS:
        tok.encode_special_tokens = False
        ids = tok.encode(text, add_special_tokens=True).ids
        out["ids"].append(ids)
        out["ids_nobos"].append(tok.encode(text, add_special_tokens=False).ids)
        tok.encode_special_tokens = True
        out["ids_plain"].append(tok.encode(text, add_special_tokens=False).ids)
        tok.encode_special_tokens = False
        out["decoded"].append(tok.decode(ids, skip_special_tokens=False))
        out["decoded_skip"].append(tok.decode(ids, skip_special_tokens=True))
    return out


def write_golden_ids(goldens):
    """One corpus line per JSON line, so diffs stay readable."""
    path = os.path.join(DATA, "golden_ids.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        for name, g in goldens.items():
            f.write(f'"{name}": {{\n')
            keys = list(g.keys())
            for ki, key in enumerate(keys):
                f.write(f'  "{key}": [\n')
                rows = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in g[key]]
                f.write(",\n".join("    " + r for r in rows))
                f.write("\n  ]" + ("," if ki + 1 < len(keys) else "") + "\n")
            f.write("}" + ("," if name != list(goldens)[-1] else "") + "\n")
        f.write("}\n")
    print(f"wrote {path}")


# ---- chat templates ------------------------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# meta-llama/Llama-2-7b-chat-hf (the `\\n` are Jinja string escapes, as in the shipped tokenizer_config.json)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# mistralai/Mixtral-8x7B-Instruct-v0.1 / Mistral-7B-Instruct-v0.2
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# meta-llama/Llama-3.1-8B-Instruct (also Llama-3.3-70B-Instruct): the system block always carries the
# knowledge cutoff and the default date; tool results go in as the ipython role, | tojson
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# microsoft/Phi-3-mini-4k-instruct; Phi-3.5-mini-instruct adds "and message['content']" to the system test
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI35_TEMPLATE = PHI3_TEMPLATE.replace("message['role'] == 'system' %}",
                                       "message['role'] == 'system' and message['content'] %}")
# google/gemma-3-*-it (transformers' convert_gemma3_weights.py writes the same _CHAT_TEMPLATE)
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "  padded question \n"}, {"role": "assistant", "content": "\t reply with spaces  \n"},
     {"role": "user", "content": "next"}],
    [{"role": "user", "content": "请解释参数高效微调。\n分两段回答。"},
     {"role": "assistant", "content": "好的。\n\n第一段……"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [{"role": "user", "content": "call a tool"}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "{\"result\": 42}"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "I start"}],
    [{"role": "system", "content": "sys only"}],
    [{"role": "user", "content": "emoji 😀 and <tags> & \"quotes\""}, {"role": "assistant", "content": ""}],
    [],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "q"},
     {"role": "tool", "content": "line1\n\t\"quoted\" \\ back\u0001 é 😀"}],
]


def render_chat(hf_tok, template, messages, gen):
    try:
        return hf_tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen,
                                          tokenize=False)
    except Exception as e:  # raise_exception / undefined messages[0]: the C side must refuse too
        return {"error": type(e).__name__}


def gen_chat(smollm_template):
    from transformers import PreTrainedTokenizerFast

    templates = {
        "chatml_smollm2": {"template": smollm_template, "bos": "<|im_start|>", "eos": "<|im_end|>"},
        "llama3": {"template": LLAMA3_TEMPLATE, "bos": "<|begin_of_text|>", "eos": "<|eot_id|>"},
        "llama2": {"template": LLAMA2_TEMPLATE, "bos": "<s>", "eos": "</s>"},
        "mistral": {"template": MISTRAL_TEMPLATE, "bos": "<s>", "eos": "</s>"},
        "llama31": {"template": LLAMA31_TEMPLATE, "bos": "<|begin_of_text|>", "eos": "<|eot_id|>"},
        "phi3": {"template": PHI3_TEMPLATE, "bos": "<s>", "eos": "<|endoftext|>"},
        "phi35": {"template": PHI35_TEMPLATE, "bos": "<s>", "eos": "<|endoftext|>"},
        "gemma3": {"template": GEMMA3_TEMPLATE, "bos": "<bos>", "eos": "<eos>"},
    }
    cases = []
    for name, t in templates.items():
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(DATA, "gpt2_tokenizer.json"),
                                         bos_token=t["bos"], eos_token=t["eos"])
        for msgs in CONVERSATIONS:
            for gen in (True, False):
                cases.append({"template": name, "add_generation_prompt": gen, "messages": msgs,
                              "output": render_chat(hf_tok, t["template"], msgs, gen)})
    path = os.path.join(DATA, "chat_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"templates": templates, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {path}: {len(cases)} cases")


# ---- Unicode classes ------------------------------------------------------------------------------------------

def _ranges(cs):
    out = []
    for c in sorted(cs):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def unicode_classes():
    """HF's character classes over every code point, as [lo, hi] ranges (tests/data/tokenizer/unicode_classes.json):
    Oniguruma's \\s, \\p{L}, \\p{N} (pre-tokenizer regexes), Rust char::is_numeric (Digits) and the Rust regex
    crate's \\w and \\s (added tokens' single_word / lstrip / rstrip). test_tokenizer_unicode.c checks deltaserve
    classifies each code point the same way; src/tokenizer/tok_unicode.c holds the ranges our libraries lack."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    chars = [c for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]
    out = {}
    for name, rx in (("white_space", r"\s"), ("letter", r"\p{L}"), ("number", r"\p{N}")):
        split = pre_tokenizers.Split(Regex(rx), behavior="removed")  # members are exactly what disappears
        members = []
        for i in range(0, len(chars), 4096):
            chunk = chars[i:i + 4096]
            kept = {ord(ch) for text, _ in split.pre_tokenize_str("".join(map(chr, chunk))) for ch in text}
            members += [c for c in chunk if c not in kept]
        out[name] = _ranges(members)
    digits = pre_tokenizers.Digits(individual_digits=True)
    numeric = set()
    for i in range(0, len(chars), 4096):  # "a"-separated: only numerics stand alone
        for text, _ in digits.pre_tokenize_str("a".join(map(chr, chars[i:i + 4096]))):
            if len(text) == 1 and text != "a":
                numeric.add(ord(text))
    out["numeric"] = _ranges(numeric)

    def added_probe(token, texts, hit):
        tok = Tokenizer(models.BPE())
        tok.add_special_tokens([token])
        qid = tok.token_to_id(token.content)
        found = []
        for i in range(0, len(texts), 100000):
            for c, e in zip(chars[i:i + 100000], tok.encode_batch(texts[i:i + 100000])):
                if hit(qid, e):
                    found.append(c)
        return found

    # \w: a single_word token right after a word character does not match.
    out["word"] = _ranges(added_probe(AddedToken("Q", single_word=True, normalized=False, special=True),
                                      [chr(c) + "Q" for c in chars], lambda q, e: q not in e.ids))
    # \s (Rust regex): an lstrip token swallows the white space before it.
    ws = added_probe(AddedToken("Q", lstrip=True, normalized=False, special=True), ["x" + chr(c) + "Q" for c in chars],
                     lambda q, e: any(t == q and o[0] == 1 for t, o in zip(e.ids, e.offsets)))
    out["rust_white_space"] = _ranges(c for c in ws if c != ord("Q"))
    path = os.path.join(DATA, "unicode_classes.json")
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(f'"{k}": {json.dumps(v, separators=(",", ":"))}' for k, v in out.items()) + "\n}\n")
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--retrain", action="store_true", help="retrain the small Llama-3/Qwen2/GPT-2 tokenizers")
    ap.add_argument("--skip-unicode", action="store_true", help="keep unicode_classes.json (its scan takes ~30 s)")
    ap.add_argument("--only-chat", action="store_true",
                    help="rewrite chat_golden.json only (SmolLM2's template taken from the committed file)")
    args = ap.parse_args()
    if args.only_chat:
        with open(os.path.join(DATA, "chat_golden.json"), encoding="utf-8") as f:
            gen_chat(json.load(f)["templates"]["chatml_smollm2"]["template"])
        return
    os.makedirs(DATA, exist_ok=True)
    if not os.path.exists(os.path.join(MODELS, GGUF)):
        sys.exit(f"missing models/{GGUF}: run scripts/fetch_model.sh")
    with open(os.path.join(DATA, "corpus.json"), "w", encoding="utf-8") as f:
        json.dump(CORPUS, f, ensure_ascii=False, indent=0)
    ensure_trained(args.retrain)

    from tokenizers import Tokenizer

    smol, plain_gguf, smol_template = smollm2_tokenizer()
    goldens = {"smollm2": golden_for(smol)}
    for kind in ("llama3", "qwen2", "gpt2"):
        goldens[kind] = golden_for(Tokenizer.from_file(os.path.join(DATA, f"{kind}_tokenizer.json")))
    write_golden_ids(goldens)

    # Informational: where transformers' own GGUF conversion (no Digits step) disagrees with the Hub pipeline.
    plain = Tokenizer.from_str(json.dumps(plain_gguf))
    diff = sum(plain.encode(t).ids != smol.encode(t).ids for t in CORPUS)
    print(f"smollm2: transformers' GGUF pre-tokenizer differs from the Hub one on {diff}/{len(CORPUS)} lines")
    # Informational: how often ignore_merges changes the Llama-3-style result.
    j = json.load(open(os.path.join(DATA, "llama3_tokenizer.json"), encoding="utf-8"))
    j["model"]["ignore_merges"] = False
    no_ign = Tokenizer.from_str(json.dumps(j))
    diff = sum(no_ign.encode(t).ids != goldens["llama3"]["ids"][i] for i, t in enumerate(CORPUS))
    print(f"llama3: ignore_merges changes {diff}/{len(CORPUS)} lines")
    gen_chat(smol_template)
    if not args.skip_unicode:
        unicode_classes()


if __name__ == "__main__":
    main()
