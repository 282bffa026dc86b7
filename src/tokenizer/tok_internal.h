/* deltaserve — tokenizer internals shared by tokenizer.c, tok_encode.c, bpe.c, pretokenize.c,
 * tok_utf8.c and tokenizer_json.c. Not a public API.
 *
 * The pipeline mirrors Hugging Face `tokenizers` for byte-level BPE:
 *   1. added tokens whose `normalized` is false are split out of the raw text (leftmost-longest),
 *   2. each remaining gap is normalised (NFC or nothing) and added tokens whose `normalized` is true
 *      are split out of the normalised gap,
 *   3. each remaining gap is pre-tokenised (optional individual-digit split, then one regex),
 *   4. each piece is byte-level BPE'd (or emitted whole under ignore_merges).
 * SentencePiece vocabularies take other steps 2-4: from GGUF, spm.c (scored merges over the fragment);
 * from tokenizer.json, the Prepend/Replace normaliser, the Metaspace pre-tokeniser and a BPE over
 * characters with byte fallback or a Unigram model (metaspace.c, unigram.c). */
#ifndef DS_TOKENIZER_TOK_INTERNAL_H
#define DS_TOKENIZER_TOK_INTERNAL_H

#include "ds/tokenizer.h"
#include "util/strmap.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/* ---- UTF-8 and character classes (tok_utf8.c) ---- */

/* Decodes one UTF-8 sequence at s[0..n). Returns its length (1-4) and sets *cp, or returns 0 when the
 * bytes are not a valid sequence there (truncated, overlong, surrogate, > U+10FFFF). */
size_t tok_utf8_decode(const uint8_t *s, size_t n, uint32_t *cp);
/* Encodes cp (<= U+10FFFF) into out[4]; returns the length. */
size_t tok_utf8_encode(uint32_t cp, uint8_t *out);
/* Lossy conversion as Rust's String::from_utf8_lossy (one U+FFFD per maximal invalid subpart).
 * When `final` is false, a trailing sequence that is a valid-but-incomplete prefix is not consumed.
 * Writes at most cap bytes to out (out may be NULL to size). Returns the bytes needed for the
 * consumed input; *consumed is set to the input bytes consumed. */
size_t tok_utf8_lossy(const uint8_t *s, size_t n, bool final, uint8_t *out, size_t cap, size_t *consumed);
bool tok_utf8_valid(const uint8_t *s, size_t n);
bool tok_is_white_space(uint32_t cp); /* Unicode White_Space (Rust regex \s) */
bool tok_is_word(uint32_t cp);        /* Rust regex \w: alphabetic, marks, Nd, Pc, join controls */
bool tok_is_numeric(uint32_t cp);     /* Rust char::is_numeric: Nd, Nl, No (HF Digits) */

/* Code points HF's Unicode 16 tables classify and our libraries' older ones do not (tok_unicode.c). */
typedef struct tok_range {
    uint32_t lo, hi;
} tok_range;
typedef enum { TOK_UNI_LETTER = 0, TOK_UNI_NUMBER, TOK_UNI_NUMERIC, TOK_UNI_WORD } tok_uni_class;
const tok_range *tok_unicode_extra(tok_uni_class which, size_t *n);
bool tok_unicode_extra_has(tok_uni_class which, uint32_t cp);

/* GPT-2 byte <-> code point map (bytes_to_unicode in HF tokenizers' ByteLevel): printable bytes map to themselves, the other 68 to
 * U+0100.. in byte order. tok_cp_to_byte returns -1 for code points outside the map. */
uint32_t tok_byte_to_cp(uint8_t b);
int tok_cp_to_byte(uint32_t cp);

/* ---- growable id vector ---- */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids;
int tok_ids_push(tok_ids *ids, int32_t id);

/* ---- pre-tokeniser (pretokenize.c) ---- */
typedef enum { TOK_RE_GPT2 = 0, TOK_RE_LLAMA3, TOK_RE_QWEN2 } tok_regex_kind;
extern const char *const tok_regex_text[3]; /* the patterns, exactly as tokenizer.json spells them */
/* The PCRE2 spelling of an HF pattern: \p{L}, \p{N} gain the Unicode 16 additions and \s / \S become
 * explicit White_Space classes, so PCRE2 classifies every code point as Oniguruma does. malloc'd. */
char *tok_regex_for_pcre2(const char *hf_pattern);

typedef struct tok_pre {
    bool nfc;          /* NFC normaliser */
    bool split_digits; /* HF Digits(individual_digits=true) before the regex (SmolLM) */
    tok_regex_kind regex;
    pcre2_code *code; /* compiled once per tokenizer; JIT'd when available */
} tok_pre;

