/* Tokenizer tests on the committed small tokenizers (Llama-3-, Qwen2- and GPT-2-shaped, trained by
 * tests/golden/gen_tokenizer_golden.py): exact HF ids for every corpus line, decode, streaming detok,
 * malformed tokenizer.json files, config overrides, threads and speed. SmolLM2 (real GGUF vocab) is in
 * test_tokenizer_gguf.c. */
#include <pthread.h>
#include <unistd.h>
#include <utf8proc.h>

#include "ds_test.h"
#include "tok_golden.h"

static const char *const k_families[] = {"llama3", "qwen2", "gpt2"};

static ds_tokenizer *load_family(const char *fam, bool with_config) {
    char tj[512], tc[512];
    snprintf(tj, sizeof tj, TOK_DATA "/%s_tokenizer.json", fam);
    snprintf(tc, sizeof tc, TOK_DATA "/%s_tokenizer_config.json", fam);
    ds_err e = {{0}};
    ds_tokenizer *t = ds_tokenizer_load_json(tj, with_config ? tc : NULL, &e);
    CHECK_MSG(t != NULL, "load %s: %s", fam, e.msg);
    return t;
}

static void test_goldens(const cJSON *golden, const cJSON *corpus) {
    for (size_t f = 0; f < 3; f++) {
        ds_tokenizer *t = load_family(k_families[f], true);
        if (!t) continue;
        tg_run_golden(t, k_families[f], golden, corpus);
        /* decode(encode(x)) == x wherever HF round-trips (everything but NFC-changed lines and the
         * byte-mapped "café" added token). */
        const cJSON *dec =
            cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(golden, k_families[f]), "decoded");
        int line = 0;
        for (const cJSON *c = corpus->child; c; c = c->next, line++) {
            const char *want = cJSON_GetArrayItem(dec, line)->valuestring, *text = c->valuestring;
            int32_t *ids = NULL;
            size_t n = 0, len = 0;
            char *back = NULL;
            CHECK(ds_tokenizer_encode(t, text, strlen(text), true, true, &ids, &n) == 0);
            CHECK(ds_tokenizer_decode(t, ids, n, false, &back, &len) == 0);
            CHECK_MSG(back && !strcmp(back, want), "%s line %d: decode(encode(x)) differs from HF", k_families[f],
                      line);
            size_t bos = 0; /* the spelling of a BOS that encode itself added (Llama-3) */
            if (!strcmp(k_families[f], "llama3")) ds_tokenizer_token_bytes(t, ds_tokenizer_bos(t), &bos);
            if (!strcmp(want + bos, text))
                CHECK_MSG(back && !strcmp(back + bos, text), "%s line %d: no round trip", k_families[f], line);
            free(ids);
            free(back);
        }
        ds_tokenizer_free(t);
    }
}

static void test_lookups(void) {
    ds_tokenizer *t = load_family("llama3", true);
    if (!t) return;
    int32_t bot = ds_tokenizer_find(t, "<|begin_of_text|>"), eot = ds_tokenizer_find(t, "<|eot_id|>");
    CHECK(bot >= 0 && eot >= 0);
    CHECK_EQ_INT(ds_tokenizer_bos(t), bot);
    CHECK_EQ_INT(ds_tokenizer_eos(t), eot); /* from tokenizer_config.json */
    CHECK_EQ_INT(ds_tokenizer_eot(t), eot);
    CHECK(ds_tokenizer_is_eog(t, eot));
    CHECK(ds_tokenizer_is_eog(t, ds_tokenizer_find(t, "<|end_of_text|>")));
    CHECK(!ds_tokenizer_is_eog(t, bot));
    CHECK(ds_tokenizer_is_special(t, bot));
    CHECK(!ds_tokenizer_is_special(t, ds_tokenizer_find(t, "<think>"))); /* added, not special */
    CHECK(!ds_tokenizer_is_special(t, -1) && !ds_tokenizer_is_eog(t, 1 << 30));
    CHECK_EQ_INT(ds_tokenizer_find(t, "no such token"), -1);
    size_t len = 0;
    const char *b = ds_tokenizer_token_bytes(t, ds_tokenizer_find(t, "Ġthe"), &len);
    CHECK(b && len == 4 && !memcmp(b, " the", 4));
    CHECK(ds_tokenizer_token_bytes(t, -5, &len) == NULL && len == 0);
    CHECK(ds_tokenizer_n_vocab(t) > 3000);
    char *s = NULL;
    int32_t bad = ds_tokenizer_n_vocab(t);
    CHECK_EQ_INT(ds_tokenizer_decode(t, &bad, 1, false, &s, NULL), DS_EINVAL);
    int32_t *ids = NULL;
    size_t n = 1;
    CHECK(ds_tokenizer_encode(t, NULL, 0, true, true, &ids, &n) == 0 && n == 1 && ids[0] == bot);
    free(ids);
    ds_tokenizer_free(t);
}

