/* The CUDA backend: the ds_backend_iface table, device memory, staging, create/free.
 *
 * Everything runs on one non-blocking stream owned by the backend, so ops are ordered without
 * events and the host only waits in download() and synchronize(). Memory is cudaMalloc'd; weights
 * are bf16 copies (gemm_cublaslt.cu); activations and the KV cache are fp32 like the CPU backend.
 *
 * Not verified on a GPU yet: this file compiles in CI (nvcc, no device); see cuda/CMakeLists.txt. */
#include "common.cuh"
#include "train_ops.cuh"

#include <stdlib.h>
#include <string.h>

#ifndef DS_CUDA_ARCHS
#define DS_CUDA_ARCHS "?"
#endif

/* Initial workspace sizes: a batch of 512 tokens with GEMM inputs ≤ 8192 wide and LoRA ranks
 * ≤ 512 never grows them. Larger steps grow them once, the first time they occur
 * (ds_cuda_ws_reserve); after that the steady state is allocation-free again. */
enum {
    PIN_BYTES = 16 << 20,       /* pinned staging ring */
    META_BYTES = 64 << 10,      /* device copy of per-op metadata */
    XBF_BYTES = 8 << 20,        /* 512 × 8192 bf16 activations */
    LORA_TMP_BYTES = 1 << 20,   /* Σ len·rank ≤ 262144 floats */
    LT_WS_BYTES = 32 << 20,     /* cuBLASLt workspace: NVIDIA's recommendation for Hopper */
};

int ds_cuda_enter(ds_cuda_ctx *c) {
    CU_TRY(cudaSetDevice(c->device));
    return DS_OK;
}

int ds_cuda_ws_reserve(ds_cuda_ctx *c, ds_cuda_ws *w, size_t bytes) {
    if (bytes <= w->cap) return DS_OK;
    size_t cap = w->cap ? w->cap : 4096;
    while (cap < bytes) cap *= 2;
    DS_LOGD("cuda: growing a workspace from %zu to %zu bytes", w->cap, cap);
    /* In-flight kernels may still read the old buffer. */
    CU_TRY(cudaStreamSynchronize(c->stream));
    c->pin_off = 0;
    if (w->ptr) cudaFree(w->ptr);
    w->ptr = NULL;
    w->cap = 0;
    CU_TRY(cudaMalloc(&w->ptr, cap));
    w->cap = cap;
    return DS_OK;
}

int ds_cuda_stage(ds_cuda_ctx *c, size_t bytes, void **out) {
    if (bytes > c->pin_cap) return DS_EINVAL;
    size_t off = (c->pin_off + 63) & ~(size_t)63;
    if (off + bytes > c->pin_cap) {
        /* Ring full: wait until every queued copy has read its staging area. */
        CU_TRY(cudaStreamSynchronize(c->stream));
        off = 0;
    }
    *out = c->pin + off;
    c->pin_off = off + bytes;
    return DS_OK;
}

int ds_cuda_h2d(ds_cuda_ctx *c, void *dst, const void *src, size_t bytes) {
    /* Half-ring chunks: the host fills one while the copy engine drains the other. */
    const size_t chunk_max = c->pin_cap / 2;
    for (size_t done = 0; done < bytes;) {
        const size_t chunk = bytes - done < chunk_max ? bytes - done : chunk_max;
        void *p;
        DS_TRY(ds_cuda_stage(c, chunk, &p));
        memcpy(p, (const unsigned char *)src + done, chunk);
        CU_TRY(cudaMemcpyAsync((unsigned char *)dst + done, p, chunk, cudaMemcpyHostToDevice, c->stream));
        done += chunk;
    }
    return DS_OK;
}

int ds_cuda_meta_alloc(ds_cuda_ctx *c, size_t bytes, void **host) {
    if (bytes == 0) bytes = 1;
    DS_TRY(ds_cuda_ws_reserve(c, &c->meta, bytes)); /* first: growing resets the staging ring */
    return ds_cuda_stage(c, bytes, host);
}

int ds_cuda_meta_push(ds_cuda_ctx *c, const void *host, size_t bytes, void **dev) {
    if (bytes) CU_TRY(cudaMemcpyAsync(c->meta.ptr, host, bytes, cudaMemcpyHostToDevice, c->stream));
    *dev = c->meta.ptr;
    return DS_OK;
}

/* ---- iface: memory ---- */

static void *cu_alloc(void *ctx, size_t bytes) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (ds_cuda_enter(c)) return NULL;
    if (bytes == 0) bytes = 1;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* OOM is not sticky; do not let it fail the next launch check */
        DS_LOGW("cuda: cudaMalloc(%zu) failed: %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    /* Zeroed on the stream, so later stream work sees zeros without a host wait. */
    if (cudaMemsetAsync(p, 0, bytes, c->stream) != cudaSuccess) {
        (void)cudaGetLastError();
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cu_release(void *ctx, void *ptr) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!ptr || ds_cuda_enter(c)) return;
    (void)cudaStreamSynchronize(c->stream); /* queued kernels may still use it */
    if (cudaFree(ptr) != cudaSuccess) (void)cudaGetLastError();
}

