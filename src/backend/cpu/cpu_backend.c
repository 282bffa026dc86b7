/* The CPU backend: the reference implementation of ds_backend. Weights are borrowed from the
 * ds_model in its own formats (ds/weight.h) and multiplied by the kernels of qmatmul.c, chosen at
 * run time for this CPU; fp32 weights and adapter GEMMs use OpenBLAS; OpenMP threads for the rest.
 * Memory is plain host memory. */
#include "ds/backend.h"

#include "backend/cpu/cpu_bottleneck.h"
#include "backend/cpu/cpu_train.h"
#include "backend/cpu/pool.h"
#include "backend/cpu/qmatmul.h"
#include "util/mem.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct cpu_ctx {
    int n_threads;
    /* Op scratch (attention scores per thread, LoRA intermediates): grown when a larger step first
     * needs it, then reused, so the steady-state forward does not allocate. */
    float *scratch;
    size_t scratch_cap; /* floats */
    float *qscratch;    /* dequantised weight tiles, per thread (qmatmul.c) */
    float *tscratch;    /* dequantised row blocks for matmul_t (training) */
    size_t tscratch_cap;
    size_t qscratch_cap;
    const ds_qk_ops *qk; /* kernels for this CPU */
    const ds_q8_ops *q8; /* int8-activation kernels, or NULL (exact fp32 activations) */
    uint8_t *q8buf;      /* a step's int8 activations */
    size_t q8buf_cap;
    ds_pool *pool;       /* decode-sized ops (pool.h); prefill-sized ones use OpenMP */
    ds_seg_tables plan;  /* the step's segment tables (plan_upload), borrowed host arrays */
} cpu_ctx;

static void cpu_free(void *ctx) {
    cpu_ctx *c = ctx;
    free(c->scratch);
    free(c->qscratch);
    free(c->tscratch);
    free(c->q8buf);
    ds_pool_free(c->pool);
    free(c);
}

static float *cpu_qscratch(cpu_ctx *c) {
    return DS_GROW(c->qscratch, c->qscratch_cap, ds_qk_scratch_floats(omp_get_max_threads())) ? NULL : c->qscratch;
}

/* At least n floats of scratch, or NULL on OOM. Engine thread (ops are not reentrant). */
static float *cpu_scratch(cpu_ctx *c, size_t n) { return DS_GROW(c->scratch, c->scratch_cap, n) ? NULL : c->scratch; }

float *ds_cpu_scratch(void *ctx, size_t n) { return cpu_scratch(ctx, n); }

/* Zeroed, 64-byte aligned. Through calloc: a large block comes from fresh mmap'd pages that calloc
 * need not clear, so the KV pool and other big buffers become resident as they are used, not at
 * start-up. The raw pointer sits just before the aligned one (calloc's is 16-aligned, so there are
 * at least 16 bytes for it). */
static void *cpu_alloc(void *ctx, size_t bytes) {
    (void)ctx;
    if (bytes > SIZE_MAX - 128) return NULL;
    char *raw = calloc(1, bytes + 64);
    if (!raw) return NULL;
    char *p = (char *)(((uintptr_t)raw + 64) & ~(uintptr_t)63);
    memcpy(p - sizeof raw, &raw, sizeof raw);
    return p;
}

static void cpu_release(void *ctx, void *ptr) {
    (void)ctx;
    if (!ptr) return;
    char *raw;
    memcpy(&raw, (char *)ptr - sizeof raw, sizeof raw);
    free(raw);
}

static int cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
    return DS_OK;
}

static int cpu_sync(void *ctx) { return DS_OK; }

/* The int8 kernels read a packed weight's whole 8-row groups from the pack only. When those rows
 * are a view of the model file's read-only mapping, their pages are dropped from the resident set
 * (MADV_DONTNEED on a private file mapping that was never written: the next access reads the file
 * again — embedding rows, the trainer's exact path). Copies in memory are left as they are. */
static void release_packed_rows(const ds_weight *host, const ds_mat *m) {
    if (host->file_view) ds_file_map_release(m->data, (size_t)(m->rows / 8 * 8) * m->row_bytes);
}

