/* Int8-activation gemv kernels (the opt-in mode of qmatmul.h) on 256-bit vectors — a template
 * compiled twice: q8_avx2.c (AVX2: vpmaddubsw + vpmaddwd) and q8_vnni.c (AVX-512 VNNI with VL:
 * vpdpbusd / vpdpwssd). Define QK8_NAME, and QK8_VNNI for the VNNI forms, before including.
 *
 * A weight block is unpacked once to unsigned or signed 8-bit codes and multiplied with the int8
 * activations of every token of the step:
 *   Q4_0  d·(q − 8):  d·dx·Σ q·x̂ − 8·d·dx·Σx̂          (dx·Σx̂ of the activation block: s8)
 *   Q4_1  d·q + m:    d·dx·Σ q·x̂ + m·dx·Σx̂
 *   Q8_0  d·q:        d·dx·Σ |q|·sign(x̂, q)            (vpmaddubsw wants one unsigned operand)
 *   Q4_K/Q5_K  d·sc_j·q − dmin·m_j per 32:  d·dx·Σ_j sc_j·Σ q·x̂ − dmin·dx·Σ_j m_j·Σ_j x̂
 *   Q6_K  d·sc_g·(q − 32) per 16:  d·dx·Σ_g sc_g·Σ |q−32|·sign(x̂, q−32)
 * Integer sums stay within int16 pairs (|q| ≤ 32, |x̂| ≤ 127) and int32 lanes. */
