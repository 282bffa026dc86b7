/* deltaserve — byte-level BPE (GPT-2 / Llama-3 / Qwen2 / SmolLM families) and SentencePiece (BPE and
 * Unigram, from GGUF or tokenizer.json) tokenizers, and chat templates. A ds_tokenizer is immutable
 * after creation: every const function is thread-safe. */
#ifndef DS_TOKENIZER_H
#define DS_TOKENIZER_H

#include "ds/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ds_tokenizer ds_tokenizer;

/* Token types as GGUF numbers them. */
enum {
    DS_TOKEN_NORMAL = 1,
    DS_TOKEN_UNKNOWN = 2,
    DS_TOKEN_CONTROL = 3,
    DS_TOKEN_USER_DEFINED = 4,
    DS_TOKEN_UNUSED = 5,
    DS_TOKEN_BYTE = 6,
};

/* Pre-tokeniser families. */
typedef enum {
    DS_PRE_GPT2 = 0,   /* GPT-2 regex */
    DS_PRE_SMOLLM,     /* individual digits, then the GPT-2 regex */
    DS_PRE_LLAMA3,     /* Llama-3 regex (digits in runs of 1-3) */
    DS_PRE_QWEN2,      /* NFC, then the Llama-3 regex with single digits */
} ds_pre_type;

/* A neutral description the loaders fill in (from GGUF metadata or tokenizer.json).
 * All pointers are borrowed for the duration of ds_tokenizer_create only. */
typedef struct ds_tokenizer_desc {
    int32_t n_vocab;
    const char *const *tokens;   /* [n_vocab] byte-level strings (the vocab keys, e.g. "Ġthe") */
    const int32_t *token_types;  /* [n_vocab] DS_TOKEN_*, or NULL (all normal) */
    int32_t n_merges;
    const char *const *merges;   /* [n_merges] "a b", rank = index */
    ds_pre_type pre;
    bool ignore_merges;          /* emit an in-vocab pre-token whole (Llama-3) */
    int32_t bos_id, eos_id, eot_id, pad_id; /* -1 when absent */
    bool add_bos;                /* prepend BOS when encoding with add_special */
    bool add_eos;
    /* SentencePiece BPE (GGUF "llama"): tokens are pieces with "▁" for spaces, scored; no merges. */
    bool spm;
    const float *scores;         /* [n_vocab] (spm) */
    bool add_space_prefix;       /* spm: "▁" before a fragment that starts the text or follows a
                                    special token (sentencepiece's dummy prefix) */
    int32_t unk_id;              /* -1 when absent */
} ds_tokenizer_desc;

/* Returns a tokenizer, or NULL with a message. Control / user-defined tokens are "added tokens"
 * matched before BPE when encoding with parse_special. */
ds_tokenizer *ds_tokenizer_create(const ds_tokenizer_desc *desc, ds_err *err);

/* Maps a GGUF `tokenizer.ggml.pre` name ("smollm", "llama-bpe", "qwen2", "gpt-2", ...; NULL or "" =
 * "default" = GPT-2) to its family. Returns 0, or DS_EUNSUPPORTED for an unknown name. */
int ds_tokenizer_pre_from_name(const char *name, ds_pre_type *out);

/* Loads tokenizer.json (+ optional tokenizer_config.json for bos/eos/add_bos_token and
 * chat_template; config_path may be NULL). Returns NULL with a message naming the file.
 * Supported, byte-level: model BPE (byte_fallback only when no byte can fall back), normalizer NFC
 * or null, pre_tokenizer ByteLevel / Sequence[Digits, ByteLevel] / Sequence[Split(Llama-3|Qwen2
 * regex), ByteLevel], decoder ByteLevel. SentencePiece vocabularies (src/tokenizer/metaspace.c):
 * normalizer Prepend("▁") / Replace(" ", "▁") (or a Sequence of them), pre_tokenizer Metaspace("▁",
 * prepend_scheme, split), null or Split(" ") after a Replace normalizer; model BPE (byte_fallback,
 * fuse_unk) or Unigram (byte_fallback); decoder Replace("▁", " ") / ByteFallback / Fuse /
 * Strip(" ", n, 0) / Metaspace. post_processor TemplateProcessing / ByteLevel / Sequence of those.
 * Anything else is refused by name. As transformers does, add_bos_token / add_eos_token in the
 * config replace the post-processor's choice. The chat template is taken from the config, else from
 * chat_template.jinja beside tokenizer.json. */
