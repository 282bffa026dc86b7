/* Weights and GEMMs: y[n][rows] = x[n][cols] · Wᵀ (+ bias) (+ y) through cuBLASLt.
 *
 * Weights live on the device as bf16 (mat_upload converts with round-to-nearest-even, like
 * ds_f32_to_bf16). x is converted to bf16 in a workspace, the product accumulates in fp32
 * (CUBLAS_COMPUTE_32F) and y is written in fp32, so the only precision loss against the CPU's fp32
 * GEMM is the two bf16 roundings of the inputs (NMSE ~1e-5, tests/unit/test_backend_ops.c).
 *
 * Row-major → column-major: cuBLASLt sees W as a [cols × rows] column-major matrix (ld = cols),
 * x as [cols × n] and y as [rows × n] (ld = rows), so y = opT(W) · x — the "TN" layout that every
 * tensor-core kernel supports.
 *
 * Performance notes (for the GPU session):
 * - Decode (n ≤ ~64) is memory-bound on the bf16 weights: the ideal is weight-bytes / HBM
 *   bandwidth. If cuBLASLt's pick for small n falls short, a split-K GEMV kernel (or the
 *   heuristic's second or third result, timed once per shape) is the next step.
 * - The x → bf16 conversion is an extra pass over the activations; later fuse it into the
 *   producer (rmsnorm / silu_mul writing bf16 side by side).
 * - Heuristics are cached per exact (n, rows, cols, alignments): one query per new shape. */
#include "common.cuh"

#include <stdlib.h>
#include <string.h>

/* ---- weights ---- */

int ds_cuda_mat_upload(void *ctx, const ds_weight *host, ds_mat *out) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    const int32_t rows = host->rows, cols = host->cols;
    size_t count, bytes;
    if (!host->data || rows <= 0 || cols <= 0 || !ds_mul_ok((size_t)rows, (size_t)cols, &count) ||
        !ds_mul_ok(count, sizeof(__nv_bfloat16), &bytes) || !ds_dtype_supported((int)host->dtype))
        return DS_EINVAL;
    const size_t chunk_max = c->pin_cap / 2 / sizeof(uint16_t);
    if ((size_t)cols > chunk_max) return DS_EUNSUPPORTED;
    /* One row at a time: any dtype → fp32 row (host, cols floats) → bf16 into pinned half-ring
     * chunks of whole rows, so no whole-tensor (let alone whole-model) fp32 copy exists. */
    float *row = (float *)malloc((size_t)cols * sizeof(float));
    if (!row) return DS_ENOMEM;
    int st = ds_cuda_enter(c);
    void *d = NULL;
    if (!st && cudaMalloc(&d, bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        st = DS_EDEVICE;
    }
    const int32_t rows_per_chunk = (int32_t)(chunk_max / (size_t)cols);
    for (int32_t r0 = 0; !st && r0 < rows; r0 += rows_per_chunk) {
        const int32_t nr = rows - r0 < rows_per_chunk ? rows - r0 : rows_per_chunk;
        void *p;
        if ((st = ds_cuda_stage(c, (size_t)nr * cols * sizeof(uint16_t), &p))) break;
        uint16_t *h = (uint16_t *)p;
        for (int32_t i = 0; i < nr; i++) {
            ds_weight_row(host, r0 + i, row);
            for (int32_t j = 0; j < cols; j++) h[(size_t)i * cols + j] = ds_f32_to_bf16(row[j]);
        }
        cudaError_t e = cudaMemcpyAsync((uint16_t *)d + (size_t)r0 * cols, h, (size_t)nr * cols * sizeof(uint16_t),
                                        cudaMemcpyHostToDevice, c->stream);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            DS_LOGE("cuda: weight upload: %s", cudaGetErrorString(e));
            st = DS_EDEVICE;
        }
    }
    free(row);
    if (st) {
        if (d) cudaFree(d);
        return st;
    }
    out->data = d;
    out->rows = rows;
    out->cols = cols;
    out->dtype = DS_DTYPE_BF16;
    out->row_bytes = (size_t)cols * sizeof(uint16_t);
    out->borrowed = false;
    return DS_OK;
}

