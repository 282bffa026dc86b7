/* The CUDA backend's training ops (include/ds/backend_train.h) and the inference table's matmul_t:
 * the math of the CPU reference src/backend/cpu/cpu_train.c and cpu_train_bn.c on device pointers.
 * Correct and deterministic before fast: GEMMs are one thread per output with a double
 * accumulator (no split-K, no atomics), per-row reductions are one block per row in double with a
 * fixed order, and accumulations into shared rows (soft-prompt rows, embedding-LoRA rows, bias
 * gradients) are one thread per column walking the rows in order, as the CPU does. Attention is in
 * train_attn.cu. Compiled in CI; checked only by tests/unit/test_train_ops.c on a GPU. */
#include "common.cuh"
#include "train_ops.cuh"
#include "backend/act_math.h" /* ds_act_f, ds_act_grad, ds_act_trainable: shared with the host */

#define TR_THREADS 256
#define TR_TILE 16

/* ---- GEMM: C[M][N] = alpha·Σₚ a(i,p)·b(p,j) + beta·C, a(i,p) = A[i·sai + p·sap], b likewise ---- */

static __global__ void tr_gemm_kernel(const float *A, size_t sai, size_t sap, const float *B, size_t sbp, size_t sbj,
                                      float *C, int32_t M, int32_t N, int32_t K, float alpha, float beta) {
    const int32_t i = blockIdx.y * TR_TILE + threadIdx.y, j = blockIdx.x * TR_TILE + threadIdx.x;
    if (i >= M || j >= N) return;
    double acc = 0.0;
    for (int32_t p = 0; p < K; p++) acc += (double)A[i * sai + p * sap] * B[p * sbp + j * sbj];
    float *c = C + (size_t)i * N + j;
    const float r = (float)(alpha * acc);
    *c = beta == 0.0f ? r : r + beta * *c; /* beta 0 overwrites (y may hold NaN garbage) */
}

static int tr_gemm(ds_cuda_ctx *c, const float *A, size_t sai, size_t sap, const float *B, size_t sbp, size_t sbj,
                   float *C, int32_t M, int32_t N, int32_t K, float alpha, float beta) {
    if (M < 0 || N < 0 || K < 0) return DS_EINVAL;
    if (M == 0 || N == 0 || K == 0) return DS_OK; /* the CPU reference leaves C alone too */
    if ((M + TR_TILE - 1) / TR_TILE > 65535) return DS_EUNSUPPORTED;
    const dim3 grid((unsigned)((N + TR_TILE - 1) / TR_TILE), (unsigned)((M + TR_TILE - 1) / TR_TILE));
    tr_gemm_kernel<<<grid, dim3(TR_TILE, TR_TILE), 0, c->stream>>>(A, sai, sap, B, sbp, sbj, C, M, N, K, alpha, beta);
    CU_CHECK_LAUNCH("tr_gemm_kernel");
    return DS_OK;
}

/* y[n][m] = alpha·x[n][k]·W[m][k]ᵀ + beta·y */
static int g_nt(ds_cuda_ctx *c, const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float alpha,
                float beta) {
    return tr_gemm(c, x, (size_t)k, 1, w, 1, (size_t)k, y, n, m, k, alpha, beta);
}
/* dx[n][k] = alpha·dy[n][m]·W[m][k] + beta·dx */
static int g_nn(ds_cuda_ctx *c, const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k,
                float alpha, float beta) {
    return tr_gemm(c, dy, (size_t)m, 1, w, (size_t)k, 1, dx, n, k, m, alpha, beta);
}
/* dW[m][k] = alpha·dy[n][m]ᵀ·x[n][k] + beta·dW */
static int g_tn(ds_cuda_ctx *c, const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k,
                float alpha, float beta) {
    return tr_gemm(c, dy, 1, (size_t)m, x, (size_t)k, 1, dw, m, k, n, alpha, beta);
}

#define ENTER(ctx) ds_cuda_ctx *c = (ds_cuda_ctx *)(ctx); DS_TRY(ds_cuda_enter(c))

