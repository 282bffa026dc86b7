/* The GEMM of a dequantised weight tile with a step's activations (AVX-512 only; included by
 * qkern.h when QK_VW == 16). OpenBLAS's sgemm packed both operands again on every call — the tile
 * we had just written and the step's activations — which took a fifth of a 64-token prefill of the
 * default model (sgemm_incopy / oncopy / beta in a profile). Here the tile is read as it is
 * (row-major, one broadcast per weight) and the activations are transposed once per 64 tokens into
 * xt[k][64], so each weight meets 64 tokens in four FMAs:
 *
 *   for blocks of GT_KB columns: for blocks of 6 rows: acc[6][4] (+)= tile[r][k] · xt[k][0..63]
 *
 * 24 accumulators + 4 activation registers (fewer tokens: more rows, 24 / vectors); the partial sums live in ct[nr][64] between column
 * blocks and go to y (transposed back) at the end. fp32 products accumulated in fp32 in column
 * order: the same numerics as an sgemm, in a different summation order. */
#include <immintrin.h>

#define GT_TOK 64 /* tokens per pass (four vectors) */
#define GT_KB 128 /* columns per block: xt's 128 × 64 floats (32 KiB) stay in L1 */

/* Transposes the 16 × 16 floats at src (rows ld apart) into dst (rows ldd apart); add: dst += . */
static inline void gt_tr16(const float *src, size_t ld, float *dst, size_t ldd, bool add) {
    __m512 r[16], a[16], b[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + (size_t)i * ld);
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a0 = _mm512_castps_pd(a[4 * i]), a1 = _mm512_castps_pd(a[4 * i + 1]);
        const __m512d a2 = _mm512_castps_pd(a[4 * i + 2]), a3 = _mm512_castps_pd(a[4 * i + 3]);
        b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int j = 0; j < 4; j++) { /* b[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j */
        const __m512 e0 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x44), e1 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xEE);
        const __m512 e2 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x44), e3 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xEE);
        const __m512 o[4] = {_mm512_shuffle_f32x4(e0, e2, 0x88), _mm512_shuffle_f32x4(e0, e2, 0xDD),
                             _mm512_shuffle_f32x4(e1, e3, 0x88), _mm512_shuffle_f32x4(e1, e3, 0xDD)};
        for (int L = 0; L < 4; L++) {
            float *d = dst + (size_t)(4 * L + j) * ldd;
            _mm512_storeu_ps(d, add ? _mm512_add_ps(_mm512_loadu_ps(d), o[L]) : o[L]);
        }
    }
}

/* Rows [r, r + R) over columns [k0, k1), tokens of V vectors (16·V of the 64): ct rows (+)= tile
 * rows · xt. R·V ≤ 24 accumulators. */
static inline __attribute__((always_inline)) void gt_block(const float *tile, size_t kn, int32_t r, const int R,
                                                            const int V, int32_t k0, int32_t k1, const float *xt,
                                                            float *ct, bool first) {
    __m512 c[24];
#pragma GCC unroll 24
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int v = 0; v < V; v++)
            c[i * V + v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ct + (size_t)(r + i) * GT_TOK + 16 * v);
    const float *w = tile + (size_t)r * kn;
    for (int32_t k = k0; k < k1; k++) {
        const float *xk = xt + (size_t)k * GT_TOK;
        __m512 xv[4];
#pragma GCC unroll 4
        for (int v = 0; v < V; v++) xv[v] = _mm512_loadu_ps(xk + 16 * v);
#pragma GCC unroll 24
        for (int i = 0; i < R; i++) {
            const __m512 wv = _mm512_set1_ps(w[(size_t)i * kn + k]);
#pragma GCC unroll 4
            for (int v = 0; v < V; v++) c[i * V + v] = _mm512_fmadd_ps(wv, xv[v], c[i * V + v]);
        }
    }
#pragma GCC unroll 24
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int v = 0; v < V; v++) _mm512_storeu_ps(ct + (size_t)(r + i) * GT_TOK + 16 * v, c[i * V + v]);
}

/* Rows [r, r + R) against tokens [0, T) of x, whole rows at a time (the tile's kn columns, kt = kn
 * rounded down to 16, the rest masked): y[t][r + i] (=|+=) Σ_k tile[r + i][k]·x[t][k], vectors
 * along k and one reduction per (row, token). For the few tokens past a step's last 16 (a 64-token
 * prefill with a decode or two beside it): gemm_tile's lanes are tokens, so one token there costs
 * a whole vector FMA per weight where here it costs a sixteenth (bench_qmatmul --n 64,65). */
static inline __attribute__((always_inline)) void gt_dot(const float *tile, size_t kn, int32_t r, const int R,
                                                          const int T, const float *x, size_t ldx, float *y,
                                                          size_t ldy, bool acc) {
    __m512 c[16];
#pragma GCC unroll 16
    for (int i = 0; i < R * T; i++) c[i] = _mm512_setzero_ps();
    const float *w = tile + (size_t)r * kn;
    const size_t kt = kn / 16 * 16;
    for (size_t k = 0; k < kn; k += 16) {
        const __mmask16 m = k < kt ? (__mmask16)0xffff : (__mmask16)((1u << (kn - kt)) - 1);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + (size_t)t * ldx + k);
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const __m512 wv = _mm512_maskz_loadu_ps(m, w + (size_t)i * kn + k);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) c[i * T + t] = _mm512_fmadd_ps(wv, xv[t], c[i * T + t]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            float *yo = y + (size_t)t * ldy + r + i;
            const float s = _mm512_reduce_add_ps(c[i * T + t]);
            *yo = acc ? *yo + s : s;
        }
}

