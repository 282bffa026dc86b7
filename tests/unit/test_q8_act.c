/* The opt-in int8-activation matmul (src/backend/cpu/qmatmul.h, q8kern.h, q8_generic.c).
 *
 * 1. The quantiser: every code within half a step of x/d, |code| ≤ 127, the 32-column sums exact.
 * 2. Kernels of every instruction set this CPU has (generic, avx2, vnni) × every format the path
 *    covers (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) × decode and prefill shapes, against a double
 *    reference on the same int8 activations (x̂ = code·scale) and the dequantised weights:
 *    NMSE ≤ 1e-10 — the kernels are exact up to fp32 summation order. The error int8 activations
 *    add against the fp32 ones is printed and must stay below 1e-3 NMSE on these random data.
 * 3. The CPU backend with int8_activations routes covered formats through this path and others
 *    (F16) through the exact one.
 * 4. Accuracy on the real default model (skipped without models/SmolLM2-135M-Instruct.Q4_1.gguf):
 *    logits at every prompt position of tests/data/models/smollm2/reference.json (transformers,
 *    fp32) with exact and with int8 activations; prints the worst difference relative to the
 *    position's max |logit| and the top-1 agreement. int8 must keep top-1 on ≥ 90% of positions
 *    and the worst difference under 15% of max |logit| (the README quotes the printed figures). */
#include "adapter_run.h"
#include "backend/cpu/qmatmul.h"
#include "ds/backend.h"
#include "ds_test.h"
#include "golden.h"
#include "parity.h"
#include "unit/rand_weights.h"

#include <omp.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const ds_dtype Q8_DTYPES[] = {DS_DTYPE_Q4_0, DS_DTYPE_Q4_1, DS_DTYPE_Q8_0,
                                     DS_DTYPE_Q4_K, DS_DTYPE_Q5_K, DS_DTYPE_Q6_K};
#define N_Q8 (sizeof Q8_DTYPES / sizeof Q8_DTYPES[0])

static double nmse(const float *got, const double *ref, size_t n) {
    double e = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        e += (got[i] - ref[i]) * (got[i] - ref[i]);
        s += ref[i] * ref[i];
    }
    return s > 0 ? e / s : e;
}

static void test_quantizer(void) {
    const int32_t n = 3, K = 512;
    float *x = rnd_vec((size_t)n * K, 3.0f);
    x[5] = 0.0f;
    for (int i = 32; i < 64; i++) x[i] = 0.0f; /* an all-zero block: scale 0, codes 0 */
    void *buf = malloc(ds_q8_act_bytes(n, K));
    for (int32_t blk = 32; blk <= 256; blk *= 8) {
        ds_q8_act a;
        ds_q8_quantize(x, n, K, blk, buf, &a);
        int bad = 0;
        for (int32_t i = 0; i < n * K; i++) {
            const float d = a.d[i / blk];
            if (abs(a.q[i]) > 127 || fabsf(a.q[i] * d - x[i]) > 0.5f * d * (1 + 1e-5f) + 1e-30f) bad++;
        }
        for (int32_t g = 0; g < n * K / 32; g++) {
            int s = 0;
            for (int i = 0; i < 32; i++) s += a.q[32 * g + i];
            if (s != a.bs[g]) bad++;
        }
        CHECK_MSG(bad == 0, "quantiser blk %d: %d codes or sums wrong", blk, bad);
        CHECK(a.d[32 / blk] == 0.0f || blk == 256);
    }
    free(buf);
    free(x);
}

