/* Decode-sized exact matmul (n ≤ DS_QK_GEMV_MAX tokens) straight from the weight blocks — part of
 * the qkern.h template (included by it: vf, i32v, u8v, QK_VW, f16v come from there).
 *
 * Each 32-element chunk of a row is expanded in registers to the fp32 values ggml's dequantisation
 * gives (q·d + m as one fused multiply-add, which rounds (q − 8)·d, (q − 32)·s, d1·q − m1 exactly
 * as the formats' reference code does) and multiplied with the fp32 activations of every token,
 * accumulating in fp32: results are the fp32-dequantised model's up to summation order, with no
 * integer quantisation of activations and no per-matmul sums of x.
 *
 * Speed comes from keeping everything in registers with the shape as compile-time constants: a
 * function per (rows R, tokens N) holds R×N(×AV) accumulators; R rows at once let each activation
 * load serve R rows, and AV independent sums per (row, token) keep the FMA latency hidden where
 * R×N alone is small. Codes are widened bytes→int32 lanes with one vpmovzxbd/vpmovsxbd (GCC's own
 * lowering of narrow byte vectors scalarises on AVX2), bit-fiddled in int32 lanes and converted
 * with one vcvtdq2ps. */
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#if !defined(__AVX2__) && defined(__SSE2__) && QK_VW == 8
/* Baseline x86-64: 8 words → two halves of int32 lanes with SSE2 unpacks (GCC scalarises the
 * generic byte-vector conversion). */
static inline i32v join4(__m128i lo, __m128i hi) {
    i32v r;
    memcpy(&r, &lo, 16);
    memcpy((char *)&r + 16, &hi, 16);
    return r;
}
#endif

/* QK_VW bytes → int32 lanes, zero- / sign-extended. */
static inline i32v zx(const uint8_t *p) {
#if defined(__AVX512F__) && QK_VW == 16
    return (i32v)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__) && QK_VW == 8
    return (i32v)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#elif defined(__SSE2__) && QK_VW == 8
    const __m128i z = _mm_setzero_si128(), w = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)p), z);
    return join4(_mm_unpacklo_epi16(w, z), _mm_unpackhi_epi16(w, z));
#else
    return __builtin_convertvector(ld8(p), i32v);
#endif
}

static inline i32v sx(const uint8_t *p) {
#if defined(__AVX512F__) && QK_VW == 16
    return (i32v)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__) && QK_VW == 8
    return (i32v)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#elif defined(__SSE2__) && QK_VW == 8
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), w = _mm_unpacklo_epi8(b, b); /* byte b → b·257 */
    return join4(_mm_srai_epi32(_mm_unpacklo_epi16(w, w), 24), _mm_srai_epi32(_mm_unpackhi_epi16(w, w), 24));
#else
    i8v b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, i32v);
#endif
}

static inline vf cvt(i32v v) { return __builtin_convertvector(v, vf); }

/* QK_VW f16 / bf16 values → fp32 lanes. */
static inline vf ld_f16(const uint8_t *p) {
#if defined(__AVX512F__) && QK_VW == 16
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && QK_VW == 8
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vf v;
    for (int i = 0; i < QK_VW; i++) v[i] = f16v(p + 2 * i);
    return v;
#endif
}

static inline vf ld_bf16(const uint8_t *p) {
#if defined(__AVX512F__) && QK_VW == 16
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__) && QK_VW == 8
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    i32v v;
    for (int i = 0; i < QK_VW; i++) v[i] = (int32_t)((uint32_t)(p[2 * i] | p[2 * i + 1] << 8) << 16);
    return (vf)v;
#endif
}

