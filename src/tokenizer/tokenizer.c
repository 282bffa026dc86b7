/* Tokenizer construction (from a loader-neutral tok_spec), lookups, decoding and streaming
 * detokenisation. Encoding lives in tok_encode.c, BPE in bpe.c, pre-tokenisation in pretokenize.c. */
#include "tokenizer/tok_internal.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_MAX_VOCAB (1 << 24)

/* End-of-generation spellings llama.cpp also treats as EOG; in preference order for end-of-turn. */
static const char *const k_eog_names[] = {
    "<|eot_id|>",    "<|im_end|>",      "<|end|>", "<end_of_turn>", "<|eom_id|>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>",   "_<EOT>",        "<｜end▁of▁sentence｜>",
};
#define N_EOG_NAMES (sizeof k_eog_names / sizeof k_eog_names[0])
#define N_EOT_NAMES 4 /* the first four name an end of turn */

void ds_tokenizer_free(ds_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->text_len);
    free(t->bytes);
    free(t->bytes_off);
    free(t->bytes_len);
    free(t->type);
    free(t->flags);
    free(t->scores);
    free(t->uscore);
    tok_trie_free(&t->upieces);
    ds_strmap_free(t->vocab);
    ds_strmap_free(t->lookup);
    tok_merges_free(&t->merges);
    tok_pre_free(&t->pre);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    tok_trie_free(&t->trie_raw);
    tok_trie_free(&t->trie_norm);
    free(t->chat_template);
    free(t);
}

/* ---- building ---- */

/* Fills t->added (contents owned, normalised where matched normalised); srcs[i] gets the content as
 * written, which is the token's spelling. */
static int copy_added(ds_tokenizer *t, const tok_spec *s, const char ***srcs, ds_err *err) {
    size_t n = s->added ? s->n_added : 0;
    for (int32_t i = 0; !s->added && s->token_types && i < s->n_vocab; i++)
        n += s->token_types[i] == DS_TOKEN_CONTROL || s->token_types[i] == DS_TOKEN_USER_DEFINED;
    t->added = calloc(n ? n : 1, sizeof *t->added);
    *srcs = calloc(n ? n : 1, sizeof **srcs);
    if (!t->added || !*srcs) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    for (int32_t i = 0; !s->added && s->token_types && i < s->n_vocab; i++) {
        int32_t ty = s->token_types[i];
        if (ty != DS_TOKEN_CONTROL && ty != DS_TOKEN_USER_DEFINED) continue;
        /* From GGUF, as transformers does: control = special, user-defined = plain added; both
         * matched on the raw text. */
        (*srcs)[t->n_added] = s->tokens[i];
        t->added[t->n_added++] = (tok_added){.id = i, .special = ty == DS_TOKEN_CONTROL};
    }
    for (size_t i = 0; s->added && i < n; i++) {
        (*srcs)[t->n_added] = s->added[i].content;
        t->added[t->n_added] = s->added[i];
        t->added[t->n_added++].content = NULL;
    }
    for (size_t i = 0; i < t->n_added; i++) {
        tok_added *a = &t->added[i];
        const char *src = (*srcs)[i];
        if (a->id < 0 || a->id >= s->n_vocab || !src)
            return ds_err_set(err, DS_EFORMAT, "%s: added token %zu has a bad id or no content", s->source, i);
        a->len = strlen(src);
        int rc = DS_OK;
        /* HF matches a normalized token by its content run through the normaliser — the Prepend one
         * too, so under the legacy Llama normaliser "<x>" is matched as "▁<x>". */
        const bool meta_norm = s->meta.on && (s->meta.norm_prepend || s->meta.norm_replace);
        if (a->normalized && (s->pre.nfc || meta_norm)) {
            uint8_t *nf;
            rc = meta_norm ? tok_meta_normalize(t, (const uint8_t *)src, a->len, &nf, &a->len)
                           : tok_nfc((const uint8_t *)src, a->len, &nf, &a->len);
            if (!rc && !(a->content = realloc(nf, a->len + 1))) {
                free(nf);
                rc = DS_ENOMEM;
            }
            if (!rc) a->content[a->len] = 0;
        } else if (!(a->content = strdup(src))) {
            rc = DS_ENOMEM;
        }
        if (rc) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    }
    return DS_OK;
}

