/* CPU matmul on typed weights (internal to the CPU backend): kernel tables per instruction set
 * (qkern.h) and the driver that splits a matmul over threads (qmatmul.c). */
#ifndef DS_CPU_QMATMUL_H
#define DS_CPU_QMATMUL_H

#include "ds/backend.h"

/* Largest token count one gemv call takes; more tokens dequantise tiles once per step and
 * multiply them by a GEMM (gemm_tile or OpenBLAS)... */
#define DS_QK_GEMV_MAX 8
/* ...except that the fused kernels (ds_qk_fused weights) take up to this many in passes of
 * DS_QK_GEMV_MAX over each chunk of rows, which stays in cache between passes: per token they cost
 * less than a tile + sgemm step of fewer than ~24 tokens (build/bench_qmatmul, 2048 × 2048, every
 * block format: 8 tokens 0.17-0.19 ms a token, a 16-token sgemm step 0.21-0.23). */
#define DS_QK_FUSED_MAX 16

typedef struct ds_qk_ops {
    /* y[t][r] (=|+=) W[r]·x[t] (+ bias[r]), rows [r0, r1), n ≤ DS_QK_GEMV_MAX; y rows are w->rows wide. */
    void (*gemv)(const ds_mat *w, int32_t r0, int32_t r1, const float *x, int32_t n, float *y, const float *bias,
                 bool acc);
    /* The same for the weights ds_qk_fused takes, 1 ≤ n ≤ DS_QK_GEMV_MAX, straight from the blocks in
     * registers (qgemv.h); faster than gemv, which expands spans of a row into a buffer. */
    void (*gemv_fused)(const ds_mat *w, int32_t r0, int32_t r1, const float *x, int32_t n, float *y,
                       const float *bias, bool acc);
    /* dst[nr][kn] = rows [r0, r0+nr), columns [k0, k0+kn) of W as fp32 (k0, kn whole blocks). */
    void (*deq_tile)(const ds_mat *w, int32_t r0, int32_t nr, int32_t k0, int32_t kn, float *dst);
    /* y[t][i] (=|+=) Σ_k tile[i][k]·x[t][k], t < n, i < nr, k < kn: the GEMM of a deq_tile tile
     * without OpenBLAS's repacking (qgemm.h; AVX-512 only, else NULL and the driver calls sgemm);
     * work holds DS_QK_GEMM_WORK floats. */
    void (*gemm_tile)(const float *tile, int32_t nr, int32_t kn, const float *x, int32_t ldx, int32_t n, float *y,
                      int32_t ldy, bool acc, float *work);
    /* Decode attention of token t over keys [i0, i1) for KV head kvh and its group of query heads:
     * o[group][head_dim] = Σ e^{s−m}·v unnormalised, ml[group][2] = {m, Σ e^{s−m}}
     * (attn_kern.h). */
    void (*attn_dec)(const struct ds_attn_args *a, int32_t t, int32_t kvh, int32_t i0, int32_t i1, float *o, float *ml);
    /* p[i] = e^{p[i] − m} for i < n, returns Σ (act_kern.h; vectorised on AVX-512) */
    float (*exp_sum)(float *p, int32_t n, float m);
    /* out[i] = SiLU(g[i])·u[i] (out may be g) */
    void (*silu_mul)(const float *g, const float *u, float *out, size_t n);
    int vw; /* fp32 lanes */
} ds_qk_ops;

static inline bool ds_qk_fused_dtype(ds_dtype t) {
    return t == DS_DTYPE_Q4_0 || t == DS_DTYPE_Q4_1 || t == DS_DTYPE_Q8_0 || t == DS_DTYPE_Q4_K || t == DS_DTYPE_Q5_K ||
           t == DS_DTYPE_Q6_K;
}
/* Weights gemv_fused takes: every block format, and F32/F16/BF16 rows of whole 32-column chunks. */
static inline bool ds_qk_fused(const ds_mat *w) {
    switch (w->dtype) {
    case DS_DTYPE_F32:
    case DS_DTYPE_F16:
    case DS_DTYPE_BF16: return w->cols % 32 == 0;
    default: return true;
    }
}