/* Elements and bytes of one block as this kernel walks it (the 16/32-bit types: 32 elements). */
static inline int32_t qg_blk(ds_dtype t) {
    return t == DS_DTYPE_Q4_K || t == DS_DTYPE_Q5_K || t == DS_DTYPE_Q6_K ? 256 : 32;
}
static inline size_t qg_blk_bytes(ds_dtype t) {
    switch (t) {
    case DS_DTYPE_F32: return 128;
    case DS_DTYPE_F16:
    case DS_DTYPE_BF16: return 64;
    case DS_DTYPE_Q4_0: return 18; /* constants, not ds_dtype_block_bytes(): the kernels need them inline */
    case DS_DTYPE_Q4_1: return 20;
    case DS_DTYPE_Q5_0: return 22;
    case DS_DTYPE_Q5_1: return 24;
    case DS_DTYPE_Q8_0: return 34;
    case DS_DTYPE_Q4_K: return 144;
    case DS_DTYPE_Q5_K: return 176;
    case DS_DTYPE_Q6_K: return 210;
    default: return 0;
    }
}

/* o[i] = d · byte i of p, i < 8: the K-quants' 6-bit scales and mins (a negative d gives the minus
 * of the mins); qg_scale8_s: the same for signed bytes in memory (Q6_K's scales). */
static inline void qg_scale8_q(uint64_t p, float d, float *o) {
#if defined(__AVX2__)
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)p))),
                                      _mm256_set1_ps(d)));
#else
    for (int i = 0; i < 8; i++) o[i] = d * (float)(uint8_t)(p >> 8 * i);
#endif
}
static inline void qg_scale8_s(const int8_t *p, float d, float *o) {
#if defined(__AVX2__)
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
                                      _mm256_set1_ps(d)));
#else
    for (int i = 0; i < 8; i++) o[i] = d * p[i];
#endif
}

/* A block's scales: chunk j of 32 elements is q·s[j] + m[j] (Q6_K: halves j·2, j·2+1 of 16). */
typedef struct {
    float s[16], m[16];
#if defined(__AVX512F__) && QK_VW == 16
    uint8_t y[256]; /* Q6_K: the block's 6-bit codes, a byte each, in element order (qg_prep) */
#endif
} qg_sc;

static inline __attribute__((always_inline)) void qg_prep(ds_dtype t, const uint8_t *b, qg_sc *c) {
    switch (t) {
    case DS_DTYPE_Q4_0: c->s[0] = f16v(b), c->m[0] = -8.0f * c->s[0]; return;
    case DS_DTYPE_Q5_0: c->s[0] = f16v(b), c->m[0] = -16.0f * c->s[0]; return;
    case DS_DTYPE_Q4_1:
    case DS_DTYPE_Q5_1: c->s[0] = f16v(b), c->m[0] = f16v(b + 2); return;
    case DS_DTYPE_Q8_0: c->s[0] = f16v(b); return;
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q5_K: {
        /* the 12 bytes of 6-bit scales and mins → 8 + 8 bytes (llama.cpp's unpacking of
         * get_scale_min_k4 with 32-bit masks), then 8 lanes each */
        uint64_t q;
        uint32_t h;
        memcpy(&q, b + 4, 8);
        memcpy(&h, b + 12, 4);
        const uint32_t q03 = (uint32_t)q, q47 = (uint32_t)(q >> 32);
        const uint64_t sc = (q03 & 0x3f3f3f3f) | (uint64_t)((h & 0x0f0f0f0f) | ((q03 >> 2) & 0x30303030)) << 32;
        const uint64_t mn = (q47 & 0x3f3f3f3f) | (uint64_t)(((h >> 4) & 0x0f0f0f0f) | ((q47 >> 2) & 0x30303030)) << 32;
        qg_scale8_q(sc, f16v(b), c->s);
        qg_scale8_q(mn, -f16v(b + 2), c->m);
        return;
    }
    case DS_DTYPE_Q6_K: { /* chunk j = 4·half + jj, elements 16g..: ggml's scale 8·half + 2·jj + g = 2j + g */
        const float d = f16v(b + 208);
        qg_scale8_s((const int8_t *)b + 192, d, c->s);
        qg_scale8_s((const int8_t *)b + 200, d, c->s + 8);
        for (int i = 0; i < 16; i++) c->m[i] = -32.0f * c->s[i];
#if defined(__AVX512F__) && QK_VW == 16
        /* the codes assembled 64 at a time in bytes (ggml's q1..q4 of each 128-element half: low
         * nibbles of ql[0..63] with qh bits 0-1 / 2-3, high nibbles with bits 4-5 / 6-7), so that
         * qg_deq widens each 16 with one load: a third of the per-weight work of doing it in int32
         * lanes (bench_qmatmul --dtype q6_k) */
        const __m512i m0f = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
        const __m512i sl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
        const __m512i sr = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512(b + 64 * h);
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
            /* (a & b) | c: imm 0xEA */
            _mm512_storeu_si512(c->y + 128 * h,
                                _mm512_ternarylogic_epi32(ql, m0f, _mm512_and_si512(_mm512_sllv_epi16(qh, sl), m30), 0xEA));
            _mm512_storeu_si512(c->y + 128 * h + 64,
                                _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), m0f,
                                                          _mm512_and_si512(_mm512_srlv_epi16(qh, sr), m30), 0xEA));
        }
