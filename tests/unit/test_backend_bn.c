/* The segmented bottleneck op (ds_backend_iface.bottleneck) on every backend against a double-
 * precision reference of the math ds_bn_seg spells out (include/ds/backend.h): sequential and
 * parallel placements, every residual flag, adapter LayerNorms before / after, channel scaling,
 * three activations, segments of different widths and lengths in one call (a decode-like 1-token
 * segment among them), rows outside the segments left alone. Tolerance: NMSE <= 1e-9 (fp32 sums
 * in another order). The CPU op is also checked against the `adapters` package by test_bottleneck;
 * this test is what checks the CUDA kernel (cuda/bottleneck.cu) when a GPU is present
 * (`test_backend_bn cuda`, ctest -L gpu, scripts/gpu_check.sh). */
#include "ds/backend.h"
#include "ds_test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define T_ROWS 41
#define D 96
#define N_SEGS 4

static float rndf(float amp) { return amp * (2.0f * (float)rand() / (float)RAND_MAX - 1.0f); }

static double act_ref(ds_act a, double x) {
    switch (a) {
    case DS_ACT_RELU: return x > 0 ? x : 0;
    case DS_ACT_SILU: return x / (1 + exp(-x));
    case DS_ACT_GELU_TANH: return 0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
    default: return x;
    }
}

static void ln_ref(double *v, const float *w, const float *b) {
    double mean = 0, var = 0;
    for (int i = 0; i < D; i++) mean += v[i];
    mean /= D;
    for (int i = 0; i < D; i++) var += (v[i] - mean) * (v[i] - mean);
    const double r = 1.0 / sqrt(var / D + 1e-5);
    for (int i = 0; i < D; i++) v[i] = (v[i] - mean) * r * w[i] + b[i];
}

/* Host copy of one segment's module; the device table points at uploaded copies. */
typedef struct hseg {
    ds_bn_seg g;
    float *down, *down_b, *up, *up_b, *sv, *lbw, *lbb, *law, *lab;
} hseg;

/* One row of ds_bn_seg's math in double: returns o' (= x' − x). */
static void row_ref(const hseg *h, const float *x, const float *o, double *out) {
    const ds_bn_seg *g = &h->g;
    double a[D], z[D], u[D], hid[256];
    const bool par = g->flags & DS_BN_PARALLEL;
    for (int i = 0; i < D; i++) a[i] = par ? x[i] : (g->flags & DS_BN_IN_PLUS_X) ? (double)o[i] + x[i] : o[i];
    memcpy(z, a, sizeof z);
    if (h->lbw) ln_ref(z, h->lbw, h->lbb);
    for (int j = 0; j < g->size; j++) {
        double s = h->down_b[j];
        for (int i = 0; i < D; i++) s += (double)h->down[j * D + i] * z[i];
        hid[j] = act_ref(g->act, s);
    }
    for (int i = 0; i < D; i++) {
        double s = h->up_b[i];
        for (int j = 0; j < g->size; j++) s += (double)h->up[i * g->size + j] * hid[j];
        u[i] = s * (h->sv ? h->sv[i] : g->scale);
    }
    const bool add_x = g->flags & DS_BN_ADD_X;
    if (par) {
        if (h->law) ln_ref(u, h->law, h->lab);
        for (int i = 0; i < D; i++) out[i] = o[i] + u[i] - (add_x ? 0 : x[i]);
        return;
    }
    for (int i = 0; i < D; i++) {
        const double r = (g->flags & DS_BN_RES_INPUT) ? a[i] : o[i];
        if (g->flags & DS_BN_RES_BEFORE_LN) u[i] += r;
        z[i] = r;
    }
    if (h->law) ln_ref(u, h->law, h->lab);
    if (!(g->flags & DS_BN_RES_BEFORE_LN))
        for (int i = 0; i < D; i++) u[i] += z[i];
    for (int i = 0; i < D; i++) out[i] = u[i] - (add_x ? 0 : x[i]);
}

static float *vec(int n, float amp, float base) {
    float *v = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) v[i] = base + rndf(amp);
    return v;
}

static void *up(ds_backend *b, const float *h, int n, void **keep, int *nk) {
    if (!h) return NULL;
    void *d = b->iface->alloc(b->ctx, sizeof(float) * (size_t)n);
    CHECK(d != NULL);
    if (d) CHECK_EQ_INT(b->iface->upload(b->ctx, d, h, sizeof(float) * (size_t)n), DS_OK);
    keep[(*nk)++] = d;
    return d;
}

