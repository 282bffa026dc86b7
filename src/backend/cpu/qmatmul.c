/* Matmul on typed weights: the run-time choice of kernels and the split over threads.
 *
 * Decode-sized steps (n ≤ DS_QK_GEMV_MAX tokens; DS_QK_FUSED_MAX for the fused kernels, in passes)
 * stream each weight row once through the gemv kernel, rows split over the threads. Larger steps
 * (prefill chunks, big decode batches)
 * dequantise a tile of rows × up to DS_QK_TILE_K columns once into per-thread scratch and multiply
 * it with every token of the step — by the kernels' own gemm_tile up to DS_QK_GEMM_TILE_MAX tokens,
 * else by one single-threaded OpenBLAS sgemm — so the dequantisation is paid once per step, not
 * once per token. */
#include "backend/cpu/qmatmul.h"

#include "backend/cpu/pool.h"

#include <cblas.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* F16C (CPUID.1:ECX bit 29): clang's __builtin_cpu_supports does not know it. */
static bool has_f16c(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1);
#else
    return false;
#endif
}

static bool cpu_has(const char *isa) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!strcmp(isa, "avx2"))
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    if (!strcmp(isa, "avx512"))
        return cpu_has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
#endif
    return !strcmp(isa, "generic");
}

const ds_qk_ops *ds_qk_by_name(const char *name) {
    if (!cpu_has(name)) return NULL;
#if defined(__x86_64__)
    if (!strcmp(name, "avx512")) return &ds_qk_avx512;
    if (!strcmp(name, "avx2")) return &ds_qk_avx2;
#endif
    return &ds_qk_generic;
}

static const ds_qk_ops *best;
static const char *best_name;

static void choose(void) {
    static const char *order[] = {"avx512", "avx2", "generic"};
    const char *cap = getenv("DS_CPU_ISA");
    size_t i = 0;
    if (cap)
        for (size_t j = 0; j < 3; j++)
            if (!strcmp(cap, order[j])) i = j;
    for (; i < 3 && !(best = ds_qk_by_name(order[i])); i++) {
    }
    best_name = order[i < 3 ? i : 2];
    if (!best) best = &ds_qk_generic;
}

const ds_qk_ops *ds_qk_best(const char **name) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, choose);
    if (name) *name = best_name;
    return best;
}

/* One thread's scratch: the dequantised tile, then gemm_tile's work. */
#define TILE_FLOATS ((size_t)DS_QK_TILE_ROWS * DS_QK_TILE_K)
#define THREAD_FLOATS (TILE_FLOATS + DS_QK_GEMM_WORK)

size_t ds_qk_scratch_floats(int n_threads) { return (size_t)(n_threads > 0 ? n_threads : 1) * THREAD_FLOATS; }

/* Column chunk: whole row when it fits, else DS_QK_TILE_K (a multiple of every block size). */
static int32_t k_chunk(const ds_mat *w) { return w->cols <= DS_QK_TILE_K ? w->cols : DS_QK_TILE_K; }

typedef struct {
    const ds_qk_ops *k;
    const ds_mat *w;
    const float *x, *bias;
    float *y;
    int32_t n, chunk;
    bool acc, fused;
} gemv_job;

static void gemv_chunk(void *arg, int64_t i) {
    const gemv_job *j = arg;
    const int32_t r0 = (int32_t)i * j->chunk, r1 = r0 + j->chunk < j->w->rows ? r0 + j->chunk : j->w->rows;
    if (!j->fused) {
        j->k->gemv(j->w, r0, r1, j->x, j->n, j->y, j->bias, j->acc);
        return;
    }
    const size_t K = (size_t)j->w->cols, M = (size_t)j->w->rows;
    for (int32_t t0 = 0; t0 < j->n; t0 += DS_QK_GEMV_MAX) {
        const int32_t nt = j->n - t0 < DS_QK_GEMV_MAX ? j->n - t0 : DS_QK_GEMV_MAX;
        j->k->gemv_fused(j->w, r0, r1, j->x + (size_t)t0 * K, nt, j->y + (size_t)t0 * M, j->bias, j->acc);
    }
}

/* Rows per GEMM tile: as many as DS_QK_TILE_ROWS allows while every thread gets the same number of
 * tiles (576 rows on 2 threads: 2 × 288, not 512 + 64), a multiple of 16. */