static int cpu_mat_upload(void *ctx, const ds_weight *host, ds_mat *out) {
    if (!host->data || !ds_dtype_supported((int)host->dtype) ||
        host->row_bytes != ds_dtype_row_bytes(host->dtype, host->cols))
        return DS_EUNSUPPORTED;
    *out = (ds_mat){.data = (void *)host->data, .rows = host->rows, .cols = host->cols, .dtype = host->dtype,
                    .row_bytes = host->row_bytes, .borrowed = true};
    const cpu_ctx *c = ctx;
    /* int8 mode: formats with a packed kernel are repacked once here (no pack: the unpacked path) */
    if (c->q8 && (out->aux = ds_q8_pack(c->q8, out))) release_packed_rows(host, out);
    return DS_OK;
}

static void cpu_mat_free(void *ctx, ds_mat *m) {
    if (!m->borrowed) free(m->data);
    free(m->aux);
    m->data = NULL;
    m->aux = NULL;
}

static int cpu_matmul(void *ctx, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                      bool accumulate) {
    cpu_ctx *c = ctx;
    if (c->q8 && ds_q8_dtype(w->dtype)) {
        if (DS_GROW(c->q8buf, c->q8buf_cap, ds_q8_act_bytes(n, w->cols))) return DS_ENOMEM;
        return ds_q8_matmul(c->q8, x, w, bias, y, n, accumulate, c->q8buf, c->pool);
    }
    if (w->dtype != DS_DTYPE_F32) {
        const bool tiled = ds_qk_tiled(c->qk, w, n);
        float *scratch = tiled ? cpu_qscratch(c) : NULL;
        if (tiled && !scratch) return DS_ENOMEM;
        return ds_qk_matmul(c->qk, x, w, bias, y, n, accumulate, scratch, c->pool);
    }
    const int32_t m = w->rows, k = w->cols;
    if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, m, k, 1.0f, (const float *)w->data, k, x, 1,
                    accumulate ? 1.0f : 0.0f, y, 1);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, k, 1.0f, x, k, (const float *)w->data, k,
                    accumulate ? 1.0f : 0.0f, y, m);
    }
    if (bias) {
        for (int32_t t = 0; t < n; t++) {
            float *yr = y + (size_t)t * m;
            for (int32_t i = 0; i < m; i++) yr[i] += bias[i];
        }
    }
    return DS_OK;
}

/* dx = dy·W (training's input gradient through a frozen weight). */
static int cpu_matmul_t(void *ctx, const float *dy, const ds_mat *w, float *dx, int32_t n, bool accumulate) {
    cpu_ctx *c = ctx;
    if (w->dtype == DS_DTYPE_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, w->cols, w->rows, 1.0f, dy, w->rows,
                    (const float *)w->data, w->cols, accumulate ? 1.0f : 0.0f, dx, w->cols);
        return DS_OK;
    }
    /* training only: a block of dequantised rows (16 MiB), allocated on first use */
    if (DS_GROW(c->tscratch, c->tscratch_cap, DS_QK_T_SCRATCH > (size_t)w->cols ? DS_QK_T_SCRATCH : (size_t)w->cols))
        return DS_ENOMEM;
    return ds_qk_matmul_t(c->qk, dy, w, dx, n, accumulate, c->tscratch, c->tscratch_cap);
}

static int cpu_embed(void *ctx, const ds_mat *embd, const int32_t *ids, float *out, int32_t n) {
    return ds_qk_embed(((cpu_ctx *)ctx)->qk, embd, ids, out, n);
}

