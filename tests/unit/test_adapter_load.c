/* Adapter loaders: every golden PEFT / GGUF adapter under tests/data/adapters/<model>/ loads with the
 * right kind, ranks, scales, sides and shapes; every tests/data/adapters/bad/ case is refused with
 * its keyword; fixtures written here (temp dirs) cover the rest: dtypes, key spellings, refusals by
 * name, malformed files, and GGUF LoRA un-permutation.
 *
 * DS_TEST_ADAPTER_DIR overrides the golden adapter root (default DS_TEST_DATA/adapters). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds/adapter.h"
#include "ds/model.h"
#include "test_weights.h"
#include "ds_test.h"
#include "format/safetensors.h"

static ds_model *g_llama, *g_qwen;
static char g_tmp[256];
static char g_adir[512];

/* ---- fixtures: safetensors / GGUF writers ---- */

typedef struct fx {
    const char *name, *dtype;
    int nd;
    int64_t shape[3];
    const float *data;
} fx;

static size_t fx_elems(const fx *t) {
    size_t n = 1;
    for (int i = 0; i < t->nd; i++) n *= (size_t)t->shape[i];
    return n;
}

static size_t fx_esize(const char *dt) { return !strcmp(dt, "F16") || !strcmp(dt, "BF16") ? 2 : 4; }

static void put_elem(uint8_t *p, const char *dt, float v) {
    if (!strcmp(dt, "F32")) memcpy(p, &v, 4);
    else if (!strcmp(dt, "I32")) {
        int32_t i = (int32_t)v;
        memcpy(p, &i, 4);
    } else {
        uint16_t h = !strcmp(dt, "F16") ? ds_f32_to_f16(v) : ds_f32_to_bf16(v);
        p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8);
    }
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

static void write_st(const char *path, const fx *ts, int n) {
    char *hdr = calloc(1, 65536);
    size_t off = 0, hl = (size_t)sprintf(hdr, "{");
    for (int i = 0; i < n; i++) {
        size_t nb = fx_elems(&ts[i]) * fx_esize(ts[i].dtype);
        hl += (size_t)sprintf(hdr + hl, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "", ts[i].name, ts[i].dtype);
        for (int d = 0; d < ts[i].nd; d++) hl += (size_t)sprintf(hdr + hl, "%s%lld", d ? "," : "", (long long)ts[i].shape[d]);
        hl += (size_t)sprintf(hdr + hl, "],\"data_offsets\":[%zu,%zu]}", off, off + nb);
        off += nb;
    }
    hl += (size_t)sprintf(hdr + hl, "}");
    while (hl % 8) hdr[hl++] = ' ';
    uint8_t *buf = calloc(1, 8 + hl + off + 1);
    uint64_t h64 = hl;
    memcpy(buf, &h64, 8);
    memcpy(buf + 8, hdr, hl);
    uint8_t *p = buf + 8 + hl;
    for (int i = 0; i < n; i++)
        for (size_t k = 0; k < fx_elems(&ts[i]); k++, p += fx_esize(ts[i].dtype)) put_elem(p, ts[i].dtype, ts[i].data[k]);
    write_bytes(path, buf, 8 + hl + off);
    free(buf);
    free(hdr);
}

/* g_tmp/<name>/ with adapter_config.json and adapter_model.safetensors; returns the dir. */
static const char *mkfixture(const char *name, const char *config, const fx *ts, int n) {
    static char dir[512];
    char p[600];
    snprintf(dir, sizeof dir, "%s/%s", g_tmp, name);
    mkdir(dir, 0700);
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    write_bytes(p, config, strlen(config));
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    write_st(p, ts, n);
    return dir;
}

/* Minimal GGUF v3 LoRA writer: string KVs, an optional f32 alpha, F32 tensors (torch shapes). */
typedef struct gbuf {
    uint8_t *p;
    size_t n;
} gbuf;
static void gput(gbuf *b, const void *d, size_t n) {
    b->p = realloc(b->p, b->n + n);
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void gu32(gbuf *b, uint32_t v) { gput(b, &v, 4); }
static void gu64(gbuf *b, uint64_t v) { gput(b, &v, 8); }
static void gstr(gbuf *b, const char *s) {
    gu64(b, strlen(s));
    gput(b, s, strlen(s));
}

static void write_gguf(const char *path, const char *arch, const char *type, const float *alpha, const fx *ts, int n) {
    gbuf b = {0};
    gput(&b, "GGUF", 4);
    gu32(&b, 3);
    gu64(&b, (uint64_t)n);
    gu64(&b, alpha ? 4 : 3);
    const char *kv[3][2] = {{"general.architecture", arch}, {"general.type", type}, {"adapter.type", "lora"}};
    for (int i = 0; i < 3; i++) gstr(&b, kv[i][0]), gu32(&b, 8), gstr(&b, kv[i][1]);
    if (alpha) gstr(&b, "adapter.lora.alpha"), gu32(&b, 6), gput(&b, alpha, 4);
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        gstr(&b, ts[i].name);
        gu32(&b, (uint32_t)ts[i].nd);
        for (int d = ts[i].nd - 1; d >= 0; d--) gu64(&b, (uint64_t)ts[i].shape[d]); /* ne = reversed */
        gu32(&b, 0);
        gu64(&b, off);
        off += (fx_elems(&ts[i]) * 4 + 31) / 32 * 32;
    }
    static const uint8_t zero[32];
    gput(&b, zero, (32 - b.n % 32) % 32);
    for (int i = 0; i < n; i++) {
        size_t nb = fx_elems(&ts[i]) * 4;
        gput(&b, ts[i].data, nb);
        gput(&b, zero, (32 - nb % 32) % 32);
    }
    write_bytes(path, b.p, b.n);
    free(b.p);
}