static int32_t tile_rows(int32_t M, int nt, int32_t cap) {
    if (nt < 1) nt = 1;
    const int32_t per_thread = (M + nt * cap - 1) / (nt * cap);
    int32_t r = (M + nt * per_thread - 1) / (nt * per_thread);
    r = (r + 15) & ~15;
    return r < 16 ? 16 : r > cap ? cap : r;
}

int ds_qk_matmul(const ds_qk_ops *k, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                 bool acc, float *scratch, struct ds_pool *pool) {
    const int32_t M = w->rows, K = w->cols;
    if (n <= 0) return DS_OK;
    if (!ds_qk_tiled(k, w, n)) {
        /* ~8 chunks per thread (at least 16 rows): a thread that a neighbour slows down leaves
         * its share to the others */
        const int32_t nt = pool ? ds_pool_threads(pool) : 1;
        int32_t chunk = (M + 8 * nt - 1) / (8 * nt);
        if (chunk < 16) chunk = 16;
        gemv_job j = {.k = k, .w = w, .x = x, .bias = bias, .y = y, .n = n, .chunk = chunk, .acc = acc};
        j.fused = k->gemv_fused && ds_qk_fused(w);
        const int64_t n_chunks = (M + chunk - 1) / chunk;
        if (pool) ds_pool_run(pool, n_chunks, gemv_chunk, &j);
        else
            for (int64_t i = 0; i < n_chunks; i++) gemv_chunk(&j, i);
        return DS_OK;
    }
    /* up to DS_QK_GEMM_TILE_MAX tokens our own GEMM (qgemm.h), which does not repack the tile; more
     * tokens amortise OpenBLAS's packing and its kernel is faster (bench_qmatmul, 2048 × 2048, one
     * thread: 64 tokens 5.2 ms ours / 6.4 OpenBLAS, 128: 10.0 / 10.3, 256: 18.7 / 17.8) */
    const bool own = k->gemm_tile && n <= DS_QK_GEMM_TILE_MAX;
    const int32_t kc = k_chunk(w), tr = tile_rows(M, omp_get_max_threads(), own ? DS_QK_GEMM_TILE_ROWS : DS_QK_TILE_ROWS), n_tiles = (M + tr - 1) / tr;
#pragma omp parallel for schedule(dynamic, 1)
    for (int32_t tile = 0; tile < n_tiles; tile++) {
        float *buf = scratch + (size_t)omp_get_thread_num() * THREAD_FLOATS;
        const int32_t r0 = tile * tr, nr = M - r0 < tr ? M - r0 : tr;
        for (int32_t k0 = 0; k0 < K; k0 += kc) {
            const int32_t kn = K - k0 < kc ? K - k0 : kc;
            k->deq_tile(w, r0, nr, k0, kn, buf);
            if (own)
                k->gemm_tile(buf, nr, kn, x + k0, K, n, y + r0, M, acc || k0 > 0, buf + TILE_FLOATS);
            else
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, nr, kn, 1.0f, x + k0, K, buf, kn,
                            (acc || k0 > 0) ? 1.0f : 0.0f, y + r0, M);
        }
        if (bias)
            for (int32_t t = 0; t < n; t++)
                for (int32_t i = 0; i < nr; i++) y[(size_t)t * M + r0 + i] += bias[r0 + i];
    }
    return DS_OK;
}

/* dx = dy·W: blocks of rows (as many as `cap` floats hold, so the GEMM's inner dimension is large)
 * dequantised by OpenMP threads, then one multithreaded OpenBLAS sgemm per block adds into dx. */
int ds_qk_matmul_t(const ds_qk_ops *k, const float *dy, const ds_mat *w, float *dx, int32_t n, bool acc,
                   float *scratch, size_t cap) {
    const int32_t M = w->rows, K = w->cols;
    int32_t R = (int32_t)(cap / (size_t)K);
    if (R > M) R = M;
    if (R < 1) return DS_EINVAL;
    if (!acc) memset(dx, 0, (size_t)n * K * sizeof(float));
    for (int32_t r0 = 0; r0 < M; r0 += R) {
        const int32_t nr = M - r0 < R ? M - r0 : R;
#pragma omp parallel for schedule(static) if (nr >= 64)
        for (int32_t i = 0; i < nr; i += 16)
            k->deq_tile(w, r0 + i, nr - i < 16 ? nr - i : 16, 0, K, scratch + (size_t)i * K);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, K, nr, 1.0f, dy + r0, M, scratch, K, 1.0f, dx, K);
    }
    return DS_OK;
}