static int cpu_rmsnorm(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t d, float eps) {
#pragma omp parallel for if (n > DS_QK_GEMV_MAX) /* decode steps: no OpenMP region (see pool.h) */
    for (int32_t t = 0; t < n; t++) {
        const float *xr = x + (size_t)t * d;
        float *yr = y + (size_t)t * d;
        double ss = 0.0;
        for (int32_t i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
        const float r = 1.0f / sqrtf((float)(ss / d) + eps);
        for (int32_t i = 0; i < d; i++) yr[i] = (xr[i] * r) * w[i];
    }
    return DS_OK;
}

/* rotate_half RoPE (HF Llama): x1 = x[:hd/2], x2 = x[hd/2:]; out = x*cos + rotate_half(x)*sin with
 * cos/sin from cat(freqs, freqs), freqs = pos * inv_freq computed in fp32. */
static int cpu_rope(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                    int32_t head_dim) {
    const int32_t half = head_dim / 2;
#pragma omp parallel for if (n > DS_QK_GEMV_MAX) /* decode steps: no OpenMP region (see pool.h) */
    for (int32_t t = 0; t < n; t++) {
        for (int32_t i = 0; i < half; i++) {
            const float f = (float)pos[t] * inv_freq[i];
            const float c = cosf(f), s = sinf(f);
            for (int32_t h = 0; h < n_head; h++) {
                float *xh = x + ((size_t)t * n_head + h) * head_dim;
                const float a = xh[i], b = xh[i + half];
                xh[i] = a * c - b * s;
                xh[i + half] = b * c + a * s;
            }
        }
    }
    return DS_OK;
}

/* SiLU(gate)·up by the instruction set's kernel (act_kern.h) in slices of 16 Ki elements over the
 * OpenMP threads; decode steps stay serial: no OpenMP region. */
static int cpu_silu_mul(void *ctx, const float *gate, const float *up, float *out, size_t n) {
    const ds_qk_ops *k = ((cpu_ctx *)ctx)->qk;
    const size_t S = 16384, n_s = (n + S - 1) / S;
#pragma omp parallel for if (n > 262144)
    for (size_t s = 0; s < n_s; s++) k->silu_mul(gate + s * S, up + s * S, out + s * S, n - s * S < S ? n - s * S : S);
    return DS_OK;
}

/* torch's gelu(approximate="tanh"): 0.5·x·(1 + tanh(z)), z = √(2/π)·(x + 0.044715·x³), computed as
 * x / (1 + e^{−2z}) — the same function, without the cancellation of 1 + tanh(z) for negative x
 * (at x = −4 the tanh form kept only ~3 correct digits in fp32). */
static int cpu_gelu_tanh_mul(void *ctx, const float *gate, const float *up, float *out, size_t n) {
#pragma omp parallel for if (n > 262144)
    for (size_t i = 0; i < n; i++) {
        const float x = gate[i], z = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        out[i] = x / (1.0f + expf(-2.0f * z)) * up[i];
    }
    return DS_OK;
}

static int cpu_scale(void *ctx, float *x, float s, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] *= s;
    return DS_OK;
}

static int cpu_add(void *ctx, float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
    return DS_OK;
}

static int cpu_get_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d) {
    for (int32_t i = 0; i < n; i++)
        memcpy(dst + (size_t)i * d, src + (size_t)idx[i] * d, sizeof(float) * (size_t)d);
    return DS_OK;
}

static int cpu_kv_store(void *ctx, float *k_cache, float *v_cache, const float *k, const float *v,
                        const int64_t *slot, int32_t n, int32_t row) {
    for (int32_t t = 0; t < n; t++) {
        memcpy(k_cache + (size_t)slot[t] * row, k + (size_t)t * row, sizeof(float) * (size_t)row);
        memcpy(v_cache + (size_t)slot[t] * row, v + (size_t)t * row, sizeof(float) * (size_t)row);
    }
    return DS_OK;
}

/* p[0..m) = softmax(p[0..m)) in fp32 (max-shifted, then normalised in place; the exponentials by the
 * instruction set's exp_sum, act_kern.h). */
static void softmax_row(const ds_qk_ops *k, float *p, int32_t m) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < m; i++) mx = p[i] > mx ? p[i] : mx;
    const float inv = 1.0f / k->exp_sum(p, m, mx);
    for (int32_t i = 0; i < m; i++) p[i] *= inv;
}

/* Decode attention (attn_kern.h): tasks of one token × one KV head × one part of its keys; each
 * writes its group's unnormalised outputs and (max, sum) pairs, then attn_merge combines a token's
 * parts. Parts split long contexts so that a one-token step with few KV heads still gives every
 * thread work (SmolLM2: 3 KV heads on 2 threads). */
