/* Segmented LoRA (Punica's SGMV: Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"):
 *   tmp[t][r] = Σ_k x[t][k] · A[r][k]            (shrink, per segment at its own rank)
 *   y[t][o]  += scale · Σ_r tmp[t][r] · B[o][r]    (expand)
 * for t in each segment [start, start+len). Segments must not overlap (the engine groups tokens
 * by adapter, so they never do); tokens outside every segment are untouched.
 *
 * One shrink launch and one expand launch per call, whatever the number of segments. The host
 * cuts every segment into tiles and packs, per segment, its pointers, rank, scale, the offset of
 * its packed tmp rows (Σ len·rank: no padding to a maximum rank) and the index of its first tile.
 * Block b finds its segment by binary search over those first-tile indices, so a 300-token
 * segment gets many blocks and a 1-token segment one, with no grid-wide synchronisation and no
 * atomics (each output element has exactly one writer: results are deterministic).
 *
 * Performance notes (for the GPU session):
 * - Decode shrink is memory-bound on A (rank × in); with few segments there are few blocks
 *   (ceil(rank/8) per segment). Split-K across blocks (with a second reduction pass, or atomics
 *   if determinism is given up) raises parallelism; Punica uses split-K for shrink.
 * - SHRINK_TOK = 16 wastes FMAs on 1-token (decode) segments; a 1-/4-/16-token template choice
 *   by the segment's length would fix that.
 * - A and B are fp32 (ds_lora_seg); bf16 adapter weights would halve the traffic. */
#include "common.cuh"

#include <string.h>

#define SGMV_THREADS 256
#define SGMV_WARPS (SGMV_THREADS / DS_CUDA_WARP)
#define SHRINK_TOK 16  /* tokens per shrink tile */
#define SHRINK_K 128   /* x columns staged in shared memory at a time */
#define EXPAND_TOK 8   /* tokens per expand tile */
#define EXPAND_OUT SGMV_THREADS /* outputs per expand tile: one per thread */
#define EXPAND_R 16    /* ranks staged in shared memory at a time */

/* One segment as the kernels see it (packed on the host, copied per call). */
typedef struct sgmv_seg {
    const float *A;    /* [rank][in] */
    const float *B;    /* [out][rank] */
    int64_t tmp_off;   /* first float of this segment's [len][rank] block of tmp */
    int32_t start, len, rank;
    float scale;
    int32_t shrink_first, expand_first; /* index of the segment's first tile in each launch */
} sgmv_seg;

/* The segment owning tile b: the last one whose first tile is ≤ b (segments without tiles are
 * never packed, so first-tile indices are strictly increasing). */
