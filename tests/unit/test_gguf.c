/* GGUF reader, dequantisation and GGUF model loading: golden blocks from gguf-py
 * (tests/golden/gen_quant_golden.py), malformed files built here, a tiny synthetic model, and the real
 * SmolLM2 file when present. */
#include "ds/model.h"
#include "test_weights.h"
#include "ds_test.h"
#include "format/gguf.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* ---- a GGUF writer for tests ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

typedef struct {
    buf b;
    uint64_t n;
} kvs;

static void kv_key(kvs *k, const char *key, uint32_t type) {
    put_str(&k->b, key);
    put_u32(&k->b, type);
    k->n++;
}
static void kv_str(kvs *k, const char *key, const char *v) { kv_key(k, key, DS_GGUF_STRING), put_str(&k->b, v); }
static void kv_u32(kvs *k, const char *key, uint32_t v) { kv_key(k, key, DS_GGUF_U32), put_u32(&k->b, v); }
static void kv_f32(kvs *k, const char *key, float v) { kv_key(k, key, DS_GGUF_F32), put(&k->b, &v, 4); }

typedef struct {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    const void *data;
    size_t nbytes;
    int64_t offset; /* -1: next aligned position */
} tdesc;

/* Serialises header + metadata + tensor infos + data (alignment 32). Tensors with offset -1 get the
 * next aligned position and their data written; explicit offsets only go into the header. The data
 * section is zero-padded to at least min_data bytes. */
static buf build_ex(const kvs *k, const tdesc *t, size_t nt, size_t min_data) {
    buf b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, nt);
    put_u64(&b, k ? k->n : 0);
    if (k) put(&b, k->b.p, k->b.n);
    uint64_t off = 0, offs[512];
    for (size_t i = 0; i < nt; i++) {
        offs[i] = t[i].offset >= 0 ? (uint64_t)t[i].offset : off;
        if (t[i].offset < 0) off = (offs[i] + t[i].nbytes + 31) / 32 * 32;
        put_str(&b, t[i].name);
        put_u32(&b, t[i].n_dims);
        for (uint32_t j = 0; j < t[i].n_dims; j++) put_u64(&b, j < 4 ? t[i].ne[j] : 1);
        put_u32(&b, t[i].type);
        put_u64(&b, offs[i]);
    }
    static const uint8_t zero[64];
    put(&b, zero, (32 - b.n % 32) % 32);
    const size_t base = b.n;
    for (size_t i = 0; i < nt; i++) {
        if (t[i].offset >= 0) continue;
        while (b.n < base + offs[i]) put(&b, zero, 1);
        put(&b, t[i].data, t[i].nbytes);
    }
    while (b.n < base + min_data) put(&b, zero, 1);
    return b;
}

static buf build(const kvs *k, const tdesc *t, size_t nt) { return build_ex(k, t, nt, 0); }

/* Opens a private heap copy of exactly n bytes (so ASan sees any over-read). */
static int open_copy(ds_gguf *g, const uint8_t *p, size_t n, ds_err *err, uint8_t **keep) {
    *keep = malloc(n ? n : 1);
    memcpy(*keep, p, n);
    return ds_gguf_open_mem(g, *keep, n, "test.gguf", err);
}

static void expect_fail(const buf *b, int want_rc, const char *needle, const char *what) {
    ds_gguf g;
    ds_err err = {{0}};
    uint8_t *copy;
    int rc = open_copy(&g, b->p, b->n, &err, &copy);
    CHECK_MSG(rc == want_rc, "%s: rc %d (%s), want %d", what, rc, err.msg, want_rc);
    CHECK_MSG(strstr(err.msg, needle) && strstr(err.msg, "test.gguf"), "%s: message '%s' lacks '%s'", what, err.msg,
              needle);
    if (!rc) ds_gguf_close(&g);
    free(copy);
}

/* ---- golden dequantisation ---- */

static cJSON *load_json(const char *path) {
    char *text = NULL;
    ds_err err;
    if (ds_file_read_all(path, 64u << 20, &text, NULL, &err)) return NULL;
    cJSON *j = cJSON_Parse(text);
    free(text);
    return j;
}

static uint8_t *unhex(const char *s, size_t *n) {
    *n = strlen(s) / 2;
    uint8_t *b = malloc(*n);
    for (size_t i = 0; i < *n; i++) sscanf(s + 2 * i, "%2hhx", &b[i]);
    return b;
}

static void test_golden_blocks(void) {
    cJSON *j = load_json(DS_TEST_DATA "/quant/blocks.json");
    CHECK_MSG(j, "tests/data/quant/blocks.json missing: run tests/golden/gen_quant_golden.py");
    if (!j) return;
    int n_cases = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases")) {
        uint32_t type = (uint32_t)cJSON_GetObjectItem(c, "type")->valuedouble;
        size_t n = (size_t)cJSON_GetObjectItem(c, "n")->valuedouble, nb;
        uint8_t *raw = unhex(cJSON_GetObjectItem(c, "hex")->valuestring, &nb);
        float *out = malloc(n * sizeof *out);
        CHECK_EQ_INT(ds_ggml_dequant_row(type, raw, out, n), 0);
        int bad = 0, i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItem(c, "expected")) {
            /* Same fp32 operations in the same order as ggml/gguf-py: bit-exact up to rounding noise. */
            if (fabs(out[i] - e->valuedouble) > 1e-6 * fmax(1.0, fabs(e->valuedouble)) && bad++ < 3)
                fprintf(stderr, "%s[%d]: %.9g vs %.9g\n", ds_ggml_type_name(type), i, out[i], e->valuedouble);
            i++;
        }
        CHECK_MSG(bad == 0 && (size_t)i == n, "%s: %d mismatches", ds_ggml_type_name(type), bad);
        free(raw);
        free(out);
        n_cases++;
    }
    CHECK_EQ_INT(n_cases, 8);
    cJSON_Delete(j);
    float y[256];
    uint8_t z[256] = {0};
    CHECK_EQ_INT(ds_ggml_dequant_row(10 /* Q2_K */, z, y, 256), DS_EUNSUPPORTED);
    CHECK_EQ_INT(ds_ggml_dequant_row(DS_GGML_Q8_0, z, y, 31), DS_EINVAL);
    CHECK_EQ_INT(ds_ggml_dequant_row(999, z, y, 32), DS_EUNSUPPORTED);
    CHECK(!strcmp(ds_ggml_type_name(12), "Q4_K") && !strcmp(ds_ggml_type_name(77), "type#77"));
}