static void kernel_case(const char *isa, const ds_q8_ops *k, ds_dtype dt, int32_t n, int32_t rows, int32_t cols,
                        bool bias_acc) {
    uint8_t *w = rnd_typed(dt, rows, cols);
    float *wf = dequant_all(dt, w, rows, cols), *x = rnd_vec((size_t)n * cols, 1.0f);
    float *bias = rnd_vec((size_t)rows, 0.5f), *y0 = rnd_vec((size_t)n * rows, 1.0f);
    float *y = malloc(sizeof(float) * (size_t)n * rows);
    memcpy(y, y0, sizeof(float) * (size_t)n * rows);
    void *buf = malloc(ds_q8_act_bytes(n, cols));
    ds_q8_act a;
    ds_q8_quantize(x, n, cols, ds_q8_blk(dt), buf, &a);
    double *ref = calloc((size_t)n * rows, sizeof *ref), *ref_fp = calloc((size_t)n * rows, sizeof *ref_fp);
    for (int32_t t = 0; t < n; t++)
        for (int32_t r = 0; r < rows; r++) {
            double s = 0, sf = 0;
            for (int32_t c = 0; c < cols; c++) {
                const size_t i = (size_t)t * cols + c;
                s += (double)wf[(size_t)r * cols + c] * a.q[i] * a.d[i / a.blk];
                sf += (double)wf[(size_t)r * cols + c] * x[i];
            }
            const double base = bias_acc ? y0[(size_t)t * rows + r] + bias[r] : 0.0;
            ref[(size_t)t * rows + r] = base + s;
            ref_fp[(size_t)t * rows + r] = base + sf;
        }
    void *buf2 = malloc(ds_q8_act_bytes(n, cols));
    ds_mat m = {.data = w, .rows = rows, .cols = cols, .dtype = dt, .row_bytes = ds_dtype_row_bytes(dt, cols),
                .borrowed = true};
    CHECK_EQ_INT(ds_q8_matmul(k, x, &m, bias_acc ? bias : NULL, y, n, bias_acc, buf2, NULL), 0);
    const double e = nmse(y, ref, (size_t)n * rows), e_fp = nmse(y, ref_fp, (size_t)n * rows);
    printf("%-7s %-5s n=%-2d %3dx%-5d nmse %.1e (tol 1e-10); vs fp32 activations %.1e\n", isa, ds_dtype_name(dt), n,
           rows, cols, e, e_fp);
    CHECK_MSG(e <= 1e-10, "%s %s n=%d %dx%d: nmse %.3e", isa, ds_dtype_name(dt), n, rows, cols, e);
    CHECK_MSG(e_fp <= 1e-3, "%s %s: int8 activations moved the result by nmse %.3e", isa, ds_dtype_name(dt), e_fp);
    /* the packed weights (built at upload in int8 mode) give the same products */
    if ((m.aux = ds_q8_pack(k, &m))) {
        memcpy(y, y0, sizeof(float) * (size_t)n * rows);
        CHECK_EQ_INT(ds_q8_matmul(k, x, &m, bias_acc ? bias : NULL, y, n, bias_acc, buf2, NULL), 0);
        const double ep = nmse(y, ref, (size_t)n * rows);
        printf("%-7s %-5s n=%-2d %3dx%-5d packed nmse %.1e (tol 1e-10)\n", isa, ds_dtype_name(dt), n, rows, cols, ep);
        CHECK_MSG(ep <= 1e-10, "%s %s packed n=%d %dx%d: nmse %.3e", isa, ds_dtype_name(dt), n, rows, cols, ep);
        free(m.aux);
    }
    free(w), free(wf), free(x), free(bias), free(y0), free(y), free(buf), free(buf2), free(ref), free(ref_fp);
}

static void test_kernels(void) {
    static const char *isas[] = {"generic", "avx2", "vnni"};
    for (size_t i = 0; i < 3; i++) {
        const ds_q8_ops *k = ds_q8_by_name(isas[i]);
        if (!k) {
            printf("%-7s skipped: this CPU lacks it\n", isas[i]);
            continue;
        }
        for (size_t d = 0; d < N_Q8; d++) {
            const ds_dtype dt = Q8_DTYPES[d];
            const bool kq = ds_dtype_block(dt) == 256;
            kernel_case(isas[i], k, dt, 1, 37, kq ? 256 : 96, false);
            kernel_case(isas[i], k, dt, 3, 33, kq ? 768 : 160, true);
            kernel_case(isas[i], k, dt, 8, 20, 2304, true);
            kernel_case(isas[i], k, dt, 9, 70, kq ? 512 : 224, false); /* prefill path */
            kernel_case(isas[i], k, dt, 37, 45, kq ? 768 : 320, true);
            kernel_case(isas[i], k, dt, 70, 24, kq ? 256 : 64, true); /* two token blocks of the tiles */
        }
    }
}

/* The backend routes covered formats through the int8 path (same result as calling it) and keeps
 * the others exact. */
static void test_backend_routing(void) {
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = 2;
    bp.int8_activations = true;
    ds_err err = {{0}};
    ds_backend *b = ds_backend_cpu_create(&bp, &err);
    CHECK_MSG(b != NULL, "%s", err.msg);
    if (!b) return;
    const int32_t rows = 70, cols = 512;
    const ds_dtype dts[3] = {DS_DTYPE_Q4_K, DS_DTYPE_F16, DS_DTYPE_Q4_1};
    for (int di = 0; di < 3; di++)
        for (int32_t n = 1; n <= 20; n += 19) {
            uint8_t *w = rnd_typed(dts[di], rows, cols);
            float *x = rnd_vec((size_t)n * cols, 1.0f), *y = malloc(sizeof(float) * n * rows),
                  *want = malloc(sizeof(float) * n * rows);
            ds_weight hw = {.data = w, .rows = rows, .cols = cols, .dtype = dts[di],
                            .row_bytes = ds_dtype_row_bytes(dts[di], cols)};
            ds_mat m;
            CHECK_EQ_INT(b->iface->mat_upload(b->ctx, &hw, &m), 0);
            CHECK_EQ_INT(b->iface->matmul(b->ctx, x, &m, NULL, y, n, false), 0);
            void *buf = malloc(ds_q8_act_bytes(n, cols));
            float *scratch = malloc(sizeof(float) * ds_qk_scratch_floats(omp_get_max_threads()));
            if (!ds_q8_dtype(dts[di])) CHECK_EQ_INT(ds_qk_matmul(ds_qk_best(NULL), x, &m, NULL, want, n, false, scratch, NULL), 0);
            else CHECK_EQ_INT(ds_q8_matmul(ds_q8_best(NULL), x, &m, NULL, want, n, false, buf, NULL), 0);
            CHECK_MSG(!memcmp(y, want, sizeof(float) * n * rows), "backend %s n=%d: not the expected path",
                      ds_dtype_name(dts[di]), n);
            b->iface->mat_free(b->ctx, &m);
            free(w), free(x), free(y), free(want), free(buf), free(scratch);
        }
    ds_backend_free(b);
}

