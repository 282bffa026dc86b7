/* Hugging Face tokenizer.json (+ tokenizer_config.json) → tok_spec → ds_tokenizer.
 *
 * Input is untrusted: every field is type- and range-checked, and anything outside the byte-level BPE
 * shapes deltaserve reproduces exactly is refused by name rather than silently tokenised differently. */
#include "tokenizer/tok_internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_JSON_MAX_BYTES ((size_t)512 << 20)
#define TOK_MAX_ID ((1 << 24) - 1)

typedef struct jl {
    const char *path, *cfg_path;
    ds_err *err;
    tok_spec s;
    const char **tokens;        /* [n_vocab], borrowed from the cJSON tree */
    char **merges;              /* [n_merges] owned "a b" */
    tok_added *added;           /* contents borrowed from the cJSON tree */
    int32_t tmpl_bos, tmpl_eos; /* ids the post-processor adds, -1 none */
    bool has_post;
    bool from_file;        /* look for chat_template.jinja beside path */
    /* what the pipeline steps say, checked together in check_shape */
    bool pre_null, pre_split_space, pre_bytelevel, dec_bytelevel, dec_replace, model_bpe_bf;
    double *uscores;       /* [n_vocab] Unigram scores, owned */
    char *chat_template;
} jl;

static int fail(jl *j, int status, const char *fmt, const char *a, const char *b) {
    char msg[400];
    snprintf(msg, sizeof msg, fmt, a ? a : "", b ? b : "");
    return ds_err_set(j->err, status, "%s: %s", j->path, msg);
}

static const cJSON *field(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

static const char *type_of(const cJSON *o) {
    const cJSON *t = field(o, "type");
    return cJSON_IsString(t) ? t->valuestring : NULL;
}

/* A bool field: absent or null → def; anything else not a bool → -1. */
static int get_bool(const cJSON *o, const char *k, bool def) {
    const cJSON *v = field(o, k);
    if (!v || cJSON_IsNull(v)) return def;
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : -1;
}

static bool get_id(const cJSON *v, int32_t *out) {
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= TOK_MAX_ID) || d != floor(d)) return false;
    *out = (int32_t)d;
    return true;
}

/* ---- model ---- */

/* Tables are sized by the largest id, so ids must be about as many as the entries that use them:
 * a 1 KiB file naming id 16,000,000 would otherwise cost hundreds of MB and seconds to load.
 * Real files are dense (ids 0..n-1, added tokens right after); this leaves room for holes. */
static int check_id_space(jl *j, int64_t n_ids, int64_t n_entries) {
    if (n_ids <= 2 * n_entries + 1024) return DS_OK;
    char a[32], b[32];
    snprintf(a, sizeof a, "%lld", (long long)n_ids - 1);
    snprintf(b, sizeof b, "%lld", (long long)n_entries);
    return fail(j, DS_EFORMAT, "token ids reach %s for %s tokens: the ids are not dense", a, b);
}

static int parse_vocab(jl *j, const cJSON *vocab, int32_t max_added) {
    if (!cJSON_IsObject(vocab)) return fail(j, DS_EFORMAT, "model.vocab is missing or not an object", 0, 0);
    int32_t max_id = max_added;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int32_t id;
        if (!get_id(e, &id))
            return fail(j, DS_EFORMAT, "model.vocab[\"%.80s\"] is not an id in [0, 2^24)", e->string, 0);
        if (id > max_id) max_id = id;
    }
    if (max_id < 0) return fail(j, DS_EFORMAT, "model.vocab is empty", 0, 0);
    int rc = check_id_space(j, (int64_t)max_id + 1, (int64_t)cJSON_GetArraySize(vocab) + (int64_t)j->s.n_added);
    if (rc) return rc;
    j->s.n_vocab = max_id + 1;
    j->tokens = calloc((size_t)j->s.n_vocab, sizeof *j->tokens);
    if (!j->tokens) return fail(j, DS_ENOMEM, "out of memory", 0, 0);
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int32_t id = 0;
        get_id(e, &id);
        if (j->tokens[id])
            return fail(j, DS_EFORMAT, "model.vocab: two tokens share the id of \"%.80s\"", e->string, 0);
        j->tokens[id] = e->string;
    }
    j->s.tokens = j->tokens;
    return DS_OK;
}

