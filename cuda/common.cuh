/* deltaserve CUDA backend — what the .cu files share: status macros (a CUDA or cuBLASLt failure
 * returns DS_EDEVICE, never aborts), the backend context, its lazily grown
 * workspaces, the host→device metadata staging, and small device helpers.
 *
 * Nothing here is public: the only exported symbol of the library is ds_backend_cuda_create
 * (backend_cuda.cu). Functions named ds_cuda_* are the iface slots, one family per .cu file. */
#ifndef DS_CUDA_COMMON_CUH
#define DS_CUDA_COMMON_CUH

/* include/ds/common.h spells C11's _Noreturn, which C++ does not have. */
#if defined(__cplusplus) && !defined(_Noreturn)
#define _Noreturn [[noreturn]]
#define DS_CUDA_UNDEF_NORETURN
#endif
#include "ds/backend.h"
#ifdef DS_CUDA_UNDEF_NORETURN
#undef _Noreturn
#undef DS_CUDA_UNDEF_NORETURN
#endif

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

/* ---- status checking: log, clear the (non-sticky) last error, return DS_EDEVICE ---- */

/* Clearing matters: a failed cudaMalloc leaves cudaErrorMemoryAllocation as the "last error", and
 * the next launch check (cudaGetLastError) would otherwise blame an unrelated kernel. */
#define CU_TRY(call)                                                                               \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            (void)cudaGetLastError();                                                              \
            DS_LOGE("cuda: %s failed (%s:%d): %s", #call, __FILE__, __LINE__, cudaGetErrorString(e_)); \
            return DS_EDEVICE;                                                                     \
        }                                                                                          \
    } while (0)

/* After a <<<...>>> launch: configuration errors (and sticky faults of earlier kernels). */
#define CU_CHECK_LAUNCH(what)                                                                      \
    do {                                                                                           \
        cudaError_t e_ = cudaGetLastError();                                                       \
        if (e_ != cudaSuccess) {                                                                   \
            DS_LOGE("cuda: launch of %s failed (%s:%d): %s", (what), __FILE__, __LINE__,           \
                    cudaGetErrorString(e_));                                                       \
            return DS_EDEVICE;                                                                     \
        }                                                                                          \
    } while (0)

#define LT_TRY(call)                                                                               \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            (void)cudaGetLastError();                                                              \
            DS_LOGE("cublasLt: %s failed (%s:%d): %s", #call, __FILE__, __LINE__, cublasLtGetStatusString(s_)); \
            return DS_EDEVICE;                                                                     \
        }                                                                                          \
    } while (0)

/* Propagates a DS_* status. */
#define DS_TRY(expr)                                                                               \
    do {                                                                                           \
        int st_ = (expr);                                                                          \
        if (st_) return st_;                                                                       \
    } while (0)

/* ---- the backend context ---- */

/* A device buffer that only grows. Growth happens the first time a step needs more than any step
 * before it (cudaStreamSynchronize + cudaFree + cudaMalloc); after that warm-up the steady-state
 * step performs no allocation (docs/ARCHITECTURE.md, "The backend interface"). Initial sizes are set at create
 * for a typical batch (see backend_cuda.cu) so that most servers never grow at all. */
typedef struct ds_cuda_ws {
    void *ptr;
    size_t cap;
} ds_cuda_ws;

/* cuBLASLt algorithm cache entry, keyed by the full problem shape (gemm_cublaslt.cu). */
typedef struct ds_cuda_gemm_plan {
    int32_t n, rows, cols;
    uint32_t flags; /* dtype, bias, accumulate, output alignment: see plan_flags() */
    int state;      /* 0 empty, 1 cuBLASLt algo, 2 no algo: use the fallback kernel */
    cublasLtMatmulAlgo_t algo;
} ds_cuda_gemm_plan;

#define DS_CUDA_GEMM_PLANS 2048 /* power of two; open addressing, cleared when full */