/* ---- helpers ---- */

static bool contains_ci(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (!strncasecmp(hay, needle, n)) return true;
    return false;
}

static ds_adapter *load(const char *path, const ds_model *m, float user_scale, ds_err *err) {
    ds_adapter_load_params lp = ds_adapter_default_load_params();
    lp.user_scale = user_scale;
    memset(err, 0, sizeof *err);
    return ds_adapter_load(path, m, &lp, err);
}

static ds_adapter *load_ok(const char *path, const ds_model *m) {
    ds_err err;
    ds_adapter *a = load(path, m, 1.0f, &err);
    CHECK_MSG(a != NULL, "%s: %s", path, err.msg);
    return a;
}

/* Refused, and the message names `kw` (any of the '|'-separated words, case-insensitive). */
static void expect_refused(const char *path, const ds_model *m, const char *kws) {
    ds_err err;
    ds_adapter *a = load(path, m, 1.0f, &err);
    CHECK_MSG(a == NULL, "%s: loaded but should be refused (%s)", path, kws);
    ds_adapter_free(a);
    char buf[256];
    snprintf(buf, sizeof buf, "%s", kws);
    bool hit = false;
    for (char *save, *w = strtok_r(buf, "|", &save); w && !hit; w = strtok_r(NULL, "|", &save))
        hit = contains_ci(err.msg, w);
    CHECK_MSG(hit, "%s: message \"%s\" lacks any of \"%s\"", path, err.msg, kws);
}

static size_t n_modules(const ds_adapter *a) {
    size_t n = 0;
    for (int i = 0; a->lora && i < a->n_layer * DS_PROJ_COUNT; i++) n += a->lora[i] != NULL;
    return n;
}

/* ---- golden adapters ---- */

/* Reads tensor `name` of the adapter's safetensors (NULL when absent); *n gets the element count. */
static float *file_tensor(const char *dir, const char *name, size_t *n, int64_t *rows) {
    char p[600];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    ds_st_file f;
    ds_err err;
    if (ds_st_open(&f, p, &err)) return NULL;
    const ds_st_tensor *t = ds_st_find(&f, name);
    float *out = NULL;
    if (t) {
        *n = t->n_elems;
        if (rows) *rows = t->shape[0];
        out = malloc(*n * sizeof *out + 1);
        if (ds_st_read_f32(t, p, NULL, 0, out, *n, &err)) free(out), out = NULL;
    }
    ds_st_close(&f);
    return out;
}

static bool same(const float *a, const float *b, size_t n) { return a && b && !memcmp(a, b, n * sizeof *a); }

typedef double (*scale_fn)(int layer, int proj, int rank);

/* Every module equals the file's tensors (AdaLoRA: A ⊙ E), with the expected scale; the module count
 * equals the number of (non-pruned) lora_A tensors. */
static void check_lora_vs_file(const char *dir, const ds_adapter *a, bool adalora, scale_fn want) {
    size_t n_file = 0;
    const char *w = adalora ? "" : ".weight";
    for (int l = 0; l < a->n_layer; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++) {
            char key[200];
            const char *blk = p <= DS_PROJ_O ? "self_attn" : "mlp";
            size_t na = 0, nb = 0, ne = 0;
            int64_t r = 0;
            snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.%s.lora_A%s", l, blk, ds_proj_name(p), w);
            float *A = file_tensor(dir, key, &na, &r);
            const ds_lora_module *m = a->lora[l * DS_PROJ_COUNT + p];
            if (!A || r == 0) {
                CHECK_MSG(!m, "%s: L%d %s should not be adapted", dir, l, ds_proj_name(p));
                free(A);
                continue;
            }
            n_file++;
            key[strlen(key) - strlen(w) - 1] = 'B';
            float *B = file_tensor(dir, key, &nb, NULL);
            if (adalora) {
                key[strlen(key) - 1] = 'E';
                float *E = file_tensor(dir, key, &ne, NULL);
                for (size_t i = 0; E && i < na; i++) A[i] *= E[i / (na / (size_t)r)];
                free(E);
            }
            CHECK_MSG(m != NULL, "%s: L%d %s missing", dir, l, ds_proj_name(p));
            if (m) {
                CHECK_EQ_INT(m->rank, r);
                CHECK_MSG(same(m->A, A, na) && same(m->B, B, nb), "%s L%d %s: A/B differ", dir, l, ds_proj_name(p));
                CHECK_NEAR(m->scale, want(l, p, (int)r), 1e-6 * fabs(want(l, p, (int)r)));
            }
            free(A);
            free(B);
        }
    CHECK_EQ_INT(n_modules(a), n_file);
}

