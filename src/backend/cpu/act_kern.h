/* Elementwise kernels of the per-instruction-set template (included by qkern.h, which defines
 * QK_VW; compiled with each kernel file's flags): softmax's exponentials (exp_sub_sum, used by the
 * attention in attn_kern.h and cpu_backend.c) and SiLU(gate)·up. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* p[i] = e^{p[i] − m} for i < n, returning their sum: softmax's exponentials. On AVX-512 sixteen at
 * a time (Cephes' expf: range reduction by ln 2 in two parts, a degree-7 polynomial, 2^k by scalef;
 * within 2 ulp of libm's expf over the range softmax uses, x ≤ 0) — libm's scalar expf was a tenth
 * of a 512-token prefill of the default model. */
#if defined(__AVX512F__) && QK_VW == 16
static inline __m512 exp16(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    y = _mm512_scalef_ps(y, k);
    /* below e^-87.3 (and −∞, NaN-free): 0, as expf underflows there */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), y);
}
#endif

static float exp_sub_sum(float *p, int32_t n, float m) {
#if defined(__AVX512F__) && QK_VW == 16
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (int32_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + i), mv));
        _mm512_mask_storeu_ps(p + i, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) sum += (p[i] = expf(p[i] - m));
    return sum;
#endif
}

/* out[i] = g[i] / (1 + e^{−g[i]}) · u[i] (SiLU(gate) · up), with exp16 on AVX-512. */
static void silu_mul(const float *g, const float *u, float *out, size_t n) {
    size_t i = 0;
#if defined(__AVX512F__) && QK_VW == 16
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, d), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