#endif
        return;
    }
    default: return;
    }
}

/* The first 4 bytes (f16 d, and m for Q4_1 / Q5_1) of 8 consecutive 32-element blocks at g, fetched
 * one group ahead of their use (qg_body): a gather's latency would otherwise stall the group. */
#if defined(__AVX2__)
typedef __m256i qg_raw;
static inline __attribute__((always_inline)) qg_raw qg_raw8(ds_dtype t, const uint8_t *g) {
    const int bb = (int)qg_blk_bytes(t);
    return _mm256_i32gather_epi32((const int *)g, _mm256_setr_epi32(0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb), 1);
}
#else
typedef struct {
    uint32_t v[8];
} qg_raw;
static inline __attribute__((always_inline)) qg_raw qg_raw8(ds_dtype t, const uint8_t *g) {
    qg_raw r;
    for (int i = 0; i < 8; i++) memcpy(&r.v[i], g + i * qg_blk_bytes(t), 4);
    return r;
}
#endif

/* qg_raw8's bytes → the 8 blocks' scales c->s[0..8) and mins c->m[0..8). */
static inline __attribute__((always_inline)) void qg_prep8(ds_dtype t, qg_raw v, qg_sc *c) {
    if (t == DS_DTYPE_F32 || t == DS_DTYPE_F16 || t == DS_DTYPE_BF16) return;
#if defined(__AVX2__)
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0xffff)), hi = _mm256_srli_epi32(v, 16);
    const __m256 d = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)));
    _mm256_storeu_ps(c->s, d);
    if (t == DS_DTYPE_Q4_1 || t == DS_DTYPE_Q5_1)
        _mm256_storeu_ps(c->m, _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1))));
    else if (t != DS_DTYPE_Q8_0)
        _mm256_storeu_ps(c->m, _mm256_mul_ps(d, _mm256_set1_ps(t == DS_DTYPE_Q4_0 ? -8.0f : -16.0f)));
#else
    for (int i = 0; i < 8; i++) {
        qg_sc one = {{0}, {0}};
        qg_prep(t, (const uint8_t *)&v.v[i], &one);
        c->s[i] = one.s[0], c->m[i] = one.m[0];
    }
#endif
}

#ifndef QG_PF
#define QG_PF 2048
#endif
#ifndef QG_R1_BYTES
#define QG_R1_BYTES ((size_t)1 << 20) /* weights from here on stream from DRAM (gemv_fused, one token) */
#endif
#ifndef QG_GROUP8
#define QG_GROUP8 1
#endif
#define QMAXV (32 / QK_VW) /* vectors in a 32-element chunk */

/* AVX-512: 4- and 5-bit codes index a table of the 16 (32) values a chunk's scale and min give —
 * one vpermps per 16 weights instead of a mask, a conversion and an FMA (5-bit codes: a second,
 * masked by the fifth bits, from the upper table); vpermps reads only the index's low 4 bits, so a
 * zero-extended byte indexes by its low nibble as it is. Each entry is i·s + m in one FMA, the value the reference dequantisation gives. */