#include "backend/cpu/qmatmul.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
static inline __m256i ld256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* Σ over each 4 bytes of u8·s8 → 8 int32 lanes. */
static inline __m256i dot_us(__m256i u, __m256i s) {
#ifdef QK8_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* acc + Σ over each 4 bytes of u8·s8, each byte pair's sum times the 16-bit scale of its lane. */
static inline __m256i dot_us_sc(__m256i acc, __m256i u, __m256i s, __m256i sc) {
    const __m256i p = _mm256_maddubs_epi16(u, s);
#ifdef QK8_VNNI
    return _mm256_dpwssd_epi32(acc, p, sc);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row against n tokens: acc[t] (fp32 lanes) and tail[t] (scalar offset terms). */
static inline __attribute__((always_inline)) void row_q8(ds_dtype dt, int32_t K, const uint8_t *row,
                                                         const ds_q8_act *a, int32_t n, __m256 *acc, __m128 *macc,
                                                         float *tail) {
    const int32_t K32 = K / 32, nb = K / a->blk;
    const __m256i m4 = _mm256_set1_epi8(15);
    switch (dt) {
    case DS_DTYPE_Q4_0:
    case DS_DTYPE_Q4_1: {
        const bool q41 = dt == DS_DTYPE_Q4_1;
        const int32_t bb = q41 ? 20 : 18;
        __m256 tv = _mm256_setzero_ps();
        if (n == 1) { /* one token: two blocks per pass on independent chains (the FMA latency bounds it) */
            __m256 a0 = acc[0], a1 = _mm256_setzero_ps(), tv1 = _mm256_setzero_ps();
            int32_t b = 0;
            for (; b + 1 < K32; b += 2, row += 2 * bb) {
                const __m128i v0 = _mm_loadu_si128((const __m128i *)(row + (q41 ? 4 : 2)));
                const __m128i v1 = _mm_loadu_si128((const __m128i *)(row + bb + (q41 ? 4 : 2)));
                const __m256i q0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v0, 4), v0), m4);
                const __m256i q1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v1, 4), v1), m4);
                const float d0 = h2f(row), d1 = h2f(row + bb);
                const float mo0 = q41 ? h2f(row + 2) : -8.0f * d0, mo1 = q41 ? h2f(row + bb + 2) : -8.0f * d1;
                const __m256 p0 = _mm256_cvtepi32_ps(dot_us(q0, ld256(a->q + 32 * b)));
                const __m256 p1 = _mm256_cvtepi32_ps(dot_us(q1, ld256(a->q + 32 * b + 32)));
                a0 = _mm256_fmadd_ps(p0, _mm256_set1_ps(d0 * a->d[b]), a0);
                a1 = _mm256_fmadd_ps(p1, _mm256_set1_ps(d1 * a->d[b + 1]), a1);
                tv = _mm256_fmadd_ps(_mm256_set1_ps(mo0), _mm256_loadu_ps(a->s8 + 8 * (size_t)b), tv);
                tv1 = _mm256_fmadd_ps(_mm256_set1_ps(mo1), _mm256_loadu_ps(a->s8 + 8 * (size_t)b + 8), tv1);
            }
            for (; b < K32; b++, row += bb) {
                const float d = h2f(row), mo = q41 ? h2f(row + 2) : -8.0f * d;
                const __m128i v = _mm_loadu_si128((const __m128i *)(row + (q41 ? 4 : 2)));
                const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
                const __m256 p = _mm256_cvtepi32_ps(dot_us(q, ld256(a->q + 32 * b)));
                a0 = _mm256_fmadd_ps(p, _mm256_set1_ps(d * a->d[b]), a0);
                tv = _mm256_fmadd_ps(_mm256_set1_ps(mo), _mm256_loadu_ps(a->s8 + 8 * (size_t)b), tv);
            }
            acc[0] = _mm256_add_ps(a0, a1);
            tv = _mm256_add_ps(tv, tv1);
        } else
            for (int32_t b = 0; b < K32; b++, row += bb) {
                const float d = h2f(row), mo = q41 ? h2f(row + 2) : -8.0f * d;
                const __m128i v = _mm_loadu_si128((const __m128i *)(row + (q41 ? 4 : 2)));
                const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
                const __m256 dw = _mm256_set1_ps(d);
                for (int32_t t = 0; t < n; t++) {
                    const size_t i = (size_t)t * K32 + b;
                    const __m256 p = _mm256_cvtepi32_ps(dot_us(q, ld256(a->q + (size_t)t * K + 32 * b)));
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(p, _mm256_broadcast_ss(a->d + i)), dw, acc[t]);
                }
                /* the offset term of all (≤ 8) tokens in one vector: lane t is token t */
                tv = _mm256_fmadd_ps(_mm256_set1_ps(mo), _mm256_loadu_ps(a->s8 + 8 * (size_t)b), tv);
            }
        float lanes[8];
        _mm256_storeu_ps(lanes, tv);
        for (int32_t t = 0; t < n; t++) tail[t] += lanes[t];
        return;
    }
    case DS_DTYPE_Q8_0:
        if (n == 1) { /* one token: two independent chains */
            __m256 a0 = acc[0], a1 = _mm256_setzero_ps();
            int32_t b = 0;
            for (; b + 1 < K32; b += 2, row += 68) {
                const __m256i w0 = ld256(row + 2), w1 = ld256(row + 36);
                const __m256i p0 = dot_us(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(ld256(a->q + 32 * b), w0));
                const __m256i p1 = dot_us(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(ld256(a->q + 32 * b + 32), w1));
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(h2f(row) * a->d[b]), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(h2f(row + 34) * a->d[b + 1]), a1);
            }
            for (; b < K32; b++, row += 34) {
                const __m256i w = ld256(row + 2);
                const __m256i p = dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(ld256(a->q + 32 * b), w));
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(row) * a->d[b]), a0);
            }
            acc[0] = _mm256_add_ps(a0, a1);
            return;
        }
        for (int32_t b = 0; b < K32; b++, row += 34) {
            const float d = h2f(row);
            const __m256i w = ld256(row + 2), u = _mm256_sign_epi8(w, w);
            const __m256 dw = _mm256_set1_ps(d);
            for (int32_t t = 0; t < n; t++) {
                const __m256i p = dot_us(u, _mm256_sign_epi8(ld256(a->q + (size_t)t * K + 32 * b), w));
                const __m256 pf = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(a->d + (size_t)t * K32 + b));
                acc[t] = _mm256_fmadd_ps(pf, dw, acc[t]);
            }
        }
        return;
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q5_K: {
        const bool q5 = dt == DS_DTYPE_Q5_K;
        const int32_t bb = q5 ? 176 : 144;
        const __m256i one = _mm256_set1_epi8(1);
        for (int32_t b = 0; b < nb; b++, row += bb) {
            const float d = h2f(row), dmin = h2f(row + 2);
            const uint8_t *qh = row + 16, *qs = row + (q5 ? 48 : 16);
            /* the 6-bit scales and mins, unpacked as ggml does: bytes 0..7 scales, 8..15 mins */
            uint32_t u[4];
            memcpy(u, row + 4, 12);
            u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
            const uint32_t m1 = u[1] & 0x3f3f3f3fu;
            u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
            u[2] = m1;
            u[0] &= 0x3f3f3f3fu;
            uint8_t sm[16];
            memcpy(sm, u, 16);
            const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(sm + 8)));
            /* the 8 scales as 16-bit lanes in both halves; sub-block j's is broadcast by a byte shuffle */
            const __m256i scl = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sm)));
            __m256i ai[DS_QK_GEMV_MAX];
            for (int32_t t = 0; t < n; t++) ai[t] = _mm256_setzero_si256();
            const __m256i hb = q5 ? ld256(qh) : _mm256_setzero_si256();
            __m256i c4[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                             _mm256_setzero_si256()};
            for (int c = 0; c < 4; c++) { /* 64 columns: sub-blocks 2c (low nibbles) and 2c+1 */
                const __m256i v = ld256(qs + 32 * c);
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (q5) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
                }
                const __m256i s0 = _mm256_shuffle_epi8(scl, _mm256_set1_epi16((short)((4 * c + 1) << 8 | 4 * c)));
                const __m256i s1 = _mm256_shuffle_epi8(scl, _mm256_set1_epi16((short)((4 * c + 3) << 8 | (4 * c + 2))));
                if (n == 1) { /* one token: four independent chains, summed below */
                    const int8_t *xq = a->q + 256 * b + 64 * c;
                    c4[2 * (c & 1)] = dot_us_sc(c4[2 * (c & 1)], lo, ld256(xq), s0);
                    c4[2 * (c & 1) + 1] = dot_us_sc(c4[2 * (c & 1) + 1], hi, ld256(xq + 32), s1);
                } else
                    for (int32_t t = 0; t < n; t++) {
                        const int8_t *xq = a->q + (size_t)t * K + 256 * b + 64 * c;
                        ai[t] = dot_us_sc(ai[t], lo, ld256(xq), s0);
                        ai[t] = dot_us_sc(ai[t], hi, ld256(xq + 32), s1);
                    }
            }
            if (n == 1) ai[0] = _mm256_add_epi32(_mm256_add_epi32(c4[0], c4[1]), _mm256_add_epi32(c4[2], c4[3]));
            for (int32_t t = 0; t < n; t++) {
                const float dx = a->d[(size_t)t * nb + b];
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[t]), _mm256_set1_ps(d * dx), acc[t]);
                /* Σ_j m_j·Σ_j x̂ for the 8 sub-blocks, in the fp32 lanes of macc */
                const __m128i p = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)(a->bs + (size_t)t * K32 + 8 * b)));
                macc[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(p), _mm_set1_ps(-dmin * dx), macc[t]);
            }
        }
        return;
    }
    case DS_DTYPE_Q6_K: {
        const __m256i m3 = _mm256_set1_epi8(3), k32 = _mm256_set1_epi8(32);
        for (int32_t b = 0; b < nb; b++, row += 210) {
            const float d = h2f(row + 208);
            const int8_t *scb = (const int8_t *)(row + 192);
            __m256i ai[DS_QK_GEMV_MAX];
            for (int32_t t = 0; t < n; t++) ai[t] = _mm256_setzero_si256();
            /* the 16 scales as 16-bit lanes: 0..7 in the low half, 8..15 in the high one */
            const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)scb));
            __m256i c4[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                             _mm256_setzero_si256()};
            for (int h = 0; h < 2; h++) { /* 128 columns: ql[64 h..], qh[32 h..], scales sc[8 h..] */
                const uint8_t *ql = row + 64 * h, *qhp = row + 128 + 32 * h;
                const __m256i sh = h ? _mm256_permute2x128_si256(s16, s16, 0x11) : _mm256_permute2x128_si256(s16, s16, 0x00);
                const __m256i x0 = ld256(ql), x1 = ld256(ql + 32), hh = ld256(qhp);
                for (int i = 0; i < 4; i++) {
                    const __m256i lo4 = _mm256_and_si256(i & 2 ? _mm256_srli_epi16(i & 1 ? x1 : x0, 4) : (i & 1 ? x1 : x0), m4);
                    const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(hh, 2 * i), m3);
                    const __m256i g = _mm256_sub_epi8(_mm256_or_si256(lo4, _mm256_slli_epi16(h2, 4)), k32);
                    const __m256i ug = _mm256_sign_epi8(g, g);
                    /* columns 0..15 of the group use sc[8h + 2i], 16..31 sc[8h + 2i + 1] */
                    const __m256i sc = _mm256_shuffle_epi8(
                        sh, _mm256_set_m128i(_mm_set1_epi16((short)((4 * i + 3) << 8 | (4 * i + 2))),
                                             _mm_set1_epi16((short)((4 * i + 1) << 8 | 4 * i))));
                    if (n == 1) { /* one token: four independent chains, summed below */
                        const int8_t *xq = a->q + 256 * b + 128 * h + 32 * i;
                        c4[i] = dot_us_sc(c4[i], ug, _mm256_sign_epi8(ld256(xq), g), sc);
                    } else
                        for (int32_t t = 0; t < n; t++) {
                            const int8_t *xq = a->q + (size_t)t * K + 256 * b + 128 * h + 32 * i;
                            ai[t] = dot_us_sc(ai[t], ug, _mm256_sign_epi8(ld256(xq), g), sc);
                        }
                }
            }
            if (n == 1) ai[0] = _mm256_add_epi32(_mm256_add_epi32(c4[0], c4[1]), _mm256_add_epi32(c4[2], c4[3]));
            for (int32_t t = 0; t < n; t++) {
                const float dx = a->d[(size_t)t * nb + b];
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[t]), _mm256_set1_ps(d * dx), acc[t]);
            }
        }
        return;
    }
    default: return;
    }
}

