/* The CPU backend's training ops (ds/backend_train.h): the reference implementation, host fp32,
 * OpenBLAS GEMMs, reductions in double. The tr_* helpers are the math; the cpu_t_* functions at the
 * end adapt them to the table's (ctx, ..., return status) shape.
 *
 * Attention (causal GQA with an optional prefix), per (sequence, query head): K̃ = [prefix K ; own K] and Ṽ likewise (the KV head's columns),
 * S = scale·Q·K̃ᵀ with the causal mask (row i sees prefix slots and own rows ≤ i), P = softmax(S),
 * O = P·Ṽ. Backward (e.g. Dao et al., FlashAttention, alg. 2): P is recomputed from the saved
 * log-sum-exp, dṼ = Pᵀ·dO, dP = dO·Ṽᵀ, dS = P⊙(dP − rowsum(P⊙dP)), dQ = scale·dS·K̃,
 * dK̃ = scale·dSᵀ·Q; the prefix rows of dK̃/dṼ are the prefix gradients (no RoPE on them). */
#include "backend/cpu/cpu_train.h"
#include "backend/cpu/qmatmul.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* ---- GEMMs and element-wise ops ---- */

static void tr_mm_nt(const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float alpha,
                     float beta) {
    if (n <= 0 || m <= 0 || k <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, k, alpha, x, k, w, k, beta, y, m);
}

static void tr_mm_nn(const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k, float alpha,
                     float beta) {
    if (n <= 0 || m <= 0 || k <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, m, alpha, dy, m, w, k, beta, dx, k);
}

static void tr_mm_tn(const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k, float alpha,
                     float beta) {
    if (n <= 0 || m <= 0 || k <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, k, n, alpha, dy, m, x, k, beta, dw, k);
}

static void tr_add_bias(float *y, const float *b, int32_t n, int32_t m) {
    for (int32_t t = 0; t < n; t++)
        for (int32_t j = 0; j < m; j++) y[(size_t)t * m + j] += b[j];
}

