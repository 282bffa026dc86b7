/* Paged attention over the KV pool, with per-sequence prefix-tuning slots and GQA.
 *
 * Logical KV slot i of sequence s is found exactly as ds_kv_slot() says (include/ds/backend.h):
 * the first seq_prefix[s] slots are the adapter's prefix (shared blocks at the head of the block
 * table, last one possibly partial); the sequence's own tokens start on the next block boundary.
 * Token t attends to logical slots [0, tok_nkv[t]) — causality is the engine's business — or, with a
 * sliding window, to the last `window` of them.
 *
 * Numerics: fp32 throughout, scores = (q·k)·scale as on the CPU, softmax by the online
 * (running max / running sum) recurrence of Milakov & Gimelshein 2018 / FlashAttention, which
 * equals the CPU's two-pass softmax up to fp32 rounding.
 *
 * Shape of this first version: one block per (token, head); each warp walks every NW-th KV slot
 * with its own running (max, sum, acc[head_dim]) — lanes split head_dim — and the warps' partial
 * states are merged in shared memory at the end.
 *
 * Performance notes (for the GPU session):
 * - Decode: the heads of one GQA group re-read the same K/V; one block per (token, kv_head)
 *   handling the whole group would cut KV traffic by n_head/n_kv_head.
 * - Long contexts with few sequences: split the KV range across blocks (flash-decoding) and merge.
 * - Prefill: each query token re-reads its sequence's KV; a FlashAttention-2 style tile kernel
 *   (Q tile × KV tile in shared memory, tensor cores) is the real fix.
 * - float4 loads for K/V rows when head_dim % 4 == 0. */
#include "common.cuh"

#define ATTN_WARPS 4
#define ATTN_MAX_HEAD_DIM 256

/* Logical → physical slot, the device twin of ds_kv_slot(). */
static __device__ __forceinline__ int64_t kv_slot(const int32_t *bt, int32_t pre, int32_t pre_pad, int32_t bs, int32_t i) {
    const int32_t j = i < pre ? i : i - pre + pre_pad;
    return (int64_t)bt[j / bs] * bs + j % bs;
}

/* MAXJ = ceil(head_dim / 32): the head_dim elements each lane holds. */
template <int MAXJ>
static __global__ void __launch_bounds__(ATTN_WARPS * DS_CUDA_WARP)
attention_kernel(const ds_attn_args a) {
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][MAXJ * DS_CUDA_WARP];
    const int lane = threadIdx.x % DS_CUDA_WARP, warp = threadIdx.x / DS_CUDA_WARP;
    const int32_t hd = a.head_dim, h = blockIdx.x, bs = a.block_size;
    const int32_t kvh = h / (a.n_head / a.n_kv_head); /* contiguous GQA groups, as HF repeat_kv */
    const int64_t row = (int64_t)a.n_kv_head * hd;

    for (int32_t t = blockIdx.y; t < a.n_tokens; t += gridDim.y) {
        const int32_t s = a.tok_seq[t], nkv = a.tok_nkv[t];
        const int32_t *bt = a.block_tables + (size_t)s * a.max_blocks;
        const int32_t pre = a.seq_prefix ? a.seq_prefix[s] : 0;
        const int32_t pre_pad = (pre + bs - 1) / bs * bs;
        const float *q = a.q + ((size_t)t * a.n_head + h) * hd;

        float qv[MAXJ], acc[MAXJ];
#pragma unroll
        for (int j = 0; j < MAXJ; j++) {
            const int d = lane + j * DS_CUDA_WARP;
            qv[j] = d < hd ? q[d] : 0.0f;
            acc[j] = 0.0f;
        }
        float m = -INFINITY, l = 0.0f;
        const int32_t lo = a.window > 0 && nkv > a.window ? nkv - a.window : 0; /* sliding window */
        for (int32_t i = lo + warp; i < nkv; i += ATTN_WARPS) {
            const int64_t off = kv_slot(bt, pre, pre_pad, bs, i) * row + (int64_t)kvh * hd;
            const float *k = a.k_cache + off, *v = a.v_cache + off;
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < MAXJ; j++) {
                const int d = lane + j * DS_CUDA_WARP;
                if (d < hd) dot += qv[j] * k[d];
            }
            const float sc = ds_warp_sum(dot) * a.scale;
            const float m_new = fmaxf(m, sc);
            const float corr = expf(m - m_new); /* m = -inf on the first slot: exp(-inf) = 0 */
            const float p = expf(sc - m_new);
            l = l * corr + p;
#pragma unroll
            for (int j = 0; j < MAXJ; j++) {
                const int d = lane + j * DS_CUDA_WARP;
                acc[j] = acc[j] * corr + (d < hd ? p * v[d] : 0.0f);
            }
            m = m_new;
        }

        /* Merge the warps' partial softmax states: out = Σ_w e^(m_w−M)·acc_w / Σ_w e^(m_w−M)·l_w. */
        if (lane == 0) {
            s_m[warp] = m;
            s_l[warp] = l;
        }
#pragma unroll
        for (int j = 0; j < MAXJ; j++) s_acc[warp][lane + j * DS_CUDA_WARP] = acc[j];
        __syncthreads();
        float M = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++)
            if (s_l[w] > 0.0f) M = fmaxf(M, s_m[w]);
        float L = 0.0f, f[ATTN_WARPS];
        for (int w = 0; w < ATTN_WARPS; w++) {
            f[w] = s_l[w] > 0.0f ? expf(s_m[w] - M) : 0.0f;
            L += f[w] * s_l[w];
        }
        const float inv = L > 0.0f ? 1.0f / L : 0.0f; /* nkv = 0: zeros, like the CPU */
        float *o = a.out + ((size_t)t * a.n_head + h) * hd;
        for (int32_t d = threadIdx.x; d < hd; d += blockDim.x) {
            float r = 0.0f;
            for (int w = 0; w < ATTN_WARPS; w++) r += f[w] * s_acc[w][d];
            o[d] = r * inv;
        }
        __syncthreads(); /* s_* are rewritten by the next token */
    }
}

int ds_cuda_attention(void *ctx, const ds_attn_args *a) {
    ds_cuda_ctx *c = (ds_cuda_ctx *)ctx;
    if (a->n_tokens < 0 || a->n_head <= 0 || a->n_kv_head <= 0 || a->n_head % a->n_kv_head || a->head_dim <= 0 ||
        a->block_size <= 0 || a->max_blocks <= 0)
        return a->n_tokens == 0 ? DS_OK : DS_EINVAL;
    if (a->n_tokens == 0) return DS_OK;
    if (a->head_dim > ATTN_MAX_HEAD_DIM || a->n_head > 65535) return DS_EUNSUPPORTED;
    DS_TRY(ds_cuda_enter(c));
    dim3 grid((unsigned)a->n_head, (unsigned)(a->n_tokens < 65535 ? a->n_tokens : 65535));
    const int threads = ATTN_WARPS * DS_CUDA_WARP;
    if (a->head_dim <= 32)
        attention_kernel<1><<<grid, threads, 0, c->stream>>>(*a);
    else if (a->head_dim <= 64)
        attention_kernel<2><<<grid, threads, 0, c->stream>>>(*a);
    else if (a->head_dim <= 128)
        attention_kernel<4><<<grid, threads, 0, c->stream>>>(*a);
    else
        attention_kernel<8><<<grid, threads, 0, c->stream>>>(*a);
    CU_CHECK_LAUNCH("attention_kernel");
    return DS_OK;
}
