/* Causal GQA attention forward/backward for training, with an optional prefix (see train_ops.h).
 *
 * Per (sequence, query head): K̃ = [prefix K ; own K] and Ṽ likewise (the KV head's columns),
 * S = scale·Q·K̃ᵀ with the causal mask (row i sees prefix slots and own rows ≤ i), P = softmax(S),
 * O = P·Ṽ. Backward (e.g. Dao et al., FlashAttention, alg. 2): P is recomputed from the saved
 * log-sum-exp, dṼ = Pᵀ·dO, dP = dO·Ṽᵀ, dS = P⊙(dP − rowsum(P⊙dP)), dQ = scale·dS·K̃,
 * dK̃ = scale·dSᵀ·Q; the prefix rows of dK̃/dṼ are the prefix gradients (no RoPE on them). */
#include "train/train_ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

size_t tr_attn_work_floats(int32_t max_len, int32_t n_prefix, int32_t hd) {
    const size_t lk = (size_t)max_len + (size_t)n_prefix;
    return 4 * lk * (size_t)hd + 2 * (size_t)max_len * lk;
}

typedef struct head_work {
    float *K, *V, *S, *dP, *dK, *dV; /* [lk][hd] ×2, [len][lk] ×2, [lk][hd] ×2 */
    int32_t len, lk;
} head_work;

static head_work carve(const tr_attn_args *a, int32_t len) {
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
static void gather_kv(const tr_attn_args *a, const tr_attn_seq *s, int32_t g, head_work *w) {
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
static void scores(const tr_attn_args *a, const tr_attn_seq *s, int32_t h, head_work *w) {
    const int32_t qd = a->n_head * a->hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, w->len, w->lk, a->hd, a->scale,
                a->q + (size_t)s->row0 * qd + (size_t)h * a->hd, qd, w->K, a->hd, 0.0f, w->S, w->lk);
}

/* Masked softmax of S in place (row i sees n_prefix + i + 1 slots); saves each row's lse. */
static void softmax_fwd(const tr_attn_args *a, const tr_attn_seq *s, int32_t h, head_work *w) {
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

void tr_attention_fwd(const tr_attn_args *a) {
    const int32_t qd = a->n_head * a->hd, group = a->n_head / a->n_kv;
    for (int32_t si = 0; si < a->n_seqs; si++) {
        const tr_attn_seq *s = &a->seqs[si];
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
static void softmax_bwd(const tr_attn_args *a, const tr_attn_seq *s, int32_t h, head_work *w) {
    for (int32_t i = 0; i < w->len; i++) {
        float *p = w->S + (size_t)i * w->lk, *dp = w->dP + (size_t)i * w->lk;
        const int32_t nv = a->n_prefix + i + 1;
        double dot = 0.0;
        for (int32_t j = 0; j < nv; j++) dot += (double)p[j] * dp[j];
        for (int32_t j = 0; j < nv; j++) dp[j] = (float)(p[j] * (dp[j] - dot));
        for (int32_t j = nv; j < w->lk; j++) dp[j] = 0.0f;
    }
}

static void recompute_probs(const tr_attn_args *a, const tr_attn_seq *s, int32_t h, head_work *w) {
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
static void scatter_dkv(const tr_attn_args *a, const tr_attn_seq *s, int32_t g, const head_work *w, float *dk,
                        float *dv, float *dpk, float *dpv) {
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

void tr_attention_bwd(const tr_attn_args *a, const float *dout, float *dq, float *dk, float *dv, float *dpk,
                      float *dpv) {
    const int32_t qd = a->n_head * a->hd, group = a->n_head / a->n_kv;
    for (int32_t si = 0; si < a->n_seqs; si++) {
        const tr_attn_seq *s = &a->seqs[si];
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