/* One merge as "a b": either the string itself or a ["a", "b"] pair joined. */
static char *merge_text(const cJSON *m) {
    if (cJSON_IsString(m)) return strdup(m->valuestring);
    if (!cJSON_IsArray(m) || cJSON_GetArraySize(m) != 2) return NULL;
    const cJSON *a = m->child, *b = a->next;
    if (!cJSON_IsString(a) || !cJSON_IsString(b)) return NULL;
    size_t la = strlen(a->valuestring), lb = strlen(b->valuestring);
    char *s = malloc(la + lb + 2);
    if (!s) return NULL;
    memcpy(s, a->valuestring, la);
    s[la] = ' ';
    memcpy(s + la + 1, b->valuestring, lb + 1);
    return s;
}

static int parse_merges(jl *j, const cJSON *merges) {
    if (!cJSON_IsArray(merges)) return fail(j, DS_EFORMAT, "model.merges is missing or not an array", 0, 0);
    int n = cJSON_GetArraySize(merges);
    j->merges = calloc((size_t)n + 1, sizeof *j->merges);
    if (!j->merges) return fail(j, DS_ENOMEM, "out of memory", 0, 0);
    int i = 0;
    for (const cJSON *m = merges->child; m; m = m->next, i++) {
        if (!(j->merges[i] = merge_text(m))) {
            char at[32];
            snprintf(at, sizeof at, "%d", i);
            return fail(j, DS_EFORMAT, "model.merges[%s] is not \"a b\" or [\"a\", \"b\"]", at, 0);
        }
        j->s.n_merges = i + 1;
    }
    j->s.merges = (const char *const *)j->merges;
    return DS_OK;
}

/* byte_fallback only changes anything when some byte has no token of its own; refuse it only then. */
static bool every_byte_in_vocab(const cJSON *vocab) {
    /* A vocab that is not an object is refused later, by name (parse_vocab); its entries have no
     * key to read here (an array vocab with byte_fallback crashed fuzz_tokenizer). */
    if (!cJSON_IsObject(vocab)) return true;
    bool seen[256] = {false};
    int n = 0;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        uint32_t cp;
        size_t len = strlen(e->string), w = tok_utf8_decode((const uint8_t *)e->string, len, &cp);
        int b = w && w == len ? tok_cp_to_byte(cp) : -1;
        if (b >= 0 && !seen[b]) {
            seen[b] = true;
            n++;
        }
    }
    return n == 256;
}

/* Unigram: vocab [[piece, score], ...] (id = index), unk_id, byte_fallback; always fuses unks. */
static int parse_unigram(jl *j, const cJSON *model, int32_t max_added) {
    const cJSON *vocab = field(model, "vocab");
    const int n = cJSON_IsArray(vocab) ? cJSON_GetArraySize(vocab) : 0;
    if (n <= 0 || n > TOK_MAX_ID) return fail(j, DS_EFORMAT, "model.vocab is not a non-empty array", 0, 0);
    j->s.n_vocab = n > max_added ? n : max_added + 1;
    int rc = check_id_space(j, j->s.n_vocab, (int64_t)n + (int64_t)j->s.n_added);
    if (rc) return rc;
    j->tokens = calloc((size_t)j->s.n_vocab, sizeof *j->tokens);
    j->uscores = calloc((size_t)j->s.n_vocab, sizeof *j->uscores);
    if (!j->tokens || !j->uscores) return fail(j, DS_ENOMEM, "out of memory", 0, 0);
    int i = 0;
    for (const cJSON *e = vocab->child; e; e = e->next, i++) {
        const cJSON *p = cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 ? e->child : NULL;
        if (!p || !cJSON_IsString(p) || !cJSON_IsNumber(p->next) || !isfinite(p->next->valuedouble)) {
            char at[32];
            snprintf(at, sizeof at, "%d", i);
            return fail(j, DS_EFORMAT, "model.vocab[%s] is not [\"piece\", score]", at, 0);
        }
        j->tokens[i] = p->valuestring;
        j->uscores[i] = p->next->valuedouble;
    }
    j->s.tokens = j->tokens;
    j->s.uscores = j->uscores;
    j->s.meta.unigram = true;
    j->s.meta.fuse_unk = true;
    int bf = get_bool(model, "byte_fallback", false);
    if (bf < 0) return fail(j, DS_EFORMAT, "model.byte_fallback is not a bool", 0, 0);
    j->s.meta.byte_fallback = bf;
    const cJSON *unk = field(model, "unk_id");
    j->s.unk_id = -1;
    if (unk && !cJSON_IsNull(unk) && (!get_id(unk, &j->s.unk_id) || j->s.unk_id >= n))
        return fail(j, DS_EFORMAT, "model.unk_id is not an id in the vocab", 0, 0);
    return DS_OK;
}

