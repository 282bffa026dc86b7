/* Typed weights: block layouts, dequantisation and the quantisers used by --quantize.
 * Block layouts and the order of operations follow ggml-quants.c (dequantize_row_*,
 * quantize_row_q8_0_ref), so dequantised values are bit-identical to ggml's. */
#include "ds/weight.h"

#include "ds/common.h"

#include <math.h>
#include <string.h>
#include <strings.h>

typedef struct {
    const char *name;
    uint16_t blck, bytes;
} dtype_info;

static const dtype_info INFO[DS_DTYPE_COUNT] = {
    [DS_DTYPE_F32] = {"F32", 1, 4},      [DS_DTYPE_F16] = {"F16", 1, 2},      [DS_DTYPE_BF16] = {"BF16", 1, 2},
    [DS_DTYPE_Q4_0] = {"Q4_0", 32, 18},  [DS_DTYPE_Q4_1] = {"Q4_1", 32, 20},  [DS_DTYPE_Q5_0] = {"Q5_0", 32, 22},
    [DS_DTYPE_Q5_1] = {"Q5_1", 32, 24},  [DS_DTYPE_Q8_0] = {"Q8_0", 32, 34},  [DS_DTYPE_Q4_K] = {"Q4_K", 256, 144},
    [DS_DTYPE_Q5_K] = {"Q5_K", 256, 176}, [DS_DTYPE_Q6_K] = {"Q6_K", 256, 210},
};

bool ds_dtype_supported(int t) { return t >= 0 && t < DS_DTYPE_COUNT && INFO[t].name; }
const char *ds_dtype_name(ds_dtype t) { return ds_dtype_supported((int)t) ? INFO[t].name : "?"; }
int32_t ds_dtype_block(ds_dtype t) { return ds_dtype_supported((int)t) ? INFO[t].blck : 0; }
size_t ds_dtype_block_bytes(ds_dtype t) { return ds_dtype_supported((int)t) ? INFO[t].bytes : 0; }

ds_dtype ds_dtype_parse(const char *s) {
    for (int t = 0; s && t < DS_DTYPE_COUNT; t++)
        if (INFO[t].name && !strcasecmp(s, INFO[t].name)) return (ds_dtype)t;
    return DS_DTYPE_NONE;
}

size_t ds_dtype_row_bytes(ds_dtype t, int64_t cols) {
    if (!ds_dtype_supported((int)t) || cols <= 0 || cols % INFO[t].blck) return 0;
    return (size_t)(cols / INFO[t].blck) * INFO[t].bytes;
}

int ds_weight_init(ds_weight *w, const void *data, ds_dtype t, int32_t rows, int32_t cols) {
    size_t rb = ds_dtype_row_bytes(t, cols);
    if (!rb || rows <= 0) return DS_EINVAL;
    *w = (ds_weight){.data = data, .dtype = t, .rows = rows, .cols = cols, .row_bytes = rb};
    return 0;
}

/* ---- dequantisation ---- */

static float f16_at(const uint8_t *p) { return ds_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }
static uint32_t u32_at(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* Q4_0, 18 B / 32: f16 d, qs[16]; low nibbles are elements 0..15, high nibbles 16..31; y = (q-8)*d. */
static void deq_q4_0(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 18, y += 32) {
        const float d = f16_at(x);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((x[2 + j] & 0x0F) - 8) * d;
            y[j + 16] = (float)((x[2 + j] >> 4) - 8) * d;
        }
    }
}

/* Q4_1, 20 B / 32: f16 d, f16 m, qs[16]; same nibble order; y = q*d + m. */
static void deq_q4_1(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 20, y += 32) {
        const float d = f16_at(x), m = f16_at(x + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(x[4 + j] & 0x0F) * d + m;
            y[j + 16] = (float)(x[4 + j] >> 4) * d + m;
        }
    }
}

/* Q5_0, 22 B / 32: f16 d, u32 qh (fifth bits), qs[16]; y = (q-16)*d. */
static void deq_q5_0(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 22, y += 32) {
        const float d = f16_at(x);
        const uint32_t qh = u32_at(x + 2);
        for (int j = 0; j < 16; j++) {
            const uint8_t h0 = (uint8_t)(((qh >> j) << 4) & 0x10), h1 = (uint8_t)((qh >> (j + 12)) & 0x10);
            y[j] = (float)(((x[6 + j] & 0x0F) | h0) - 16) * d;
            y[j + 16] = (float)(((x[6 + j] >> 4) | h1) - 16) * d;
        }
    }
}