extern const ds_qk_ops ds_qk_generic;
#if defined(__x86_64__)
extern const ds_qk_ops ds_qk_avx2;
extern const ds_qk_ops ds_qk_avx512;
#endif

/* The kernels this machine runs: the widest the CPU supports (cpuid), capped by $DS_CPU_ISA
 * (generic | avx2 | avx512). Name in *name. Thread-safe (decided once). */
const ds_qk_ops *ds_qk_best(const char **name);
/* Kernels by name ("generic", "avx2", "avx512") if this CPU can run them, else NULL (tests). */
const ds_qk_ops *ds_qk_by_name(const char *name);

/* Per-thread scratch for the GEMM path: floats per thread. A tile has at most DS_QK_TILE_ROWS rows
 * (fewer when that gives the threads an even share, qmatmul.c tile_rows): every tile's sgemm packs
 * the step's activations again, and with 128-row tiles that packing took ~10% of a 1B model's
 * prefill (pp512 1B Q4_K_M 81 -> 93 tokens/s at 512 rows). */
#define DS_QK_TILE_ROWS 512
#define DS_QK_TILE_K 2048
/* gemm_tile's work per thread: 64 tokens' activations transposed ([k][64]) and the tile's partial
 * sums ([rows][64]). */
#define DS_QK_GEMM_WORK ((size_t)(DS_QK_TILE_K + DS_QK_TILE_ROWS) * 64)
/* Steps of up to this many tokens take gemm_tile, on tiles of DS_QK_GEMM_TILE_ROWS rows (without
 * repacking, a smaller tile costs nothing, and 128 × 2048 floats stay in L2). */
#define DS_QK_GEMM_TILE_MAX 128
#define DS_QK_GEMM_TILE_ROWS 128
size_t ds_qk_scratch_floats(int n_threads);

/* Whether ds_qk_matmul takes n tokens of w by tiles + a GEMM (and so needs its scratch) rather
 * than the gemv kernels. */
static inline bool ds_qk_tiled(const ds_qk_ops *k, const ds_mat *w, int32_t n) {
    return n > DS_QK_GEMV_MAX && !(n <= DS_QK_FUSED_MAX && k->gemv_fused && ds_qk_fused(w));
}

/* y[n][rows] (=|+=) x[n][cols] · Wᵀ (+ bias) with the given kernels; scratch holds
 * ds_qk_scratch_floats(omp threads) floats when ds_qk_tiled (else it may be NULL). Decode-sized n
 * runs on `pool` (NULL: the calling thread alone), larger n on OpenMP threads. */
struct ds_pool;
int ds_qk_matmul(const ds_qk_ops *k, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                 bool acc, float *scratch, struct ds_pool *pool);
/* dx[n][cols] (=|+=) dy[n][rows] · W; scratch holds cap floats (at least cols; more rows per
 * block make the GEMM efficient: DS_QK_T_SCRATCH). */
#define DS_QK_T_SCRATCH ((size_t)1 << 22)
int ds_qk_matmul_t(const ds_qk_ops *k, const float *dy, const ds_mat *w, float *dx, int32_t n, bool acc,
                   float *scratch, size_t cap);
/* out[t] = W[ids[t]] as fp32; DS_EINVAL for an id out of range. */
int ds_qk_embed(const ds_qk_ops *k, const ds_mat *w, const int32_t *ids, float *out, int32_t n);

/* ---- int8 activations (opt-in: ds_backend_params.int8_activations, `--int8-activations`) ----
 * x is quantised per block (32 columns for Q4_0/Q4_1/Q8_0 weights, 256 for the K-quants) to int8
 * with one fp32 scale (amax/127, round to nearest even), as llama.cpp does; the dot products are
 * then integer (maddubs / VNNI) with one fp32 scale multiply per block. Not the fp32-dequantised
 * model's numerics: the README states the measured difference. */