#if defined(__AVX512F__) && QK_VW == 16
#define QG_TABLE 1
static inline __m512 qg_table(float s, float m, float base) { /* entries (base + i)·s + m */
    const __m512 io = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_fmadd_ps(_mm512_add_ps(io, _mm512_set1_ps(base)), _mm512_set1_ps(s), _mm512_set1_ps(m));
}
#else
#define QG_TABLE 0
#endif

/* Chunk j of block b → 32 fp32 weights in w[QMAXV] (row order); the 32-element formats take their
 * scale and min from c->s[ci], c->m[ci], the K-quants from chunk j's. */
static inline __attribute__((always_inline)) void qg_deq(ds_dtype t, const uint8_t *b, int j, int ci, const qg_sc *c,
                                                          vf *w) {
    const int H = QMAXV / 2; /* vectors in 16 elements */
    switch (t) {
    case DS_DTYPE_F32:
        for (int v = 0; v < QMAXV; v++) w[v] = vload((const float *)b + v * QK_VW);
        return;
    case DS_DTYPE_F16:
        for (int v = 0; v < QMAXV; v++) w[v] = ld_f16(b + 2 * v * QK_VW);
        return;
    case DS_DTYPE_BF16:
        for (int v = 0; v < QMAXV; v++) w[v] = ld_bf16(b + 2 * v * QK_VW);
        return;
    case DS_DTYPE_Q4_0:
    case DS_DTYPE_Q4_1: { /* elements 0..15: low nibbles of qs[0..15]; 16..31: high nibbles */
        const uint8_t *qs = b + (t == DS_DTYPE_Q4_1 ? 4 : 2);
#if QG_TABLE
        const __m512 T = qg_table(c->s[ci], c->m[ci], 0.0f);
        const __m512i z = (__m512i)zx(qs);
        w[0] = (vf)_mm512_permutexvar_ps(z, T);
        w[1] = (vf)_mm512_permutexvar_ps(_mm512_srli_epi32(z, 4), T);
#else
        for (int v = 0; v < H; v++) {
            const i32v z = zx(qs + v * QK_VW);
            w[v] = cvt(z & 15) * c->s[ci] + c->m[ci];
            w[v + H] = cvt(z >> 4) * c->s[ci] + c->m[ci];
        }
#endif
        return;
    }
    case DS_DTYPE_Q5_0:
    case DS_DTYPE_Q5_1: { /* bit j of qh: fifth bit of element j */
        const bool q51 = t == DS_DTYPE_Q5_1;
        uint32_t qh;
        memcpy(&qh, b + (q51 ? 4 : 2), 4);
        const uint8_t *qs = b + (q51 ? 8 : 6);
#if QG_TABLE
        const __m512 T0 = qg_table(c->s[ci], c->m[ci], 0.0f), T1 = qg_table(c->s[ci], c->m[ci], 16.0f);
        const __m512i z = (__m512i)zx(qs), z4 = _mm512_srli_epi32(z, 4);
        w[0] = (vf)_mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(z, T0), (__mmask16)qh, z, T1);
        w[1] = (vf)_mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(z4, T0), (__mmask16)(qh >> 16), z4, T1);
#else
        i32v io;
        for (int i = 0; i < QK_VW; i++) io[i] = i;
        const i32v hv = (i32v){0} + (int32_t)qh;
        for (int v = 0; v < H; v++) {
            const i32v z = zx(qs + v * QK_VW), sh = io + v * QK_VW;
            const i32v lo = (z & 15) | (((hv >> sh) & 1) << 4);
            const i32v hi = (z >> 4) | (((hv >> (sh + 16)) & 1) << 4);
            w[v] = cvt(lo) * c->s[ci] + c->m[ci];
            w[v + H] = cvt(hi) * c->s[ci] + c->m[ci];
        }
#endif
        return;
    }
    case DS_DTYPE_Q8_0:
        for (int v = 0; v < QMAXV; v++) w[v] = cvt(sx(b + 2 + v * QK_VW)); /* unscaled: qg_group scales the sums */
        return;
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q5_K: { /* chunk j: nibble j%2 of qs[32·(j/2) ..]; Q5_K: bit j of qh[0..31] */
        const bool q5 = t == DS_DTYPE_Q5_K;
        const uint8_t *qs = b + (q5 ? 48 : 16) + 32 * (j / 2);
        const int sh = 4 * (j % 2);
#if QG_TABLE
        const __m512 T0 = qg_table(c->s[j], c->m[j], 0.0f);
        __mmask32 hb = 0;
        __m512 T1 = T0;
        if (q5) {
            T1 = qg_table(c->s[j], c->m[j], 16.0f);
            hb = _mm256_test_epi8_mask(_mm256_loadu_si256((const __m256i *)(b + 16)), _mm256_set1_epi8((char)(1 << j)));
        }
        for (int v = 0; v < 2; v++) {
            __m512i z = (__m512i)zx(qs + 16 * v);
            if (sh) z = _mm512_srli_epi32(z, 4);
            w[v] = (vf)_mm512_permutexvar_ps(z, T0);
            if (q5) w[v] = (vf)_mm512_mask_permutexvar_ps((__m512)w[v], (__mmask16)(hb >> (16 * v)), z, T1);
        }
#else
        for (int v = 0; v < QMAXV; v++) {
            i32v q = (zx(qs + v * QK_VW) >> sh) & 15;
            if (q5) q |= ((zx(b + 16 + v * QK_VW) >> j) & 1) << 4;
            w[v] = cvt(q) * c->s[j] + c->m[j];
        }
#endif
        return;
    }
    case DS_DTYPE_Q6_K: { /* chunk j = 4·half + jj: ql nibble jj/2 of ql[64·half + 32·(jj%2)], qh bits 2·jj */
#if QG_TABLE
        for (int v = 0; v < QMAXV; v++) w[v] = cvt(zx(c->y + 32 * j + 16 * v)) * c->s[2 * j + v] + c->m[2 * j + v];
        return;
#endif
        const int half = j / 4, jj = j % 4;
        const uint8_t *ql = b + 64 * half + 32 * (jj % 2), *qh = b + 128 + 32 * half;
        for (int v = 0; v < QMAXV; v++) {
            const i32v q = ((zx(ql + v * QK_VW) >> (4 * (jj / 2))) & 15) | (((zx(qh + v * QK_VW) >> (2 * jj)) & 3) << 4);
            const int g = 2 * j + v / H;
            w[v] = cvt(q) * c->s[g] + c->m[g];
        }
        return;
    }
    default: return;
    }
}

