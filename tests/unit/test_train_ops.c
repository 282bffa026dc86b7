/* Every op of the training table (include/ds/backend_train.h) on every backend that has one,
 * against a double-precision reference written here (the training twin of test_backend_ops.c).
 *
 *   test_train_ops           cpu, then cuda when ds_backend_create("cuda") succeeds and it has a
 *                            training table (else it prints "cuda: skipped: <reason>")
 *   test_train_ops cuda      cuda only; exit 77 (ctest: skipped) when it cannot train
 *
 * References: forward ops and the linear backward ops (GEMMs, LoRA, embedding LoRA, soft-row
 * scatter) are computed directly in double; the non-linear backward ops (rmsnorm_bwd,
 * silu_mul_bwd, cross_entropy's gradient, attention_bwd) against central finite differences of the
 * double forward (step 1e-6: truncation and rounding errors ~1e-10 relative); RoPE's backward
 * (sign −1) as the transpose of its forward (⟨R x, y⟩ = ⟨x, Rᵀ y⟩ checked in double); AdamW against
 * torch's formula in double.
 *
 * Error measure: NMSE = Σ(y − ref)² / Σ ref² per op. Tolerances:
 *   data movement (fill, gather_rows, scatter_rows, embed of an F32 table) 0 (exact)
 *   fp32 arithmetic and GEMMs (CPU: fp32 accumulation, or double)       CPU 1e-10
 *   embed of a Q8_0 table (against ds_dequant_row)                      CPU 1e-12
 * A float rounding is 2^-24 relative, so fp32 results have NMSE ~1e-14; an indexing or sign bug
 * gives ~1. */
#include "ds/backend.h"
#include "ds/backend_train.h"
#include "ds_test.h"
#include "unit/rand_weights.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct tcase {
    ds_backend *b;
    const struct ds_backend_train_iface *op;
    const char *name;
    double tol;
    void *allocs[128];
    int n_allocs;
} tcase;

static void *t_up(tcase *t, const void *host, size_t bytes) {
    void *d = t->b->iface->alloc(t->b->ctx, bytes ? bytes : 4);
    CHECK_MSG(d != NULL, "%s: alloc(%zu) failed", t->name, bytes);
    if (!d) exit(1);
    if (t->n_allocs < 128) t->allocs[t->n_allocs++] = d;
    if (host) CHECK_EQ_INT(t->b->iface->upload(t->b->ctx, d, host, bytes), DS_OK);
    return d;
}
static float *t_upf(tcase *t, const float *h, size_t n) { return t_up(t, h, n * sizeof(float)); }
static float *t_down(tcase *t, const void *dev, size_t n) {
    float *h = malloc(n * sizeof(float) + 4);
    CHECK_EQ_INT(t->b->iface->synchronize(t->b->ctx), DS_OK);
    CHECK_EQ_INT(t->b->iface->download(t->b->ctx, h, dev, n * sizeof(float)), DS_OK);
    return h;
}
static void t_release_all(tcase *t) {
    for (int i = 0; i < t->n_allocs; i++) t->b->iface->release(t->b->ctx, t->allocs[i]);
    t->n_allocs = 0;
}
static void t_ok(tcase *t, const char *op, int st) { CHECK_MSG(st == DS_OK, "%s %s: %s", t->name, op, ds_strerror(st)); }

