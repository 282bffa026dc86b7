/* CPU matmul on typed weights, exact (fp32 activations) against int8 activations, one thread:
 * for each format and token count, the thread CPU time per call (CLOCK_THREAD_CPUTIME_ID, so time
 * spent descheduled by other processes is not counted) and the weight bytes streamed per second.
 *
 *   bench_qmatmul [--rows M] [--cols K (a multiple of 32; 256 for the K-quants)] [--n 1,8,64] [--reps R] [--isa generic|avx2|avx512] [--dtype Q6_K]
 *
 * Weights are random blocks (sane scales); the figures are kernel throughput only. */
#include "backend/cpu/cpu_env.h"
#include "backend/cpu/qmatmul.h"
#include "ds/common.h"
#include "ds/weight.h"

#include <omp.h>
#include <strings.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t st = 0x243F6A8885A308D3ull;
static uint64_t rnd(void) {
    uint64_t z = (st += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Random blocks with a small positive f16 scale (and min) where each block format keeps them. */
static uint8_t *rnd_weights(ds_dtype t, int32_t rows, int32_t cols) {
    const size_t rb = ds_dtype_row_bytes(t, cols), bb = ds_dtype_block_bytes(t), total = rb * (size_t)rows;
    uint8_t *w = malloc(total);
    for (size_t i = 0; i < total; i++) w[i] = (uint8_t)rnd();
    const uint16_t h = ds_f32_to_f16(0.02f);
    for (size_t b = 0; b < total / bb; b++) {
        uint8_t *x = w + b * bb;
        if (t == DS_DTYPE_Q6_K) memcpy(x + 208, &h, 2);
        else memcpy(x, &h, 2);
        if (t == DS_DTYPE_Q4_1 || t == DS_DTYPE_Q4_K || t == DS_DTYPE_Q5_K) memcpy(x + 2, &h, 2);
    }
    return w;
}

int main(int argc, char **argv) {
    ds_cpu_env_reexec(argv); /* the server's OpenMP and OpenBLAS settings (src/main.c): the exact
                              * path's tiles multiply with OpenBLAS, whose own CPU choice can be SSE3 */
    int32_t M = 2048, K = 2048, reps = 20, ns[8] = {1, 8, 64}, n_ns = 3;
    const char *isa = NULL, *only = NULL; /* --dtype: one format only */
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rows")) M = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cols")) K = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--isa")) isa = argv[i + 1];
        else if (!strcmp(argv[i], "--dtype")) only = argv[i + 1];
        else if (!strcmp(argv[i], "--n")) {
            n_ns = 0;
            for (char *p = argv[i + 1]; *p && n_ns < 8; p++) {
                ns[n_ns++] = (int32_t)strtol(p, &p, 10);
                if (!*p) break;
            }
        } else return fprintf(stderr, "usage: %s [--rows M] [--cols K] [--n 1,8,64] [--reps R] [--isa NAME] [--dtype NAME]\n", argv[0]), 2;
    }
    if (M < 1 || K < 32 || K % 32 || reps < 1) return fprintf(stderr, "bench_qmatmul: cols must be a multiple of 32\n"), 2;
    omp_set_num_threads(1);
    const char *qk_name, *q8_name;
    const ds_qk_ops *qk = isa ? ds_qk_by_name(isa) : ds_qk_best(&qk_name);
    const ds_q8_ops *q8 = ds_q8_best(&q8_name);
    if (isa) qk_name = isa;
    if (!qk) return fprintf(stderr, "bench_qmatmul: this CPU lacks %s\n", isa), 2;
    printf("bench_qmatmul: %d x %d, one thread, exact kernels %s, int8 kernels %s\n", M, K, qk_name, q8_name);
    printf("%-5s %4s  %12s %10s  %12s %10s  %7s  %9s %8s\n", "dtype", "n", "exact ms", "GB/s", "int8 ms", "GB/s", "speedup",
           "packed ms", "GB/s");
    static const ds_dtype dts[] = {DS_DTYPE_Q4_0, DS_DTYPE_Q4_1, DS_DTYPE_Q8_0, DS_DTYPE_Q4_K, DS_DTYPE_Q5_K, DS_DTYPE_Q6_K};
    int32_t nmax = 1;
    for (int i = 0; i < n_ns; i++) nmax = ns[i] > nmax ? ns[i] : nmax;
    float *x = malloc(sizeof(float) * (size_t)nmax * K), *y = malloc(sizeof(float) * (size_t)nmax * M);
    for (size_t i = 0; i < (size_t)nmax * K; i++) x[i] = (float)((double)(rnd() >> 11) / 9007199254740992.0 - 0.5);
    float *scratch = malloc(sizeof(float) * ds_qk_scratch_floats(1));
    void *buf = malloc(ds_q8_act_bytes(nmax, K));
    for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++) {
        if (only && strcasecmp(only, ds_dtype_name(dts[d]))) continue;
        if (K % ds_dtype_block(dts[d])) continue; /* the K-quants need cols % 256 == 0 */
        uint8_t *w = rnd_weights(dts[d], M, K);
        const ds_mat m = {.data = w, .rows = M, .cols = K, .dtype = dts[d], .row_bytes = ds_dtype_row_bytes(dts[d], K),
                          .borrowed = true};
        ds_mat mp = m; /* int8 mode's upload-time pack (ds_q8_pack), where the format has one */
        mp.aux = ds_q8_pack(q8, &m);
        const double bytes = (double)m.row_bytes * M;
        for (int i = 0; i < n_ns; i++) {
            const int32_t n = ns[i];
            double t_ex = 1e30, t_q8 = 1e30, t_pk = 1e30;
            for (int r = 0; r < reps; r++) { /* best of reps, alternating the two paths */
                double t0 = cpu_s();
                ds_qk_matmul(qk, x, &m, NULL, y, n, false, scratch, NULL);
                double t1 = cpu_s();
                ds_q8_matmul(q8, x, &m, NULL, y, n, false, buf, NULL);
                double t2 = cpu_s();
                if (mp.aux) ds_q8_matmul(q8, x, &mp, NULL, y, n, false, buf, NULL);
                double t3 = cpu_s();
                t_ex = t1 - t0 < t_ex ? t1 - t0 : t_ex;
                t_q8 = t2 - t1 < t_q8 ? t2 - t1 : t_q8;
                t_pk = t3 - t2 < t_pk ? t3 - t2 : t_pk;
            }
            printf("%-5s %4d  %12.3f %10.2f  %12.3f %10.2f  %6.2fx", ds_dtype_name(dts[d]), n, 1e3 * t_ex,
                   bytes / t_ex / 1e9, 1e3 * t_q8, bytes / t_q8 / 1e9, t_ex / t_q8);
            if (mp.aux) printf("  %9.3f %8.2f\n", 1e3 * t_pk, bytes / t_pk / 1e9);
            else printf("          -        -\n");
        }
        free(mp.aux);
        free(w);
    }
    free(x), free(y), free(scratch), free(buf);
    return 0;
}
