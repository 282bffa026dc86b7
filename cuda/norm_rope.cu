/* Row-wise and element-wise ops: embed, rmsnorm, rope, silu_mul, add, get_rows, kv_store, and the
 * per-segment vector ops of the adapter hooks (seg_scale, seg_add, set_rows).
 *
 * Numerics mirror src/backend/cpu/cpu_backend.c in fp32 (the CPU is the reference): same formula
 * order, accurate expf/cosf/sinf (this library is never built with --use_fast_math).
 *
 * Performance notes: these are memory-bound; the obvious later wins are fusions (residual add +
 * rmsnorm, rope + kv_store, silu_mul writing the bf16 GEMM input directly), not faster kernels. */
#include "common.cuh"

#include <string.h>

#define THREADS 256

/* Rows in a 1-D grid: block b handles rows b, b + gridDim.x, ... */
static inline unsigned row_blocks(int32_t n) { return (unsigned)(n < 65535 ? (n > 0 ? n : 1) : 65535); }

/* ---- embed ---- */

template <typename T> static __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

/* An id out of range writes a zero row and raises the context's error flag (reported by
 * synchronize() as DS_EINVAL) instead of reading outside the table. */
template <typename T>
static __global__ void embed_kernel(const T *__restrict__ table, int32_t n_rows, int32_t d, const int32_t *__restrict__ ids,
                                    float *__restrict__ out, int32_t n, int *err_flag) {
    for (int32_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int32_t id = ids[t];
        float *o = out + (size_t)t * d;
        if (id < 0 || id >= n_rows) {
            if (threadIdx.x == 0) *err_flag = 1;
            for (int32_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = 0.0f;
            continue;
        }
        const T *row = table + (size_t)id * d;
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = to_f32<T>(row[i]);
    }
}

int ds_cuda_embed(void *ctx, const ds_mat *embd, const int32_t *ids, float *out, int32_t n) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n <= 0) return n < 0 ? DS_EINVAL : DS_OK;
    DS_TRY(ds_cuda_enter(c));
    if (embd->dtype == DS_DTYPE_BF16)
        embed_kernel<__nv_bfloat16><<<row_blocks(n), THREADS, 0, c->stream>>>(
            (const __nv_bfloat16 *)embd->data, embd->rows, embd->cols, ids, out, n, c->err_flag_dev);
    else if (embd->dtype == DS_DTYPE_F32)
        embed_kernel<float><<<row_blocks(n), THREADS, 0, c->stream>>>((const float *)embd->data, embd->rows, embd->cols,
                                                                      ids, out, n, c->err_flag_dev);
    else
        return DS_EUNSUPPORTED;
    CU_CHECK_LAUNCH("embed_kernel");
    return DS_OK;
}

/* ---- rmsnorm ---- */

/* One block per row. x and y may alias (elementwise after the reduction). */
static __global__ void rmsnorm_kernel(const float *x, const float *__restrict__ w, float *y, int32_t n, int32_t d,
                                      float eps) {
    __shared__ float red[32];
    for (int32_t t = blockIdx.x; t < n; t += gridDim.x) {
        const float *xr = x + (size_t)t * d;
        float *yr = y + (size_t)t * d;
        float ss = 0.0f;
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
        ss = ds_block_sum(ss, red);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = (xr[i] * r) * w[i];
    }
}

int ds_cuda_rmsnorm(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t d, float eps) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n <= 0 || d <= 0) return n < 0 || d < 0 ? DS_EINVAL : DS_OK;
    DS_TRY(ds_cuda_enter(c));
    const int threads = d >= 4096 ? 1024 : d >= 1024 ? 512 : THREADS;
    rmsnorm_kernel<<<row_blocks(n), threads, 0, c->stream>>>(x, w, y, n, d, eps);
    CU_CHECK_LAUNCH("rmsnorm_kernel");
    return DS_OK;
}

/* ---- rope ---- */

/* rotate_half RoPE (HF Llama), in place on x[n][n_head][head_dim]. One thread per (token, i < half)
 * pair; the angle is computed once in fp32 exactly like the CPU (pos * inv_freq, then cosf/sinf)
 * and applied to every head. */