static int check_model_options(jl *j, const cJSON *model) {
    const char *ty = type_of(model);
    if (ty && strcmp(ty, "BPE"))
        return fail(j, DS_EUNSUPPORTED, "model.type is '%.40s'; only BPE and Unigram are supported", ty, 0);
    if (!ty && !field(model, "merges"))
        return fail(j, DS_EUNSUPPORTED, "model has no type and no merges; only BPE is supported", 0, 0);
    static const char *const strs[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = field(model, strs[i]);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
            return fail(j, DS_EUNSUPPORTED, "model.%s is not supported", strs[i], 0);
    }
    const cJSON *dropout = field(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return fail(j, DS_EUNSUPPORTED, "model.dropout is not supported", 0, 0);
    int im = get_bool(model, "ignore_merges", false), bf = get_bool(model, "byte_fallback", false),
        fu = get_bool(model, "fuse_unk", false);
    if (im < 0) return fail(j, DS_EFORMAT, "model.ignore_merges is not a bool", 0, 0);
    if (bf < 0) return fail(j, DS_EFORMAT, "model.byte_fallback is not a bool", 0, 0);
    if (fu < 0) return fail(j, DS_EFORMAT, "model.fuse_unk is not a bool", 0, 0);
    /* A byte-level vocabulary has every byte already; SentencePiece ones fall back to <0xXX>. */
    j->model_bpe_bf = bf && !every_byte_in_vocab(field(model, "vocab")); /* refused if byte-level */
    j->s.ignore_merges = im;
    j->s.meta.byte_fallback = bf;
    j->s.meta.fuse_unk = fu;
    return DS_OK;
}

static int parse_model(jl *j, const cJSON *model, int32_t max_added) {
    if (!cJSON_IsObject(model)) return fail(j, DS_EFORMAT, "model is missing or not an object", 0, 0);
    const char *ty = type_of(model);
    if (ty && !strcmp(ty, "Unigram")) return parse_unigram(j, model, max_added);
    int rc = check_model_options(j, model);
    if (!rc) rc = parse_vocab(j, field(model, "vocab"), max_added);
    if (!rc) rc = parse_merges(j, field(model, "merges"));
    const cJSON *unk = field(model, "unk_token");
    j->s.unk_id = -1;
    if (!rc && cJSON_IsString(unk)) {
        for (int32_t i = 0; i < j->s.n_vocab; i++)
            if (j->tokens[i] && !strcmp(j->tokens[i], unk->valuestring)) j->s.unk_id = i;
        if (j->s.unk_id < 0)
            rc = fail(j, DS_EFORMAT, "model.unk_token '%.60s' is not in the vocab", unk->valuestring, 0);
    }
    return rc;
}

/* ---- added tokens ---- */

static int parse_added_one(jl *j, const cJSON *a, tok_added *out, int idx) {
    char at[32];
    snprintf(at, sizeof at, "%d", idx);
    const cJSON *content = field(a, "content");
    if (!cJSON_IsObject(a) || !get_id(field(a, "id"), &out->id) || !cJSON_IsString(content))
        return fail(j, DS_EFORMAT, "added_tokens[%s] needs an integer id and a string content", at, 0);
    out->content = content->valuestring;
    int sp = get_bool(a, "special", false);
    int flags[4] = {get_bool(a, "single_word", false), get_bool(a, "lstrip", false), get_bool(a, "rstrip", false),
                    get_bool(a, "normalized", sp != 1)};
    if (sp < 0 || flags[0] < 0 || flags[1] < 0 || flags[2] < 0 || flags[3] < 0)
        return fail(j, DS_EFORMAT, "added_tokens[%s]: a flag is not a bool", at, 0);
    out->special = sp;
    out->single_word = flags[0];
    out->lstrip = flags[1];
    out->rstrip = flags[2];
    out->normalized = flags[3];
    return DS_OK;
}

static int parse_added(jl *j, const cJSON *arr, int32_t *max_id) {
    *max_id = -1;
    if (!arr || cJSON_IsNull(arr)) return DS_OK;
    if (!cJSON_IsArray(arr)) return fail(j, DS_EFORMAT, "added_tokens is not an array", 0, 0);
    int n = cJSON_GetArraySize(arr), i = 0;
    j->added = calloc((size_t)n + 1, sizeof *j->added);
    if (!j->added) return fail(j, DS_ENOMEM, "out of memory", 0, 0);
    for (const cJSON *a = arr->child; a; a = a->next, i++) {
        int rc = parse_added_one(j, a, &j->added[i], i);
        if (rc) return rc;
        if (j->added[i].id > *max_id) *max_id = j->added[i].id;
    }
    j->s.added = j->added;
    j->s.n_added = (size_t)n;
    return DS_OK;
}

/* ---- normalizer, pre_tokenizer, decoder ---- */

#define META "\xE2\x96\x81" /* U+2581, SentencePiece's space */

/* A Replace step (normalizer or decoder) of the plain string `from` by `to`. */
static bool replace_is(const cJSON *r, const char *from, const char *to) {
    const cJSON *pat = field(field(r, "pattern"), "String"), *content = field(r, "content");
    return cJSON_IsString(pat) && cJSON_IsString(content) && !strcmp(pat->valuestring, from) &&
           !strcmp(content->valuestring, to);
}

/* Metaspace (pre-tokenizer or decoder): replacement "▁"; prepend_scheme, or the older add_prefix_space. */
static int parse_metaspace(jl *j, const cJSON *m, tok_prepend *scheme, bool *split) {
    const cJSON *rep = field(m, "replacement"), *ps = field(m, "prepend_scheme");
    if (!cJSON_IsString(rep) || strcmp(rep->valuestring, META))
        return fail(j, DS_EUNSUPPORTED, "Metaspace replacement other than \"\u2581\" is not supported", 0, 0);
    if (cJSON_IsString(ps)) {
        if (!strcmp(ps->valuestring, "first")) *scheme = TOK_PREPEND_FIRST;
        else if (!strcmp(ps->valuestring, "always")) *scheme = TOK_PREPEND_ALWAYS;
        else if (!strcmp(ps->valuestring, "never")) *scheme = TOK_PREPEND_NEVER;
        else return fail(j, DS_EFORMAT, "Metaspace prepend_scheme '%.20s' is not first, always or never", ps->valuestring, 0);
    } else {
        int ap = get_bool(m, "add_prefix_space", true);
        if (ap < 0) return fail(j, DS_EFORMAT, "Metaspace add_prefix_space is not a bool", 0, 0);
        *scheme = ap ? TOK_PREPEND_ALWAYS : TOK_PREPEND_NEVER;
    }
    int sp = get_bool(m, "split", true);
    if (sp < 0) return fail(j, DS_EFORMAT, "Metaspace split is not a bool", 0, 0);
    *split = sp;
    return DS_OK;
}

static int parse_normalizer(jl *j, const cJSON *n) {
    if (!n || cJSON_IsNull(n)) return DS_OK;
    const char *ty = type_of(n);
    if (ty && !strcmp(ty, "NFC")) {
        j->s.pre.nfc = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Prepend")) { /* the only prepend deltaserve knows: sentencepiece's dummy prefix */
        const cJSON *pp = field(n, "prepend");
        if (!cJSON_IsString(pp) || strcmp(pp->valuestring, META))
            return fail(j, DS_EUNSUPPORTED, "normalizer Prepend of anything but \"\u2581\" is not supported", 0, 0);
        j->s.meta.norm_prepend = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Replace")) {
        if (!replace_is(n, " ", META))
            return fail(j, DS_EUNSUPPORTED, "normalizer Replace other than \" \" -> \"\u2581\" is not supported", 0, 0);
        j->s.meta.norm_replace = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Sequence") && cJSON_IsArray(field(n, "normalizers"))) {
        for (const cJSON *c = field(n, "normalizers")->child; c; c = c->next) {
            int rc = parse_normalizer(j, c);
            if (rc) return rc;
        }
        return DS_OK;
    }
    return fail(j, DS_EUNSUPPORTED,
                "normalizer '%.40s' is not supported (only NFC, Prepend(\"\u2581\"), Replace(\" \", \"\u2581\") or null)",
                ty ? ty : "?", 0);
}

/* ByteLevel with the given use_regex and no prefix space; anything else is refused. */
static int check_byte_level(jl *j, const cJSON *b, bool want_regex) {
    const char *ty = type_of(b);
    if (!ty || strcmp(ty, "ByteLevel"))
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer step '%.40s' is not supported here", ty ? ty : "?", 0);
    if (get_bool(b, "add_prefix_space", false) != 0)
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer ByteLevel add_prefix_space=true is not supported", 0, 0);
    if (get_bool(b, "use_regex", true) != want_regex)
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer ByteLevel use_regex=%s is not supported in this sequence",
                    want_regex ? "false" : "true", 0);
    return DS_OK;
}

