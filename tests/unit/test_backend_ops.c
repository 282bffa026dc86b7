/* Every backend op on every available backend against a naive double-precision reference written
 * here (llama.cpp test-backend-ops style; docs/ARCHITECTURE.md, "The backend interface and how to
 * extend it").
 *
 *   test_backend_ops           cpu, then cuda when ds_backend_create("cuda") succeeds (else it
 *                              prints "cuda: skipped: <reason>" and still passes)
 *   test_backend_ops cuda      cuda only; exit 77 (ctest: skipped) when there is no device
 *   test_backend_ops cpu       cpu only
 *
 * Error measure: normalised mean squared error, NMSE = Σ(y − ref)² / Σ ref², per op, against these
 * tolerances (chosen per backend, see tolerances_for):
 *   data movement (copy, get_rows, kv_store, set_rows, memory)        0 (bit-exact)
 *   fp32 arithmetic (rmsnorm, rope, silu_mul, gelu_tanh_mul, scale, add, attention, lora,
 *                    seg_scale, seg_add, sparse)                       CPU 1e-10, CUDA 1e-9
 *   matmul (CUDA: bf16 weights and bf16 inputs, fp32 accumulate)       CPU 1e-10, CUDA 1e-4
 *   embed (CUDA: bf16 table)                                           CPU 0,     CUDA 1e-4
 * Typed weights (test_typed): every ds_dtype with random blocks, against the dequantised values
 * from ds_dequant_row in double precision, same matmul/embed tolerances; on the CPU the kernels
 * of every instruction set this machine has (generic, avx2, avx512) are run as well
 * (test_cpu_isas), so a machine with AVX-512 checks all three.
 * A bf16 rounding has a relative error ≤ 2^-9, so bf16 NMSE is ~1e-6; an indexing bug gives ~1. */
#include "backend/cpu/qmatmul.h"
#include "ds/backend.h"
#include "ds_test.h"
#include "unit/rand_weights.h"

#include <omp.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- harness ---- */

typedef struct tcase {
    ds_backend *b;
    const char *name;
    double tol_f32, tol_gemm, tol_embed;
    void *allocs[64];
    int n_allocs;
} tcase;

static void *t_alloc(tcase *t, size_t bytes) {
    void *p = t->b->iface->alloc(t->b->ctx, bytes);
    CHECK_MSG(p != NULL, "%s: alloc(%zu) failed", t->name, bytes);
    if (p && t->n_allocs < (int)(sizeof t->allocs / sizeof t->allocs[0])) t->allocs[t->n_allocs++] = p;
    return p;
}

static void *t_up(tcase *t, const void *host, size_t bytes) {
    void *d = t_alloc(t, bytes);
    if (d) CHECK_EQ_INT(t->b->iface->upload(t->b->ctx, d, host, bytes), DS_OK);
    return d;
}

static void t_down(tcase *t, void *host, const void *dev, size_t bytes) {
    CHECK_EQ_INT(t->b->iface->synchronize(t->b->ctx), DS_OK); /* surfaces asynchronous failures */
    CHECK_EQ_INT(t->b->iface->download(t->b->ctx, host, dev, bytes), DS_OK);
}

static void t_release_all(tcase *t) {
    for (int i = 0; i < t->n_allocs; i++) t->b->iface->release(t->b->ctx, t->allocs[i]);
    t->n_allocs = 0;
}

static void t_ok(tcase *t, const char *op, int st) {
    CHECK_MSG(st == DS_OK, "%s %s: %s", t->name, op, ds_strerror(st));
}

/* NMSE of got against ref; prints one line per case and counts a failure above tol. */
static void expect(tcase *t, const char *op, const char *what, const float *got, const double *ref, size_t n,
                   double tol) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double e = (double)got[i] - ref[i];
        num += e * e;
        den += ref[i] * ref[i];
    }
    const double nmse = den > 0.0 ? num / den : num;
    printf("%-5s %-10s %-40s nmse %.2e (tol %.0e)\n", t->name, op, what, nmse, tol);
    CHECK_MSG(nmse <= tol, "%s %s %s: nmse %.3e > %.0e", t->name, op, what, nmse, tol);
}

static double *dvec(size_t n) { return calloc(n ? n : 1, sizeof(double)); }

/* ---- memory ---- */

static void test_memory(tcase *t) {
    const size_t sizes[] = {1, 1000, (size_t)3 << 20}; /* the last crosses CUDA's staging ring */
    for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
        const size_t n = sizes[c];
        float *h = rnd_vec(n, 1.0f), *back = malloc(n * sizeof(float));
        double *ref = dvec(n);
        char what[64];
        float *z = t_alloc(t, n * sizeof(float));
        t_down(t, back, z, n * sizeof(float));
        snprintf(what, sizeof what, "alloc zeroed n=%zu", n);
        expect(t, "memory", what, back, ref, n, 0.0);
        float *d = t_up(t, h, n * sizeof(float));
        t_ok(t, "copy", t->b->iface->copy(t->b->ctx, z, d, n * sizeof(float)));
        t_down(t, back, z, n * sizeof(float));
        for (size_t i = 0; i < n; i++) ref[i] = h[i];
        snprintf(what, sizeof what, "upload+copy+download n=%zu", n);
        expect(t, "memory", what, back, ref, n, 0.0);
        t_release_all(t);
        free(h), free(back), free(ref);
    }
}

/* ---- matmul, embed ---- */

/* f32_mat: the weight is a plain fp32 backend buffer (dtype F32) instead of mat_upload's format. */
static void matmul_case(tcase *t, int32_t n, int32_t rows, int32_t cols, bool use_bias, bool acc, bool f32_mat) {
    float *x = rnd_vec((size_t)n * cols, 1.0f), *w = rnd_vec((size_t)rows * cols, 0.5f);
    float *bias = rnd_vec((size_t)rows, 1.0f), *y0 = rnd_vec((size_t)n * rows, 1.0f);
    float *got = malloc(sizeof(float) * (size_t)n * rows);
    double *ref = dvec((size_t)n * rows);
    for (int32_t i = 0; i < n; i++)
        for (int32_t r = 0; r < rows; r++) {
            double s = acc ? y0[(size_t)i * rows + r] : 0.0;
            for (int32_t k = 0; k < cols; k++) s += (double)x[(size_t)i * cols + k] * w[(size_t)r * cols + k];
            ref[(size_t)i * rows + r] = s + (use_bias ? bias[r] : 0.0);
        }
    ds_mat m = {0};
    if (f32_mat)
        m = (ds_mat){.data = t_up(t, w, sizeof(float) * (size_t)rows * cols), .rows = rows, .cols = cols,
                     .dtype = DS_DTYPE_F32, .row_bytes = sizeof(float) * (size_t)cols, .borrowed = true};
    else
    {
        ds_weight hw;
        ds_weight_init(&hw, w, DS_DTYPE_F32, rows, cols);
        t_ok(t, "mat_upload", t->b->iface->mat_upload(t->b->ctx, &hw, &m));
    }
    float *dx = t_up(t, x, sizeof(float) * (size_t)n * cols), *dy = t_up(t, y0, sizeof(float) * (size_t)n * rows);
    float *db = t_up(t, bias, sizeof(float) * rows);
    t_ok(t, "matmul", t->b->iface->matmul(t->b->ctx, dx, &m, use_bias ? db : NULL, dy, n, acc));
    t_down(t, got, dy, sizeof(float) * (size_t)n * rows);
    char what[80];
    snprintf(what, sizeof what, "n=%d %dx%d%s%s%s", n, rows, cols, use_bias ? " bias" : "", acc ? " accumulate" : "",
             f32_mat ? " f32-weights" : "");
    expect(t, "matmul", what, got, ref, (size_t)n * rows, f32_mat ? t->tol_f32 : t->tol_gemm);
    t->b->iface->mat_free(t->b->ctx, &m);
    t_release_all(t);
    free(x), free(w), free(bias), free(y0), free(got), free(ref);
}