#define ATTN_PART_MIN 256 /* keys per part at least */
#define ATTN_PARTS_MAX 64  /* parts of one token's keys at most (attn_merge's weights) */

typedef struct {
    const ds_attn_args *a;
    const ds_qk_ops *qk;
    const int32_t *tok;  /* tokens (indices into a) */
    int32_t n_parts, stride; /* floats per task: group·(head_dim + 2) */
    float *buf;
} attn_job;

static void attn_part_range(const ds_attn_args *a, int32_t t, int32_t part, int32_t n_parts, int32_t *i0, int32_t *i1) {
    const int32_t nkv = a->tok_nkv[t], lo = a->window > 0 && nkv > a->window ? nkv - a->window : 0;
    const int64_t n = nkv - lo;
    *i0 = lo + (int32_t)(n * part / n_parts);
    *i1 = lo + (int32_t)(n * (part + 1) / n_parts);
}

static void attn_chunk(void *arg, int64_t i) {
    const attn_job *j = arg;
    const int32_t part = (int32_t)(i % j->n_parts), kvh = (int32_t)(i / j->n_parts % j->a->n_kv_head);
    const int32_t t = j->tok[i / j->n_parts / j->a->n_kv_head];
    const int32_t group = j->a->n_head / j->a->n_kv_head;
    float *o = j->buf + (size_t)i * (size_t)j->stride;
    int32_t i0, i1;
    attn_part_range(j->a, t, part, j->n_parts, &i0, &i1);
    j->qk->attn_dec(j->a, t, kvh, i0, i1, o, o + (size_t)group * j->a->head_dim);
}

/* out[t][h] = Σ_p e^{m_p−M}·o_p / Σ_p e^{m_p−M}·l_p over the parts of token tok[i], for i < n. */
static void attn_merge(const attn_job *j, int32_t n) {
    const ds_attn_args *a = j->a;
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head, P = j->n_parts;
    for (int32_t i = 0; i < n; i++)
        for (int32_t kvh = 0; kvh < a->n_kv_head; kvh++)
            for (int32_t g = 0; g < group; g++) {
                const float *t0 = j->buf + ((size_t)i * a->n_kv_head + kvh) * P * (size_t)j->stride;
                float M = -INFINITY, L = 0.0f, c[ATTN_PARTS_MAX];
                for (int32_t p = 0; p < P; p++) {
                    const float m = t0[(size_t)p * j->stride + (size_t)group * hd + 2 * g];
                    M = m > M ? m : M;
                }
                for (int32_t p = 0; p < P; p++) {
                    const float *ml = t0 + (size_t)p * j->stride + (size_t)group * hd + 2 * g;
                    c[p] = ml[0] == -INFINITY ? 0.0f : expf(ml[0] - M);
                    L += c[p] * ml[1];
                }
                float *out = a->out + ((size_t)j->tok[i] * a->n_head + (size_t)kvh * group + g) * hd;
                const float inv = 1.0f / L;
                for (int32_t d = 0; d < hd; d++) {
                    float v = 0.0f;
                    for (int32_t p = 0; p < P; p++) v += c[p] * t0[(size_t)p * j->stride + (size_t)g * hd + d];
                    out[d] = v * inv;
                }
            }
}

/* Prefill attention by GEMM: a run of at least ATTN_RUN_MIN consecutive tokens of one sequence at
 * consecutive positions (a prefill chunk; no sliding window) attends in tasks of up to ATTN_CHUNK
 * tokens × one KV head: the keys and values the chunk's last token sees are gathered from the paged
 * cache into contiguous rows, then per query head of the group S = scale·Q·Kᵀ (one sgemm), a
 * causal softmax per row (keys past a token's own count set to 0) and O = P·V (one sgemm). It
 * computes what attn_dec (attn_kern.h) does, in fp32, with OpenBLAS's kernels instead of a dot product per
 * (token, head, key) — that loop took 46% of a 512-token prefill of the default model. */
#define ATTN_RUN_MIN 8
#define ATTN_CHUNK 64