static double s_lora(int l, int p, int r) { return 8.0 / r; }
static double s_ada(int l, int p, int r) { return 8.0 / (6 + 1e-5); }
/* lora-all (gen_adapters.py): r 4, alpha 8, rsLoRA; rank_pattern k_proj → 6, layer-1 o_proj → 2;
 * alpha_pattern "down_proj" → 3 (first match, so the later layer-1 key is dead), layer-0 up → 5. */
static double s_all(int l, int p, int r) {
    double alpha = p == DS_PROJ_DOWN ? 3 : (p == DS_PROJ_UP && l == 0) ? 5 : 8;
    return alpha / sqrt((double)r);
}

/* DoRA: dora_scale[o] = m[o] / ||W[o,:] + s·(B·A)[o,:]||, computed here independently. */
static void check_dora(const char *dir, const ds_model *base, const ds_adapter *a) {
    for (int l = 0; l < a->n_layer; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++) {
            const ds_lora_module *m = a->lora[l * DS_PROJ_COUNT + p];
            if (!m) continue;
            char key[200];
            size_t n;
            snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.%s.lora_magnitude_vector", l,
                     p <= DS_PROJ_O ? "self_attn" : "mlp", ds_proj_name(p));
            float *mag = file_tensor(dir, key, &n, NULL);
            const ds_layer_weights *lw = &base->layers[l];
            const float *W[] = {TW(lw->wq), TW(lw->wk), TW(lw->wv), TW(lw->wo), TW(lw->w_gate), TW(lw->w_up), TW(lw->w_down)};
            CHECK(mag && m->dora_scale && n == (size_t)m->out);
            for (int o = 0; mag && m->dora_scale && o < m->out; o++) {
                double s2 = 0;
                for (int i = 0; i < m->in; i++) {
                    double v = W[p][(size_t)o * m->in + i];
                    for (int k = 0; k < m->rank; k++) v += m->scale * m->B[o * m->rank + k] * m->A[k * m->in + i];
                    s2 += v * v;
                }
                CHECK_NEAR(m->dora_scale[o], mag[o] / sqrt(s2), 1e-5 * fabs(mag[o] / sqrt(s2)));
            }
            free(mag);
        }
}

static void check_ia3(const char *dir, const ds_adapter *a, int attn_proj) {
    CHECK_EQ_INT(a->kind, DS_ADAPTER_IA3);
    CHECK(!a->ia3_is_input[attn_proj] && !a->ia3_is_input[DS_PROJ_V] && a->ia3_is_input[DS_PROJ_DOWN]);
    for (int l = 0; l < a->n_layer; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++) {
            const float *v = a->ia3[l * DS_PROJ_COUNT + p];
            bool want = p == attn_proj || p == DS_PROJ_V || p == DS_PROJ_DOWN;
            CHECK_MSG((v != NULL) == want, "%s: ia3 L%d %s", dir, l, ds_proj_name(p));
            char key[200];
            size_t n = 0;
            snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.%s.ia3_l", l,
                     p <= DS_PROJ_O ? "self_attn" : "mlp", ds_proj_name(p));
            float *f = want ? file_tensor(dir, key, &n, NULL) : NULL;
            if (want) CHECK(same(v, f, n));
            free(f);
        }
}

static void check_prompt(const char *dir, const ds_adapter *a, int kind, int nv, int width) {
    size_t n = 0;
    float *f = file_tensor(dir, "prompt_embeddings", &n, NULL);
    CHECK_EQ_INT(a->kind, kind);
    CHECK_EQ_INT(a->n_virtual, nv);
    CHECK_EQ_INT(n, (size_t)nv * width);
    CHECK(same(kind == DS_ADAPTER_PREFIX ? a->prefix : a->prompt, f, n));
    if (kind == DS_ADAPTER_PREFIX) CHECK_EQ_INT(a->prefix_row, 32); /* head_dim 16 · 2 kv heads */
    free(f);
}

/* GGUF LoRA == the PEFT directory it was converted from, bit for bit, after un-permuting q/k. */
static void check_gguf_vs_peft(const char *gguf, const char *peft, const ds_model *m) {
    ds_adapter *g = load_ok(gguf, m), *p = load_ok(peft, m);
    if (g && p) {
        CHECK(!strcmp(g->peft_type, "GGUF_LORA"));
        CHECK_EQ_INT(n_modules(g), n_modules(p));
        for (int i = 0; i < g->n_layer * DS_PROJ_COUNT; i++) {
            const ds_lora_module *x = g->lora[i], *y = p->lora[i];
            CHECK((x == NULL) == (y == NULL));
            if (!x || !y) continue;
            CHECK(x->rank == y->rank && x->in == y->in && x->out == y->out && x->scale == y->scale);
            CHECK_MSG(same(x->A, y->A, (size_t)x->rank * x->in), "%s: module %d A differs", gguf, i);
            CHECK_MSG(same(x->B, y->B, (size_t)x->rank * x->out), "%s: module %d B differs", gguf, i);
        }
    }
    ds_adapter_free(g);
    ds_adapter_free(p);
}