static int parse_split(jl *j, const cJSON *sp) {
    const cJSON *pat = field(field(sp, "pattern"), "Regex"), *beh = field(sp, "behavior");
    if (!cJSON_IsString(pat))
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer Split without a Regex pattern is not supported", 0, 0);
    if (!cJSON_IsString(beh) || strcmp(beh->valuestring, "Isolated") || get_bool(sp, "invert", false) != 0)
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer Split must be behavior Isolated, invert false", 0, 0);
    if (!strcmp(pat->valuestring, tok_regex_text[TOK_RE_LLAMA3]))
        j->s.pre.regex = TOK_RE_LLAMA3;
    else if (!strcmp(pat->valuestring, tok_regex_text[TOK_RE_QWEN2]))
        j->s.pre.regex = TOK_RE_QWEN2;
    else if (!strcmp(pat->valuestring, tok_regex_text[TOK_RE_GPT2]))
        j->s.pre.regex = TOK_RE_GPT2;
    else
        return fail(j, DS_EUNSUPPORTED,
                    "pre_tokenizer Split regex is not a known family (Llama-3, Qwen2, GPT-2): %.120s", pat->valuestring,
                    0);
    return DS_OK;
}

static int parse_pre(jl *j, const cJSON *p) {
    const char *ty = p ? type_of(p) : NULL;
    if (!p || cJSON_IsNull(p)) { /* SentencePiece with its spaces done by the normaliser (Llama legacy) */
        j->pre_null = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Metaspace")) {
        tok_prepend scheme;
        int rc = parse_metaspace(j, p, &scheme, &j->s.meta.split);
        j->s.meta.prepend = (uint8_t)scheme;
        j->s.meta.pre_metaspace = true;
        return rc;
    }
    const cJSON *sp_str = ty && !strcmp(ty, "Split") ? field(field(p, "pattern"), "String") : NULL;
    if (cJSON_IsString(sp_str) && !strcmp(sp_str->valuestring, " ") && get_bool(p, "invert", false) == 0) {
        j->pre_split_space = true; /* Gemma: a no-op once the normaliser has replaced every space */
        return DS_OK;
    }
    j->pre_bytelevel = true;
    if (ty && !strcmp(ty, "ByteLevel")) return check_byte_level(j, p, true); /* GPT-2 */
    const cJSON *steps = ty && !strcmp(ty, "Sequence") ? field(p, "pretokenizers") : NULL;
    int n = cJSON_IsArray(steps) ? cJSON_GetArraySize(steps) : 0;
    if (n == 1) return parse_pre(j, steps->child);
    if (n != 2)
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer '%.40s' is not a supported byte-level shape", ty ? ty : "null",
                    0);
    const cJSON *a = steps->child, *b = a->next;
    const char *ta = type_of(a);
    if (ta && !strcmp(ta, "Digits")) {
        if (get_bool(a, "individual_digits", false) != 1)
            return fail(j, DS_EUNSUPPORTED, "pre_tokenizer Digits(individual_digits=false) is not supported", 0, 0);
        j->s.pre.split_digits = true; /* SmolLM */
        return check_byte_level(j, b, true);
    }
    if (ta && !strcmp(ta, "Split")) {
        int rc = parse_split(j, a);
        return rc ? rc : check_byte_level(j, b, false);
    }
    return fail(j, DS_EUNSUPPORTED, "pre_tokenizer Sequence starting with '%.40s' is not supported", ta ? ta : "?", 0);
}