static void expect(tcase *t, const char *op, const char *what, const float *got, const double *ref, size_t n,
                   double tol) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double e = (double)got[i] - ref[i];
        num += e * e;
        den += ref[i] * ref[i];
    }
    const double nmse = den > 0.0 ? num / den : num;
    printf("%-5s %-15s %-34s nmse %.2e (tol %.0e)\n", t->name, op, what, nmse, tol);
    CHECK_MSG(nmse <= tol && den > 0.0, "%s %s %s: nmse %.3e > %.0e (or an all-zero reference)", t->name, op, what,
              nmse, tol);
}
static double *dvec(size_t n) { return calloc(n ? n : 1, sizeof(double)); }
static double *dcopy(const float *x, size_t n) {
    double *d = dvec(n);
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

/* ---- GEMMs and bias ---- */

static void test_gemm(tcase *t) {
    const int32_t n = 7, m = 13, k = 19;
    const float alpha = 0.75f, beta = 0.5f;
    float *x = rnd_vec((size_t)n * k, 1), *w = rnd_vec((size_t)m * k, 1), *y0 = rnd_vec((size_t)n * m, 1);
    float *dy = rnd_vec((size_t)n * m, 1), *dx0 = rnd_vec((size_t)n * k, 1), *dw0 = rnd_vec((size_t)m * k, 1);
    double *ry = dvec((size_t)n * m), *rdx = dvec((size_t)n * k), *rdw = dvec((size_t)m * k);
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < m; j++) {
            double s = 0;
            for (int32_t l = 0; l < k; l++) s += (double)x[i * k + l] * w[j * k + l];
            ry[i * m + j] = alpha * s + beta * (double)y0[i * m + j];
        }
    for (int32_t i = 0; i < n; i++)
        for (int32_t l = 0; l < k; l++) {
            double s = 0;
            for (int32_t j = 0; j < m; j++) s += (double)dy[i * m + j] * w[j * k + l];
            rdx[i * k + l] = alpha * s + beta * (double)dx0[i * k + l];
        }
    for (int32_t j = 0; j < m; j++)
        for (int32_t l = 0; l < k; l++) {
            double s = 0;
            for (int32_t i = 0; i < n; i++) s += (double)dy[i * m + j] * x[i * k + l];
            rdw[j * k + l] = alpha * s + beta * (double)dw0[j * k + l];
        }
    float *dX = t_upf(t, x, (size_t)n * k), *dW = t_upf(t, w, (size_t)m * k), *dY = t_upf(t, y0, (size_t)n * m);
    float *dDY = t_upf(t, dy, (size_t)n * m), *dDX = t_upf(t, dx0, (size_t)n * k), *dDW = t_upf(t, dw0, (size_t)m * k);
    t_ok(t, "mm_nt", t->op->mm_nt(t->b->ctx, dX, dW, dY, n, m, k, alpha, beta));
    t_ok(t, "mm_nn", t->op->mm_nn(t->b->ctx, dDY, dW, dDX, n, m, k, alpha, beta));
    t_ok(t, "mm_tn", t->op->mm_tn(t->b->ctx, dDY, dX, dDW, n, m, k, alpha, beta));
    float *gy = t_down(t, dY, (size_t)n * m), *gdx = t_down(t, dDX, (size_t)n * k), *gdw = t_down(t, dDW, (size_t)m * k);
    expect(t, "mm_nt", "7x19 . (13x19)T, alpha .75 beta .5", gy, ry, (size_t)n * m, t->tol);
    expect(t, "mm_nn", "7x13 . 13x19", gdx, rdx, (size_t)n * k, t->tol);
    expect(t, "mm_tn", "(7x13)T . 7x19", gdw, rdw, (size_t)m * k, t->tol);
    /* add_bias */
    float *b = rnd_vec((size_t)m, 1);
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < m; j++) ry[i * m + j] = (double)gy[i * m + j] + b[j];
    float *dB = t_upf(t, b, (size_t)m);
    t_ok(t, "add_bias", t->op->add_bias(t->b->ctx, dY, dB, n, m));
    float *gb = t_down(t, dY, (size_t)n * m);
    expect(t, "add_bias", "7x13 + b", gb, ry, (size_t)n * m, t->tol);
    free(x), free(w), free(y0), free(dy), free(dx0), free(dw0), free(ry), free(rdx), free(rdw), free(gy), free(gdx);
    free(gdw), free(b), free(gb);
    t_release_all(t);
}

/* ---- RMSNorm ---- */

static double rms_fwd_d(const double *x, const float *w, int32_t d, double eps, int32_t i) {
    double ss = 0;
    for (int32_t j = 0; j < d; j++) ss += x[j] * x[j];
    return x[i] / sqrt(ss / d + eps) * w[i];
}

static void test_rmsnorm(tcase *t) {
    const int32_t n = 5, d = 48;
    const float eps = 1e-5f;
    float *x = rnd_vec((size_t)n * d, 2), *w = rnd_vec((size_t)d, 1), *dy = rnd_vec((size_t)n * d, 1);
    float *dx0 = rnd_vec((size_t)n * d, 1);
    double *ry = dvec((size_t)n * d), *rr = dvec((size_t)n), *rdx = dvec((size_t)n * d);
    for (int32_t r = 0; r < n; r++) {
        double *xr = dcopy(x + (size_t)r * d, (size_t)d);
        double ss = 0;
        for (int32_t j = 0; j < d; j++) ss += xr[j] * xr[j];
        rr[r] = 1.0 / sqrt(ss / d + eps);
        for (int32_t j = 0; j < d; j++) ry[r * d + j] = rms_fwd_d(xr, w, d, eps, j);
        for (int32_t i = 0; i < d; i++) { /* d/dx_i Σ_j dy_j y_j by central differences */
            const double h = 1e-6, x0 = xr[i];
            double lp = 0, lm = 0;
            xr[i] = x0 + h;
            for (int32_t j = 0; j < d; j++) lp += dy[r * d + j] * rms_fwd_d(xr, w, d, eps, j);
            xr[i] = x0 - h;
            for (int32_t j = 0; j < d; j++) lm += dy[r * d + j] * rms_fwd_d(xr, w, d, eps, j);
            xr[i] = x0;
            rdx[r * d + i] = dx0[r * d + i] + (lp - lm) / (2 * h); /* accumulated */
        }
        free(xr);
    }
    float *dX = t_upf(t, x, (size_t)n * d), *dW = t_upf(t, w, (size_t)d), *dY = t_upf(t, NULL, (size_t)n * d);
    float *dR = t_upf(t, NULL, (size_t)n), *dDY = t_upf(t, dy, (size_t)n * d), *dDX = t_upf(t, dx0, (size_t)n * d);
    t_ok(t, "rmsnorm_fwd", t->op->rmsnorm_fwd(t->b->ctx, dX, dW, dY, dR, n, d, eps));
    t_ok(t, "rmsnorm_bwd", t->op->rmsnorm_bwd(t->b->ctx, dX, dW, dR, dDY, dDX, n, d));
    float *gy = t_down(t, dY, (size_t)n * d), *gr = t_down(t, dR, (size_t)n), *gdx = t_down(t, dDX, (size_t)n * d);
    expect(t, "rmsnorm_fwd", "y, 5x48", gy, ry, (size_t)n * d, t->tol);
    expect(t, "rmsnorm_fwd", "rinv", gr, rr, (size_t)n, t->tol);
    expect(t, "rmsnorm_bwd", "dx += (finite differences)", gdx, rdx, (size_t)n * d, t->tol);
    free(x), free(w), free(dy), free(dx0), free(ry), free(rr), free(rdx), free(gy), free(gr), free(gdx);
    t_release_all(t);
}