static void tr_rmsnorm_fwd(const float *x, const float *w, float *y, float *rinv, int32_t n, int32_t d, float eps) {
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

static void tr_rmsnorm_bwd(const float *x, const float *w, const float *rinv, const float *dy, float *dx, int32_t n,
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

static void tr_rope(float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head, int32_t hd,
                    int sign) {
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

static void tr_silu_mul_fwd(const float *g, const float *u, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void tr_silu_mul_bwd(const float *g, const float *u, const float *dout, float *dg, float *du, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const float sg = 1.0f / (1.0f + expf(-g[i]));
        const float silu = g[i] * sg;
        const float dout_i = dout[i];
        dg[i] = dout_i * u[i] * (sg * (1.0f + g[i] * (1.0f - sg)));
        du[i] = dout_i * silu;
    }
}

static void tr_lora_fwd(const float *x, const float *A, const float *B, float s, float *u, float *y, int32_t n,
                        int32_t in, int32_t out, int32_t r) {
    tr_mm_nt(x, A, u, n, r, in, 1.0f, 0.0f);
    tr_mm_nt(u, B, y, n, out, r, s, 1.0f);
}

static void tr_lora_bwd(const float *x, const float *u, const float *A, const float *B, float s, const float *dy,
                        float *dx, float *dA, float *dB, float *tmp, int32_t n, int32_t in, int32_t out, int32_t r) {
    tr_mm_tn(dy, u, dB, n, out, r, s, 1.0f);  /* dB[out][r] += s·dyᵀ·u */
    tr_mm_nn(dy, B, tmp, n, out, r, s, 0.0f); /* t[n][r] = s·dy·B = dL/du */
    tr_mm_tn(tmp, x, dA, n, r, in, 1.0f, 1.0f); /* dA[r][in] += tᵀ·x */
    if (dx) tr_mm_nn(tmp, A, dx, n, r, in, 1.0f, 1.0f); /* dx += t·A */
}

static void tr_embed_lora_fwd(const float *A_T, const float *B, float s, const int32_t *src, float *u, float *y,
                              int32_t n, int32_t d, int32_t r) {
    for (int32_t t = 0; t < n; t++) {
        float *ut = u + (size_t)t * r;
        if (src[t] >= 0) memcpy(ut, A_T + (size_t)src[t] * r, (size_t)r * sizeof(float));
        else memset(ut, 0, (size_t)r * sizeof(float));
    }
    tr_mm_nt(u, B, y, n, d, r, s, 1.0f);
}

static void tr_embed_lora_bwd(const float *B, float s, const int32_t *src, const float *u, const float *dy, float *dA_T,
                       float *dB, float *tmp, int32_t n, int32_t d, int32_t r) {
    tr_mm_tn(dy, u, dB, n, d, r, s, 1.0f);   /* dB += s·dyᵀ·u */
    tr_mm_nn(dy, B, tmp, n, d, r, s, 0.0f);  /* t = s·dy·B = dL/du */
    for (int32_t t = 0; t < n; t++) {
        if (src[t] < 0) continue;
        float *o = dA_T + (size_t)src[t] * r;
        for (int32_t k = 0; k < r; k++) o[k] += tmp[(size_t)t * r + k];
    }
}

static int tr_embed(const ds_mat *embd, const float *soft, const int32_t *src, float *out, int32_t n, int32_t d) {
    if (embd->cols != d) return DS_EINVAL;
    for (int32_t t = 0; t < n; t++) {
        float *o = out + (size_t)t * d;
        if (src[t] >= 0) {
            int rc = ds_qk_embed(ds_qk_best(NULL), embd, &src[t], o, 1);
            if (rc) return rc;
        } else {
            memcpy(o, soft + (size_t)(-src[t] - 1) * d, (size_t)d * sizeof(float));
        }
    }
    return 0;
}

static void tr_embed_bwd_soft(const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d) {
    for (int32_t t = 0; t < n; t++) {
        if (src[t] >= 0) continue;
        float *o = dsoft + (size_t)(-src[t] - 1) * d;
        const float *g = dx + (size_t)t * d;
        for (int32_t i = 0; i < d; i++) o[i] += g[i];
    }
}

static double tr_cross_entropy(float *logits, const int32_t *target, int32_t n, int32_t V, float scale, bool grad) {
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

/* ---- Attention ---- */

static size_t tr_attn_work_floats(int32_t max_len, int32_t n_prefix, int32_t hd) {
    const size_t lk = (size_t)max_len + (size_t)n_prefix;
    return 4 * lk * (size_t)hd + 2 * (size_t)max_len * lk;
}

typedef struct head_work {
    float *K, *V, *S, *dP, *dK, *dV; /* [lk][hd] ×2, [len][lk] ×2, [lk][hd] ×2 */
    int32_t len, lk;
} head_work;

static head_work carve(const ds_train_attn_args *a, int32_t len) {
    head_work w = {.len = len, .lk = len + a->n_prefix};
    const size_t kv = (size_t)w.lk * a->hd, s = (size_t)len * w.lk;
    w.K = a->work;
    w.V = w.K + kv;
    w.dK = w.V + kv;
    w.dV = w.dK + kv;
    w.S = w.dV + kv;
    w.dP = w.S + s;
    return w;
}

/* K̃, Ṽ of KV head g for sequence s: prefix rows, then the sequence's own rows. */
static void gather_kv(const ds_train_attn_args *a, const ds_train_attn_seq *s, int32_t g, head_work *w) {
    const size_t kvd = (size_t)a->n_kv * a->hd, off = (size_t)g * a->hd, bytes = (size_t)a->hd * sizeof(float);
    for (int32_t j = 0; j < a->n_prefix; j++) {
        memcpy(w->K + (size_t)j * a->hd, a->pk + (size_t)j * a->p_stride + off, bytes);
        memcpy(w->V + (size_t)j * a->hd, a->pv + (size_t)j * a->p_stride + off, bytes);
    }
    for (int32_t i = 0; i < s->len; i++) {
        const size_t row = (size_t)(s->row0 + i) * kvd + off;
        memcpy(w->K + (size_t)(a->n_prefix + i) * a->hd, a->k + row, bytes);
        memcpy(w->V + (size_t)(a->n_prefix + i) * a->hd, a->v + row, bytes);
    }
}

/* S = scale·Q_h·K̃ᵀ */
static void scores(const ds_train_attn_args *a, const ds_train_attn_seq *s, int32_t h, head_work *w) {
    const int32_t qd = a->n_head * a->hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, w->len, w->lk, a->hd, a->scale,
                a->q + (size_t)s->row0 * qd + (size_t)h * a->hd, qd, w->K, a->hd, 0.0f, w->S, w->lk);
}

/* Masked softmax of S in place (row i sees n_prefix + i + 1 slots); saves each row's lse. */
static void softmax_fwd(const ds_train_attn_args *a, const ds_train_attn_seq *s, int32_t h, head_work *w) {
    for (int32_t i = 0; i < w->len; i++) {
        float *row = w->S + (size_t)i * w->lk;
        const int32_t nv = a->n_prefix + i + 1;
        float mx = row[0];
        for (int32_t j = 1; j < nv; j++) mx = row[j] > mx ? row[j] : mx;
        double sum = 0.0;
        for (int32_t j = 0; j < nv; j++) sum += exp((double)row[j] - mx);
        const double lse = mx + log(sum);
        for (int32_t j = 0; j < nv; j++) row[j] = (float)exp((double)row[j] - lse);
        for (int32_t j = nv; j < w->lk; j++) row[j] = 0.0f;
        a->lse[(size_t)(s->row0 + i) * a->n_head + h] = (float)lse;
    }
}

static void tr_attention_fwd(const ds_train_attn_args *a) {
    const int32_t qd = a->n_head * a->hd, group = a->n_head / a->n_kv;
    for (int32_t si = 0; si < a->n_seqs; si++) {
        const ds_train_attn_seq *s = &a->seqs[si];
        if (s->len <= 0) continue;
        head_work w = carve(a, s->len);
        for (int32_t h = 0; h < a->n_head; h++) {
            if (h % group == 0) gather_kv(a, s, h / group, &w);
            scores(a, s, h, &w);
            softmax_fwd(a, s, h, &w);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, w.len, a->hd, w.lk, 1.0f, w.S, w.lk, w.V, a->hd,
                        0.0f, a->out + (size_t)s->row0 * qd + (size_t)h * a->hd, qd);
        }
    }
}

/* dS = P⊙(dP − Σⱼ P⊙dP), in place in dP; P recomputed into S from lse. */
static void softmax_bwd(const ds_train_attn_args *a, const ds_train_attn_seq *s, int32_t h, head_work *w) {
    for (int32_t i = 0; i < w->len; i++) {
        float *p = w->S + (size_t)i * w->lk, *dp = w->dP + (size_t)i * w->lk;
        const int32_t nv = a->n_prefix + i + 1;
        double dot = 0.0;
        for (int32_t j = 0; j < nv; j++) dot += (double)p[j] * dp[j];
        for (int32_t j = 0; j < nv; j++) dp[j] = (float)(p[j] * (dp[j] - dot));
        for (int32_t j = nv; j < w->lk; j++) dp[j] = 0.0f;
    }
}

static void recompute_probs(const ds_train_attn_args *a, const ds_train_attn_seq *s, int32_t h, head_work *w) {
    scores(a, s, h, w);
    for (int32_t i = 0; i < w->len; i++) {
        float *row = w->S + (size_t)i * w->lk;
        const double lse = a->lse[(size_t)(s->row0 + i) * a->n_head + h];
        const int32_t nv = a->n_prefix + i + 1;
        for (int32_t j = 0; j < nv; j++) row[j] = (float)exp((double)row[j] - lse);
        for (int32_t j = nv; j < w->lk; j++) row[j] = 0.0f;
    }
}

/* Adds dK̃, dṼ of KV head g to the prefix and own-row gradients. */
static void scatter_dkv(const ds_train_attn_args *a, const ds_train_attn_seq *s, int32_t g, const head_work *w,
                        float *dk, float *dv, float *dpk, float *dpv) {
    const size_t kvd = (size_t)a->n_kv * a->hd, off = (size_t)g * a->hd;
    for (int32_t j = 0; j < w->lk; j++) {
        float *ok, *ov;
        if (j < a->n_prefix) {
            if (!dpk) continue;
            ok = dpk + (size_t)j * a->p_stride + off;
            ov = dpv + (size_t)j * a->p_stride + off;
        } else {
            ok = dk + (size_t)(s->row0 + j - a->n_prefix) * kvd + off;
            ov = dv + (size_t)(s->row0 + j - a->n_prefix) * kvd + off;
        }
        const float *gk = w->dK + (size_t)j * a->hd, *gv = w->dV + (size_t)j * a->hd;
        for (int32_t d = 0; d < a->hd; d++) {
            ok[d] += gk[d];
            ov[d] += gv[d];
        }
    }
}

static void tr_attention_bwd(const ds_train_attn_args *a, const float *dout, float *dq, float *dk, float *dv,
                             float *dpk, float *dpv) {
    const int32_t qd = a->n_head * a->hd, group = a->n_head / a->n_kv;
    for (int32_t si = 0; si < a->n_seqs; si++) {
        const ds_train_attn_seq *s = &a->seqs[si];
        if (s->len <= 0) continue;
        head_work w = carve(a, s->len);
        for (int32_t h = 0; h < a->n_head; h++) {
            const size_t qoff = (size_t)s->row0 * qd + (size_t)h * a->hd;
            if (h % group == 0) gather_kv(a, s, h / group, &w);
            recompute_probs(a, s, h, &w);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w.lk, a->hd, w.len, 1.0f, w.S, w.lk, dout + qoff, qd,
                        0.0f, w.dV, a->hd); /* dṼ = Pᵀ·dO */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, w.len, w.lk, a->hd, 1.0f, dout + qoff, qd, w.V, a->hd,
                        0.0f, w.dP, w.lk); /* dP = dO·Ṽᵀ */
            softmax_bwd(a, s, h, &w);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, w.len, a->hd, w.lk, a->scale, w.dP, w.lk, w.K,
                        a->hd, 0.0f, dq + qoff, qd); /* dQ = scale·dS·K̃ */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w.lk, a->hd, w.len, a->scale, w.dP, w.lk, a->q + qoff,
                        qd, 0.0f, w.dK, a->hd); /* dK̃ = scale·dSᵀ·Q */
            scatter_dkv(a, s, h / group, &w, dk, dv, dpk, dpv);
        }
    }
}