int tok_pre_init(tok_pre *p, ds_err *err);
void tok_pre_free(tok_pre *p);
/* Calls fn for every piece of s[0..n) in order; stops at the first non-zero return and returns it. */
typedef int (*tok_piece_fn)(void *ctx, const uint8_t *piece, size_t len);
int tok_pre_split(const tok_pre *p, pcre2_match_data *md, const uint8_t *s, size_t n, tok_piece_fn fn, void *ctx);
/* NFC of s[0..n) into a malloc'd buffer (*out, *out_n); invalid UTF-8 bytes pass through untouched. */
int tok_nfc(const uint8_t *s, size_t n, uint8_t **out, size_t *out_n);

/* ---- BPE (bpe.c) ---- */
typedef struct tok_merge_map {
    uint64_t *keys; /* (left id << 32 | right id), UINT64_MAX = empty */
    int32_t *rank, *result;
    size_t cap, count;
} tok_merge_map;

typedef struct bpe_scratch {
    struct bpe_sym *sym;
    size_t sym_cap;
    struct bpe_item *heap;
    size_t heap_cap;
    char *text; /* byte-level spelling of a piece, for ignore_merges lookups */
    size_t text_cap;
} bpe_scratch;

void tok_merges_free(tok_merge_map *m);
/* Adds merges "a b" (rank = index). strict: an unknown part or result is an error naming the merge
 * (HF refuses such files); otherwise such merges are skipped and counted in *n_skipped. */
int tok_merges_build(tok_merge_map *m, const ds_strmap *vocab, const char *const *merges, int32_t n_merges, bool strict,
                     int32_t *n_skipped, ds_err *err);
void bpe_scratch_free(bpe_scratch *sc);
/* Appends the ids of one pre-token (raw bytes) to out. Returns 0 or DS_ENOMEM / DS_ERANGE. */
int bpe_encode_piece(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_scratch *sc, tok_ids *out);

/* BPE over the UTF-8 characters of one piece (HF BPE with a SentencePiece vocabulary): each character
 * is its vocab token, else its <0xXX> tokens (byte_fallback), else unk (consecutive unks fused with
 * fuse_unk), then the ranked merges. Returns 0 or DS_ENOMEM / DS_ERANGE. */
int bpe_encode_chars(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_scratch *sc, tok_ids *out);