static void test_matmul(tcase *t) {
    const int32_t shapes[][3] = {{1, 37, 53}, {300, 37, 53}, {7, 64, 128}, {300, 256, 96}, {1, 1000, 576}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int v = 0; v < 4; v++) matmul_case(t, shapes[s][0], shapes[s][1], shapes[s][2], v & 1, v & 2, false);
    matmul_case(t, 1, 37, 53, true, true, true);
    matmul_case(t, 300, 256, 96, true, false, true);
}

static void test_embed(tcase *t) {
    const int32_t vocab = 50, d = 37;
    float *table = rnd_vec((size_t)vocab * d, 1.0f);
    ds_mat m = {0};
    ds_weight hw;
    ds_weight_init(&hw, table, DS_DTYPE_F32, vocab, d);
    t_ok(t, "mat_upload", t->b->iface->mat_upload(t->b->ctx, &hw, &m));
    for (int32_t n = 1; n <= 300; n += 299) {
        int32_t *ids = malloc(sizeof(int32_t) * n);
        for (int32_t i = 0; i < n; i++) ids[i] = i == 0 ? vocab - 1 : rnd_i(vocab);
        float *got = malloc(sizeof(float) * (size_t)n * d);
        double *ref = dvec((size_t)n * d);
        for (int32_t i = 0; i < n; i++)
            for (int32_t j = 0; j < d; j++) ref[(size_t)i * d + j] = table[(size_t)ids[i] * d + j];
        int32_t *dids = t_up(t, ids, sizeof(int32_t) * n);
        float *dout = t_alloc(t, sizeof(float) * (size_t)n * d);
        t_ok(t, "embed", t->b->iface->embed(t->b->ctx, &m, dids, dout, n));
        t_down(t, got, dout, sizeof(float) * (size_t)n * d);
        char what[64];
        snprintf(what, sizeof what, "n=%d vocab=%d d=%d", n, vocab, d);
        expect(t, "embed", what, got, ref, (size_t)n * d, t->tol_embed);
        t_release_all(t);
        free(ids), free(got), free(ref);
    }
    /* An out-of-range id is an error, reported by the op (CPU) or by the next synchronize (CUDA);
     * either way the backend stays usable. */
    const int32_t bad[2] = {0, vocab};
    int32_t *dbad = t_up(t, bad, sizeof bad);
    float *dout = t_alloc(t, sizeof(float) * 2 * d);
    int st = t->b->iface->embed(t->b->ctx, &m, dbad, dout, 2);
    int st_sync = t->b->iface->synchronize(t->b->ctx);
    CHECK_MSG(st != DS_OK || st_sync != DS_OK, "%s embed: id %d of %d accepted", t->name, vocab, vocab);
    CHECK_EQ_INT(t->b->iface->synchronize(t->b->ctx), DS_OK);
    printf("%-5s %-10s %-40s status %s / %s\n", t->name, "embed", "out-of-range id", ds_strerror(st),
           ds_strerror(st_sync));
    t_release_all(t);
    t->b->iface->mat_free(t->b->ctx, &m);
    free(table);
}

/* ---- typed weights: every storage format (ds/weight.h) ---- */

static const ds_dtype ALL_DTYPES[] = {DS_DTYPE_F32,  DS_DTYPE_F16,  DS_DTYPE_BF16, DS_DTYPE_Q4_0,
                                      DS_DTYPE_Q4_1, DS_DTYPE_Q5_0, DS_DTYPE_Q5_1, DS_DTYPE_Q8_0,
                                      DS_DTYPE_Q4_K, DS_DTYPE_Q5_K, DS_DTYPE_Q6_K};
#define N_DTYPES (sizeof ALL_DTYPES / sizeof ALL_DTYPES[0])