/* The spelling of each id: an added token's content wins over the model vocab (HF id_to_token). */
static const char *spelling(const tok_spec *s, const char **added_text, int32_t id) {
    return added_text[id] ? added_text[id] : s->tokens[id] ? s->tokens[id] : "";
}

/* HF ByteLevel decoder: a token whose every character is in the byte map decodes to those bytes;
 * any other token (e.g. "<|im_start|>" with an unmapped char, or "hello world") to its own UTF-8. */
static size_t decode_spelling(const char *txt, size_t n, uint8_t *out) {
    size_t i = 0, o = 0;
    while (i < n) {
        uint32_t cp;
        size_t w = tok_utf8_decode((const uint8_t *)txt + i, n - i, &cp);
        int b = w ? tok_cp_to_byte(cp) : -1;
        if (b < 0) {
            memcpy(out, txt, n);
            return n;
        }
        out[o++] = (uint8_t)b;
        i += w;
    }
    return o;
}

/* SentencePiece: "<0xXX>" byte tokens decode to their byte, "▁" to a space, anything else to itself. */
static size_t decode_spm(const char *txt, size_t n, bool byte_type, uint8_t *out) {
    unsigned v;
    if (byte_type && n == 6 && !memcmp(txt, "<0x", 3) && txt[5] == '>' && sscanf(txt + 3, "%2x", &v) == 1) {
        out[0] = (uint8_t)v;
        return 1;
    }
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (i + 2 < n && (uint8_t)txt[i] == 0xE2 && (uint8_t)txt[i + 1] == 0x96 && (uint8_t)txt[i + 2] == 0x81) {
            out[o++] = ' ';
            i += 2;
        } else {
            out[o++] = (uint8_t)txt[i];
        }
    }
    return o;
}

/* dec_text[id] (may be NULL): what the token decodes from when not its spelling — a normalized added
 * token under a SentencePiece normaliser decodes from its normalised content ("▁<x>" → " <x>"), as
 * HF's id_to_token gives that. */
static int build_strings(ds_tokenizer *t, const tok_spec *s, const char **added_text, const char **dec_text,
                         ds_err *err) {
    size_t total = 0, btotal = 0;
    for (int32_t i = 0; i < s->n_vocab; i++) {
        total += strlen(spelling(s, added_text, i)) + 1;
        btotal += strlen(dec_text[i] ? dec_text[i] : spelling(s, added_text, i)) + 1;
    }
    if (total > UINT32_MAX || btotal > UINT32_MAX) return ds_err_set(err, DS_ERANGE, "%s: vocab strings too large", s->source);
    t->text = malloc(total);
    t->bytes = malloc(btotal);
    t->text_off = malloc((size_t)s->n_vocab * sizeof(uint32_t));
    t->text_len = malloc((size_t)s->n_vocab * sizeof(uint32_t));
    t->bytes_off = malloc((size_t)s->n_vocab * sizeof(uint32_t));
    t->bytes_len = malloc((size_t)s->n_vocab * sizeof(uint32_t));
    if (!t->text || !t->bytes || !t->text_off || !t->text_len || !t->bytes_off || !t->bytes_len)
        return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    size_t to = 0, bo = 0;
    for (int32_t i = 0; i < s->n_vocab; i++) {
        const char *sp = spelling(s, added_text, i);
        size_t n = strlen(sp);
        memcpy(t->text + to, sp, n + 1);
        t->text_off[i] = (uint32_t)to;
        t->text_len[i] = (uint32_t)n;
        to += n + 1;
        t->bytes_off[i] = (uint32_t)bo;
        /* tokenizer.json: <0xXX> decodes to its byte only under the ByteFallback decoder */
        const bool byte_ok = s->meta.on ? s->meta.dec_bytes : !s->token_types || s->token_types[i] == DS_TOKEN_BYTE;
        const char *ds = dec_text[i] ? dec_text[i] : sp;
        const size_t dn = strlen(ds);
        t->bytes_len[i] = (uint32_t)(s->spm || s->meta.on ? decode_spm(ds, dn, byte_ok, (uint8_t *)t->bytes + bo)
                                                          : decode_spelling(ds, dn, (uint8_t *)t->bytes + bo));
        bo += t->bytes_len[i];
    }
    return DS_OK;
}