/* ---- metadata ---- */

static void test_metadata(void) {
    kvs k = {0};
    kv_str(&k, "general.architecture", "llama");
    kv_u32(&k, "a.u32", 4000000000u);
    kv_key(&k, "a.i8", DS_GGUF_I8), put(&k.b, &(int8_t){-5}, 1);
    kv_key(&k, "a.f64", DS_GGUF_F64), put(&k.b, &(double){0.25}, 8);
    kv_key(&k, "a.bool", DS_GGUF_BOOL), put(&k.b, &(uint8_t){1}, 1);
    kv_key(&k, "a.strs", DS_GGUF_ARRAY), put_u32(&k.b, DS_GGUF_STRING), put_u64(&k.b, 3);
    put_str(&k.b, "x"), put_str(&k.b, ""), put_str(&k.b, "Ġthe");
    kv_key(&k, "a.ints", DS_GGUF_ARRAY), put_u32(&k.b, DS_GGUF_I16), put_u64(&k.b, 2);
    put(&k.b, &(int16_t){-7}, 2), put(&k.b, &(int16_t){300}, 2);
    buf b = build(&k, NULL, 0);
    ds_gguf g;
    ds_err err = {{0}};
    CHECK_EQ_INT(ds_gguf_open_mem(&g, b.p, b.n, "meta.gguf", &err), 0);
    const char *s = NULL;
    uint32_t u = 0;
    int32_t i = 0;
    float f = 0;
    bool bo = false;
    CHECK(ds_gguf_get_str(&g, "general.architecture", &s, &err) == 0 && !strcmp(s, "llama"));
    CHECK(ds_gguf_get_u32(&g, "a.u32", &u, &err) == 0 && u == 4000000000u);
    CHECK_EQ_INT(ds_gguf_get_i32(&g, "a.u32", &i, &err), DS_EFORMAT); /* does not fit */
    CHECK(ds_gguf_get_i32(&g, "a.i8", &i, &err) == 0 && i == -5);
    CHECK_EQ_INT(ds_gguf_get_u32(&g, "a.i8", &u, &err), DS_EFORMAT); /* negative */
    CHECK(ds_gguf_get_f32(&g, "a.f64", &f, &err) == 0 && f == 0.25f);
    CHECK(ds_gguf_get_bool(&g, "a.bool", &bo, &err) == 0 && bo);
    CHECK_EQ_INT(ds_gguf_get_bool(&g, "a.u32", &bo, &err), DS_EFORMAT);
    CHECK_EQ_INT(ds_gguf_get_u32(&g, "nope", &u, &err), DS_ENOTFOUND);
    CHECK(strstr(err.msg, "nope") != NULL);
    char **strs = NULL;
    size_t n = 0;
    CHECK(ds_gguf_get_str_array(&g, "a.strs", &strs, &n, &err) == 0 && n == 3);
    if (strs) CHECK(!strcmp(strs[0], "x") && !strcmp(strs[1], "") && !strcmp(strs[2], "Ġthe"));
    free(strs);
    int32_t *ints = NULL;
    CHECK(ds_gguf_get_i32_array(&g, "a.ints", &ints, &n, &err) == 0 && n == 2 && ints[0] == -7 && ints[1] == 300);
    free(ints);
    CHECK_EQ_INT(ds_gguf_get_i32_array(&g, "a.strs", &ints, &n, &err), DS_EFORMAT);
    CHECK_EQ_INT(ds_gguf_get_str_array(&g, "a.ints", &strs, &n, &err), DS_EFORMAT);
    CHECK_EQ_INT(g.alignment, 32);
    ds_gguf_close(&g);
    ds_gguf_close(&g); /* idempotent */
    free(b.p);
    free(k.b.p);
}

/* ---- malformed files ---- */

static const float F32_64[64];

static void test_malformed_header(void) {
    kvs k = {0};
    kv_str(&k, "general.architecture", "llama");
    tdesc t1 = {"w", 2, {32, 2}, DS_GGML_F32, F32_64, 256, -1};
    buf good = build(&k, &t1, 1);
    ds_gguf g;
    ds_err err;
    CHECK_EQ_INT(ds_gguf_open_mem(&g, good.p, good.n, "good.gguf", &err), 0);
    ds_gguf_close(&g);

    buf b = {0};
    put(&b, good.p, good.n), memcpy(b.p, "GGUX", 4);
    expect_fail(&b, DS_EFORMAT, "magic", "bad magic");
    b.n = 0, put(&b, "GGUF", 4), put_u32(&b, 3), put_u32(&b, 0);
    expect_fail(&b, DS_EFORMAT, "truncated", "truncated header");
    b.n = 0, put(&b, "GGUF", 4), put_u32(&b, 1), put_u64(&b, 0), put_u64(&b, 0);
    expect_fail(&b, DS_EUNSUPPORTED, "version 1", "version 1");
    /* Every proper prefix of a valid file fails cleanly (heap copies: ASan catches over-reads). */
    int prefix_ok = 0;
    for (size_t n = 0; n < good.n; n++) {
        uint8_t *copy;
        ds_err e2;
        if (open_copy(&g, good.p, n, &e2, &copy) == 0) prefix_ok++, ds_gguf_close(&g);
        free(copy);
    }
    CHECK_EQ_INT(prefix_ok, 0);
    free(b.p);
    free(good.p);
    free(k.b.p);
}