/* ---- RoPE ---- */

static void rope_d(double *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t nh, int32_t hd, int sign) {
    const int32_t half = hd / 2;
    for (int32_t r = 0; r < n; r++)
        for (int32_t h = 0; h < nh; h++)
            for (int32_t i = 0; i < half; i++) {
                const double f = (double)pos[r] * inv_freq[i], c = cos(f), s = sign * sin(f);
                double *xh = x + ((size_t)r * nh + h) * hd;
                const double a = xh[i], b = xh[i + half];
                xh[i] = a * c - b * s, xh[i + half] = b * c + a * s;
            }
}

static void test_rope(tcase *t) {
    const int32_t n = 6, nh = 3, hd = 16, N = n * nh * hd;
    const int32_t pos[6] = {0, 1, 2, 7, 100, 1000};
    float inv_freq[8];
    for (int i = 0; i < hd / 2; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / hd);
    float *x = rnd_vec((size_t)N, 1), *y = rnd_vec((size_t)N, 1);
    const int32_t *dP = t_up(t, pos, sizeof pos);
    const float *dF = t_upf(t, inv_freq, (size_t)hd / 2);
    for (int sign = 1; sign >= -1; sign -= 2) {
        double *r = dcopy(x, (size_t)N);
        rope_d(r, pos, inv_freq, n, nh, hd, sign);
        float *dX = t_upf(t, x, (size_t)N);
        t_ok(t, "rope", t->op->rope(t->b->ctx, dX, dP, dF, n, nh, hd, sign));
        float *g = t_down(t, dX, (size_t)N);
        expect(t, "rope", sign > 0 ? "forward, positions to 1000" : "backward (sign -1)", g, r, (size_t)N, t->tol);
        free(r), free(g);
    }
    /* the backward is the forward's transpose: <R x, y> = <x, R^-1 y> */
    double *rx = dcopy(x, (size_t)N), *ry = dcopy(y, (size_t)N), a = 0, b = 0;
    rope_d(rx, pos, inv_freq, n, nh, hd, +1);
    rope_d(ry, pos, inv_freq, n, nh, hd, -1);
    for (int32_t i = 0; i < N; i++) a += rx[i] * y[i], b += (double)x[i] * ry[i];
    CHECK_MSG(fabs(a - b) <= 1e-9 * (fabs(a) + 1), "rope: <Rx,y> %.12g != <x,R^T y> %.12g", a, b);
    free(x), free(y), free(rx), free(ry);
    t_release_all(t);
}

/* ---- SiLU·mul ---- */

static double silu_d(double g) { return g / (1.0 + exp(-g)); }

static void test_silu_mul(tcase *t) {
    const size_t n = 300;
    float *g = rnd_vec(n, 6), *u = rnd_vec(n, 2), *dout = rnd_vec(n, 1);
    double *ro = dvec(n), *rdg = dvec(n), *rdu = dvec(n);
    for (size_t i = 0; i < n; i++) {
        const double h = 1e-6;
        ro[i] = silu_d(g[i]) * u[i];
        rdg[i] = dout[i] * u[i] * (silu_d(g[i] + h) - silu_d(g[i] - h)) / (2 * h);
        rdu[i] = dout[i] * silu_d(g[i]);
    }
    float *dG = t_upf(t, g, n), *dU = t_upf(t, u, n), *dO = t_upf(t, NULL, n), *dD = t_upf(t, dout, n);
    float *dDG = t_upf(t, NULL, n), *dDU = t_upf(t, NULL, n);
    t_ok(t, "silu_mul_fwd", t->op->silu_mul_fwd(t->b->ctx, dG, dU, dO, n));
    t_ok(t, "silu_mul_bwd", t->op->silu_mul_bwd(t->b->ctx, dG, dU, dD, dDG, dDU, n));
    float *go = t_down(t, dO, n), *gdg = t_down(t, dDG, n), *gdu = t_down(t, dDU, n);
    expect(t, "silu_mul_fwd", "out, |g| < 6", go, ro, n, t->tol);
    expect(t, "silu_mul_bwd", "dg (finite differences)", gdg, rdg, n, t->tol);
    expect(t, "silu_mul_bwd", "du", gdu, rdu, n, t->tol);
    free(g), free(u), free(dout), free(ro), free(rdg), free(rdu), free(go), free(gdg), free(gdu);
    t_release_all(t);
}

/* ---- LoRA ---- */