static int parse_decoder_step(jl *j, const cJSON *d) {
    const char *ty = d ? type_of(d) : NULL;
    tok_meta *m = &j->s.meta;
    if (ty && !strcmp(ty, "ByteLevel")) {
        j->dec_bytelevel = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Replace") && replace_is(d, META, " ")) {
        j->dec_replace = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "ByteFallback")) {
        m->dec_bytes = true;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Fuse")) return DS_OK; /* decode concatenates anyway */
    if (ty && !strcmp(ty, "Strip")) {
        const cJSON *c = field(d, "content"), *st = field(d, "start"), *sp = field(d, "stop");
        int32_t n;
        if (!cJSON_IsString(c) || strcmp(c->valuestring, " ") || !get_id(st, &n) || n > 16 || !cJSON_IsNumber(sp) ||
            sp->valuedouble != 0)
            return fail(j, DS_EUNSUPPORTED, "decoder Strip other than leading \" \" is not supported", 0, 0);
        m->dec_strip = (int)n;
        return DS_OK;
    }
    if (ty && !strcmp(ty, "Metaspace")) {
        tok_prepend scheme;
        bool split;
        int rc = parse_metaspace(j, d, &scheme, &split);
        m->dec_meta_first = scheme != TOK_PREPEND_NEVER;
        j->dec_replace = true;
        return rc;
    }
    return fail(j, DS_EUNSUPPORTED,
                "decoder '%.40s' is not supported (ByteLevel, or Replace(\"\u2581\", \" \") / ByteFallback / Fuse / "
                "Strip / Metaspace for SentencePiece vocabularies)",
                ty ? ty : "null", 0);
}