static int t_mm_nt(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float alpha,
                   float beta) {
    ENTER(ctx);
    return g_nt(c, x, w, y, n, m, k, alpha, beta);
}
static int t_mm_nn(void *ctx, const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k, float alpha,
                   float beta) {
    ENTER(ctx);
    return g_nn(c, dy, w, dx, n, m, k, alpha, beta);
}
static int t_mm_tn(void *ctx, const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k, float alpha,
                   float beta) {
    ENTER(ctx);
    return g_tn(c, dy, x, dw, n, m, k, alpha, beta);
}

/* ---- matmul_t (inference table): dx[n][cols] (+)= dy[n][rows]·W through a frozen typed weight ---- */

template <typename T> static __device__ __forceinline__ float tr_ld(const T *p);
template <> __device__ __forceinline__ float tr_ld<float>(const float *p) { return *p; }
template <> __device__ __forceinline__ float tr_ld<__nv_bfloat16>(const __nv_bfloat16 *p) { return __bfloat162float(*p); }

template <typename T>
static __global__ void tr_matmul_t_kernel(const float *dy, const T *w, size_t row_elems, int32_t rows, int32_t cols,
                                          float *dx, int32_t n, bool accumulate) {
    const size_t total = (size_t)n * cols;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / cols, j = e % cols;
        double acc = 0.0;
        for (int32_t r = 0; r < rows; r++) acc += (double)dy[t * rows + r] * tr_ld<T>(w + r * row_elems + j);
        dx[e] = accumulate ? dx[e] + (float)acc : (float)acc;
    }
}

int ds_cuda_matmul_t(void *ctx, const float *dy, const ds_mat *w, float *dx, int32_t n, bool accumulate) {
    if (!w || n < 0 || w->rows <= 0 || w->cols <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    const size_t total = (size_t)n * w->cols;
    if (w->dtype == DS_DTYPE_BF16) {
        const size_t re = w->row_bytes ? w->row_bytes / sizeof(__nv_bfloat16) : (size_t)w->cols;
        tr_matmul_t_kernel<__nv_bfloat16><<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(
            dy, (const __nv_bfloat16 *)w->data, re, w->rows, w->cols, dx, n, accumulate);
    } else if (w->dtype == DS_DTYPE_F32) {
        const size_t re = w->row_bytes ? w->row_bytes / sizeof(float) : (size_t)w->cols;
        tr_matmul_t_kernel<float><<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(
            dy, (const float *)w->data, re, w->rows, w->cols, dx, n, accumulate);
    } else {
        return DS_EUNSUPPORTED;
    }
    CU_CHECK_LAUNCH("tr_matmul_t_kernel");
    return DS_OK;
}

/* ---- element-wise and per-row ops ---- */

static __global__ void tr_add_bias_kernel(float *y, const float *b, size_t total, int32_t m) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
        y[e] += b[e % m];
}
static int t_add_bias(void *ctx, float *y, const float *b, int32_t n, int32_t m) {
    if (n < 0 || m < 0) return DS_EINVAL;
    if (n == 0 || m == 0) return DS_OK;
    ENTER(ctx);
    const size_t total = (size_t)n * m;
    tr_add_bias_kernel<<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(y, b, total, m);
    CU_CHECK_LAUNCH("tr_add_bias_kernel");
    return DS_OK;
}