/* ---- Optimizer (torch.optim.AdamW single-tensor path, clip_grad_norm_) ---- */

static int cpu_t_sumsq(void *ctx, const float *x, size_t n, double *out) {
    (void)ctx;
    double ss = *out;
    for (size_t j = 0; j < n; j++) ss += (double)x[j] * x[j];
    *out = ss;
    return 0;
}

static int cpu_t_scale(void *ctx, float *x, size_t n, double s) {
    (void)ctx;
    for (size_t j = 0; j < n; j++) x[j] = (float)(x[j] * s);
    return 0;
}

/* Loshchilov & Hutter, decoupled weight decay, in torch's order:
 *   θ ← θ·(1 − lr·λ);  m ← m + (1−β₁)(g − m);  v ← β₂v + (1−β₂)g²
 *   θ ← θ − (lr / (1−β₁ᵗ)) · m / (sqrt(v)/sqrt(1−β₂ᵗ) + ε)                       (t = step, 1-based) */
static int cpu_t_adamw(void *ctx, float *w, const float *g, float *m, float *v, size_t n, const ds_adamw_args *a) {
    (void)ctx;
    const float lr = a->lr;
    const double step = (double)a->step;
    const double bc1 = 1.0 - pow(a->beta1, step), bc2_sqrt = sqrt(1.0 - pow(a->beta2, step));
    const float step_size = (float)(lr / bc1), decay = (float)(1.0 - (double)lr * a->weight_decay);
    const float b1c = 1.0f - a->beta1, b2 = a->beta2, b2c = 1.0f - a->beta2, bc2s = (float)bc2_sqrt;
    for (size_t j = 0; j < n; j++) {
        const float gj = g[j];
        if (a->weight_decay != 0) w[j] *= decay;
        m[j] += b1c * (gj - m[j]);
        v[j] = v[j] * b2 + b2c * gj * gj;
        const float denom = sqrtf(v[j]) / bc2s + a->eps;
        w[j] -= step_size * (m[j] / denom);
    }
    return 0;
}