static void typed_case(tcase *t, ds_dtype dt, int32_t n, int32_t rows, int32_t cols, bool bias_acc) {
    uint8_t *w = rnd_typed(dt, rows, cols);
    float *wf = dequant_all(dt, w, rows, cols);
    float *x = rnd_vec((size_t)n * cols, 1.0f), *bias = rnd_vec((size_t)rows, 1.0f), *y0 = rnd_vec((size_t)n * rows, 1.0f);
    float *dy = rnd_vec((size_t)n * rows, 1.0f), *dx0 = rnd_vec((size_t)n * cols, 1.0f);
    float *got = malloc(sizeof(float) * (size_t)n * (rows > cols ? rows : cols));
    double *ref = dvec((size_t)n * (rows > cols ? rows : cols));
    for (int32_t i = 0; i < n; i++)
        for (int32_t r = 0; r < rows; r++) {
            double s = bias_acc ? (double)y0[(size_t)i * rows + r] + bias[r] : 0.0;
            for (int32_t k = 0; k < cols; k++) s += (double)x[(size_t)i * cols + k] * wf[(size_t)r * cols + k];
            ref[(size_t)i * rows + r] = s;
        }
    ds_weight hw;
    CHECK_EQ_INT(ds_weight_init(&hw, w, dt, rows, cols), 0);
    ds_mat m = {0};
    char what[96];
    snprintf(what, sizeof what, "%s n=%d %dx%d%s", ds_dtype_name(dt), n, rows, cols, bias_acc ? " bias+acc" : "");
    int st = t->b->iface->mat_upload(t->b->ctx, &hw, &m);
    t_ok(t, "mat_upload", st);
    if (st) goto out;
    float *dxin = t_up(t, x, sizeof(float) * (size_t)n * cols), *dyout = t_up(t, y0, sizeof(float) * (size_t)n * rows);
    float *db = t_up(t, bias, sizeof(float) * rows);
    t_ok(t, "matmul", t->b->iface->matmul(t->b->ctx, dxin, &m, bias_acc ? db : NULL, dyout, n, bias_acc));
    t_down(t, got, dyout, sizeof(float) * (size_t)n * rows);
    expect(t, "matmul", what, got, ref, (size_t)n * rows, t->tol_gemm);
    if (t->b->iface->matmul_t) { /* dx (+)= dy·W */
        for (int32_t i = 0; i < n; i++)
            for (int32_t k = 0; k < cols; k++) {
                double s = bias_acc ? dx0[(size_t)i * cols + k] : 0.0;
                for (int32_t r = 0; r < rows; r++) s += (double)dy[(size_t)i * rows + r] * wf[(size_t)r * cols + k];
                ref[(size_t)i * cols + k] = s;
            }
        float *ddy = t_up(t, dy, sizeof(float) * (size_t)n * rows), *ddx = t_up(t, dx0, sizeof(float) * (size_t)n * cols);
        t_ok(t, "matmul_t", t->b->iface->matmul_t(t->b->ctx, ddy, &m, ddx, n, bias_acc));
        t_down(t, got, ddx, sizeof(float) * (size_t)n * cols);
        expect(t, "matmul_t", what, got, ref, (size_t)n * cols, t->tol_gemm);
    }
    if (n == 3) { /* embed rows of the typed table */
        int32_t ids[3] = {rows - 1, 0, rnd_i(rows)};
        for (int32_t i = 0; i < 3; i++)
            for (int32_t k = 0; k < cols; k++) ref[(size_t)i * cols + k] = wf[(size_t)ids[i] * cols + k];
        int32_t *dids = t_up(t, ids, sizeof ids);
        float *dout = t_alloc(t, sizeof(float) * 3 * (size_t)cols);
        t_ok(t, "embed", t->b->iface->embed(t->b->ctx, &m, dids, dout, 3));
        t_down(t, got, dout, sizeof(float) * 3 * (size_t)cols);
        expect(t, "embed", what, got, ref, 3 * (size_t)cols, t->tol_embed);
    }
    t->b->iface->mat_free(t->b->ctx, &m);
out:
    t_release_all(t);
    free(w), free(wf), free(x), free(bias), free(y0), free(dy), free(dx0), free(got), free(ref);
}

/* Awkward shapes: n = 1, odd n, the gemv/tile boundaries (8, 9; 16, 17 for the fused kernels),
 * rows that are not a multiple of any tile, several column blocks, columns past one K chunk
 * (2304 = 2048 + 256), 64-token passes of the tile GEMM (80, 129) and the few tokens past a
 * multiple of 16 that it takes as dot products (17, 20, 37, 66, 70), and for the 16/32-bit formats
 * columns that are not a multiple of 32. */
static void test_typed(tcase *t) {
    for (size_t d = 0; d < N_DTYPES; d++) {
        const ds_dtype dt = ALL_DTYPES[d];
        const int32_t B = ds_dtype_block(dt), k1 = B == 256 ? 256 : 96, k2 = B == 256 ? 768 : 160;
        typed_case(t, dt, 1, 37, k1, false);
        typed_case(t, dt, 3, 64, k2, true);
        typed_case(t, dt, 8, 33, k1, true);
        typed_case(t, dt, 9, 70, k2, false);
        typed_case(t, dt, 16, 33, k2, true);
        typed_case(t, dt, 17, 20, k1, false);
        typed_case(t, dt, 37, 45, k2, true);
        typed_case(t, dt, 2, 17, 2304, true);
        typed_case(t, dt, 20, 40, 2304, false);
        /* the CPU's own tile GEMM (qgemm.h): passes of 64 tokens (80 = 64 + 16: four vectors, then
         * one), 16×16 transposes and their tails; 129 tokens go to OpenBLAS */
        typed_case(t, dt, 80, 50, k2, true);
        typed_case(t, dt, 66, 41, k1, true); /* 64 + 2: the last tokens by dot products (gt_dot) */
        typed_case(t, dt, 129, 18, k1, false);
        if (B == 1) typed_case(t, dt, 5, 29, 53, true);
        if (B == 1) typed_case(t, dt, 70, 35, 53, false);
    }
}

/* The CPU kernels of each instruction set, called directly (the backend uses only the best). */
static void test_cpu_isas(void) {
    static const char *isas[] = {"generic", "avx2", "avx512"};
    const int32_t shapes[][3] = {{1, 37, 768}, {3, 33, 256}, {9, 40, 2304}, {40, 65, 512}};
    float *scratch = malloc(sizeof(float) * ds_qk_scratch_floats(omp_get_max_threads()));
    for (size_t i = 0; i < 3; i++) {
        const ds_qk_ops *k = ds_qk_by_name(isas[i]);
        if (!k) {
            printf("cpu   isa %-7s skipped: this CPU lacks it\n", isas[i]);
            continue;
        }
        for (size_t d = 0; d < N_DTYPES; d++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
                const ds_dtype dt = ALL_DTYPES[d];
                const int32_t n = shapes[s][0], rows = shapes[s][1], cols = shapes[s][2];
                uint8_t *w = rnd_typed(dt, rows, cols);
                float *wf = dequant_all(dt, w, rows, cols), *x = rnd_vec((size_t)n * cols, 1.0f);
                float *y = malloc(sizeof(float) * (size_t)n * rows);
                double *ref = dvec((size_t)n * rows);
                for (int32_t a = 0; a < n; a++)
                    for (int32_t r = 0; r < rows; r++) {
                        double acc = 0;
                        for (int32_t c = 0; c < cols; c++) acc += (double)x[(size_t)a * cols + c] * wf[(size_t)r * cols + c];
                        ref[(size_t)a * rows + r] = acc;
                    }
                ds_mat m = {.data = w, .rows = rows, .cols = cols, .dtype = dt,
                            .row_bytes = ds_dtype_row_bytes(dt, cols), .borrowed = true};
                CHECK_EQ_INT(ds_qk_matmul(k, x, &m, NULL, y, n, false, scratch, NULL), 0);
                char what[80];
                snprintf(what, sizeof what, "%s %s n=%d %dx%d", isas[i], ds_dtype_name(dt), n, rows, cols);
                tcase t = {.name = "cpu"};
                expect(&t, "qk", what, y, ref, (size_t)n * rows, 1e-10);
                free(w), free(wf), free(x), free(y), free(ref);
            }
        /* softmax's exponentials (exp_sum): every element within 4e-7 of e^x relative (libm's expf
         * is within ~1.2e-7), from −90 (below the underflow cut: 0) up to the shift itself, and
         * a length with a vector tail */
        enum { NE = 1237 };
        float p[NE], m = 3.5f;
        for (int32_t j = 0; j < NE; j++) p[j] = m - 90.0f * (float)j / (NE - 1);
        double sum_ref = 0.0, worst = 0.0;
        float want[NE];
        for (int32_t j = 0; j < NE; j++) want[j] = p[j] - m, sum_ref += exp((double)want[j]);
        const float sum = k->exp_sum(p, NE, m);
        for (int32_t j = 0; j < NE; j++) {
            const double e = exp((double)want[j]);
            const double err = want[j] < -87.3f ? fabs((double)p[j] - e) : fabs((double)p[j] - e) / e;
            if (err > worst) worst = err;
        }
        printf("cpu   exp_sum    %-7s worst relative error %.2e, sum %.7g (ref %.7g)\n", isas[i], worst, sum, sum_ref);
        CHECK(worst <= 4e-7);
        CHECK(fabs(sum - sum_ref) <= 1e-6 * sum_ref);
        /* SiLU(g)·u over [−100, 100] (both exp16 tails), odd length: within 1e-6 relative or 1e-30 */
        float gs[NE], us[NE], out[NE];
        double sworst = 0.0;
        for (int32_t j = 0; j < NE; j++) gs[j] = -100.0f + 200.0f * (float)j / (NE - 1), us[j] = 1.0f + (float)(j % 7) * 0.25f;
        k->silu_mul(gs, us, out, NE);
        for (int32_t j = 0; j < NE; j++) {
            const double r = (double)gs[j] / (1.0 + exp(-(double)gs[j])) * us[j];
            const double err = fabs(out[j] - r) / (fabs(r) + 1e-30);
            if (fabs(r) > 1e-30 && err > sworst) sworst = err;
        }
        printf("cpu   silu_mul   %-7s worst relative error %.2e\n", isas[i], sworst);
        CHECK(sworst <= 1e-6);
    }
    free(scratch);
}