static int build_maps(ds_tokenizer *t, const tok_spec *s, ds_err *err) {
    t->vocab = ds_strmap_create((size_t)s->n_vocab);
    t->lookup = ds_strmap_create((size_t)s->n_vocab + t->n_added);
    if (!t->vocab || !t->lookup) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    for (int32_t i = 0; i < s->n_vocab; i++) {
        if (!s->tokens[i]) continue;
        size_t n = strlen(s->tokens[i]);
        if (ds_strmap_put(t->vocab, s->tokens[i], n, i) || ds_strmap_put(t->lookup, s->tokens[i], n, i))
            return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
        t->flags[i] |= TOKF_MODEL;
    }
    for (size_t i = 0; i < t->n_added; i++) {
        const tok_added *a = &t->added[i];
        const char *sp = t->text + t->text_off[a->id];
        if (ds_strmap_put(t->lookup, sp, t->text_len[a->id], a->id))
            return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
        t->flags[a->id] |= TOKF_ADDED | (a->special ? TOKF_SPECIAL : 0);
    }
    for (int b = 0; b < 256; b++) {
        char u[8];
        size_t n = s->spm || s->meta.on ? (size_t)snprintf(u, sizeof u, "<0x%02X>", b)
                          : tok_utf8_encode(tok_byte_to_cp((uint8_t)b), (uint8_t *)u);
        if (!ds_strmap_get(t->vocab, u, n, &t->byte_tok[b])) t->byte_tok[b] = -1;
    }
    return DS_OK;
}

static void set_types(ds_tokenizer *t, const tok_spec *s) {
    for (int32_t i = 0; i < s->n_vocab; i++) {
        int32_t ty = s->token_types ? s->token_types[i] : 0;
        if (ty < DS_TOKEN_NORMAL || ty > DS_TOKEN_BYTE) {
            ty = (t->flags[i] & TOKF_SPECIAL) ? DS_TOKEN_CONTROL
                 : (t->flags[i] & TOKF_ADDED) ? DS_TOKEN_USER_DEFINED
                 : (t->flags[i] & TOKF_MODEL) ? DS_TOKEN_NORMAL
                                              : DS_TOKEN_UNUSED;
        }
        t->type[i] = (uint8_t)ty;
    }
}

/* eos / eot / EOG flags. eot defaults to the first end-of-turn spelling present as a special token. */
static void set_eog(ds_tokenizer *t) {
    for (size_t k = 0; k < N_EOG_NAMES; k++) {
        int32_t id = ds_tokenizer_find(t, k_eog_names[k]);
        if (id < 0 || !(t->flags[id] & TOKF_SPECIAL)) continue;
        t->flags[id] |= TOKF_EOG;
        if (t->eot < 0 && k < N_EOT_NAMES) t->eot = id;
    }
    if (t->eos >= 0) t->flags[t->eos] |= TOKF_EOG;
    if (t->eot >= 0) t->flags[t->eot] |= TOKF_EOG;
}

static int check_id(const tok_spec *s, int32_t *id, const char *what, ds_err *err) {
    if (*id < -1 || *id >= s->n_vocab)
        return ds_err_set(err, DS_EFORMAT, "%s: %s id %d out of range [0, %d)", s->source, what, (int)*id,
                          (int)s->n_vocab);
    return DS_OK;
}

static int build_specials(ds_tokenizer *t, const tok_spec *s, ds_err *err) {
    t->bos = s->bos;
    t->eos = s->eos;
    t->eot = s->eot;
    t->pad = s->pad;
    t->unk_id = s->unk_id;
    int rc = check_id(s, &t->bos, "bos", err);
    if (!rc) rc = check_id(s, &t->eos, "eos", err);
    if (!rc) rc = check_id(s, &t->eot, "eot", err);
    if (!rc) rc = check_id(s, &t->pad, "pad", err);
    if (!rc) rc = check_id(s, &t->unk_id, "unk", err);
    if (rc) return rc;
    t->add_bos = s->add_bos && t->bos >= 0;
    t->add_eos = s->add_eos && t->eos >= 0;
    set_eog(t);
    if (s->chat_template && !(t->chat_template = strdup(s->chat_template)))
        return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    return DS_OK;
}