static int cpu_t_fill(void *ctx, float *x, size_t n, float v) {
    (void)ctx;
    if (v == 0.0f) memset(x, 0, n * sizeof(float)); /* +0.0f is all zero bits */
    else
        for (size_t j = 0; j < n; j++) x[j] = v;
    return 0;
}

static int cpu_t_gather_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d) {
    (void)ctx;
    for (int32_t i = 0; i < n; i++)
        memcpy(dst + (size_t)i * d, src + (size_t)idx[i] * d, (size_t)d * sizeof(float));
    return 0;
}

static int cpu_t_scatter_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d) {
    (void)ctx;
    for (int32_t i = 0; i < n; i++)
        memcpy(dst + (size_t)idx[i] * d, src + (size_t)i * d, (size_t)d * sizeof(float));
    return 0;
}

/* ---- The table: the tr_* math in the (ctx, ..., status) shape ---- */

static int cpu_t_mm_nt(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k,
                       float alpha, float beta) {
    (void)ctx;
    tr_mm_nt(x, w, y, n, m, k, alpha, beta);
    return 0;
}

static int cpu_t_mm_nn(void *ctx, const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k,
                       float alpha, float beta) {
    (void)ctx;
    tr_mm_nn(dy, w, dx, n, m, k, alpha, beta);
    return 0;
}

