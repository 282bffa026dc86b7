/* Segmented bottleneck adapters (AdapterHub): per segment of the step's planned bn table
 * (ds_bn_seg, include/ds/backend.h, which spells out the math), shrink → activation → expand at
 * the adapter's own width, with its residual placement, rewriting o ← x' − x. The CPU reference is
 * src/backend/cpu/cpu_bottleneck.c.
 *
 * One block per token row: the block builds the adapter input a (o, o + x or x) and, with
 * ln_before, its LayerNorm z in the workspace; each warp computes bottleneck units
 * h_j = act(down_j · z + down_b_j) into shared memory; each thread then expands outputs
 * u_i = s_i·(up_i · h + up_b_i) and the block applies ln_after and the placement. LayerNorms use
 * torch's biased variance and eps 1e-5 (two-pass mean / variance, block reductions). Summation
 * orders differ from OpenBLAS's: results agree to fp32 rounding, not bit for bit.
 *
 * Not yet run on a GPU (none was lent to the session that wrote it): compiled in the normal
 * build; test_backend_ops does not cover the op yet.
 *
 * Performance notes: a row reads the whole adapter (2·size·d weights) once per token, from L2 for
 * the segment's later rows; decode batches of distinct adapters are bound by that traffic. A
 * tiled GEMM over each segment's rows (as sgmv.cu does for LoRA) would reuse the weights across
 * tokens for prefill. One launch per segment; sizes come from the caller's host table, borrowed
 * until the next plan_upload (sgmv.cu). */
#include "common.cuh"
#include "backend/act_math.h" /* ds_act_f, shared with the host */

#define BN_THREADS 256


/* v ← LayerNorm(v)·w + b over d, in place; the whole block calls it. */
static __device__ void bn_layer_norm(float *v, const float *__restrict__ w, const float *__restrict__ b, int32_t d,
                                     float *red) {
    float s = 0.0f;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) s += v[i];
    const float mean = ds_block_sum(s, red) / (float)d;
    float q = 0.0f;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) q += (v[i] - mean) * (v[i] - mean);
    const float r = rsqrtf(ds_block_sum(q, red) / (float)d + 1e-5f);
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) v[i] = (v[i] - mean) * r * w[i] + b[i];
    __syncthreads();
}

/* Block t of the segment: row g.start + t. ws holds two [len][d] areas (a, then z / u). */
static __global__ void bn_kernel(ds_bn_seg g, const float *__restrict__ x, float *__restrict__ o, int32_t d,
                                 float *__restrict__ ws) {
    extern __shared__ float h[]; /* [size] */
    __shared__ float red[32];
    const int32_t t = blockIdx.x, row = g.start + t;
    const float *xr = x + (size_t)row * d;
    float *orow = o + (size_t)row * d, *a = ws + (size_t)t * d, *z = ws + ((size_t)gridDim.x + t) * d;
    const bool par = g.flags & DS_BN_PARALLEL, add_x = g.flags & DS_BN_ADD_X;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x)
        a[i] = par ? xr[i] : (g.flags & DS_BN_IN_PLUS_X) ? orow[i] + xr[i] : orow[i];
    __syncthreads();
    const float *zin = a;
    if (g.ln_b_w) {
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) z[i] = a[i];
        __syncthreads();
        bn_layer_norm(z, g.ln_b_w, g.ln_b_b, d, red);
        zin = z;
    }
    const int32_t lane = threadIdx.x % DS_CUDA_WARP, warp = threadIdx.x / DS_CUDA_WARP;
    for (int32_t j = warp; j < g.size; j += blockDim.x / DS_CUDA_WARP) {
        const float *dw = g.down + (size_t)j * d;
        float acc = 0.0f;
        for (int32_t i = lane; i < d; i += DS_CUDA_WARP) acc += dw[i] * zin[i];
        acc = ds_warp_sum(acc);
        if (lane == 0) h[j] = ds_act_f(g.act, acc + g.down_b[j]);
    }
    __syncthreads(); /* h complete; z (LNb output) is consumed: u goes there */
    float *u = z;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float *uw = g.up + (size_t)i * g.size;
        float acc = 0.0f;
        for (int32_t j = 0; j < g.size; j++) acc += uw[j] * h[j];
        u[i] = (acc + g.up_b[i]) * (g.scale_vec ? g.scale_vec[i] : g.scale);
    }
    __syncthreads();
    if (par) {
        if (g.ln_a_w) bn_layer_norm(u, g.ln_a_w, g.ln_a_b, d, red);
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) orow[i] += u[i] - (add_x ? 0.0f : xr[i]);
        return;
    }
    const bool res_in = g.flags & DS_BN_RES_INPUT;
    if (g.flags & DS_BN_RES_BEFORE_LN) {
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) u[i] += res_in ? a[i] : orow[i];
        __syncthreads();
        if (g.ln_a_w) bn_layer_norm(u, g.ln_a_w, g.ln_a_b, d, red);
    } else {
        if (g.ln_a_w) bn_layer_norm(u, g.ln_a_w, g.ln_a_b, d, red);
        for (int32_t i = threadIdx.x; i < d; i += blockDim.x) u[i] += res_in ? a[i] : orow[i];
    }
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) orow[i] = u[i] - (add_x ? 0.0f : xr[i]);
}

int ds_cuda_bottleneck(void *ctx, const float *x, float *o, int32_t d, ds_seg_range r) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (d <= 0 || r.first < 0 || r.n < 0 || r.first > c->plan_n_bn - r.n) return DS_EINVAL;
    size_t max_len = 0;
    for (int32_t i = r.first; i < r.first + r.n; i++) {
        const ds_bn_seg *g = &c->plan_bn[i];
        if (g->start < 0 || g->len < 0 || g->size <= 0 || !g->down || !g->up || !g->down_b || !g->up_b)
            return DS_EINVAL;
        if ((size_t)g->size * sizeof(float) > 48u * 1024u) return DS_EUNSUPPORTED; /* h lives in shared memory */
        if ((size_t)g->len > max_len) max_len = (size_t)g->len;
    }
    if (r.n == 0 || max_len == 0) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    DS_TRY(ds_cuda_ws_reserve(c, &c->bn_ws, 2 * max_len * (size_t)d * sizeof(float)));
    for (int32_t i = r.first; i < r.first + r.n; i++) {
        const ds_bn_seg *g = &c->plan_bn[i];
        if (g->len == 0) continue;
        bn_kernel<<<(unsigned)g->len, BN_THREADS, (size_t)g->size * sizeof(float), c->stream>>>(
            *g, x, o, d, (float *)c->bn_ws.ptr);
        CU_CHECK_LAUNCH("bn_kernel");
    }
    return DS_OK;
}