static __global__ void tr_rms_fwd_kernel(const float *x, const float *w, float *y, float *rinv, int32_t d, float eps) {
    __shared__ double red[32];
    const size_t t = blockIdx.x;
    const float *xr = x + t * d;
    double ss = 0.0;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) ss += (double)xr[i] * xr[i];
    ss = ds_block_sum_d(ss, red);
    const float r = 1.0f / sqrtf((float)(ss / d) + eps);
    if (threadIdx.x == 0) rinv[t] = r;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) y[t * d + i] = (xr[i] * r) * w[i];
}
static int t_rmsnorm_fwd(void *ctx, const float *x, const float *w, float *y, float *rinv, int32_t n, int32_t d,
                         float eps) {
    if (n < 0 || d <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    tr_rms_fwd_kernel<<<(unsigned)n, TR_THREADS, 0, c->stream>>>(x, w, y, rinv, d, eps);
    CU_CHECK_LAUNCH("tr_rms_fwd_kernel");
    return DS_OK;
}

static __global__ void tr_rms_bwd_kernel(const float *x, const float *w, const float *rinv, const float *dy, float *dx,
                                         int32_t d) {
    __shared__ double red[32];
    const size_t t = blockIdx.x;
    const float *xr = x + t * d, *g = dy + t * d;
    const double r = rinv[t];
    double dot = 0.0;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) dot += (double)w[i] * g[i] * xr[i];
    dot = ds_block_sum_d(dot, red);
    const double cc = r * r * r * dot / d;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) dx[t * d + i] += (float)(r * w[i] * g[i] - cc * xr[i]);
}
static int t_rmsnorm_bwd(void *ctx, const float *x, const float *w, const float *rinv, const float *dy, float *dx,
                         int32_t n, int32_t d) {
    if (n < 0 || d <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    tr_rms_bwd_kernel<<<(unsigned)n, TR_THREADS, 0, c->stream>>>(x, w, rinv, dy, dx, d);
    CU_CHECK_LAUNCH("tr_rms_bwd_kernel");
    return DS_OK;
}

/* One thread per (row, head, pair i < hd/2), the rotation of cpu_train.c's tr_rope. */
static __global__ void tr_rope_kernel(float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                                      int32_t hd, int sign) {
    const int32_t half = hd / 2;
    const size_t total = (size_t)n * n_head * half;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const int32_t i = (int32_t)(e % half);
        const size_t th = e / half, t = th / n_head;
        const float f = (float)pos[t] * inv_freq[i];
        const float cs = cosf(f), sn = sign < 0 ? -sinf(f) : sinf(f);
        float *xh = x + th * hd;
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * cs - b * sn;
        xh[i + half] = b * cs + a * sn;
    }
}
static int t_rope(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                  int32_t hd, int sign) {
    if (n < 0 || n_head <= 0 || hd <= 0 || hd % 2) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    const size_t total = (size_t)n * n_head * (hd / 2);
    tr_rope_kernel<<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(x, pos, inv_freq, n, n_head, hd,
                                                                                    sign);
    CU_CHECK_LAUNCH("tr_rope_kernel");
    return DS_OK;
}

static __global__ void tr_silu_fwd_kernel(const float *g, const float *u, float *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
static int t_silu_mul_fwd(void *ctx, const float *g, const float *u, float *out, size_t n) {
    if (!n) return DS_OK;
    ENTER(ctx);
    tr_silu_fwd_kernel<<<ds_cuda_blocks(n, TR_THREADS), TR_THREADS, 0, c->stream>>>(g, u, out, n);
    CU_CHECK_LAUNCH("tr_silu_fwd_kernel");
    return DS_OK;
}

static __global__ void tr_silu_bwd_kernel(const float *g, const float *u, const float *dout, float *dg, float *du,
                                          size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float sg = 1.0f / (1.0f + expf(-g[i]));
        const float silu = g[i] * sg, d = dout[i];
        dg[i] = d * u[i] * (sg * (1.0f + g[i] * (1.0f - sg)));
        du[i] = d * silu;
    }
}
static int t_silu_mul_bwd(void *ctx, const float *g, const float *u, const float *dout, float *dg, float *du,
                          size_t n) {
    if (!n) return DS_OK;
    ENTER(ctx);
    tr_silu_bwd_kernel<<<ds_cuda_blocks(n, TR_THREADS), TR_THREADS, 0, c->stream>>>(g, u, dout, dg, du, n);
    CU_CHECK_LAUNCH("tr_silu_bwd_kernel");
    return DS_OK;
}

/* ---- LoRA ---- */

static int t_lora_fwd(void *ctx, const float *x, const float *A, const float *B, float s, float *u, float *y, int32_t n,
                      int32_t in, int32_t out, int32_t r) {
    ENTER(ctx);
    DS_TRY(g_nt(c, x, A, u, n, r, in, 1.0f, 0.0f));
    return g_nt(c, u, B, y, n, out, r, s, 1.0f);
}