static void test_lora(tcase *t) {
    const int32_t n = 6, in = 20, out = 12, r = 4;
    const float s = 1.5f;
    float *x = rnd_vec((size_t)n * in, 1), *A = rnd_vec((size_t)r * in, 1), *B = rnd_vec((size_t)out * r, 1);
    float *y0 = rnd_vec((size_t)n * out, 1), *dy = rnd_vec((size_t)n * out, 1), *dx0 = rnd_vec((size_t)n * in, 1);
    float *dA0 = rnd_vec((size_t)r * in, 1), *dB0 = rnd_vec((size_t)out * r, 1);
    double *ru = dvec((size_t)n * r), *ry = dcopy(y0, (size_t)n * out), *tt = dvec((size_t)n * r);
    double *rdx = dcopy(dx0, (size_t)n * in), *rdA = dcopy(dA0, (size_t)r * in), *rdB = dcopy(dB0, (size_t)out * r);
    for (int32_t i = 0; i < n; i++)
        for (int32_t k = 0; k < r; k++)
            for (int32_t l = 0; l < in; l++) ru[i * r + k] += (double)x[i * in + l] * A[k * in + l];
    for (int32_t i = 0; i < n; i++)
        for (int32_t o = 0; o < out; o++)
            for (int32_t k = 0; k < r; k++) ry[i * out + o] += s * ru[i * r + k] * B[o * r + k];
    /* y = s·B·(A·x): dB = s·dyᵀu, du = s·dy·B, dA = duᵀx, dx = du·A */
    for (int32_t i = 0; i < n; i++)
        for (int32_t k = 0; k < r; k++)
            for (int32_t o = 0; o < out; o++) tt[i * r + k] += s * (double)dy[i * out + o] * B[o * r + k];
    for (int32_t o = 0; o < out; o++)
        for (int32_t k = 0; k < r; k++)
            for (int32_t i = 0; i < n; i++) rdB[o * r + k] += s * (double)dy[i * out + o] * ru[i * r + k];
    for (int32_t k = 0; k < r; k++)
        for (int32_t l = 0; l < in; l++)
            for (int32_t i = 0; i < n; i++) rdA[k * in + l] += tt[i * r + k] * x[i * in + l];
    for (int32_t i = 0; i < n; i++)
        for (int32_t l = 0; l < in; l++)
            for (int32_t k = 0; k < r; k++) rdx[i * in + l] += tt[i * r + k] * A[k * in + l];
    float *dX = t_upf(t, x, (size_t)n * in), *dAm = t_upf(t, A, (size_t)r * in), *dBm = t_upf(t, B, (size_t)out * r);
    float *dU = t_upf(t, NULL, (size_t)n * r), *dY = t_upf(t, y0, (size_t)n * out), *dDY = t_upf(t, dy, (size_t)n * out);
    float *dDX = t_upf(t, dx0, (size_t)n * in), *dDA = t_upf(t, dA0, (size_t)r * in), *dDB = t_upf(t, dB0, (size_t)out * r);
    float *dT = t_upf(t, NULL, (size_t)n * r);
    t_ok(t, "lora_fwd", t->op->lora_fwd(t->b->ctx, dX, dAm, dBm, s, dU, dY, n, in, out, r));
    t_ok(t, "lora_bwd", t->op->lora_bwd(t->b->ctx, dX, dU, dAm, dBm, s, dDY, dDX, dDA, dDB, dT, n, in, out, r));
    float *gu = t_down(t, dU, (size_t)n * r), *gy = t_down(t, dY, (size_t)n * out), *gdx = t_down(t, dDX, (size_t)n * in);
    float *gdA = t_down(t, dDA, (size_t)r * in), *gdB = t_down(t, dDB, (size_t)out * r);
    expect(t, "lora_fwd", "u = x.AT", gu, ru, (size_t)n * r, t->tol);
    expect(t, "lora_fwd", "y += s.u.BT", gy, ry, (size_t)n * out, t->tol);
    expect(t, "lora_bwd", "dx +=", gdx, rdx, (size_t)n * in, t->tol);
    expect(t, "lora_bwd", "dA +=", gdA, rdA, (size_t)r * in, t->tol);
    expect(t, "lora_bwd", "dB +=", gdB, rdB, (size_t)out * r, t->tol);
    free(x), free(A), free(B), free(y0), free(dy), free(dx0), free(dA0), free(dB0), free(ru), free(ry), free(tt);
    free(rdx), free(rdA), free(rdB), free(gu), free(gy), free(gdx), free(gdA), free(gdB);
    t_release_all(t);
}

/* ---- Embedding, soft rows, embedding LoRA ---- */