static __global__ void rope_kernel(float *x, const int32_t *__restrict__ pos, const float *__restrict__ inv_freq,
                                   int32_t n, int32_t n_head, int32_t head_dim) {
    const int32_t half = head_dim / 2;
    const size_t total = (size_t)n * half;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x) {
        const int32_t t = (int32_t)(k / half), i = (int32_t)(k % half);
        const float f = (float)pos[t] * inv_freq[i];
        const float cs = cosf(f), sn = sinf(f);
        for (int32_t h = 0; h < n_head; h++) {
            float *xh = x + ((size_t)t * n_head + h) * head_dim;
            const float a = xh[i], b = xh[i + half];
            xh[i] = a * cs - b * sn;
            xh[i + half] = b * cs + a * sn;
        }
    }
}

int ds_cuda_rope(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                 int32_t head_dim) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n < 0 || n_head < 0 || head_dim < 0) return DS_EINVAL;
    if (n == 0 || n_head == 0 || head_dim < 2) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    const size_t total = (size_t)n * (head_dim / 2);
    rope_kernel<<<ds_cuda_blocks(total, THREADS), THREADS, 0, c->stream>>>(x, pos, inv_freq, n, n_head, head_dim);
    CU_CHECK_LAUNCH("rope_kernel");
    return DS_OK;
}

/* ---- silu_mul, add ---- */

/* out may alias gate or up (the forward pass writes gate in place). */
static __global__ void silu_mul_kernel(const float *gate, const float *up, float *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

int ds_cuda_silu_mul(void *ctx, const float *gate, const float *up, float *out, size_t n) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!n) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    silu_mul_kernel<<<ds_cuda_blocks(n, THREADS), THREADS, 0, c->stream>>>(gate, up, out, n);
    CU_CHECK_LAUNCH("silu_mul_kernel");
    return DS_OK;
}

static __global__ void add_kernel(float *y, const float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

int ds_cuda_add(void *ctx, float *y, const float *x, size_t n) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!n) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    add_kernel<<<ds_cuda_blocks(n, THREADS), THREADS, 0, c->stream>>>(y, x, n);
    CU_CHECK_LAUNCH("add_kernel");
    return DS_OK;
}

/* ---- Gemma 3: scale, gelu_tanh_mul ---- */

static __global__ void scale_kernel(float *x, float s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

int ds_cuda_scale(void *ctx, float *x, float s, size_t n) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!n) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    scale_kernel<<<ds_cuda_blocks(n, THREADS), THREADS, 0, c->stream>>>(x, s, n);
    CU_CHECK_LAUNCH("scale_kernel");
    return DS_OK;
}

/* The CPU backend's formula (torch's gelu(approximate="tanh")); out may alias gate. */
static __global__ void gelu_tanh_mul_kernel(const float *gate, const float *up, float *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float x = gate[i];
        out[i] = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))) * up[i];
    }
}

int ds_cuda_gelu_tanh_mul(void *ctx, const float *gate, const float *up, float *out, size_t n) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!n) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    gelu_tanh_mul_kernel<<<ds_cuda_blocks(n, THREADS), THREADS, 0, c->stream>>>(gate, up, out, n);
    CU_CHECK_LAUNCH("gelu_tanh_mul_kernel");
    return DS_OK;
}

/* ---- get_rows, kv_store ---- */

static __global__ void get_rows_kernel(const float *__restrict__ src, const int32_t *__restrict__ idx,
                                       float *__restrict__ dst, int32_t n, int32_t d) {
    for (int32_t r = blockIdx.x; r < n; r += gridDim.x) {
        const float *s = src + (size_t)idx[r] * d;
        float *o = dst + (size_t)r * d;
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = s[i];
    }
}

int ds_cuda_get_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n <= 0 || d <= 0) return n < 0 || d < 0 ? DS_EINVAL : DS_OK;
    DS_TRY(ds_cuda_enter(c));
    get_rows_kernel<<<row_blocks(n), THREADS, 0, c->stream>>>(src, idx, dst, n, d);
    CU_CHECK_LAUNCH("get_rows_kernel");
    return DS_OK;
}

/* Negative slots are skipped (the engine never sends them; the CPU would write out of bounds). */
static __global__ void kv_store_kernel(float *__restrict__ kc, float *__restrict__ vc, const float *__restrict__ k,
                                       const float *__restrict__ v, const int64_t *__restrict__ slot, int32_t n,
                                       int32_t row) {
    for (int32_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int64_t s = slot[t];
        if (s < 0) continue;
        for (int32_t i = threadIdx.x; i < row; i += blockDim.x) {
            kc[s * row + i] = k[(size_t)t * row + i];
            vc[s * row + i] = v[(size_t)t * row + i];
        }
    }
}