void ds_cuda_mat_free(void *ctx, ds_mat *m) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (m->data && !m->borrowed && ds_cuda_enter(c) == DS_OK) {
        (void)cudaStreamSynchronize(c->stream);
        if (cudaFree(m->data) != cudaSuccess) (void)cudaGetLastError();
    }
    m->data = NULL;
}

/* ---- kernels ---- */

static __global__ void f32_to_bf16_kernel(const float *__restrict__ x, __nv_bfloat16 *__restrict__ y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}

static __device__ __forceinline__ float load_w(const __nv_bfloat16 *w, size_t i) { return __bfloat162float(w[i]); }
static __device__ __forceinline__ float load_w(const float *w, size_t i) { return w[i]; }

/* Fallback when cuBLASLt has no algorithm for a shape (or fails): one warp per output element,
 * fp32 x and accumulation. Correct for every size and alignment; not fast. */
template <typename W>
static __global__ void gemm_fallback_kernel(const float *__restrict__ x, const W *__restrict__ w,
                                            const float *__restrict__ bias, float *__restrict__ y, int32_t n,
                                            int32_t rows, int32_t cols, int accumulate) {
    const int lane = threadIdx.x % DS_CUDA_WARP;
    const int32_t r = blockIdx.x * (blockDim.x / DS_CUDA_WARP) + threadIdx.x / DS_CUDA_WARP;
    if (r >= rows) return;
    const W *wr = w + (size_t)r * cols;
    for (int32_t t = blockIdx.y; t < n; t += gridDim.y) {
        const float *xr = x + (size_t)t * cols;
        float acc = 0.0f;
        for (int32_t k = lane; k < cols; k += DS_CUDA_WARP) acc += xr[k] * load_w(wr, k);
        acc = ds_warp_sum(acc);
        if (lane == 0) {
            float *yp = y + (size_t)t * rows + r;
            if (bias) acc += bias[r];
            *yp = accumulate ? *yp + acc : acc;
        }
    }
}

static __global__ void add_bias_kernel(float *__restrict__ y, const float *__restrict__ bias, int32_t rows, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % rows];
}

/* ---- the heuristic cache ---- */

enum { PLAN_EMPTY = 0, PLAN_LT = 1, PLAN_FALLBACK = 2, PLAN_LT_BIAS_APART = 3 };

int ds_cuda_gemm_init(ds_cuda_ctx *c) {
    c->plans = (ds_cuda_gemm_plan *)calloc(DS_CUDA_GEMM_PLANS, sizeof *c->plans);
    c->n_plans = 0;
    return c->plans ? DS_OK : DS_ENOMEM;
}

void ds_cuda_gemm_free(ds_cuda_ctx *c) {
    free(c->plans);
    c->plans = NULL;
}

/* log2 of a pointer's alignment, capped at 256 bytes (cuBLASLt's default requirement). */
static uint32_t align_log2(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t l = 0;
    while (l < 8 && !(a & ((uintptr_t)1 << l))) l++;
    return l;
}

/* Everything besides the shape that changes which algorithms are valid. */
static uint32_t plan_flags(ds_dtype dt, const void *w, const void *xb, const float *bias, const float *y) {
    return (uint32_t)dt | (bias ? 1u << 2 : 0u) | align_log2(w) << 4 | align_log2(xb) << 8 | align_log2(y) << 12 |
           (bias ? align_log2(bias) << 16 : 0u);
}