static void test_embed(tcase *t) {
    const int32_t V = 40, d = 64, n = 7, P = 3, r = 4;
    const int32_t src[7] = {5, -1, 39, -3, 0, 5, -2}; /* token ids and soft rows −(p+1) */
    float *soft = rnd_vec((size_t)P * d, 1);
    const int32_t *dS = t_up(t, src, sizeof src);
    const float *dSoft = t_upf(t, soft, (size_t)P * d);
    const ds_dtype types[2] = {DS_DTYPE_F32, DS_DTYPE_Q8_0};
    for (int ti = 0; ti < 2; ti++) {
        uint8_t *tab = rnd_typed(types[ti], V, d);
        const ds_weight hw = {.data = tab, .dtype = types[ti], .rows = V, .cols = d,
                              .row_bytes = ds_dtype_row_bytes(types[ti], d)};
        ds_mat mat = {0};
        t_ok(t, "mat_upload", t->b->iface->mat_upload(t->b->ctx, &hw, &mat));
        double *ref = dvec((size_t)n * d);
        float *row = malloc((size_t)d * sizeof(float));
        /* A backend that holds its weights as bf16 copies (the CUDA backend's mat_upload) embeds
         * the bf16 rounding of each dequantised row; soft rows are fp32 either way. */
        const bool bf16_table = mat.dtype == DS_DTYPE_BF16 && types[ti] != DS_DTYPE_BF16;
        for (int32_t i = 0; i < n; i++) {
            if (src[i] >= 0) ds_dequant_row(types[ti], tab + (size_t)src[i] * hw.row_bytes, row, d);
            else memcpy(row, soft + (size_t)(-src[i] - 1) * d, (size_t)d * sizeof(float));
            for (int32_t j = 0; j < d; j++)
                ref[i * d + j] = bf16_table && src[i] >= 0 ? ds_bf16_to_f32(ds_f32_to_bf16(row[j])) : row[j];
        }
        float *dO = t_upf(t, NULL, (size_t)n * d);
        t_ok(t, "embed", t->op->embed(t->b->ctx, &mat, dSoft, dS, dO, n, d));
        float *g = t_down(t, dO, (size_t)n * d);
        expect(t, "embed", ti ? "Q8_0 table + soft rows" : "F32 table + soft rows", g, ref, (size_t)n * d,
               ti ? 1e-12 : 0.0);
        t->b->iface->mat_free(t->b->ctx, &mat);
        free(tab), free(ref), free(row), free(g);
    }
    /* embed_bwd_soft: dsoft[p] += Σ dx[t] over the rows of soft row p */
    float *dx = rnd_vec((size_t)n * d, 1), *ds0 = rnd_vec((size_t)P * d, 1);
    double *rds = dcopy(ds0, (size_t)P * d);
    for (int32_t i = 0; i < n; i++)
        if (src[i] < 0)
            for (int32_t j = 0; j < d; j++) rds[(size_t)(-src[i] - 1) * d + j] += dx[i * d + j];
    float *dDX = t_upf(t, dx, (size_t)n * d), *dDS = t_upf(t, ds0, (size_t)P * d);
    t_ok(t, "embed_bwd_soft", t->op->embed_bwd_soft(t->b->ctx, dS, dDX, dDS, n, d));
    float *gds = t_down(t, dDS, (size_t)P * d);
    expect(t, "embed_bwd_soft", "dsoft +=", gds, rds, (size_t)P * d, t->tol);
    /* embedding LoRA: u[t] = A_T[src[t]] (0 for soft rows), y += s·u·Bᵀ; dB += s·dyᵀu, dA_T[src] += s·dy·B */
    const float s = 0.5f;
    float *AT = rnd_vec((size_t)V * r, 1), *B = rnd_vec((size_t)d * r, 1), *y0 = rnd_vec((size_t)n * d, 1);
    float *dAT0 = rnd_vec((size_t)V * r, 1), *dB0 = rnd_vec((size_t)d * r, 1);
    double *ru = dvec((size_t)n * r), *ry = dcopy(y0, (size_t)n * d), *rdAT = dcopy(dAT0, (size_t)V * r);
    double *rdB = dcopy(dB0, (size_t)d * r);
    for (int32_t i = 0; i < n; i++)
        for (int32_t k = 0; k < r; k++) ru[i * r + k] = src[i] >= 0 ? AT[(size_t)src[i] * r + k] : 0.0;
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < d; j++)
            for (int32_t k = 0; k < r; k++) ry[i * d + j] += s * ru[i * r + k] * B[j * r + k];
    for (int32_t j = 0; j < d; j++)
        for (int32_t k = 0; k < r; k++)
            for (int32_t i = 0; i < n; i++) rdB[j * r + k] += s * (double)dx[i * d + j] * ru[i * r + k];
    for (int32_t i = 0; i < n; i++)
        if (src[i] >= 0)
            for (int32_t k = 0; k < r; k++)
                for (int32_t j = 0; j < d; j++) rdAT[(size_t)src[i] * r + k] += s * (double)dx[i * d + j] * B[j * r + k];
    float *dAT = t_upf(t, AT, (size_t)V * r), *dBm = t_upf(t, B, (size_t)d * r), *dU = t_upf(t, NULL, (size_t)n * r);
    float *dY = t_upf(t, y0, (size_t)n * d), *dDAT = t_upf(t, dAT0, (size_t)V * r), *dDB = t_upf(t, dB0, (size_t)d * r);
    float *dT = t_upf(t, NULL, (size_t)n * r);
    t_ok(t, "embed_lora_fwd", t->op->embed_lora_fwd(t->b->ctx, dAT, dBm, s, dS, dU, dY, n, d, r));
    t_ok(t, "embed_lora_bwd", t->op->embed_lora_bwd(t->b->ctx, dBm, s, dS, dU, dDX, dDAT, dDB, dT, n, d, r));
    float *gu = t_down(t, dU, (size_t)n * r), *gy = t_down(t, dY, (size_t)n * d);
    float *gdAT = t_down(t, dDAT, (size_t)V * r), *gdB = t_down(t, dDB, (size_t)d * r);
    expect(t, "embed_lora_fwd", "u (0 on soft rows)", gu, ru, (size_t)n * r, t->tol);
    expect(t, "embed_lora_fwd", "y += s.u.BT", gy, ry, (size_t)n * d, t->tol);
    expect(t, "embed_lora_bwd", "dA_T += (repeated token 5)", gdAT, rdAT, (size_t)V * r, t->tol);
    expect(t, "embed_lora_bwd", "dB +=", gdB, rdB, (size_t)d * r, t->tol);
    free(soft), free(dx), free(ds0), free(rds), free(gds), free(AT), free(B), free(y0), free(dAT0), free(dB0);
    free(ru), free(ry), free(rdAT), free(rdB), free(gu), free(gy), free(gdAT), free(gdB);
    t_release_all(t);
}

/* ---- Cross-entropy ---- */