int ds_qk_embed(const ds_qk_ops *k, const ds_mat *w, const int32_t *ids, float *out, int32_t n) {
    for (int32_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= w->rows) return DS_EINVAL;
        k->deq_tile(w, ids[t], 1, 0, w->cols, out + (size_t)t * w->cols);
    }
    return DS_OK;
}

/* ---- int8 activations ---- */

_Static_assert(DS_QK_GEMV_MAX == 8, "ds_q8_act.s8 groups tokens by 8, the gemv step");

static bool cpu_has_vnni(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return cpu_has("avx512") && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
}

const ds_q8_ops *ds_q8_by_name(const char *name) {
#if defined(__x86_64__)
    if (!strcmp(name, "vnni")) return cpu_has_vnni() ? &ds_q8_vnni : NULL;
    if (!strcmp(name, "avx2")) return cpu_has("avx2") ? &ds_q8_avx2 : NULL;
#endif
    return !strcmp(name, "generic") ? &ds_q8_generic : NULL;
}

const ds_q8_ops *ds_q8_best(const char **name) {
    const char *isa;
    ds_qk_best(&isa); /* the same $DS_CPU_ISA cap */
    const char *q8 = !strcmp(isa, "avx512") && cpu_has_vnni() ? "vnni" : !strcmp(isa, "generic") ? "generic" : "avx2";
    const ds_q8_ops *k = ds_q8_by_name(q8);
    if (!k) q8 = "generic", k = &ds_q8_generic;
    if (name) *name = q8;
    return k;
}

size_t ds_q8_act_bytes(int32_t n, int32_t K) {
    /* codes, one scale and one scaled sum per 32 columns at most, one 16-bit sum per 32;
     * 64-byte aligned parts */
    const size_t q = ((size_t)n * K + 63) & ~(size_t)63, d = ((size_t)n * (K / 32) * 4 + 63) & ~(size_t)63;
    const size_t s8 = (((size_t)n + 7) / 8 * 8 * (K / 32) * 4 + 63) & ~(size_t)63;
    const size_t bs = ((size_t)n * (K / 32) * 2 + 63) & ~(size_t)63;
    const size_t bs16 = ((size_t)n * (K / 16) * 2 + 63) & ~(size_t)63;
    return q + d + s8 + bs + bs16 + (size_t)n * K;
}

void ds_q8_quantize(const float *x, int32_t n, int32_t K, int32_t blk, void *buf, ds_q8_act *a) {
    int8_t *q = buf;
    float *d = (float *)((uint8_t *)buf + (((size_t)n * K + 63) & ~(size_t)63));
    const int32_t K32 = K / 32;
    float *s8 = (float *)((uint8_t *)d + ((((size_t)n * K32 * 4) + 63) & ~(size_t)63));
    int16_t *bs = (int16_t *)((uint8_t *)s8 + ((((size_t)n + 7) / 8 * 8 * K32 * 4 + 63) & ~(size_t)63));
    int16_t *bs16 = (int16_t *)((uint8_t *)bs + (((size_t)n * K32 * 2 + 63) & ~(size_t)63));
    uint8_t *qu = (uint8_t *)bs16 + (((size_t)n * (K / 16) * 2 + 63) & ~(size_t)63);
    if (n % 8) memset(s8 + (size_t)(n / 8) * 8 * K32, 0, sizeof(float) * 8 * (size_t)K32);
    const int64_t nblk = (int64_t)n * (K / blk);
    /* prefill-sized steps: the threads share it (a serial pass here idles them) */
#pragma omp parallel for schedule(static) if (n > DS_QK_GEMV_MAX)
    for (int64_t b = 0; b < nblk; b++) {
        const float *xb = x + b * blk;
        float amax = 0.0f;
        for (int32_t i = 0; i < blk; i++) { /* plain compares: fmaxf is a libm call here */
            const float v = xb[i] < 0.0f ? -xb[i] : xb[i];
            amax = v > amax ? v : amax;
        }
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        int8_t *qb = q + b * blk;
        for (int32_t i = 0; i < blk; i++) { /* round half away from zero (llama.cpp's roundf) */
            const float r = xb[i] * id;
            qb[i] = (int8_t)(int32_t)(r + (r < 0.0f ? -0.5f : 0.5f));
        }
        for (int32_t i = 0; i < blk; i++) qu[b * blk + i] = (uint8_t)(qb[i] + 128);
        for (int32_t g = 0; g < blk / 16; g++) {
            int32_t s = 0;
            for (int i = 0; i < 16; i++) s += qb[16 * g + i];
            bs16[b * (blk / 16) + g] = (int16_t)s;
        }
        for (int32_t g = 0; g < blk / 32; g++) {
            int32_t s = 0;
            for (int i = 0; i < 32; i++) s += qb[32 * g + i];
            bs[b * (blk / 32) + g] = (int16_t)s;
            const size_t t = (size_t)b / (size_t)(K / blk), c = (size_t)b % (size_t)(K / blk) * (blk / 32) + (size_t)g;
            s8[(t / 8 * K32 + c) * 8 + t % 8] = d[b] * (float)s;
        }
    }
    *a = (ds_q8_act){.q = q, .d = d, .bs = bs, .bs16 = bs16, .qu = qu, .s8 = s8, .blk = blk};
}