/* gt_dot over every row of the tile and tokens [0, n), 4 tokens at a time. */
static void gt_dot_rows(const float *tile, int32_t nr, size_t kn, const float *x, size_t ldx, int32_t n, float *y,
                        size_t ldy, bool acc) {
    for (int32_t t = 0; t < n; t += 4) {
        const float *xt = x + (size_t)t * ldx;
        float *yt = y + (size_t)t * ldy;
        int32_t r = 0;
        switch (n - t < 4 ? n - t : 4) {
        case 1:
            for (; r + 4 <= nr; r += 4) gt_dot(tile, kn, r, 4, 1, xt, ldx, yt, ldy, acc);
            for (; r < nr; r++) gt_dot(tile, kn, r, 1, 1, xt, ldx, yt, ldy, acc);
            break;
        case 2:
            for (; r + 4 <= nr; r += 4) gt_dot(tile, kn, r, 4, 2, xt, ldx, yt, ldy, acc);
            for (; r < nr; r++) gt_dot(tile, kn, r, 1, 2, xt, ldx, yt, ldy, acc);
            break;
        case 3:
            for (; r + 4 <= nr; r += 4) gt_dot(tile, kn, r, 4, 3, xt, ldx, yt, ldy, acc);
            for (; r < nr; r++) gt_dot(tile, kn, r, 1, 3, xt, ldx, yt, ldy, acc);
            break;
        default:
            for (; r + 4 <= nr; r += 4) gt_dot(tile, kn, r, 4, 4, xt, ldx, yt, ldy, acc);
            for (; r < nr; r++) gt_dot(tile, kn, r, 1, 4, xt, ldx, yt, ldy, acc);
            break;
        }
    }
}

/* Tokens past the last multiple of 16 that go to gt_dot_rows instead of a pass of their own (a
 * vector of token lanes, mostly padding). */
#define GT_DOT_MAX 15

/* Every row of the tile over columns [kb, ke) with V token vectors: blocks of RB rows, then the rest
 * one row at a time. */
#define GT_ROWS(RB, V)                                                                                                \
    do {                                                                                                              \
        int32_t r = 0;                                                                                                \
        for (; r + (RB) <= nr; r += (RB)) gt_block(tile, (size_t)kn, r, (RB), (V), kb, ke, xt, ct, kb == 0);          \
        for (; r < nr; r++) gt_block(tile, (size_t)kn, r, 1, (V), kb, ke, xt, ct, kb == 0);                           \
    } while (0)

/* y[t][i] (=|+=) Σ_k tile[i][k]·x[t][k] for t < n, i < nr, k < kn (tile row-major, kn floats a row;
 * x rows ldx apart, y rows ldy apart). work: gemm_tile_floats(kn, nr) floats. */
static void gemm_tile(const float *tile, int32_t nr, int32_t kn, const float *x, int32_t ldx, int32_t n, float *y,
                      int32_t ldy, bool acc, float *work) {
    float *xt = work, *ct = work + (size_t)kn * GT_TOK;
    const int32_t k16 = kn / 16 * 16, r16 = nr / 16 * 16;
    if (n > 16 && n % 16 <= GT_DOT_MAX) { /* the last few tokens by dot products, the rest in passes */
        const int32_t nd = n % 16;
        gt_dot_rows(tile, nr, (size_t)kn, x + (size_t)(n - nd) * ldx, (size_t)ldx, nd, y + (size_t)(n - nd) * ldy,
                    (size_t)ldy, acc);
        n -= nd;
    }
    for (int32_t t0 = 0; t0 < n; t0 += GT_TOK) {
        const int32_t nt = n - t0 < GT_TOK ? n - t0 : GT_TOK, t16 = nt / 16 * 16;
        /* xt[k][t] = x[t0 + t][k], tokens past nt zero */
        for (int32_t tg = 0; tg < t16; tg += 16)
            for (int32_t k = 0; k < k16; k += 16) gt_tr16(x + (size_t)(t0 + tg) * ldx + k, (size_t)ldx, xt + (size_t)k * GT_TOK + tg, GT_TOK, false);
        for (int32_t k = 0; k < kn; k++)
            for (int32_t t = (k < k16 ? t16 : 0); t < GT_TOK; t++) xt[(size_t)k * GT_TOK + t] = t < nt ? x[(size_t)(t0 + t) * ldx + k] : 0.0f;
        for (int32_t kb = 0; kb < kn; kb += GT_KB) {
            const int32_t ke = kn - kb < GT_KB ? kn : kb + GT_KB;
            switch ((nt + 15) / 16) { /* token vectors this pass needs: no work on padding */
            case 1: GT_ROWS(24, 1); break;
            case 2: GT_ROWS(12, 2); break;
            case 3: GT_ROWS(8, 3); break;
            default: GT_ROWS(6, 4); break;
            }
        }
        /* y[t0 + t][i] (+)= ct[i][t] */
        for (int32_t ig = 0; ig < r16; ig += 16)
            for (int32_t tg = 0; tg < t16; tg += 16)
                gt_tr16(ct + (size_t)ig * GT_TOK + tg, GT_TOK, y + (size_t)(t0 + tg) * ldy + ig, (size_t)ldy, acc);
        for (int32_t t = 0; t < nt; t++)
            for (int32_t i = (t < t16 ? r16 : 0); i < nr; i++) {
                float *yo = y + (size_t)(t0 + t) * ldy + i;
                *yo = acc ? *yo + ct[(size_t)i * GT_TOK + t] : ct[(size_t)i * GT_TOK + t];
            }
    }
}