static ds_cuda_gemm_plan *plan_slot(ds_cuda_ctx *c, int32_t n, int32_t rows, int32_t cols, uint32_t flags) {
    uint64_t h = ((uint64_t)(uint32_t)n * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)(uint32_t)rows * 0xC2B2AE3D27D4EB4Full) ^
                 ((uint64_t)(uint32_t)cols * 0x165667B19E3779F9ull) ^ ((uint64_t)flags * 0xD6E8FEB86659FD93ull);
    h ^= h >> 29;
    for (int probe = 0; probe < 2; probe++) {
        for (uint32_t i = 0; i < 16; i++) {
            ds_cuda_gemm_plan *p = &c->plans[(h + i) & (DS_CUDA_GEMM_PLANS - 1)];
            if (p->state == PLAN_EMPTY) {
                p->n = n, p->rows = rows, p->cols = cols, p->flags = flags;
                c->n_plans++;
                return p;
            }
            if (p->n == n && p->rows == rows && p->cols == cols && p->flags == flags) return p;
        }
        /* Neighbourhood full: forget every plan (they are cheap to rebuild) and retry. */
        memset(c->plans, 0, DS_CUDA_GEMM_PLANS * sizeof *c->plans);
        c->n_plans = 0;
    }
    return NULL;
}

/* Stack-allocated descriptors: no host malloc per call (cublasLt*Init instead of *Create). */
typedef struct gemm_desc {
    cublasLtMatmulDescOpaque_t op;
    cublasLtMatrixLayoutOpaque_t a, b, cd;
} gemm_desc;

