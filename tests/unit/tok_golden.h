/* Shared helpers for the tokenizer tests: reading the committed golden files
 * (tests/golden/gen_tokenizer_golden.py) and checking a tokenizer against them. Include after ds_test.h. */
#ifndef DS_TOK_GOLDEN_H
#define DS_TOK_GOLDEN_H

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds/tokenizer.h"

#define TOK_DATA DS_TEST_DATA "/tokenizer"

static inline cJSON *tg_load(const char *path) {
    char *text = NULL;
    size_t len = 0;
    ds_err e = {{0}};
    if (ds_file_read_all(path, 64u << 20, &text, &len, &e)) {
        fprintf(stderr, "cannot read %s: %s\n", path, e.msg);
        return NULL;
    }
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    if (!j) fprintf(stderr, "%s: malformed JSON\n", path);
    return j;
}

/* A JSON array of ints as a malloc'd int32 array (never NULL). */
static inline int32_t *tg_ids(const cJSON *arr, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(arr);
    int32_t *v = malloc((*n + 1) * sizeof *v);
    size_t i = 0;
    for (const cJSON *e = arr ? arr->child : NULL; e; e = e->next) v[i++] = (int32_t)e->valuedouble;
    return v;
}

static inline bool tg_utf8_valid(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t w = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!w || i + w > n || (w == 2 && c < 0xC2)) return false;
        for (size_t k = 1; k < w; k++)
            if ((u[i + k] & 0xC0) != 0x80) return false;
        if (w == 3 && ((c == 0xE0 && u[i + 1] < 0xA0) || (c == 0xED && u[i + 1] > 0x9F))) return false;
        if (w == 4 && ((c == 0xF0 && u[i + 1] < 0x90) || c > 0xF4 || (c == 0xF4 && u[i + 1] > 0x8F))) return false;
        i += w;
    }
    return true;
}

static inline void tg_print_ids(const char *what, const int32_t *v, size_t n) {
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", (int)v[i]);
    fprintf(stderr, n > 64 ? " ...\n" : "\n");
}

static inline bool tg_check_encode(const ds_tokenizer *t, const char *name, size_t line, const char *text, bool add,
                                   bool parse, const cJSON *want_arr) {
    size_t nw, ng = 0;
    int32_t *want = tg_ids(want_arr, &nw), *got = NULL;
    int rc = ds_tokenizer_encode(t, text, strlen(text), add, parse, &got, &ng);
    bool ok = rc == 0 && ng == nw && (nw == 0 || memcmp(got, want, nw * sizeof *got) == 0);
    CHECK_MSG(ok, "%s line %zu (add_special=%d parse_special=%d): ids differ", name, line, add, parse);
    if (!ok) {
        tg_print_ids("want", want, nw);
        tg_print_ids("got ", got, ng);
    }
    free(want);
    free(got);
    return ok;
}

static inline void tg_check_decode(const ds_tokenizer *t, const char *name, size_t line, const cJSON *ids_arr,
                                   bool skip, const char *want) {
    size_t n, len = 0;
    int32_t *ids = tg_ids(ids_arr, &n);
    char *got = NULL;
    int rc = ds_tokenizer_decode(t, ids, n, skip, &got, &len);
    CHECK_MSG(rc == 0 && got && len == strlen(want) && !memcmp(got, want, len),
              "%s line %zu decode(skip_special=%d): got \"%s\" want \"%s\"", name, line, skip, got ? got : "(null)",
              want);
    free(got);
    free(ids);
}

/* Streams ids through ds_detok_push/flush: every chunk must be valid UTF-8 and the concatenation must
 * equal the one-shot decode. */