static int cpu_t_mm_tn(void *ctx, const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k,
                       float alpha, float beta) {
    (void)ctx;
    tr_mm_tn(dy, x, dw, n, m, k, alpha, beta);
    return 0;
}

static int cpu_t_add_bias(void *ctx, float *y, const float *b, int32_t n, int32_t m) {
    (void)ctx;
    tr_add_bias(y, b, n, m);
    return 0;
}

static int cpu_t_rmsnorm_fwd(void *ctx, const float *x, const float *w, float *y, float *rinv, int32_t n, int32_t d,
                             float eps) {
    (void)ctx;
    tr_rmsnorm_fwd(x, w, y, rinv, n, d, eps);
    return 0;
}

static int cpu_t_rmsnorm_bwd(void *ctx, const float *x, const float *w, const float *rinv, const float *dy, float *dx,
                             int32_t n, int32_t d) {
    (void)ctx;
    tr_rmsnorm_bwd(x, w, rinv, dy, dx, n, d);
    return 0;
}

static int cpu_t_rope(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                      int32_t hd, int sign) {
    (void)ctx;
    tr_rope(x, pos, inv_freq, n, n_head, hd, sign);
    return 0;
}

static int cpu_t_silu_mul_fwd(void *ctx, const float *g, const float *u, float *out, size_t n) {
    (void)ctx;
    tr_silu_mul_fwd(g, u, out, n);
    return 0;
}

static int cpu_t_silu_mul_bwd(void *ctx, const float *g, const float *u, const float *dout, float *dg, float *du,
                              size_t n) {
    (void)ctx;
    tr_silu_mul_bwd(g, u, dout, dg, du, n);
    return 0;
}

static int cpu_t_lora_fwd(void *ctx, const float *x, const float *A, const float *B, float s, float *u, float *y,
                          int32_t n, int32_t in, int32_t out, int32_t r) {
    (void)ctx;
    tr_lora_fwd(x, A, B, s, u, y, n, in, out, r);
    return 0;
}

static int cpu_t_lora_bwd(void *ctx, const float *x, const float *u, const float *A, const float *B, float s,
                          const float *dy, float *dx, float *dA, float *dB, float *tmp, int32_t n, int32_t in,
                          int32_t out, int32_t r) {
    (void)ctx;
    tr_lora_bwd(x, u, A, B, s, dy, dx, dA, dB, tmp, n, in, out, r);
    return 0;
}