static int t_lora_bwd(void *ctx, const float *x, const float *u, const float *A, const float *B, float s,
                      const float *dy, float *dx, float *dA, float *dB, float *tmp, int32_t n, int32_t in, int32_t out,
                      int32_t r) {
    ENTER(ctx);
    DS_TRY(g_tn(c, dy, u, dB, n, out, r, s, 1.0f));   /* dB[out][r] += s·dyᵀ·u */
    DS_TRY(g_nn(c, dy, B, tmp, n, out, r, s, 0.0f));  /* t[n][r] = s·dy·B */
    DS_TRY(g_tn(c, tmp, x, dA, n, r, in, 1.0f, 1.0f)); /* dA[r][in] += tᵀ·x */
    if (dx) DS_TRY(g_nn(c, tmp, A, dx, n, r, in, 1.0f, 1.0f)); /* dx += t·A */
    return DS_OK;
}

/* ---- embedding ---- */

template <typename T>
static __global__ void tr_embed_kernel(const T *embd, int32_t rows, const float *soft, const int32_t *src, float *out,
                                       int32_t n, int32_t d, int *err) {
    const size_t total = (size_t)n * d;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / d, i = e % d;
        const int32_t id = src[t];
        if (id >= rows) {
            *err = 1; /* reported by synchronize as DS_EINVAL */
            out[e] = 0.0f;
        } else {
            out[e] = id >= 0 ? tr_ld<T>(embd + (size_t)id * d + i) : soft[(size_t)(-(int64_t)id - 1) * d + i];
        }
    }
}
static int t_embed(void *ctx, const struct ds_mat *embd, const float *soft, const int32_t *src, float *out, int32_t n,
                   int32_t d) {
    if (!embd || n < 0 || embd->cols != d) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    const size_t total = (size_t)n * d;
    if (embd->dtype == DS_DTYPE_BF16)
        tr_embed_kernel<__nv_bfloat16><<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(
            (const __nv_bfloat16 *)embd->data, embd->rows, soft, src, out, n, d, c->err_flag_dev);
    else if (embd->dtype == DS_DTYPE_F32)
        tr_embed_kernel<float><<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(
            (const float *)embd->data, embd->rows, soft, src, out, n, d, c->err_flag_dev);
    else
        return DS_EUNSUPPORTED;
    CU_CHECK_LAUNCH("tr_embed_kernel");
    return DS_OK;
}

