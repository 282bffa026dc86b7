/* Segmented sparse deltas (deltaserve delta adapters): y[t] += x[t] · δᵀ with δ in CSR, per
 * segment of the step's planned sparse table (ds_sparse_seg, include/ds/backend.h).
 *
 * One warp per (row, token): the lanes stride over the row's entries, gather x at their columns and
 * reduce with shuffles; grid.x covers rows (8 warps per block), grid.y the segment's tokens. A 1%
 * delta has a handful of entries per row, so the kernel is bound by the gathers of x, which stay in
 * L1/L2 for the segment's tokens. Summation order differs from the CPU's sequential loop: results
 * agree to fp32 rounding (test_backend_ops' fp32 tolerance). One launch per segment: the sizes come
 * from the caller's host table, borrowed until the next plan_upload (sgmv.cu). */
#include "common.cuh"

#define SPARSE_WARPS 8

static __global__ void sparse_kernel(const float *__restrict__ x, int32_t in, float *__restrict__ y, int32_t out,
                                     int32_t start, int32_t len, const int32_t *__restrict__ row_ptr,
                                     const int32_t *__restrict__ col, const float *__restrict__ val) {
    const int32_t lane = threadIdx.x % DS_CUDA_WARP;
    const int32_t row = blockIdx.x * SPARSE_WARPS + threadIdx.x / DS_CUDA_WARP;
    if (row >= out) return; /* whole warps leave together: no block-wide barrier follows */
    const int32_t b = row_ptr[row], e = row_ptr[row + 1];
    if (b == e) return;
    for (int32_t t = start + (int32_t)blockIdx.y; t < start + len; t += gridDim.y) {
        const float *xr = x + (size_t)t * in;
        float acc = 0.0f;
        for (int32_t k = b + lane; k < e; k += DS_CUDA_WARP) acc += val[k] * xr[col[k]];
        acc = ds_warp_sum(acc);
        if (lane == 0) y[(size_t)t * out + row] += acc;
    }
}

int ds_cuda_sparse(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (r.first < 0 || r.n < 0 || r.first > c->plan_n_sparse - r.n) return DS_EINVAL;
    if (r.n == 0) return DS_OK;
    for (int32_t i = r.first; i < r.first + r.n; i++) {
        const ds_sparse_seg *g = &c->plan_sparse[i];
        if (g->rows != out || g->cols != in || g->start < 0 || g->len < 0) return DS_EINVAL;
    }
    DS_TRY(ds_cuda_enter(c));
    for (int32_t i = r.first; i < r.first + r.n; i++) {
        const ds_sparse_seg *g = &c->plan_sparse[i];
        if (g->len == 0 || g->nnz == 0) continue;
        dim3 grid((unsigned)((out + SPARSE_WARPS - 1) / SPARSE_WARPS), (unsigned)(g->len < 1024 ? g->len : 1024));
        sparse_kernel<<<grid, SPARSE_WARPS * DS_CUDA_WARP, 0, c->stream>>>(x, in, y, out, g->start, g->len,
                                                                           g->row_ptr, g->col, g->val);
        CU_CHECK_LAUNCH("sparse_kernel");
    }
    return DS_OK;
}