/* Invalid UTF-8 encodes byte-wise; decode repairs it exactly as HF's from_utf8_lossy would. */
static void test_invalid_utf8(void) {
    for (size_t f = 0; f < 3; f++) {
        ds_tokenizer *t = load_family(k_families[f], true);
        if (!t) continue;
        static const char bad[] = "ok \xff\xfe caf\xc3 x \xe4\xb8 \xf0\x9f\x98 end\xe2\x82";
        int32_t *ids = NULL;
        size_t n = 0, len = 0;
        char *back = NULL;
        CHECK(ds_tokenizer_encode(t, bad, sizeof bad - 1, false, false, &ids, &n) == 0 && n > 0);
        CHECK(ds_tokenizer_decode(t, ids, n, false, &back, &len) == 0);
        const char *want = "ok \xEF\xBF\xBD\xEF\xBF\xBD caf\xEF\xBF\xBD x \xEF\xBF\xBD \xEF\xBF\xBD end\xEF\xBF\xBD";
        CHECK_MSG(back && !strcmp(back, want), "%s: lossy decode got \"%s\"", k_families[f], back ? back : "");
        /* Streaming gives the same bytes. */
        ds_detok st = {0};
        char out[256], chunk[64];
        size_t o = 0;
        for (size_t i = 0; i < n; i++) {
            int k = ds_detok_push(t, &st, ids[i], false, chunk, sizeof chunk);
            CHECK(k >= 0 && tg_utf8_valid(chunk, (size_t)k));
            if (k > 0) memcpy(out + o, chunk, (size_t)k), o += (size_t)k;
        }
        int k = ds_detok_flush(&st, out + o, sizeof out - o);
        CHECK(k >= 0);
        o += (size_t)(k > 0 ? k : 0);
        CHECK(o == strlen(want) && !memcmp(out, want, o));
        free(ids);
        free(back);
        ds_tokenizer_free(t);
    }
}

/* A 4-byte character split over tokens is held back until complete; DS_ERANGE leaves state intact. */
static void test_detok_edges(void) {
    ds_tokenizer *t = load_family("gpt2", true);
    if (!t) return;
    static const char emoji[] = "\xF0\x9F\x98\x80"; /* 😀 as 4 single-byte tokens */
    int32_t bytes[4];
    for (int i = 0; i < 4; i++) {
        char sp[8] = {0};
        /* The GPT-2 byte map: 0xF0 stays U+00F0, 0x80..0x9F move to U+0121.. */
        unsigned char b = (unsigned char)emoji[i];
        unsigned c = (b >= 161 && b != 173) ? b : (b >= 127 ? 256 + 33 + (b - 127u) : 256u + b);
        sp[0] = (char)(0xC0 | (c >> 6));
        sp[1] = (char)(0x80 | (c & 0x3F));
        bytes[i] = ds_tokenizer_find(t, sp);
        CHECK(bytes[i] >= 0);
    }
    ds_detok st = {0};
    char out[16];
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[0], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[1], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[2], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[3], false, out, 2), DS_ERANGE); /* too small: state kept */
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[3], false, out, sizeof out), 4);
    CHECK(!memcmp(out, emoji, 4));
    CHECK_EQ_INT(ds_detok_flush(&st, out, sizeof out), 0);
    /* An unfinished sequence at the end flushes as one U+FFFD. */
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[0], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_flush(&st, out, sizeof out), 3);
    CHECK(!memcmp(out, "\xEF\xBF\xBD", 3));
    CHECK_EQ_INT(ds_detok_push(t, &st, -1, false, out, sizeof out), DS_EINVAL);
    /* A special token is skipped without disturbing what is pending. */
    int32_t eot = ds_tokenizer_find(t, "<|endoftext|>");
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[0], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, eot, true, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[1], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[2], false, out, sizeof out), 0);
    CHECK_EQ_INT(ds_detok_push(t, &st, bytes[3], false, out, sizeof out), 4);
    ds_tokenizer_free(t);
}