static void golden_model(const char *model, const ds_model *m) {
    char d[700];
#define AD(name) (snprintf(d, sizeof d, "%s/%s/%s", g_adir, model, name), d)
    bool qwen = !strcmp(model, "tiny-qwen2");
    ds_adapter *a;
    const char *lora_names[] = {"lora-qv", "lora-qk", "lora-bias"};
    for (int i = 0; i < 3; i++) {
        if (access(AD(lora_names[i]), R_OK)) continue;
        if ((a = load_ok(d, m))) {
            CHECK(a->kind == DS_ADAPTER_LORA && !strcmp(a->peft_type, "LORA"));
            check_lora_vs_file(d, a, false, s_lora);
            for (int k = 0; k < a->n_layer * DS_PROJ_COUNT; k++)
                if (a->lora[k]) CHECK_EQ_INT(a->lora[k]->bias_B != NULL, i == 2);
        }
        ds_adapter_free(a);
    }
    if ((a = load_ok(AD("lora-all"), m))) check_lora_vs_file(d, a, false, s_all);
    ds_adapter_free(a);
    if ((a = load_ok(AD("dora"), m))) check_lora_vs_file(d, a, false, s_lora), check_dora(d, m, a);
    ds_adapter_free(a);
    if ((a = load_ok(AD("adalora"), m))) check_lora_vs_file(d, a, true, s_ada);
    if (a && !qwen) CHECK(a->lora[1 * DS_PROJ_COUNT + DS_PROJ_V] == NULL); /* pruned to rank 0 */
    ds_adapter_free(a);
    if ((a = load_ok(AD("adalora-full"), m))) check_lora_vs_file(d, a, true, s_ada);
    ds_adapter_free(a);
    if ((a = load_ok(AD("ia3"), m))) check_ia3(d, a, qwen ? DS_PROJ_Q : DS_PROJ_K);
    ds_adapter_free(a);
    if ((a = load_ok(AD("prompt-tuning"), m))) check_prompt(d, a, DS_ADAPTER_PROMPT, 5, 64);
    ds_adapter_free(a);
    if ((a = load_ok(AD("p-tuning"), m))) check_prompt(d, a, DS_ADAPTER_PROMPT, 4, 64);
    ds_adapter_free(a);
    if ((a = load_ok(AD("prefix"), m))) check_prompt(d, a, DS_ADAPTER_PREFIX, 3, 128);
    ds_adapter_free(a);
    if ((a = load_ok(AD("prefix-proj"), m))) check_prompt(d, a, DS_ADAPTER_PREFIX, 3, 128);
    ds_adapter_free(a);
    a = NULL;
    if (!access(AD("lora-embed-head"), R_OK) && (a = load_ok(AD("lora-embed-head"), m))) {
        /* embed_tokens LoRA: A kept transposed [vocab][r]; lm_head LoRA beside it */
        CHECK(a->embed != NULL && a->embed->rank == 4 && a->embed->in == m->cfg.n_vocab &&
              a->embed->out == m->cfg.d_model && fabsf(a->embed->scale - 2.0f) < 1e-6f);
        CHECK(a->lm_head != NULL && a->lm_head->rank == 4);
    }
    ds_adapter_free(a);
    char g[700];
    const char *pairs[] = {"lora-qv", "lora-qk"};
    for (int i = 0; i < 2; i++) {
        snprintf(g, sizeof g, "%s/%s/%s.gguf", g_adir, model, pairs[i]);
        if (!access(g, R_OK)) check_gguf_vs_peft(g, AD(pairs[i]), m);
    }
#undef AD
}

static void golden_bad(void) {
    char p[700];
    snprintf(p, sizeof p, "%s/bad/manifest.json", g_adir);
    char *text;
    size_t len;
    ds_err err;
    if (ds_file_read_all(p, 1 << 20, &text, &len, &err)) {
        printf("note: %s absent, bad-adapter cases skipped\n", p);
        return;
    }
    cJSON *root = cJSON_Parse(text);
    const cJSON *c;
    int n = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(c, "case"));
        const char *kw = cJSON_GetStringValue(cJSON_GetObjectItem(c, "keyword"));
        if (!name || !kw) continue;
        snprintf(p, sizeof p, "%s/bad/%s", g_adir, name);
        expect_refused(p, g_llama, kw);
        n++;
    }
    CHECK(n > 0);
    printf("bad: %d cases refused\n", n);
    cJSON_Delete(root);
    free(text);
}