static void test_malformed_metadata(void) {
    tdesc t1 = {"w", 2, {32, 2}, DS_GGML_F32, F32_64, 256, -1};
    buf b = {0};
    kvs h = {0};
    kv_key(&h, "k", DS_GGUF_STRING), put_u64(&h.b, UINT64_MAX / 2);
    b = build(&h, NULL, 0), expect_fail(&b, DS_EFORMAT, "length", "huge string length"), free(b.p);
    h.b.n = 0, h.n = 0;
    kv_key(&h, "tokenizer.ggml.tokens", DS_GGUF_ARRAY), put_u32(&h.b, DS_GGUF_STRING), put_u64(&h.b, 1ull << 60);
    b = build(&h, NULL, 0), expect_fail(&b, DS_EFORMAT, "array count", "huge array count"), free(b.p);
    h.b.n = 0, h.n = 0;
    kv_key(&h, "x", DS_GGUF_ARRAY), put_u32(&h.b, DS_GGUF_U64), put_u64(&h.b, 1ull << 61);
    b = build(&h, NULL, 0), expect_fail(&b, DS_EFORMAT, "array count", "huge u64 array count"), free(b.p);
    h.b.n = 0, h.n = 0;
    kv_key(&h, "x", DS_GGUF_ARRAY), put_u32(&h.b, DS_GGUF_ARRAY), put_u64(&h.b, 0);
    b = build(&h, NULL, 0), expect_fail(&b, DS_EUNSUPPORTED, "nested", "nested array"), free(b.p);
    h.b.n = 0, h.n = 0;
    kv_key(&h, "x", 99), put_u32(&h.b, 0);
    b = build(&h, NULL, 0), expect_fail(&b, DS_EFORMAT, "value type", "bad value type"), free(b.p);
    h.b.n = 0, h.n = 0;
    kv_u32(&h, "x", 1), kv_u32(&h, "x", 2);
    b = build(&h, NULL, 0), expect_fail(&b, DS_EFORMAT, "duplicate", "duplicate key"), free(b.p);
    h.b.n = 0, h.n = 0;
    kv_u32(&h, "general.alignment", 24);
    b = build(&h, &t1, 1), expect_fail(&b, DS_EFORMAT, "alignment", "bad alignment"), free(b.p);
    free(h.b.p);

    /* Giant counts in the header itself. */
    b.p = NULL, b.n = b.cap = 0;
    put(&b, "GGUF", 4), put_u32(&b, 3), put_u64(&b, 1ull << 40), put_u64(&b, 0);
    expect_fail(&b, DS_EFORMAT, "tensor infos", "huge tensor count");
    b.n = 0, put(&b, "GGUF", 4), put_u32(&b, 3), put_u64(&b, 0), put_u64(&b, UINT64_MAX);
    expect_fail(&b, DS_EFORMAT, "metadata entries", "huge kv count");
    free(b.p);
}

static void test_malformed_tensors(void) {
    kvs k = {0};
    kv_str(&k, "general.architecture", "llama");
    tdesc t1 = {"w", 2, {32, 2}, DS_GGML_F32, F32_64, 256, -1};
    buf b;
    ds_gguf g;
    ds_err err;
    tdesc t[2] = {t1, t1};
    t[0].offset = 1024;
    b = build(&k, t, 1), expect_fail(&b, DS_EFORMAT, "past the end", "offset past EOF"), free(b.p);
    b = build(&k, &t1, 1), b.n -= 8, expect_fail(&b, DS_EFORMAT, "past the end", "data cut short"), free(b.p);
    t[0].offset = (int64_t)(UINT64_MAX / 2 - 31); /* offset + size beyond any file */
    b = build(&k, t, 1), expect_fail(&b, DS_EFORMAT, "past the end", "offset overflow"), free(b.p);
    t[0].offset = 4;
    b = build_ex(&k, t, 1, 260), expect_fail(&b, DS_EFORMAT, "not aligned", "misaligned"), free(b.p);
    t[0] = t1, t[1] = t1, t[1].name = "w2", t[1].offset = 224; /* w spans [0, 256) */
    b = build_ex(&k, t, 2, 480), expect_fail(&b, DS_EFORMAT, "overlaps", "overlapping"), free(b.p);
    t[1].name = "w", t[1].offset = -1;
    b = build(&k, t, 2), expect_fail(&b, DS_EFORMAT, "duplicate tensor", "duplicate tensor"), free(b.p);
    t[0] = t1, t[0].type = 200;
    b = build(&k, t, 1), expect_fail(&b, DS_EUNSUPPORTED, "'w' has unknown ggml type 200", "unknown type"), free(b.p);
    t[0] = t1, t[0].n_dims = 5, t[0].ne[2] = t[0].ne[3] = 1;
    b = build(&k, t, 1), expect_fail(&b, DS_EFORMAT, "5 dimensions", "n_dims 5"), free(b.p);
    t[0] = t1, t[0].ne[1] = 0;
    b = build(&k, t, 1), expect_fail(&b, DS_EFORMAT, "invalid shape", "zero dim"), free(b.p);
    t[0] = t1, t[0].ne[0] = 1ull << 62, t[0].ne[1] = 1ull << 62;
    b = build(&k, t, 1), expect_fail(&b, DS_EFORMAT, "invalid shape", "shape overflow"), free(b.p);
    t[0] = t1, t[0].type = DS_GGML_Q8_0, t[0].ne[0] = 33, t[0].nbytes = 34;
    b = build(&k, t, 1), expect_fail(&b, DS_EFORMAT, "block size", "row not a block multiple"), free(b.p);

    /* A known type we cannot dequantise: opens, fails at dequant naming tensor and type. */
    static uint8_t q2k[84];
    t[0] = (tdesc){"blk.0.q2", 1, {256}, 10 /* Q2_K */, q2k, 84, -1};
    b = build(&k, t, 1);
    CHECK_EQ_INT(ds_gguf_open_mem(&g, b.p, b.n, "q2.gguf", &err), 0);
    float out[256];
    CHECK_EQ_INT(ds_gguf_dequant(&g, ds_gguf_find_tensor(&g, "blk.0.q2"), out, 256, &err), DS_EUNSUPPORTED);
    CHECK(strstr(err.msg, "blk.0.q2") && strstr(err.msg, "Q2_K"));
    ds_gguf_close(&g);
    free(b.p);
    free(k.b.p);
}