typedef struct ds_q8_act {
    const int8_t *q;   /* [n][K] */
    const float *d;    /* [n][K / blk]: scale of each block */
    const int16_t *bs; /* [n][K / 32]: Σq over each 32 columns (for weight formats with an offset) */
    const int16_t *bs16; /* [n][K / 16]: Σq over each 16 columns (Q6_K tiles) */
    const uint8_t *qu;   /* [n][K]: q + 128 (Q8_0 tiles: vpdpbusd wants one unsigned operand) */
    /* [ceil(n / 8)][K / 32][8]: d·Σq over each 32 columns (blk 32 only), the 8 tokens of a group
     * side by side so that one vector holds a block's sums for all of them (0 past n) */
    const float *s8;
    int32_t blk;       /* 32 or 256 */
} ds_q8_act;

typedef struct ds_q8_ops {
    /* y[t][r] (=|+=) W[r]·x̂[t] (+ bias[r]) for rows [r0, r1), n ≤ DS_QK_GEMV_MAX tokens, x̂ = the
     * int8 activations; W one of ds_q8_dtype's formats. */
    void (*gemv)(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y,
                 const float *bias, bool acc);
    /* The same for any n and (r1 - r0) a multiple of 8 (NULL: not available): 8
     * rows at a time are unpacked once and interleaved (each 32-bit lane of a vector = 4 columns of
     * one row), so one vpdpbusd multiplies 8 rows by 4 broadcast columns of a token, and the
     * sub-block scales apply per row lane — half the multiply µops of gemv. For prefill. */
    void (*tile8)(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y,
                  const float *bias, bool acc);
    /* y for rows [r0, r1) (multiples of 8, r1 ≤ rows/8·8) of a weight with a ds_q8_pack (w->aux),
     * any n (NULL: this ISA does not read packs). Decode and prefill alike: the tiles are built at
     * upload, not per call. */
    void (*packed)(const ds_mat *w, int32_t r0, int32_t r1, const ds_q8_act *a, int32_t n, float *y,
                   const float *bias, bool acc);
    /* tile8 takes Q8_0 too (VNNI: unsigned activations × signed codes in 32-bit sums; AVX2's 16-bit
     * pair sums of 255·127 would saturate) */
    bool tile_q8_0;
} ds_q8_ops;

/* The formats the int8 path covers; others take the exact path. Their rows are whole blocks. */
static inline bool ds_q8_dtype(ds_dtype t) { return ds_qk_fused_dtype(t); }
/* Q4_K repacked for the int8 kernels (llama.cpp's CPU "repack" idea): one super-block of 8
 * consecutive rows. Vector v of sub-block j holds, in 32-bit lane r = row r, the codes of columns
 * 32j + 4v + i (low nibbles) and 32j + 16 + 4v + i (high nibbles), i = 0..3 — so one vpdpbusd
 * multiplies 8 rows by 4 broadcast activation columns. 1184 bytes for 8 × 144 of Q4_K, in the order
 * the kernel reads them (scales and mins first: that order streams 5-40% faster out of DRAM). */
typedef struct ds_q4k_x8 {
    uint8_t sc[8][8];    /* [sub-block][row] 6-bit scales */
    uint8_t mn[4][8][2]; /* [sub-block pair p][row]: mins of sub-blocks 2p, 2p+1 */
    uint8_t q[8][4][32];
    uint16_t d[8], dmin[8]; /* f16 per row */
} ds_q4k_x8;

/* Q4_0 / Q4_1 repacked the same way: one 32-column block of 8 rows; vector v holds columns 4v + i
 * (low nibbles) and 16 + 4v + i (high nibbles) of row r in lane r; value = d·q + m per row (Q4_0:
 * m = −8·d, exact in f16 for every d the packer accepts). 160 bytes for 8 × 18 or 8 × 20. */
typedef struct ds_q4_x8 {
    uint8_t q[4][32];
    uint16_t d[8], m[8]; /* f16 per row */
} ds_q4_x8;