/* nc chunks from block pointer g of row 0 (rows rs bytes apart): a group of 8 single-chunk blocks
 * whose scales qg_prep8 converts together (multi), or one block (a K-quant's 8 chunks, or the last
 * few 32-element blocks of a row). */
static inline __attribute__((always_inline)) void qg_group(ds_dtype t, const int R, const int N, const int AV, vf *a,
                                                            const uint8_t *g, size_t rs, const float *xb, int32_t K,
                                                            bool multi, const qg_raw *raw, const int nc) {
    const size_t bb = qg_blk_bytes(t);
    qg_sc c[4];
    /* weights streamed from DRAM (the big matrices: lm_head, 1B-class layers): ask for the lines
     * QG_PF bytes ahead, so each row's stream has several misses in flight */
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        for (size_t o = 0; o < (size_t)nc * (multi ? bb : bb / (qg_blk(t) / 32)) ; o += 64)
            __builtin_prefetch(g + i * rs + QG_PF + o);
#pragma GCC unroll 4
    for (int i = 0; i < R; i++) {
        if (multi) qg_prep8(t, raw[i], &c[i]);
        else qg_prep(t, g + i * rs, &c[i]);
    }
    /* the scales stay in memory: each chunk broadcasts its own with a load, where GCC would
     * otherwise keep them in vector lanes and extract each with two or three shuffles */
    __asm__ volatile("" : : "r"(c) : "memory");
#pragma GCC unroll 8
    for (int j = 0; j < nc; j++) {
        vf q[4][QMAXV];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            if (multi) qg_deq(t, g + i * rs + j * bb, 0, j, &c[i], q[i]);
            else qg_deq(t, g + i * rs, j, 0, &c[i], q[i]);
        }
        if (t == DS_DTYPE_Q8_0) { /* no min: Σ d·q·x = d·Σ q·x, one scaling per chunk (d·(q·x) order) */
#pragma GCC unroll 8
            for (int tt = 0; tt < N; tt++) {
                vf p[4];
#pragma GCC unroll 4
                for (int v = 0; v < QMAXV; v++) {
                    const vf xv = vload(xb + (size_t)tt * K + 32 * j + v * QK_VW);
#pragma GCC unroll 4
                    for (int i = 0; i < R; i++) p[i] = v ? p[i] + q[i][v] * xv : q[i][v] * xv;
                }
#pragma GCC unroll 4
                for (int i = 0; i < R; i++) a[(i * N + tt) * AV + j % AV] += p[i] * c[i].s[multi ? j : 0];
            }
            continue;
        }
#pragma GCC unroll 8
        for (int tt = 0; tt < N; tt++)
#pragma GCC unroll 4
            for (int v = 0; v < QMAXV; v++) {
                const vf xv = vload(xb + (size_t)tt * K + 32 * j + v * QK_VW);
#pragma GCC unroll 4
                for (int i = 0; i < R; i++) a[(i * N + tt) * AV + v % AV] += q[i][v] * xv;
            }
    }
}