static void gemv(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y, const float *bias,
                 bool acc) {
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m256 s[DS_QK_GEMV_MAX];
        __m128 ms[DS_QK_GEMV_MAX];
        float tail[DS_QK_GEMV_MAX];
        if (n == 1) { /* constant n: the accumulators stay in registers */
            __m256 s1[1] = {_mm256_setzero_ps()};
            __m128 m1[1] = {_mm_setzero_ps()};
            float t1[1] = {0.0f};
            row_q8(w->dtype, w->cols, row, a, 1, s1, m1, t1);
            s[0] = s1[0], ms[0] = m1[0], tail[0] = t1[0];
        } else {
            for (int32_t t = 0; t < n; t++) s[t] = _mm256_setzero_ps(), ms[t] = _mm_setzero_ps(), tail[t] = 0.0f;
            if (n == DS_QK_GEMV_MAX) /* full groups of a prefill: unrolled over the tokens */
                row_q8(w->dtype, w->cols, row, a, DS_QK_GEMV_MAX, s, ms, tail);
            else
                row_q8(w->dtype, w->cols, row, a, n, s, ms, tail);
        }
        for (int32_t t = 0; t < n; t++) {
            float v = hsum(_mm256_add_ps(s[t], _mm256_set_m128(_mm_setzero_ps(), ms[t]))) + tail[t];
            if (bias) v += bias[r];
            float *yr = y + (size_t)t * w->rows + r;
            *yr = acc ? *yr + v : v;
        }
    }
}

/* ---- 8-row interleaved tiles (ds_q8_ops.tile8) ---- */

/* Per super-block of an 8-row tile: codes W[j][g] (sub-block j, 4-column group g; lane r = row r),
 * scales and min pairs per row lane, d and dmin per row. */