/* Random byte corruption of a small valid model: every outcome must be clean (run under ASan). */
static void test_corruption_fuzz(void) {
    kvs k = {0};
    kv_str(&k, "general.architecture", "llama");
    kv_key(&k, "tokenizer.ggml.tokens", DS_GGUF_ARRAY), put_u32(&k.b, DS_GGUF_STRING), put_u64(&k.b, 2);
    put_str(&k.b, "a"), put_str(&k.b, "bc");
    kv_u32(&k, "llama.block_count", 1);
    static uint8_t q8[2 * 34];
    tdesc t[2] = {{"a", 2, {32, 2}, DS_GGML_F32, F32_64, 256, -1}, {"b", 2, {32, 2}, DS_GGML_Q8_0, q8, 68, -1}};
    buf good = build(&k, t, 2);
    uint64_t s = 12345;
    int opened = 0;
    for (int it = 0; it < 3000; it++) {
        uint8_t *copy = malloc(good.n);
        memcpy(copy, good.p, good.n);
        for (int f = 0; f < 1 + it % 4; f++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            size_t pos = (size_t)(s >> 33) % good.n;
            copy[pos] = (uint8_t)(s >> 13) ^ (it % 2 ? 0xFF : copy[pos]);
        }
        ds_gguf g;
        ds_err err;
        if (ds_gguf_open_mem(&g, copy, good.n, "fuzz.gguf", &err) == 0) {
            opened++;
            for (size_t i = 0; i < g.n_tensors; i++) {
                const ds_gguf_tensor *ti = &g.tensors[i];
                if (ti->n_elems > 4096) continue;
                float *o = malloc(ti->n_elems * sizeof *o);
                ds_gguf_dequant(&g, ti, o, (size_t)ti->n_elems, &err);
                free(o);
            }
            char **strs;
            size_t n;
            if (!ds_gguf_get_str_array(&g, "tokenizer.ggml.tokens", &strs, &n, &err)) free(strs);
            ds_gguf_close(&g);
        }
        free(copy);
    }
    printf("corruption fuzz: %d/3000 corrupted files still parsed\n", opened);
    free(good.p);
    free(k.b.p);
}

/* ---- a tiny synthetic model: 2 layers, d 64, 4 heads / 2 kv heads of 16, ff 96, vocab 40 ---- */

enum { TL = 2, TD = 64, TH = 4, TKV = 2, THD = 16, TFF = 96, TV = 40 };

/* Deterministic "HF" weight value of tensor id at flat index i (splitmix64 → [-1, 1)). */
static float rnd(uint64_t id, uint64_t i) {
    uint64_t z = id * 0x9E3779B97F4A7C15ull + i + 1;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (float)((double)((z ^ (z >> 31)) >> 11) / 4503599627370496.0 - 1.0);
}

static uint64_t name_id(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
    return h;
}

typedef struct {
    const char *arch;
    bool tied, rope_freqs, f16_v, qkv_bias, out_bias;
    const char *omit, *bad_shape, *omit_key, *tok_model, *tok_pre, *gtype;
} tiny_opts;

typedef struct {
    tdesc t[64];
    char names[64][48];
    void *data[64];
    size_t n;
} tiny_tensors;

/* Adds tensor `name` with torch shape [rows][cols]; GGUF rows of llama q/k are stored permuted
 * (convert_hf_to_gguf: GGUF row h*hd + 2i + j holds HF row h*hd + j*hd/2 + i). */
static void add_tensor(tiny_tensors *tt, const tiny_opts *o, const char *name, int rows, int cols, int perm_heads,
                       uint32_t type) {
    if (o->omit && !strcmp(o->omit, name)) return;
    size_t k = tt->n++;
    snprintf(tt->names[k], sizeof tt->names[k], "%s", name);
    if (o->bad_shape && !strcmp(o->bad_shape, name)) cols *= 2;
    uint64_t id = name_id(name);
    size_t n = (size_t)rows * cols, es = type == DS_GGML_F16 ? 2 : 4;
    uint8_t *d = malloc(type == DS_GGML_Q8_0 ? n / 32 * 34 : n * es);
    const int prow = rows == 1 ? cols : rows; /* a bias vector permutes its elements */
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) {
            int x = rows == 1 ? c : r, hd = perm_heads ? prow / perm_heads : 1, h = x / hd, w = x % hd;
            int src = perm_heads ? h * hd + (w % 2) * (hd / 2) + w / 2 : x;
            float v = rnd(id, rows == 1 ? (uint64_t)src : (uint64_t)src * cols + c);
            if (!strcmp(name, "rope_freqs.weight")) v = 1.0f + fabsf(v); /* divisors are >= 1 */
            size_t i = (size_t)r * cols + c;
            if (type == DS_GGML_F32) memcpy(d + 4 * i, &v, 4);
            else if (type == DS_GGML_F16) { uint16_t hv = ds_f32_to_f16(v); memcpy(d + 2 * i, &hv, 2); }
        }
    }
    if (type == DS_GGML_Q8_0) /* random quants, scale 1/64 */
        for (size_t b = 0; b < n / 32; b++) {
            uint16_t sc = ds_f32_to_f16(1.0f / 64);
            memcpy(d + b * 34, &sc, 2);
            for (int j = 0; j < 32; j++) d[b * 34 + 2 + j] = (uint8_t)(rnd(id, b * 32 + j) * 127);
        }
    tt->data[k] = d;
    tt->t[k] = (tdesc){tt->names[k], rows == 1 ? 1 : 2, {(uint64_t)cols, (uint64_t)rows, 1, 1}, type, d,
                       type == DS_GGML_Q8_0 ? n / 32 * 34 : n * es, -1};
}

