/* Segmented LoRA (Punica's SGMV: Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"):
 *   tmp[t][r] = Σ_k x[t][k] · A[r][k]            (shrink, per segment at its own rank)
 *   y[t][o]  += scale · Σ_r tmp[t][r] · B[o][r]    (expand)
 * for t in each segment [start, start+len). Segments must not overlap (the engine groups tokens
 * by adapter, so they never do); tokens outside every segment are untouched.
 *
 * Plan/run (include/ds/plan.h): ds_cuda_plan_upload packs the step's whole LoRA table once — per
 * entry its pointers, rank, scale and three running totals over the table (Σ len·rank: the
 * offset of its packed tmp rows, no padding to a maximum rank; shrink tiles; expand token
 * tiles) — and copies it to the device with the vec table in one transfer. A call then names a
 * range of entries: its launch sizes are differences of the totals of the host mirror, and the
 * kernels read the device copy, offset by the range's first totals. No per-call packing or copy.
 *
 * One shrink launch and one expand launch per call, whatever the number of segments. Block b
 * finds its segment by binary search over the running tile totals, so a 300-token segment gets
 * many blocks and a 1-token segment one, with no grid-wide synchronisation and no atomics (each
 * output element has exactly one writer: results are deterministic).
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

/* One entry of the planned LoRA table as the kernels see it. The running totals count every
 * entry before this one in the whole table; entry n_lora is a sentinel holding the table's totals. */
typedef struct sgmv_seg {
    const float *A;      /* [rank][in] */
    const float *B;      /* [out][rank] */
    int64_t tmp_off;     /* Σ len·rank: first float of this entry's [len][rank] block of tmp */
    int32_t start, len, rank;
    float scale;
    int32_t shrink_first; /* Σ shrink tiles */
    int32_t ttile_first;  /* Σ expand token tiles; × the call's output tiles = its first expand block */
} sgmv_seg;

/* The entry owning block b of a call over segs[0, n_segs): the last one whose first block is ≤ b.
 * Entries without work have no tiles, share their first block with the next entry and are never
 * chosen (the last of equal firsts wins, and a trailing one's first is past every block). */