static void *pack_q4(const ds_mat *w) {
    const bool q41 = w->dtype == DS_DTYPE_Q4_1;
    const int32_t G = w->rows / 8, nb = w->cols / 32, bb = q41 ? 20 : 18;
    ds_q4_x8 *pk = NULL;
    if (posix_memalign((void **)&pk, 64, sizeof *pk * (size_t)G * nb)) return NULL;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (int32_t g = 0; g < G; g++)
        for (int32_t b = 0; b < nb; b++) {
            ds_q4_x8 *o = &pk[(size_t)g * nb + b];
            for (int r = 0; r < 8; r++) {
                const uint8_t *x = (const uint8_t *)w->data + (size_t)(8 * g + r) * w->row_bytes + (size_t)b * bb;
                memcpy(&o->d[r], x, 2);
                if (q41) memcpy(&o->m[r], x + 2, 2);
                else {
                    const float m = -8.0f * ds_f16_to_f32(o->d[r]);
                    o->m[r] = ds_f32_to_f16(m);
                    bad |= ds_f16_to_f32(o->m[r]) != m; /* overflow: keep the unpacked path */
                }
                const uint8_t *qs = x + (q41 ? 4 : 2); /* byte i: column i (low), 16 + i (high) */
                for (int v = 0; v < 4; v++)
                    for (int i = 0; i < 4; i++) o->q[v][4 * r + i] = qs[4 * v + i];
            }
        }
    if (bad) free(pk);
    return bad ? NULL : pk;
}

static void *pack_q6k(const ds_mat *w) {
    const int32_t G = w->rows / 8, nb = w->cols / 256;
    ds_q6k_x8 *pk = NULL;
    if (posix_memalign((void **)&pk, 64, (sizeof *pk + 8 * sizeof(uint16_t)) * (size_t)G * nb)) return NULL;
    uint16_t *dd = (uint16_t *)(pk + (size_t)G * nb); /* the rows' d, 8 per struct */
#pragma omp parallel for schedule(static)
    for (int32_t g = 0; g < G; g++)
        for (int32_t b = 0; b < nb; b++) {
            ds_q6k_x8 *o = &pk[(size_t)g * nb + b];
            memset(o, 0, sizeof *o);
            for (int r = 0; r < 8; r++) {
                const uint8_t *x = (const uint8_t *)w->data + (size_t)(8 * g + r) * w->row_bytes + (size_t)b * 210;
                const uint8_t *ql = x, *qh = x + 128;
                const int8_t *sc = (const int8_t *)(x + 192);
                memcpy(&dd[((size_t)g * nb + b) * 8 + r], x + 208, 2);
                uint8_t code[256]; /* ggml's order: column 128n + 32k + l */
                for (int n = 0; n < 2; n++)
                    for (int l = 0; l < 32; l++) {
                        const uint8_t a = ql[64 * n + l], c = ql[64 * n + l + 32], h = qh[32 * n + l];
                        code[128 * n + l] = (uint8_t)((a & 15) | (h & 3) << 4);
                        code[128 * n + l + 32] = (uint8_t)((c & 15) | ((h >> 2) & 3) << 4);
                        code[128 * n + l + 64] = (uint8_t)((a >> 4) | ((h >> 4) & 3) << 4);
                        code[128 * n + l + 96] = (uint8_t)((c >> 4) | ((h >> 6) & 3) << 4);
                    }
                for (int j = 0; j < 8; j++) {
                    __typeof__(o->p[0]) *P = &o->p[j / 2];
                    const int jj = j % 2;
                    P->scp[jj][r][0] = sc[2 * j];
                    P->scp[jj][r][1] = sc[2 * j + 1];
                    for (int v = 0; v < 4; v++)
                        for (int i = 0; i < 4; i++) {
                            const uint8_t lo = code[32 * j + 4 * v + i], hi = code[32 * j + 16 + 4 * v + i];
                            P->ql[jj][v][4 * r + i] = (uint8_t)((lo & 15) | (hi & 15) << 4);
                            P->qh[jj][0][4 * r + i] |= (uint8_t)((lo >> 4) << (2 * v));
                            P->qh[jj][1][4 * r + i] |= (uint8_t)((hi >> 4) << (2 * v));
                        }
                }
            }
        }
    return pk;
}