typedef struct tile_sb {
    __m256i w[8][8];
    __m256i sc[8];  /* i32 lanes: sub-block j's 6-bit scale of each row */
    __m256i mp[4];  /* i32 lanes: (m[2p], m[2p+1]) as two i16 of each row */
    __m256 d, dmin;
} tile_sb;

/* 8×8 transpose of 32-bit lanes: out[g] lane r = in[r] lane g. */
static inline void transpose8(const __m256i in[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int g = 0; g < 4; g++) {
        out[g] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x20);
        out[g + 4] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x31);
    }
}

static void tile_build(const ds_mat *w, int32_t r0, int32_t nb, tile_sb *t) {
    const bool q5 = w->dtype == DS_DTYPE_Q5_K;
    const int32_t bb = q5 ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    for (int32_t b = 0; b < nb; b++) {
        __m256i q[8][8]; /* [row][sub-block] */
        uint8_t sc[8][8], mn[8][8];
        float d[8], dmin[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *row = (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes + (size_t)b * bb;
            d[r] = h2f(row), dmin[r] = h2f(row + 2);
            uint32_t u[4];
            memcpy(u, row + 4, 12);
            u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
            const uint32_t m1 = u[1] & 0x3f3f3f3fu;
            u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
            u[2] = m1;
            u[0] &= 0x3f3f3f3fu;
            memcpy(sc[r], u, 8);
            memcpy(mn[r], (const uint8_t *)u + 8, 8);
            const uint8_t *qs = row + (q5 ? 48 : 16);
            const __m256i hb = q5 ? ld256(row + 16) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v = ld256(qs + 32 * c);
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (q5) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
                }
                q[r][2 * c] = lo, q[r][2 * c + 1] = hi;
            }
        }
        tile_sb *s = &t[b];
        for (int j = 0; j < 8; j++) {
            __m256i in[8];
            for (int r = 0; r < 8; r++) in[r] = q[r][j];
            transpose8(in, s->w[j]);
            int32_t v[8];
            for (int r = 0; r < 8; r++) v[r] = sc[r][j];
            s->sc[j] = _mm256_loadu_si256((const __m256i *)v);
        }
        for (int p = 0; p < 4; p++) {
            int32_t v[8];
            for (int r = 0; r < 8; r++) v[r] = (int32_t)((uint32_t)mn[r][2 * p] | (uint32_t)mn[r][2 * p + 1] << 16);
            s->mp[p] = _mm256_loadu_si256((const __m256i *)v);
        }
        s->d = _mm256_loadu_ps(d), s->dmin = _mm256_loadu_ps(dmin);
    }
}

static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#ifdef QK8_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, dot_us(u, s));
#endif
}

static inline __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
#ifdef QK8_VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* NT tokens (from t0) against one tile: out[k] = the 8 rows' dot products of token t0 + k. */
static inline __attribute__((always_inline)) void tile_tokens(const tile_sb *t, int32_t nb, const ds_q8_act *a,
                                                              int32_t K, int32_t t0, int NT, __m256 *out) {
    const int32_t K32 = K / 32;
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++) {
        const tile_sb *s = &t[b];
        __m256i isum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
        for (int j = 0; j < 8; j++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int g = 0; g < 8; g++) {
                const __m256i wv = s->w[j][g];
                for (int k = 0; k < NT; k++)
                    acc[k] = dpbusd(acc[k], wv,
                                    _mm256_set1_epi32(ld32(a->q + (size_t)(t0 + k) * K + 256 * b + 32 * j + 4 * g)));
            }
            for (int k = 0; k < NT; k++) isum[k] = _mm256_add_epi32(isum[k], _mm256_mullo_epi32(acc[k], s->sc[j]));
        }
        for (int k = 0; k < NT; k++) {
            const __m256 dx = _mm256_set1_ps(a->d[(size_t)(t0 + k) * (K / 256) + b]);
            __m256i ms = _mm256_setzero_si256();
            for (int p = 0; p < 4; p++)
                ms = dpwssd(ms, s->mp[p], _mm256_set1_epi32(ld32(a->bs + (size_t)(t0 + k) * K32 + 8 * b + 2 * p)));
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k]), _mm256_mul_ps(s->d, dx), out[k]);
            out[k] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(s->dmin, dx), out[k]);
        }
    }
}

/* Q6_K: codes q (0..63, the format's offset 32 taken out afterwards) and 16 scale groups of 16
 * columns per super-block; scp[p] holds the scale pairs (2p, 2p+1) as two i16 of each row lane. */
typedef struct tile6_sb {
    __m256i w[8][8];
    __m256i sc[16];
    __m256i scp[8];
    __m256 d;
} tile6_sb;