/* ---- randomized round trips ---- */

static uint32_t rnd(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

static size_t put_cp(uint32_t cp, char *o) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xC0 | (cp >> 6)), o[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000)
        return o[0] = (char)(0xE0 | (cp >> 12)), o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
               o[2] = (char)(0x80 | (cp & 0x3F)), 3;
    o[0] = (char)(0xF0 | (cp >> 18)), o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Valid UTF-8 mixing whitespace kinds, digits of several scripts, contractions, CJK, emoji with
 * modifiers / ZWJ / flags, combining marks and added-token fragments. */
static size_t random_text(uint64_t *seed, char *buf) {
    static const uint32_t pool[] = {
        ' ',     ' ',    ' ',    '\t',   '\n',   '\r',   'a',    'b',   'e',    'x',     'Z',     '\'',   's',
        't',     'l',    'L',    '1',    '2',    '9',    '.',    ',',   '!',    '<',     '|',     '>',    '_',
        0xA0,    0x3000, 0x2028, 0x85,   0x4E2D, 0x6587, 0x53C2, 0xE9,  0x301,  0x1F600, 0x1F3FD, 0x200D, 0x1F1FA,
        0x1F1F8, 0x663,  0xB2,   0x216B, 0xFF21, 0xE01,  0x5D0,  0x17F, 0x2019, 0xAC00,  0x1100,  0x1161};
    size_t n = 0, len = rnd(seed) % 48;
    for (size_t i = 0; i < len; i++) {
        uint32_t cp = pool[rnd(seed) % (sizeof pool / sizeof pool[0])];
        if (rnd(seed) % 8 == 0) {
            cp = 0x20 + rnd(seed) % 0x2FFE0; /* anything, bar surrogates */
            if (cp >= 0xD800 && cp < 0xE000) cp = 'q';
        }
        n += put_cp(cp, buf + n);
    }
    buf[n] = 0;
    return n;
}

static void test_random_round_trip(void) {
    for (size_t f = 0; f < 3; f++) {
        ds_tokenizer *t = load_family(k_families[f], true);
        if (!t) continue;
        uint64_t seed = 1234 + f;
        int bad = 0;
        for (int it = 0; it < 3000; it++) {
            char text[256];
            size_t len = random_text(&seed, text), n = 0, blen = 0;
            int32_t *ids = NULL;
            char *back = NULL;
            /* Qwen2 normalises to NFC first, so that is what must come back. */
            char *want = f == 1 ? (char *)utf8proc_NFC((const utf8proc_uint8_t *)text) : strdup(text);
            if (ds_tokenizer_encode(t, text, len, false, false, &ids, &n) ||
                ds_tokenizer_decode(t, ids, n, false, &back, &blen) || strcmp(back, want)) {
                if (bad++ < 3)
                    fprintf(stderr, "%s: round trip failed for [%s] -> [%s]\n", k_families[f], text, back ? back : "");
            }
            free(want);
            free(ids);
            free(back);
        }
        CHECK_MSG(bad == 0, "%s: %d random round trips failed", k_families[f], bad);
        ds_tokenizer_free(t);
    }
}