static void tiny_kv(kvs *k, const tiny_opts *o) {
    const char *a = o->arch;
    char key[96];
#define AKEY(s) (snprintf(key, sizeof key, "%s.%s", a, s), key)
    kv_str(k, "general.architecture", a);
    if (o->gtype) kv_str(k, "general.type", o->gtype);
    const char *ikeys[] = {"block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                           "attention.head_count_kv", "context_length"};
    const uint32_t ivals[] = {TL, TD, TFF, TH, TKV, 512};
    for (int i = 0; i < 6; i++)
        if (!o->omit_key || strcmp(o->omit_key, ikeys[i])) kv_u32(k, AKEY(ikeys[i]), ivals[i]);
    kv_f32(k, AKEY("rope.freq_base"), 10000.0f);
    kv_f32(k, AKEY("attention.layer_norm_rms_epsilon"), 1e-5f);
    kv_u32(k, AKEY("rope.dimension_count"), THD);
    if (o->tok_model) {
        kv_str(k, "tokenizer.ggml.model", o->tok_model);
        if (o->tok_pre) kv_str(k, "tokenizer.ggml.pre", o->tok_pre);
        kv_key(k, "tokenizer.ggml.tokens", DS_GGUF_ARRAY), put_u32(&k->b, DS_GGUF_STRING), put_u64(&k->b, 2);
        put_str(&k->b, "a"), put_str(&k->b, "b");
        kv_key(k, "tokenizer.ggml.merges", DS_GGUF_ARRAY), put_u32(&k->b, DS_GGUF_STRING), put_u64(&k->b, 0);
    }
#undef AKEY
}

/* Writes the tiny model to a temp file; returns its path (static buffer). */
static const char *write_tiny(const tiny_opts *o) {
    static char path[64];
    tiny_tensors tt = {.n = 0};
    const bool llama = strcmp(o->arch, "qwen2") != 0, bias = !llama || o->qkv_bias;
    const int q = TH * THD, kvd = TKV * THD;
    if (o->rope_freqs) add_tensor(&tt, o, "rope_freqs.weight", 1, THD / 2, 0, DS_GGML_F32);
    add_tensor(&tt, o, "token_embd.weight", TV, TD, 0, DS_GGML_Q8_0);
    for (int l = 0; l < TL; l++) {
        char n[64];
#define T(s, r, c, p, ty) (snprintf(n, sizeof n, "blk.%d.%s", l, s), add_tensor(&tt, o, n, r, c, p, ty))
        T("attn_norm.weight", 1, TD, 0, DS_GGML_F32);
        T("attn_q.weight", q, TD, llama ? TH : 0, DS_GGML_F32);
        T("attn_k.weight", kvd, TD, llama ? TKV : 0, DS_GGML_F32);
        T("attn_v.weight", kvd, TD, 0, o->f16_v ? DS_GGML_F16 : DS_GGML_F32);
        T("attn_output.weight", TD, q, 0, DS_GGML_F32);
        if (bias) T("attn_q.bias", 1, q, llama ? TH : 0, DS_GGML_F32);
        if (bias) T("attn_k.bias", 1, kvd, llama ? TKV : 0, DS_GGML_F32);
        if (bias) T("attn_v.bias", 1, kvd, 0, DS_GGML_F32);
        if (o->out_bias) T("attn_output.bias", 1, TD, 0, DS_GGML_F32);
        T("ffn_norm.weight", 1, TD, 0, DS_GGML_F32);
        T("ffn_gate.weight", TFF, TD, 0, DS_GGML_F32);
        T("ffn_up.weight", TFF, TD, 0, DS_GGML_F32);
        T("ffn_down.weight", TD, TFF, 0, DS_GGML_F32);
#undef T
    }
    add_tensor(&tt, o, "output_norm.weight", 1, TD, 0, DS_GGML_F32);
    if (!o->tied) add_tensor(&tt, o, "output.weight", TV, TD, 0, DS_GGML_F32);
    kvs k = {0};
    tiny_kv(&k, o);
    buf b = build(&k, tt.t, tt.n);
    snprintf(path, sizeof path, "/tmp/ds_test_gguf_XXXXXX");
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, b.p, b.n) == (ssize_t)b.n);
    close(fd);
    for (size_t i = 0; i < tt.n; i++) free(tt.data[i]);
    free(b.p);
    free(k.b.p);
    return path;
}