static void tile6_build(const ds_mat *w, int32_t r0, int32_t nb, tile6_sb *t) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    for (int32_t b = 0; b < nb; b++) {
        __m256i q[8][8]; /* [row][32-column block] */
        int8_t sc[8][16];
        float d[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *row = (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes + (size_t)b * 210;
            d[r] = h2f(row + 208);
            memcpy(sc[r], row + 192, 16);
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = row + 64 * h, *qhp = row + 128 + 32 * h;
                const __m256i x0 = ld256(ql), x1 = ld256(ql + 32), hh = ld256(qhp);
                for (int i = 0; i < 4; i++) {
                    const __m256i lo4 =
                        _mm256_and_si256(i & 2 ? _mm256_srli_epi16(i & 1 ? x1 : x0, 4) : (i & 1 ? x1 : x0), m4);
                    const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(hh, 2 * i), m3);
                    q[r][4 * h + i] = _mm256_or_si256(lo4, _mm256_slli_epi16(h2, 4));
                }
            }
        }
        tile6_sb *s = &t[b];
        for (int j = 0; j < 8; j++) {
            __m256i in[8];
            for (int r = 0; r < 8; r++) in[r] = q[r][j];
            transpose8(in, s->w[j]);
        }
        for (int g = 0; g < 16; g++) {
            int32_t v[8];
            for (int r = 0; r < 8; r++) v[r] = sc[r][g];
            s->sc[g] = _mm256_loadu_si256((const __m256i *)v);
        }
        for (int p = 0; p < 8; p++) {
            int32_t v[8];
            for (int r = 0; r < 8; r++)
                v[r] = (int32_t)((uint32_t)(uint16_t)(int16_t)sc[r][2 * p] | (uint32_t)(uint16_t)(int16_t)sc[r][2 * p + 1] << 16);
            s->scp[p] = _mm256_loadu_si256((const __m256i *)v);
        }
        s->d = _mm256_loadu_ps(d);
    }
}

static inline __attribute__((always_inline)) void tile6_tokens(const tile6_sb *t, int32_t nb, const ds_q8_act *a,
                                                               int32_t K, int32_t t0, int NT, __m256 *out) {
    const int32_t K16 = K / 16;
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++) {
        const tile6_sb *s = &t[b];
        __m256i isum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
        for (int j = 0; j < 8; j++)
            for (int h = 0; h < 2; h++) { /* 16 columns: groups 4h..4h+3, scale group 2j + h */
                __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                  _mm256_setzero_si256()};
                for (int g = 4 * h; g < 4 * h + 4; g++) {
                    const __m256i wv = s->w[j][g];
                    for (int k = 0; k < NT; k++)
                        acc[k] = dpbusd(acc[k], wv,
                                        _mm256_set1_epi32(ld32(a->q + (size_t)(t0 + k) * K + 256 * b + 32 * j + 4 * g)));
                }
                for (int k = 0; k < NT; k++)
                    isum[k] = _mm256_add_epi32(isum[k], _mm256_mullo_epi32(acc[k], s->sc[2 * j + h]));
            }
        for (int k = 0; k < NT; k++) {
            __m256i off = _mm256_setzero_si256(); /* Σ_g sc_g·Σ_g x̂: the codes' offset of 32 */
            for (int p = 0; p < 8; p++)
                off = dpwssd(off, s->scp[p], _mm256_set1_epi32(ld32(a->bs16 + (size_t)(t0 + k) * K16 + 16 * b + 2 * p)));
            isum[k] = _mm256_sub_epi32(isum[k], _mm256_slli_epi32(off, 5));
            const __m256 dx = _mm256_set1_ps(a->d[(size_t)(t0 + k) * (K / 256) + b]);
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k]), _mm256_mul_ps(s->d, dx), out[k]);
        }
    }
}

/* Q4_0 / Q4_1 / Q8_0: per 32-column block, 8 interleaved 4-column groups and per row d, the offset
 * (Q4_1 m, Q4_0 −8·d) and for Q8_0 the correction 128·Σq of its unsigned activations. */
typedef struct tile32_sb {
    __m256i w[8];
    __m256 d, mo;
    __m256i corr;
} tile32_sb;

static void tile32_build(const ds_mat *w, int32_t r0, int32_t nb, tile32_sb *t) {
    const ds_dtype dt = w->dtype;
    const int32_t bb = dt == DS_DTYPE_Q4_1 ? 20 : dt == DS_DTYPE_Q8_0 ? 34 : 18;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int32_t b = 0; b < nb; b++) {
        __m256i in[8];
        float d[8], mo[8];
        int32_t corr[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *x = (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes + (size_t)b * bb;
            d[r] = h2f(x);
            if (dt == DS_DTYPE_Q8_0) {
                in[r] = ld256(x + 2);
                mo[r] = 0.0f;
                /* Σq over the block: |q| summed by maddubs against the sign, then pairs */
                const __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), in[r]);
                const __m256i s32 = _mm256_madd_epi16(s16, ones);
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
                corr[r] = 128 * _mm_cvtsi128_si32(h);
            } else {
                const bool q41 = dt == DS_DTYPE_Q4_1;
                const __m128i v = _mm_loadu_si128((const __m128i *)(x + (q41 ? 4 : 2)));
                in[r] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
                mo[r] = q41 ? h2f(x + 2) : -8.0f * d[r];
                corr[r] = 0;
            }
        }
        transpose8(in, t[b].w);
        t[b].d = _mm256_loadu_ps(d), t[b].mo = _mm256_loadu_ps(mo);
        t[b].corr = _mm256_loadu_si256((const __m256i *)corr);
    }
}

