/* CPU matmul kernels over typed weight rows — a template compiled once per instruction set
 * (qk_generic.c, qk_avx2.c, qk_avx512.c, each with its own -m flags; qmatmul.c picks one at run
 * time from cpuid). Before including, define QK_NAME (the table's name) and QK_VW (fp32 lanes
 * of a vector: 8 for 256-bit, 16 for 512-bit).
 *
 * Numerics are the fp32-dequantised model's: a block is expanded to the exact fp32 values ggml's
 * dequantize_row_* gives (same operations, same order), then multiplied with fp32 activations and
 * accumulated in fp32. Only the summation order differs from a plain fp32 GEMM. */
#include "backend/cpu/qmatmul.h"

#include "ds/common.h"

#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(QK_VW * 4)));

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float vsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < QK_VW; i++) s += v[i];
    return s;
}

#if defined(__F16C__)
static inline float f16v(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
#else
static inline float f16v(const uint8_t *p) { return ds_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }
#endif

/* Byte vectors of QK_VW lanes, widened to fp32 lanes in one conversion. */
typedef uint8_t u8v __attribute__((vector_size(QK_VW)));
typedef int8_t i8v __attribute__((vector_size(QK_VW)));

static inline u8v ld8(const uint8_t *p) {
    u8v v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
typedef int32_t i32v __attribute__((vector_size(QK_VW * 4)));
/* Through int32 lanes: GCC lowers u8→i32 to vpmovzxbd and i32→f32 to vcvtdq2ps, but a direct
 * u8→f32 conversion to one scalar conversion per lane. */
static inline vf u2f(u8v b) { return __builtin_convertvector(__builtin_convertvector(b, i32v), vf); }
/* Signed bytes through the unsigned path (GCC scalarises a signed i8→i32 conversion): b + 128 as
 * u8, widened, minus 128. */
static inline vf i2f(i8v b) { return u2f((u8v)b ^ 0x80) - 128.0f; }

/* ---- one block → fp32 (elements in row order) ---- */

/* Q4_0 / Q4_1: elements 0..15 are the low nibbles of qs[0..15], 16..31 the high nibbles. */
static void blk_q4_0(const uint8_t *x, float *y) {
    const float d = f16v(x);
    for (int j = 0; j < 16; j += QK_VW) {
        const u8v b = ld8(x + 2 + j);
        vstore(y + j, (u2f(b & 15) - 8.0f) * d);
        vstore(y + 16 + j, (u2f(b >> 4) - 8.0f) * d);
    }
}

static void blk_q4_1(const uint8_t *x, float *y) {
    const float d = f16v(x), m = f16v(x + 2);
    for (int j = 0; j < 16; j += QK_VW) {
        const u8v b = ld8(x + 4 + j);
        vstore(y + j, u2f(b & 15) * d + m);
        vstore(y + 16 + j, u2f(b >> 4) * d + m);
    }
}

static void blk_q5_0(const uint8_t *x, float *y) {
    const float d = f16v(x);
    uint32_t qh;
    memcpy(&qh, x + 2, 4);
    for (int j = 0; j < 16; j++) {
        const int h0 = (int)(((qh >> j) << 4) & 0x10), h1 = (int)((qh >> (j + 12)) & 0x10);
        y[j] = (float)(((x[6 + j] & 0x0F) | h0) - 16) * d;
        y[j + 16] = (float)(((x[6 + j] >> 4) | h1) - 16) * d;
    }
}

static void blk_q5_1(const uint8_t *x, float *y) {
    const float d = f16v(x), m = f16v(x + 2);
    uint32_t qh;
    memcpy(&qh, x + 4, 4);
    for (int j = 0; j < 16; j++) {
        const int h0 = (int)(((qh >> j) << 4) & 0x10), h1 = (int)((qh >> (j + 12)) & 0x10);
        y[j] = (float)((x[8 + j] & 0x0F) | h0) * d + m;
        y[j + 16] = (float)((x[8 + j] >> 4) | h1) * d + m;
    }
}

static void blk_q8_0(const uint8_t *x, float *y) {
    const float d = f16v(x);
    for (int j = 0; j < 32; j += QK_VW) {
        i8v b;
        memcpy(&b, x + 2 + j, sizeof b);
        vstore(y + j, i2f(b) * d);
    }
}

static void blk_q4_k(const uint8_t *x, float *y) {
    const float d = f16v(x), dmin = f16v(x + 2);
    const uint8_t *scales = x + 4, *q = x + 16;
    for (int is = 0; is < 8; is += 2, q += 32, y += 64) {
        uint8_t sc, m;
        ds_k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        ds_k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; l += QK_VW) {
            const u8v b = ld8(q + l);
            vstore(y + l, d1 * u2f(b & 15) - m1);
            vstore(y + l + 32, d2 * u2f(b >> 4) - m2);
        }
    }
}

static void blk_q5_k(const uint8_t *x, float *y) {
    const float d = f16v(x), dmin = f16v(x + 2);
    const uint8_t *scales = x + 4, *qh = x + 16, *ql = x + 48;
    int sh = 0;
    for (int is = 0; is < 8; is += 2, ql += 32, y += 64, sh += 2) {
        uint8_t sc, m;
        ds_k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        ds_k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; l += QK_VW) {
            const u8v b = ld8(ql + l), h = ld8(qh + l);
            vstore(y + l, d1 * u2f((b & 15) | (((h >> sh) & 1) << 4)) - m1);
            vstore(y + l + 32, d2 * u2f((b >> 4) | (((h >> (sh + 1)) & 1) << 4)) - m2);
        }
    }
}

