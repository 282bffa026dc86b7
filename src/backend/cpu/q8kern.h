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
            for (int c = 0; c < 4; c++) { /* 64 columns: sub-blocks 2c (low nibbles) and 2c+1 */
                const __m256i v = ld256(qs + 32 * c);
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (q5) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
                }
                const __m256i s0 = _mm256_shuffle_epi8(scl, _mm256_set1_epi16((short)((4 * c + 1) << 8 | 4 * c)));
                const __m256i s1 = _mm256_shuffle_epi8(scl, _mm256_set1_epi16((short)((4 * c + 3) << 8 | (4 * c + 2))));
                for (int32_t t = 0; t < n; t++) {
                    const int8_t *xq = a->q + (size_t)t * K + 256 * b + 64 * c;
                    ai[t] = dot_us_sc(ai[t], lo, ld256(xq), s0);
                    ai[t] = dot_us_sc(ai[t], hi, ld256(xq + 32), s1);
                }
            }
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
                    for (int32_t t = 0; t < n; t++) {
                        const int8_t *xq = a->q + (size_t)t * K + 256 * b + 128 * h + 32 * i;
                        ai[t] = dot_us_sc(ai[t], ug, _mm256_sign_epi8(ld256(xq), g), sc);
                    }
                }
            }
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

const ds_q8_ops QK8_NAME = {.gemv = gemv};