static int parse_decoder(jl *j, const cJSON *d) {
    const char *ty = d ? type_of(d) : NULL;
    if (!(ty && !strcmp(ty, "Sequence"))) return parse_decoder_step(j, d);
    const cJSON *steps = field(d, "decoders");
    if (!cJSON_IsArray(steps)) return fail(j, DS_EFORMAT, "decoder Sequence has no decoders array", 0, 0);
    for (const cJSON *c = steps->child; c; c = c->next) {
        int rc = parse_decoder_step(j, c);
        if (rc) return rc;
    }
    return DS_OK;
}

/* Byte-level and SentencePiece steps are not mixed: either spaces become "▁" on the way in and back on
 * the way out, with a model over characters, or every step is byte-level. */
static int check_shape(jl *j) {
    const tok_meta *m = &j->s.meta;
    const bool in = m->norm_prepend || m->norm_replace || m->pre_metaspace;
    if (!in && !j->dec_replace && !m->unigram) { /* byte-level */
        if (j->pre_null || j->pre_split_space)
            return fail(j, DS_EUNSUPPORTED, "pre_tokenizer '%.40s' is not a supported byte-level shape",
                        j->pre_null ? "null" : "Split(\" \")", 0);
        if (!j->dec_bytelevel || m->dec_bytes || m->dec_strip)
            return fail(j, DS_EUNSUPPORTED, "decoder is not supported with a byte-level vocabulary (only ByteLevel)", 0, 0);
        if (j->model_bpe_bf)
            return fail(j, DS_EUNSUPPORTED,
                        "model.byte_fallback=true with bytes missing from the vocab is not supported", 0, 0);
        return DS_OK;
    }
    if (!in || !j->dec_replace)
        return fail(j, DS_EUNSUPPORTED, "a SentencePiece vocabulary needs spaces made \"\u2581\" by the %s",
                    !in ? "normalizer or a Metaspace pre_tokenizer" : "decoder back into spaces (Replace or Metaspace)", 0);
    if (j->pre_bytelevel || j->dec_bytelevel || j->s.pre.nfc)
        return fail(j, DS_EUNSUPPORTED, "byte-level or NFC steps with a SentencePiece vocabulary are not supported", 0, 0);
    if (j->pre_split_space && !m->norm_replace)
        return fail(j, DS_EUNSUPPORTED, "pre_tokenizer Split(\" \") is supported only after a Replace(\" \") normalizer", 0, 0);
    if (m->pre_metaspace && (m->norm_prepend || m->norm_replace))
        return fail(j, DS_EUNSUPPORTED, "a Metaspace pre_tokenizer after a Prepend / Replace normalizer is not supported", 0, 0);
    if (j->s.n_merges && m->unigram) return fail(j, DS_EFORMAT, "a Unigram model has merges", 0, 0);
    j->s.meta.on = true;
    return DS_OK;
}

/* ---- post_processor: which special ids wrap a single sequence ---- */

static int template_special(jl *j, const cJSON *tp, const char *name, int32_t *id) {
    const cJSON *ids = field(field(field(tp, "special_tokens"), name), "ids");
    if (!cJSON_IsArray(ids) || cJSON_GetArraySize(ids) != 1 || !get_id(ids->child, id))
        return fail(j, DS_EUNSUPPORTED, "post_processor special token '%.60s' must map to exactly one id", name, 0);
    return DS_OK;
}

