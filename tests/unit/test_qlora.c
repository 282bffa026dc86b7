/* QLoRA-style training on a quantised base: the same LoRA job (all linear projections, rank 8)
 * on the default SmolLM2 Q4_1 GGUF, once with the weights kept quantised (the CPU kernels
 * multiply through the Q4_1/Q8_0 blocks forward and backward) and once on an fp32-dequantised
 * copy of the same weights (ds_model_params.quantize = F32, plain OpenBLAS GEMMs). Both runs see
 * the same numbers, so their losses must agree step by step within 1e-3 (issue 15); gradients
 * differ only by fp32 summation order. Skips (exit 77) without the model file. */
#include "ds/train.h"
#include "ds_test.h"

#include <unistd.h>

#define STEPS 6
#define N_TOK 48

static ds_model *load(const char *path, ds_dtype q) {
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.quantize = q;
    ds_err err = {{0}};
    ds_model *m = ds_model_load(path, &mp, &err);
    CHECK_MSG(m != NULL, "%s: %s", path, err.msg);
    return m;
}

static void run(const ds_model *m, double *loss, double *secs) {
    ds_train_adapter_spec spec = ds_train_default_spec(DS_ADAPTER_LORA);
    spec.targets = DS_TRAIN_TARGET_ALL_LINEAR;
    spec.seed = 7;
    ds_train_params p = ds_train_default_params();
    p.lr = 2e-3f;
    p.schedule = DS_LR_CONSTANT;
    p.micro_batch_tokens = 128;
    ds_err err = {{0}};
    ds_trainer *t = ds_trainer_create(m, &spec, &p, &err);
    CHECK_MSG(t != NULL, "%s", err.msg);
    if (!t) return;
    int32_t toks[2][N_TOK];
    for (int i = 0; i < N_TOK; i++) { /* a fixed pseudo-text: two repeated phrases */
        toks[0][i] = 1000 + (i * 37) % 211;
        toks[1][i] = 2000 + (i * 11) % 97;
    }
    ds_train_example ex[2] = {{toks[0], NULL, N_TOK}, {toks[1], NULL, N_TOK}};
    for (int k = 0; k < STEPS; k++) {
        ds_train_stats s;
        CHECK_MSG(ds_trainer_step(t, ex, 2, &s, &err) == 0, "%s", err.msg);
        loss[k] = s.loss;
        *secs += s.seconds;
    }
    ds_trainer_free(t);
}

int main(void) {
    const char *path = DS_MODELS_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (access(path, R_OK) != 0) SKIP("%s absent; scripts/fetch_model.sh fetches it", path);
    ds_log_set_level(DS_LOG_WARN);
    double lq[STEPS] = {0}, lf[STEPS] = {0}, tq = 0, tf = 0;
    ds_model *q = load(path, DS_DTYPE_NONE);
    if (q) {
        CHECK(q->layers[0].w_up.dtype == DS_DTYPE_Q4_1);
        run(q, lq, &tq);
    }
    ds_model_free(q);
    ds_model *f = load(path, DS_DTYPE_F32);
    if (f) {
        CHECK(f->layers[0].w_up.dtype == DS_DTYPE_F32 && f->tok_embd.dtype == DS_DTYPE_F32);
        run(f, lf, &tf);
    }
    ds_model_free(f);
    double worst = 0;
    for (int k = 0; k < STEPS; k++) {
        const double d = fabs(lq[k] - lf[k]);
        printf("step %d: loss quantised %.6f, fp32-dequantised %.6f, |diff| %.2e\n", k + 1, lq[k], lf[k], d);
        if (d > worst) worst = d;
        CHECK_MSG(d <= 1e-3, "step %d: |loss diff| %g > 1e-3", k + 1, d);
    }
    CHECK_MSG(lq[STEPS - 1] < lq[0] - 0.5, "the job does not learn: %g → %g", lq[0], lq[STEPS - 1]);
    printf("worst |loss diff| %.2e over %d steps; step time quantised %.2f s, fp32 %.2f s (informational)\n", worst,
           STEPS, tq / STEPS, tf / STEPS);
    return ds_test_result();
}