int ds_cuda_kv_store(void *ctx, float *k_cache, float *v_cache, const float *k, const float *v,
                     const int64_t *slot, int32_t n, int32_t row) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n <= 0 || row <= 0) return n < 0 || row < 0 ? DS_EINVAL : DS_OK;
    DS_TRY(ds_cuda_enter(c));
    kv_store_kernel<<<row_blocks(n), THREADS, 0, c->stream>>>(k_cache, v_cache, k, v, slot, n, row);
    CU_CHECK_LAUNCH("kv_store_kernel");
    return DS_OK;
}

/* ---- segment ops (ranges of the step's planned vec table, sgmv.cu's ds_cuda_plan_upload) ---- */

/* grid.y walks segments, grid.x the tokens of a segment: a 1-token segment costs one block, a
 * 300-token one up to gridDim.x blocks, with no inter-block dependency. */
template <bool SCALE>
static __global__ void seg_vec_kernel(float *y, int32_t width, const ds_vec_seg *__restrict__ segs, int32_t n_segs) {
    for (int32_t s = blockIdx.y; s < n_segs; s += gridDim.y) {
        const ds_vec_seg g = segs[s];
        for (int32_t t = g.start + (int32_t)blockIdx.x; t < g.start + g.len; t += gridDim.x) {
            float *yr = y + (size_t)t * width;
            for (int32_t j = threadIdx.x; j < width; j += blockDim.x) {
                if (SCALE)
                    yr[j] *= g.v[j];
                else
                    yr[j] += g.alpha * g.v[j];
            }
        }
    }
}

/* Runs entries r of the planned vec table (ds_cuda_plan_upload copied it to the device once per
 * step); the grid's x extent comes from the caller's host table, borrowed until the next plan. */
template <bool SCALE>
static int seg_vec(ds_cuda_ctx *c, float *y, int32_t width, ds_seg_range r) {
    if (width < 0 || r.first < 0 || r.n < 0 || r.first > c->plan_n_vec - r.n) return DS_EINVAL;
    if (r.n == 0 || width == 0) return DS_OK;
    int32_t max_len = 0;
    for (int32_t i = r.first; i < r.first + r.n; i++)
        if (c->plan_vec[i].len > max_len) max_len = c->plan_vec[i].len;
    if (max_len == 0) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    dim3 grid((unsigned)(max_len < 1024 ? max_len : 1024), (unsigned)(r.n < 65535 ? r.n : 65535));
    seg_vec_kernel<SCALE><<<grid, THREADS, 0, c->stream>>>(y, width, c->plan_vec_dev + r.first, r.n);
    CU_CHECK_LAUNCH("seg_vec_kernel");
    return DS_OK;
}

int ds_cuda_seg_scale(void *ctx, float *y, int32_t width, ds_seg_range r) {
    return seg_vec<true>((ds_cuda_ctx *)ctx, y, width, r);
}

int ds_cuda_seg_add(void *ctx, float *y, int32_t width, ds_seg_range r) {
    return seg_vec<false>((ds_cuda_ctx *)ctx, y, width, r);
}

typedef struct set_row {
    const float *src;
    int64_t row;
} set_row;

static __global__ void set_rows_kernel(float *dst, int32_t width, const set_row *__restrict__ list, int32_t n) {
    for (int32_t r = blockIdx.x; r < n; r += gridDim.x) {
        const set_row e = list[r];
        float *o = dst + e.row * width;
        for (int32_t j = threadIdx.x; j < width; j += blockDim.x) o[j] = e.src[j];
    }
}

int ds_cuda_set_rows(void *ctx, float *dst, int32_t width, const int32_t *rows, const float *const *src, int32_t n) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n < 0 || width < 0) return DS_EINVAL;
    if (n == 0 || width == 0) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    const size_t bytes = (size_t)n * sizeof(set_row);
    void *h, *d;
    DS_TRY(ds_cuda_meta_alloc(c, bytes, &h));
    set_row *list = (set_row *)h;
    for (int32_t i = 0; i < n; i++) {
        if (rows[i] < 0) return DS_EINVAL;
        list[i].src = src[i];
        list[i].row = rows[i];
    }
    DS_TRY(ds_cuda_meta_push(c, h, bytes, &d));
    set_rows_kernel<<<row_blocks(n), THREADS, 0, c->stream>>>(dst, width, (const set_row *)d, n);
    CU_CHECK_LAUNCH("set_rows_kernel");
    return DS_OK;
}
