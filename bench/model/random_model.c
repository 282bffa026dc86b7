/* Random-weight models for bench_model (see random_model.h).
 *
 * The model struct is moving from fp32 `float *` matrices to typed `ds_weight` (backend interface
 * version 2); the only code that knows which is set_matrix() below, so the rest follows either. */
#include "random_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int bench_shape_config(const char *shape, ds_model_config *c) {
    if (shape && !strcmp(shape, "llama3-8b")) { /* meta-llama/Meta-Llama-3-8B config.json */
        *c = (ds_model_config){.arch = DS_ARCH_LLAMA, .n_vocab = 128256, .d_model = 4096, .n_layer = 32, .n_head = 32,
                               .n_kv_head = 8, .head_dim = 128, .d_ff = 14336, .max_ctx = 8192, .rms_eps = 1e-5f,
                               .rope_theta = 500000.0f};
    } else if (shape && !strcmp(shape, "tiny")) {
        *c = (ds_model_config){.arch = DS_ARCH_LLAMA, .n_vocab = 512, .d_model = 128, .n_layer = 2, .n_head = 4,
                               .n_kv_head = 2, .head_dim = 32, .d_ff = 256, .max_ctx = 1024, .rms_eps = 1e-5f,
                               .rope_theta = 10000.0f};
    } else {
        return DS_EINVAL;
    }
    snprintf(c->arch_name, sizeof c->arch_name, "llama");
    snprintf(c->name, sizeof c->name, "random %s", shape);
    return 0;
}

/* splitmix64 of the element index: any element from any thread, same values for any thread count. */
static inline float rand_at(uint64_t seed, uint64_t i, float a) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) / (float)(1 << 24) * 2.0f - 1.0f) * a;
}

static uint16_t to_bf16(float f) { /* round to nearest even; values here are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* A model-owned rows×cols matrix of random values (bf16 or fp32); NULL on OOM. */
static void *random_matrix(ds_model *m, int32_t rows, int32_t cols, bool bf16, uint64_t seed) {
    const size_t n = (size_t)rows * (size_t)cols;
    const float a = sqrtf(3.0f / (float)cols);
    float *f = NULL;
    uint16_t *h = NULL;
    if (bf16) h = (uint16_t *)ds_model_alloc_floats(m, (n + 1) / 2);
    else f = ds_model_alloc_floats(m, n);
    if (!f && !h) return NULL;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < (int64_t)n; i++) {
        float v = rand_at(seed, (uint64_t)i, a);
        if (h) h[i] = to_bf16(v);
        else f[i] = v;
    }
    return h ? (void *)h : (void *)f;
}

#if DS_BACKEND_IFACE_VERSION >= 2
bool bench_random_bf16_supported(void) { return true; }
typedef ds_weight bench_mat;
static int set_matrix(ds_model *m, bench_mat *dst, void *data, int32_t rows, int32_t cols, bool bf16) {
    const ds_dtype t = bf16 ? DS_DTYPE_BF16 : DS_DTYPE_F32;
    /* borrow: data is model-owned, so a view is enough and layers can share it */
    return ds_model_set_weight(m, dst, data, t, ds_dtype_row_bytes(t, cols), rows, cols, NULL, true, DS_DTYPE_NONE);
}
#else
bool bench_random_bf16_supported(void) { return false; }
typedef float *bench_mat;
static int set_matrix(ds_model *m, bench_mat *dst, void *data, int32_t rows, int32_t cols, bool bf16) {
    if (bf16) return DS_EUNSUPPORTED; /* fp32-only model struct */
    *dst = data;
    m->n_params += (size_t)rows * (size_t)cols;
    return 0;
}
#endif

static float *ones(ds_model *m, int32_t n) {
    float *v = ds_model_alloc_floats(m, (size_t)n);
    for (int32_t i = 0; v && i < n; i++) v[i] = 1.0f;
    return v;
}

ds_model *bench_random_model(const bench_random_params *p, ds_err *err) {
    ds_model *m = ds_model_new();
    if (!m) return ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    if (bench_shape_config(p->shape, &m->cfg)) {
        ds_err_set(err, DS_EINVAL, "unknown shape '%s' (llama3-8b or tiny)", p->shape ? p->shape : "(null)");
        goto fail;
    }
    if (ds_model_config_validate(&m->cfg, "random model", err)) goto fail;
    const ds_model_config *c = &m->cfg;
    const int32_t qd = c->n_head * c->head_dim, kvd = c->n_kv_head * c->head_dim;
    /* one host copy per projection shape, shared by every layer */
    const int32_t rows[7] = {qd, kvd, kvd, c->d_model, c->d_ff, c->d_ff, c->d_model};
    const int32_t cols[7] = {c->d_model, c->d_model, c->d_model, qd, c->d_model, c->d_model, c->d_ff};
    void *data[7];
    for (int k = 0; k < 7; k++)
        if (!(data[k] = random_matrix(m, rows[k], cols[k], p->bf16, p->seed + 17 * (uint64_t)k))) goto oom;
    void *embd = random_matrix(m, c->n_vocab, c->d_model, p->bf16, p->seed + 1000);
    void *out = random_matrix(m, c->n_vocab, c->d_model, p->bf16, p->seed + 2000);
    float *norm = ones(m, c->d_model);
    m->inv_freq = ds_model_alloc_floats(m, (size_t)c->head_dim / 2);
    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!embd || !out || !norm || !m->inv_freq || !m->layers) goto oom;
    ds_rope_inv_freq(c, m->inv_freq);
    m->output_norm = norm;
    int st = set_matrix(m, &m->tok_embd, embd, c->n_vocab, c->d_model, p->bf16);
    if (!st) st = set_matrix(m, &m->output, out, c->n_vocab, c->d_model, p->bf16);
    for (int32_t l = 0; l < c->n_layer && !st; l++) {
        ds_layer_weights *w = &m->layers[l];
        bench_mat *dst[7] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
        w->attn_norm = w->ffn_norm = norm;
        for (int k = 0; k < 7 && !st; k++) st = set_matrix(m, dst[k], data[k], rows[k], cols[k], p->bf16);
    }
    if (st) {
        ds_err_set(err, st, "random model: cannot set a %s weight (%s)", p->bf16 ? "bf16" : "fp32", ds_strerror(st));
        goto fail;
    }
    if (ds_model_check_complete(m, err)) goto fail;
    return m;
oom:
    ds_err_set(err, DS_ENOMEM, "random model %s: out of host memory", p->shape);
fail:
    ds_model_free(m);
    return NULL;
}

double bench_model_matrix_bytes(const ds_model_config *c, double elem_bytes) {
    const double qd = (double)c->n_head * c->head_dim, kvd = (double)c->n_kv_head * c->head_dim;
    const double layer = qd * c->d_model * 2 + kvd * c->d_model * 2 + 3.0 * c->d_ff * c->d_model;
    return elem_bytes * (layer * c->n_layer + (double)c->n_vocab * c->d_model);
}