static int cu_upload(void *ctx, void *dst, const void *src, size_t bytes) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!bytes) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    return ds_cuda_h2d(c, dst, src, bytes);
}

/* Blocking, like the CPU backend: dst holds the data when this returns. */
static int cu_download(void *ctx, void *dst, const void *src, size_t bytes) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!bytes) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    for (size_t done = 0; done < bytes;) {
        const size_t chunk = bytes - done < c->pin_cap ? bytes - done : c->pin_cap;
        CU_TRY(cudaMemcpyAsync(c->pin, (const unsigned char *)src + done, chunk, cudaMemcpyDeviceToHost, c->stream));
        CU_TRY(cudaStreamSynchronize(c->stream));
        c->pin_off = 0; /* the stream is idle: the whole ring is free again */
        memcpy((unsigned char *)dst + done, c->pin, chunk);
        done += chunk;
    }
    return DS_OK;
}

static int cu_synchronize(void *ctx) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    DS_TRY(ds_cuda_enter(c));
    CU_TRY(cudaStreamSynchronize(c->stream));
    c->pin_off = 0;
    if (*(volatile int *)c->err_flag_host) {
        *(volatile int *)c->err_flag_host = 0;
        DS_LOGE("cuda: a kernel met an out-of-range index (token id) since the last synchronize");
        return DS_EINVAL;
    }
    return DS_OK;
}

static int cu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (!bytes) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->stream));
    return DS_OK;
}

/* ---- create / free ---- */

static void ctx_destroy(ds_cuda_ctx *c) {
    if (!c) return;
    if (cudaSetDevice(c->device) == cudaSuccess) {
        if (c->stream) (void)cudaStreamSynchronize(c->stream);
        ds_cuda_gemm_free(c);
        if (c->lt) cublasLtDestroy(c->lt);
        cudaFree(c->lt_ws);
        cudaFree(c->xbf.ptr);
        cudaFree(c->meta.ptr);
        cudaFree(c->lora_tmp.ptr);
        cudaFree(c->bn_ws.ptr);
        cudaFree(c->train_ws.ptr);
        cudaFree(c->plan.ptr);
        if (c->pin) cudaFreeHost(c->pin);
        if (c->err_flag_host) cudaFreeHost(c->err_flag_host);
        if (c->stream) cudaStreamDestroy(c->stream);
        (void)cudaGetLastError();
    }
    free(c->plan_lora);
    free(c);
}

static void cu_free(void *ctx) { ctx_destroy((ds_cuda_ctx *)ctx); }

/* A trivial kernel launched at create: fails with "no kernel image" when the device's
 * architecture is not among those compiled (CMAKE_CUDA_ARCHITECTURES), so that this shows up as
 * a clear create error rather than a failure in the middle of the first forward pass. */
static __global__ void probe_kernel(int *flag) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *flag = 0;
}

/* Creates everything but the iface; returns 0 or a DS_* status with err set. */
static int ctx_init(ds_cuda_ctx *c, const ds_backend_params *params, ds_err *err) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return ds_err_set(err, DS_EDEVICE, "cuda: no usable CUDA device (%s)", cudaGetErrorString(e));
    }
    if (count <= 0) return ds_err_set(err, DS_EDEVICE, "cuda: no CUDA device present");
    c->device = params->device;
    if (c->device < 0 || c->device >= count)
        return ds_err_set(err, DS_EINVAL, "cuda: device %d does not exist (%d present)", c->device, count);
    cudaDeviceProp prop;
    if ((e = cudaSetDevice(c->device)) != cudaSuccess || (e = cudaGetDeviceProperties(&prop, c->device)) != cudaSuccess)
        return ds_err_set(err, DS_EDEVICE, "cuda: device %d: %s", c->device, cudaGetErrorString(e));
    if (prop.major < 8)
        return ds_err_set(err, DS_EUNSUPPORTED, "cuda: %s is sm_%d%d; bf16 weights need sm_80 or newer", prop.name,
                          prop.major, prop.minor);