typedef struct {
    int32_t t0, n, kvh;
} attn_task;

static void attend_chunk(const ds_qk_ops *qk, const ds_attn_args *a, const attn_task *k, float *buf) {
    const int32_t hd = a->head_dim, row = a->n_kv_head * hd, group = a->n_head / a->n_kv_head;
    const int32_t s = a->tok_seq[k->t0], nkv = a->tok_nkv[k->t0 + k->n - 1];
    const int32_t *bt = a->block_tables + (size_t)s * a->max_blocks;
    const int32_t pre = a->seq_prefix ? a->seq_prefix[s] : 0;
    float *kc = buf, *vc = kc + (size_t)nkv * hd, *S = vc + (size_t)nkv * hd;
    for (int32_t i = 0; i < nkv; i++) {
        const int64_t slot = ds_kv_slot(bt, pre, a->block_size, i) * row + (int64_t)k->kvh * hd;
        memcpy(kc + (size_t)i * hd, a->k_cache + slot, sizeof(float) * (size_t)hd);
        memcpy(vc + (size_t)i * hd, a->v_cache + slot, sizeof(float) * (size_t)hd);
    }
    const int32_t ld = a->n_head * hd;
    for (int32_t g = 0; g < group; g++) {
        const int32_t h = k->kvh * group + g;
        const size_t at = ((size_t)k->t0 * a->n_head + h) * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k->n, nkv, hd, a->scale, a->q + at, ld, kc, hd, 0.0f, S,
                    nkv);
        for (int32_t r = 0; r < k->n; r++) {
            float *p = S + (size_t)r * nkv;
            const int32_t m = a->tok_nkv[k->t0 + r];
            softmax_row(qk, p, m);
            for (int32_t i = m; i < nkv; i++) p[i] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k->n, hd, nkv, 1.0f, S, nkv, vc, hd, 0.0f, a->out + at,
                    ld);
    }
}

/* Splits the step's tokens into GEMM tasks (runs of a prefill, cut into ATTN_CHUNK tokens × each
 * KV head) and single tokens for attn_dec (`single`); returns the number of tasks. */
static int32_t attn_plan(const ds_attn_args *a, attn_task *tasks, int32_t *single, int32_t *n_single) {
    int32_t nt = 0, ns = 0;
    for (int32_t t = 0; t < a->n_tokens;) {
        int32_t e = t + 1;
        while (e < a->n_tokens && a->tok_seq[e] == a->tok_seq[t] && a->tok_nkv[e] == a->tok_nkv[e - 1] + 1) e++;
        if (e - t >= ATTN_RUN_MIN && a->window <= 0) {
            for (int32_t c = t; c < e; c += ATTN_CHUNK) {
                const int32_t n = e - c < ATTN_CHUNK ? e - c : ATTN_CHUNK;
                for (int32_t h = 0; h < a->n_kv_head; h++) tasks[nt++] = (attn_task){.t0 = c, .n = n, .kvh = h};
            }
        } else
            for (int32_t i = t; i < e; i++) single[ns++] = i;
        t = e;
    }
    *n_single = ns;
    return nt;
}