/* One thread per column i walks the rows in order (several rows may share a soft row). */
static __global__ void tr_embed_bwd_soft_kernel(const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d) {
    const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    for (int32_t t = 0; t < n; t++)
        if (src[t] < 0) dsoft[(size_t)(-(int64_t)src[t] - 1) * d + i] += dx[(size_t)t * d + i];
}
static int t_embed_bwd_soft(void *ctx, const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d) {
    if (n < 0 || d <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    tr_embed_bwd_soft_kernel<<<(unsigned)((d + TR_THREADS - 1) / TR_THREADS), TR_THREADS, 0, c->stream>>>(src, dx, dsoft,
                                                                                                         n, d);
    CU_CHECK_LAUNCH("tr_embed_bwd_soft_kernel");
    return DS_OK;
}

static __global__ void tr_embed_lora_u_kernel(const float *A_T, const int32_t *src, float *u, int32_t n, int32_t r) {
    const size_t total = (size_t)n * r;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const int32_t id = src[e / r];
        u[e] = id >= 0 ? A_T[(size_t)id * r + e % r] : 0.0f;
    }
}
static int t_embed_lora_fwd(void *ctx, const float *A_T, const float *B, float s, const int32_t *src, float *u, float *y,
                            int32_t n, int32_t d, int32_t r) {
    if (n < 0 || d <= 0 || r <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    const size_t total = (size_t)n * r;
    tr_embed_lora_u_kernel<<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(A_T, src, u, n, r);
    CU_CHECK_LAUNCH("tr_embed_lora_u_kernel");
    return g_nt(c, u, B, y, n, d, r, s, 1.0f);
}

static __global__ void tr_embed_lora_dA_kernel(const int32_t *src, const float *tmp, float *dA_T, int32_t n, int32_t r) {
    const int32_t k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= r) return;
    for (int32_t t = 0; t < n; t++)
        if (src[t] >= 0) dA_T[(size_t)src[t] * r + k] += tmp[(size_t)t * r + k];
}
static int t_embed_lora_bwd(void *ctx, const float *B, float s, const int32_t *src, const float *u, const float *dy,
                            float *dA_T, float *dB, float *tmp, int32_t n, int32_t d, int32_t r) {
    if (n < 0 || d <= 0 || r <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    DS_TRY(g_tn(c, dy, u, dB, n, d, r, s, 1.0f));  /* dB += s·dyᵀ·u */
    DS_TRY(g_nn(c, dy, B, tmp, n, d, r, s, 0.0f)); /* t = s·dy·B */
    tr_embed_lora_dA_kernel<<<(unsigned)((r + TR_THREADS - 1) / TR_THREADS), TR_THREADS, 0, c->stream>>>(src, tmp, dA_T,
                                                                                                        n, r);
    CU_CHECK_LAUNCH("tr_embed_lora_dA_kernel");
    return DS_OK;
}

/* ---- cross-entropy: one block per row, its loss term in double into rowloss[t] ---- */

static __global__ void tr_ce_kernel(float *logits, const int32_t *target, int32_t V, float scale, bool grad,
                                    double *rowloss) {
    __shared__ double redd[32];
    __shared__ float redf[32];
    const size_t t = blockIdx.x;
    float *z = logits + t * V;
    const int32_t tg = target[t];
    const double lse = ds_block_logsumexp(z, V, redf, redd);
    const float zt = (tg >= 0 && tg < V) ? z[tg] : NAN; /* every thread reads before anyone writes */
    if (threadIdx.x == 0) rowloss[t] = lse - zt;
    if (!grad) return;
    __syncthreads();
    for (int32_t j = threadIdx.x; j < V; j += blockDim.x) z[j] = (float)(exp((double)z[j] - lse) * scale);
    __syncthreads();
    if (threadIdx.x == 0 && tg >= 0 && tg < V) z[tg] -= scale;
}

/* Σ of n doubles in index order into *out (one thread: n is the number of rows). */
static __global__ void tr_sum_rows_kernel(const double *v, int32_t n, double *out) {
    double s = 0.0;
    for (int32_t i = 0; i < n; i++) s += v[i];
    *out = s;
}

static int t_cross_entropy(void *ctx, float *logits, const int32_t *target, int32_t n, int32_t V, float scale,
                           bool grad, double *loss) {
    if (n < 0 || V <= 0 || !loss) return DS_EINVAL;
    *loss = 0.0;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    DS_TRY(ds_cuda_ws_reserve(c, &c->train_ws, ((size_t)n + 1) * sizeof(double)));
    double *rows = (double *)c->train_ws.ptr, *tot = rows + n;
    tr_ce_kernel<<<(unsigned)n, TR_THREADS, 0, c->stream>>>(logits, target, V, scale, grad, rows);
    CU_CHECK_LAUNCH("tr_ce_kernel");
    tr_sum_rows_kernel<<<1, 1, 0, c->stream>>>(rows, n, tot);
    CU_CHECK_LAUNCH("tr_sum_rows_kernel");
    double h = 0.0;
    CU_TRY(cudaMemcpyAsync(&h, tot, sizeof(double), cudaMemcpyDeviceToHost, c->stream));
    CU_TRY(cudaStreamSynchronize(c->stream));
    *loss = h;
    return DS_OK;
}

/* ---- optimizer ---- */

#define TR_SUMSQ_BLOCKS 256

/* Block b sums its grid-stride share in double; partial[b]. Fixed grid: deterministic. */
static __global__ void tr_sumsq_kernel(const float *x, size_t n, double *partial) {
    __shared__ double red[32];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = ds_block_sum_d(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
static int t_sumsq(void *ctx, const float *x, size_t n, double *out) {
    if (!out) return DS_EINVAL;
    if (!n) return DS_OK;
    ENTER(ctx);
    DS_TRY(ds_cuda_ws_reserve(c, &c->train_ws, (TR_SUMSQ_BLOCKS + 1) * sizeof(double)));
    double *part = (double *)c->train_ws.ptr;
    tr_sumsq_kernel<<<TR_SUMSQ_BLOCKS, TR_THREADS, 0, c->stream>>>(x, n, part);
    CU_CHECK_LAUNCH("tr_sumsq_kernel");
    tr_sum_rows_kernel<<<1, 1, 0, c->stream>>>(part, TR_SUMSQ_BLOCKS, part + TR_SUMSQ_BLOCKS);
    CU_CHECK_LAUNCH("tr_sum_rows_kernel");
    double h = 0.0;
    CU_TRY(cudaMemcpyAsync(&h, part + TR_SUMSQ_BLOCKS, sizeof(double), cudaMemcpyDeviceToHost, c->stream));
    CU_TRY(cudaStreamSynchronize(c->stream));
    *out += h;
    return DS_OK;
}

static __global__ void tr_scale_kernel(float *x, size_t n, double s) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = (float)(x[i] * s);
}
static int t_scale(void *ctx, float *x, size_t n, double s) {
    if (!n) return DS_OK;
    ENTER(ctx);
    tr_scale_kernel<<<ds_cuda_blocks(n, TR_THREADS), TR_THREADS, 0, c->stream>>>(x, n, s);
    CU_CHECK_LAUNCH("tr_scale_kernel");
    return DS_OK;
}

typedef struct tr_adam {
    float step_size, decay, b1c, b2, b2c, bc2s, eps;
    bool wd;
} tr_adam;

/* The float update of cpu_train.c's cpu_t_adamw, constants computed on the host the same way. */
static __global__ void tr_adamw_kernel(float *w, const float *g, float *m, float *v, size_t n, tr_adam a) {
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n; j += (size_t)gridDim.x * blockDim.x) {
        const float gj = g[j];
        float wj = w[j];
        if (a.wd) wj *= a.decay;
        const float mj = m[j] + a.b1c * (gj - m[j]);
        const float vj = v[j] * a.b2 + a.b2c * gj * gj;
        const float denom = sqrtf(vj) / a.bc2s + a.eps;
        m[j] = mj, v[j] = vj;
        w[j] = wj - a.step_size * (mj / denom);
    }
}
static int t_adamw(void *ctx, float *w, const float *g, float *m, float *v, size_t n, const ds_adamw_args *a) {
    if (!a || a->step < 1) return DS_EINVAL;
    if (!n) return DS_OK;
    ENTER(ctx);
    const double step = (double)a->step;
    const double bc1 = 1.0 - pow(a->beta1, step), bc2_sqrt = sqrt(1.0 - pow(a->beta2, step));
    tr_adam k;
    k.step_size = (float)(a->lr / bc1);
    k.decay = (float)(1.0 - (double)a->lr * a->weight_decay);
    k.b1c = 1.0f - a->beta1, k.b2 = a->beta2, k.b2c = 1.0f - a->beta2, k.bc2s = (float)bc2_sqrt, k.eps = a->eps;
    k.wd = a->weight_decay != 0;
    tr_adamw_kernel<<<ds_cuda_blocks(n, TR_THREADS), TR_THREADS, 0, c->stream>>>(w, g, m, v, n, k);
    CU_CHECK_LAUNCH("tr_adamw_kernel");
    return DS_OK;
}

/* ---- data movement ---- */

static __global__ void tr_fill_kernel(float *x, size_t n, float v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) x[i] = v;
}
static int t_fill(void *ctx, float *x, size_t n, float v) {
    if (!n) return DS_OK;
    ENTER(ctx);
    if (v == 0.0f) v = 0.0f; /* −0 fills +0, as the CPU reference's memset does */
    tr_fill_kernel<<<ds_cuda_blocks(n, TR_THREADS), TR_THREADS, 0, c->stream>>>(x, n, v);
    CU_CHECK_LAUNCH("tr_fill_kernel");
    return DS_OK;
}