typedef struct ds_cuda_ctx {
    int device;
    cudaStream_t stream;
    cublasLtHandle_t lt;

    /* Pinned host staging: host arrays (uploads, op metadata, weight conversion) are copied here
     * first so that cudaMemcpyAsync is truly asynchronous and the caller's array may be reused at
     * once. Bump-allocated; reset only when the stream is idle (synchronize, download, or when it
     * runs out, which synchronizes). */
    unsigned char *pin;
    size_t pin_cap, pin_off;

    /* Device mirror of per-call op metadata (set_rows lists; segment tables go through plan). One
     * buffer suffices: each op's metadata copy is stream-ordered after the previous op's kernels. */
    ds_cuda_ws meta;

    /* Error flag written by kernels that meet bad indices (embed ids out of range): mapped pinned
     * memory, read after the stream is synchronized; synchronize() reports it as DS_EINVAL. */
    int *err_flag_host, *err_flag_dev;

    /* GEMM: cuBLASLt workspace (fixed at create), x converted to bf16 (grows), algo cache. */
    void *lt_ws;
    size_t lt_ws_bytes;
    ds_cuda_ws xbf;
    ds_cuda_gemm_plan *plans;
    int32_t n_plans;

    /* SGMV: the shrink output of one call, packed per segment at its own rank (Σ len·rank floats). */
    ds_cuda_ws lora_tmp;

    /* The step's segment plan (ds_cuda_plan_upload, sgmv.cu), copied to the device once per step:
     * the packed LoRA table (plan_n_lora entries + a sentinel of totals) followed by the vec table.
     * plan_lora is the host mirror the launches read their sizes from (grows once, like a ws);
     * plan_vec is the caller's host vec table, borrowed until the next plan_upload. */
    ds_cuda_ws plan;
    struct sgmv_seg *plan_lora;
    size_t plan_lora_cap; /* entries */
    int32_t plan_n_lora, plan_n_vec;
    const ds_vec_seg *plan_vec;
    const ds_vec_seg *plan_vec_dev;
    /* The sparse-delta table: the caller's host table (its entries hold device CSR pointers),
     * borrowed until the next plan_upload; sparse.cu launches one kernel per entry. */
    const ds_sparse_seg *plan_sparse;
    int32_t plan_n_sparse;
    /* The bottleneck table likewise (host entries holding device weight pointers), and the
     * bottleneck op's per-row workspace (bottleneck.cu). */
    const ds_bn_seg *plan_bn;
    int32_t plan_n_bn;
    ds_cuda_ws bn_ws;
    /* The training ops' scratch (train_ops.cu, train_attn.cu): per-row doubles of the reductions. */
    ds_cuda_ws train_ws;
} ds_cuda_ctx;

/* Makes the context's device current for the calling thread (cudaSetDevice is per thread, and the
 * engine thread is usually not the one that created the backend). */
int ds_cuda_enter(ds_cuda_ctx *c);

/* Grows w to at least `bytes` (see ds_cuda_ws). Returns 0 or DS_EDEVICE. */
int ds_cuda_ws_reserve(ds_cuda_ctx *c, ds_cuda_ws *w, size_t bytes);

/* Copies `bytes` of host memory to the device through pinned staging, asynchronously on the
 * context's stream; `src` may be reused when this returns. */
int ds_cuda_h2d(ds_cuda_ctx *c, void *dst, const void *src, size_t bytes);

/* Returns a pinned staging area of `bytes` (≤ pin_cap) that the host may fill and then copy from
 * with cudaMemcpyAsync on the stream; synchronizes first when the staging ring is full. */
int ds_cuda_stage(ds_cuda_ctx *c, size_t bytes, void **out);

/* Per-op metadata in two steps, so that it is packed straight into pinned memory (no host malloc):
 * meta_alloc grows c->meta to `bytes` and returns a pinned area to fill; meta_push queues its copy
 * into c->meta and returns that device address. Nothing may be staged between the two calls. */
int ds_cuda_meta_alloc(ds_cuda_ctx *c, size_t bytes, void **host);
int ds_cuda_meta_push(ds_cuda_ctx *c, const void *host, size_t bytes, void **dev);

/* ---- iface slots, by file ---- */

/* gemm_cublaslt.cu */
int ds_cuda_gemm_init(ds_cuda_ctx *c);
void ds_cuda_gemm_free(ds_cuda_ctx *c);
int ds_cuda_mat_upload(void *ctx, const ds_weight *host, ds_mat *out);
void ds_cuda_mat_free(void *ctx, ds_mat *m);
int ds_cuda_matmul(void *ctx, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                   bool accumulate);