/* Max |w - HF reference| for a [rows][cols] weight (the reference is rnd(name, row*cols+col)). */
static double ref_diff(const float *w, const char *name, int rows, int cols, bool f16) {
    double mx = 0;
    uint64_t id = name_id(name);
    for (int i = 0; i < rows * cols; i++) {
        float want = rnd(id, (uint64_t)i);
        if (f16) want = ds_f16_to_f32(ds_f32_to_f16(want));
        double d = fabs((double)w[i] - want);
        if (!(d <= mx)) mx = d;
    }
    return mx;
}

/* Writes the tiny model, loads it with p (NULL: quiet defaults) through the dispatcher (GGUF magic). */
static ds_model *load_tiny_with(const tiny_opts *o, const ds_model_params *p, ds_err *err) {
    const char *path = write_tiny(o);
    ds_model_params def = ds_model_default_params();
    def.verbose = false;
    ds_model *m = ds_model_load(path, p ? p : &def, err);
    unlink(path);
    return m;
}

static ds_model *load_tiny(const tiny_opts *o, ds_err *err) { return load_tiny_with(o, NULL, err); }

static void check_tiny_weights(const ds_model *m, bool bias, bool f16_v) {
    const int q = TH * THD, kvd = TKV * THD;
    for (int l = 0; l < TL; l++) {
        const ds_layer_weights *w = &m->layers[l];
        char n[64];
#define D(field, s, r, c, f16) (snprintf(n, sizeof n, "blk.%d.%s", l, s), ref_diff(TW(w->field), n, r, c, f16))
#define DV(field, s, r, c, f16) (snprintf(n, sizeof n, "blk.%d.%s", l, s), ref_diff(w->field, n, r, c, f16))
        CHECK_MSG(D(wq, "attn_q.weight", q, TD, false) == 0, "layer %d wq (unpermute)", l);
        CHECK_MSG(D(wk, "attn_k.weight", kvd, TD, false) == 0, "layer %d wk (unpermute)", l);
        CHECK_MSG(D(wv, "attn_v.weight", kvd, TD, f16_v) == 0, "layer %d wv", l);
        CHECK(D(wo, "attn_output.weight", TD, q, false) == 0);
        CHECK(DV(attn_norm, "attn_norm.weight", 1, TD, false) == 0);
        CHECK(DV(ffn_norm, "ffn_norm.weight", 1, TD, false) == 0);
        CHECK(D(w_gate, "ffn_gate.weight", TFF, TD, false) == 0);
        CHECK(D(w_up, "ffn_up.weight", TFF, TD, false) == 0);
        CHECK(D(w_down, "ffn_down.weight", TD, TFF, false) == 0);
        if (bias) {
            CHECK_MSG(DV(bq, "attn_q.bias", 1, q, false) == 0, "layer %d bq", l);
            CHECK(DV(bk, "attn_k.bias", 1, kvd, false) == 0);
            CHECK(DV(bv, "attn_v.bias", 1, kvd, false) == 0);
        }
#undef D
#undef DV
    }
    CHECK(ref_diff(m->output_norm, "output_norm.weight", 1, TD, false) == 0);
    /* token_embd is Q8_0 with random quants, scale 1/64: row r = q/64. */
    uint64_t id = name_id("token_embd.weight");
    int bad = 0;
    for (int i = 0; i < TV * TD; i++) bad += TW(m->tok_embd)[i] != (float)(int8_t)(uint8_t)(rnd(id, i) * 127) / 64;
    CHECK_EQ_INT(bad, 0);
}

