/* SentencePiece vocabularies from HF tokenizer.json (src/tokenizer/metaspace.c, unigram.c, bpe.c) and
 * the Gemma-style GGUF (add_space_prefix = false), against tests/golden/gen_spm_hf_golden.py →
 * tests/data/tokenizer/spm_hf/: exact ids from HF `tokenizers` for five shapes (Llama legacy
 * Prepend+Replace, Llama Metaspace "first", Gemma Replace + Split(" "), Unigram with byte fallback,
 * Unigram with fused unk and the Metaspace decoder) on leading / doubled / trailing spaces, tabs and
 * newlines, digits, Chinese, emoji, code, special tokens and normalized added tokens (matched by their
 * normalised content, "▁<tool>" under the legacy Prepend); BOS per tokenizer_config.json; decode equal
 * to tokenizers' decode; streaming detokenisation equal to it, except that the stream keeps the
 * dummy prefix's space (a stream continues a prompt, so nothing is stripped); sentencepiece's ids for the
 * Gemma-style GGUF; refusal of shapes that are not reproduced. */
#include "ds/model.h"
#include "ds_test.h"
#include "tok_golden.h"
#include "tokenizer/tok_internal.h"

#define SPM_HF TOK_DATA "/spm_hf"

/* The pushes + flush of ids as one malloc'd string. */
static char *stream(const ds_tokenizer *t, const int32_t *ids, size_t n, size_t *len) {
    size_t cap = 64 + 16 * n, o = 0;
    char *buf = malloc(cap + 1), chunk[512];
    ds_detok st = {0};
    for (size_t i = 0; i < n; i++) {
        int k = ds_detok_push(t, &st, ids[i], false, chunk, sizeof chunk);
        CHECK_MSG(k >= 0 && tg_utf8_valid(chunk, (size_t)k), "push %zu", i);
        if (k > 0 && o + (size_t)k <= cap) memcpy(buf + o, chunk, (size_t)k), o += (size_t)k;
    }
    int k = ds_detok_flush(&st, chunk, sizeof chunk);
    if (k > 0 && o + (size_t)k <= cap) memcpy(buf + o, chunk, (size_t)k), o += (size_t)k;
    buf[o] = 0;
    *len = o;
    return buf;
}

static bool same_ids(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (!na || !memcmp(a, b, na * sizeof *a));
}

static void check_form(const char *name, const cJSON *form, int *n_cases, int *n_fallback) {
    char path[512], cfg[512];
    snprintf(path, sizeof path, SPM_HF "/%s/tokenizer.json", name);
    snprintf(cfg, sizeof cfg, SPM_HF "/%s/tokenizer_config.json", name);
    ds_err err = {{0}};
    ds_tokenizer *t = ds_tokenizer_load_json(path, cfg, &err);
    CHECK_MSG(t != NULL, "%s: %s", name, err.msg);
    if (!t) return;
    CHECK_EQ_INT(ds_tokenizer_n_vocab(t), (int)cJSON_GetObjectItem(form, "vocab_size")->valuedouble);
    for (const cJSON *c = cJSON_GetObjectItem(form, "cases")->child; c; c = c->next) {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring,
                   *dec = cJSON_GetObjectItem(c, "decoded")->valuestring;
        size_t nw, nb, n = 0;
        int32_t *want = tg_ids(cJSON_GetObjectItem(c, "ids"), &nw), *ids = NULL;
        int32_t *want_bos = tg_ids(cJSON_GetObjectItem(c, "with_bos"), &nb);
        CHECK(ds_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n) == 0);
        CHECK_MSG(same_ids(ids, n, want, nw), "%s '%s': ids differ", name, text);
        if (!same_ids(ids, n, want, nw)) tg_print_ids("want", want, nw), tg_print_ids("got ", ids, n);
        free(ids);
        CHECK(ds_tokenizer_encode(t, text, strlen(text), true, true, &ids, &n) == 0);
        CHECK_MSG(same_ids(ids, n, want_bos, nb), "%s '%s': ids with BOS differ", name, text);
        free(ids);
        char *out = NULL;
        size_t len = 0;
        CHECK(ds_tokenizer_decode(t, want, nw, false, &out, &len) == 0);
        CHECK_MSG(out && len == strlen(dec) && !memcmp(out, dec, len), "%s '%s': decode '%s', want '%s'", name, text,
                  out ? out : "", dec);
        free(out);
        char *s = stream(t, want, nw, &len);
        const bool keeps_space = s[0] == ' ' && len == strlen(dec) + 1 && !memcmp(s + 1, dec, len - 1);
        CHECK_MSG(keeps_space || (len == strlen(dec) && !memcmp(s, dec, len)), "%s '%s': stream '%s', decode '%s'",
                  name, text, s, dec);
        free(s);
        bool fb = false;
        for (const cJSON *p = cJSON_GetObjectItem(c, "pieces")->child; p; p = p->next)
            fb |= !strncmp(p->valuestring, "<0x", 3);
        *n_fallback += fb;
        (*n_cases)++;
        free(want), free(want_bos);
    }
    ds_tokenizer_free(t);
}

