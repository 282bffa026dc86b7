/* Decode attention over the paged KV cache — part of the per-instruction-set kernel template
 * (included by qkern.h, which defines vf, QK_VW, vload, vsum).
 *
 * One call: one token, one KV head, keys [i0, i1). The query heads of the KV head's GQA group run
 * together, so each K and V row is read once for the group (a per-head loop read it `group` times:
 * at 2048 keys the cache of a layer no longer stays in L2, and decode was bound by those reads).
 * Online softmax over blocks of ATTN_KB keys: per head a running maximum m, a running sum
 * l = Σ e^{s−m} and an unnormalised output o = Σ e^{s−m}·v, rescaled when m grows. The caller
 * merges parts of one token's keys (split-K, flash-decoding style) and divides by l. fp32 throughout:
 * the result differs from softmax-then-sum only in rounding (test_backend_ops, attention cases). */
#include "ds/backend.h"

#include <math.h>
#include <string.h>

#define ATTN_KB 64

/* Sum of a vector's lanes as a tree (vsum adds them in order: a chain of QK_VW dependent adds per
 * dot product, which was the kernel's critical path). */
typedef float aoct __attribute__((vector_size(32)));
typedef float aquad __attribute__((vector_size(16)));
static inline float attn_hsum(vf v) {
#if QK_VW == 16
    const aoct h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    const aoct h = v;
#endif
    const aquad x = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (x[0] + x[2]) + (x[1] + x[3]);
}
#define ATTN_GROUP_MAX 16 /* query heads that share one pass over the keys (larger groups: several) */

/* Heads [g0, g0 + G) of the group (G ≤ ATTN_GROUP_MAX); o, ml point at head g0's entries. */
static void attn_dec_heads(const ds_attn_args *a, int32_t t, int32_t kvh, int32_t g0, int32_t G, int32_t i0, int32_t i1,
                           float *o, float *ml) {
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head, row = a->n_kv_head * hd;
    const int32_t hv = hd / QK_VW * QK_VW, s = a->tok_seq[t];
    const int32_t *bt = a->block_tables + (size_t)s * a->max_blocks;
    const int32_t pre = a->seq_prefix ? a->seq_prefix[s] : 0;
    const float *q = a->q + ((size_t)t * a->n_head + (size_t)kvh * group + g0) * hd;
    float m[ATTN_GROUP_MAX], l[ATTN_GROUP_MAX], p[ATTN_GROUP_MAX][ATTN_KB];
    int64_t at[2][ATTN_KB]; /* this block's rows, and the next block's (prefetched) */
    const size_t rb = sizeof(float) * (size_t)hd;
    for (int32_t g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.0f;
    memset(o, 0, sizeof(float) * (size_t)G * hd);
    for (int32_t j = 0; j < ATTN_KB && i0 + j < i1; j++)
        at[0][j] = ds_kv_slot(bt, pre, a->block_size, i0 + j) * row + (int64_t)kvh * hd;
    for (int32_t b0 = i0, cur = 0; b0 < i1; b0 += ATTN_KB, cur ^= 1) {
        const int32_t nb = i1 - b0 < ATTN_KB ? i1 - b0 : ATTN_KB;
        const int64_t *here = at[cur];
        int64_t *next = at[cur ^ 1];
        /* the next block's rows: their addresses now, their lines on the way while this block runs */
        for (int32_t j = 0; j < ATTN_KB && b0 + ATTN_KB + j < i1; j++) {
            next[j] = ds_kv_slot(bt, pre, a->block_size, b0 + ATTN_KB + j) * row + (int64_t)kvh * hd;
            for (size_t off = 0; off < rb; off += 64) {
                __builtin_prefetch((const char *)(a->k_cache + next[j]) + off);
                __builtin_prefetch((const char *)(a->v_cache + next[j]) + off);
            }
        }
        for (int32_t j = 0; j < nb; j++) {
            const float *k = a->k_cache + here[j];
            for (int32_t g = 0; g < G; g++) {
                const float *qg = q + (size_t)g * hd;
                vf acc = {0};
                for (int32_t d = 0; d < hv; d += QK_VW) acc += vload(qg + d) * vload(k + d);
                float dot = attn_hsum(acc);
                for (int32_t d = hv; d < hd; d++) dot += qg[d] * k[d];
                p[g][j] = dot * a->scale;
            }
        }
        for (int32_t g = 0; g < G; g++) {
            float bm = m[g];
            for (int32_t j = 0; j < nb; j++) bm = p[g][j] > bm ? p[g][j] : bm;
            if (bm > m[g]) { /* rescale what came before (nothing on the first block: l = o = 0) */
                const float c = m[g] == -INFINITY ? 0.0f : expf(m[g] - bm);
                l[g] *= c;
                float *og = o + (size_t)g * hd;
                for (int32_t d = 0; d < hd; d++) og[d] *= c;
                m[g] = bm;
            }
            l[g] += exp_sub_sum(p[g], nb, m[g]);
        }
        for (int32_t j = 0; j < nb; j++) {
            const float *v = a->v_cache + here[j];
            for (int32_t g = 0; g < G; g++) {
                float *og = o + (size_t)g * hd;
                const vf pv = (vf){0} + p[g][j];
                for (int32_t d = 0; d < hv; d += QK_VW) {
                    const vf ov = vload(og + d) + pv * vload(v + d);
                    memcpy(og + d, &ov, sizeof ov);
                }
                for (int32_t d = hv; d < hd; d++) og[d] += p[g][j] * v[d];
            }
        }
    }
    for (int32_t g = 0; g < G; g++) ml[2 * g] = m[g], ml[2 * g + 1] = l[g];
}

/* Every head of KV head kvh's group: o[group][head_dim], ml[group][2]. */
static void attn_dec(const ds_attn_args *a, int32_t t, int32_t kvh, int32_t i0, int32_t i1, float *o, float *ml) {
    const int32_t group = a->n_head / a->n_kv_head;
    for (int32_t g0 = 0; g0 < group; g0 += ATTN_GROUP_MAX) {
        const int32_t G = group - g0 < ATTN_GROUP_MAX ? group - g0 : ATTN_GROUP_MAX;
        attn_dec_heads(a, t, kvh, g0, G, i0, i1, o + (size_t)g0 * a->head_dim, ml + 2 * g0);
    }
}