/* ---- fixtures written here ---- */

static float g_pool[1 << 18];
static size_t g_pool_n;

/* n values that F16 and BF16 hold exactly (multiples of 1/16 in [-0.5, 0.5]). */
static const float *vals(size_t n, int seed) {
    float *v = g_pool + g_pool_n;
    g_pool_n += n;
    DS_ASSERT(g_pool_n <= sizeof g_pool / sizeof g_pool[0]);
    for (size_t i = 0; i < n; i++) v[i] = (float)((int)((i * 7 + (size_t)seed * 3) % 17) - 8) / 16.0f;
    return v;
}

static const char *lora_cfg(const char *extra) {
    static char buf[2048];
    snprintf(buf, sizeof buf, "{\"peft_type\":\"LORA\",\"task_type\":\"CAUSAL_LM\",\"lora_alpha\":4%s}", extra);
    return buf;
}

#define Q0 "base_model.model.model.layers.0.self_attn.q_proj."
#define V0 "base_model.model.model.layers.0.self_attn.v_proj."

/* Plain LoRA on layer-0 q_proj, r 2, with the given A/B names and dtypes. */
static const char *fx_q(const char *name, const char *cfg, const char *an, const char *ad, const char *bn,
                        const char *bd) {
    fx t[2] = {{an, ad, 2, {2, 64}, vals(128, 1)}, {bn, bd, 2, {64, 2}, vals(128, 2)}};
    return mkfixture(name, cfg, t, 2);
}

static void fx_lora_basics(void) {
    /* keys without the prefix, ".default" infixes, F16 A and BF16 B: exact values, scale α/r */
    const char *d = fx_q("f16", lora_cfg(""), "model.layers.0.self_attn.q_proj.lora_A.default.weight", "F16",
                         "model.layers.0.self_attn.q_proj.lora_B.default.weight", "BF16");
    ds_adapter *a = load_ok(d, g_llama);
    const ds_lora_module *m = a ? a->lora[DS_PROJ_Q] : NULL;
    CHECK(m && m->rank == 2 && m->scale == 2.0f && same(m->A, vals(128, 1), 128) && same(m->B, vals(128, 2), 128));
    CHECK(a && a->host_bytes == (128 + 128) * sizeof(float) && !strcmp(a->name, "f16"));
    ds_adapter_free(a);
    /* rsLoRA + patterns in file order: "q_proj" matches first (α 2 → 2/√2); rank from the shapes */
    fx t[4] = {{Q0 "lora_A.weight", "F32", 2, {2, 64}, vals(128, 3)},
               {Q0 "lora_B.weight", "F32", 2, {64, 2}, vals(128, 4)},
               {V0 "lora_A.weight", "F32", 2, {1, 64}, vals(64, 5)},
               {V0 "lora_B.weight", "F32", 2, {32, 1}, vals(32, 6)}};
    d = mkfixture("patterns",
                  lora_cfg(",\"use_rslora\":true,\"alpha_pattern\":{\"q_proj\":2,\"layers.0.self_attn.q_proj\":99},"
                           "\"rank_pattern\":{\"v_proj\":1}"),
                  t, 4);
    if ((a = load_ok(d, g_llama))) {
        CHECK_NEAR(a->lora[DS_PROJ_Q]->scale, 2 / sqrt(2.0), 1e-6);
        CHECK_NEAR(a->lora[DS_PROJ_V]->scale, 4.0, 1e-6);
    }
    ds_adapter_free(a);
    /* lm_head LoRA next to PEFT's saved copy of the base lm_head: the copy is skipped */
    fx h[3] = {{"base_model.model.lm_head.base_layer.weight", "F32", 2, {320, 64}, TW(g_llama->output)},
               {"base_model.model.lm_head.lora_A.weight", "F32", 2, {2, 64}, vals(128, 7)},
               {"base_model.model.lm_head.lora_B.weight", "F32", 2, {320, 2}, vals(640, 8)}};
    if ((a = load_ok(mkfixture("lm-head", lora_cfg(",\"target_modules\":[\"lm_head\"]"), h, 3), g_llama)))
        CHECK(a->lm_head && a->lm_head->out == 320 && a->lm_head->scale == 2.0f && n_modules(a) == 0);
    ds_adapter_free(a);
    h[0].data = vals(320 * 64, 9); /* a different matrix: would replace the base */
    expect_refused(mkfixture("lm-head-replaced", lora_cfg(""), h, 3), g_llama, "replacing base weights");
}