static double ce_d(const double *z, int32_t V, int32_t tgt) {
    double mx = z[0], s = 0;
    for (int32_t j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
    for (int32_t j = 0; j < V; j++) s += exp(z[j] - mx);
    return mx + log(s) - z[tgt];
}

static void test_cross_entropy(tcase *t) {
    const int32_t n = 5, V = 97;
    const int32_t tgt[5] = {0, 96, 13, 13, 50};
    const float scale = 0.25f;
    float *z = rnd_vec((size_t)n * V, 8);
    double loss_ref = 0;
    double *rg = dvec((size_t)n * V);
    for (int32_t i = 0; i < n; i++) {
        double *zr = dcopy(z + (size_t)i * V, (size_t)V);
        loss_ref += ce_d(zr, V, tgt[i]);
        for (int32_t j = 0; j < V; j++) {
            const double h = 1e-6, z0 = zr[j];
            zr[j] = z0 + h;
            const double lp = ce_d(zr, V, tgt[i]);
            zr[j] = z0 - h;
            const double lm = ce_d(zr, V, tgt[i]);
            zr[j] = z0;
            rg[i * V + j] = scale * (lp - lm) / (2 * h);
        }
        free(zr);
    }
    const int32_t *dT = t_up(t, tgt, sizeof tgt);
    float *dZ = t_upf(t, z, (size_t)n * V);
    double loss = 0;
    t_ok(t, "cross_entropy", t->op->cross_entropy(t->b->ctx, dZ, dT, n, V, scale, false, &loss));
    float gl = (float)loss;
    expect(t, "cross_entropy", "loss (no grad), logits to +-8", &gl, &loss_ref, 1, t->tol);
    float *gz = t_down(t, dZ, (size_t)n * V);
    CHECK_MSG(!memcmp(gz, z, (size_t)n * V * sizeof(float)), "%s cross_entropy without grad changed the logits", t->name);
    loss = 0;
    t_ok(t, "cross_entropy", t->op->cross_entropy(t->b->ctx, dZ, dT, n, V, scale, true, &loss));
    gl = (float)loss;
    expect(t, "cross_entropy", "loss (grad)", &gl, &loss_ref, 1, t->tol);
    float *gg = t_down(t, dZ, (size_t)n * V);
    expect(t, "cross_entropy", "scale.dCE/dlogits (finite diff.)", gg, rg, (size_t)n * V, t->tol);
    free(z), free(rg), free(gz), free(gg);
    t_release_all(t);
}

/* ---- Attention ---- */

typedef struct attn_geo {
    int32_t n_head, n_kv, hd, P, n_seqs, rows;
    ds_train_attn_seq seqs[3];
} attn_geo;

/* out = softmax(scale·q·kᵀ + causal mask)·v over [prefix; own rows], all in double. */
static void attn_fwd_d(const attn_geo *g, const double *q, const double *k, const double *v, const double *pk,
                       const double *pv, double *out, double *lse) {
    const int32_t qd = g->n_head * g->hd, kvd = g->n_kv * g->hd, grp = g->n_head / g->n_kv;
    const double scale = 1.0 / sqrt((double)g->hd);
    double sc[64];
    for (int32_t s = 0; s < g->n_seqs; s++)
        for (int32_t i = 0; i < g->seqs[s].len; i++)
            for (int32_t h = 0; h < g->n_head; h++) {
                const int32_t row = g->seqs[s].row0 + i, kh = h / grp, nv = g->P + i + 1;
                const double *qi = q + (size_t)row * qd + h * g->hd;
                double mx = -1e300;
                for (int32_t j = 0; j < nv; j++) {
                    const double *kj = j < g->P ? pk + (size_t)j * kvd + kh * g->hd
                                                : k + (size_t)(g->seqs[s].row0 + j - g->P) * kvd + kh * g->hd;
                    double dot = 0;
                    for (int32_t c = 0; c < g->hd; c++) dot += qi[c] * kj[c];
                    sc[j] = scale * dot;
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                double sum = 0;
                for (int32_t j = 0; j < nv; j++) sum += exp(sc[j] - mx);
                if (lse) lse[(size_t)row * g->n_head + h] = mx + log(sum);
                double *o = out + (size_t)row * qd + h * g->hd;
                for (int32_t c = 0; c < g->hd; c++) o[c] = 0;
                for (int32_t j = 0; j < nv; j++) {
                    const double p = exp(sc[j] - mx) / sum;
                    const double *vj = j < g->P ? pv + (size_t)j * kvd + kh * g->hd
                                                : v + (size_t)(g->seqs[s].row0 + j - g->P) * kvd + kh * g->hd;
                    for (int32_t c = 0; c < g->hd; c++) o[c] += p * vj[c];
                }
            }
}

/* Σ dout·out: the scalar whose gradient attention_bwd computes. */
static double attn_loss_d(const attn_geo *g, double *const in[5], const float *dout) {
    const size_t N = (size_t)g->rows * g->n_head * g->hd;
    double *out = dvec(N), l = 0;
    attn_fwd_d(g, in[0], in[1], in[2], in[3], in[4], out, NULL);
    for (size_t i = 0; i < N; i++) l += out[i] * dout[i];
    free(out);
    return l;
}

static void test_attention(tcase *t, int32_t P) {
    attn_geo g = {.n_head = 4, .n_kv = 2, .hd = 8, .P = P, .n_seqs = 3, .rows = 12,
                  .seqs = {{0, 5}, {5, 1}, {6, 6}}};
    const int32_t qd = g.n_head * g.hd, kvd = g.n_kv * g.hd;
    const size_t nq = (size_t)g.rows * qd, nk = (size_t)g.rows * kvd, np = (size_t)(P ? P : 1) * kvd;
    float *q = rnd_vec(nq, 1.5f), *k = rnd_vec(nk, 1.5f), *v = rnd_vec(nk, 1), *pk = rnd_vec(np, 1.5f);
    float *pv = rnd_vec(np, 1), *dout = rnd_vec(nq, 1);
    double *in[5] = {dcopy(q, nq), dcopy(k, nk), dcopy(v, nk), dcopy(pk, np), dcopy(pv, np)};
    const size_t sizes[5] = {nq, nk, nk, P ? np : 0, P ? np : 0};
    double *rout = dvec(nq), *rlse = dvec((size_t)g.rows * g.n_head), *rgrad[5];
    attn_fwd_d(&g, in[0], in[1], in[2], in[3], in[4], rout, rlse);
    for (int a = 0; a < 5; a++) { /* gradients of Σ dout·out by central differences */
        rgrad[a] = dvec(sizes[a]);
        for (size_t i = 0; i < sizes[a]; i++) {
            const double h = 1e-6, x0 = in[a][i];
            in[a][i] = x0 + h;
            const double lp = attn_loss_d(&g, in, dout);
            in[a][i] = x0 - h;
            const double lm = attn_loss_d(&g, in, dout);
            in[a][i] = x0;
            rgrad[a][i] = (lp - lm) / (2 * h);
        }
    }
    const size_t wf = t->op->attn_work_floats(t->b->ctx, 6, P, g.hd);
    ds_train_attn_args a = {.q = t_upf(t, q, nq), .k = t_upf(t, k, nk), .v = t_upf(t, v, nk),
                            .pk = P ? t_upf(t, pk, np) : NULL, .pv = P ? t_upf(t, pv, np) : NULL,
                            .p_stride = (size_t)kvd, .n_prefix = P, .out = t_upf(t, NULL, nq),
                            .lse = t_upf(t, NULL, (size_t)g.rows * g.n_head), .seqs = g.seqs, .n_seqs = g.n_seqs,
                            .n_head = g.n_head, .n_kv = g.n_kv, .hd = g.hd, .scale = 1.0f / sqrtf((float)g.hd),
                            .work = t_upf(t, NULL, wf)};
    t_ok(t, "attention_fwd", t->op->attention_fwd(t->b->ctx, &a));
    float *dD = t_upf(t, dout, nq), *dq = t_upf(t, NULL, nq), *dk = t_upf(t, NULL, nk), *dv = t_upf(t, NULL, nk);
    float *dpk = P ? t_upf(t, NULL, np) : NULL, *dpv = P ? t_upf(t, NULL, np) : NULL;
    t_ok(t, "attention_bwd", t->op->attention_bwd(t->b->ctx, &a, dD, dq, dk, dv, dpk, dpv));
    char what[64];
    float *go = t_down(t, a.out, nq), *gl = t_down(t, a.lse, (size_t)g.rows * g.n_head);
    snprintf(what, sizeof what, "out, GQA 4/2, seqs 5+1+6, prefix %d", P);
    expect(t, "attention_fwd", what, go, rout, nq, t->tol);
    expect(t, "attention_fwd", "lse", gl, rlse, (size_t)g.rows * g.n_head, t->tol);
    float *gg[5] = {t_down(t, dq, nq), t_down(t, dk, nk), t_down(t, dv, nk), P ? t_down(t, dpk, np) : NULL,
                    P ? t_down(t, dpv, np) : NULL};
    const char *names[5] = {"dq (finite differences)", "dk", "dv", "d prefix k", "d prefix v"};
    for (int i = 0; i < (P ? 5 : 3); i++) expect(t, "attention_bwd", names[i], gg[i], rgrad[i], sizes[i], t->tol);
    for (int i = 0; i < 5; i++) free(in[i]), free(rgrad[i]), free(gg[i]);
    free(q), free(k), free(v), free(pk), free(pv), free(dout), free(rout), free(rlse), free(go), free(gl);
    t_release_all(t);
}

/* ---- Optimizer ---- */

static void test_optim(tcase *t) {
    const size_t n = 1000;
    float *x = rnd_vec(n, 3);
    double ss_ref = 0.5; /* sumsq accumulates onto *out */
    for (size_t i = 0; i < n; i++) ss_ref += (double)x[i] * x[i];
    float *dX = t_upf(t, x, n);
    double ss = 0.5;
    t_ok(t, "sumsq", t->op->sumsq(t->b->ctx, dX, n, &ss));
    float gs = (float)ss;
    expect(t, "sumsq", "0.5 + sum x^2", &gs, &ss_ref, 1, t->tol);
    double *rx = dvec(n);
    for (size_t i = 0; i < n; i++) rx[i] = (double)x[i] * 0.3;
    t_ok(t, "scale", t->op->scale(t->b->ctx, dX, n, 0.3));
    float *gx = t_down(t, dX, n);
    expect(t, "scale", "x * 0.3", gx, rx, n, t->tol);
    /* AdamW, torch.optim.AdamW (decoupled decay), two steps from nonzero moments */
    float *w = rnd_vec(n, 1), *gr = rnd_vec(n, 0.1f), *m = rnd_vec(n, 0.01f), *v = rnd_vec(n, 0.001f);
    for (size_t i = 0; i < n; i++) v[i] = fabsf(v[i]);
    double *rw = dcopy(w, n), *rm = dcopy(m, n), *rv = dcopy(v, n);
    float *dW = t_upf(t, w, n), *dG = t_upf(t, gr, n), *dM = t_upf(t, m, n), *dV = t_upf(t, v, n);
    for (int64_t step = 3; step <= 4; step++) {
        const ds_adamw_args a = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.1f,
                                 .step = step};
        const double bc1 = 1 - pow(0.9f, (double)step), bc2 = 1 - pow(0.999f, (double)step);
        for (size_t i = 0; i < n; i++) {
            rw[i] *= 1 - (double)a.lr * a.weight_decay;
            rm[i] = (double)a.beta1 * rm[i] + (1 - (double)a.beta1) * gr[i];
            rv[i] = (double)a.beta2 * rv[i] + (1 - (double)a.beta2) * (double)gr[i] * gr[i];
            rw[i] -= a.lr / bc1 * rm[i] / (sqrt(rv[i]) / sqrt(bc2) + a.eps);
        }
        t_ok(t, "adamw", t->op->adamw(t->b->ctx, dW, dG, dM, dV, n, &a));
    }
    float *gw = t_down(t, dW, n), *gm = t_down(t, dM, n), *gv = t_down(t, dV, n);
    expect(t, "adamw", "w after steps 3, 4 (wd 0.1)", gw, rw, n, t->tol);
    expect(t, "adamw", "m", gm, rm, n, t->tol);
    expect(t, "adamw", "v", gv, rv, n, t->tol);
    free(x), free(rx), free(gx), free(w), free(gr), free(m), free(v), free(rw), free(rm), free(rv), free(gw), free(gm);
    free(gv);
    t_release_all(t);
}

/* ---- Data movement: fill, gather_rows, scatter_rows (exact) ---- */

static void test_movement(tcase *t) {
    const int32_t rows = 9, d = 24, n = 4;
    const int32_t idx[4] = {7, 0, 3, 8}; /* distinct, unordered */
    const size_t N = (size_t)rows * d;
    float *src = rnd_vec(N, 1), *dst0 = rnd_vec(N, 1), *small = rnd_vec((size_t)n * d, 1);
    double *rf = dvec(N), *rg = dvec((size_t)n * d), *rs = dcopy(dst0, N);
    for (size_t i = 0; i < N; i++) rf[i] = -2.5;
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < d; j++) {
            rg[i * d + j] = src[(size_t)idx[i] * d + j];
            rs[(size_t)idx[i] * d + j] = small[i * d + j];
        }
    const int32_t *dI = t_up(t, idx, sizeof idx);
    float *dF = t_upf(t, src, N), *dSrc = t_upf(t, src, N), *dG = t_upf(t, NULL, (size_t)n * d);
    float *dSm = t_upf(t, small, (size_t)n * d), *dDst = t_upf(t, dst0, N), *dZ = t_upf(t, src, N);
    t_ok(t, "fill", t->op->fill(t->b->ctx, dF, N, -2.5f));
    t_ok(t, "fill", t->op->fill(t->b->ctx, dZ, N, 0.0f));
    t_ok(t, "gather_rows", t->op->gather_rows(t->b->ctx, dSrc, dI, dG, n, d));
    t_ok(t, "scatter_rows", t->op->scatter_rows(t->b->ctx, dSm, dI, dDst, n, d));
    float *gf = t_down(t, dF, N), *gz = t_down(t, dZ, N), *gg = t_down(t, dG, (size_t)n * d), *gs = t_down(t, dDst, N);
    expect(t, "fill", "216 floats = -2.5", gf, rf, N, 0.0);
    bool zero = true;
    for (size_t i = 0; i < N; i++) zero &= gz[i] == 0.0f && !signbit(gz[i]);
    CHECK_MSG(zero, "%s fill 0: not all +0.0", t->name);
    expect(t, "gather_rows", "rows 7,0,3,8 of 9x24", gg, rg, (size_t)n * d, 0.0);
    expect(t, "scatter_rows", "into rows 7,0,3,8 (others kept)", gs, rs, N, 0.0);
    free(src), free(dst0), free(small), free(rf), free(rg), free(rs), free(gf), free(gz), free(gg), free(gs);
    t_release_all(t);
}

