/* The CUDA backend's training attention (include/ds/backend_train.h attention_fwd / attention_bwd):
 * causal GQA with an optional prefix, the same math as src/backend/cpu/cpu_train.c (its header
 * comment spells it out). Plain, deterministic kernels, no atomics: the host loops over the
 * sequences (ds_train_attn_args.seqs is a host array), launching per sequence
 *   forward:  one block per (query row, head): scores into shared memory, masked softmax with the
 *             lse saved, out = P·Ṽ;
 *   backward: one block per (query row, head) recomputes P from lse, dP = dO·Ṽᵀ, D = Σ P⊙dP
 *             (saved in the context's train_ws) and dQ = scale·dS·K̃ (overwrite); then one block
 *             per (key slot, KV head) walks the query rows that see it, in a fixed order, and adds
 *             dṼ = Pᵀ·dO and dK̃ = scale·dSᵀ·Q to dk/dv or dpk/dpv.
 * Reductions are in double. Compiled in CI; checked only by tests/unit/test_train_ops.c on a GPU. */
#include "common.cuh"
#include "train_ops.cuh"

#define TA_THREADS 128
#define TA_MAX_HD_PER_THREAD 4 /* head_dim ≤ TA_THREADS · 4 */

typedef struct ta_dev {
    const float *q, *k, *v, *pk, *pv;
    size_t p_stride;
    int32_t n_prefix, n_head, n_kv, hd, row0, len;
    float scale;
} ta_dev;

static ta_dev ta_make(const ds_train_attn_args *a, const ds_train_attn_seq *s) {
    ta_dev t;
    t.q = a->q, t.k = a->k, t.v = a->v, t.pk = a->pk, t.pv = a->pv, t.p_stride = a->p_stride;
    t.n_prefix = a->n_prefix, t.n_head = a->n_head, t.n_kv = a->n_kv, t.hd = a->hd;
    t.row0 = s->row0, t.len = s->len, t.scale = a->scale;
    return t;
}

/* Row j of K̃ (or Ṽ) of KV head g: prefix slots first, then the sequence's own rows. */
static __device__ __forceinline__ const float *ta_kv(const ta_dev &t, const float *own, const float *pre, int32_t j,
                                                     int32_t g) {
    if (j < t.n_prefix) return pre + (size_t)j * t.p_stride + (size_t)g * t.hd;
    return own + ((size_t)(t.row0 + j - t.n_prefix) * t.n_kv + g) * t.hd;
}

/* s_j = (float)(scale·q·k_j) for the nv visible slots, into S (shared); returns nothing. */
static __device__ void ta_scores(const ta_dev &t, const float *qr, int32_t g, int32_t nv, float *S) {
    for (int32_t j = threadIdx.x; j < nv; j += blockDim.x) {
        const float *kr = ta_kv(t, t.k, t.pk, j, g);
        double acc = 0.0;
        for (int32_t d = 0; d < t.hd; d++) acc += (double)qr[d] * kr[d];
        S[j] = (float)(acc * t.scale);
    }
    __syncthreads();
}

static __global__ void ta_fwd_kernel(ta_dev t, float *out, float *lse_out) {
    extern __shared__ float S[]; /* [n_prefix + len] */
    __shared__ double redd[32];
    __shared__ float redf[32];
    const int32_t i = blockIdx.x, h = blockIdx.y, group = t.n_head / t.n_kv, g = h / group;
    const int32_t nv = t.n_prefix + i + 1, qd = t.n_head * t.hd;
    const float *qr = t.q + (size_t)(t.row0 + i) * qd + (size_t)h * t.hd;
    ta_scores(t, qr, g, nv, S);
    const double lse = ds_block_logsumexp(S, nv, redf, redd);
    for (int32_t j = threadIdx.x; j < nv; j += blockDim.x) S[j] = (float)exp((double)S[j] - lse);
    __syncthreads();
    float *o = out + (size_t)(t.row0 + i) * qd + (size_t)h * t.hd;
    for (int32_t d = threadIdx.x; d < t.hd; d += blockDim.x) {
        double acc = 0.0;
        for (int32_t j = 0; j < nv; j++) acc += (double)S[j] * ta_kv(t, t.v, t.pv, j, g)[d];
        o[d] = (float)acc;
    }
    if (threadIdx.x == 0) lse_out[(size_t)(t.row0 + i) * t.n_head + h] = (float)lse;
}