ds_tokenizer *ds_tokenizer_load_json(const char *tokenizer_json_path, const char *config_path, ds_err *err);

void ds_tokenizer_free(ds_tokenizer *t);

/* The chat template loaded with the tokenizer (ds_tokenizer_load_json only), or NULL; valid while t
 * lives. */
const char *ds_tokenizer_chat_template(const ds_tokenizer *t);

/* Encodes UTF-8 text. add_special: prepend BOS (and append EOS) as the model's config says.
 * parse_special: match added/special tokens in the text (e.g. "<|im_start|>"); otherwise they are
 * plain text. On success *ids is malloc'd (caller frees) and *n_ids set; returns 0 or DS_E*.
 * Invalid UTF-8 is encoded byte-wise (never an error). */
int ds_tokenizer_encode(const ds_tokenizer *t, const char *text, size_t len, bool add_special,
                        bool parse_special, int32_t **ids, size_t *n_ids);

/* A byte range [start, end) of a text. */
typedef struct ds_text_span {
    size_t start, end;
} ds_text_span;

/* ds_tokenizer_encode with parse_special, except that special tokens overlapping one of the
 * `plain` ranges (sorted, not overlapping) are encoded as the text they are. */
int ds_tokenizer_encode_plain(const ds_tokenizer *t, const char *text, size_t len, bool add_special,
                              const ds_text_span *plain, size_t n_plain, int32_t **ids, size_t *n_ids);

/* Decodes ids to UTF-8 bytes (caller frees *out, NUL-terminated). skip_special drops control
 * tokens. A tokenizer.json decoder's Strip / Metaspace first-token rule applies, as in HF's decode.
 * Returns 0 or DS_EINVAL for an id out of range. */
int ds_tokenizer_decode(const ds_tokenizer *t, const int32_t *ids, size_t n_ids, bool skip_special,
                        char **out, size_t *out_len);

/* Streaming detokeniser: feeds one token, appends only complete UTF-8 characters to `out`
 * (up to cap bytes), holding back an incomplete trailing sequence until the next token.
 * Returns the number of bytes written, or a negative DS_E*: DS_EINVAL for a bad id, DS_ERANGE when
 * the output does not fit in cap (the state is then unchanged; 3 * token bytes + 12 always fits).
 * Invalid bytes become U+FFFD exactly as ds_tokenizer_decode does, so the pushes + flush of a
 * sequence concatenate to its decode — except that nothing is stripped: a stream continues a
 * prompt, so the leading space a Strip / Metaspace decoder takes off a whole decode is kept. Start
 * from a zeroed ds_detok; one per stream. */
typedef struct ds_detok {
    uint8_t pending[8];
    int n_pending;
} ds_detok;
int ds_detok_push(const ds_tokenizer *t, ds_detok *st, int32_t id, bool skip_special, char *out, size_t cap);
/* Emits whatever is still pending (invalid bytes become U+FFFD). */
int ds_detok_flush(ds_detok *st, char *out, size_t cap);

int32_t ds_tokenizer_n_vocab(const ds_tokenizer *t);
int32_t ds_tokenizer_bos(const ds_tokenizer *t);
int32_t ds_tokenizer_eos(const ds_tokenizer *t);
int32_t ds_tokenizer_eot(const ds_tokenizer *t); /* end-of-turn, or -1 */
bool ds_tokenizer_is_eog(const ds_tokenizer *t, int32_t id); /* eos, eot and other end-of-generation ids */
bool ds_tokenizer_is_special(const ds_tokenizer *t, int32_t id);
/* The raw decoded bytes of one token (not NUL-terminated); valid while t lives. */
const char *ds_tokenizer_token_bytes(const ds_tokenizer *t, int32_t id, size_t *len);
/* Looks up an exact vocab/added-token string ("<|im_end|>"); -1 when absent. */
int32_t ds_tokenizer_find(const ds_tokenizer *t, const char *token);