static void test_tiny_model(void) {
    ds_err err = {{0}};
    tiny_opts o = {.arch = "llama", .rope_freqs = true, .f16_v = true};
    ds_model *m = load_tiny(&o, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        const ds_model_config *c = &m->cfg;
        CHECK(c->arch == DS_ARCH_LLAMA && c->n_layer == TL && c->d_model == TD && c->n_head == TH);
        CHECK(c->n_kv_head == TKV && c->head_dim == THD && c->d_ff == TFF && c->n_vocab == TV && c->max_ctx == 512);
        CHECK(!c->tied_embeddings && m->output.data != m->tok_embd.data && !c->qkv_bias);
        CHECK_NEAR(c->rms_eps, 1e-5, 1e-12);
        CHECK(m->tok == NULL && m->chat_template == NULL);
        check_tiny_weights(m, false, true);
        CHECK(ref_diff(TW(m->output), "output.weight", TV, TD, false) == 0);
        /* llama3-style divisors: inv_freq = theta^(-2i/d) / rope_freqs[i]. */
        uint64_t id = name_id("rope_freqs.weight");
        for (int i = 0; i < THD / 2; i++)
            CHECK_NEAR(m->inv_freq[i], (1.0 / pow(10000.0, 2.0 * i / THD)) / (1.0f + fabsf(rnd(id, i))), 1e-6);
    }
    ds_model_free(m);

    o = (tiny_opts){.arch = "qwen2", .tied = true};
    m = load_tiny(&o, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        CHECK(m->cfg.arch == DS_ARCH_QWEN2 && m->cfg.qkv_bias && m->cfg.tied_embeddings && m->output.data == m->tok_embd.data);
        check_tiny_weights(m, true, false); /* qwen2: no Q/K permutation */
        CHECK_NEAR(m->inv_freq[1], 1.0 / pow(10000.0, 2.0 / THD), 1e-7);
    }
    ds_model_free(m);

    /* --quantize q4_k at load: rows of TD (not a multiple of 256) fall back to Q8_0; values within
     * about half a Q8_0 step of the fp32 source (|w| < 1: step ≤ 1/127; the f16 scale adds a bit). */
    o = (tiny_opts){.arch = "llama"};
    ds_model_params qp = ds_model_default_params();
    qp.verbose = false;
    qp.quantize = DS_DTYPE_Q4_K;
    m = load_tiny_with(&o, &qp, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        CHECK_EQ_INT(m->layers[0].wq.dtype, TD % 256 ? DS_DTYPE_Q8_0 : DS_DTYPE_Q4_K);
        CHECK_EQ_INT(m->layers[0].wq.row_bytes, ds_dtype_row_bytes(m->layers[0].wq.dtype, TD));
        CHECK(m->weight_bytes[DS_DTYPE_F32] > 0 && m->weight_bytes[m->layers[0].wq.dtype] > 0);
        const int l = 1;
        char n[64];
        snprintf(n, sizeof n, "blk.%d.attn_v.weight", l);
        double d = ref_diff(TW(m->layers[l].wv), n, TKV * THD, TD, false);
        CHECK_MSG(d > 0 && d <= 0.6 / 127, "quantised wv max |diff| %g", d);
    }
    ds_model_free(m);

    /* An architecture deltaserve cannot run still gives its tokenizer (deltaserve tokenize). */
    o = (tiny_opts){.arch = "gemma2"};
    m = load_tiny(&o, &err);
    CHECK_MSG(!m && strstr(err.msg, "gemma2"), "gemma2 with weights: %s", m ? "loaded" : err.msg);
    ds_model_free(m);
    /* A gemma3 file without its q/k and post norms is refused by name, not run without them. */
    o = (tiny_opts){.arch = "gemma3"};
    m = load_tiny(&o, &err);
    CHECK_MSG(!m && strstr(err.msg, "attn_q_norm"), "gemma3 without q_norm: %s", m ? "loaded" : err.msg);
    ds_model_free(m);
    /* A qwen3 file without its per-head q/k norms is refused by name, not run without them. */
    o = (tiny_opts){.arch = "qwen3"};
    m = load_tiny(&o, &err);
    CHECK_MSG(!m && strstr(err.msg, "attn_q_norm"), "qwen3 without q_norm: %s", m ? "loaded" : err.msg);
    ds_model_free(m);
    o = (tiny_opts){.arch = "gemma2"};
    ds_model_params tp = ds_model_default_params();
    tp.verbose = false;
    tp.load_weights = false;
    m = load_tiny_with(&o, &tp, &err);
    CHECK_MSG(m && !m->weights_loaded && !m->layers, "gemma2 tokenizer only: %s", m ? "ok" : err.msg);
    ds_model_free(m);

    o = (tiny_opts){.arch = "llama", .qkv_bias = true}; /* llama q/k biases are permuted too */
    m = load_tiny(&o, &err);
    CHECK_MSG(m, "%s", err.msg);
    CHECK(m && m->cfg.qkv_bias);
    if (m) check_tiny_weights(m, true, false);
    ds_model_free(m);
}

static void expect_model_fail(tiny_opts o, int want, const char *needle) {
    ds_err err = {{0}};
    ds_model *m = load_tiny(&o, &err);
    int got = m ? 0 : 1;
    CHECK_MSG(!m && strstr(err.msg, needle) && strstr(err.msg, "/tmp/ds_test_gguf_"), "want failure with '%s', got '%s'",
              needle, err.msg);
    (void)want;
    (void)got;
    ds_model_free(m);
}

static void test_model_errors(void) {
    expect_model_fail((tiny_opts){.arch = "llama", .omit = "blk.1.ffn_up.weight"}, DS_EFORMAT,
                      "missing tensor 'blk.1.ffn_up.weight'");
    expect_model_fail((tiny_opts){.arch = "llama", .omit = "output_norm.weight"}, DS_EFORMAT, "output_norm.weight");
    expect_model_fail((tiny_opts){.arch = "qwen2", .omit = "blk.0.attn_k.bias"}, DS_EFORMAT, "blk.0.attn_k.bias");
    expect_model_fail((tiny_opts){.arch = "llama", .bad_shape = "blk.0.ffn_gate.weight"}, DS_EFORMAT,
                      "'blk.0.ffn_gate.weight' has ne");
    expect_model_fail((tiny_opts){.arch = "llama", .omit_key = "block_count"}, DS_EFORMAT, "llama.block_count");
    expect_model_fail((tiny_opts){.arch = "gpt2"}, DS_EUNSUPPORTED, "architecture 'gpt2'");
    expect_model_fail((tiny_opts){.arch = "llama", .gtype = "adapter"}, DS_EINVAL, "adapter");
    expect_model_fail((tiny_opts){.arch = "llama", .out_bias = true}, DS_EUNSUPPORTED, "attn_output.bias");
    /* SentencePiece ("llama") is read, and needs its scores */
    expect_model_fail((tiny_opts){.arch = "llama", .tok_model = "llama"}, DS_EFORMAT, "tokenizer.ggml.scores is missing");
    expect_model_fail((tiny_opts){.arch = "llama", .tok_model = "bert"}, DS_EUNSUPPORTED, "tokenizer model 'bert'");
    expect_model_fail((tiny_opts){.arch = "llama", .tok_model = "gpt2", .tok_pre = "klingon"}, DS_EUNSUPPORTED,
                      "'klingon'");
    /* Truncated model file. */
    tiny_opts o = {.arch = "llama"};
    const char *path = write_tiny(&o);
    CHECK(truncate(path, 4000) == 0);
    ds_err err = {{0}};
    ds_model *m = ds_model_load_gguf(path, NULL, &err);
    CHECK_MSG(!m && strstr(err.msg, path), "truncated: %s", err.msg);
    ds_model_free(m);
    unlink(path);
    CHECK(!ds_model_load("/nonexistent/model.gguf", NULL, &err) && strstr(err.msg, "/nonexistent/model.gguf"));
}

/* ---- the real SmolLM2 file, when present ---- */