/* Per (query row, head): D = Σⱼ P⊙dP into Dsave[i·n_head + h]; dq = scale·dS·K̃ (overwrite). */
static __global__ void ta_bwd_q_kernel(ta_dev t, const float *lse, const float *dout, float *dq, double *Dsave) {
    extern __shared__ float sh[]; /* P [lk], dS [lk] */
    __shared__ double redd[32];
    const int32_t lk = t.n_prefix + t.len;
    float *P = sh, *dS = sh + lk;
    const int32_t i = blockIdx.x, h = blockIdx.y, group = t.n_head / t.n_kv, g = h / group;
    const int32_t nv = t.n_prefix + i + 1, qd = t.n_head * t.hd;
    const size_t qoff = (size_t)(t.row0 + i) * qd + (size_t)h * t.hd;
    const float *qr = t.q + qoff, *go = dout + qoff;
    ta_scores(t, qr, g, nv, P);
    const double l = lse[(size_t)(t.row0 + i) * t.n_head + h];
    double dot = 0.0;
    for (int32_t j = threadIdx.x; j < nv; j += blockDim.x) {
        const float p = (float)exp((double)P[j] - l);
        const float *vr = ta_kv(t, t.v, t.pv, j, g);
        double acc = 0.0;
        for (int32_t d = 0; d < t.hd; d++) acc += (double)go[d] * vr[d];
        P[j] = p;
        dS[j] = (float)acc;
        dot += (double)p * dS[j];
    }
    dot = ds_block_sum_d(dot, redd);
    for (int32_t j = threadIdx.x; j < nv; j += blockDim.x) dS[j] = (float)(P[j] * (dS[j] - dot));
    __syncthreads();
    for (int32_t d = threadIdx.x; d < t.hd; d += blockDim.x) {
        double acc = 0.0;
        for (int32_t j = 0; j < nv; j++) acc += (double)dS[j] * ta_kv(t, t.k, t.pk, j, g)[d];
        dq[qoff + d] = (float)(t.scale * acc);
    }
    if (threadIdx.x == 0) Dsave[(size_t)i * t.n_head + h] = dot;
}

/* Per (key slot j, KV head g): Σ over the heads of the group and the rows i that see j (i ≥ j −
 * n_prefix), in that order, of p·dO (dṼ) and scale·dS·Q (dK̃); adds them to the own-row or
 * prefix gradients (prefix skipped when dpk is NULL). */
static __global__ void ta_bwd_kv_kernel(ta_dev t, const float *lse, const float *dout, const double *Dsave, float *dk,
                                        float *dv, float *dpk, float *dpv) {
    __shared__ double redd[32];
    const int32_t j = blockIdx.x, g = blockIdx.y, group = t.n_head / t.n_kv, qd = t.n_head * t.hd;
    if (j < t.n_prefix && !dpk) return; /* uniform per block */
    const float *kr = ta_kv(t, t.k, t.pk, j, g), *vr = ta_kv(t, t.v, t.pv, j, g);
    double adk[TA_MAX_HD_PER_THREAD] = {0}, adv[TA_MAX_HD_PER_THREAD] = {0};
    const int32_t i0 = j < t.n_prefix ? 0 : j - t.n_prefix;
    for (int32_t h = g * group; h < (g + 1) * group; h++) {
        for (int32_t i = i0; i < t.len; i++) {
            const size_t qoff = (size_t)(t.row0 + i) * qd + (size_t)h * t.hd;
            const float *qr = t.q + qoff, *go = dout + qoff;
            double sqk = 0.0, sdv = 0.0;
            for (int32_t d = threadIdx.x; d < t.hd; d += blockDim.x) {
                sqk += (double)qr[d] * kr[d];
                sdv += (double)go[d] * vr[d];
            }
            sqk = ds_block_sum_d(sqk, redd);
            sdv = ds_block_sum_d(sdv, redd);
            const float s = (float)(sqk * t.scale);
            const float p = (float)exp((double)s - (double)lse[(size_t)(t.row0 + i) * t.n_head + h]);
            const float ds = (float)(p * ((double)(float)sdv - Dsave[(size_t)i * t.n_head + h]));
            for (int32_t c = 0; c < TA_MAX_HD_PER_THREAD; c++) {
                const int32_t d = threadIdx.x + c * blockDim.x;
                if (d >= t.hd) break;
                adv[c] += (double)p * go[d];
                adk[c] += (double)ds * qr[d];
            }
        }
    }
    float *ok, *ov;
    if (j < t.n_prefix) {
        ok = dpk + (size_t)j * t.p_stride + (size_t)g * t.hd;
        ov = dpv + (size_t)j * t.p_stride + (size_t)g * t.hd;
    } else {
        ok = dk + ((size_t)(t.row0 + j - t.n_prefix) * t.n_kv + g) * t.hd;
        ov = dv + ((size_t)(t.row0 + j - t.n_prefix) * t.n_kv + g) * t.hd;
    }
    for (int32_t c = 0; c < TA_MAX_HD_PER_THREAD; c++) {
        const int32_t d = threadIdx.x + c * blockDim.x;
        if (d >= t.hd) break;
        ok[d] += (float)(t.scale * adk[c]);
        ov[d] += (float)adv[c];
    }
}