/* Random id sequences (split characters, stray continuation bytes, specials): the streamed chunks are
 * each valid UTF-8 and together equal decode. */
static void test_random_stream(void) {
    ds_tokenizer *t = load_family("llama3", true);
    if (!t) return;
    uint64_t seed = 99;
    int32_t nv = ds_tokenizer_n_vocab(t);
    for (int it = 0; it < 2000; it++) {
        cJSON *arr = cJSON_CreateArray();
        int len = (int)(rnd(&seed) % 24);
        for (int i = 0; i < len; i++) {
            /* Bias towards the 256 single-byte tokens so multi-byte characters get split. */
            int32_t id = rnd(&seed) % 2 ? (int32_t)(rnd(&seed) % 256) : (int32_t)(rnd(&seed) % (uint32_t)nv);
            cJSON_AddItemToArray(arr, cJSON_CreateNumber(id));
        }
        bool skip = it % 2;
        size_t n, dlen = 0;
        int32_t *ids = tg_ids(arr, &n);
        char *want = NULL;
        CHECK(ds_tokenizer_decode(t, ids, n, skip, &want, &dlen) == 0);
        CHECK(want && tg_utf8_valid(want, dlen));
        if (want) tg_check_stream(t, "random", (size_t)it, arr, skip, want, dlen); /* may hold NULs */
        free(want);
        free(ids);
        cJSON_Delete(arr);
    }
    ds_tokenizer_free(t);
}

/* ---- malformed tokenizer.json ---- */

static char g_tmpdir[256];

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

/* Loads a mutated copy of the GPT-2-style tokenizer; the error must name the file and `needle`. */
static void expect_refused(const char *label, cJSON *j, const char *needle) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.json", g_tmpdir, label);
    char *text = cJSON_PrintUnformatted(j);
    write_file(path, text);
    free(text);
    ds_err e = {{0}};
    ds_tokenizer *t = ds_tokenizer_load_json(path, NULL, &e);
    CHECK_MSG(t == NULL, "%s: loaded but should be refused", label);
    CHECK_MSG(strstr(e.msg, path) && strstr(e.msg, needle), "%s: message \"%s\" lacks \"%s\"", label, e.msg, needle);
    ds_tokenizer_free(t);
}

static cJSON *base_json(void) { return tg_load(TOK_DATA "/gpt2_tokenizer.json"); }