static void run_backend(const char *name, double tol, bool only) {
    ds_err err = {{0}};
    ds_backend_params bp = ds_backend_default_params();
    ds_backend *b = ds_backend_create(name, &bp, &err);
    const char *why = !b ? err.msg : !b->iface->train ? "no training ops (ds_backend_iface.train is NULL)" : NULL;
    if (why) {
        if (only) SKIP("%s: %s", name, why);
        printf("%s: skipped: %s\n", name, why);
        ds_backend_free(b);
        return;
    }
    tcase t = {.b = b, .op = b->iface->train, .name = name, .tol = tol};
    CHECK_EQ_INT(t.op->version, DS_BACKEND_TRAIN_IFACE_VERSION);
    test_gemm(&t);
    test_rmsnorm(&t);
    test_rope(&t);
    test_silu_mul(&t);
    test_lora(&t);
    test_embed(&t);
    test_cross_entropy(&t);
    test_attention(&t, 0);
    test_attention(&t, 3);
    test_optim(&t);
    test_movement(&t);
    ds_backend_free(b);
}

int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : NULL;
    if (!only || !strcmp(only, "cpu")) run_backend("cpu", 1e-10, only != NULL);
    if (!only || !strcmp(only, "cuda")) run_backend("cuda", 1e-9, only != NULL);
    return ds_test_result();
}
