/* Int8-activation kernels in portable C (any CPU): the same integer sums as q8kern.h, one weight
 * value at a time. Also the reference the SIMD forms are tested against (tests/unit/test_q8_act.c). */
#include "backend/cpu/qmatmul.h"

#include "ds/common.h"

#include <string.h>

static float h2f(const uint8_t *p) { return ds_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

/* W[row]·x̂ for one token (xq its codes, xd its block scales, bs its 32-column sums). */
static float row_dot(ds_dtype dt, int32_t K, const uint8_t *row, const int8_t *xq, const float *xd,
                     const int16_t *bs) {
    float sum = 0.0f;
    switch (dt) {
    case DS_DTYPE_Q4_0:
    case DS_DTYPE_Q4_1: {
        const bool q41 = dt == DS_DTYPE_Q4_1;
        for (int32_t b = 0; b < K / 32; b++, row += q41 ? 20 : 18) {
            const float d = h2f(row), mo = q41 ? h2f(row + 2) : -8.0f * d;
            const uint8_t *qs = row + (q41 ? 4 : 2);
            int32_t p = 0;
            for (int j = 0; j < 16; j++) p += (qs[j] & 15) * xq[32 * b + j] + (qs[j] >> 4) * xq[32 * b + 16 + j];
            sum += d * xd[b] * (float)p + mo * xd[b] * (float)bs[b];
        }
        return sum;
    }
    case DS_DTYPE_Q8_0:
        for (int32_t b = 0; b < K / 32; b++, row += 34) {
            int32_t p = 0;
            for (int j = 0; j < 32; j++) p += (int8_t)row[2 + j] * xq[32 * b + j];
            sum += h2f(row) * xd[b] * (float)p;
        }
        return sum;
    case DS_DTYPE_Q4_K:
    case DS_DTYPE_Q5_K: {
        const bool q5 = dt == DS_DTYPE_Q5_K;
        for (int32_t b = 0; b < K / 256; b++, row += q5 ? 176 : 144) {
            const float d = h2f(row), dmin = h2f(row + 2);
            const uint8_t *scales = row + 4, *qh = row + 16, *qs = row + (q5 ? 48 : 16);
            const int8_t *x = xq + 256 * b;
            int32_t p = 0, ms = 0;
            for (int c = 0; c < 4; c++)
                for (int half = 0; half < 2; half++) {
                    const int j = 2 * c + half;
                    uint8_t sc, m;
                    int pj = 0;
                    ds_k4_scale_min(j, scales, &sc, &m);
                    for (int l = 0; l < 32; l++) {
                        int q = half ? qs[32 * c + l] >> 4 : qs[32 * c + l] & 15;
                        if (q5) q |= ((qh[l] >> j) & 1) << 4;
                        pj += q * x[32 * j + l];
                    }
                    p += sc * pj;
                    ms += m * bs[8 * b + j];
                }
            sum += d * xd[b] * (float)p - dmin * xd[b] * (float)ms;
        }
        return sum;
    }
    case DS_DTYPE_Q6_K:
        for (int32_t b = 0; b < K / 256; b++, row += 210) {
            const float d = h2f(row + 208);
            const int8_t *sc = (const int8_t *)(row + 192), *x = xq + 256 * b;
            int32_t p = 0;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = row + 64 * h, *qh = row + 128 + 32 * h;
                for (int l = 0; l < 32; l++) {
                    const int is = 8 * h + l / 16;
                    const int q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
                    const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    const int8_t *xh = x + 128 * h + l;
                    p += sc[is] * q1 * xh[0] + sc[is + 2] * q2 * xh[32] + sc[is + 4] * q3 * xh[64] +
                         sc[is + 6] * q4 * xh[96];
                }
            }
            sum += d * xd[b] * (float)p;
        }
        return sum;
    default: return 0.0f;
    }
}

static void gemv(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y, const float *bias,
                 bool acc) {
    const int32_t K = w->cols;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        for (int32_t t = 0; t < n; t++) {
            float v = row_dot(w->dtype, K, row, a->q + (size_t)t * K, a->d + (size_t)t * (K / a->blk),
                              a->bs + (size_t)t * (K / 32));
            if (bias) v += bias[r];
            float *yr = y + (size_t)t * w->rows + r;
            *yr = acc ? *yr + v : v;
        }
    }
}

const ds_q8_ops ds_q8_generic = {.gemv = gemv};