/* ---- rmsnorm, rope, silu_mul, add ---- */

static void test_rmsnorm(tcase *t) {
    const int32_t dims[] = {37, 576, 4100};
    for (int32_t n = 1; n <= 300; n += 299)
        for (size_t c = 0; c < sizeof dims / sizeof dims[0]; c++) {
            const int32_t d = dims[c];
            const float eps = 1e-5f;
            float *x = rnd_vec((size_t)n * d, 3.0f), *w = rnd_vec((size_t)d, 2.0f);
            float *got = malloc(sizeof(float) * (size_t)n * d);
            double *ref = dvec((size_t)n * d);
            for (int32_t i = 0; i < n; i++) {
                double ss = 0.0;
                for (int32_t j = 0; j < d; j++) ss += (double)x[(size_t)i * d + j] * x[(size_t)i * d + j];
                const double r = 1.0 / sqrt(ss / d + eps);
                for (int32_t j = 0; j < d; j++) ref[(size_t)i * d + j] = x[(size_t)i * d + j] * r * w[j];
            }
            float *dx = t_up(t, x, sizeof(float) * (size_t)n * d), *dw = t_up(t, w, sizeof(float) * d);
            float *dy = t_alloc(t, sizeof(float) * (size_t)n * d);
            t_ok(t, "rmsnorm", t->b->iface->rmsnorm(t->b->ctx, dx, dw, dy, n, d, eps));
            t_down(t, got, dy, sizeof(float) * (size_t)n * d);
            char what[64];
            snprintf(what, sizeof what, "n=%d d=%d", n, d);
            expect(t, "rmsnorm", what, got, ref, (size_t)n * d, t->tol_f32);
            t_release_all(t);
            free(x), free(w), free(got), free(ref);
        }
}

static void test_rope(tcase *t) {
    const int32_t head_dims[] = {64, 18}, n_head = 3;
    for (int32_t n = 1; n <= 300; n += 299)
        for (size_t c = 0; c < 2; c++) {
            const int32_t hd = head_dims[c], half = hd / 2;
            const size_t total = (size_t)n * n_head * hd;
            float *x = rnd_vec(total, 1.0f), *inv = malloc(sizeof(float) * half), *got = malloc(sizeof(float) * total);
            int32_t *pos = malloc(sizeof(int32_t) * n);
            double *ref = dvec(total);
            for (int32_t i = 0; i < half; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / hd));
            for (int32_t i = 0; i < n; i++) pos[i] = i == 0 && n > 1 ? 0 : 1 + rnd_i(4095);
            for (int32_t i = 0; i < n; i++)
                for (int32_t h = 0; h < n_head; h++)
                    for (int32_t j = 0; j < half; j++) {
                        const float f = (float)pos[i] * inv[j]; /* the angle is an fp32 product, as in HF */
                        const size_t o = ((size_t)i * n_head + h) * hd;
                        const double a = x[o + j], b = x[o + j + half];
                        ref[o + j] = a * cos((double)f) - b * sin((double)f);
                        ref[o + j + half] = b * cos((double)f) + a * sin((double)f);
                    }
            float *dx = t_up(t, x, sizeof(float) * total), *dinv = t_up(t, inv, sizeof(float) * half);
            int32_t *dpos = t_up(t, pos, sizeof(int32_t) * n);
            t_ok(t, "rope", t->b->iface->rope(t->b->ctx, dx, dpos, dinv, n, n_head, hd));
            t_down(t, got, dx, sizeof(float) * total);
            char what[64];
            snprintf(what, sizeof what, "n=%d heads=%d head_dim=%d", n, n_head, hd);
            expect(t, "rope", what, got, ref, total, t->tol_f32);
            t_release_all(t);
            free(x), free(inv), free(got), free(pos), free(ref);
        }
}