/* Accumulates W[r .. r+R) · x[t] for t < N into a[R][N][AV]. */
static inline __attribute__((always_inline)) void qg_body(ds_dtype t, const int R, const int N, const int AV, vf *a,
                                                           const ds_mat *w, int32_t r, const float *x) {
    const int32_t K = w->cols, B = qg_blk(t), nb = K / B, gb = QG_GROUP8 && B == 32 ? 8 : 1;
    const size_t bb = qg_blk_bytes(t), rs = w->row_bytes;
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rs;
#pragma GCC unroll 64
    for (int i = 0; i < R * N * AV; i++) a[i] = (vf){0};
    int32_t ib = 0;
    if (gb > 1 && nb >= gb) {
        qg_raw raw[4], nxt[4];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) raw[i] = qg_raw8(t, row + i * rs);
        for (; ib + gb <= nb; ib += gb) {
            const int32_t in = ib + 2 * gb <= nb ? ib + gb : ib; /* the next group's (the last: again) */
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) nxt[i] = qg_raw8(t, row + in * bb + i * rs);
            qg_group(t, R, N, AV, a, row + ib * bb, rs, x + (size_t)ib * B, K, true, raw, 8);
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) raw[i] = nxt[i];
        }
    } else
        for (; ib + gb <= nb; ib += gb) qg_group(t, R, N, AV, a, row + ib * bb, rs, x + (size_t)ib * B, K, false, NULL, B / 32);
    for (; ib < nb; ib++) qg_group(t, R, N, AV, a, row + ib * bb, rs, x + (size_t)ib * B, K, false, NULL, 1);
}