static int cpu_attention(void *ctx, const ds_attn_args *a) {
    if (a->n_head % a->n_kv_head) return DS_EINVAL;
    cpu_ctx *c = ctx;
    int32_t max_kv = 0;
    for (int32_t t = 0; t < a->n_tokens; t++)
        if (a->tok_nkv[t] > max_kv) max_kv = a->tok_nkv[t];
    const size_t per_thread = (size_t)(max_kv > 0 ? max_kv : 1);
    const int32_t group = a->n_head / a->n_kv_head;
    const size_t stride = (size_t)group * ((size_t)a->head_dim + 2);
    if (a->n_tokens <= DS_QK_GEMV_MAX) { /* decode: tasks on the pool */
        /* parts: about 4 tasks a thread, none shorter than ATTN_PART_MIN keys */
        const int32_t tasks = a->n_tokens * a->n_kv_head, want = 4 * c->n_threads;
        int32_t P = (want + tasks - 1) / tasks, by_len = (max_kv + ATTN_PART_MIN - 1) / ATTN_PART_MIN;
        P = P < by_len ? P : by_len;
        P = P < 1 ? 1 : P > ATTN_PARTS_MAX ? ATTN_PARTS_MAX : P;
        const size_t n_tok = (size_t)a->n_tokens, n = n_tok * (size_t)a->n_kv_head * (size_t)P;
        float *buf = cpu_scratch(c, n * stride + n_tok);
        if (!buf) return DS_ENOMEM;
        int32_t *tok = (int32_t *)(void *)(buf + n * stride);
        for (int32_t t = 0; t < a->n_tokens; t++) tok[t] = t;
        attn_job j = {.a = a, .qk = c->qk, .tok = tok, .n_parts = P, .stride = (int32_t)stride, .buf = buf};
        ds_pool_run(c->pool, (int64_t)n, attn_chunk, &j);
        attn_merge(&j, a->n_tokens);
        return DS_OK;
    }
    /* tasks, single tokens, then per thread: K, V, S for a GEMM task */
    const size_t n_tasks_max = ((size_t)a->n_tokens / ATTN_CHUNK + (size_t)a->n_tokens / ATTN_RUN_MIN + 1) *
                               (size_t)a->n_kv_head;
    const size_t meta = (n_tasks_max * sizeof(attn_task) + (size_t)a->n_tokens * sizeof(int32_t)) / sizeof(float) + 1;
    const size_t per = per_thread * (2 * (size_t)a->head_dim + ATTN_CHUNK);
    const int nth = omp_get_max_threads();
    /* + one task's outputs per (single token, KV head) */
    const size_t singles = (size_t)a->n_tokens * (size_t)a->n_kv_head * stride;
    float *all = cpu_scratch(ctx, meta + per * (size_t)nth + singles);
    if (!all) return DS_ENOMEM;
    attn_task *tasks = (attn_task *)(void *)all;
    int32_t *single = (int32_t *)(void *)(tasks + n_tasks_max), n_single;
    const int32_t n_tasks = attn_plan(a, tasks, single, &n_single);
    float *work = all + meta;
    attn_job j = {.a = a, .qk = c->qk, .tok = single, .n_parts = 1, .stride = (int32_t)stride,
                  .buf = work + per * (size_t)nth};
    const int64_t n_single_tasks = (int64_t)n_single * a->n_kv_head;
#pragma omp parallel
    {
        float *mine = work + per * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic, 1) nowait
        for (int32_t i = 0; i < n_tasks; i++) attend_chunk(c->qk, a, &tasks[i], mine);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_single_tasks; i++) attn_chunk(&j, i);
    }
    attn_merge(&j, n_single);
    return DS_OK;
}

/* Plan/run: the CPU reads the caller's host tables in place, so planning is only remembering them. */
static int cpu_plan_upload(void *ctx, const ds_seg_tables *t) {
    if (t->n_lora < 0 || t->n_vec < 0 || t->n_bn < 0) return DS_EINVAL;
    ((cpu_ctx *)ctx)->plan = *t;
    return DS_OK;
}

/* Whether r lies inside a plan table of n entries. */
static bool in_plan(int32_t n, ds_seg_range r) { return r.first >= 0 && r.n >= 0 && r.first <= n - r.n; }

/* Segmented LoRA: per segment, tmp[len][r] = X·Aᵀ then Y += scale · tmp·Bᵀ — two GEMMs at the
 * adapter's own rank (no padding). */
static int cpu_lora(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r) {
    const cpu_ctx *c = ctx;
    if (!in_plan(c->plan.n_lora, r)) return DS_EINVAL;
    if (r.n == 0) return DS_OK;
    const ds_lora_seg *segs = c->plan.lora + r.first;
    size_t need = 0;
    for (int32_t i = 0; i < r.n; i++) {
        size_t sz = (size_t)segs[i].len * (size_t)segs[i].rank;
        if (sz > need) need = sz;
    }
    float *tmp = cpu_scratch(ctx, need ? need : 1);
    if (!tmp) return DS_ENOMEM;
    for (int32_t i = 0; i < r.n; i++) {
        const ds_lora_seg *g = &segs[i];
        if (g->len <= 0 || g->rank <= 0) continue;
        const float *xs = x + (size_t)g->start * in;
        float *ys = y + (size_t)g->start * out;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g->len, g->rank, in, 1.0f, xs, in, g->A, in, 0.0f,
                    tmp, g->rank);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g->len, out, g->rank, g->scale, tmp, g->rank, g->B,
                    g->rank, 1.0f, ys, out);
    }
    return DS_OK;
}

