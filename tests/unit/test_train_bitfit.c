/* BitFit training (bias deltas of delta adapters) against PyTorch (tests/data/train/bitfit/, made by
 * tests/golden/gen_train_bitfit.py): on tiny Llama (no biases: the delta is the bias) and tiny Qwen2
 * (q/k/v biases: the delta adds), from a seeded non-zero start,
 *   loss                       |ours − ref| <= 1e-5 · |ref|                     (train_golden.h)
 *   every bias-delta gradient  max|ours − ref| <= 1e-4 · max(max|ref|, 1e-6)   (train_golden.h)
 * and: a BitFit spec ("bitfit") starts at zero on all seven projections, a step changes the deltas,
 * ds_trainer_save writes a delta adapter that ds_adapter_load reads back bit for bit; sparse delta
 * adapters cannot be continued (diff pruning trains from a spec: test_train_diff_pruning.c). */
#include "ds/adapter.h"
#include "ds/train.h"
#include "ds_test.h"
#include "golden.h"
#include "train_golden.h"

#include <string.h>

static void grads_vs_torch(const char *model) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/train/bitfit/%s", DS_TEST_DATA, model);
    tg_case c;
    ds_err err = {{0}};
    ds_trainer *t = NULL;
    if (!tg_case_open(&c, model, dir, true, model)) goto out;
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    t = ds_trainer_create_from(c.m, c.init, false, 0.0f, &p, &err);
    CHECK_MSG(t != NULL, "%s: %s", model, err.msg);
    ds_train_stats s;
    if (t && ds_trainer_compute_grads(t, c.ex, c.n_ex, &s, &err) == 0) {
        const double want = cJSON_GetObjectItem(c.ref, "loss")->valuedouble;
        tg_check_loss(model, s.loss, want);
        const cJSON *grads = cJSON_GetObjectItem(c.ref, "grads");
        const double worst = tg_check_grads(t, grads, model);
        printf("%s: BitFit loss %.7f (torch %.7f), %d bias-delta gradients, worst relative error %.2e\n", model,
               s.loss, want, cJSON_GetArraySize(grads), worst);
    } else {
        CHECK_MSG(0, "%s: compute_grads: %s", model, err.msg);
    }
out:
    ds_trainer_free(t);
    tg_case_close(&c);
}

/* From a spec: zero start, one step moves the deltas, save → load round trip; refusals. */
static void spec_save_refusals(void) {
    ds_err err = {{0}};
    ds_model *m = tg_load_model("tiny-llama");
    if (!m) return;
    ds_adapter_kind kind;
    CHECK_EQ_INT(ds_train_kind_parse("bitfit", &kind, &err), 0);
    CHECK_EQ_INT(kind, DS_ADAPTER_DELTA);
    CHECK_EQ_INT(ds_train_kind_parse("diff-pruning", &kind, &err), 0); /* test_train_diff_pruning.c */
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_DELTA);
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    p.lr = 1e-2f;
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s", err.msg);
    if (t) {
        CHECK_EQ_INT(ds_trainer_n_tensors(t), m->cfg.n_layer * DS_PROJ_COUNT);
        const ds_adapter *a = ds_trainer_adapter(t);
        CHECK(a->dbias && a->dbias[0] && a->dbias[0][0] == 0.0f);
        int32_t tok[6] = {5, 77, 140, 3, 9, 200}, lab[6] = {-100, -100, 140, 3, 9, 200};
        ds_train_example ex = {.tokens = tok, .labels = lab, .n_tokens = 6};
        ds_train_stats s;
        CHECK_MSG(ds_trainer_step(t, &ex, 1, &s, &err) == 0, "%s", err.msg);
        a = ds_trainer_adapter(t); /* valid until the next step: read again (downloads the resident values) */
        double moved = 0;
        for (int32_t i = 0; i < a->proj_out[0]; i++) moved = fmax(moved, fabs(a->dbias[0][i]));
        CHECK_MSG(moved > 0, "a step left q_proj's bias delta at zero");
        char tmp[] = "/tmp/ds_bitfit_XXXXXX";
        CHECK(mkdtemp(tmp) != NULL);
        CHECK_MSG(ds_trainer_save(t, tmp, "tests/data/models/tiny-llama", &err) == 0, "%s", err.msg);
        ds_adapter *back = ds_adapter_load(tmp, m, NULL, &err);
        CHECK_MSG(back != NULL, "reload: %s", err.msg);
        for (size_t i = 0; back && i < (size_t)m->cfg.n_layer * DS_PROJ_COUNT; i++)
            CHECK(back->dbias && back->dbias[i] &&
                  !memcmp(back->dbias[i], a->dbias[i], sizeof(float) * (size_t)a->proj_out[i % DS_PROJ_COUNT]));
        if (back) CHECK(!strcmp(back->peft_type, "DELTA") && !back->delta);
        ds_adapter_free(back);
        golden_rm_saved(tmp);
    }
    ds_trainer_free(t);
    /* a sparse delta (diff pruning / an extracted fine-tune) has no trainer yet */
    ds_adapter *sparse = ds_adapter_load(DS_TEST_DATA "/delta/tiny-llama/keep1", m, NULL, &err);
    CHECK_MSG(sparse != NULL, "%s", err.msg);
    if (sparse) {
        ds_trainer *ts = ds_trainer_create_from(m, sparse, false, 0.0f, &p, &err);
        CHECK(ts == NULL && strstr(err.msg, "sparse weight deltas"));
        ds_trainer_free(ts);
    }
    ds_adapter_free(sparse);
    ds_model_free(m);
}

int main(void) {
    ds_log_set_level(DS_LOG_WARN);
    grads_vs_torch("tiny-llama");
    grads_vs_torch("tiny-qwen2");
    spec_save_refusals();
    return ds_test_result();
}