static inline __attribute__((always_inline)) void tile32_tokens(const tile32_sb *t, int32_t nb, bool q8,
                                                                const ds_q8_act *a, int32_t K, int32_t t0, int NT,
                                                                __m256 *out) {
    const int32_t K32 = K / 32;
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++) {
        const tile32_sb *s = &t[b];
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        for (int g = 0; g < 8; g++)
            for (int k = 0; k < NT; k++) {
                const size_t o = (size_t)(t0 + k) * K + 32 * (size_t)b + 4 * g;
                acc[k] = q8 ? dpbusd(acc[k], _mm256_set1_epi32(ld32(a->qu + o)), s->w[g]) /* (q̂+128)·q */
                            : dpbusd(acc[k], s->w[g], _mm256_set1_epi32(ld32(a->q + o)));
            }
        for (int k = 0; k < NT; k++) {
            const int32_t t = t0 + k;
            const __m256i v = q8 ? _mm256_sub_epi32(acc[k], s->corr) : acc[k];
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(s->d, _mm256_set1_ps(a->d[(size_t)t * K32 + b])),
                                     out[k]);
            if (!q8) /* the block's d·Σq̂ sits in the 8-token-grouped sums */
                out[k] = _mm256_fmadd_ps(s->mo, _mm256_set1_ps(a->s8[((size_t)(t / 8) * K32 + b) * 8 + t % 8]), out[k]);
        }
    }
}

/* NT tokens against the tile of the row's format. */
static inline __attribute__((always_inline)) void tile_run(ds_dtype dt, const void *t, int32_t nb, const ds_q8_act *a,
                                                           int32_t K, int32_t t0, int NT, __m256 *out) {
    if (dt == DS_DTYPE_Q6_K) tile6_tokens(t, nb, a, K, t0, NT, out);
    else if (dt == DS_DTYPE_Q4_K || dt == DS_DTYPE_Q5_K) tile_tokens(t, nb, a, K, t0, NT, out);
    else tile32_tokens(t, nb, dt == DS_DTYPE_Q8_0, a, K, t0, NT, out);
}

static void tile8(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y, const float *bias,
                  bool acc) {
    const ds_dtype dt = w->dtype;
    const bool kq = ds_dtype_block(dt) == 256;
    const int32_t K = w->cols, nb = K / (kq ? 256 : 32), M = w->rows;
    const size_t per = dt == DS_DTYPE_Q6_K ? sizeof(tile6_sb) : kq ? sizeof(tile_sb) : sizeof(tile32_sb);
    void *t = NULL;
    if (posix_memalign(&t, 64, per * (size_t)nb)) { /* no memory: the gemv path, 8 tokens at a time */
        for (int32_t t0 = 0; t0 < n; t0 += DS_QK_GEMV_MAX) {
            const ds_q8_act sub = ds_q8_act_from(a, t0, K);
            gemv(w, r0, r1, &sub, n - t0 < DS_QK_GEMV_MAX ? n - t0 : DS_QK_GEMV_MAX, y + (size_t)t0 * M, bias, acc);
        }
        return;
    }
    for (int32_t r = r0; r < r1; r += 8) {
        if (dt == DS_DTYPE_Q6_K) tile6_build(w, r, nb, t);
        else if (kq) tile_build(w, r, nb, t);
        else tile32_build(w, r, nb, t);
        const __m256 bv = bias ? _mm256_loadu_ps(bias + r) : _mm256_setzero_ps();
        for (int32_t t0 = 0; t0 < n; t0 += 4) {
            __m256 out[4];
            const int nt = n - t0 < 4 ? n - t0 : 4;
            if (nt == 4) tile_run(dt, t, nb, a, K, t0, 4, out);
            else
                for (int k = 0; k < nt; k++) tile_run(dt, t, nb, a, K, t0 + k, 1, out + k);
            for (int k = 0; k < nt; k++) {
                float *yr = y + (size_t)(t0 + k) * M + r;
                __m256 v = _mm256_add_ps(out[k], bv);
                if (acc) v = _mm256_add_ps(v, _mm256_loadu_ps(yr));
                _mm256_storeu_ps(yr, v);
            }
        }
    }
    free(t);
}

/* ---- packed Q4_K (ds_q4k_x8, built at upload: ds_q8_pack) ---- */

/* Each 8-row group is one contiguous stream; the hardware prefetcher alone keeps too few lines in
 * flight for it (bench_qmatmul on a 302 MB Q4_K matrix, one thread: 43 ms → 29 ms with this), so
 * every block asks for the lines PK_PF bytes ahead (2048..8192 measured alike). */
#ifndef PK_PF
#define PK_PF 4096
#endif
#define PK_PREFETCH(s)                                                                                               \
    for (size_t o_ = 0; o_ < sizeof *(s); o_ += 64) __builtin_prefetch((const char *)(s) + PK_PF + o_)