static int cpu_seg_scale(void *ctx, float *y, int32_t width, ds_seg_range r) {
    const cpu_ctx *c = ctx;
    if (!in_plan(c->plan.n_vec, r)) return DS_EINVAL;
    if (r.n == 0) return DS_OK;
    const ds_vec_seg *segs = c->plan.vec + r.first;
    for (int32_t i = 0; i < r.n; i++)
        for (int32_t t = segs[i].start; t < segs[i].start + segs[i].len; t++) {
            float *yr = y + (size_t)t * width;
            for (int32_t j = 0; j < width; j++) yr[j] *= segs[i].v[j];
        }
    return DS_OK;
}

static int cpu_seg_add(void *ctx, float *y, int32_t width, ds_seg_range r) {
    const cpu_ctx *c = ctx;
    if (!in_plan(c->plan.n_vec, r)) return DS_EINVAL;
    if (r.n == 0) return DS_OK;
    const ds_vec_seg *segs = c->plan.vec + r.first;
    for (int32_t i = 0; i < r.n; i++)
        for (int32_t t = segs[i].start; t < segs[i].start + segs[i].len; t++) {
            float *yr = y + (size_t)t * width;
            for (int32_t j = 0; j < width; j++) yr[j] += segs[i].alpha * segs[i].v[j];
        }
    return DS_OK;
}

static int cpu_bottleneck(void *ctx, const float *x, float *o, int32_t d, ds_seg_range r) {
    const cpu_ctx *c = ctx;
    if (!in_plan(c->plan.n_bn, r)) return DS_EINVAL;
    return r.n ? ds_cpu_bottleneck(ctx, x, o, d, c->plan.bn + r.first, r.n) : DS_OK;
}

/* Segmented sparse deltas (CSR). Work is split into chunks of SPARSE_ROWS rows of one segment on
 * the backend's pool (a decode step with 16 distinct deltas is 16 one-token segments per
 * projection, too small for an OpenMP region each; see pool.h); within a chunk, rows outer, so a
 * row's entries are read once for the segment's tokens. Segments never overlap, so chunks write
 * disjoint outputs. */
#define SPARSE_ROWS 64

typedef struct sparse_job {
    const ds_sparse_seg *segs;
    const float *x;
    float *y;
    int32_t in, out, row_blocks;
} sparse_job;

static void sparse_chunk(void *arg, int64_t i) {
    const sparse_job *j = arg;
    const ds_sparse_seg *g = &j->segs[i / j->row_blocks];
    const int32_t r0 = (int32_t)(i % j->row_blocks) * SPARSE_ROWS;
    const int32_t r1 = r0 + SPARSE_ROWS < j->out ? r0 + SPARSE_ROWS : j->out;
    const float *xs = j->x + (size_t)g->start * j->in;
    float *ys = j->y + (size_t)g->start * j->out;
    for (int32_t row = r0; row < r1; row++) {
        const int32_t b = g->row_ptr[row], e = g->row_ptr[row + 1];
        for (int32_t t = 0; t < g->len && b < e; t++) {
            const float *xr = xs + (size_t)t * j->in;
            float acc = 0.0f;
            for (int32_t k = b; k < e; k++) acc += g->val[k] * xr[g->col[k]];
            ys[(size_t)t * j->out + row] += acc;
        }
    }
}