static int describe(gemm_desc *g, cudaDataType_t ab, int32_t n, int32_t rows, int32_t cols, const float *bias) {
    LT_TRY(cublasLtMatmulDescInit(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    LT_TRY(cublasLtMatmulDescSetAttribute(&g->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(cublasLtMatmulDescSetAttribute(&g->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (bias) {
        const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
        LT_TRY(cublasLtMatmulDescSetAttribute(&g->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep));
        LT_TRY(cublasLtMatmulDescSetAttribute(&g->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    LT_TRY(cublasLtMatrixLayoutInit(&g->a, ab, (uint64_t)cols, (uint64_t)rows, (int64_t)cols));
    LT_TRY(cublasLtMatrixLayoutInit(&g->b, ab, (uint64_t)cols, (uint64_t)n, (int64_t)cols));
    LT_TRY(cublasLtMatrixLayoutInit(&g->cd, CUDA_R_32F, (uint64_t)rows, (uint64_t)n, (int64_t)rows));
    return DS_OK;
}

/* Asks the heuristic for the best algorithm; returns 1 when one was found, 0 when none, <0 on error. */
static int find_algo(ds_cuda_ctx *c, gemm_desc *g, uint32_t flags, cublasLtMatmulAlgo_t *algo) {
    cublasLtMatmulPreferenceOpaque_t pref;
    LT_TRY(cublasLtMatmulPreferenceInit(&pref));
    const uint64_t ws = c->lt_ws_bytes;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const uint32_t al_a = 1u << ((flags >> 4) & 15), al_b = 1u << ((flags >> 8) & 15), al_cd = 1u << ((flags >> 12) & 15);
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_cd, sizeof al_cd));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_cd, sizeof al_cd));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(c->lt, &g->op, &g->a, &g->b, &g->cd, &g->cd, &pref, 1, &res, &found);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || found <= 0 || res.state != CUBLAS_STATUS_SUCCESS) return 0;
    LT_TRY(s);
    *algo = res.algo;
    return 1;
}

/* Fills a new plan: cuBLASLt with the bias epilogue, else cuBLASLt plus a bias kernel, else the
 * fallback kernel. */
static int make_plan(ds_cuda_ctx *c, ds_cuda_gemm_plan *p, cudaDataType_t ab, const float *bias) {
    gemm_desc g;
    DS_TRY(describe(&g, ab, p->n, p->rows, p->cols, bias));
    int r = find_algo(c, &g, p->flags, &p->algo);
    if (r < 0) return r;
    if (r) {
        p->state = PLAN_LT;
        return DS_OK;
    }
    if (bias) {
        DS_TRY(describe(&g, ab, p->n, p->rows, p->cols, NULL));
        if ((r = find_algo(c, &g, p->flags, &p->algo)) < 0) return r;
        if (r) {
            p->state = PLAN_LT_BIAS_APART;
            return DS_OK;
        }
    }
    DS_LOGW("cuda: no cuBLASLt algorithm for n=%d rows=%d cols=%d; using the fallback GEMM kernel", p->n, p->rows,
            p->cols);
    p->state = PLAN_FALLBACK;
    return DS_OK;
}

static int run_fallback(ds_cuda_ctx *c, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                        bool accumulate) {
    const int warps = 8;
    dim3 grid((unsigned)((w->rows + warps - 1) / warps), (unsigned)(n < 65535 ? n : 65535));
    if (w->dtype == DS_DTYPE_BF16)
        gemm_fallback_kernel<__nv_bfloat16><<<grid, warps * DS_CUDA_WARP, 0, c->stream>>>(
            x, (const __nv_bfloat16 *)w->data, bias, y, n, w->rows, w->cols, accumulate);
    else
        gemm_fallback_kernel<float><<<grid, warps * DS_CUDA_WARP, 0, c->stream>>>(x, (const float *)w->data, bias, y, n,
                                                                                  w->rows, w->cols, accumulate);
    CU_CHECK_LAUNCH("gemm_fallback_kernel");
    return DS_OK;
}

int ds_cuda_matmul(void *ctx, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                   bool accumulate) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (n < 0 || w->rows <= 0 || w->cols <= 0) return DS_EINVAL;
    if (n == 0) return DS_OK;
    if (w->dtype != DS_DTYPE_BF16 && w->dtype != DS_DTYPE_F32) return DS_EUNSUPPORTED;
    DS_TRY(ds_cuda_enter(c));

    /* Only the x conversion and the plan depend on the dtype; F32 weights (not made by
     * mat_upload, but allowed) run as a plain fp32 SGEMM. */
    const void *xb = x;
    cudaDataType_t ab = CUDA_R_32F;
    if (w->dtype == DS_DTYPE_BF16) {
        const size_t count = (size_t)n * (size_t)w->cols;
        DS_TRY(ds_cuda_ws_reserve(c, &c->xbf, count * sizeof(__nv_bfloat16)));
        f32_to_bf16_kernel<<<ds_cuda_blocks(count, 256), 256, 0, c->stream>>>(x, (__nv_bfloat16 *)c->xbf.ptr, count);
        CU_CHECK_LAUNCH("f32_to_bf16_kernel");
        xb = c->xbf.ptr;
        ab = CUDA_R_16BF;
    }

    ds_cuda_gemm_plan *p = plan_slot(c, n, w->rows, w->cols, plan_flags(w->dtype, w->data, xb, bias, y));
    if (!p) return DS_EDEVICE; /* unreachable: a cleared table always has room */
    if (p->state == PLAN_EMPTY) DS_TRY(make_plan(c, p, ab, bias));
    if (p->state == PLAN_FALLBACK) return run_fallback(c, x, w, bias, y, n, accumulate);

    const bool bias_apart = bias && p->state == PLAN_LT_BIAS_APART;
    gemm_desc g;
    DS_TRY(describe(&g, ab, n, w->rows, w->cols, bias_apart ? NULL : bias));
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    cublasStatus_t s = cublasLtMatmul(c->lt, &g.op, &alpha, w->data, &g.a, xb, &g.b, &beta, y, &g.cd, y, &g.cd,
                                      &p->algo, c->lt_ws, c->lt_ws_bytes, c->stream);
    if (s != CUBLAS_STATUS_SUCCESS) {
        /* Not a device fault (those surface as CUDA errors): the algorithm refused this call.
         * Remember that, and let the fallback produce the result. */
        (void)cudaGetLastError();
        DS_LOGW("cuda: cublasLtMatmul(n=%d rows=%d cols=%d): %s; using the fallback GEMM kernel", n, w->rows, w->cols,
                cublasLtGetStatusString(s));
        p->state = PLAN_FALLBACK;
        return run_fallback(c, x, w, bias, y, n, accumulate);
    }
    if (bias_apart) {
        const size_t total = (size_t)n * (size_t)w->rows;
        add_bias_kernel<<<ds_cuda_blocks(total, 256), 256, 0, c->stream>>>(y, bias, w->rows, total);
        CU_CHECK_LAUNCH("add_bias_kernel");
    }
    return DS_OK;
}