static void test_silu_add(tcase *t) {
    const size_t sizes[] = {1, 300 * 37 + 1};
    for (size_t c = 0; c < 2; c++) {
        const size_t n = sizes[c];
        float *g = rnd_vec(n, 6.0f), *u = rnd_vec(n, 2.0f), *got = malloc(sizeof(float) * n);
        double *ref = dvec(n);
        char what[64];
        for (size_t i = 0; i < n; i++) ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
        float *dg = t_up(t, g, sizeof(float) * n), *du = t_up(t, u, sizeof(float) * n);
        t_ok(t, "silu_mul", t->b->iface->silu_mul(t->b->ctx, dg, du, dg, n)); /* in place, as the forward */
        t_down(t, got, dg, sizeof(float) * n);
        snprintf(what, sizeof what, "n=%zu out=gate", n);
        expect(t, "silu_mul", what, got, ref, n, t->tol_f32);
        for (size_t i = 0; i < n; i++) ref[i] = (double)got[i] + u[i];
        t_ok(t, "add", t->b->iface->add(t->b->ctx, dg, du, n));
        t_down(t, got, dg, sizeof(float) * n);
        snprintf(what, sizeof what, "n=%zu", n);
        expect(t, "add", what, got, ref, n, t->tol_f32);
        if (t->b->iface->gelu_tanh_mul && t->b->iface->scale) { /* Gemma 3's GeGLU and embedding scale */
            const double k = sqrt(2.0 / M_PI);
            for (size_t i = 0; i < n; i++) {
                const double x = g[i];
                ref[i] = 0.5 * x * (1.0 + tanh(k * (x + 0.044715 * x * x * x))) * u[i];
            }
            float *dg2 = t_up(t, g, sizeof(float) * n);
            t_ok(t, "gelu_tanh_mul", t->b->iface->gelu_tanh_mul(t->b->ctx, dg2, du, dg2, n));
            t_down(t, got, dg2, sizeof(float) * n);
            snprintf(what, sizeof what, "n=%zu out=gate", n);
            expect(t, "gelu_tanh_mul", what, got, ref, n, t->tol_f32);
            for (size_t i = 0; i < n; i++) ref[i] = (double)got[i] * 8.0;
            t_ok(t, "scale", t->b->iface->scale(t->b->ctx, dg2, 8.0f, n));
            t_down(t, got, dg2, sizeof(float) * n);
            snprintf(what, sizeof what, "n=%zu s=8", n);
            expect(t, "scale", what, got, ref, n, t->tol_f32);
        }
        t_release_all(t);
        free(g), free(u), free(got), free(ref);
    }
}

/* ---- get_rows, kv_store, set_rows, seg ops ---- */

static void test_rows(tcase *t) {
    const int32_t src_rows = 50, d = 37;
    float *src = rnd_vec((size_t)src_rows * d, 1.0f);
    float *dsrc = t_up(t, src, sizeof(float) * (size_t)src_rows * d);
    for (int32_t n = 1; n <= 300; n += 299) {
        int32_t *idx = malloc(sizeof(int32_t) * n);
        float *got = malloc(sizeof(float) * (size_t)n * d);
        double *ref = dvec((size_t)n * d);
        for (int32_t i = 0; i < n; i++) idx[i] = rnd_i(src_rows);
        for (int32_t i = 0; i < n; i++)
            for (int32_t j = 0; j < d; j++) ref[(size_t)i * d + j] = src[(size_t)idx[i] * d + j];
        int32_t *didx = t_up(t, idx, sizeof(int32_t) * n);
        float *ddst = t_alloc(t, sizeof(float) * (size_t)n * d);
        t_ok(t, "get_rows", t->b->iface->get_rows(t->b->ctx, dsrc, didx, ddst, n, d));
        t_down(t, got, ddst, sizeof(float) * (size_t)n * d);
        char what[64];
        snprintf(what, sizeof what, "n=%d d=%d", n, d);
        expect(t, "get_rows", what, got, ref, (size_t)n * d, 0.0);
        free(idx), free(got), free(ref);
    }
    /* set_rows: sources are row pointers into the middle of one buffer; destination rows unordered. */
    const int32_t dst_rows = 20, rows[] = {3, 0, 19};
    float *dst = rnd_vec((size_t)dst_rows * d, 1.0f), *got = malloc(sizeof(float) * (size_t)dst_rows * d);
    double *ref = dvec((size_t)dst_rows * d);
    float *ddst = t_up(t, dst, sizeof(float) * (size_t)dst_rows * d);
    const float *srcp[3] = {dsrc + 7 * d, dsrc + 0 * d, dsrc + 49 * d};
    const int32_t from[3] = {7, 0, 49};
    for (size_t i = 0; i < (size_t)dst_rows * d; i++) ref[i] = dst[i];
    for (int i = 0; i < 3; i++)
        for (int32_t j = 0; j < d; j++) ref[(size_t)rows[i] * d + j] = src[(size_t)from[i] * d + j];
    t_ok(t, "set_rows", t->b->iface->set_rows(t->b->ctx, ddst, d, rows, srcp, 3));
    t_down(t, got, ddst, sizeof(float) * (size_t)dst_rows * d);
    expect(t, "set_rows", "3 of 20 rows, width 37", got, ref, (size_t)dst_rows * d, 0.0);
    t_release_all(t);
    free(src), free(dst), free(got), free(ref);
}

static void test_kv_store(tcase *t) {
    const int32_t n_slots = 256, row = 40;
    const size_t pool = (size_t)n_slots * row;
    for (int32_t n = 1; n <= 200; n += 199) {
        float *kc = rnd_vec(pool, 1.0f), *vc = rnd_vec(pool, 1.0f), *k = rnd_vec((size_t)n * row, 1.0f);
        float *v = rnd_vec((size_t)n * row, 1.0f), *got = malloc(sizeof(float) * pool);
        double *rk = dvec(pool), *rv = dvec(pool);
        int64_t *slot = malloc(sizeof(int64_t) * n_slots);
        for (int32_t i = 0; i < n_slots; i++) slot[i] = i;
        for (int32_t i = n_slots - 1; i > 0; i--) { /* distinct slots, shuffled */
            const int32_t j = rnd_i(i + 1);
            const int64_t tmp = slot[i];
            slot[i] = slot[j], slot[j] = tmp;
        }
        for (size_t i = 0; i < pool; i++) rk[i] = kc[i], rv[i] = vc[i];
        for (int32_t i = 0; i < n; i++)
            for (int32_t j = 0; j < row; j++) {
                rk[slot[i] * row + j] = k[(size_t)i * row + j];
                rv[slot[i] * row + j] = v[(size_t)i * row + j];
            }
        float *dkc = t_up(t, kc, sizeof(float) * pool), *dvc = t_up(t, vc, sizeof(float) * pool);
        float *dk = t_up(t, k, sizeof(float) * (size_t)n * row), *dv = t_up(t, v, sizeof(float) * (size_t)n * row);
        int64_t *dslot = t_up(t, slot, sizeof(int64_t) * n);
        t_ok(t, "kv_store", t->b->iface->kv_store(t->b->ctx, dkc, dvc, dk, dv, dslot, n, row));
        char what[64];
        snprintf(what, sizeof what, "n=%d row=%d (K pool)", n, row);
        t_down(t, got, dkc, sizeof(float) * pool);
        expect(t, "kv_store", what, got, rk, pool, 0.0);
        snprintf(what, sizeof what, "n=%d row=%d (V pool)", n, row);
        t_down(t, got, dvc, sizeof(float) * pool);
        expect(t, "kv_store", what, got, rv, pool, 0.0);
        t_release_all(t);
        free(kc), free(vc), free(k), free(v), free(got), free(rk), free(rv), free(slot);
    }
}

/* Three skewed segments with tokens 1-2 in none of them. */
static const int32_t seg_start[3] = {0, 3, 10}, seg_len[3] = {1, 7, 300};
#define SEG_TOKENS 310