/* scatter = false: dst[i] = src[idx[i]]; true: dst[idx[i]] = src[i] (rows of d floats). */
static __global__ void tr_rows_kernel(const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d,
                                      bool scatter) {
    const size_t total = (size_t)n * d;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t i = e / d, k = e % d, r = (size_t)idx[i];
        if (scatter) dst[r * d + k] = src[e];
        else dst[e] = src[r * d + k];
    }
}
static int t_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d, bool scatter) {
    if (n < 0 || d < 0) return DS_EINVAL;
    if (!n || !d) return DS_OK;
    ENTER(ctx);
    const size_t total = (size_t)n * d;
    tr_rows_kernel<<<ds_cuda_blocks(total, TR_THREADS), TR_THREADS, 0, c->stream>>>(src, idx, dst, n, d, scatter);
    CU_CHECK_LAUNCH("tr_rows_kernel");
    return DS_OK;
}
static int t_gather_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d) {
    return t_rows(ctx, src, idx, dst, n, d, false);
}
static int t_scatter_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d) {
    return t_rows(ctx, src, idx, dst, n, d, true);
}

/* ---- bottleneck adapters (cpu_train_bn.c) ---- */

/* mode 0: hpre += down_b, tmp = act(hpre); 1: tmp = act(hpre); 2: dh *= act'(hpre). */
static __global__ void tb_elem_kernel(float *hpre_or_dh, const float *hpre, const float *bias, float *tmp, int32_t r,
                                      size_t total, int32_t act, int mode) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        if (mode == 0) {
            const float h = hpre_or_dh[e] + bias[e % r];
            hpre_or_dh[e] = h;
            tmp[e] = ds_act_f(act, h);
        } else if (mode == 1) {
            tmp[e] = ds_act_f(act, hpre[e]);
        } else {
            hpre_or_dh[e] *= ds_act_grad(act, hpre[e]);
        }
    }
}