static int parse_template(jl *j, const cJSON *tp) {
    const cJSON *single = field(tp, "single");
    if (!cJSON_IsArray(single))
        return fail(j, DS_EFORMAT, "post_processor TemplateProcessing.single is not an array", 0, 0);
    bool seen_a = false;
    for (const cJSON *it = single->child; it; it = it->next) {
        const cJSON *sp = field(field(it, "SpecialToken"), "id");
        if (field(it, "Sequence")) {
            seen_a = true;
            continue;
        }
        if (!cJSON_IsString(sp))
            return fail(j, DS_EFORMAT, "post_processor TemplateProcessing.single has a bad item", 0, 0);
        int32_t *slot = seen_a ? &j->tmpl_eos : &j->tmpl_bos;
        if (*slot >= 0) return fail(j, DS_EUNSUPPORTED, "post_processor adds more than one token on a side", 0, 0);
        int rc = template_special(j, tp, sp->valuestring, slot);
        if (rc) return rc;
    }
    return DS_OK;
}

static int parse_post(jl *j, const cJSON *p) {
    if (!p || cJSON_IsNull(p)) return DS_OK;
    j->has_post = true;
    const char *ty = type_of(p);
    if (ty && !strcmp(ty, "ByteLevel")) return DS_OK; /* offsets only */
    if (ty && !strcmp(ty, "TemplateProcessing")) return parse_template(j, p);
    if (ty && !strcmp(ty, "Sequence") && cJSON_IsArray(field(p, "processors"))) {
        for (const cJSON *c = field(p, "processors")->child; c; c = c->next) {
            int rc = parse_post(j, c);
            if (rc) return rc;
        }
        return DS_OK;
    }
    return fail(j, DS_EUNSUPPORTED, "post_processor '%.40s' is not supported", ty ? ty : "?", 0);
}

/* ---- tokenizer_config.json ---- */

static int32_t id_of(const jl *j, const char *tok) {
    for (size_t i = 0; i < j->s.n_added; i++)
        if (!strcmp(j->added[i].content, tok)) return j->added[i].id;
    for (int32_t i = 0; i < j->s.n_vocab; i++)
        if (j->tokens[i] && !strcmp(j->tokens[i], tok)) return i;
    return -1;
}

/* bos_token / eos_token / pad_token: a string, or an AddedToken object {"content": ...}. */
static int32_t config_token(const jl *j, const cJSON *cfg, const char *key) {
    const cJSON *v = field(cfg, key);
    if (cJSON_IsObject(v)) v = field(v, "content");
    return cJSON_IsString(v) ? id_of(j, v->valuestring) : -1;
}

static int config_template(jl *j, const cJSON *cfg) {
    const cJSON *t = field(cfg, "chat_template"), *pick = cJSON_IsString(t) ? t : NULL;
    for (const cJSON *it = cJSON_IsArray(t) ? t->child : NULL; it; it = it->next) {
        const cJSON *name = field(it, "name"), *tt = field(it, "template");
        if (cJSON_IsString(tt) && (!pick || (cJSON_IsString(name) && !strcmp(name->valuestring, "default")))) pick = tt;
    }
    if (pick && !(j->chat_template = strdup(pick->valuestring))) return DS_ENOMEM;
    return DS_OK;
}

static int apply_config(jl *j, const cJSON *cfg) {
    int32_t bos = config_token(j, cfg, "bos_token"), eos = config_token(j, cfg, "eos_token");
    j->s.pad = config_token(j, cfg, "pad_token");
    int ab = get_bool(cfg, "add_bos_token", false), ae = get_bool(cfg, "add_eos_token", false);
    if (ab < 0 || ae < 0)
        return ds_err_set(j->err, DS_EFORMAT, "%s: add_bos_token / add_eos_token is not a bool", j->cfg_path);
    /* transformers rebuilds the post-processor from these flags when either is given (or when the
     * tokenizer.json has none); otherwise tokenizer.json's post-processor decides. */
    if (field(cfg, "add_bos_token") || field(cfg, "add_eos_token") || !j->has_post) {
        j->tmpl_bos = ab && bos >= 0 ? bos : -1;
        j->tmpl_eos = ae && eos >= 0 ? eos : -1;
    }
    if (bos >= 0 && j->tmpl_bos < 0) j->s.bos = bos;
    if (eos >= 0) j->s.eos = eos;
    if (config_template(j, cfg)) return ds_err_set(j->err, DS_ENOMEM, "%s: out of memory", j->cfg_path);
    return DS_OK;
}