/* ---- accuracy on SmolLM2 against transformers ---- */

typedef struct acc_stats {
    int positions, top1_same;
    double worst_rel;
} acc_stats;

static void model_logits(const ds_model *m, bool int8, const cJSON *cases, acc_stats *st) {
    ds_backend_params bp = ds_backend_default_params();
    bp.int8_activations = int8;
    ds_err err = {{0}};
    ds_backend *b = ds_backend_cpu_create(&bp, &err);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)64 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = b ? ds_llama_create(m, b, &lp, &err) : NULL;
    CHECK_MSG(L != NULL, "%s", err.msg);
    *st = (acc_stats){0};
    const int V = m->cfg.n_vocab;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        if (!L) break;
        int n;
        int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
        float *logits = malloc(sizeof(float) * (size_t)n * V);
        ar_ctx ctx;
        ar_init(&ctx, L, m);
        ar_add(&ctx, NULL);
        CHECK(ar_step(&ctx, &prompt, &n, logits) == 0);
        int p = 0;
        const cJSON *pos;
        cJSON_ArrayForEach(pos, cJSON_GetObjectItem(c, "positions")) {
            const float *row = logits + (size_t)p++ * V;
            const double scale = fmax(1.0, cJSON_GetObjectItem(pos, "max_abs_logit")->valuedouble);
            const cJSON *top = cJSON_GetObjectItem(pos, "top20"), *pair;
            int best = 0;
            for (int i = 1; i < V; i++)
                if (row[i] > row[best]) best = i;
            st->top1_same += best == (int)cJSON_GetArrayItem(cJSON_GetArrayItem(top, 0), 0)->valuedouble;
            st->positions++;
            cJSON_ArrayForEach(pair, top) {
                const int id = (int)cJSON_GetArrayItem(pair, 0)->valuedouble;
                st->worst_rel = fmax(st->worst_rel, fabs(row[id] - cJSON_GetArrayItem(pair, 1)->valuedouble) / scale);
            }
        }
        ar_free(&ctx);
        free(logits);
        free(prompt);
    }
    if (L) ds_llama_free(L);
    if (b) ds_backend_free(b);
}

static void test_smollm2_accuracy(void) {
    char model_file[1024], ref_file[1024];
    const char *mdir = getenv("DS_MODELS_DIR");
    snprintf(model_file, sizeof model_file, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", mdir && *mdir ? mdir : DS_MODELS_DIR);
    snprintf(ref_file, sizeof ref_file, "%s/models/smollm2/reference.json", parity_data_dir());
    cJSON *ref = access(model_file, R_OK) ? NULL : golden_load_json(ref_file);
    if (!ref) {
        printf("smollm2 accuracy skipped: %s or its reference is missing (scripts/fetch_model.sh)\n", model_file);
        return;
    }
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_err err = {{0}};
    ds_model *m = ds_model_load(model_file, &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    if (m) {
        acc_stats ex, i8;
        model_logits(m, false, cJSON_GetObjectItem(ref, "cases"), &ex);
        model_logits(m, true, cJSON_GetObjectItem(ref, "cases"), &i8);
        printf("smollm2 vs transformers (fp32), %d prompt positions, top-20 logits:\n", ex.positions);
        printf("  exact activations: worst |diff| %.2e of max|logit|, top-1 same at %d/%d\n", ex.worst_rel,
               ex.top1_same, ex.positions);
        printf("  int8 activations:  worst |diff| %.2e of max|logit|, top-1 same at %d/%d\n", i8.worst_rel,
               i8.top1_same, i8.positions);
        CHECK(ex.worst_rel <= 1e-3 && ex.top1_same == ex.positions);
        CHECK_MSG(i8.positions > 0 && i8.top1_same * 10 >= i8.positions * 9, "int8 top-1 %d/%d", i8.top1_same,
                  i8.positions);
        CHECK_MSG(i8.worst_rel <= 0.15, "int8 worst relative logit difference %.3f", i8.worst_rel);
        ds_model_free(m);
    }
    cJSON_Delete(ref);
}

int main(void) {
    test_quantizer();
    test_kernels();
    test_backend_routing();
    test_smollm2_accuracy();
    return ds_test_result();
}