static cJSON *at(cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

typedef void (*mutate_fn)(cJSON *j);
static void m_unigram(cJSON *j) { cJSON_ReplaceItemInObject(at(j, "model"), "type", cJSON_CreateString("Unigram")); }
static void m_no_vocab(cJSON *j) { cJSON_DeleteItemFromObject(at(j, "model"), "vocab"); }
static void m_neg_id(cJSON *j) { cJSON_ReplaceItemInObject(at(at(j, "model"), "vocab"), "Ġ", cJSON_CreateNumber(-3)); }
static void m_frac_id(cJSON *j) {
    cJSON_ReplaceItemInObject(at(at(j, "model"), "vocab"), "Ġ", cJSON_CreateNumber(1.5));
}
static void m_dup_id(cJSON *j) { cJSON_ReplaceItemInObject(at(at(j, "model"), "vocab"), "Ġ", cJSON_CreateNumber(0)); }
static void m_merge_unknown(cJSON *j) {
    cJSON_AddItemToArray(at(at(j, "model"), "merges"), cJSON_CreateString("Ġ qqqqzz"));
}
static void m_merge_shape(cJSON *j) { cJSON_AddItemToArray(at(at(j, "model"), "merges"), cJSON_CreateNumber(7)); }
static void m_merges_obj(cJSON *j) { cJSON_ReplaceItemInObject(at(j, "model"), "merges", cJSON_CreateObject()); }
static void m_byte_fallback(cJSON *j) {
    cJSON_AddItemToObject(at(j, "model"), "byte_fallback", cJSON_CreateTrue());
    cJSON_DeleteItemFromObject(at(at(j, "model"), "vocab"), "Ġ");
}
/* An array vocab with byte_fallback: fuzz_tokenizer found the byte check reading its entries' keys. */
static void m_fallback_array_vocab(cJSON *j) {
    cJSON_DeleteItemFromObject(at(j, "model"), "byte_fallback");
    cJSON_AddItemToObject(at(j, "model"), "byte_fallback", cJSON_CreateTrue());
    cJSON *a = cJSON_CreateArray();
    cJSON_AddItemToArray(a, cJSON_CreateString("H e"));
    cJSON_ReplaceItemInObject(at(j, "model"), "vocab", a);
}
static void m_sparse_vocab(cJSON *j) { /* one id far past the entries: tables would take 400 MB */
    cJSON_AddItemToObject(at(at(j, "model"), "vocab"), "zz", cJSON_CreateNumber(16000000));
}
static void m_sparse_added(cJSON *j) {
    cJSON_ReplaceItemInObject(cJSON_GetArrayItem(at(j, "added_tokens"), 0), "id", cJSON_CreateNumber(16000000));
}
static void m_nfkc(cJSON *j) {
    cJSON *n = cJSON_CreateObject();
    cJSON_AddStringToObject(n, "type", "NFKC");
    cJSON_ReplaceItemInObject(j, "normalizer", n);
}
static void m_metaspace(cJSON *j) {
    cJSON_ReplaceItemInObject(at(j, "pre_tokenizer"), "type", cJSON_CreateString("Metaspace"));
}
static void m_prefix_space(cJSON *j) {
    cJSON_ReplaceItemInObject(at(j, "pre_tokenizer"), "add_prefix_space", cJSON_CreateTrue());
}
static void m_no_pre(cJSON *j) { cJSON_ReplaceItemInObject(j, "pre_tokenizer", cJSON_CreateNull()); }
static void m_decoder(cJSON *j) {
    cJSON_ReplaceItemInObject(at(j, "decoder"), "type", cJSON_CreateString("WordPiece"));
}
static void m_roberta(cJSON *j) {
    cJSON_ReplaceItemInObject(at(j, "post_processor"), "type", cJSON_CreateString("RobertaProcessing"));
}
static void m_added_bad(cJSON *j) { cJSON_AddItemToArray(at(j, "added_tokens"), cJSON_CreateString("<x>")); }
static void m_added_flag(cJSON *j) {
    cJSON_ReplaceItemInObject(cJSON_GetArrayItem(at(j, "added_tokens"), 0), "lstrip", cJSON_CreateNumber(1));
}
static void m_prefix(cJSON *j) {
    cJSON_ReplaceItemInObject(at(j, "model"), "continuing_subword_prefix", cJSON_CreateString("##"));
}
static void m_root_array(cJSON *j) { (void)j; }

static void test_malformed(void) {
    static const struct {
        const char *label, *needle;
        mutate_fn fn;
    } cases[] = {
        {"unigram", "model.vocab", m_unigram}, /* a BPE vocab object under type Unigram */
        {"no_vocab", "model.vocab", m_no_vocab},
        {"neg_id", "model.vocab", m_neg_id},
        {"frac_id", "model.vocab", m_frac_id},
        {"dup_id", "model.vocab", m_dup_id},
        {"merge_unknown", "merges[", m_merge_unknown},
        {"merge_shape", "model.merges[", m_merge_shape},
        {"merges_obj", "model.merges", m_merges_obj},
        {"byte_fallback", "byte_fallback", m_byte_fallback},
        {"fallback_array_vocab", "model.vocab", m_fallback_array_vocab},
        {"sparse_vocab", "token ids reach 16000000 for", m_sparse_vocab},
        {"sparse_added", "the ids are not dense", m_sparse_added},
        {"nfkc", "normalizer 'NFKC'", m_nfkc},
        {"metaspace", "Metaspace replacement", m_metaspace}, /* no replacement given */
        {"prefix_space", "add_prefix_space", m_prefix_space},
        {"no_pre", "pre_tokenizer", m_no_pre},
        {"decoder", "decoder 'WordPiece'", m_decoder},
        {"roberta", "post_processor 'RobertaProcessing'", m_roberta},
        {"added_bad", "added_tokens[", m_added_bad},
        {"added_flag", "added_tokens[0]", m_added_flag},
        {"prefix", "continuing_subword_prefix", m_prefix},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cJSON *j = base_json();
        if (!j) return;
        cases[i].fn(j);
        expect_refused(cases[i].label, j, cases[i].needle);
        cJSON_Delete(j);
    }
    (void)m_root_array;
    /* Whole-file problems: missing, not JSON, truncated, not an object, empty. */
    char path[512];
    ds_err e = {{0}};
    snprintf(path, sizeof path, "%s/missing.json", g_tmpdir);
    CHECK(ds_tokenizer_load_json(path, NULL, &e) == NULL && strstr(e.msg, path));
    static const char *const bodies[] = {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0", "[1, 2, 3]", "",
                                         "nul"};
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/bad%zu.json", g_tmpdir, i);
        write_file(path, bodies[i]);
        e.msg[0] = 0;
        ds_tokenizer *t = ds_tokenizer_load_json(path, NULL, &e);
        CHECK_MSG(t == NULL && strstr(e.msg, path), "body %zu: \"%s\"", i, e.msg);
        ds_tokenizer_free(t);
    }
    /* A truncated real file. */
    char *text = NULL;
    size_t len = 0;
    if (ds_file_read_all(TOK_DATA "/llama3_tokenizer.json", 1u << 24, &text, &len, NULL) == 0) {
        text[len / 2] = 0;
        snprintf(path, sizeof path, "%s/truncated.json", g_tmpdir);
        write_file(path, text);
        free(text);
        CHECK(ds_tokenizer_load_json(path, NULL, &e) == NULL && strstr(e.msg, "malformed JSON"));
    }
    /* A malformed config names the config. */
    snprintf(path, sizeof path, "%s/cfg.json", g_tmpdir);
    write_file(path, "{\"add_bos_token\": \"yes\"}");
    CHECK(ds_tokenizer_load_json(TOK_DATA "/gpt2_tokenizer.json", path, &e) == NULL && strstr(e.msg, path));
    write_file(path, "[]");
    CHECK(ds_tokenizer_load_json(TOK_DATA "/gpt2_tokenizer.json", path, &e) == NULL && strstr(e.msg, path));
}