static int build_tables(ds_tokenizer *t, const tok_spec *s, ds_err *err) {
    const char **srcs = NULL;
    int rc = copy_added(t, s, &srcs, err);
    const char **added_text = rc ? NULL : calloc((size_t)s->n_vocab, sizeof *added_text);
    const char **dec_text = rc ? NULL : calloc((size_t)s->n_vocab, sizeof *dec_text);
    t->type = calloc((size_t)s->n_vocab, 1);
    t->flags = calloc((size_t)s->n_vocab, 1);
    if (!rc && (!added_text || !dec_text || !t->type || !t->flags))
        rc = ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    /* The spelling of an added token is its content as written, not its normalised match form. */
    const bool meta_norm = s->meta.on && (s->meta.norm_prepend || s->meta.norm_replace);
    for (size_t i = 0; !rc && i < t->n_added; i++) {
        if (added_text[t->added[i].id]) continue;
        added_text[t->added[i].id] = srcs[i];
        if (meta_norm && t->added[i].normalized) dec_text[t->added[i].id] = t->added[i].content;
    }
    if (!rc) rc = build_strings(t, s, added_text, dec_text, err);
    if (!rc) rc = build_maps(t, s, err);
    if (!rc) set_types(t, s);
    free(srcs);
    free(added_text);
    free(dec_text);
    return rc;
}

static int build(ds_tokenizer *t, const tok_spec *s, ds_err *err) {
    int rc = build_tables(t, s, err);
    if (rc) return rc;
    int32_t skipped = 0;
    ds_err merr = {{0}};
    rc = tok_merges_build(&t->merges, t->vocab, s->merges, s->n_merges, s->strict_merges, &skipped, &merr);
    if (rc) return ds_err_set(err, rc, "%s: %s", s->source, merr.msg);
    if (skipped) DS_LOGW("%s: skipped %d merges naming unknown tokens", s->source, (int)skipped);
    if (tok_trie_build(&t->trie_raw, t->added, t->n_added, false) ||
        tok_trie_build(&t->trie_norm, t->added, t->n_added, true))
        return ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
    t->pre = s->pre;
    t->pre.code = NULL;
    if ((rc = tok_pre_init(&t->pre, err))) return rc;
    return build_specials(t, s, err);
}

ds_tokenizer *tok_build(const tok_spec *s, ds_err *err) {
    if (s->n_vocab <= 0 || s->n_vocab > TOK_MAX_VOCAB || !s->tokens || s->n_merges < 0 || (s->n_merges && !s->merges)) {
        ds_err_set(err, DS_EINVAL, "%s: bad vocab (n_vocab %d, n_merges %d)", s->source, (int)s->n_vocab,
                   (int)s->n_merges);
        return NULL;
    }
    ds_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        ds_err_set(err, DS_ENOMEM, "%s: out of memory", s->source);
        return NULL;
    }
    t->n_vocab = s->n_vocab;
    t->ignore_merges = s->ignore_merges;
    t->spm = s->spm;
    t->space_prefix = s->space_prefix;
    t->meta = s->meta;
    if (s->meta.unigram && (!s->uscores || tok_unigram_build(t, s))) {
        ds_err_set(err, s->uscores ? DS_ENOMEM : DS_EINVAL, "%s: %s", s->source,
                   s->uscores ? "out of memory" : "a Unigram vocabulary needs scores");
        ds_tokenizer_free(t);
        return NULL;
    }
    if (s->spm) {
        if (!s->scores || !(t->scores = malloc(sizeof *t->scores * (size_t)s->n_vocab))) {
            ds_err_set(err, s->scores ? DS_ENOMEM : DS_EINVAL, "%s: %s", s->source,
                       s->scores ? "out of memory" : "a SentencePiece vocabulary needs scores");
            ds_tokenizer_free(t);
            return NULL;
        }
        memcpy(t->scores, s->scores, sizeof *t->scores * (size_t)s->n_vocab);
    }
    if (build(t, s, err)) {
        ds_tokenizer_free(t);
        return NULL;
    }
    return t;
}