/* Q5_1, 24 B / 32: f16 d, f16 m, u32 qh, qs[16]; y = q*d + m. */
static void deq_q5_1(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 24, y += 32) {
        const float d = f16_at(x), m = f16_at(x + 2);
        const uint32_t qh = u32_at(x + 4);
        for (int j = 0; j < 16; j++) {
            const uint8_t h0 = (uint8_t)(((qh >> j) << 4) & 0x10), h1 = (uint8_t)((qh >> (j + 12)) & 0x10);
            y[j] = (float)((x[8 + j] & 0x0F) | h0) * d + m;
            y[j + 16] = (float)((x[8 + j] >> 4) | h1) * d + m;
        }
    }
}

/* Q8_0, 34 B / 32: f16 d, i8 qs[32]; y = q*d. */
static void deq_q8_0(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 34, y += 32) {
        const float d = f16_at(x);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)x[2 + j] * d;
    }
}

/* Q4_K, 144 B / 256: f16 d, f16 dmin, scales[12], qs[128]; 4 chunks of 64: low nibbles of 32 bytes with
 * (sc,m)[2k], high nibbles with (sc,m)[2k+1]; y = (d*sc)*q - (dmin*m). */
static void deq_q4_k(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 144) {
        const float d = f16_at(x), dmin = f16_at(x + 2);
        const uint8_t *scales = x + 4, *q = x + 16;
        for (int is = 0; is < 8; is += 2, q += 32) {
            uint8_t sc, m;
            ds_k4_scale_min(is, scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            ds_k4_scale_min(is + 1, scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

/* Q5_K, 176 B / 256: f16 d, f16 dmin, scales[12], qh[32], qs[128]; as Q4_K plus a fifth bit from qh
 * (bit 2k for the low-nibble half of chunk k, bit 2k+1 for the high half). */
static void deq_q5_k(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 176) {
        const float d = f16_at(x), dmin = f16_at(x + 2);
        const uint8_t *scales = x + 4, *qh = x + 16, *ql = x + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int is = 0; is < 8; is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            uint8_t sc, m;
            ds_k4_scale_min(is, scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            ds_k4_scale_min(is + 1, scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

/* Q6_K, 210 B / 256: ql[128] (low 4 bits), qh[64] (high 2 bits), i8 scales[16], f16 d LAST.
 * Two halves of 128; y = d * sc * (q - 32), evaluated left to right as in ggml. */
static void deq_q6_k(const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 210) {
        const float d = f16_at(x + 208);
        const uint8_t *ql = x, *qh = x + 128;
        const int8_t *sc = (const int8_t *)(x + 192);
        for (int n = 0; n < 2; n++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

int ds_dequant_row(ds_dtype t, const void *src, float *dst, int64_t n) {
    if (!ds_dtype_supported((int)t) || n < 0 || n % INFO[t].blck) return DS_EINVAL;
    const uint8_t *x = src;
    const int64_t nb = n / INFO[t].blck;
    switch (t) {
    case DS_DTYPE_F32: memcpy(dst, x, (size_t)n * 4); break;
    case DS_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = f16_at(x + 2 * i);
        break;
    case DS_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = ds_bf16_to_f32((uint16_t)(x[2 * i] | x[2 * i + 1] << 8));
        break;
    case DS_DTYPE_Q4_0: deq_q4_0(x, dst, nb); break;
    case DS_DTYPE_Q4_1: deq_q4_1(x, dst, nb); break;
    case DS_DTYPE_Q5_0: deq_q5_0(x, dst, nb); break;
    case DS_DTYPE_Q5_1: deq_q5_1(x, dst, nb); break;
    case DS_DTYPE_Q8_0: deq_q8_0(x, dst, nb); break;
    case DS_DTYPE_Q4_K: deq_q4_k(x, dst, nb); break;
    case DS_DTYPE_Q5_K: deq_q5_k(x, dst, nb); break;
    case DS_DTYPE_Q6_K: deq_q6_k(x, dst, nb); break;
    default: return DS_EINVAL;
    }
    return 0;
}

int ds_weight_row(const ds_weight *w, int32_t r, float *dst) {
    if (!w->data || r < 0 || r >= w->rows) return DS_EINVAL;
    return ds_dequant_row(w->dtype, (const uint8_t *)w->data + (size_t)r * w->row_bytes, dst, w->cols);
}

/* ---- quantisation ---- */

static void put_f16(uint8_t *p, float v) {
    uint16_t h = ds_f32_to_f16(v);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* ggml quantize_row_q8_0_ref: d = max|x|/127, q = round(x/d). */
static void q_q8_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

/* Q4_K from per-sub-block min/max: sub-block j has scale s_j = (max - min)/15 and offset
 * o_j = -min(min, 0); the 6-bit codes are s_j/d and o_j/dmin rounded, with d, dmin the
 * largest of each over 63. Elements then round to the nearest of the 16 levels. */
static void q_q4_k(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 256, y += 144) {
        float s[8], o[8], smax = 0.0f, omax = 0.0f;
        for (int j = 0; j < 8; j++) {
            float mn = x[32 * j], mx = x[32 * j];
            for (int l = 1; l < 32; l++) {
                mn = fminf(mn, x[32 * j + l]);
                mx = fmaxf(mx, x[32 * j + l]);
            }
            if (mn > 0) mn = 0;
            s[j] = (mx - mn) / 15.0f;
            o[j] = -mn;
            smax = fmaxf(smax, s[j]);
            omax = fmaxf(omax, o[j]);
        }
        const float d = ds_f16_to_f32(ds_f32_to_f16(smax / 63.0f)), dmin = ds_f16_to_f32(ds_f32_to_f16(omax / 63.0f));
        uint8_t sc[8], m[8];
        for (int j = 0; j < 8; j++) {
            int a = d > 0 ? (int)lroundf(s[j] / d) : 0, b = dmin > 0 ? (int)lroundf(o[j] / dmin) : 0;
            sc[j] = (uint8_t)(a > 63 ? 63 : a);
            m[j] = (uint8_t)(b > 63 ? 63 : b);
        }
        put_f16(y, d);
        put_f16(y + 2, dmin);
        uint8_t *scales = y + 4, *qs = y + 16;
        memset(scales, 0, 12);
        for (int j = 0; j < 8; j++) {
            if (j < 4) {
                scales[j] = sc[j];
                scales[j + 4] = m[j];
            } else {
                scales[j + 4] = (uint8_t)((sc[j] & 0xF) | ((m[j] & 0xF) << 4));
                scales[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
                scales[j] |= (uint8_t)((m[j] >> 4) << 6);
            }
        }
        uint8_t L[256];
        for (int j = 0; j < 8; j++) {
            const float dj = d * sc[j], mj = dmin * m[j];
            for (int l = 0; l < 32; l++) {
                int q = dj > 0 ? (int)lroundf((x[32 * j + l] + mj) / dj) : 0;
                L[32 * j + l] = (uint8_t)(q < 0 ? 0 : q > 15 ? 15 : q);
            }
        }
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

bool ds_dtype_can_quantize(ds_dtype t) {
    return t == DS_DTYPE_F32 || t == DS_DTYPE_F16 || t == DS_DTYPE_BF16 || t == DS_DTYPE_Q8_0 || t == DS_DTYPE_Q4_K;
}

int ds_quantize_row(ds_dtype t, const float *src, void *dst, int64_t n) {
    if (!ds_dtype_can_quantize(t)) return DS_EUNSUPPORTED;
    if (n < 0 || n % INFO[t].blck) return DS_EINVAL;
    uint8_t *y = dst;
    switch (t) {
    case DS_DTYPE_F32: memcpy(y, src, (size_t)n * 4); break;
    case DS_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) put_f16(y + 2 * i, src[i]);
        break;
    case DS_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = ds_f32_to_bf16(src[i]);
            y[2 * i] = (uint8_t)h;
            y[2 * i + 1] = (uint8_t)(h >> 8);
        }
        break;
    case DS_DTYPE_Q8_0: q_q8_0(src, y, n / 32); break;
    case DS_DTYPE_Q4_K: q_q4_k(src, y, n / 256); break;
    default: return DS_EUNSUPPORTED;
    }
    return 0;
}
