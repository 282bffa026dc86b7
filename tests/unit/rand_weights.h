/* Random test data shared by the kernel tests (test_backend_ops.c, test_q8_act.c): a
 * reproducible splitmix64 stream, random fp32 vectors, and random typed weight matrices with sane
 * scales, plus their dequantised fp32 values (the references' input). One copy per test binary:
 * include from exactly one .c file. */
#ifndef DS_TEST_RAND_WEIGHTS_H
#define DS_TEST_RAND_WEIGHTS_H

#include "ds/common.h"
#include "ds/weight.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static inline uint64_t rnd_u64(void) { /* splitmix64: reproducible across platforms */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline float rnd_f(void) { return (float)((double)(rnd_u64() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }
static inline int32_t rnd_i(int32_t n) { return (int32_t)(rnd_u64() % (uint64_t)n); }

static inline float *rnd_vec(size_t n, float scale) {
    float *v = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) v[i] = scale * rnd_f();
    return v;
}

static inline void put16(uint8_t *p, uint16_t h) {
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* rows×cols of dtype t: random quants, scales set to sane finite values (random bytes there could
 * be f16 inf/NaN). Returns malloc'd bytes. */
static inline uint8_t *rnd_typed(ds_dtype t, int32_t rows, int32_t cols) {
    const size_t rb = ds_dtype_row_bytes(t, cols), bb = ds_dtype_block_bytes(t);
    uint8_t *w = malloc(rb * (size_t)rows);
    for (size_t i = 0; i < rb * (size_t)rows; i++) w[i] = (uint8_t)rnd_u64();
    const size_t nb = rb * (size_t)rows / bb;
    for (size_t b = 0; b < nb; b++) {
        uint8_t *x = w + b * bb;
        switch (t) {
        case DS_DTYPE_F32: {
            float v = rnd_f();
            memcpy(x, &v, 4);
            break;
        }
        case DS_DTYPE_F16: put16(x, ds_f32_to_f16(rnd_f())); break;
        case DS_DTYPE_BF16: put16(x, ds_f32_to_bf16(rnd_f())); break;
        case DS_DTYPE_Q4_1: case DS_DTYPE_Q5_1: case DS_DTYPE_Q4_K: case DS_DTYPE_Q5_K:
            put16(x, ds_f32_to_f16(0.01f + 0.05f * fabsf(rnd_f())));
            put16(x + 2, ds_f32_to_f16(0.5f * rnd_f()));
            break;
        case DS_DTYPE_Q6_K: put16(x + 208, ds_f32_to_f16(0.001f + 0.01f * fabsf(rnd_f()))); break;
        default: put16(x, ds_f32_to_f16(0.01f + 0.05f * fabsf(rnd_f()))); break; /* Q4_0, Q5_0, Q8_0 */
        }
    }
    return w;
}

/* The reference: ds_dequant_row (the scalar ggml-order dequantiser), then a double GEMM. */
static inline float *dequant_all(ds_dtype t, const uint8_t *w, int32_t rows, int32_t cols) {
    float *f = malloc(sizeof(float) * (size_t)rows * cols);
    const size_t rb = ds_dtype_row_bytes(t, cols);
    for (int32_t r = 0; r < rows; r++) ds_dequant_row(t, w + (size_t)r * rb, f + (size_t)r * cols, cols);
    return f;
}

#endif