static void *pack_q8(const ds_mat *w) {
    const int32_t G = w->rows / 8, nb = w->cols / 32;
    ds_q8_x8 *pk = NULL;
    if (posix_memalign((void **)&pk, 64, sizeof *pk * (size_t)G * nb)) return NULL;
#pragma omp parallel for schedule(static)
    for (int32_t g = 0; g < G; g++)
        for (int32_t b = 0; b < nb; b++) {
            ds_q8_x8 *o = &pk[(size_t)g * nb + b];
            for (int r = 0; r < 8; r++) {
                const uint8_t *x = (const uint8_t *)w->data + (size_t)(8 * g + r) * w->row_bytes + (size_t)b * 34;
                const int8_t *q = (const int8_t *)(x + 2);
                memcpy(&o->d[r], x, 2);
                for (int v = 0; v < 8; v++)
                    for (int i = 0; i < 4; i++) o->q[v][4 * r + i] = (uint8_t)(q[4 * v + i] + 128);
            }
        }
    return pk;
}

void *ds_q8_pack(const ds_q8_ops *k, const ds_mat *w) {
    if (w->rows < 8 || !k->packed) return NULL;
    if (w->dtype == DS_DTYPE_Q8_0 && k->tile_q8_0 && w->cols % 32 == 0) return pack_q8(w);
    if (w->dtype == DS_DTYPE_Q6_K && w->cols % 256 == 0) return pack_q6k(w);
    if ((w->dtype == DS_DTYPE_Q4_0 || w->dtype == DS_DTYPE_Q4_1) && w->cols % 32 == 0) return pack_q4(w);
    if (w->dtype != DS_DTYPE_Q4_K || w->cols % 256) return NULL;
    const int32_t G = w->rows / 8, nb = w->cols / 256;
    ds_q4k_x8 *pk = NULL;
    if (posix_memalign((void **)&pk, 64, sizeof *pk * (size_t)G * nb)) return NULL;
#pragma omp parallel for schedule(static)
    for (int32_t g = 0; g < G; g++)
        for (int32_t b = 0; b < nb; b++) {
            ds_q4k_x8 *o = &pk[(size_t)g * nb + b];
            for (int r = 0; r < 8; r++) {
                const uint8_t *x = (const uint8_t *)w->data + (size_t)(8 * g + r) * w->row_bytes + (size_t)b * 144;
                memcpy(&o->d[r], x, 2);
                memcpy(&o->dmin[r], x + 2, 2);
                for (int j = 0; j < 8; j++) {
                    uint8_t sc, m;
                    ds_k4_scale_min(j, x + 4, &sc, &m);
                    o->sc[j][r] = sc;
                    o->mn[j / 2][r][j % 2] = m;
                }
                const uint8_t *qs = x + 16; /* sub-block j: nibble j % 2 of bytes 32·(j/2) .. +31 */
                for (int j = 0; j < 8; j++)
                    for (int v = 0; v < 4; v++)
                        for (int i = 0; i < 4; i++) {
                            const int sh = 4 * (j % 2);
                            const uint8_t lo = (qs[32 * (j / 2) + 4 * v + i] >> sh) & 15;
                            const uint8_t hi = (qs[32 * (j / 2) + 16 + 4 * v + i] >> sh) & 15;
                            o->q[j][v][4 * r + i] = (uint8_t)(lo | hi << 4);
                        }
            }
        }
    return pk;
}

/* Tokens per tile pass (a multiple of 8: the 8-token-grouped sums in ds_q8_act.s8 stay aligned). */
#define Q8_TILE_TOKENS 64

typedef struct {
    const ds_q8_ops *k;
    const ds_mat *w;
    const ds_q8_act *a;
    const float *bias;
    float *y;
    int32_t n, chunk;
    bool acc, tile; /* prefill of Q4_K / Q5_K: 8-row tiles (ds_q8_ops.tile8) */
    bool packed;    /* the weight's pack (ds_q8_pack) for its whole 8-row groups */
} q8_job;