static void fx_lora_refusals(void) {
    fx t[3] = {{Q0 "lora_A.weight", "F32", 2, {2, 64}, vals(128, 1)},
               {Q0 "lora_B.weight", "F32", 2, {64, 2}, vals(128, 2)}};
    t[2] = (fx){Q0 "lora_A.default.weight", "F32", 2, {2, 64}, vals(128, 1)};
    expect_refused(mkfixture("dup", lora_cfg(""), t, 3), g_llama, "same parameter");
    t[2] = (fx){Q0 "lora_X", "F32", 1, {2}, vals(2, 1)};
    expect_refused(mkfixture("unknown", lora_cfg(""), t, 3), g_llama, "lora_X");
    t[2] = (fx){"base_model.model.lm_head.weight", "F32", 2, {320, 64}, vals(320 * 64, 3)};
    expect_refused(mkfixture("mts", lora_cfg(",\"modules_to_save\":[\"lm_head\"]"), t, 3), g_llama,
                   "replacing base weights");
    t[2] = (fx){"base_model.model.model.layers.0.mlp.down_proj.weight", "F32", 2, {64, 128}, vals(64 * 128, 3)};
    expect_refused(mkfixture("mts2", lora_cfg(",\"modules_to_save\":[\"down_proj\"]"), t, 3), g_llama,
                   "modules_to_save");
    t[2] = (fx){Q0 "base_layer.bias", "F32", 1, {64}, vals(64, 3)};
    expect_refused(mkfixture("bias-all", lora_cfg(",\"bias\":\"all\""), t, 3), g_llama, "bias = \"all\"");
    t[2] = (fx){Q0 "lora_magnitude_vector", "F32", 1, {64}, vals(64, 3)};
    expect_refused(mkfixture("mag-no-dora", lora_cfg(""), t, 3), g_llama, "use_dora");
    t[2] = (fx){Q0 "lora_B.bias", "F32", 1, {64}, vals(64, 3)};
    expect_refused(mkfixture("bias-no-flag", lora_cfg(""), t, 3), g_llama, "lora_bias");
    t[2] = (fx){"base_model.model.model.embed_tokens.lora_embedding_A", "F32", 2, {2, 320}, vals(640, 3)};
    expect_refused(mkfixture("embed", lora_cfg(""), t, 3), g_llama, "embed_tokens");
    t[2] = (fx){"base_model.model.model.layers.01.self_attn.k_proj.lora_A.weight", "F32", 2, {2, 64}, vals(128, 3)};
    expect_refused(mkfixture("leading-zero", lora_cfg(""), t, 3), g_llama, "layers.01");
    expect_refused(mkfixture("tti", lora_cfg(",\"trainable_token_indices\":[1,2]"), t, 2), g_llama,
                   "trainable_token_indices");
    expect_refused(mkfixture("task", lora_cfg(",\"task_type\":\"SEQ_CLS\""), t, 2), g_llama, "twice");
    expect_refused(mkfixture("seqcls", "{\"peft_type\":\"LORA\",\"task_type\":\"SEQ_CLS\"}", t, 2), g_llama,
                   "task_type");
    expect_refused(mkfixture("regex", lora_cfg(",\"alpha_pattern\":{\"q_proj(\":2}"), t, 2), g_llama, "regex");
    expect_refused(mkfixture("badjson", "{\"peft_type\": \"LORA\",", t, 2), g_llama, "JSON");
    expect_refused(mkfixture("corda", lora_cfg(",\"init_lora_weights\":\"corda\""), t, 2), g_llama, "corda");
    expect_refused(mkfixture("arrow", lora_cfg(",\"arrow_config\":{\"top_k\":2}"), t, 2), g_llama, "arrow_config");
    float bad[128];
    memcpy(bad, vals(128, 2), sizeof bad);
    bad[77] = NAN;
    t[1].data = bad;
    expect_refused(mkfixture("nan", lora_cfg(""), t, 2), g_llama, "non-finite");
    t[1] = (fx){Q0 "lora_B.weight", "I32", 2, {64, 2}, vals(128, 2)};
    expect_refused(mkfixture("i32", lora_cfg(""), t, 2), g_llama, "dtype");
    /* truncated safetensors */
    char p[600];
    const char *d = fx_q("trunc", lora_cfg(""), Q0 "lora_A.weight", "F32", Q0 "lora_B.weight", "F32");
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", d);
    CHECK(truncate(p, 300) == 0);
    expect_refused(d, g_llama, "adapter_model.safetensors");
}