static void test_seg_vec(tcase *t) {
    const int32_t width = 75;
    const size_t total = (size_t)SEG_TOKENS * width;
    for (int op = 0; op < 2; op++) {
        float *y = rnd_vec(total, 1.0f), *got = malloc(sizeof(float) * total);
        double *ref = dvec(total);
        float *dy = t_up(t, y, sizeof(float) * total);
        /* segs[0] is a decoy outside the range the op is given (tokens 1-2 belong to no segment):
         * the op must run exactly entries [1, 4) of the planned table. */
        ds_vec_seg segs[4];
        segs[0] = (ds_vec_seg){.start = 1, .len = 2, .v = NULL, .alpha = 1.0f};
        for (size_t i = 0; i < total; i++) ref[i] = y[i];
        for (int s = 0; s < 3; s++) {
            float *v = rnd_vec((size_t)width, 2.0f);
            const float alpha = 0.5f + (float)s;
            segs[s + 1] = (ds_vec_seg){.start = seg_start[s], .len = seg_len[s], .v = t_up(t, v, sizeof(float) * width),
                                       .alpha = alpha};
            for (int32_t tk = seg_start[s]; tk < seg_start[s] + seg_len[s]; tk++)
                for (int32_t j = 0; j < width; j++) {
                    double *r = &ref[(size_t)tk * width + j];
                    *r = op == 0 ? *r * v[j] : *r + (double)alpha * v[j];
                }
            free(v);
        }
        const char *name = op == 0 ? "seg_scale" : "seg_add";
        segs[0].v = segs[1].v;
        const ds_seg_tables tab = {.vec = segs, .n_vec = 4};
        t_ok(t, "plan_upload", t->b->iface->plan_upload(t->b->ctx, &tab));
        int (*op_fn)(void *, float *, int32_t, ds_seg_range) = op == 0 ? t->b->iface->seg_scale : t->b->iface->seg_add;
        CHECK_MSG(op_fn(t->b->ctx, dy, width, (ds_seg_range){2, 3}) == DS_EINVAL, "%s %s: a range past the plan ran",
                  t->name, name);
        t_ok(t, name, op_fn(t->b->ctx, dy, width, (ds_seg_range){1, 3}));
        t_down(t, got, dy, sizeof(float) * total);
        expect(t, name, "segs len 1/7/300, width 75", got, ref, total, t->tol_f32);
        t_release_all(t);
        free(y), free(got), free(ref);
    }
}

/* ---- lora ---- */

static void lora_case(tcase *t, int32_t in, int32_t out, const int32_t seg_rank[3]) {
    const size_t ny = (size_t)SEG_TOKENS * out;
    float *x = rnd_vec((size_t)SEG_TOKENS * in, 1.0f), *y = rnd_vec(ny, 1.0f), *got = malloc(sizeof(float) * ny);
    double *ref = dvec(ny);
    ds_lora_seg segs[5]; /* segs[0]: a decoy before the range the op is given */
    for (size_t i = 0; i < ny; i++) ref[i] = y[i];
    for (int s = 0; s < 3; s++) {
        const int32_t r = seg_rank[s];
        float *A = rnd_vec((size_t)r * in, 0.3f), *B = rnd_vec((size_t)out * r, 0.3f);
        const float scale = 2.0f / (float)r;
        for (int32_t tk = seg_start[s]; tk < seg_start[s] + seg_len[s]; tk++) {
            double mid[64];
            for (int32_t k = 0; k < r; k++) {
                mid[k] = 0.0;
                for (int32_t j = 0; j < in; j++) mid[k] += (double)A[(size_t)k * in + j] * x[(size_t)tk * in + j];
            }
            for (int32_t o = 0; o < out; o++) {
                double acc = 0.0;
                for (int32_t k = 0; k < r; k++) acc += mid[k] * B[(size_t)o * r + k];
                ref[(size_t)tk * out + o] += scale * acc;
            }
        }
        segs[s + 1] = (ds_lora_seg){.start = seg_start[s], .len = seg_len[s], .rank = r, .scale = scale,
                                    .A = t_up(t, A, sizeof(float) * (size_t)r * in),
                                    .B = t_up(t, B, sizeof(float) * (size_t)out * r)};
        free(A), free(B);
    }
    segs[4] = (ds_lora_seg){.start = SEG_TOKENS, .len = 0, .rank = 8, .scale = 1.0f, .A = segs[1].A, .B = segs[1].B};
    segs[0] = (ds_lora_seg){.start = 1, .len = 2, .rank = seg_rank[0], .scale = 1.0f, .A = segs[1].A, .B = segs[1].B};
    float *dx = t_up(t, x, sizeof(float) * (size_t)SEG_TOKENS * in), *dy = t_up(t, y, sizeof(float) * ny);
    const ds_seg_tables tab = {.lora = segs, .n_lora = 5};
    t_ok(t, "plan_upload", t->b->iface->plan_upload(t->b->ctx, &tab));
    CHECK_MSG(t->b->iface->lora(t->b->ctx, dx, in, dy, out, (ds_seg_range){2, 4}) == DS_EINVAL,
              "%s lora: a range past the plan ran", t->name);
    t_ok(t, "lora", t->b->iface->lora(t->b->ctx, dx, in, dy, out, (ds_seg_range){1, 4}));
    t_down(t, got, dy, sizeof(float) * ny);
    char what[80];
    snprintf(what, sizeof what, "in=%d out=%d ranks %d/%d/%d len 1/7/300", in, out, seg_rank[0], seg_rank[1],
             seg_rank[2]);
    expect(t, "lora", what, got, ref, ny, t->tol_f32);
    bool untouched = true; /* tokens 1 and 2 belong to no segment */
    for (size_t i = (size_t)1 * out; i < (size_t)3 * out; i++) untouched &= got[i] == y[i];
    CHECK_MSG(untouched, "%s lora: rows outside every segment were modified", t->name);
    t_release_all(t);
    free(x), free(y), free(got), free(ref);
}

static void test_lora(tcase *t) {
    if (!t->b->iface->lora) {
        printf("%-5s lora       skipped: backend has no lora op\n", t->name);
        return;
    }
    const int32_t ranks[][3] = {{4, 8, 16}, {40, 1, 24}}; /* the second: partial rank groups / chunks */
    lora_case(t, 67, 75, ranks[0]);
    lora_case(t, 200, 330, ranks[0]);
    lora_case(t, 200, 330, ranks[1]);
}

/* ---- sparse deltas ---- */

/* Three segments, each its own random CSR δ [out][in] at `density` (empty rows included: row 0 is
 * always empty), against y += x·δᵀ in double precision; a decoy entry outside the range. */