template <bool SHRINK>
static __device__ __forceinline__ int32_t find_seg(const sgmv_seg *segs, int32_t n_segs, int64_t b, int32_t tbase,
                                                   int32_t n_otiles) {
    int32_t lo = 0, hi = n_segs - 1;
    while (lo < hi) {
        const int32_t mid = (lo + hi + 1) / 2;
        const int64_t first = SHRINK ? (int64_t)segs[mid].shrink_first
                                     : (int64_t)(segs[mid].ttile_first - tbase) * n_otiles;
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
    const int32_t b = segs[0].shrink_first + (int32_t)blockIdx.x; /* tile number in the whole table */
    const int32_t si = find_seg<true>(segs, n_segs, b, 0, 0);
    const sgmv_seg g = segs[si];
    const int32_t local = b - g.shrink_first;
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
    float *out = tmp + (g.tmp_off - segs[0].tmp_off) + (size_t)t0 * g.rank + r; /* tmp holds this call only */
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
    const int32_t n_otiles = (out + EXPAND_OUT - 1) / EXPAND_OUT;
    const int32_t tbase = segs[0].ttile_first;
    const int32_t si = find_seg<false>(segs, n_segs, blockIdx.x, tbase, n_otiles);
    const sgmv_seg g = segs[si];
    const int32_t local = (int32_t)(blockIdx.x - (int64_t)(g.ttile_first - tbase) * n_otiles);
    const int32_t t0 = (local / n_otiles) * EXPAND_TOK;
    const int32_t nt = min(EXPAND_TOK, g.len - t0);
    const int32_t o0 = (local % n_otiles) * EXPAND_OUT;
    const float *tt0 = tmp + (g.tmp_off - segs[0].tmp_off) + (size_t)t0 * g.rank;

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

/* Tiles of one entry in each launch; 0 for an entry without work. */
static int64_t shrink_tiles(const ds_lora_seg *s) {
    if (s->len == 0 || s->rank == 0) return 0;
    return (int64_t)((s->len + SHRINK_TOK - 1) / SHRINK_TOK) * ((s->rank + SGMV_WARPS - 1) / SGMV_WARPS);
}
static int64_t token_tiles(const ds_lora_seg *s) {
    return s->len == 0 || s->rank == 0 ? 0 : (s->len + EXPAND_TOK - 1) / EXPAND_TOK;
}

/* Packs the LoRA table into the host mirror c->plan_lora (n + 1 entries, the last the totals). */
static int pack_lora(ds_cuda_ctx *c, const ds_lora_seg *segs, int32_t n) {
    if ((size_t)n + 1 > c->plan_lora_cap) {
        size_t cap = c->plan_lora_cap ? c->plan_lora_cap : 256;
        while (cap < (size_t)n + 1) cap *= 2;
        sgmv_seg *p = (sgmv_seg *)realloc(c->plan_lora, cap * sizeof *p);
        if (!p) return DS_ENOMEM;
        c->plan_lora = p;
        c->plan_lora_cap = cap;
    }
    int64_t off = 0, n_shrink = 0, n_ttiles = 0;
    for (int32_t i = 0; i < n; i++) {
        const ds_lora_seg *s = &segs[i];
        if (s->start < 0 || s->len < 0 || s->rank < 0) return DS_EINVAL;
        if (s->len && s->rank && (!s->A || !s->B)) return DS_EINVAL;
        c->plan_lora[i] = sgmv_seg{s->A, s->B, off, s->start, s->len, s->rank, s->scale, (int32_t)n_shrink,
                                   (int32_t)n_ttiles};
        off += (int64_t)s->len * s->rank;
        n_shrink += shrink_tiles(s);
        n_ttiles += token_tiles(s);
        if (n_shrink > INT32_MAX || n_ttiles > INT32_MAX) return DS_EUNSUPPORTED;
    }
    c->plan_lora[n] = sgmv_seg{nullptr, nullptr, off, 0, 0, 0, 0.0f, (int32_t)n_shrink, (int32_t)n_ttiles};
    return DS_OK;
}

int ds_cuda_plan_upload(void *ctx, const ds_seg_tables *t) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    c->plan_n_lora = c->plan_n_vec = c->plan_n_sparse = c->plan_n_bn = 0; /* a failed upload leaves no plan to run */
    if (t->n_lora < 0 || t->n_vec < 0 || t->n_bn < 0 || t->n_sparse < 0) return DS_EINVAL;
    for (int32_t i = 0; i < t->n_vec; i++)
        if (t->vec[i].start < 0 || t->vec[i].len < 0) return DS_EINVAL;
    DS_TRY(pack_lora(c, t->lora, t->n_lora));
    const size_t lora_bytes = ((size_t)t->n_lora + 1) * sizeof(sgmv_seg);
    const size_t vec_off = (lora_bytes + 63) & ~(size_t)63, vec_bytes = (size_t)t->n_vec * sizeof(ds_vec_seg);
    DS_TRY(ds_cuda_enter(c));
    DS_TRY(ds_cuda_ws_reserve(c, &c->plan, vec_off + vec_bytes)); /* before staging: growing syncs */
    unsigned char *dev = (unsigned char *)c->plan.ptr;
    DS_TRY(ds_cuda_h2d(c, dev, c->plan_lora, lora_bytes));
    if (vec_bytes) DS_TRY(ds_cuda_h2d(c, dev + vec_off, t->vec, vec_bytes)); /* same layout in C and C++ */
    c->plan_n_lora = t->n_lora;
    c->plan_n_vec = t->n_vec;
    c->plan_vec = t->vec;
    c->plan_vec_dev = (const ds_vec_seg *)(dev + vec_off);
    c->plan_sparse = t->sparse;
    c->plan_n_sparse = t->n_sparse;
    c->plan_bn = t->bn;
    c->plan_n_bn = t->n_bn;
    return DS_OK;
}

int ds_cuda_lora(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (in <= 0 || out <= 0 || r.first < 0 || r.n < 0 || r.first > c->plan_n_lora - r.n) return DS_EINVAL;
    if (r.n == 0) return DS_OK;
    const sgmv_seg *h0 = &c->plan_lora[r.first], *h1 = &c->plan_lora[r.first + r.n];
    const int64_t n_otiles = (out + EXPAND_OUT - 1) / EXPAND_OUT;
    const int64_t n_shrink = h1->shrink_first - h0->shrink_first;
    const int64_t n_expand = (int64_t)(h1->ttile_first - h0->ttile_first) * n_otiles;
    if (n_shrink == 0) return DS_OK; /* no entry of the range has work */
    if (n_expand > INT32_MAX) return DS_EUNSUPPORTED;
    DS_TRY(ds_cuda_enter(c));
    DS_TRY(ds_cuda_ws_reserve(c, &c->lora_tmp, (size_t)(h1->tmp_off - h0->tmp_off) * sizeof(float)));
    const sgmv_seg *d = (const sgmv_seg *)c->plan.ptr + r.first;
    float *tmp = (float *)c->lora_tmp.ptr;
    sgmv_shrink_kernel<<<(unsigned)n_shrink, SGMV_THREADS, 0, c->stream>>>(x, in, tmp, d, r.n);
    CU_CHECK_LAUNCH("sgmv_shrink_kernel");
    sgmv_expand_kernel<<<(unsigned)n_expand, SGMV_THREADS, 0, c->stream>>>(tmp, y, out, d, r.n);
    CU_CHECK_LAUNCH("sgmv_expand_kernel");
    return DS_OK;
}