/* ---- the public desc path (GGUF) ---- */

int ds_tokenizer_pre_from_name(const char *name, ds_pre_type *out) {
    static const struct {
        const char *name;
        ds_pre_type pre;
    } k[] = {
        {"default", DS_PRE_GPT2},     {"gpt-2", DS_PRE_GPT2},       {"gpt2", DS_PRE_GPT2},
        {"smollm", DS_PRE_SMOLLM},    {"starcoder", DS_PRE_SMOLLM}, {"refact", DS_PRE_SMOLLM},
        {"llama-bpe", DS_PRE_LLAMA3}, {"llama3", DS_PRE_LLAMA3},    {"llama-v3", DS_PRE_LLAMA3},
        {"smaug-bpe", DS_PRE_LLAMA3}, {"qwen2", DS_PRE_QWEN2},      {"deepseek-r1-qwen", DS_PRE_QWEN2},
    };
    if (!name || !*name) name = "default";
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        if (!strcmp(name, k[i].name)) {
            *out = k[i].pre;
            return DS_OK;
        }
    }
    return DS_EUNSUPPORTED;
}

ds_tokenizer *ds_tokenizer_create(const ds_tokenizer_desc *d, ds_err *err) {
    if (!d || !d->tokens) {
        ds_err_set(err, DS_EINVAL, "tokenizer: no vocab");
        return NULL;
    }
    for (int32_t i = 0; i < d->n_vocab; i++) {
        if (!d->tokens[i]) {
            ds_err_set(err, DS_EINVAL, "tokenizer: token %d is NULL", (int)i);
            return NULL;
        }
    }
    if ((unsigned)d->pre > DS_PRE_QWEN2) {
        ds_err_set(err, DS_EINVAL, "tokenizer: unknown pre-tokenizer %d", (int)d->pre);
        return NULL;
    }
    tok_spec s = {
        .n_vocab = d->n_vocab,
        .tokens = d->tokens,
        .token_types = d->token_types,
        .n_merges = d->n_merges,
        .merges = d->merges,
        .ignore_merges = d->ignore_merges,
        .unk_id = d->spm ? d->unk_id : -1,
        .bos = d->bos_id,
        .eos = d->eos_id,
        .eot = d->eot_id,
        .pad = d->pad_id,
        .add_bos = d->add_bos,
        .add_eos = d->add_eos,
        .spm = d->spm,
        .space_prefix = d->add_space_prefix,
        .scores = d->scores,
        .source = "tokenizer",
        .pre = {.nfc = d->pre == DS_PRE_QWEN2,
                .split_digits = d->pre == DS_PRE_SMOLLM,
                .regex = d->pre == DS_PRE_LLAMA3  ? TOK_RE_LLAMA3
                         : d->pre == DS_PRE_QWEN2 ? TOK_RE_QWEN2
                                                  : TOK_RE_GPT2},
    };
    return tok_build(&s, err);
}

/* ---- lookups ---- */

int32_t ds_tokenizer_n_vocab(const ds_tokenizer *t) { return t->n_vocab; }
int32_t ds_tokenizer_bos(const ds_tokenizer *t) { return t->bos; }
int32_t ds_tokenizer_eos(const ds_tokenizer *t) { return t->eos; }
int32_t ds_tokenizer_eot(const ds_tokenizer *t) { return t->eot; }
const char *ds_tokenizer_chat_template(const ds_tokenizer *t) { return t->chat_template; }

bool ds_tokenizer_is_eog(const ds_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && (t->flags[id] & TOKF_EOG);
}

bool ds_tokenizer_is_special(const ds_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && (t->flags[id] & TOKF_SPECIAL);
}

const char *ds_tokenizer_token_bytes(const ds_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = t->bytes_len[id];
    return t->bytes + t->bytes_off[id];
}

int32_t ds_tokenizer_find(const ds_tokenizer *t, const char *token) {
    int32_t id;
    if (!token || !ds_strmap_get(t->lookup, token, strlen(token), &id)) return -1;
    return id;
}

/* ---- decoding ---- */