static void fx_dora_adalora(void) {
    fx t[3] = {{V0 "lora_A.weight", "F32", 2, {1, 64}, vals(64, 1)},
               {V0 "lora_B.weight", "F32", 2, {32, 1}, vals(32, 2)},
               {V0 "lora_magnitude_vector", "F32", 1, {32}, vals(32, 3)}};
    ds_adapter *a = load_ok(mkfixture("dora", lora_cfg(",\"use_dora\":true"), t, 3), g_llama);
    const ds_lora_module *m = a ? a->lora[DS_PROJ_V] : NULL;
    CHECK(m && m->dora_scale && m->scale == 4.0f);
    for (int o = 0; m && m->dora_scale && o < 32; o++) {
        double s2 = 0;
        for (int i = 0; i < 64; i++) {
            double v = TW(g_llama->layers[0].wv)[o * 64 + i] + 4.0 * t[1].data[o] * t[0].data[i];
            s2 += v * v;
        }
        CHECK_NEAR(m->dora_scale[o], t[2].data[o] / sqrt(s2), 1e-6);
    }
    ds_adapter_free(a);
    /* AdaLoRA, lora_alpha ≤ 0 → α = r: scale r / (init_r + 1e-5); A rows times E */
    static const float e[2] = {2.0f, -1.0f};
    fx s[3] = {{Q0 "lora_A", "F32", 2, {2, 64}, vals(128, 4)},
               {Q0 "lora_B", "F32", 2, {64, 2}, vals(128, 5)},
               {Q0 "lora_E", "F32", 2, {2, 1}, e}};
    a = load_ok(mkfixture("ada", "{\"peft_type\":\"ADALORA\",\"init_r\":4,\"lora_alpha\":0}", s, 3), g_llama);
    m = a ? a->lora[DS_PROJ_Q] : NULL;
    CHECK(m && m->rank == 2);
    if (m) {
        CHECK_NEAR(m->scale, 2.0 / (4 + 1e-5), 1e-7);
        CHECK(m->A[0] == 2 * s[0].data[0] && m->A[64 + 5] == -s[0].data[64 + 5]);
    }
    ds_adapter_free(a);
    expect_refused(mkfixture("ada-r", "{\"peft_type\":\"ADALORA\",\"init_r\":1}", s, 3), g_llama, "init_r");
}

static void fx_ia3_prompt(void) {
    fx t[2] = {{"base_model.model.model.layers.0.mlp.down_proj.ia3_l", "F32", 2, {1, 128}, vals(128, 1)},
               {"base_model.model.model.layers.1.mlp.down_proj.ia3_l", "F32", 2, {64, 1}, vals(64, 2)}};
    expect_refused(mkfixture("ia3-disagree", "{\"peft_type\":\"IA3\"}", t, 2), g_llama, "some layers");
    t[1] = (fx){"base_model.model.model.layers.0.self_attn.k_proj.ia3_l", "F32", 2, {1, 64}, vals(64, 2)};
    expect_refused(mkfixture("ia3-ff", "{\"peft_type\":\"IA3\",\"feedforward_modules\":[\"down_proj\"]}", t, 2),
                   g_llama, "feedforward_modules");
    ds_adapter *a = load_ok(mkfixture("ia3-re", "{\"peft_type\":\"IA3\",\"feedforward_modules\":\".*(k|down)_proj\"}",
                                      t, 2), g_llama);
    CHECK(a && a->ia3_is_input[DS_PROJ_K] && a->ia3_is_input[DS_PROJ_DOWN] && a->ia3[DS_PROJ_K]);
    ds_adapter_free(a);

    fx p = {"prompt_embeddings", "BF16", 2, {2, 64}, vals(128, 3)};
    a = load_ok(mkfixture("pt", "{\"peft_type\":\"PROMPT_TUNING\",\"num_virtual_tokens\":2,\"token_dim\":64}", &p, 1),
                g_llama);
    CHECK(a && a->kind == DS_ADAPTER_PROMPT && a->n_virtual == 2 && same(a->prompt, p.data, 128));
    ds_adapter_free(a);
    const char *pre = "{\"peft_type\":\"PREFIX_TUNING\",\"num_virtual_tokens\":2,\"num_layers\":2,"
                      "\"token_dim\":%d,\"prefix_projection\":%s}";
    char cfg[256];
    p = (fx){"prompt_embeddings", "F32", 2, {2, 128}, vals(256, 4)};
    snprintf(cfg, sizeof cfg, pre, 32, "false");
    a = load_ok(mkfixture("prefix", cfg, &p, 1), g_llama);
    CHECK(a && a->kind == DS_ADAPTER_PREFIX && a->prefix_row == 32 && same(a->prefix, p.data, 256));
    ds_adapter_free(a);
    snprintf(cfg, sizeof cfg, pre, 64, "false");
    expect_refused(mkfixture("prefix-old", cfg, &p, 1), g_llama, "PEFT < 0.12");
    p.shape[1] = 32;
    snprintf(cfg, sizeof cfg, pre, 32, "true");
    expect_refused(mkfixture("prefix-pre", cfg, &p, 1), g_llama, "pre-projection");
}