/* byte_fallback=true is accepted when every byte has its own token (it can never fire). */
static void test_trivial_byte_fallback(void) {
    cJSON *j = base_json();
    if (!j) return;
    cJSON_AddItemToObject(at(j, "model"), "byte_fallback", cJSON_CreateTrue());
    char path[512];
    snprintf(path, sizeof path, "%s/bf_ok.json", g_tmpdir);
    char *text = cJSON_PrintUnformatted(j);
    write_file(path, text);
    free(text);
    cJSON_Delete(j);
    ds_err e = {{0}};
    ds_tokenizer *t = ds_tokenizer_load_json(path, NULL, &e);
    CHECK_MSG(t != NULL, "trivial byte_fallback refused: %s", e.msg);
    ds_tokenizer_free(t);
}

/* add_bos_token / add_eos_token in tokenizer_config.json replace the post-processor (transformers). */
static void test_config_override(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/qwen_cfg.json", g_tmpdir);
    write_file(path, "{\"bos_token\": {\"content\": \"<|im_start|>\", \"__type\": \"AddedToken\"},"
                     " \"eos_token\": \"<|im_end|>\", \"add_eos_token\": true, \"chat_template\": "
                     "[{\"name\": \"tool_use\", \"template\": \"x\"}, {\"name\": \"default\", \"template\": \"T\"}]}");
    ds_err e = {{0}};
    ds_tokenizer *t = ds_tokenizer_load_json(TOK_DATA "/qwen2_tokenizer.json", path, &e);
    CHECK_MSG(t != NULL, "%s", e.msg);
    if (!t) return;
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(ds_tokenizer_encode(t, "hi", 2, true, true, &ids, &n) == 0);
    CHECK(n >= 2 && ids[n - 1] == ds_tokenizer_find(t, "<|im_end|>") && ids[0] != ds_tokenizer_find(t, "<|im_start|>"));
    CHECK(ds_tokenizer_chat_template(t) && !strcmp(ds_tokenizer_chat_template(t), "T"));
    free(ids);
    ds_tokenizer_free(t);
    /* Llama-3 without a config: BOS from TemplateProcessing, no eos known beyond EOG names. */
    t = ds_tokenizer_load_json(TOK_DATA "/llama3_tokenizer.json", NULL, &e);
    CHECK(t && ds_tokenizer_bos(t) == ds_tokenizer_find(t, "<|begin_of_text|>") && ds_tokenizer_eos(t) == -1);
    CHECK(t && ds_tokenizer_chat_template(t) == NULL);
    ds_tokenizer_free(t);
}