static void sparse_case(tcase *t, int32_t in, int32_t out, double density) {
    const size_t ny = (size_t)SEG_TOKENS * out;
    float *x = rnd_vec((size_t)SEG_TOKENS * in, 1.0f), *y = rnd_vec(ny, 1.0f), *got = malloc(sizeof(float) * ny);
    double *ref = dvec(ny);
    ds_sparse_seg segs[4];
    for (size_t i = 0; i < ny; i++) ref[i] = y[i];
    int64_t total_nnz = 0;
    for (int s = 0; s < 3; s++) {
        int32_t *ptr = malloc(sizeof(int32_t) * ((size_t)out + 1)), *col = malloc(sizeof(int32_t) * (size_t)out * in);
        float *val = malloc(sizeof(float) * (size_t)out * in);
        int32_t nnz = 0;
        ptr[0] = 0;
        for (int32_t r = 0; r < out; r++) {
            for (int32_t j = 0; j < in && r > 0; j++)
                if (rand() < density * RAND_MAX) col[nnz] = j, val[nnz++] = (float)rand() / RAND_MAX - 0.5f;
            ptr[r + 1] = nnz;
        }
        total_nnz += nnz;
        for (int32_t tk = seg_start[s]; tk < seg_start[s] + seg_len[s]; tk++)
            for (int32_t r = 0; r < out; r++) {
                double acc = 0.0;
                for (int32_t k = ptr[r]; k < ptr[r + 1]; k++) acc += (double)val[k] * x[(size_t)tk * in + col[k]];
                ref[(size_t)tk * out + r] += acc;
            }
        segs[s + 1] = (ds_sparse_seg){.start = seg_start[s], .len = seg_len[s], .rows = out, .cols = in, .nnz = nnz,
                                      .row_ptr = t_up(t, ptr, sizeof(int32_t) * ((size_t)out + 1)),
                                      .col = t_up(t, col, sizeof(int32_t) * (size_t)(nnz ? nnz : 1)),
                                      .val = t_up(t, val, sizeof(float) * (size_t)(nnz ? nnz : 1))};
        free(ptr), free(col), free(val);
    }
    segs[0] = segs[1];
    segs[0].start = 1, segs[0].len = 2; /* tokens 1-2 belong to no segment the op is given */
    float *dx = t_up(t, x, sizeof(float) * (size_t)SEG_TOKENS * in), *dy = t_up(t, y, sizeof(float) * ny);
    const ds_seg_tables tab = {.sparse = segs, .n_sparse = 4};
    t_ok(t, "plan_upload", t->b->iface->plan_upload(t->b->ctx, &tab));
    CHECK_MSG(t->b->iface->sparse(t->b->ctx, dx, in, dy, out, (ds_seg_range){2, 3}) == DS_EINVAL,
              "%s sparse: a range past the plan ran", t->name);
    CHECK_MSG(t->b->iface->sparse(t->b->ctx, dx, in + 1, dy, out, (ds_seg_range){1, 3}) == DS_EINVAL,
              "%s sparse: a shape mismatch ran", t->name);
    t_ok(t, "sparse", t->b->iface->sparse(t->b->ctx, dx, in, dy, out, (ds_seg_range){1, 3}));
    t_down(t, got, dy, sizeof(float) * ny);
    char what[80];
    snprintf(what, sizeof what, "in=%d out=%d density %.3g nnz %lld", in, out, density, (long long)total_nnz);
    expect(t, "sparse", what, got, ref, ny, t->tol_f32);
    bool untouched = true;
    for (size_t i = (size_t)1 * out; i < (size_t)3 * out; i++) untouched &= got[i] == y[i];
    CHECK_MSG(untouched, "%s sparse: rows outside every segment were modified", t->name);
    t_release_all(t);
    free(x), free(y), free(got), free(ref);
}

static void test_sparse(tcase *t) {
    if (!t->b->iface->sparse) {
        printf("%-5s sparse     skipped: backend has no sparse op\n", t->name);
        return;
    }
    srand(13);
    sparse_case(t, 67, 75, 0.01);
    sparse_case(t, 200, 330, 0.05);
    sparse_case(t, 129, 31, 0.5); /* dense enough for the CPU's threaded path */
}

/* ---- attention ---- */

typedef struct attn_cfg {
    int32_t n_head, n_kv_head, head_dim, block_size;
    bool prefix;     /* false: seq_prefix = NULL */
    bool decode;     /* one new token per sequence after long cached contexts (the decode kernel's
                      * split over parts of the keys), else a mixed prefill + decode step */
    int32_t window;  /* sliding window (0: none) */
} attn_cfg;

/* Mixed: three sequences, 300 tokens: s0 prefix 5 (last prefix block partial), 3 cached + 9 new
 * tokens; s1 one decode token after 20 cached; s2 prefix of exactly one block, 290-token prefill.
 * Decode: one token each after 1500, 700 and 40 cached tokens. */
enum { A_SEQS = 3, A_BLOCKS = 640, A_MAXB = 560 };
static const int32_t a_cached_mix[A_SEQS] = {3, 20, 0}, a_new_mix[A_SEQS] = {9, 1, 290};
static const int32_t a_cached_dec[A_SEQS] = {1500, 700, 40}, a_new_dec[A_SEQS] = {1, 1, 1};

static int32_t a_prefix(const attn_cfg *c, int s) { return !c->prefix ? 0 : s == 0 ? 5 : s == 2 ? c->block_size : 0; }

/* Where logical slot i lives, from the layout's description (not from ds_kv_slot). */
static int64_t ref_slot(const int32_t *table, int32_t pre, int32_t bs, int32_t i) {
    const int32_t pre_blocks = (pre + bs - 1) / bs;
    const int32_t blk = i < pre ? i / bs : pre_blocks + (i - pre) / bs;
    const int32_t off = i < pre ? i % bs : (i - pre) % bs;
    return (int64_t)table[blk] * bs + off;
}

static void attn_ref(const attn_cfg *c, const float *q, const float *kc, const float *vc, const int32_t *tok_seq,
                     const int32_t *tok_nkv, const int32_t *tables, int32_t max_blocks, int32_t n, double *ref) {
    const int32_t hd = c->head_dim, row = c->n_kv_head * hd, group = c->n_head / c->n_kv_head;
    double *p = dvec(4096);
    for (int32_t t = 0; t < n; t++)
        for (int32_t h = 0; h < c->n_head; h++) {
            const int32_t s = tok_seq[t], nkv = tok_nkv[t];
            const int32_t lo = c->window > 0 && nkv > c->window ? nkv - c->window : 0;
            const float *qh = q + ((size_t)t * c->n_head + h) * hd;
            double mx = -INFINITY, sum = 0.0;
            for (int32_t i = lo; i < nkv; i++) {
                const float *k = kc + ref_slot(tables + s * max_blocks, a_prefix(c, s), c->block_size, i) * row +
                                 (h / group) * hd;
                double dot = 0.0;
                for (int32_t d = 0; d < hd; d++) dot += (double)qh[d] * k[d];
                p[i] = dot / sqrt((double)hd);
                if (p[i] > mx) mx = p[i];
            }
            for (int32_t i = lo; i < nkv; i++) sum += (p[i] = exp(p[i] - mx));
            double *o = ref + ((size_t)t * c->n_head + h) * hd;
            for (int32_t i = lo; i < nkv; i++) {
                const float *v = vc + ref_slot(tables + s * max_blocks, a_prefix(c, s), c->block_size, i) * row +
                                 (h / group) * hd;
                for (int32_t d = 0; d < hd; d++) o[d] += p[i] / sum * v[d];
            }
        }
    free(p);
}