static void fx_gguf(void) {
    /* llama: q lora_b rows come permuted; row g of the file must land on HF row unperm(g) */
    float a_[2 * 64], b_[64 * 2], alpha = 8;
    for (int i = 0; i < 128; i++) a_[i] = (float)i, b_[i] = (float)i;
    fx t[2] = {{"blk.1.attn_q.weight.lora_a", "F32", 2, {2, 64}, a_}, {"blk.1.attn_q.weight.lora_b", "F32", 2, {64, 2}, b_}};
    char p[600];
    snprintf(p, sizeof p, "%s/q.gguf", g_tmp);
    write_gguf(p, "llama", "adapter", &alpha, t, 2);
    ds_err err;
    ds_adapter *a = load(p, g_llama, 0.5f, &err);
    const ds_lora_module *m = a ? a->lora[DS_PROJ_COUNT + DS_PROJ_Q] : NULL;
    CHECK_MSG(m != NULL, "%s", err.msg);
    if (m) {
        CHECK(m->scale == 0.5f * 8 / 2 && same(m->A, a_, 128) && !strcmp(a->name, "q"));
        for (int g = 0; g < 64; g++) {
            int h = g / 16, w = g % 16, hf = h * 16 + (w % 2) * 8 + w / 2;
            CHECK(m->B[hf * 2] == b_[g * 2] && m->B[hf * 2 + 1] == b_[g * 2 + 1]);
        }
    }
    ds_adapter_free(a);
    write_gguf(p, "qwen2", "adapter", NULL, t, 2); /* qwen2: no permutation; no alpha → user scale */
    a = load(p, g_qwen, 1.0f, &err);
    m = a ? a->lora[DS_PROJ_COUNT + DS_PROJ_Q] : NULL;
    CHECK_MSG(m && m->scale == 1.0f && same(m->B, b_, 128), "%s", err.msg);
    ds_adapter_free(a);
    expect_refused(p, g_llama, "architecture");
    write_gguf(p, "llama", "model", &alpha, t, 2);
    expect_refused(p, g_llama, "general.type");
    t[0].name = "token_embd.weight.lora_a";
    write_gguf(p, "llama", "adapter", &alpha, t, 2);
    expect_refused(p, g_llama, "token_embd");
}

static void fx_config_check(void) {
    ds_err err;
    CHECK(ds_adapter_config_check(NULL, 0, &err) == DS_EFORMAT);
    const char *ok = lora_cfg(",\"use_dora\":false,\"rank_pattern\":{\"^model\\\\.layers\\\\.0\\\\..*\":3}");
    CHECK_MSG(ds_adapter_config_check(ok, strlen(ok), &err) == 0, "%s", err.msg);
    CHECK(ds_adapter_config_check(ok, (size_t)64 << 20, &err) == DS_ERANGE);
    const char *bad[] = {"", "[]", "{\"peft_type\":7}", "{\"peft_type\":\"LORA\",\"r\":0}",
                         "{\"peft_type\":\"LORA\",\"r\":2.5}", "{\"peft_type\":\"LORA\",\"lora_alpha\":\"8\"}",
                         "{\"peft_type\":\"LORA\",\"bias\":\"some\"}", "{\"peft_type\":\"LORA\",\"use_dora\":1}",
                         "{\"peft_type\":\"LORA\",\"rank_pattern\":{\"q\":0}}", "{\"peft_type\":\"LOHA\"}",
                         "{\"peft_type\":\"PROMPT_TUNING\"}", "{\"peft_type\":\"IA3\",\"feedforward_modules\":[1]}",
                         "{\"peft_type\":\"P_TUNING\",\"num_virtual_tokens\":4,\"num_transformer_submodules\":2}",
                         "{\"peft_type\":\"LORA\",\"r\":1e999}", "{\"peft_type\":\"LORA\",\"alora_invocation_tokens\":[]}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_MSG(ds_adapter_config_check(bad[i], strlen(bad[i]), &err) < 0, "accepted: %s", bad[i]);
}

static void fixtures(void) {
    fx_lora_basics();
    fx_lora_refusals();
    fx_dora_adalora();
    fx_ia3_prompt();
    fx_gguf();
    fx_config_check();
    expect_refused(g_tmp, g_llama, "adapter_config.json"); /* a directory without one */
}

int main(void) {
    ds_log_set_level(DS_LOG_ERROR);
    ds_err err;
    ds_model_params mp = ds_model_default_params();
    mp.load_tokenizer = false;
    mp.verbose = false;
    g_llama = ds_model_load(DS_TEST_DATA "/models/tiny-llama", &mp, &err);
    if (!g_llama) SKIP("tiny-llama base model absent (%s); run tests/golden/gen_models.py", err.msg);
    g_qwen = ds_model_load(DS_TEST_DATA "/models/tiny-qwen2", &mp, &err);
    CHECK_MSG(g_qwen != NULL, "%s", err.msg);
    snprintf(g_tmp, sizeof g_tmp, "/tmp/ds_adapter_load_XXXXXX");
    if (!mkdtemp(g_tmp)) SKIP("cannot create a temp dir");
    fixtures();
    const char *env = getenv("DS_TEST_ADAPTER_DIR");
    snprintf(g_adir, sizeof g_adir, "%s", env ? env : DS_TEST_DATA "/adapters");
    bool golden = !access(g_adir, R_OK);
    if (golden) {
        golden_model("tiny-llama", g_llama);
        if (g_qwen) golden_model("tiny-qwen2", g_qwen);
        golden_bad();
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_tmp);
    ds_model_free(g_llama);
    ds_model_free(g_qwen);
    if (!golden && !ds_test_failures) SKIP("golden adapters absent (%s); run tests/golden/gen_adapters.py", g_adir);
    return ds_test_result();
}