#define INIT_TRY(call, what)                                                                       \
    do {                                                                                           \
        if ((e = (call)) != cudaSuccess) {                                                         \
            (void)cudaGetLastError();                                                              \
            return ds_err_set(err, DS_EDEVICE, "cuda: %s: %s", (what), cudaGetErrorString(e));     \
        }                                                                                          \
    } while (0)
    INIT_TRY(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "stream");
    INIT_TRY(cudaHostAlloc((void **)&c->pin, PIN_BYTES, cudaHostAllocDefault), "pinned staging");
    c->pin_cap = PIN_BYTES;
    INIT_TRY(cudaHostAlloc((void **)&c->err_flag_host, sizeof(int), cudaHostAllocMapped), "error flag");
    *c->err_flag_host = 0;
    INIT_TRY(cudaHostGetDevicePointer((void **)&c->err_flag_dev, c->err_flag_host, 0), "error flag mapping");
    INIT_TRY(cudaMalloc(&c->meta.ptr, META_BYTES), "metadata workspace");
    c->meta.cap = META_BYTES;
    INIT_TRY(cudaMalloc(&c->xbf.ptr, XBF_BYTES), "GEMM input workspace");
    c->xbf.cap = XBF_BYTES;
    INIT_TRY(cudaMalloc(&c->lora_tmp.ptr, LORA_TMP_BYTES), "LoRA workspace");
    c->lora_tmp.cap = LORA_TMP_BYTES;
    INIT_TRY(cudaMalloc(&c->lt_ws, LT_WS_BYTES), "cuBLASLt workspace");
    c->lt_ws_bytes = LT_WS_BYTES;
    probe_kernel<<<1, 1, 0, c->stream>>>(c->err_flag_dev);
    if ((e = cudaGetLastError()) == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return ds_err_set(err, DS_EUNSUPPORTED, "cuda: %s (sm_%d%d) cannot run this build's kernels (built for %s): %s",
                          prop.name, prop.major, prop.minor, DS_CUDA_ARCHS, cudaGetErrorString(e));
    }
#undef INIT_TRY
    cublasStatus_t s = cublasLtCreate(&c->lt);
    if (s != CUBLAS_STATUS_SUCCESS)
        return ds_err_set(err, DS_EDEVICE, "cuda: cublasLtCreate: %s", cublasLtGetStatusString(s));
    if (ds_cuda_gemm_init(c)) return ds_err_set(err, DS_ENOMEM, "cuda: out of host memory");
    DS_LOGI("cuda: device %d: %s (sm_%d%d, %.1f GiB)", c->device, prop.name, prop.major, prop.minor,
            (double)prop.totalGlobalMem / (1 << 30));
    return DS_OK;
}

/* Designated initializers in declaration order (C++20; accepted by nvcc and GCC in C++17 mode):
 * a mismatch with backend.h fails to compile instead of shifting slots. */
static const struct ds_backend_iface cuda_iface = {
    .version = DS_BACKEND_IFACE_VERSION,
    .name = "cuda",
    .free = cu_free,
    .alloc = cu_alloc,
    .release = cu_release,
    .upload = cu_upload,
    .download = cu_download,
    .synchronize = cu_synchronize,
    .mat_upload = ds_cuda_mat_upload,
    .mat_free = ds_cuda_mat_free,
    .matmul = ds_cuda_matmul,
    .matmul_t = ds_cuda_matmul_t, /* train_ops.cu: compiled, not yet run on a GPU */
    .embed = ds_cuda_embed,
    .rmsnorm = ds_cuda_rmsnorm,
    .rope = ds_cuda_rope,
    .silu_mul = ds_cuda_silu_mul,
    .add = ds_cuda_add,
    .get_rows = ds_cuda_get_rows,
    .kv_store = ds_cuda_kv_store,
    .attention = ds_cuda_attention,
    .plan_upload = ds_cuda_plan_upload,
    .lora = ds_cuda_lora,
    .seg_scale = ds_cuda_seg_scale,
    .seg_add = ds_cuda_seg_add,
    .set_rows = ds_cuda_set_rows,
    .copy = cu_copy,
    .lora_expand = nullptr, /* embedding LoRA: not on CUDA yet (DS_EUNSUPPORTED) */
    .train = &ds_cuda_train_iface, /* train_ops.cu, train_attn.cu: compiled, not yet run on a GPU */
    .bottleneck = ds_cuda_bottleneck, /* bottleneck.cu: compiled, not yet run on a GPU */
    .scale = ds_cuda_scale,
    .gelu_tanh_mul = ds_cuda_gelu_tanh_mul,
    .sparse = ds_cuda_sparse,
};

extern "C" ds_backend *ds_backend_cuda_create(const ds_backend_params *params, ds_err *err) {
    ds_backend_params def = {0, 0, false}; /* ds_backend_default_params, which lives outside this module */
    if (!params) params = &def;
    ds_backend *b = (ds_backend *)calloc(1, sizeof *b);
    ds_cuda_ctx *c = (ds_cuda_ctx *)calloc(1, sizeof *c);
    if (!b || !c) {
        free(b);
        free(c);
        ds_err_set(err, DS_ENOMEM, "cuda backend: out of memory");
        return NULL;
    }
    c->device = params->device;
    if (ctx_init(c, params, err) != DS_OK) {
        ctx_destroy(c);
        free(b);
        return NULL;
    }
    b->iface = &cuda_iface;
    b->ctx = c;
    return b;
}