static int cpu_t_embed(void *ctx, const struct ds_mat *embd, const float *soft, const int32_t *src, float *out,
                       int32_t n, int32_t d) {
    (void)ctx;
    return tr_embed(embd, soft, src, out, n, d);
}

static int cpu_t_embed_bwd_soft(void *ctx, const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d) {
    (void)ctx;
    tr_embed_bwd_soft(src, dx, dsoft, n, d);
    return 0;
}

static int cpu_t_embed_lora_fwd(void *ctx, const float *A_T, const float *B, float s, const int32_t *src, float *u,
                                float *y, int32_t n, int32_t d, int32_t r) {
    (void)ctx;
    tr_embed_lora_fwd(A_T, B, s, src, u, y, n, d, r);
    return 0;
}

static int cpu_t_embed_lora_bwd(void *ctx, const float *B, float s, const int32_t *src, const float *u,
                                const float *dy, float *dA_T, float *dB, float *tmp, int32_t n, int32_t d,
                                int32_t r) {
    (void)ctx;
    tr_embed_lora_bwd(B, s, src, u, dy, dA_T, dB, tmp, n, d, r);
    return 0;
}

static int cpu_t_cross_entropy(void *ctx, float *logits, const int32_t *target, int32_t n, int32_t V, float scale,
                               bool grad, double *loss) {
    (void)ctx;
    *loss = tr_cross_entropy(logits, target, n, V, scale, grad);
    return 0;
}

static size_t cpu_t_attn_work_floats(void *ctx, int32_t max_len, int32_t n_prefix, int32_t hd) {
    (void)ctx;
    return tr_attn_work_floats(max_len, n_prefix, hd);
}

static int cpu_t_attention_fwd(void *ctx, const ds_train_attn_args *a) {
    (void)ctx;
    tr_attention_fwd(a);
    return 0;
}

static int cpu_t_attention_bwd(void *ctx, const ds_train_attn_args *a, const float *dout, float *dq, float *dk,
                               float *dv, float *dpk, float *dpv) {
    (void)ctx;
    tr_attention_bwd(a, dout, dq, dk, dv, dpk, dpv);
    return 0;
}

const struct ds_backend_train_iface ds_cpu_train_iface = {
    .version = DS_BACKEND_TRAIN_IFACE_VERSION,
    .mm_nt = cpu_t_mm_nt,
    .mm_nn = cpu_t_mm_nn,
    .mm_tn = cpu_t_mm_tn,
    .add_bias = cpu_t_add_bias,
    .rmsnorm_fwd = cpu_t_rmsnorm_fwd,
    .rmsnorm_bwd = cpu_t_rmsnorm_bwd,
    .rope = cpu_t_rope,
    .silu_mul_fwd = cpu_t_silu_mul_fwd,
    .silu_mul_bwd = cpu_t_silu_mul_bwd,
    .lora_fwd = cpu_t_lora_fwd,
    .lora_bwd = cpu_t_lora_bwd,
    .embed = cpu_t_embed,
    .embed_bwd_soft = cpu_t_embed_bwd_soft,
    .embed_lora_fwd = cpu_t_embed_lora_fwd,
    .embed_lora_bwd = cpu_t_embed_lora_bwd,
    .cross_entropy = cpu_t_cross_entropy,
    .attn_work_floats = cpu_t_attn_work_floats,
    .attention_fwd = cpu_t_attention_fwd,
    .attention_bwd = cpu_t_attention_bwd,
    .sumsq = cpu_t_sumsq,
    .scale = cpu_t_scale,
    .adamw = cpu_t_adamw,
    .bn_fwd = ds_cpu_train_bn_fwd,
    .bn_bwd = ds_cpu_train_bn_bwd,
    .fill = cpu_t_fill,
    .gather_rows = cpu_t_gather_rows,
    .scatter_rows = cpu_t_scatter_rows,
};
