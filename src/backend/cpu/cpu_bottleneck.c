/* Bottleneck adapters on the CPU: per segment, two GEMMs at the adapter's own width (down to `size`,
 * back up to d) and row-wise residual placement, as ds_bn_seg spells it out. Scratch is the backend's
 * grow-once buffer, so a steady-state step does not allocate. */
#include "backend/cpu/cpu_bottleneck.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* y = LayerNorm(v) with torch's biased variance and eps 1e-5; y may alias v. */
static void layer_norm(const float *v, const float *w, const float *b, float *y, int32_t d) {
    double mean = 0.0, var = 0.0;
    for (int32_t i = 0; i < d; i++) mean += v[i];
    mean /= d;
    for (int32_t i = 0; i < d; i++) var += ((double)v[i] - mean) * ((double)v[i] - mean);
    const float r = (float)(1.0 / sqrt(var / d + 1e-5)), m = (float)mean;
    for (int32_t i = 0; i < d; i++) y[i] = (v[i] - m) * r * w[i] + b[i];
}

/* Rows of one segment: a = adapter input, u = scale ⊙ (up·act(down·LNb(a) + down_b) + up_b). */
static void bottleneck_rows(const ds_bn_seg *g, const float *xs, float *os, int32_t d, float *a, float *z,
                            float *h) {
    const int32_t n = g->len;
    const bool par = g->flags & DS_BN_PARALLEL;
#pragma omp parallel for if (n > 16)
    for (int32_t t = 0; t < n; t++) {
        const float *xr = xs + (size_t)t * d, *orow = os + (size_t)t * d;
        float *ar = a + (size_t)t * d;
        if (par) memcpy(ar, xr, sizeof(float) * (size_t)d);
        else if (g->flags & DS_BN_IN_PLUS_X) for (int32_t i = 0; i < d; i++) ar[i] = orow[i] + xr[i];
        else memcpy(ar, orow, sizeof(float) * (size_t)d);
        if (g->ln_b_w) layer_norm(ar, g->ln_b_w, g->ln_b_b, z + (size_t)t * d, d);
    }
    const float *zin = g->ln_b_w ? z : a;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, g->size, d, 1.0f, zin, d, g->down, d, 0.0f, h, g->size);
#pragma omp parallel for if (n > 16)
    for (int32_t t = 0; t < n; t++) {
        float *hr = h + (size_t)t * g->size;
        for (int32_t j = 0; j < g->size; j++) hr[j] = ds_act_eval(g->act, hr[j] + g->down_b[j]);
    }
    /* z is free again (LNb output consumed): u goes there */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, g->size, 1.0f, h, g->size, g->up, g->size, 0.0f, z, d);
}

/* o ← x' − x per row from u (in z), a, o, x (see ds_bn_seg). */
static void place_rows(const ds_bn_seg *g, const float *xs, float *os, int32_t d, const float *a, float *u) {
    const bool par = g->flags & DS_BN_PARALLEL, add_x = g->flags & DS_BN_ADD_X;
#pragma omp parallel for if (g->len > 16)
    for (int32_t t = 0; t < g->len; t++) {
        const float *xr = xs + (size_t)t * d, *ar = a + (size_t)t * d;
        float *orow = os + (size_t)t * d, *ur = u + (size_t)t * d;
        for (int32_t i = 0; i < d; i++) {
            const float s = g->scale_vec ? g->scale_vec[i] : g->scale;
            ur[i] = (ur[i] + g->up_b[i]) * s;
        }
        if (par) {
            if (g->ln_a_w) layer_norm(ur, g->ln_a_w, g->ln_a_b, ur, d);
            for (int32_t i = 0; i < d; i++) orow[i] += ur[i] - (add_x ? 0.0f : xr[i]);
            continue;
        }
        const float *r = (g->flags & DS_BN_RES_INPUT) ? ar : orow;
        if (g->flags & DS_BN_RES_BEFORE_LN) {
            for (int32_t i = 0; i < d; i++) ur[i] += r[i];
            if (g->ln_a_w) layer_norm(ur, g->ln_a_w, g->ln_a_b, ur, d);
        } else {
            if (g->ln_a_w) layer_norm(ur, g->ln_a_w, g->ln_a_b, ur, d);
            for (int32_t i = 0; i < d; i++) ur[i] += r[i];
        }
        for (int32_t i = 0; i < d; i++) orow[i] = ur[i] - (add_x ? 0.0f : xr[i]);
    }
}

int ds_cpu_bottleneck(void *ctx, const float *x, float *o, int32_t d, const ds_bn_seg *segs, int32_t n_segs) {
    size_t need = 1;
    for (int32_t i = 0; i < n_segs; i++) {
        if (segs[i].len < 0 || segs[i].size <= 0 || !segs[i].down || !segs[i].up || !segs[i].down_b || !segs[i].up_b)
            return DS_EINVAL;
        size_t sz = (size_t)segs[i].len * (2 * (size_t)d + (size_t)segs[i].size);
        if (sz > need) need = sz;
    }
    float *buf = ds_cpu_scratch(ctx, need);
    if (!buf) return DS_ENOMEM;
    for (int32_t i = 0; i < n_segs; i++) {
        const ds_bn_seg *g = &segs[i];
        if (g->len == 0) continue;
        float *a = buf, *z = a + (size_t)g->len * d, *h = z + (size_t)g->len * d;
        const float *xs = x + (size_t)g->start * d;
        float *os = o + (size_t)g->start * d;
        bottleneck_rows(g, xs, os, d, a, z, h);
        place_rows(g, xs, os, d, a, z);
    }
    return DS_OK;
}