static int load_config(jl *j) {
    char *text = NULL;
    size_t len = 0;
    int rc = ds_file_read_all(j->cfg_path, 64u << 20, &text, &len, j->err);
    if (rc) return rc;
    cJSON *cfg = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return ds_err_set(j->err, DS_EFORMAT, "%s: not a JSON object", j->cfg_path);
    }
    rc = apply_config(j, cfg);
    cJSON_Delete(cfg);
    return rc;
}

/* chat_template.jinja beside tokenizer.json, which newer transformers write instead of the config key. */
static void load_jinja(jl *j) {
    const char *slash = strrchr(j->path, '/');
    size_t dir = slash ? (size_t)(slash - j->path) + 1 : 0;
    char *p = malloc(dir + sizeof "chat_template.jinja");
    if (!p) return;
    memcpy(p, j->path, dir);
    memcpy(p + dir, "chat_template.jinja", sizeof "chat_template.jinja");
    if (ds_file_read_all(p, 16u << 20, &j->chat_template, NULL, NULL)) j->chat_template = NULL;
    free(p);
}

/* ---- driver ---- */

static int parse_root(jl *j, const cJSON *root) {
    if (!cJSON_IsObject(root)) return fail(j, DS_EFORMAT, "not a JSON object", 0, 0);
    int32_t max_added;
    int rc = parse_added(j, field(root, "added_tokens"), &max_added);
    if (!rc) rc = parse_normalizer(j, field(root, "normalizer"));
    if (!rc) rc = parse_pre(j, field(root, "pre_tokenizer"));
    if (!rc) rc = parse_decoder(j, field(root, "decoder"));
    if (!rc) rc = parse_model(j, field(root, "model"), max_added);
    if (!rc) rc = check_shape(j);
    if (!rc) rc = parse_post(j, field(root, "post_processor"));
    if (!rc && j->cfg_path) rc = load_config(j);
    if (rc) return rc;
    if (!j->chat_template && j->from_file) load_jinja(j);
    if (j->tmpl_bos >= 0) j->s.bos = j->tmpl_bos;
    if (j->tmpl_eos >= 0 && j->s.eos < 0) j->s.eos = j->tmpl_eos;
    j->s.add_bos = j->tmpl_bos >= 0;
    /* Appending eos needs eos to be the template's token; the config's eos only names it. */
    j->s.add_eos = j->tmpl_eos >= 0 && j->s.eos == j->tmpl_eos;
    j->s.chat_template = j->chat_template;
    return DS_OK;
}

static void jl_free(jl *j) {
    for (int32_t i = 0; j->merges && i < j->s.n_merges; i++) free(j->merges[i]);
    free(j->merges);
    free(j->tokens);
    free(j->uscores);
    free(j->added);
    free(j->chat_template);
}

static ds_tokenizer *load_text(const char *text, size_t len, const char *name, const char *config_path, bool from_file,
                               ds_err *err) {
    cJSON *root = cJSON_ParseWithLength(text, len);
    jl j = {.path = name, .cfg_path = config_path, .err = err, .tmpl_bos = -1, .tmpl_eos = -1, .from_file = from_file};
    j.s = (tok_spec){.strict_merges = true, .unk_id = -1, .bos = -1, .eos = -1, .eot = -1, .pad = -1, .source = name};
    ds_tokenizer *t = NULL;
    if (!root) fail(&j, DS_EFORMAT, "malformed JSON", 0, 0);
    else if (!parse_root(&j, root)) t = tok_build(&j.s, err);
    cJSON_Delete(root);
    jl_free(&j);
    return t;
}

ds_tokenizer *tok_load_json_text(const char *text, size_t len, const char *name, const char *config_path,
                                 ds_err *err) {
    return load_text(text, len, name ? name : "tokenizer.json", config_path, false, err);
}

ds_tokenizer *ds_tokenizer_load_json(const char *path, const char *config_path, ds_err *err) {
    if (!path) {
        ds_err_set(err, DS_EINVAL, "tokenizer.json: no path");
        return NULL;
    }
    char *text = NULL;
    size_t len = 0;
    if (ds_file_read_all(path, TOK_JSON_MAX_BYTES, &text, &len, err)) return NULL;
    ds_tokenizer *t = load_text(text, len, path, config_path, true, err);
    free(text);
    return t;
}