/* Q6_K repacked the same way (codes 0..63, the format's offset of 32 taken out in the integer sum):
 * low nibbles as in ds_q4k_x8; qh[h] byte 4r + i of sub-block j holds in bits 2v the top two bits of
 * the code in column 32j + 16h + 4v + i. Laid out in the order the kernel reads it (sub-block pairs:
 * codes, top bits, scales), 1664 bytes = 26 cache lines for 8 × 210 bytes of Q6_K; the rows' f16
 * scales d are not in it but follow the pack's structs as one array (8 per struct, same order), so
 * every struct starts on a cache line and the kernel's loads stream one way (interleaved streams and
 * 16-byte-misaligned structs made this kernel latency-bound: 6.4 GB/s against 21 GB/s unpacked). */
typedef struct ds_q6k_x8 {
    struct {
        uint8_t ql[2][4][32];
        uint8_t qh[2][2][32];
        int8_t scp[2][8][2]; /* [sub-block][row]: scales of columns 32j..+15 and 32j+16..+31 */
    } p[4];                  /* sub-blocks 2i, 2i+1 */
} ds_q6k_x8;

/* Q8_0 repacked (VNNI only, ds_q8_ops.tile_q8_0): vector g of a 32-column block holds columns
 * 4g..4g+3 of row r in lane r as q + 128, the unsigned operand of vpdpbusd (the offset comes out
 * with the activations' block sum, ds_q8_act.bs). 272 bytes for 8 × 34: the pack is no bigger
 * than the file. */
typedef struct ds_q8_x8 {
    uint8_t q[8][32];
    uint16_t d[8]; /* f16 per row */
} ds_q8_x8;

/* The pack of w's whole 8-row groups (row group-major: rows/8 × blocks per row of ds_q4k_x8 for
 * Q4_K, ds_q6k_x8 for Q6_K, ds_q4_x8 for Q4_0/Q4_1, ds_q8_x8 for Q8_0 when k->tile_q8_0) for the
 * formats k->packed reads, or NULL (other format, fewer than 8 rows, no memory). Free with free(). */
void *ds_q8_pack(const struct ds_q8_ops *k, const ds_mat *w);

/* Activation block for weights of type t: 256 for the K-quants, else 32. */
static inline int32_t ds_q8_blk(ds_dtype t) { return ds_dtype_block(t) == 256 ? 256 : 32; }

extern const ds_q8_ops ds_q8_generic;
#if defined(__x86_64__)
extern const ds_q8_ops ds_q8_avx2;
extern const ds_q8_ops ds_q8_vnni;
#endif
/* Int8 kernels: the widest this CPU runs ("vnni" needs AVX-512 VNNI + VL, "avx2" AVX2 + FMA +
 * F16C), capped by $DS_CPU_ISA as for ds_qk_best ("avx512" allows vnni). */
const ds_q8_ops *ds_q8_best(const char **name);
const ds_q8_ops *ds_q8_by_name(const char *name); /* "generic", "avx2", "vnni"; NULL if unsupported */

/* The activations of tokens t0.. of a (K columns; t0 a multiple of 8, so the 8-token-grouped
 * sums stay aligned). */
static inline ds_q8_act ds_q8_act_from(const ds_q8_act *a, int32_t t0, int32_t K) {
    const size_t t = (size_t)t0;
    return (ds_q8_act){.q = a->q + t * K, .d = a->d + t * (size_t)(K / a->blk), .bs = a->bs + t * (size_t)(K / 32),
                       .bs16 = a->bs16 + t * (size_t)(K / 16), .qu = a->qu + t * K,
                       .s8 = a->s8 + t * (size_t)(K / 32), .blk = a->blk};
}

/* Bytes of activation buffer for n tokens of K columns. */
size_t ds_q8_act_bytes(int32_t n, int32_t K);
/* Quantises x[n][K] (K a multiple of blk) into buf (ds_q8_act_bytes) and describes it in *a. */
void ds_q8_quantize(const float *x, int32_t n, int32_t K, int32_t blk, void *buf, ds_q8_act *a);
/* y[n][rows] (=|+=) x̂·Wᵀ (+ bias) for a ds_q8_dtype weight: buf holds ds_q8_act_bytes(n, cols).
 * Decode-sized n runs on `pool` (NULL: this thread), larger n on OpenMP threads. */
int ds_q8_matmul(const ds_q8_ops *k, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                 bool acc, void *buf, struct ds_pool *pool);

#endif