static void check_rows(const cJSON *rows, const ds_gguf *g, const ds_model *m) {
    const cJSON *r;
    int n_rows = 0;
    cJSON_ArrayForEach(r, rows) {
        const char *name = cJSON_GetObjectItem(r, "tensor")->valuestring;
        int row = (int)cJSON_GetObjectItem(r, "row")->valuedouble, ne0 = (int)cJSON_GetObjectItem(r, "ne0")->valuedouble;
        const ds_gguf_tensor *t = ds_gguf_find_tensor(g, name);
        CHECK_MSG(t != NULL, "%s", name);
        if (!t) continue;
        float *raw = malloc((size_t)ne0 * sizeof *raw);
        ds_err err;
        CHECK_EQ_INT(ds_gguf_dequant_rows(g, t, (uint64_t)row, 1, raw, &err), 0);
        const float *hf = NULL; /* the same row in the loaded model (HF orientation) */
        if (!strcmp(name, "token_embd.weight")) hf = TW(m->tok_embd);
        else if (!strcmp(name, "blk.0.attn_q.weight")) hf = TW(m->layers[0].wq);
        else if (!strcmp(name, "blk.0.attn_k.weight")) hf = TW(m->layers[0].wk);
        else if (!strcmp(name, "blk.5.ffn_down.weight")) hf = TW(m->layers[5].w_down);
        else if (!strcmp(name, "output_norm.weight")) hf = m->output_norm;
        else if (!strcmp(name, "blk.29.attn_norm.weight")) hf = m->layers[29].attn_norm;
        int i = 0, bad_raw = 0, bad_hf = 0;
        const cJSON *v;
        cJSON_ArrayForEach(v, cJSON_GetObjectItem(r, "gguf")) bad_raw += raw[i++] != (float)v->valuedouble;
        i = 0;
        cJSON_ArrayForEach(v, cJSON_GetObjectItem(r, "hf")) bad_hf += !hf || hf[(size_t)row * ne0 + i++] != (float)v->valuedouble;
        CHECK_MSG(bad_raw == 0 && bad_hf == 0, "%s row %d: %d raw / %d model mismatches", name, row, bad_raw, bad_hf);
        free(raw);
        n_rows++;
    }
    CHECK_EQ_INT(n_rows, 16);
}

static void test_smollm2(void) {
    const char *path = DS_MODELS_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (access(path, R_OK) != 0) {
        printf("SKIP (part): %s absent; scripts/fetch_model.sh fetches it\n", path);
        return;
    }
    cJSON *j = load_json(DS_TEST_DATA "/quant/smollm2_rows.json");
    CHECK_MSG(j, "tests/data/quant/smollm2_rows.json missing: run tests/golden/gen_quant_golden.py");
    ds_gguf g;
    ds_err err = {{0}};
    CHECK_EQ_INT(ds_gguf_open(&g, path, &err), 0);
    ds_model_params p = ds_model_default_params();
    double t0 = ds_time_s();
    ds_model *m = ds_model_load_gguf(path, &p, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        const ds_model_config *c = &m->cfg;
        printf("SmolLM2 loaded in %.2f s\n", ds_time_s() - t0);
        CHECK(c->n_layer == 30 && c->d_model == 576 && c->n_head == 9 && c->n_kv_head == 3 && c->n_vocab == 49152);
        CHECK(c->tied_embeddings && m->output.data == m->tok_embd.data && c->head_dim == 64 && c->d_ff == 1536);
        CHECK(c->max_ctx == 8192 && c->rope_theta == 100000.0f && !strcmp(c->arch_name, "llama"));
        CHECK(m->chat_template && strstr(m->chat_template, "<|im_start|>"));
        CHECK(m->tok != NULL && ds_tokenizer_n_vocab(m->tok) == 49152);
        if (m->tok) CHECK(ds_tokenizer_eos(m->tok) == 2 && ds_tokenizer_bos(m->tok) == 1);
        CHECK_EQ_INT(m->n_params, 134515008);
        size_t bytes = 0;
        for (int t = 0; t < DS_DTYPE_COUNT; t++) bytes += m->weight_bytes[t];
        /* typed weights: no fp32 copy (the file is 92 MiB; fp32 would be 513 MiB) */
        CHECK_MSG(bytes <= g.size && bytes > g.size / 2, "weights in memory %zu B, file %zu B", bytes, g.size);
        CHECK(m->weight_bytes[DS_DTYPE_Q4_1] > 0 && m->layers[0].w_up.dtype == DS_DTYPE_Q4_1);
    }
    { /* tokenizer only (deltaserve tokenize): no weights */
        ds_model_params tp = ds_model_default_params();
        tp.load_weights = false;
        tp.verbose = false;
        ds_model *t = ds_model_load_gguf(path, &tp, &err);
        CHECK_MSG(t && t->tok && !t->layers && !t->tok_embd.data && !t->weights_loaded, "%s", err.msg);
        for (int i = 0; t && i < DS_DTYPE_COUNT; i++) CHECK(t->weight_bytes[i] == 0);
        ds_model_free(t);
    }
    if (j && m) {
        double size = cJSON_GetObjectItem(j, "size")->valuedouble;
        if ((double)g.size != size)
            printf("SKIP (part): %s differs from the file smollm2_rows.json was generated from\n", path);
        else
            check_rows(cJSON_GetObjectItem(j, "rows"), &g, m);
    }
    ds_model_free(m);
    ds_gguf_close(&g);
    cJSON_Delete(j);
}

int main(void) {
    ds_log_set_level(DS_LOG_WARN);
    test_golden_blocks();
    test_metadata();
    test_malformed_header();
    test_malformed_metadata();
    test_malformed_tensors();
    test_corruption_fuzz();
    test_tiny_model();
    test_model_errors();
    test_smollm2();
    return ds_test_result();
}