static void blk_q6_k(const uint8_t *x, float *y) {
    const float d = f16v(x + 208);
    const uint8_t *ql = x, *qh = x + 128;
    const int8_t *sc = (const int8_t *)(x + 192);
    for (int n = 0; n < 2; n++, y += 128, ql += 64, qh += 32, sc += 8) {
        for (int l = 0; l < 32; l += QK_VW) { /* a vector never crosses l = 16: one scale each */
            const int is = l / 16;
            const float s0 = d * sc[is + 0], s1 = d * sc[is + 2], s2 = d * sc[is + 4], s3 = d * sc[is + 6];
            const u8v a = ld8(ql + l), c = ld8(ql + l + 32), h = ld8(qh + l);
            vstore(y + l, s0 * (u2f((a & 15) | ((h & 3) << 4)) - 32.0f));
            vstore(y + l + 32, s1 * (u2f((c & 15) | (((h >> 2) & 3) << 4)) - 32.0f));
            vstore(y + l + 64, s2 * (u2f((a >> 4) | (((h >> 4) & 3) << 4)) - 32.0f));
            vstore(y + l + 96, s3 * (u2f((c >> 4) | (((h >> 6) & 3) << 4)) - 32.0f));
        }
    }
}

/* Q6_K: ggml evaluates d*sc*q left to right ((d*sc)*q), which s0..s3 above reproduce exactly. */

static void blk_f16(const uint8_t *x, float *y, int n) {
#if defined(__F16C__)
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + 2 * i))));
    for (; i < n; i++) y[i] = f16v(x + 2 * i);
#else
    for (int i = 0; i < n; i++) y[i] = f16v(x + 2 * i);
#endif
}

static void blk_bf16(const uint8_t *x, float *y, int n) {
    for (int i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, x + 2 * i, 2);
        const uint32_t u = (uint32_t)h << 16;
        memcpy(y + i, &u, 4);
    }
}

/* Elements [k0, k0+n) of a row (k0 and n multiples of the block size; 16-bit types: any) → y. */
static void deq_span(ds_dtype t, const uint8_t *row, int32_t k0, int32_t n, float *y) {
    switch (t) {
    case DS_DTYPE_F32: memcpy(y, row + (size_t)k0 * 4, (size_t)n * 4); return;
    case DS_DTYPE_F16: blk_f16(row + (size_t)k0 * 2, y, n); return;
    case DS_DTYPE_BF16: blk_bf16(row + (size_t)k0 * 2, y, n); return;
    default: break;
    }
    const int32_t B = ds_dtype_block(t);
    const size_t bb = ds_dtype_block_bytes(t);
    const uint8_t *x = row + (size_t)(k0 / B) * bb;
    for (int32_t j = 0; j < n; j += B, x += bb, y += B) {
        switch (t) {
        case DS_DTYPE_Q4_0: blk_q4_0(x, y); break;
        case DS_DTYPE_Q4_1: blk_q4_1(x, y); break;
        case DS_DTYPE_Q5_0: blk_q5_0(x, y); break;
        case DS_DTYPE_Q5_1: blk_q5_1(x, y); break;
        case DS_DTYPE_Q8_0: blk_q8_0(x, y); break;
        case DS_DTYPE_Q4_K: blk_q4_k(x, y); break;
        case DS_DTYPE_Q5_K: blk_q5_k(x, y); break;
        case DS_DTYPE_Q6_K: blk_q6_k(x, y); break;
        default: break;
        }
    }
}