int ds_tokenizer_decode(const ds_tokenizer *t, const int32_t *ids, size_t n_ids, bool skip_special, char **out,
                        size_t *out_len) {
    if (!t || !out || (!ids && n_ids)) return DS_EINVAL;
    *out = NULL;
    size_t raw_n = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab) return DS_EINVAL;
        if (!(skip_special && (t->flags[ids[i]] & TOKF_SPECIAL))) raw_n += t->bytes_len[ids[i]];
    }
    uint8_t *raw = malloc(raw_n ? raw_n : 1);
    if (!raw) return DS_ENOMEM;
    size_t o = 0;
    bool first = true;
    for (size_t i = 0; i < n_ids; i++) {
        if (skip_special && (t->flags[ids[i]] & TOKF_SPECIAL)) continue;
        const char *b = t->bytes + t->bytes_off[ids[i]];
        /* HF Metaspace decoder: the first token's "▁" are dropped (model pieces hold no other space) */
        for (uint32_t k = 0; first && t->meta.dec_meta_first && !(t->flags[ids[i]] & TOKF_ADDED) &&
                             k < t->bytes_len[ids[i]]; k++)
            if (b[k] != ' ') raw[o++] = (uint8_t)b[k];
        if (!(first && t->meta.dec_meta_first && !(t->flags[ids[i]] & TOKF_ADDED))) {
            memcpy(raw + o, b, t->bytes_len[ids[i]]);
            o += t->bytes_len[ids[i]];
        }
        first = false;
    }
    raw_n = o;
    /* HF Strip(" ", n, 0) after Fuse: leading spaces off the whole text. */
    size_t lead = 0;
    while ((int)lead < t->meta.dec_strip && lead < raw_n && raw[lead] == ' ') lead++;
    /* HF decodes with String::from_utf8_lossy; do the same so decode always yields valid UTF-8. */
    raw_n -= lead;
    memmove(raw, raw + lead, raw_n);
    size_t consumed, need = tok_utf8_lossy(raw, raw_n, true, NULL, 0, &consumed);
    char *s = malloc(need + 1);
    if (!s) {
        free(raw);
        return DS_ENOMEM;
    }
    tok_utf8_lossy(raw, raw_n, true, (uint8_t *)s, need, &consumed);
    s[need] = 0;
    free(raw);
    *out = s;
    if (out_len) *out_len = need;
    return DS_OK;
}

int ds_detok_push(const ds_tokenizer *t, ds_detok *st, int32_t id, bool skip_special, char *out, size_t cap) {
    if (!t || !st || (!out && cap) || st->n_pending < 0 || st->n_pending > 3) return DS_EINVAL;
    if (id < 0 || id >= t->n_vocab) return DS_EINVAL;
    if (skip_special && (t->flags[id] & TOKF_SPECIAL)) return 0;
    size_t bn = t->bytes_len[id], np = (size_t)st->n_pending, total = np + bn;
    uint8_t stack[256], *buf = total <= sizeof stack ? stack : malloc(total);
    if (!buf) return DS_ENOMEM;
    memcpy(buf, st->pending, np);
    memcpy(buf + np, t->bytes + t->bytes_off[id], bn);
    size_t consumed, need = tok_utf8_lossy(buf, total, false, NULL, 0, &consumed);
    int rc = need > cap ? DS_ERANGE : need > INT_MAX ? DS_ERANGE : (int)need;
    if (rc >= 0) {
        /* Only now touch the state, so a DS_ERANGE caller can retry with a larger buffer. */
        tok_utf8_lossy(buf, total, false, (uint8_t *)out, cap, &consumed);
        st->n_pending = (int)(total - consumed);
        memcpy(st->pending, buf + consumed, total - consumed);
    }
    if (buf != stack) free(buf);
    return rc;
}

int ds_detok_flush(ds_detok *st, char *out, size_t cap) {
    if (!st || st->n_pending < 0 || st->n_pending > 3) return DS_EINVAL;
    if (!st->n_pending) return 0;
    /* Pending bytes are always one valid-but-unfinished sequence: one U+FFFD, as from_utf8_lossy. */
    if (!out || cap < 3) return DS_ERANGE;
    memcpy(out, "\xEF\xBF\xBD", 3);
    st->n_pending = 0;
    return 3;
}