/* out[i] += s·b[i] per row (mode 0, y += s·up_b), or out[i] += (float)(s·Σₜ m[t][i]) (mode 1,
 * column sums in double, one thread per column walking the rows). */
static __global__ void tb_cols_kernel(float *out, const float *m, int32_t n, int32_t w, float s, int mode) {
    if (mode == 0) {
        const size_t total = (size_t)n * w;
        for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
            out[e] += s * m[e % w];
        return;
    }
    const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= w) return;
    double acc = 0.0;
    for (int32_t t = 0; t < n; t++) acc += m[(size_t)t * w + i];
    out[i] += (float)(s * acc);
}

static int tb_check(const ds_train_bn_args *a) {
    if (!a || !a->down || !a->down_b || !a->up || !a->up_b || a->n < 0 || a->d <= 0 || a->size <= 0)
        return a && !ds_act_trainable(a->act) ? DS_EUNSUPPORTED : DS_EINVAL;
    return ds_act_trainable(a->act) ? DS_OK : DS_EUNSUPPORTED;
}

static int t_bn_fwd(void *ctx, const ds_train_bn_args *a, const float *z, float *hpre, float *tmp, float *y) {
    DS_TRY(tb_check(a));
    const int32_t n = a->n, d = a->d, r = a->size;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    const size_t nr = (size_t)n * r, nd = (size_t)n * d;
    DS_TRY(g_nt(c, z, a->down, hpre, n, r, d, 1.0f, 0.0f));
    tb_elem_kernel<<<ds_cuda_blocks(nr, TR_THREADS), TR_THREADS, 0, c->stream>>>(hpre, hpre, a->down_b, tmp, r, nr,
                                                                                 a->act, 0);
    CU_CHECK_LAUNCH("tb_elem_kernel");
    DS_TRY(g_nt(c, tmp, a->up, y, n, d, r, a->scale, 1.0f));
    tb_cols_kernel<<<ds_cuda_blocks(nd, TR_THREADS), TR_THREADS, 0, c->stream>>>(y, a->up_b, n, d, a->scale, 0);
    CU_CHECK_LAUNCH("tb_cols_kernel");
    return DS_OK;
}