template <bool SHRINK>
static __device__ __forceinline__ int32_t find_seg(const sgmv_seg *segs, int32_t n_segs, int32_t b) {
    int32_t lo = 0, hi = n_segs - 1;
    while (lo < hi) {
        const int32_t mid = (lo + hi + 1) / 2;
        const int32_t first = SHRINK ? segs[mid].shrink_first : segs[mid].expand_first;
        if (first <= b)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* Tile = (SHRINK_TOK tokens) × (SGMV_WARPS ranks): warp w computes rank r = group·8 + w for every
 * token of the tile; lanes split k, and x is staged through shared memory so that each A row is
 * read once per tile. */
static __global__ void __launch_bounds__(SGMV_THREADS)
sgmv_shrink_kernel(const float *__restrict__ x, int32_t in, float *__restrict__ tmp, const sgmv_seg *__restrict__ segs,
                   int32_t n_segs) {
    __shared__ float xs[SHRINK_TOK][SHRINK_K];
    const int lane = threadIdx.x % DS_CUDA_WARP, warp = threadIdx.x / DS_CUDA_WARP;
    const int32_t si = find_seg<true>(segs, n_segs, blockIdx.x);
    const sgmv_seg g = segs[si];
    const int32_t local = blockIdx.x - g.shrink_first;
    const int32_t n_groups = (g.rank + SGMV_WARPS - 1) / SGMV_WARPS;
    const int32_t t0 = (local / n_groups) * SHRINK_TOK; /* relative to the segment */
    const int32_t nt = min(SHRINK_TOK, g.len - t0);
    const int32_t r = (local % n_groups) * SGMV_WARPS + warp;
    const float *xt = x + (size_t)(g.start + t0) * in;
    const float *ar = g.A + (size_t)r * in;

    float acc[SHRINK_TOK];
#pragma unroll
    for (int tt = 0; tt < SHRINK_TOK; tt++) acc[tt] = 0.0f;
    for (int32_t k0 = 0; k0 < in; k0 += SHRINK_K) {
        for (int32_t e = threadIdx.x; e < SHRINK_TOK * SHRINK_K; e += SGMV_THREADS) {
            const int32_t tt = e / SHRINK_K, kk = e % SHRINK_K;
            xs[tt][kk] = tt < nt && k0 + kk < in ? xt[(size_t)tt * in + k0 + kk] : 0.0f;
        }
        __syncthreads();
        if (r < g.rank) {
            for (int32_t kk = lane; kk < SHRINK_K && k0 + kk < in; kk += DS_CUDA_WARP) {
                const float av = ar[k0 + kk];
#pragma unroll
                for (int tt = 0; tt < SHRINK_TOK; tt++) acc[tt] += av * xs[tt][kk];
            }
        }
        __syncthreads();
    }
    if (r >= g.rank) return; /* after the last barrier */
    float *out = tmp + g.tmp_off + (size_t)t0 * g.rank + r;
#pragma unroll
    for (int tt = 0; tt < SHRINK_TOK; tt++) {
        const float v = ds_warp_sum(acc[tt]);
        if (lane == 0 && tt < nt) out[(size_t)tt * g.rank] = v;
    }
}

/* Tile = (EXPAND_TOK tokens) × (EXPAND_OUT outputs): thread j owns output o0 + j for every token
 * of the tile; B and tmp are staged through shared memory EXPAND_R ranks at a time. */
static __global__ void __launch_bounds__(SGMV_THREADS)
sgmv_expand_kernel(const float *__restrict__ tmp, float *__restrict__ y, int32_t out, const sgmv_seg *__restrict__ segs,
                   int32_t n_segs) {
    __shared__ float bs[EXPAND_OUT][EXPAND_R + 1]; /* +1: conflict-free column reads */
    __shared__ float ts[EXPAND_TOK][EXPAND_R];
    const int32_t si = find_seg<false>(segs, n_segs, blockIdx.x);
    const sgmv_seg g = segs[si];
    const int32_t local = blockIdx.x - g.expand_first;
    const int32_t n_otiles = (out + EXPAND_OUT - 1) / EXPAND_OUT;
    const int32_t t0 = (local / n_otiles) * EXPAND_TOK;
    const int32_t nt = min(EXPAND_TOK, g.len - t0);
    const int32_t o0 = (local % n_otiles) * EXPAND_OUT;
    const float *tt0 = tmp + g.tmp_off + (size_t)t0 * g.rank;

    float acc[EXPAND_TOK];
#pragma unroll
    for (int tt = 0; tt < EXPAND_TOK; tt++) acc[tt] = 0.0f;
    for (int32_t r0 = 0; r0 < g.rank; r0 += EXPAND_R) {
        for (int32_t e = threadIdx.x; e < EXPAND_OUT * EXPAND_R; e += SGMV_THREADS) {
            const int32_t oo = e / EXPAND_R, j = e % EXPAND_R;
            bs[oo][j] = o0 + oo < out && r0 + j < g.rank ? g.B[(size_t)(o0 + oo) * g.rank + r0 + j] : 0.0f;
        }
        for (int32_t e = threadIdx.x; e < EXPAND_TOK * EXPAND_R; e += SGMV_THREADS) {
            const int32_t tt = e / EXPAND_R, j = e % EXPAND_R;
            ts[tt][j] = tt < nt && r0 + j < g.rank ? tt0[(size_t)tt * g.rank + r0 + j] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < EXPAND_R; j++) {
            const float bv = bs[threadIdx.x][j];
#pragma unroll
            for (int tt = 0; tt < EXPAND_TOK; tt++) acc[tt] += ts[tt][j] * bv;
        }
        __syncthreads();
    }
    const int32_t o = o0 + threadIdx.x;
    if (o >= out) return;
    float *yo = y + (size_t)(g.start + t0) * out + o;
#pragma unroll
    for (int tt = 0; tt < EXPAND_TOK; tt++)
        if (tt < nt) yo[(size_t)tt * out] += g.scale * acc[tt];
}

int ds_cuda_lora(void *ctx, const float *x, int32_t in, float *y, int32_t out, const ds_lora_seg *segs,
                 int32_t n_segs) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (in <= 0 || out <= 0 || n_segs < 0) return DS_EINVAL;
    /* Pass 1 (host): validate, count the segments that do work and the packed tmp size. */
    int32_t n_work = 0;
    size_t tmp_floats = 0;
    for (int32_t i = 0; i < n_segs; i++) {
        const ds_lora_seg *s = &segs[i];
        if (s->start < 0 || s->len < 0 || s->rank < 0) return DS_EINVAL;
        if (s->len == 0 || s->rank == 0) continue;
        if (!s->A || !s->B) return DS_EINVAL;
        tmp_floats += (size_t)s->len * (size_t)s->rank;
        n_work++;
    }
    if (n_work == 0) return DS_OK;
    DS_TRY(ds_cuda_enter(c));
    /* Reserve before staging: growing synchronizes and recycles the staging ring. */
    DS_TRY(ds_cuda_ws_reserve(c, &c->lora_tmp, tmp_floats * sizeof(float)));

    /* Pass 2: pack straight into pinned memory, numbering each launch's tiles. */
    const size_t bytes = (size_t)n_work * sizeof(sgmv_seg);
    void *h, *d;
    DS_TRY(ds_cuda_meta_alloc(c, bytes, &h));
    sgmv_seg *p = (sgmv_seg *)h;
    int64_t n_shrink = 0, n_expand = 0, off = 0;
    const int64_t n_otiles = (out + EXPAND_OUT - 1) / EXPAND_OUT;
    for (int32_t i = 0, k = 0; i < n_segs; i++) {
        const ds_lora_seg *s = &segs[i];
        if (s->len == 0 || s->rank == 0) continue;
        const sgmv_seg e = {s->A, s->B, off, s->start, s->len, s->rank, s->scale, (int32_t)n_shrink, (int32_t)n_expand};
        p[k] = e;
        off += (int64_t)s->len * s->rank;
        n_shrink += (int64_t)((s->len + SHRINK_TOK - 1) / SHRINK_TOK) * ((s->rank + SGMV_WARPS - 1) / SGMV_WARPS);
        n_expand += (int64_t)((s->len + EXPAND_TOK - 1) / EXPAND_TOK) * n_otiles;
        if (n_shrink > INT32_MAX || n_expand > INT32_MAX) return DS_EUNSUPPORTED;
        k++;
    }
    DS_TRY(ds_cuda_meta_push(c, h, bytes, &d));
    float *tmp = (float *)c->lora_tmp.ptr;
    sgmv_shrink_kernel<<<(unsigned)n_shrink, SGMV_THREADS, 0, c->stream>>>(x, in, tmp, (const sgmv_seg *)d, n_work);
    CU_CHECK_LAUNCH("sgmv_shrink_kernel");
    sgmv_expand_kernel<<<(unsigned)n_expand, SGMV_THREADS, 0, c->stream>>>(tmp, y, out, (const sgmv_seg *)d, n_work);
    CU_CHECK_LAUNCH("sgmv_expand_kernel");
    return DS_OK;
}