static int ta_check(const ds_train_attn_args *a, size_t *max_lk) {
    if (!a || !a->q || !a->k || !a->v || !a->out || !a->lse || (a->n_seqs > 0 && !a->seqs)) return DS_EINVAL;
    if (a->n_head <= 0 || a->n_kv <= 0 || a->n_head % a->n_kv || a->hd <= 0 || a->n_prefix < 0) return DS_EINVAL;
    if (a->n_prefix > 0 && (!a->pk || !a->pv)) return DS_EINVAL;
    if (a->hd > TA_THREADS * TA_MAX_HD_PER_THREAD) return DS_EUNSUPPORTED;
    size_t m = 0;
    for (int32_t si = 0; si < a->n_seqs; si++) {
        if (a->seqs[si].len < 0 || a->seqs[si].row0 < 0) return DS_EINVAL;
        const size_t lk = (size_t)a->seqs[si].len + (size_t)a->n_prefix;
        if (lk > m) m = lk;
    }
    if (2 * m * sizeof(float) > 48 * 1024) return DS_EUNSUPPORTED; /* default dynamic shared memory */
    *max_lk = m;
    return DS_OK;
}

size_t ds_cuda_t_attn_work_floats(void *ctx, int32_t max_len, int32_t n_prefix, int32_t hd) {
    (void)ctx, (void)max_len, (void)n_prefix, (void)hd;
    return 1; /* the kernels keep their state in shared memory and the context's train_ws */
}

int ds_cuda_t_attention_fwd(void *ctx, const ds_train_attn_args *a) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    size_t max_lk = 0;
    DS_TRY(ta_check(a, &max_lk));
    DS_TRY(ds_cuda_enter(c));
    for (int32_t si = 0; si < a->n_seqs; si++) {
        const ds_train_attn_seq *s = &a->seqs[si];
        if (s->len <= 0) continue;
        const ta_dev t = ta_make(a, s);
        const size_t shm = ((size_t)s->len + (size_t)a->n_prefix) * sizeof(float);
        ta_fwd_kernel<<<dim3((unsigned)s->len, (unsigned)a->n_head), TA_THREADS, shm, c->stream>>>(t, a->out, a->lse);
        CU_CHECK_LAUNCH("ta_fwd_kernel");
    }
    return DS_OK;
}

int ds_cuda_t_attention_bwd(void *ctx, const ds_train_attn_args *a, const float *dout, float *dq, float *dk,
                            float *dv, float *dpk, float *dpv) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    size_t max_lk = 0;
    DS_TRY(ta_check(a, &max_lk));
    if (!dout || !dq || !dk || !dv || (!dpk) != (!dpv)) return DS_EINVAL;
    DS_TRY(ds_cuda_enter(c));
    int32_t max_len = 0;
    for (int32_t si = 0; si < a->n_seqs; si++) max_len = a->seqs[si].len > max_len ? a->seqs[si].len : max_len;
    DS_TRY(ds_cuda_ws_reserve(c, &c->train_ws, ((size_t)max_len * a->n_head + 1) * sizeof(double)));
    double *D = (double *)c->train_ws.ptr;
    for (int32_t si = 0; si < a->n_seqs; si++) {
        const ds_train_attn_seq *s = &a->seqs[si];
        if (s->len <= 0) continue;
        const ta_dev t = ta_make(a, s);
        const size_t lk = (size_t)s->len + (size_t)a->n_prefix;
        ta_bwd_q_kernel<<<dim3((unsigned)s->len, (unsigned)a->n_head), TA_THREADS, 2 * lk * sizeof(float), c->stream>>>(
            t, a->lse, dout, dq, D);
        CU_CHECK_LAUNCH("ta_bwd_q_kernel");
        ta_bwd_kv_kernel<<<dim3((unsigned)lk, (unsigned)a->n_kv), TA_THREADS, 0, c->stream>>>(t, a->lse, dout, D, dk, dv,
                                                                                             dpk, dpv);
        CU_CHECK_LAUNCH("ta_bwd_kv_kernel");
    }
    return DS_OK;
}