static inline void tg_check_stream(const ds_tokenizer *t, const char *name, size_t line, const cJSON *ids_arr,
                                   bool skip, const char *want, size_t want_len) {
    size_t n, cap = want_len + 64, o = 0;
    int32_t *ids = tg_ids(ids_arr, &n);
    char *buf = malloc(cap + 1), chunk[4096];
    ds_detok st = {0};
    bool chunks_ok = true;
    for (size_t i = 0; i < n; i++) {
        int k = ds_detok_push(t, &st, ids[i], skip, chunk, sizeof chunk);
        if (k < 0 || !tg_utf8_valid(chunk, (size_t)k) || o + (size_t)k > cap) {
            chunks_ok = false;
            break;
        }
        memcpy(buf + o, chunk, (size_t)k);
        o += (size_t)k;
    }
    int k = ds_detok_flush(&st, chunk, sizeof chunk);
    if (k >= 0 && o + (size_t)k <= cap) {
        memcpy(buf + o, chunk, (size_t)k);
        o += (size_t)k;
    }
    CHECK_MSG(chunks_ok && k >= 0, "%s line %zu: a streamed chunk was invalid UTF-8 or failed", name, line);
    CHECK_MSG(o == want_len && !memcmp(buf, want, o), "%s line %zu: streamed text differs from decode", name, line);
    free(buf);
    free(ids);
}

/* Checks t against golden_ids.json[name] for every corpus line. */
static inline void tg_run_golden(const ds_tokenizer *t, const char *name, const cJSON *golden, const cJSON *corpus) {
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(golden, name);
    CHECK_MSG(g != NULL, "golden_ids.json has no \"%s\"", name);
    if (!g) return;
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(g, "ids"),
                *nobos = cJSON_GetObjectItemCaseSensitive(g, "ids_nobos"),
                *plain = cJSON_GetObjectItemCaseSensitive(g, "ids_plain"),
                *dec = cJSON_GetObjectItemCaseSensitive(g, "decoded"),
                *dskip = cJSON_GetObjectItemCaseSensitive(g, "decoded_skip");
    CHECK_EQ_INT(cJSON_GetArraySize(ids), cJSON_GetArraySize(corpus));
    size_t line = 0;
    for (const cJSON *c = corpus->child; c; c = c->next, line++) {
        const char *text = c->valuestring;
        tg_check_encode(t, name, line, text, true, true, cJSON_GetArrayItem(ids, (int)line));
        tg_check_encode(t, name, line, text, false, true, cJSON_GetArrayItem(nobos, (int)line));
        tg_check_encode(t, name, line, text, false, false, cJSON_GetArrayItem(plain, (int)line));
        const char *want = cJSON_GetArrayItem(dec, (int)line)->valuestring;
        const char *want_skip = cJSON_GetArrayItem(dskip, (int)line)->valuestring;
        tg_check_decode(t, name, line, cJSON_GetArrayItem(ids, (int)line), false, want);
        tg_check_decode(t, name, line, cJSON_GetArrayItem(ids, (int)line), true, want_skip);
        tg_check_stream(t, name, line, cJSON_GetArrayItem(ids, (int)line), false, want, strlen(want));
        tg_check_stream(t, name, line, cJSON_GetArrayItem(ids, (int)line), true, want_skip, strlen(want_skip));
    }
}

/* Encodes the corpus `reps` times; returns seconds. */
static inline double tg_time_corpus(const ds_tokenizer *t, const cJSON *corpus, int reps, size_t *n_tokens) {
    double t0 = ds_time_s();
    *n_tokens = 0;
    for (int r = 0; r < reps; r++) {
        for (const cJSON *c = corpus->child; c; c = c->next) {
            int32_t *ids = NULL;
            size_t n = 0;
            if (ds_tokenizer_encode(t, c->valuestring, strlen(c->valuestring), false, true, &ids, &n) == 0)
                *n_tokens += n;
            free(ids);
        }
    }
    return ds_time_s() - t0;
}

#if defined(__SANITIZE_ADDRESS__)
#define TG_SLOWDOWN 20.0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TG_SLOWDOWN 20.0
#endif
#endif
#ifndef TG_SLOWDOWN
#define TG_SLOWDOWN 1.0
#endif

#endif