static int t_bn_bwd(void *ctx, const ds_train_bn_args *a, const float *z, const float *hpre, const float *dy, float *dz,
                    float *ddown, float *ddown_b, float *dup, float *dup_b, float *tmp) {
    DS_TRY(tb_check(a));
    const int32_t n = a->n, d = a->d, r = a->size;
    if (n == 0) return DS_OK;
    ENTER(ctx);
    const size_t nr = (size_t)n * r;
    float *act = tmp, *dh = tmp + nr;
    tb_elem_kernel<<<ds_cuda_blocks(nr, TR_THREADS), TR_THREADS, 0, c->stream>>>(nullptr, hpre, nullptr, act, r, nr,
                                                                                 a->act, 1);
    CU_CHECK_LAUNCH("tb_elem_kernel");
    tb_cols_kernel<<<(unsigned)((d + TR_THREADS - 1) / TR_THREADS), TR_THREADS, 0, c->stream>>>(dup_b, dy, n, d,
                                                                                               a->scale, 1);
    CU_CHECK_LAUNCH("tb_cols_kernel");
    DS_TRY(g_tn(c, dy, act, dup, n, d, r, a->scale, 1.0f)); /* dup[d][r] += s·dyᵀ·act */
    DS_TRY(g_nn(c, dy, a->up, dh, n, d, r, a->scale, 0.0f)); /* dh[n][r] = s·dy·up */
    tb_elem_kernel<<<ds_cuda_blocks(nr, TR_THREADS), TR_THREADS, 0, c->stream>>>(dh, hpre, nullptr, nullptr, r, nr,
                                                                                 a->act, 2);
    CU_CHECK_LAUNCH("tb_elem_kernel");
    tb_cols_kernel<<<(unsigned)((r + TR_THREADS - 1) / TR_THREADS), TR_THREADS, 0, c->stream>>>(ddown_b, dh, n, r,
                                                                                               1.0f, 1);
    CU_CHECK_LAUNCH("tb_cols_kernel");
    DS_TRY(g_tn(c, dh, z, ddown, n, r, d, 1.0f, 1.0f));      /* ddown[r][d] += dhᵀ·z */
    return g_nn(c, dh, a->down, dz, n, r, d, 1.0f, 0.0f);    /* dz[n][d] = dh·down */
}

/* Designated initializers in declaration order, like cuda_iface in backend_cuda.cu: a mismatch
 * with include/ds/backend_train.h fails to compile instead of shifting slots. */
const struct ds_backend_train_iface ds_cuda_train_iface = {
    .version = DS_BACKEND_TRAIN_IFACE_VERSION,
    .mm_nt = t_mm_nt,
    .mm_nn = t_mm_nn,
    .mm_tn = t_mm_tn,
    .add_bias = t_add_bias,
    .rmsnorm_fwd = t_rmsnorm_fwd,
    .rmsnorm_bwd = t_rmsnorm_bwd,
    .rope = t_rope,
    .silu_mul_fwd = t_silu_mul_fwd,
    .silu_mul_bwd = t_silu_mul_bwd,
    .lora_fwd = t_lora_fwd,
    .lora_bwd = t_lora_bwd,
    .embed = t_embed,
    .embed_bwd_soft = t_embed_bwd_soft,
    .embed_lora_fwd = t_embed_lora_fwd,
    .embed_lora_bwd = t_embed_lora_bwd,
    .cross_entropy = t_cross_entropy,
    .attn_work_floats = ds_cuda_t_attn_work_floats,
    .attention_fwd = ds_cuda_t_attention_fwd,
    .attention_bwd = ds_cuda_t_attention_bwd,
    .sumsq = t_sumsq,
    .scale = t_scale,
    .adamw = t_adamw,
    .bn_fwd = t_bn_fwd,
    .bn_bwd = t_bn_bwd,
    .fill = t_fill,
    .gather_rows = t_gather_rows,
    .scatter_rows = t_scatter_rows,
};