/* NT tokens (from t0) against one packed 8-row group: out[k] = the 8 rows' dot products. */
static inline __attribute__((always_inline)) void pk4_tokens(const ds_q4k_x8 *s, int32_t nb, const ds_q8_act *a,
                                                             int32_t K, int32_t t0, int NT, __m256 *out) {
    const int32_t K32 = K / 32;
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++, s++) {
        PK_PREFETCH(s);
        __m256i isum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
        for (int j = 0; j < 8; j++) {
            __m256i al[4], ah[4];
            for (int k = 0; k < NT; k++) al[k] = _mm256_setzero_si256(), ah[k] = _mm256_setzero_si256();
            for (int v = 0; v < 4; v++) {
                const __m256i P = ld256(s->q[j][v]);
                const __m256i lo = _mm256_and_si256(P, m4), hi = _mm256_and_si256(_mm256_srli_epi16(P, 4), m4);
                for (int k = 0; k < NT; k++) {
                    const int8_t *xq = a->q + (size_t)(t0 + k) * K + 256 * b + 32 * j + 4 * v;
                    al[k] = dpbusd(al[k], lo, _mm256_set1_epi32(ld32(xq)));
                    ah[k] = dpbusd(ah[k], hi, _mm256_set1_epi32(ld32(xq + 16)));
                }
            }
            const __m256i sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s->sc[j]));
            for (int k = 0; k < NT; k++)
                isum[k] = _mm256_add_epi32(isum[k], _mm256_mullo_epi32(_mm256_add_epi32(al[k], ah[k]), sc));
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s->dmin));
        __m256i mp[4];
        for (int p = 0; p < 4; p++) mp[p] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)s->mn[p]));
        for (int k = 0; k < NT; k++) {
            const __m256 dx = _mm256_set1_ps(a->d[(size_t)(t0 + k) * (K / 256) + b]);
            __m256i ms = _mm256_setzero_si256();
            for (int p = 0; p < 4; p++)
                ms = dpwssd(ms, mp[p], _mm256_set1_epi32(ld32(a->bs + (size_t)(t0 + k) * K32 + 8 * b + 2 * p)));
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k]), _mm256_mul_ps(d, dx), out[k]);
            out[k] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(dmin, dx), out[k]);
        }
    }
}

/* The same for a packed Q4_0 / Q4_1 group (ds_q4_x8): d·dx·Σq·x̂ + m·(dx·Σx̂) per block. */
static inline __attribute__((always_inline)) void pk32_tokens(const ds_q4_x8 *s, int32_t nb, const ds_q8_act *a,
                                                              int32_t K, int32_t t0, int NT, __m256 *out) {
    const int32_t K32 = K / 32;
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++, s++) {
        PK_PREFETCH(s);
        __m256i acc[4];
        for (int k = 0; k < NT; k++) acc[k] = _mm256_setzero_si256();
        for (int v = 0; v < 4; v++) {
            const __m256i P = ld256(s->q[v]);
            const __m256i lo = _mm256_and_si256(P, m4), hi = _mm256_and_si256(_mm256_srli_epi16(P, 4), m4);
            for (int k = 0; k < NT; k++) {
                const int8_t *xq = a->q + (size_t)(t0 + k) * K + 32 * b + 4 * v;
                acc[k] = dpbusd(acc[k], lo, _mm256_set1_epi32(ld32(xq)));
                acc[k] = dpbusd(acc[k], hi, _mm256_set1_epi32(ld32(xq + 16)));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s->d));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s->m));
        for (int k = 0; k < NT; k++) {
            const int32_t t = t0 + k;
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[k]), _mm256_mul_ps(d, _mm256_set1_ps(a->d[(size_t)t * K32 + b])),
                                     out[k]);
            out[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(a->s8[((size_t)(t / 8) * K32 + b) * 8 + t % 8]), out[k]);
        }
    }
}

/* The same for a packed Q6_K group (ds_q6k_x8): Σ_g sc_g·Σ (q − 32)·x̂ per 16 columns. */
static inline __attribute__((always_inline)) void pk6_tokens(const ds_q6k_x8 *s, const uint16_t *dd, int32_t nb,
                                                             const ds_q8_act *a, int32_t K, int32_t t0, int NT,
                                                             __m256 *out) {
    const int32_t K16 = K / 16;
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++, s++, dd += 8) {
        PK_PREFETCH(s);
        __m256i isum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
        __m256i off[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        for (int j = 0; j < 8; j++) {
            __m256i al[4], ah[4];
            for (int k = 0; k < NT; k++) al[k] = _mm256_setzero_si256(), ah[k] = _mm256_setzero_si256();
            const __typeof__(s->p[0]) *S = &s->p[j / 2];
            const __m256i H0 = ld256(S->qh[j % 2][0]), H1 = ld256(S->qh[j % 2][1]);
            for (int v = 0; v < 4; v++) {
                const __m256i P = ld256(S->ql[j % 2][v]);
                /* bits 2v..2v+1 of each byte moved to bits 4..5 (a 16-bit shift; the mask keeps the byte's own) */
                const __m256i h0 = v == 0 ? _mm256_slli_epi16(H0, 4) : v == 1 ? _mm256_slli_epi16(H0, 2)
                                 : v == 2 ? H0 : _mm256_srli_epi16(H0, 2);
                const __m256i h1 = v == 0 ? _mm256_slli_epi16(H1, 4) : v == 1 ? _mm256_slli_epi16(H1, 2)
                                 : v == 2 ? H1 : _mm256_srli_epi16(H1, 2);
                const __m256i lo = _mm256_or_si256(_mm256_and_si256(P, m4), _mm256_and_si256(h0, m30));
                const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(P, 4), m4), _mm256_and_si256(h1, m30));
                for (int k = 0; k < NT; k++) {
                    const int8_t *xq = a->q + (size_t)(t0 + k) * K + 256 * b + 32 * j + 4 * v;
                    al[k] = dpbusd(al[k], lo, _mm256_set1_epi32(ld32(xq)));
                    ah[k] = dpbusd(ah[k], hi, _mm256_set1_epi32(ld32(xq + 16)));
                }
            }
            /* lane r: (sc[2j], sc[2j+1]) of row r as two i16 */
            const __m256i sp = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)S->scp[j % 2]));
            const __m256i slo = _mm256_srai_epi32(_mm256_slli_epi32(sp, 16), 16), shi = _mm256_srai_epi32(sp, 16);
            for (int k = 0; k < NT; k++) {
                isum[k] = _mm256_add_epi32(isum[k], _mm256_add_epi32(_mm256_mullo_epi32(al[k], slo),
                                                                     _mm256_mullo_epi32(ah[k], shi)));
                off[k] = dpwssd(off[k], sp, _mm256_set1_epi32(ld32(a->bs16 + (size_t)(t0 + k) * K16 + 16 * b + 2 * j)));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dd));
        for (int k = 0; k < NT; k++) {
            const __m256i v = _mm256_sub_epi32(isum[k], _mm256_slli_epi32(off[k], 5));
            const __m256 dx = _mm256_set1_ps(a->d[(size_t)(t0 + k) * (K / 256) + b]);
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(d, dx), out[k]);
        }
    }
}