/* norm_rope.cu */
int ds_cuda_embed(void *ctx, const ds_mat *embd, const int32_t *ids, float *out, int32_t n);
int ds_cuda_rmsnorm(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t d, float eps);
int ds_cuda_rope(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                 int32_t head_dim);
int ds_cuda_silu_mul(void *ctx, const float *gate, const float *up, float *out, size_t n);
int ds_cuda_add(void *ctx, float *y, const float *x, size_t n);
int ds_cuda_scale(void *ctx, float *x, float s, size_t n);
int ds_cuda_gelu_tanh_mul(void *ctx, const float *gate, const float *up, float *out, size_t n);
int ds_cuda_get_rows(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d);
int ds_cuda_kv_store(void *ctx, float *k_cache, float *v_cache, const float *k, const float *v,
                     const int64_t *slot, int32_t n, int32_t row);
int ds_cuda_seg_scale(void *ctx, float *y, int32_t width, ds_seg_range r);
int ds_cuda_seg_add(void *ctx, float *y, int32_t width, ds_seg_range r);
int ds_cuda_set_rows(void *ctx, float *dst, int32_t width, const int32_t *rows, const float *const *src,
                     int32_t n);

/* attention.cu */
int ds_cuda_attention(void *ctx, const ds_attn_args *a);

/* sgmv.cu */
int ds_cuda_plan_upload(void *ctx, const ds_seg_tables *t);
int ds_cuda_lora(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r);

/* sparse.cu */
int ds_cuda_sparse(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r);

/* bottleneck.cu */
int ds_cuda_bottleneck(void *ctx, const float *x, float *o, int32_t d, ds_seg_range r);

/* ---- device helpers ---- */

#define DS_CUDA_WARP 32

static __device__ __forceinline__ float ds_warp_sum(float v) {
#pragma unroll
    for (int o = DS_CUDA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
 * `red` is __shared__ float[32]. Contains __syncthreads: call from uniform control flow. */
static __device__ __forceinline__ float ds_block_sum(float v, float *red) {
    const int lane = threadIdx.x % DS_CUDA_WARP, warp = threadIdx.x / DS_CUDA_WARP;
    const int n_warps = blockDim.x / DS_CUDA_WARP;
    v = ds_warp_sum(v);
    __syncthreads(); /* red may still be read from a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < n_warps ? red[lane] : 0.0f;
    return ds_warp_sum(v);
}

/* Maximum over the block, like ds_block_sum (`red` is __shared__ float[32]). */
static __device__ __forceinline__ float ds_block_max(float v, float *red) {
    const int lane = threadIdx.x % DS_CUDA_WARP, warp = threadIdx.x / DS_CUDA_WARP;
    const int n_warps = blockDim.x / DS_CUDA_WARP;
#pragma unroll
    for (int o = DS_CUDA_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < n_warps ? red[lane] : -INFINITY;
#pragma unroll
    for (int o = DS_CUDA_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block in double, like ds_block_sum (`red` is __shared__ double[32]); the order of
 * the additions is fixed by blockDim, so the result is deterministic. */
static __device__ __forceinline__ double ds_block_sum_d(double v, double *red) {
    const int lane = threadIdx.x % DS_CUDA_WARP, warp = threadIdx.x / DS_CUDA_WARP;
    const int n_warps = blockDim.x / DS_CUDA_WARP;
#pragma unroll
    for (int o = DS_CUDA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < n_warps ? red[lane] : 0.0;
#pragma unroll
    for (int o = DS_CUDA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* log Σ exp(x[j]) over j < n, max-shifted, the sum in double; every thread of the block calls it
 * and gets the result (training softmax: cross-entropy rows, attention scores). */
static __device__ __forceinline__ double ds_block_logsumexp(const float *x, int32_t n, float *redf, double *redd) {
    float mx = -INFINITY;
    for (int32_t j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = ds_block_max(mx, redf);
    double sum = 0.0;
    for (int32_t j = threadIdx.x; j < n; j += blockDim.x) sum += exp((double)x[j] - mx);
    sum = ds_block_sum_d(sum, redd);
    return mx + log(sum);
}

/* Grid size for a grid-stride loop over n elements with `threads` per block. */
static inline unsigned ds_cuda_blocks(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    if (b > 65535u * 16u) b = 65535u * 16u; /* grid-stride loops cover the rest */
    return b ? (unsigned)b : 1u;
}

#endif