static int cpu_sparse(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r) {
    const cpu_ctx *c = ctx;
    if (!in_plan(c->plan.n_sparse, r)) return DS_EINVAL;
    int64_t work = 0;
    for (int32_t i = 0; i < r.n; i++) {
        const ds_sparse_seg *g = &c->plan.sparse[r.first + i];
        if (g->rows != out || g->cols != in || g->start < 0 || g->len < 0) return DS_EINVAL;
        work += g->nnz * (int64_t)g->len;
    }
    sparse_job j = {.segs = c->plan.sparse + r.first, .x = x, .y = y, .in = in, .out = out,
                    .row_blocks = (out + SPARSE_ROWS - 1) / SPARSE_ROWS};
    const int64_t n = (int64_t)r.n * j.row_blocks;
    if (work > 8192) {
        ds_pool_run(c->pool, n, sparse_chunk, &j);
    } else {
        for (int64_t i = 0; i < n; i++) sparse_chunk(&j, i);
    }
    return DS_OK;
}

static int cpu_set_rows(void *ctx, float *dst, int32_t width, const int32_t *rows, const float *const *src, int32_t n) {
    for (int32_t i = 0; i < n; i++) memcpy(dst + (size_t)rows[i] * width, src[i], sizeof(float) * (size_t)width);
    return DS_OK;
}

static int cpu_lora_expand(void *ctx, const float *t, int32_t rank, const float *B, float *y, int32_t out, int32_t n,
                           float scale) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, rank, scale, t, rank, B, rank, 1.0f, y, out);
    return DS_OK;
}

static const struct ds_backend_iface cpu_iface = {
    .version = DS_BACKEND_IFACE_VERSION,
    .name = "cpu",
    .free = cpu_free,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_copy,
    .download = cpu_copy,
    .synchronize = cpu_sync,
    .mat_upload = cpu_mat_upload,
    .mat_free = cpu_mat_free,
    .matmul = cpu_matmul,
    .matmul_t = cpu_matmul_t,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .silu_mul = cpu_silu_mul,
    .scale = cpu_scale,
    .gelu_tanh_mul = cpu_gelu_tanh_mul,
    .add = cpu_add,
    .get_rows = cpu_get_rows,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .plan_upload = cpu_plan_upload,
    .lora = cpu_lora,
    .seg_scale = cpu_seg_scale,
    .seg_add = cpu_seg_add,
    .set_rows = cpu_set_rows,
    .copy = cpu_copy,
    .lora_expand = cpu_lora_expand,
    .train = &ds_cpu_train_iface,
    .bottleneck = cpu_bottleneck,
    .sparse = cpu_sparse,
};

ds_backend *ds_backend_cpu_create(const ds_backend_params *params, ds_err *err) {
    ds_backend *b = calloc(1, sizeof *b);
    cpu_ctx *c = calloc(1, sizeof *c);
    if (!b || !c) {
        free(b);
        free(c);
        ds_err_set(err, DS_ENOMEM, "cpu backend: out of memory");
        return NULL;
    }
    if (params && params->n_threads < 0) { /* leave the process's thread settings alone */
        c->n_threads = omp_get_max_threads();
    } else {
        c->n_threads = params && params->n_threads > 0 ? params->n_threads : omp_get_num_procs();
        omp_set_num_threads(c->n_threads);
        openblas_set_num_threads(c->n_threads);
    }
    const char *isa;
    c->qk = ds_qk_best(&isa);
    const char *q8 = NULL;
    if (params && params->int8_activations) c->q8 = ds_q8_best(&q8);
    const char *was = getenv("DS_BLAS_CORE_WAS"); /* src/backend/cpu/cpu_env.h */
    DS_LOGI("cpu backend: %d threads, matmul kernels %s%s%s, OpenBLAS %s kernels%s%s%s", c->n_threads, isa,
            q8 ? ", int8 activations " : "", q8 ? q8 : "", openblas_get_corename(), was ? " (it chose " : "",
            was ? was : "", was ? " for this CPU: see $OPENBLAS_CORETYPE)" : "");
    if (!(c->pool = ds_pool_create(c->n_threads))) {
        free(b);
        free(c);
        ds_err_set(err, DS_ENOMEM, "cpu backend: cannot start threads");
        return NULL;
    }
    b->iface = &cpu_iface;
    b->ctx = c;
    return b;
}