/* The same for a packed Q8_0 group (ds_q8_x8; VNNI only): (q + 128)·x̂ − 128·Σx̂ per block. */
static inline __attribute__((always_inline)) void pk8_tokens(const ds_q8_x8 *s, int32_t nb, const ds_q8_act *a,
                                                             int32_t K, int32_t t0, int NT, __m256 *out) {
    const int32_t K32 = K / 32;
    for (int k = 0; k < NT; k++) out[k] = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++, s++) {
        PK_PREFETCH(s);
        __m256i acc[4]; /* starting from −128·Σx̂ */
        for (int k = 0; k < NT; k++) acc[k] = _mm256_set1_epi32(-128 * (int32_t)a->bs[(size_t)(t0 + k) * K32 + b]);
        for (int g = 0; g < 8; g++) {
            const __m256i W = ld256(s->q[g]);
            for (int k = 0; k < NT; k++)
                acc[k] = dpbusd(acc[k], W, _mm256_set1_epi32(ld32(a->q + (size_t)(t0 + k) * K + 32 * b + 4 * g)));
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s->d));
        for (int k = 0; k < NT; k++)
            out[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[k]),
                                     _mm256_mul_ps(d, _mm256_set1_ps(a->d[(size_t)(t0 + k) * K32 + b])), out[k]);
    }
}

/* kind: 0 Q4_0/Q4_1, 1 Q4_K, 2 Q6_K, 3 Q8_0 */
static inline __attribute__((always_inline)) void pk_run(int kind, const void *s, const uint16_t *d6, int32_t nb,
                                                         const ds_q8_act *a, int32_t K, int32_t t0, int NT,
                                                         __m256 *out) {
    if (kind == 1) pk4_tokens(s, nb, a, K, t0, NT, out);
    else if (kind == 2) pk6_tokens(s, d6, nb, a, K, t0, NT, out);
    else if (kind == 3) pk8_tokens(s, nb, a, K, t0, NT, out);
    else pk32_tokens(s, nb, a, K, t0, NT, out);
}

static void packed(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y, const float *bias,
                   bool acc) {
    const ds_dtype dt = w->dtype;
    const int kq = dt == DS_DTYPE_Q4_K ? 1 : dt == DS_DTYPE_Q6_K ? 2 : dt == DS_DTYPE_Q8_0 ? 3 : 0;
    const int32_t K = w->cols, nb = K / (kq == 1 || kq == 2 ? 256 : 32), M = w->rows;
    const size_t per = kq == 1   ? sizeof(ds_q4k_x8)
                       : kq == 2 ? sizeof(ds_q6k_x8)
                       : kq == 3 ? sizeof(ds_q8_x8)
                                 : sizeof(ds_q4_x8);
    for (int32_t r = r0; r < r1; r += 8) {
        const void *s = (const uint8_t *)w->aux + per * (size_t)(r / 8) * nb;
        /* Q6_K: the rows' d follow the structs of all M / 8 groups (ds_q6k_x8) */
        const uint16_t *d6 = kq == 2 ? (const uint16_t *)((const uint8_t *)w->aux + per * (size_t)(M / 8) * nb) +
                                           (size_t)(r / 8) * nb * 8
                                     : NULL;
        const __m256 bv = bias ? _mm256_loadu_ps(bias + r) : _mm256_setzero_ps();
        for (int32_t t0 = 0; t0 < n; t0 += 4) {
            __m256 out[4];
            const int nt = n - t0 < 4 ? n - t0 : 4;
            if (nt == 4) pk_run(kq, s, d6, nb, a, K, t0, 4, out);
            else if (nt == 2) pk_run(kq, s, d6, nb, a, K, t0, 2, out);
            else
                for (int k = 0; k < nt; k++) pk_run(kq, s, d6, nb, a, K, t0 + k, 1, out + k);
            for (int k = 0; k < nt; k++) {
                float *yr = y + (size_t)(t0 + k) * M + r;
                __m256 v = _mm256_add_ps(out[k], bv);
                if (acc) v = _mm256_add_ps(v, _mm256_loadu_ps(yr));
                _mm256_storeu_ps(yr, v);
            }
        }
    }
}

#ifdef QK8_VNNI
const ds_q8_ops QK8_NAME = {.gemv = gemv, .tile8 = tile8, .packed = packed, .tile_q8_0 = true};
#else
const ds_q8_ops QK8_NAME = {.gemv = gemv, .tile8 = tile8, .packed = packed, .tile_q8_0 = false};
#endif