static void check_gguf(const cJSON *cases) {
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_weights = false;
    ds_err err = {{0}};
    ds_model *m = ds_model_load(SPM_HF "/gemma.gguf", &mp, &err);
    CHECK_MSG(m && m->tok, "gemma.gguf: %s", err.msg);
    if (!m || !m->tok) return ds_model_free(m);
    int k = 0;
    for (const cJSON *c = cases->child; c; c = c->next, k++) {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        size_t nw, n = 0;
        int32_t *want = tg_ids(cJSON_GetObjectItem(c, "ids"), &nw), *ids = NULL;
        CHECK(ds_tokenizer_encode(m->tok, text, strlen(text), false, true, &ids, &n) == 0);
        CHECK_MSG(same_ids(ids, n, want, nw), "gemma.gguf '%s': ids differ from sentencepiece", text);
        if (!same_ids(ids, n, want, nw)) tg_print_ids("want", want, nw), tg_print_ids("got ", ids, n);
        free(ids);
        CHECK(ds_tokenizer_encode(m->tok, text, strlen(text), true, true, &ids, &n) == 0);
        CHECK_MSG(n == nw + 1 && ids[0] == 1 && same_ids(ids + 1, n - 1, want, nw), "gemma.gguf '%s' with BOS", text);
        free(ids);
        /* no dummy prefix: decoding gives the text back exactly */
        char *out = NULL;
        size_t len = 0;
        if (nw && !strstr(text, "<s>") && !strstr(text, "\xE2\x96\x81")) {
            CHECK(ds_tokenizer_decode(m->tok, want, nw, false, &out, &len) == 0);
            CHECK_MSG(out && len == strlen(text) && !memcmp(out, text, len), "gemma.gguf decode '%s'", text);
            free(out);
        }
        free(want);
    }
    printf("gemma-style GGUF: %d texts equal to sentencepiece\n", k);
    CHECK(k >= 15);
    ds_model_free(m);
}

/* Shapes that would tokenise differently are refused by name, never guessed. */
static void check_refusals(void) {
    static const struct {
        const char *json, *needle;
    } bad[] = {
        {"{\"model\":{\"type\":\"Unigram\",\"vocab\":[[\"a\",-1]]},\"pre_tokenizer\":{\"type\":\"Metaspace\","
         "\"replacement\":\"\\u2581\"},\"decoder\":{\"type\":\"ByteLevel\"}}",
         "decoder back into spaces"},
        {"{\"model\":{\"type\":\"Unigram\",\"vocab\":[[\"a\"]]},\"pre_tokenizer\":{\"type\":\"Metaspace\","
         "\"replacement\":\"\\u2581\"},\"decoder\":{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\"}}",
         "model.vocab[0]"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"normalizer\":{\"type\":\"Precompiled\"},"
         "\"decoder\":{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\"}}",
         "Precompiled"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"pre_tokenizer\":{\"type\":\"Metaspace\","
         "\"replacement\":\"_\"},\"decoder\":{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\"}}",
         "replacement"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"pre_tokenizer\":{\"type\":\"Metaspace\","
         "\"replacement\":\"\\u2581\"},\"decoder\":{\"type\":\"Fuse\"}}",
         "decoder back into spaces"},
        {"{\"model\":{\"type\":\"WordPiece\",\"vocab\":{\"a\":0}},\"decoder\":{\"type\":\"ByteLevel\"}}", "WordPiece"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"normalizer\":{\"type\":\"Replace\","
         "\"pattern\":{\"String\":\" \"},\"content\":\"\\u2581\"},\"pre_tokenizer\":{\"type\":\"Metaspace\","
         "\"replacement\":\"\\u2581\"},\"decoder\":{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\"}}",
         "after a Prepend / Replace"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ds_err err = {{0}};
        ds_tokenizer *t = tok_load_json_text(bad[i].json, strlen(bad[i].json), "bad.json", NULL, &err);
        CHECK_MSG(!t && strstr(err.msg, bad[i].needle), "case %zu: '%s' lacks '%s'", i, err.msg, bad[i].needle);
        ds_tokenizer_free(t);
    }
}

int main(void) {
    cJSON *g = tg_load(SPM_HF "/spm_hf_golden.json");
    if (!g) SKIP("no golden (tests/golden/gen_spm_hf_golden.py)");
    int n_forms = 0, n_cases = 0, n_fallback = 0;
    for (const cJSON *f = cJSON_GetObjectItem(g, "forms")->child; f; f = f->next, n_forms++)
        check_form(f->string, f, &n_cases, &n_fallback);
    printf("tokenizer.json SentencePiece: %d forms, %d cases (%d with byte fallback) equal to tokenizers\n", n_forms,
           n_cases, n_fallback);
    CHECK(n_forms == 5 && n_fallback >= 20);
    check_gguf(cJSON_GetObjectItem(g, "gguf_ids"));
    check_refusals();
    cJSON_Delete(g);
    return ds_test_result();
}