/* ---- added tokens ---- */
typedef struct tok_added {
    int32_t id;
    char *content; /* owned; as matched: the normalised form for normalized tokens */
    size_t len;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added;

typedef struct tok_trie_node {
    int32_t child, sibling, added; /* added: index into ds_tokenizer.added, -1 if no token ends here */
    uint8_t byte;
} tok_trie_node;

typedef struct tok_trie {
    int32_t root[256];
    tok_trie_node *nodes;
    size_t n_nodes, cap;
    bool empty;
} tok_trie;

/* SentencePiece-shaped tokenizer.json (metaspace.c): which steps the file names. */
typedef enum { TOK_PREPEND_NEVER = 0, TOK_PREPEND_FIRST, TOK_PREPEND_ALWAYS } tok_prepend;
typedef struct tok_meta {
    bool on;             /* this pipeline instead of the byte-level one */
    bool norm_prepend;   /* normalizer Prepend("▁"): before every non-empty split */
    bool norm_replace;   /* normalizer Replace(" ", "▁") */
    bool pre_metaspace;  /* pre_tokenizer Metaspace("▁") ... */
    uint8_t prepend;     /* ... its prepend_scheme (tok_prepend) */
    bool split;          /* ... its split: a piece starts at every "▁" */
    bool unigram;        /* model Unigram; else BPE over characters */
    bool byte_fallback;  /* <0xXX> tokens for characters the vocab lacks */
    bool fuse_unk;       /* BPE: consecutive unknown characters make one unk */
    bool dec_bytes;      /* decoder ByteFallback: <0xXX> tokens decode to their byte */
    int dec_strip;       /* decoder Strip(" ", n, 0): up to n leading spaces off the decoded text */
    bool dec_meta_first; /* decoder Metaspace: the first token's "▁" are dropped */
} tok_meta;

/* Per-token flags. */
enum { TOKF_SPECIAL = 1, TOKF_ADDED = 2, TOKF_EOG = 4, TOKF_MODEL = 8 /* in the BPE model vocab */ };

struct ds_tokenizer {
    int32_t n_vocab;
    char *text; /* vocab spellings ("Ġthe"), NUL-separated; text_off[id] */
    uint32_t *text_off, *text_len;
    char *bytes; /* decoded bytes of each token (what decode emits) */
    uint32_t *bytes_off, *bytes_len;
    uint8_t *type;     /* DS_TOKEN_* */
    uint8_t *flags;    /* TOKF_* */
    ds_strmap *vocab;  /* model vocab spelling -> id (BPE, ignore_merges) */
    ds_strmap *lookup; /* added-token contents and vocab spellings -> id (ds_tokenizer_find) */
    tok_merge_map merges;
    int32_t byte_tok[256]; /* id of each byte's one-character token, -1 when absent */
    int32_t unk_id;        /* emitted for a byte with no token; -1: the byte is dropped (as HF) */
    bool ignore_merges;
    bool spm, space_prefix; /* SentencePiece BPE (spm.c); scores[id] */
    float *scores;
    tok_meta meta;       /* SentencePiece-shaped tokenizer.json */
    double *uscore;      /* [n_vocab] Unigram piece scores (meta.unigram) */
    double umin;         /* the lowest of them */
    tok_trie upieces;    /* Unigram: every vocab piece, `added` = its id */
    tok_pre pre;
    tok_added *added;
    size_t n_added;
    tok_trie trie_raw, trie_norm;
    int32_t bos, eos, eot, pad;
    bool add_bos, add_eos;
    char *chat_template;
};

/* Everything a loader knows, in the loader-neutral form tok_build consumes. */
typedef struct tok_spec {
    int32_t n_vocab;
    const char *const *tokens;  /* [n_vocab] model vocab spellings; NULL = no model token with that id */
    const int32_t *token_types; /* [n_vocab] or NULL */
    int32_t n_merges;
    const char *const *merges;
    bool strict_merges;
    const tok_added *added; /* contents as written (tok_build normalises); NULL: derive from types */
    size_t n_added;
    tok_pre pre; /* nfc / split_digits / regex set, code NULL */
    bool ignore_merges;
    int32_t unk_id, bos, eos, eot, pad;
    bool add_bos, add_eos;
    bool spm, space_prefix;    /* SentencePiece BPE: tokens spelled with "▁", scores, <0xXX> bytes */
    const float *scores;       /* [n_vocab] when spm */
    tok_meta meta;             /* SentencePiece-shaped tokenizer.json */
    const double *uscores;     /* [n_vocab] when meta.unigram */
    const char *chat_template; /* copied, may be NULL */
    const char *source;        /* names the input in error messages */
} tok_spec;

ds_tokenizer *tok_build(const tok_spec *s, ds_err *err);

/* ds_tokenizer_load_json on text in memory; `name` stands for the file in messages (fuzzing, tests). */
ds_tokenizer *tok_load_json_text(const char *text, size_t len, const char *name, const char *config_path,
                                 ds_err *err);

/* ---- SentencePiece BPE (spm.c) ---- */
/* Appends the ids of one text fragment (no special tokens in it); prefix: start it with "▁". */
int tok_spm_encode(const ds_tokenizer *t, const uint8_t *text, size_t n, bool prefix, tok_ids *out);

/* ---- SentencePiece-shaped tokenizer.json (metaspace.c, unigram.c) ---- */
/* Metaspace pre-tokenisation and the model on one normalised split; first: the split starts the text
 * (prepend_scheme "first"). */
int tok_meta_encode(const ds_tokenizer *t, const uint8_t *s, size_t n, bool first, bpe_scratch *sc, tok_ids *out);
/* The normaliser (Prepend / Replace) of one split into a malloc'd copy. */
int tok_meta_normalize(const ds_tokenizer *t, const uint8_t *s, size_t n, uint8_t **out, size_t *out_n);
/* Unigram (HF models/unigram: Viterbi over the piece scores, unknown characters scored min - 10,
 * fused, then byte fallback) on one piece. */
int tok_unigram_encode(const ds_tokenizer *t, const uint8_t *s, size_t n, tok_ids *out);
/* Builds t->upieces and t->umin from the spec (meta.unigram). */
int tok_unigram_build(ds_tokenizer *t, const tok_spec *s);

/* ---- trie (tok_encode.c) ---- */
int tok_trie_build(tok_trie *tr, const tok_added *added, size_t n_added, bool normalized);
/* An empty trie; tok_trie_insert adds s[0..n) (n >= 1) ending in `value` (the first value of a
 * repeated key stays). */
void tok_trie_init(tok_trie *tr);
int tok_trie_insert(tok_trie *tr, const uint8_t *s, size_t n, int32_t value);
void tok_trie_free(tok_trie *tr);

#endif