/* Chat templates. */
typedef enum {
    DS_CHAT_CHATML = 0, /* <|im_start|>role\n...<|im_end|>\n (SmolLM2, Qwen2) */
    DS_CHAT_LLAMA3,     /* <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> */
    DS_CHAT_LLAMA2,     /* <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ... </s> (Llama-2-chat) */
    DS_CHAT_MISTRAL,    /* <s>[INST] ... [/INST]...</s> (Mistral / Mixtral instruct, no system role) */
    DS_CHAT_LLAMA31,    /* Llama 3.1 / 3.3: Llama-3 turns after a system block that always carries
                         * "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" */
    DS_CHAT_LLAMA32,    /* Llama 3.2: the same, dated today (strftime_now, as transformers renders it) */
    DS_CHAT_PHI3,       /* <|role|>\n...<|end|>\n (Phi-3-mini / -medium instruct) */
    DS_CHAT_PHI35,      /* the same, an empty system message dropped (Phi-3.5-mini instruct) */
    DS_CHAT_GEMMA3,     /* <bos><start_of_turn>user\n...<end_of_turn>\n, "model" for the assistant, the
                         * system message prefixed to the first turn (Gemma 3 instruct) */
} ds_chat_format;

typedef struct ds_chat_msg {
    const char *role;    /* "system" | "user" | "assistant" | ... */
    const char *content;
} ds_chat_msg;

/* Picks the format from a Jinja template's text (NULL → ChatML): "<|im_start|>" → ChatML,
 * "<|start_header_id|>" → Llama-3 (Llama-3.1 when it writes "Cutting Knowledge Date", Llama-3.2 when
 * it dates it with strftime_now), "[INST]" with
 * "<<SYS>>" → Llama-2, other "[INST]" → Mistral, "<|user|>" with "<|end|>" → Phi-3 (Phi-3.5 when
 * the system turn is conditional on its content), "<start_of_turn>" → Gemma 3. */
ds_chat_format ds_chat_detect(const char *template_text);

/* The default system prompt a ChatML template inserts when the conversation has none (SmolLM2: "You
 * are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2: "You are a helpful
 * assistant."), i.e. a literal '<|im_start|>system\n...<|im_end|>' in a template that tests
 * messages[0]['role'] != 'system'. Returns a malloc'd string (caller frees) or NULL when none. */
char *ds_chat_default_system(const char *template_text);

/* Renders messages exactly as transformers' apply_chat_template does with the family's canonical
 * template (bos/eos spelled "<|begin_of_text|>", "<s>", "</s>", "<bos>", "<|endoftext|>"); encode
 * the result with add_special = false, parse_special = true. add_generation_prompt appends the
 * assistant header (ChatML, Llama-3, Phi-3, Gemma 3; the Llama-2 / Mistral templates have none; Phi-3
 * without it ends with its eos). Llama-3.1 refuses nothing; a "tool" / "ipython" message is written
 * as the ipython role with its content as a JSON string. default_system (may be NULL) is
 * inserted as a first system message when messages[0] is not one (not for Mistral, which has no
 * system role). *out is malloc'd, caller frees. Returns 0 or DS_EINVAL: no messages, NULL role or
 * content, a role that is not [A-Za-z0-9_-]+, or what the template itself refuses (Llama-2 / Mistral /
 * Gemma 3: roles not alternating user/assistant; Mistral: a role other than user / assistant). */
int ds_chat_render(ds_chat_format fmt, const ds_chat_msg *msgs, size_t n_msgs, bool add_generation_prompt,
                   const char *default_system, char **out);
/* The same, also returning where the messages' contents landed in *out (byte ranges, in order;
 * the template's own default system prompt is not one): *content is malloc'd (caller frees; NULL
 * when there are none). For ds_tokenizer_encode_plain: client text there stays text, so a
 * "<|im_end|>" typed into a message cannot close it (role injection). */
int ds_chat_render_spans(ds_chat_format fmt, const ds_chat_msg *msgs, size_t n_msgs, bool add_generation_prompt,
                         const char *default_system, char **out, ds_text_span **content, size_t *n_content);

#ifdef __cplusplus
}
#endif
#endif