/* One function per (R, N, AV): accumulators sized exactly, so they live in registers. */
#define QG_FN(R, N, AV)                                                                                              \
    static void qg_r##R##_n##N(const ds_mat *w, int32_t r, const float *x, float *y, const float *bias, bool acc) {   \
        vf a[R * N * AV];                                                                                             \
        switch (w->dtype) {                                                                                           \
        case DS_DTYPE_F32: qg_body(DS_DTYPE_F32, R, N, AV, a, w, r, x); break;                                       \
        case DS_DTYPE_F16: qg_body(DS_DTYPE_F16, R, N, AV, a, w, r, x); break;                                       \
        case DS_DTYPE_BF16: qg_body(DS_DTYPE_BF16, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q4_0: qg_body(DS_DTYPE_Q4_0, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q4_1: qg_body(DS_DTYPE_Q4_1, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q5_0: qg_body(DS_DTYPE_Q5_0, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q5_1: qg_body(DS_DTYPE_Q5_1, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q8_0: qg_body(DS_DTYPE_Q8_0, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q4_K: qg_body(DS_DTYPE_Q4_K, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q5_K: qg_body(DS_DTYPE_Q5_K, R, N, AV, a, w, r, x); break;                                     \
        case DS_DTYPE_Q6_K: qg_body(DS_DTYPE_Q6_K, R, N, AV, a, w, r, x); break;                                     \
        default: return;                                                                                              \
        }                                                                                                             \
        for (int i = 0; i < R; i++)                                                                                   \
            for (int tt = 0; tt < N; tt++) {                                                                          \
                vf s = a[(i * N + tt) * AV];                                                                          \
                for (int v = 1; v < AV; v++) s += a[(i * N + tt) * AV + v];                                           \
                float o = vsum(s);                                                                                    \
                if (bias) o += bias[r + i];                                                                           \
                float *yr = y + (size_t)tt * w->rows + r + i;                                                         \
                *yr = acc ? *yr + o : o;                                                                              \
            }                                                                                                         \
    }

/* Rows per call and independent sums per (row, token), per token count: enough accumulators to
 * hide the FMA latency, few enough to stay in the register file (32 zmm, 16 ymm). */
#if QK_VW == 16
#define QG_R1 2
#define QG_AV1 2
#define QG_R2 2
#define QG_AV2 2
#define QG_RN 2
#else
#define QG_R1 2
#define QG_AV1 2
#define QG_R2 2
#define QG_AV2 1
#define QG_RN 1
#endif

QG_FN(1, 1, QG_AV1)
QG_FN(1, 2, QG_AV2)
QG_FN(1, 3, 1)
QG_FN(1, 4, 1)
QG_FN(1, 5, 1)
QG_FN(1, 6, 1)
QG_FN(1, 7, 1)
QG_FN(1, 8, 1)
#if QG_R1 == 4
QG_FN(4, 1, QG_AV1)
#else
QG_FN(2, 1, QG_AV1)
#endif
QG_FN(2, 2, QG_AV2)
#if QG_RN == 2
QG_FN(2, 3, 1)
QG_FN(2, 4, 1)
QG_FN(2, 5, 1)
QG_FN(2, 6, 1)
QG_FN(2, 7, 1)
QG_FN(2, 8, 1)
#endif

#define QG_CAT3(a, b, c) a##b##c
#define QG_RUN(R, N)                                                                                                  \
    do {                                                                                                              \
        int32_t r = r0;                                                                                               \
        for (; r + (R) <= r1; r += (R)) QG_CAT3(qg_r, R, _n##N)(w, r, x, y, bias, acc);                               \
        for (; r < r1; r++) qg_r1_n##N(w, r, x, y, bias, acc);                                                        \
    } while (0)

#if QG_TABLE
/* Q4_K, one token (AVX-512). qg_deq widens each 16 codes with vpmovzxbd, a shuffle on the port
 * vpermps also needs, so a chunk cost two shuffles per 16 weights. Here the 32 code bytes of a chunk
 * pair are broadcast to both halves of a register (a load, no shuffle) and each 16 codes are picked
 * by a per-lane shift: lane i < 8 takes byte 4i + 2v, lane 8 + i byte 4i + 2v + 1, its low or high
 * nibble (v ∈ {0, 1}, nibble h = which chunk of the pair) — vpermps reads only the low 4 bits. The
 * activations are permuted the same way once per call (xp), so each lane meets its own weight's
 * x. Weights are the table's exact values (qg_table, as qg_deq); only the summation order differs. */
#define QG_Q4K_KMAX 16384 /* columns that fit the stack copy of the permuted activations */
static void qg_q4k_n1(const ds_mat *w, int32_t r0, int32_t r1, const float *x, float *y, const float *bias, bool acc) {
    const int32_t K = w->cols, nb = K / 256;
    const size_t rs = w->row_bytes;
    float xp[QG_Q4K_KMAX];
    const __m512i p0 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i p1 = _mm512_add_epi32(p0, _mm512_set1_epi32(2));
    for (int32_t c = 0; c < K / 32; c++) { /* xp[32c + 16v + i] = x[32c + byte index of lane i] */
        const __m512 a = _mm512_loadu_ps(x + 32 * c), b = _mm512_loadu_ps(x + 32 * c + 16);
        _mm512_storeu_ps(xp + 32 * c, _mm512_permutex2var_ps(a, p0, b));
        _mm512_storeu_ps(xp + 32 * c + 16, _mm512_permutex2var_ps(a, p1, b));
    }
    /* shifts for (v, h): lanes 0-7 byte 2v, lanes 8-15 byte 2v + 1, nibble h */
    const __m512i base = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(8), 1);
    const __m512i sh00 = base, sh01 = _mm512_add_epi32(base, _mm512_set1_epi32(4));
    const __m512i sh10 = _mm512_add_epi32(base, _mm512_set1_epi32(16)), sh11 = _mm512_add_epi32(base, _mm512_set1_epi32(20));
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rs;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int32_t ib = 0; ib < nb; ib++) {
            const uint8_t *blk = row + (size_t)ib * 144;
            for (int o = 0; o < 144; o += 64) __builtin_prefetch(blk + QG_PF + o);
            qg_sc c;
            qg_prep(DS_DTYPE_Q4_K, blk, &c);
            __asm__ volatile("" : : "r"(&c) : "memory"); /* scales broadcast from memory (qg_group) */
            const float *xb = xp + (size_t)ib * 256;
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * p)));
                const __m512 t0 = qg_table(c.s[2 * p], c.m[2 * p], 0.0f), t1 = qg_table(c.s[2 * p + 1], c.m[2 * p + 1], 0.0f);
                const float *xc = xb + 64 * p;
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh00), t0), _mm512_loadu_ps(xc), a0);
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh10), t0), _mm512_loadu_ps(xc + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh01), t1), _mm512_loadu_ps(xc + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh11), t1), _mm512_loadu_ps(xc + 48), a3);
            }
        }
        float o = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        if (bias) o += bias[r];
        y[r] = acc ? y[r] + o : o;
    }
}
#endif

