/* Element-wise and GEMM ops of training (see train_ops.h). Host fp32; reductions in double. */
#include "train/train_ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

void tr_mm_nt(const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float alpha, float beta) {
    if (n <= 0 || m <= 0 || k <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, k, alpha, x, k, w, k, beta, y, m);
}

void tr_mm_nn(const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k, float alpha, float beta) {
    if (n <= 0 || m <= 0 || k <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, m, alpha, dy, m, w, k, beta, dx, k);
}

void tr_mm_tn(const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k, float alpha, float beta) {
    if (n <= 0 || m <= 0 || k <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, k, n, alpha, dy, m, x, k, beta, dw, k);
}

void tr_add_bias(float *y, const float *b, int32_t n, int32_t m) {
    for (int32_t t = 0; t < n; t++)
        for (int32_t j = 0; j < m; j++) y[(size_t)t * m + j] += b[j];
}

void tr_rmsnorm_fwd(const float *x, const float *w, float *y, float *rinv, int32_t n, int32_t d, float eps) {
    for (int32_t t = 0; t < n; t++) {
        const float *xr = x + (size_t)t * d;
        float *yr = y + (size_t)t * d;
        double ss = 0.0;
        for (int32_t i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
        const float r = 1.0f / sqrtf((float)(ss / d) + eps); /* same rounding as the CPU backend */
        rinv[t] = r;
        for (int32_t i = 0; i < d; i++) yr[i] = (xr[i] * r) * w[i];
    }
}

void tr_rmsnorm_bwd(const float *x, const float *w, const float *rinv, const float *dy, float *dx, int32_t n,
                    int32_t d) {
    for (int32_t t = 0; t < n; t++) {
        const float *xr = x + (size_t)t * d, *g = dy + (size_t)t * d;
        float *o = dx + (size_t)t * d;
        const double r = rinv[t];
        double dot = 0.0; /* Σ wᵢ·dyᵢ·xᵢ */
        for (int32_t i = 0; i < d; i++) dot += (double)w[i] * g[i] * xr[i];
        const double c = r * r * r * dot / d;
        for (int32_t i = 0; i < d; i++) o[i] += (float)(r * w[i] * g[i] - c * xr[i]);
    }
}

void tr_rope(float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head, int32_t hd, int sign) {
    const int32_t half = hd / 2;
    for (int32_t t = 0; t < n; t++) {
        for (int32_t i = 0; i < half; i++) {
            const float f = (float)pos[t] * inv_freq[i];
            const float c = cosf(f), s = sign < 0 ? -sinf(f) : sinf(f);
            for (int32_t h = 0; h < n_head; h++) {
                float *xh = x + ((size_t)t * n_head + h) * hd;
                const float a = xh[i], b = xh[i + half];
                xh[i] = a * c - b * s; /* x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁] */
                xh[i + half] = b * c + a * s;
            }
        }
    }
}

void tr_silu_mul_fwd(const float *g, const float *u, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void tr_silu_mul_bwd(const float *g, const float *u, const float *dout, float *dg, float *du, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const float sg = 1.0f / (1.0f + expf(-g[i]));
        const float silu = g[i] * sg;
        const float dout_i = dout[i];
        dg[i] = dout_i * u[i] * (sg * (1.0f + g[i] * (1.0f - sg)));
        du[i] = dout_i * silu;
    }
}

void tr_lora_fwd(const float *x, const float *A, const float *B, float s, float *u, float *y, int32_t n, int32_t in,
                 int32_t out, int32_t r) {
    tr_mm_nt(x, A, u, n, r, in, 1.0f, 0.0f);
    tr_mm_nt(u, B, y, n, out, r, s, 1.0f);
}

void tr_lora_bwd(const float *x, const float *u, const float *A, const float *B, float s, const float *dy, float *dx,
                 float *dA, float *dB, float *tmp, int32_t n, int32_t in, int32_t out, int32_t r) {
    tr_mm_tn(dy, u, dB, n, out, r, s, 1.0f);  /* dB[out][r] += s·dyᵀ·u */
    tr_mm_nn(dy, B, tmp, n, out, r, s, 0.0f); /* t[n][r] = s·dy·B = dL/du */
    tr_mm_tn(tmp, x, dA, n, r, in, 1.0f, 1.0f); /* dA[r][in] += tᵀ·x */
    if (dx) tr_mm_nn(tmp, A, dx, n, r, in, 1.0f, 1.0f); /* dx += t·A */
}

void tr_embed_lora_fwd(const float *A_T, const float *B, float s, const int32_t *src, float *u, float *y, int32_t n,
                       int32_t d, int32_t r) {
    for (int32_t t = 0; t < n; t++) {
        float *ut = u + (size_t)t * r;
        if (src[t] >= 0) memcpy(ut, A_T + (size_t)src[t] * r, (size_t)r * sizeof(float));
        else memset(ut, 0, (size_t)r * sizeof(float));
    }
    tr_mm_nt(u, B, y, n, d, r, s, 1.0f);
}

void tr_embed_lora_bwd(const float *B, float s, const int32_t *src, const float *u, const float *dy, float *dA_T,
                       float *dB, float *tmp, int32_t n, int32_t d, int32_t r) {
    tr_mm_tn(dy, u, dB, n, d, r, s, 1.0f);   /* dB += s·dyᵀ·u */
    tr_mm_nn(dy, B, tmp, n, d, r, s, 0.0f);  /* t = s·dy·B = dL/du */
    for (int32_t t = 0; t < n; t++) {
        if (src[t] < 0) continue;
        float *o = dA_T + (size_t)src[t] * r;
        for (int32_t k = 0; k < r; k++) o[k] += tmp[(size_t)t * r + k];
    }
}

void tr_embed(const float *embd, const float *soft, const int32_t *src, float *out, int32_t n, int32_t d) {
    for (int32_t t = 0; t < n; t++) {
        const float *row = src[t] >= 0 ? embd + (size_t)src[t] * d : soft + (size_t)(-src[t] - 1) * d;
        memcpy(out + (size_t)t * d, row, (size_t)d * sizeof(float));
    }
}

void tr_embed_bwd_soft(const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d) {
    for (int32_t t = 0; t < n; t++) {
        if (src[t] >= 0) continue;
        float *o = dsoft + (size_t)(-src[t] - 1) * d;
        const float *g = dx + (size_t)t * d;
        for (int32_t i = 0; i < d; i++) o[i] += g[i];
    }
}

double tr_cross_entropy(float *logits, const int32_t *target, int32_t n, int32_t V, float scale, bool grad) {
    double total = 0.0;
    for (int32_t t = 0; t < n; t++) {
        float *z = logits + (size_t)t * V;
        float mx = z[0];
        for (int32_t j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
        double sum = 0.0;
        for (int32_t j = 0; j < V; j++) sum += exp((double)z[j] - mx);
        const double lse = mx + log(sum);
        total += lse - z[target[t]];
        if (!grad) continue;
        for (int32_t j = 0; j < V; j++) z[j] = (float)(exp((double)z[j] - lse) * scale);
        z[target[t]] -= scale;
    }
    return total;
}