/* Rows of one chunk against every token, DS_QK_GEMV_MAX tokens at a time (the chunk's rows stay
 * in cache between the token groups). */
static void q8_chunk(void *arg, int64_t i) {
    const q8_job *j = arg;
    const int32_t M = j->w->rows, K = j->w->cols;
    int32_t r0 = (int32_t)i * j->chunk;
    const int32_t r1 = r0 + j->chunk < M ? r0 + j->chunk : M;
    if (j->packed) { /* the pack's 8-row groups; the rows past the last whole group take gemv below */
        const int32_t M8 = M / 8 * 8, rt = r1 < M8 ? r1 : M8;
        for (int32_t t0 = 0; rt > r0 && t0 < j->n; t0 += Q8_TILE_TOKENS) {
            const int32_t nt = j->n - t0 < Q8_TILE_TOKENS ? j->n - t0 : Q8_TILE_TOKENS;
            const ds_q8_act sub = ds_q8_act_from(j->a, t0, K);
            j->k->packed(j->w, r0, rt, &sub, nt, j->y + (size_t)t0 * M, j->bias, j->acc);
        }
        if (rt > r0) r0 = rt;
        if (r0 >= r1) return;
    } else if (j->tile) { /* whole 8-row tiles; a tail of fewer rows takes gemv below */
        const int32_t rt = r0 + (r1 - r0) / 8 * 8;
        /* tokens in blocks, so that a block's activations stay in L2 while every tile of the chunk
         * reads them (each block unpacks the tiles again: ~5% of the work at 64 tokens) */
        for (int32_t t0 = 0; rt > r0 && t0 < j->n; t0 += Q8_TILE_TOKENS) {
            const int32_t nt = j->n - t0 < Q8_TILE_TOKENS ? j->n - t0 : Q8_TILE_TOKENS;
            const ds_q8_act sub = ds_q8_act_from(j->a, t0, K);
            j->k->tile8(j->w, r0, rt, &sub, nt, j->y + (size_t)t0 * M, j->bias, j->acc);
        }
        r0 = rt;
        if (r0 == r1) return;
    }
    for (int32_t t0 = 0; t0 < j->n; t0 += DS_QK_GEMV_MAX) {
        const int32_t nt = j->n - t0 < DS_QK_GEMV_MAX ? j->n - t0 : DS_QK_GEMV_MAX;
        const ds_q8_act sub = ds_q8_act_from(j->a, t0, K);
        j->k->gemv(j->w, r0, r1, &sub, nt, j->y + (size_t)t0 * M, j->bias, j->acc);
    }
}

int ds_q8_matmul(const ds_q8_ops *k, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                 bool acc, void *buf, struct ds_pool *pool) {
    const int32_t M = w->rows, K = w->cols, blk = ds_q8_blk(w->dtype);
    if (n <= 0) return DS_OK;
    if (!ds_q8_dtype(w->dtype) || K % blk) return DS_EINVAL;
    ds_q8_act a;
    ds_q8_quantize(x, n, K, blk, buf, &a);
    q8_job j = {.k = k, .w = w, .a = &a, .bias = bias, .y = y, .n = n, .acc = acc};
    /* 8-row tiles pay for their unpacking from 2 tokens on (3 for Q8_0, whose gemv is cheaper):
     * bench_qmatmul */
    j.tile = k->tile8 && (w->dtype == DS_DTYPE_Q8_0 ? k->tile_q8_0 && n >= 3 : n >= 2);
    j.packed = w->aux && k->packed;
    if (n <= DS_QK_GEMV_MAX) {
        const int32_t nt = pool ? ds_pool_threads(pool) : 1;
        j.chunk = (M + 8 * nt - 1) / (8 * nt);
        if (j.chunk < 16) j.chunk = 16;
        j.chunk = (j.chunk + 7) / 8 * 8; /* whole tiles */
        const int64_t n_chunks = (M + j.chunk - 1) / j.chunk;
        if (pool) ds_pool_run(pool, n_chunks, q8_chunk, &j);
        else
            for (int64_t i = 0; i < n_chunks; i++) q8_chunk(&j, i);
        return DS_OK;
    }
    j.chunk = 32;
    const int32_t n_chunks = (M + j.chunk - 1) / j.chunk;
#pragma omp parallel for schedule(dynamic, 1)
    for (int32_t i = 0; i < n_chunks; i++) q8_chunk(&j, i);
    return DS_OK;
}