/* y[t][r] (=|+=) W[r]·x[t] (+ bias[r]) for rows [r0, r1) and n ≤ DS_QK_GEMV_MAX tokens. The row
 * is expanded one span (QK_SPAN elements, whole blocks) at a time into an L1-resident buffer and
 * used by every token before the next span. */
#define QK_SPAN 256
static void gemv(const ds_mat *w, int32_t r0, int32_t r1, const float *x, int32_t n, float *y, const float *bias,
                 bool acc) {
    const int32_t K = w->cols;
    float buf[QK_SPAN] __attribute__((aligned(64)));
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        vf a[DS_QK_GEMV_MAX];
        float tail[DS_QK_GEMV_MAX];
        for (int32_t t = 0; t < n; t++) {
            a[t] = (vf){0};
            tail[t] = 0.0f;
        }
        for (int32_t k0 = 0; k0 < K; k0 += QK_SPAN) {
            const int32_t len = K - k0 < QK_SPAN ? K - k0 : QK_SPAN;
            const float *src = buf;
            if (w->dtype == DS_DTYPE_F32) src = (const float *)row + k0;
            else deq_span(w->dtype, row, k0, len, buf);
            const int32_t l4 = len / (4 * QK_VW) * (4 * QK_VW), lv = len / QK_VW * QK_VW;
            for (int32_t t = 0; t < n; t++) {
                const float *xt = x + (size_t)t * K + k0;
                /* four independent sums: one chain of dependent FMAs would wait on its latency */
                vf s0 = a[t], s1 = {0}, s2 = {0}, s3 = {0};
                int32_t j = 0;
                for (; j < l4; j += 4 * QK_VW) {
                    s0 += vload(src + j) * vload(xt + j);
                    s1 += vload(src + j + QK_VW) * vload(xt + j + QK_VW);
                    s2 += vload(src + j + 2 * QK_VW) * vload(xt + j + 2 * QK_VW);
                    s3 += vload(src + j + 3 * QK_VW) * vload(xt + j + 3 * QK_VW);
                }
                for (; j < lv; j += QK_VW) s0 += vload(src + j) * vload(xt + j);
                a[t] = (s0 + s1) + (s2 + s3);
                for (; j < len; j++) tail[t] += src[j] * xt[j];
            }
        }
        for (int32_t t = 0; t < n; t++) {
            float v = vsum(a[t]) + tail[t];
            if (bias) v += bias[r];
            float *yr = y + (size_t)t * w->rows + r;
            *yr = acc ? *yr + v : v;
        }
    }
}

/* dst[i][k - k0] = W[r0 + i][k] for k in [k0, k0 + kn): a tile for the GEMM path. */
static void deq_tile(const ds_mat *w, int32_t r0, int32_t nr, int32_t k0, int32_t kn, float *dst) {
    for (int32_t i = 0; i < nr; i++)
        deq_span(w->dtype, (const uint8_t *)w->data + (size_t)(r0 + i) * w->row_bytes, k0, kn, dst + (size_t)i * kn);
}

#include "backend/cpu/qgemv.h"
#include "backend/cpu/act_kern.h"
#include "backend/cpu/attn_kern.h"
#if defined(__AVX512F__) && QK_VW == 16
#include "backend/cpu/qgemm.h"
#define QK_GEMM_TILE gemm_tile
#else
#define QK_GEMM_TILE NULL
#endif

const ds_qk_ops QK_NAME = {.gemv = gemv, .gemv_fused = gemv_fused, .deq_tile = deq_tile, .gemm_tile = QK_GEMM_TILE,
                           .attn_dec = attn_dec, .exp_sum = exp_sub_sum,
                           .silu_mul = silu_mul, .vw = QK_VW};