/* ---- threads and speed ---- */

typedef struct thr_arg {
    const ds_tokenizer *t;
    const cJSON *golden, *corpus;
    const char *name;
    int bad;
} thr_arg;

static void *thr_main(void *p) {
    thr_arg *a = p;
    const cJSON *ids =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(a->golden, a->name), "ids_nobos");
    for (int rep = 0; rep < 20; rep++) {
        int line = 0;
        for (const cJSON *c = a->corpus->child; c; c = c->next, line++) {
            int32_t *got = NULL;
            size_t n = 0, nw;
            int32_t *want = tg_ids(cJSON_GetArrayItem(ids, line), &nw);
            if (ds_tokenizer_encode(a->t, c->valuestring, strlen(c->valuestring), false, true, &got, &n) || n != nw ||
                (n && memcmp(got, want, n * sizeof *got)))
                a->bad++;
            free(got);
            free(want);
        }
    }
    return NULL;
}

static void test_threads(const cJSON *golden, const cJSON *corpus) {
    ds_tokenizer *t = load_family("qwen2", true);
    if (!t) return;
    pthread_t th[4];
    thr_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thr_arg){t, golden, corpus, "qwen2", 0};
        pthread_create(&th[i], NULL, thr_main, &args[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ_INT(args[i].bad, 0);
    }
    ds_tokenizer_free(t);
}

static void test_speed(const cJSON *corpus) {
    for (size_t f = 0; f < 3; f++) {
        ds_tokenizer *t = load_family(k_families[f], true);
        if (!t) continue;
        size_t n_tok;
        double s = tg_time_corpus(t, corpus, 100, &n_tok);
        printf("%s: corpus x100 = %zu tokens in %.3f s (%.1f M tok/s)\n", k_families[f], n_tok, s, n_tok / s / 1e6);
        CHECK_MSG(s < 1.0 * TG_SLOWDOWN, "%s: %.3f s is too slow", k_families[f], s);
        ds_tokenizer_free(t);
    }
}

int main(void) {
    cJSON *corpus = tg_load(TOK_DATA "/corpus.json"), *golden = tg_load(TOK_DATA "/golden_ids.json");
    CHECK(corpus && golden);
    if (!corpus || !golden) return ds_test_result();
    snprintf(g_tmpdir, sizeof g_tmpdir, "/tmp/ds_tok_test_XXXXXX");
    CHECK(mkdtemp(g_tmpdir) != NULL);
    test_goldens(golden, corpus);
    test_lookups();
    test_invalid_utf8();
    test_detok_edges();
    test_random_round_trip();
    test_random_stream();
    test_malformed();
    test_trivial_byte_fallback();
    test_config_override();
    test_threads(golden, corpus);
    test_speed(corpus);
    cJSON_Delete(corpus);
    cJSON_Delete(golden);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_tmpdir);
    return ds_test_result();
}