static void run_case(ds_backend *b, const char *name, int variant) {
    static const uint32_t flags[][N_SEGS] = {
        {DS_BN_IN_PLUS_X | DS_BN_ADD_X, DS_BN_ADD_X, DS_BN_PARALLEL | DS_BN_ADD_X, DS_BN_PARALLEL},
        {DS_BN_IN_PLUS_X | DS_BN_RES_INPUT | DS_BN_RES_BEFORE_LN | DS_BN_ADD_X, DS_BN_RES_INPUT,
         DS_BN_RES_BEFORE_LN, DS_BN_IN_PLUS_X}};
    static const int32_t start[N_SEGS] = {0, 12, 13, 30}, len[N_SEGS] = {12, 1, 15, 9}, size[N_SEGS] = {8, 24, 3, 96};
    static const ds_act acts[N_SEGS] = {DS_ACT_RELU, DS_ACT_SILU, DS_ACT_GELU_TANH, DS_ACT_SILU};
    hseg h[N_SEGS];
    ds_bn_seg segs[N_SEGS];
    void *keep[N_SEGS * 9 + 2];
    int nk = 0;
    for (int s = 0; s < N_SEGS; s++) {
        const int r = size[s];
        const bool ln = variant == 1 && s != 1, ch = variant == 1 && s >= 2;
        h[s] = (hseg){.g = {.start = start[s], .len = len[s], .size = r, .act = acts[s], .flags = flags[variant][s],
                            .scale = 0.5f + (float)s},
                      .down = vec(r * D, 0.3f, 0), .down_b = vec(r, 0.1f, 0), .up = vec(D * r, 0.3f, 0),
                      .up_b = vec(D, 0.1f, 0), .sv = ch ? vec(D, 0.3f, 1.0f) : NULL,
                      .lbw = ln && s % 2 ? vec(D, 0.2f, 1.0f) : NULL, .lbb = ln && s % 2 ? vec(D, 0.1f, 0) : NULL,
                      .law = ln ? vec(D, 0.2f, 1.0f) : NULL, .lab = ln ? vec(D, 0.1f, 0) : NULL};
        segs[s] = h[s].g;
        segs[s].down = up(b, h[s].down, r * D, keep, &nk), segs[s].down_b = up(b, h[s].down_b, r, keep, &nk);
        segs[s].up = up(b, h[s].up, D * r, keep, &nk), segs[s].up_b = up(b, h[s].up_b, D, keep, &nk);
        segs[s].scale_vec = up(b, h[s].sv, D, keep, &nk);
        segs[s].ln_b_w = up(b, h[s].lbw, D, keep, &nk), segs[s].ln_b_b = up(b, h[s].lbb, D, keep, &nk);
        segs[s].ln_a_w = up(b, h[s].law, D, keep, &nk), segs[s].ln_a_b = up(b, h[s].lab, D, keep, &nk);
    }
    float *x = vec(T_ROWS * D, 1.0f, 0), *o = vec(T_ROWS * D, 1.0f, 0), *got = malloc(sizeof(float) * T_ROWS * D);
    double *ref = malloc(sizeof(double) * T_ROWS * D);
    for (int i = 0; i < T_ROWS * D; i++) ref[i] = o[i];
    for (int s = 0; s < N_SEGS; s++)
        for (int t = start[s]; t < start[s] + len[s]; t++) row_ref(&h[s], x + t * D, o + t * D, ref + t * D);
    float *dx = up(b, x, T_ROWS * D, keep, &nk), *dox = up(b, o, T_ROWS * D, keep, &nk);
    const ds_seg_tables tab = {.bn = segs, .n_bn = N_SEGS};
    CHECK_EQ_INT(b->iface->plan_upload(b->ctx, &tab), DS_OK);
    CHECK_EQ_INT(b->iface->bottleneck(b->ctx, dx, dox, D, (ds_seg_range){1, N_SEGS}), DS_EINVAL); /* past the plan */
    CHECK_EQ_INT(b->iface->bottleneck(b->ctx, dx, dox, D, (ds_seg_range){0, N_SEGS}), DS_OK);
    CHECK_EQ_INT(b->iface->synchronize(b->ctx), DS_OK);
    CHECK_EQ_INT(b->iface->download(b->ctx, got, dox, sizeof(float) * T_ROWS * D), DS_OK);
    double num = 0, den = 0;
    for (int i = 0; i < T_ROWS * D; i++) num += (got[i] - ref[i]) * (got[i] - ref[i]), den += ref[i] * ref[i];
    bool untouched = true; /* rows 39-40 belong to no segment */
    for (int i = 39 * D; i < T_ROWS * D; i++) untouched &= got[i] == o[i];
    printf("%-5s bottleneck %s: nmse %.2e (tol 1e-9)\n", name, variant ? "LayerNorms, channel scaling, residual flags"
                                                                        : "seq / houlsby / parallel", num / den);
    CHECK_MSG(num / den <= 1e-9, "%s bottleneck variant %d: nmse %.3e", name, variant, num / den);
    CHECK_MSG(untouched, "%s bottleneck: rows outside every segment were modified", name);
    for (int i = 0; i < nk; i++)
        if (keep[i]) b->iface->release(b->ctx, keep[i]);
    for (int s = 0; s < N_SEGS; s++) {
        float *p[] = {h[s].down, h[s].down_b, h[s].up, h[s].up_b, h[s].sv, h[s].lbw, h[s].lbb, h[s].law, h[s].lab};
        for (int k = 0; k < 9; k++) free(p[k]);
    }
    free(x), free(o), free(got), free(ref);
}

int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : NULL;
    const char *names[] = {"cpu", "cuda"};
    for (int i = 0; i < 2; i++) {
        if (only && strcmp(only, names[i])) continue;
        ds_err err = {{0}};
        ds_backend *b = ds_backend_create(names[i], NULL, &err);
        if (!b) {
            if (only) SKIP("%s: %s", names[i], err.msg);
            printf("%s: skipped: %s\n", names[i], err.msg);
            CHECK_MSG(i != 0, "the cpu backend must always exist");
            continue;
        }
        if (!b->iface->bottleneck) {
            printf("%s: no bottleneck op\n", names[i]);
        } else {
            srand(29);
            run_case(b, names[i], 0);
            run_case(b, names[i], 1);
        }
        ds_backend_free(b);
    }
    return ds_test_result();
}