static void attention_case(tcase *t, const attn_cfg *c) {
    const int32_t bs = c->block_size, hd = c->head_dim, row = c->n_kv_head * hd, max_blocks = A_MAXB;
    const int32_t *a_cached = c->decode ? a_cached_dec : a_cached_mix, *a_new = c->decode ? a_new_dec : a_new_mix;
    static int32_t tables[A_SEQS * A_MAXB], perm[A_BLOCKS];
    int32_t n = 0, tok_seq[300], tok_nkv[300], prefix[A_SEQS], used = 0;
    for (int32_t i = 0; i < A_BLOCKS; i++) perm[i] = i;
    for (int32_t i = A_BLOCKS - 1; i > 0; i--) { /* physical blocks in random order */
        const int32_t j = rnd_i(i + 1), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    for (int s = 0; s < A_SEQS; s++) {
        prefix[s] = a_prefix(c, s);
        const int32_t own = a_cached[s] + a_new[s];
        const int32_t nb = (prefix[s] + bs - 1) / bs + (own + bs - 1) / bs;
        DS_ASSERT(nb <= max_blocks);
        for (int32_t b = 0; b < max_blocks; b++) tables[s * max_blocks + b] = b < nb ? perm[used + b] : -1;
        used += nb;
        for (int32_t j = 0; j < a_new[s]; j++, n++) {
            tok_seq[n] = s;
            tok_nkv[n] = prefix[s] + a_cached[s] + j + 1; /* causal: up to and including itself */
        }
    }
    DS_ASSERT(used <= A_BLOCKS && n <= 300);
    const size_t pool = (size_t)A_BLOCKS * bs * row, nq = (size_t)n * c->n_head * hd;
    float *kc = rnd_vec(pool, 1.0f), *vc = rnd_vec(pool, 1.0f), *q = rnd_vec(nq, 2.0f);
    float *got = malloc(sizeof(float) * nq);
    double *ref = dvec(nq);
    attn_ref(c, q, kc, vc, tok_seq, tok_nkv, tables, max_blocks, n, ref);
    ds_attn_args a = {.q = t_up(t, q, sizeof(float) * nq), .out = t_alloc(t, sizeof(float) * nq),
                      .k_cache = t_up(t, kc, sizeof(float) * pool), .v_cache = t_up(t, vc, sizeof(float) * pool),
                      .n_tokens = n, .n_head = c->n_head, .n_kv_head = c->n_kv_head, .head_dim = hd,
                      .block_size = bs, .tok_seq = t_up(t, tok_seq, sizeof(int32_t) * n),
                      .tok_nkv = t_up(t, tok_nkv, sizeof(int32_t) * n),
                      .block_tables = t_up(t, tables, sizeof tables),
                      .seq_prefix = c->prefix ? t_up(t, prefix, sizeof prefix) : NULL, .n_seqs = A_SEQS,
                      .max_blocks = max_blocks, .scale = 1.0f / sqrtf((float)hd), .window = c->window};
    t_ok(t, "attention", t->b->iface->attention(t->b->ctx, &a));
    t_down(t, got, a.out, sizeof(float) * nq);
    char what[128];
    snprintf(what, sizeof what, "heads %d/%d hd=%d block=%d %s %s window %d", c->n_head, c->n_kv_head, hd, bs,
             c->prefix ? "prefix 5/0/block" : "no prefix", c->decode ? "decode" : "mixed", c->window);
    expect(t, "attention", what, got, ref, nq, t->tol_f32);
    t_release_all(t);
    free(kc), free(vc), free(q), free(got), free(ref);
}

static void test_attention(tcase *t) {
    const attn_cfg cfgs[] = {{6, 2, 40, 4, true, false, 0},   {4, 4, 128, 16, true, false, 0},
                             {8, 1, 80, 16, false, false, 0}, {2, 1, 256, 8, true, false, 0},
                             {9, 3, 64, 16, true, true, 0},   {32, 8, 128, 16, false, true, 0},
                             {20, 1, 48, 8, true, true, 0},   {4, 2, 64, 16, false, true, 600},
                             {6, 2, 40, 4, true, false, 7}};
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) attention_case(t, &cfgs[i]);
}

/* ---- driver ---- */

static void tolerances_for(tcase *t) {
    const bool cpu = !strcmp(t->b->iface->name, "cpu");
    t->tol_f32 = cpu ? 1e-10 : 1e-9;
    t->tol_gemm = cpu ? 1e-10 : 1e-4;
    t->tol_embed = cpu ? 0.0 : 1e-4;
}

static void run_backend(ds_backend *b) {
    tcase t = {.b = b, .name = b->iface->name};
    tolerances_for(&t);
    CHECK_EQ_INT(b->iface->version, DS_BACKEND_IFACE_VERSION);
    test_memory(&t);
    test_matmul(&t);
    test_embed(&t);
    test_typed(&t);
    test_rmsnorm(&t);
    test_rope(&t);
    test_silu_add(&t);
    test_rows(&t);
    test_kv_store(&t);
    test_seg_vec(&t);
    test_lora(&t);
    test_sparse(&t);
    test_attention(&t);
    CHECK_EQ_INT(b->iface->synchronize(b->ctx), DS_OK);
}

int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : NULL;
    const char *names[] = {"cpu", "cuda"};
    for (size_t i = 0; i < 2; i++) {
        if (only && strcmp(only, names[i])) continue;
        ds_err err = {{0}};
        ds_backend_params p = ds_backend_default_params();
        ds_backend *b = ds_backend_create(names[i], &p, &err);
        if (!b) {
            if (only) SKIP("%s: %s", names[i], err.msg);
            printf("%s: skipped: %s\n", names[i], err.msg);
            CHECK_MSG(strcmp(names[i], "cpu") != 0, "the cpu backend must always exist");
            continue;
        }
        run_backend(b);
        ds_backend_free(b);
        if (!strcmp(names[i], "cpu")) test_cpu_isas();
    }
    return ds_test_result();
}