/* y[t][r] (=|+=) W[r]·x[t] (+ bias[r]), rows [r0, r1), 1 ≤ n ≤ DS_QK_GEMV_MAX (ds_qk_ops.gemv_fused). */
static void gemv_fused(const ds_mat *w, int32_t r0, int32_t r1, const float *x, int32_t n, float *y, const float *bias,
                       bool acc) {
    switch (n) {
    case 1:
        /* Q4_K on AVX-512: its own loop, a row at a time. Q8_0 / Q6_K, and any matrix too big to
         * stay in cache, a row at a time: one stream per thread comes out of DRAM faster than two
         * (bench_qmatmul, 302 MB, one thread: Q4_K 55 → 44 ms, Q6_K 45 → 32, before qg_q4k_n1);
         * matrices that stay in cache take QG_R1 rows (Q4_K 2048 × 2048: 0.32 ms against 0.34) */
#if QG_TABLE
        if (w->dtype == DS_DTYPE_Q4_K && w->cols <= QG_Q4K_KMAX) {
            qg_q4k_n1(w, r0, r1, x, y, bias, acc);
            return;
        }
#endif
        if (w->dtype == DS_DTYPE_Q8_0 || w->dtype == DS_DTYPE_Q6_K || (size_t)w->rows * w->row_bytes >= QG_R1_BYTES)
            QG_RUN(1, 1);
        else QG_RUN(QG_R1, 1);
        return;
    case 2: QG_RUN(QG_R2, 2); return;
    case 3: QG_RUN(QG_RN, 3); return;
    case 4: QG_RUN(QG_RN, 4); return;
    case 5: QG_RUN(QG_RN, 5); return;
    case 6: QG_RUN(QG_RN, 6); return;
    case 7: QG_RUN(QG_RN, 7); return;
    case 8: QG_RUN(QG_RN, 8); return;
    default: return;
    }
}
