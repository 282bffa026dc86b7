/* Diff-pruning training (src/train/train_dp.c) against PyTorch (tests/data/train/diff_pruning/,
 * made by tests/golden/gen_train_diff_pruning.py): tiny Llama (k,o,up,down_proj, no bias deltas)
 * and tiny Qwen2 (q,v,gate_proj with bias deltas added to its own q/v biases), density 0.05, one
 * dense warm-up step (at lr 0: HF warm-up), then two masked steps at lr 1e-3, weight decay 0.01:
 *   loss of each step                 |ours − ref| <= 1e-5 · |ref| (train_golden.h)
 *   step 0's dense δ / bias gradients max|ours − ref| <= 1e-4 · max|ref|
 *   the mask fixed after the warm-up  exactly PyTorch's kept entries (δ nonzero there, 0 elsewhere)
 *   steps 1, 2: gradients             at kept entries as above; exactly 0 outside the mask
 *   values after steps 1, 2           max|ours − ref| <= 1e-6 (δ ~ 0.02, an update ~ 1e-3); exactly
 *                                     0 outside the mask (AdamW with decay: moments stay 0 there)
 *   the saved delta                   ds_adapter_load reads the kept entries bit for bit, and serving
 *                                     it (plan + sparse op) gives PyTorch's logits of base + δ (+ b_δ)
 *                                     within 1e-4 · max(1, max|logit|)
 * and: a save during the warm-up keeps each module's top ceil(density·numel) |δ|; a job's resumable
 * state (job_store.c) saved after the mask was fixed resumes into a fresh trainer that trains on
 * bit for bit as the uninterrupted one; bad specs are refused (density <= 0 or > 1, warm-up 0,
 * non-projection targets). */
#include "adapter/loader.h"
#include "adapter_run.h"
#include "ds/backend.h"
#include "ds/train.h"
#include "ds_test.h"
#include "format/safetensors.h"
#include "golden.h"
#include "train/jobs_internal.h"
#include "train_golden.h"

#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const PROJ[DS_PROJ_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"};

/* Every trainer tensor from `f` (by name): into the values, or checked against the gradients (worst
 * relative error into *worst). False if one is missing. */
static bool read_all(ds_trainer *t, const ds_st_file *f, const char *path, bool into_value, const char *label,
                     double *worst) {
    ds_err err = {{0}};
    for (int32_t i = 0; i < ds_trainer_n_tensors(t); i++) {
        const ds_train_tensor *tt = ds_trainer_tensor(t, i);
        const ds_st_tensor *s = ds_st_find(f, tt->name);
        CHECK_MSG(s != NULL, "%s: %s has no %s", label, path, tt->name);
        if (!s) return false;
        if (into_value) {
            CHECK_MSG(ds_st_read_f32(s, path, tt->shape, tt->n_dims, tt->value, tt->n, &err) == 0, "%s", err.msg);
            continue;
        }
        float *ref = malloc(tt->n * sizeof *ref);
        CHECK(ref && ds_st_read_f32(s, path, tt->shape, tt->n_dims, ref, tt->n, &err) == 0);
        double scale = 1e-30, d = 0;
        for (size_t k = 0; ref && k < tt->n; k++) {
            scale = fmax(scale, fabs(ref[k]));
            d = fmax(d, fabs((double)tt->grad[k] - ref[k]));
        }
        CHECK_MSG(d <= 1e-4 * scale, "%s step 0 %s: max|d grad| %.3g > %.3g", label, tt->name, d, 1e-4 * scale);
        *worst = fmax(*worst, d / scale);
        free(ref);
    }
    return true;
}

/* Step k >= 1: the masked gradients (before apply) or the values (after), against the reference. */
static double check_masked(ds_trainer *t, const cJSON *ref, int k, bool values, const char *label) {
    const cJSON *mods = cJSON_GetObjectItem(ref, "modules"), *bias = cJSON_GetObjectItem(ref, "bias");
    char key[16];
    snprintf(key, sizeof key, "%s%d", values ? "value" : "grad", k);
    double worst = 0;
    for (int32_t i = 0; i < ds_trainer_n_tensors(t); i++) {
        const ds_train_tensor *tt = ds_trainer_tensor(t, i);
        const float *x = values ? tt->value : tt->grad;
        const cJSON *b = cJSON_GetObjectItem(bias, tt->name);
        if (b) { /* bias deltas: dense, not masked */
            const cJSON *r = cJSON_GetObjectItem(b, key);
            const double d = golden_max_diff(x, r, (int)tt->n), tol = values ? 1e-6 : 1e-4 * golden_max_abs(r);
            CHECK_MSG(d <= tol, "%s step %d %s %s: %.3g > %.3g", label, k, tt->name, key, d, tol);
            worst = fmax(worst, values ? d : d / golden_max_abs(r));
            continue;
        }
        const cJSON *md = cJSON_GetObjectItem(mods, tt->name);
        CHECK_MSG(md != NULL, "%s: no reference for %s", label, tt->name);
        if (!md) continue;
        const cJSON *kept = cJSON_GetObjectItem(md, "kept"), *r = cJSON_GetObjectItem(md, key);
        const int nk = cJSON_GetArraySize(kept);
        unsigned char *in = calloc(tt->n, 1);
        float *sel = malloc((size_t)(nk ? nk : 1) * sizeof *sel);
        for (int j = 0; j < nk; j++) {
            const size_t idx = (size_t)cJSON_GetArrayItem(kept, j)->valuedouble;
            in[idx] = 1;
            sel[j] = x[idx];
        }
        size_t outside = 0, zero_inside = 0;
        for (size_t e = 0; e < tt->n; e++) {
            outside += !in[e] && x[e] != 0.0f;
            zero_inside += in[e] && x[e] == 0.0f;
        }
        CHECK_MSG(outside == 0, "%s step %d %s: %zu %s outside the mask are not 0", label, k, tt->name, outside, key);
        if (values) CHECK_MSG(zero_inside == 0, "%s step %d %s: %zu kept values are 0", label, k, tt->name, zero_inside);
        const double d = golden_max_diff(sel, r, nk), tol = values ? 1e-6 : 1e-4 * golden_max_abs(r);
        CHECK_MSG(d <= tol, "%s step %d %s %s: max diff %.3g > %.3g", label, k, tt->name, key, d, tol);
        worst = fmax(worst, values ? d : d / golden_max_abs(r));
        free(in), free(sel);
    }
    return worst;
}

static uint32_t target_bits(const cJSON *names) {
    uint32_t bits = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, names)
        for (int p = 0; p < DS_PROJ_COUNT; p++)
            if (!strcmp(e->valuestring, PROJ[p])) bits |= DS_TRAIN_TARGET(p);
    return bits;
}

/* The saved delta: the trainer's kept entries bit for bit, and served logits = PyTorch's. */
static void check_saved(ds_trainer *t, const ds_model *m, const cJSON *ref, const char *label) {
    ds_err err = {{0}};
    char tmp[] = "/tmp/ds_dp_XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    CHECK_MSG(ds_trainer_save(t, tmp, "tests/data/models", &err) == 0, "%s save: %s", label, err.msg);
    ds_adapter *a = ds_adapter_load(tmp, m, NULL, &err);
    CHECK_MSG(a != NULL, "%s reload: %s", label, err.msg);
    golden_rm_saved(tmp);
    if (!a) return;
    CHECK(!strcmp(a->peft_type, "DELTA") && a->delta);
    const cJSON *mods = cJSON_GetObjectItem(ref, "modules");
    int n_mod = 0;
    for (int32_t i = 0; a->delta && i < ds_trainer_n_tensors(t); i++) {
        const ds_train_tensor *tt = ds_trainer_tensor(t, i);
        const cJSON *md = cJSON_GetObjectItem(mods, tt->name);
        if (!md) continue;
        int32_t l = -1, p = -1;
        for (int q = 0; q < DS_PROJ_COUNT; q++)
            if (strstr(tt->name, PROJ[q])) p = q;
        sscanf(tt->name, "model.layers.%d.", &l);
        const ds_delta_module *d = l >= 0 && p >= 0 ? a->delta[(size_t)l * DS_PROJ_COUNT + p] : NULL;
        const cJSON *kept = cJSON_GetObjectItem(md, "kept");
        CHECK_MSG(d && d->nnz == cJSON_GetArraySize(kept), "%s %s: saved nnz", label, tt->name);
        if (!d) continue;
        int64_t e = 0;
        bool same = true;
        for (int32_t r = 0; r < d->rows; r++)
            for (int32_t k = d->row_ptr[r]; k < d->row_ptr[r + 1]; k++, e++) {
                const size_t idx = (size_t)r * d->cols + (size_t)d->col[k];
                same &= e < cJSON_GetArraySize(kept) && (size_t)cJSON_GetArrayItem(kept, (int)e)->valuedouble == idx &&
                        d->val[k] == tt->value[idx];
            }
        CHECK_MSG(same, "%s %s: saved entries differ from the trainer's", label, tt->name);
        n_mod++;
    }
    CHECK_EQ_INT(n_mod, cJSON_GetArraySize(mods));
    /* served: base + δ (+ b_δ) through the sparse op, one sequence per prompt */
    ds_backend_params bp = ds_backend_default_params();
    ds_backend *B = ds_backend_cpu_create(&bp, &err);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)8 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = B ? ds_llama_create(m, B, &lp, &err) : NULL;
    ds_adapter_dev dev;
    CHECK_MSG(L && ds_adapter_dev_upload(B, a, &dev, &err) == 0, "%s serve: %s", label, err.msg);
    const int V = m->cfg.n_vocab;
    double worst = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(ref, "cases")) {
        if (!L) break;
        ar_ctx ctx;
        ar_init(&ctx, L, m);
        ar_add(&ctx, &dev);
        int n;
        int32_t *toks = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
        float *logits = malloc(sizeof(float) * (size_t)n * V);
        CHECK(ar_step(&ctx, &toks, &n, logits) == 0);
        for (int r = 0; r < n; r++) {
            const cJSON *row = cJSON_GetArrayItem(cJSON_GetObjectItem(c, "prefill_logits"), r);
            const double tol = 1e-4 * fmax(1.0, golden_max_abs(row)), d = golden_max_diff(logits + (size_t)r * V, row, V);
            CHECK_MSG(d <= tol, "%s served row %d: max|d logit| %.3g > %.3g", label, r, d, tol);
            worst = fmax(worst, d);
        }
        free(toks), free(logits);
        ar_free(&ctx);
    }
    printf("%s: saved delta served, logits of base + delta max|diff| %.2e vs PyTorch\n", label, worst);
    if (L) ds_adapter_dev_release(B, &dev);
    ds_llama_free(L);
    ds_backend_free(B);
    ds_adapter_free(a);
}

static void golden_run(const char *model) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/train/diff_pruning/%s", DS_TEST_DATA, model);
    tg_case c;
    ds_err err = {{0}};
    if (!tg_case_open(&c, model, dir, false, model)) goto out;
    const cJSON *cfg = cJSON_GetObjectItem(c.ref, "config");
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_DELTA);
    sp.targets = target_bits(cJSON_GetObjectItem(cfg, "targets"));
    sp.density = (float)cJSON_GetObjectItem(cfg, "density")->valuedouble;
    sp.dp_warmup_steps = cJSON_GetObjectItem(cfg, "dp_warmup_steps")->valueint;
    sp.bias = cJSON_IsTrue(cJSON_GetObjectItem(cfg, "bias"));
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    p.lr = (float)cJSON_GetObjectItem(cfg, "lr")->valuedouble;
    p.schedule = DS_LR_CONSTANT;
    p.warmup_steps = cJSON_GetObjectItem(cfg, "lr_warmup_steps")->valueint;
    p.weight_decay = (float)cJSON_GetObjectItem(cfg, "weight_decay")->valuedouble;
    p.max_grad_norm = (float)cJSON_GetObjectItem(cfg, "max_grad_norm")->valuedouble;
    ds_trainer *t = ds_trainer_create(c.m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s: %s", model, err.msg);
    const int n_expect = cJSON_GetArraySize(cJSON_GetObjectItem(c.ref, "modules")) +
                         cJSON_GetArraySize(cJSON_GetObjectItem(c.ref, "bias"));
    if (t) CHECK_EQ_INT(ds_trainer_n_tensors(t), n_expect);
    ds_st_file init = {0}, g0 = {0};
    char ipath[640], gpath[640];
    snprintf(ipath, sizeof ipath, "%s/init.safetensors", dir);
    snprintf(gpath, sizeof gpath, "%s/grad0.safetensors", dir);
    bool ok = t && ds_st_open(&init, ipath, &err) == 0 && ds_st_open(&g0, gpath, &err) == 0;
    CHECK_MSG(ok, "%s: %s", model, err.msg);
    double worst_0 = 0, worst_g = 0, worst_v = 0;
    ok = ok && read_all(t, &init, ipath, true, model, &worst_0);
    const cJSON *losses = cJSON_GetObjectItem(c.ref, "loss");
    for (int k = 0; ok && k < 3; k++) {
        ds_train_stats s;
        ok = ds_trainer_compute_grads(t, c.ex, c.n_ex, &s, &err) == 0;
        CHECK_MSG(ok, "%s step %d: %s", model, k, err.msg);
        if (!ok) break;
        char what[96];
        snprintf(what, sizeof what, "%s step %d", model, k);
        tg_check_loss(what, s.loss, cJSON_GetArrayItem(losses, k)->valuedouble);
        if (k == 0) read_all(t, &g0, gpath, false, model, &worst_0);
        else worst_g = fmax(worst_g, check_masked(t, c.ref, k, false, model));
        ok = ds_trainer_apply(t, &s, &err) == 0;
        CHECK_MSG(ok, "%s step %d apply: %s", model, k, err.msg);
        if (k == 0) CHECK_MSG(s.lr == 0.0f, "step 0 should run at lr 0 (one warm-up step)");
        if (k > 0) worst_v = fmax(worst_v, check_masked(t, c.ref, k, true, model));
    }
    if (ok) {
        printf("%s: diff pruning, 3 steps: dense gradients worst relative error %.2e, masked %.2e, values worst "
               "|diff| %.2e\n",
               model, worst_0, worst_g, worst_v);
        check_saved(t, c.m, c.ref, model);
    }
    ds_st_close(&init);
    ds_st_close(&g0);
    ds_trainer_free(t);
out:
    tg_case_close(&c);
}

/* A save during the warm-up prunes the live dense δ to each module's top ceil(density·numel). */
static void warmup_save(ds_model *m) {
    ds_err err = {{0}};
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_DELTA);
    sp.targets = DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_DOWN);
    sp.density = 0.01f;
    sp.dp_warmup_steps = 100;
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    p.lr = 1e-2f;
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s", err.msg);
    if (!t) return;
    CHECK_EQ_INT(ds_trainer_n_tensors(t), 2 * m->cfg.n_layer); /* no bias deltas unless asked */
    int32_t tok[6] = {5, 77, 140, 3, 9, 200}, lab[6] = {-100, -100, 140, 3, 9, 200};
    ds_train_example ex = {.tokens = tok, .labels = lab, .n_tokens = 6};
    CHECK_MSG(ds_trainer_step(t, &ex, 1, NULL, &err) == 0, "%s", err.msg);
    ds_adapter *a = ds_trainer_snapshot(t, "snap", &err);
    CHECK_MSG(a && a->delta, "%s", err.msg);
    for (int32_t i = 0; a && a->delta && i < ds_trainer_n_tensors(t); i++) {
        const ds_train_tensor *tt = ds_trainer_tensor(t, i);
        int32_t l = 0;
        sscanf(tt->name, "model.layers.%d.", &l);
        const ds_delta_module *d = a->delta[(size_t)l * DS_PROJ_COUNT + (strstr(tt->name, "q_proj") ? DS_PROJ_Q : DS_PROJ_DOWN)];
        CHECK_MSG(d && d->nnz == (int64_t)ceil(0.01 * (double)tt->n - 1e-9), "%s: warm-up save keeps ceil(1%%)",
                  tt->name);
        if (!d) continue;
        float kept_min = INFINITY, all_max_dropped = 0;
        unsigned char *in = calloc(tt->n, 1);
        for (int32_t r = 0; r < d->rows; r++)
            for (int32_t k = d->row_ptr[r]; k < d->row_ptr[r + 1]; k++) {
                const size_t idx = (size_t)r * d->cols + (size_t)d->col[k];
                in[idx] = 1;
                CHECK(d->val[k] == tt->value[idx]);
                kept_min = fminf(kept_min, fabsf(d->val[k]));
            }
        for (size_t k = 0; k < tt->n; k++)
            if (!in[k]) all_max_dropped = fmaxf(all_max_dropped, fabsf(tt->value[k]));
        CHECK_MSG(kept_min >= all_max_dropped, "%s: kept |δ| %g < a dropped %g", tt->name, kept_min, all_max_dropped);
        free(in);
    }
    ds_adapter_free(a);
    ds_trainer_free(t);
}

/* Resume: state saved after the mask was fixed, loaded into a fresh trainer (mask re-derived). */
static void resume(ds_model *m) {
    ds_err err = {{0}};
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_DELTA);
    sp.targets = DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_DOWN);
    sp.density = 0.05f, sp.dp_warmup_steps = 2, sp.bias = true;
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    p.lr = 1e-2f;
    p.weight_decay = 0.01f;
    ds_trainer *a = ds_trainer_create(m, &sp, &p, &err), *b = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(a && b, "%s", err.msg);
    char dir[] = "/tmp/ds_dp_state_XXXXXX", sub[600];
    CHECK(mkdtemp(dir) != NULL);
    static const char id[] = "ftjob-00000000000000000000d1ff";
    snprintf(sub, sizeof sub, "%s/jobs", dir);
    mkdir(sub, 0700);
    snprintf(sub, sizeof sub, "%s/jobs/%s", dir, id);
    mkdir(sub, 0700);
    int32_t tok[7] = {5, 77, 140, 3, 9, 200, 31}, lab[7] = {-100, -100, 140, 3, 9, 200, 31};
    ds_train_example ex = {.tokens = tok, .labels = lab, .n_tokens = 7};
    ft_progress pr = {.step = 3}, back;
    bool ok = a && b;
    for (int k = 0; ok && k < 3; k++) ok = ds_trainer_step(a, &ex, 1, NULL, &err) == 0;
    ok = ok && ft_state_save(dir, id, a, &pr, &err) == 0 && ft_state_load(dir, id, b, &back, &err) == 0;
    CHECK_MSG(ok, "%s", err.msg);
    for (int k = 0; ok && k < 2; k++)
        ok = ds_trainer_step(a, &ex, 1, NULL, &err) == 0 && ds_trainer_step(b, &ex, 1, NULL, &err) == 0;
    CHECK_MSG(ok, "%s", err.msg);
    for (int32_t i = 0; ok && i < ds_trainer_n_tensors(a); i++) {
        const ds_train_tensor *x = ds_trainer_tensor(a, i), *y = ds_trainer_tensor(b, i);
        size_t nz = 0;
        for (size_t k = 0; k < x->n; k++) nz += x->value[k] != 0.0f;
        CHECK_MSG(!memcmp(x->value, y->value, x->n * sizeof(float)), "resume: %s differs", x->name);
        if (strstr(x->name, "weight_delta"))
            CHECK_MSG(nz == (size_t)ceil(0.05 * (double)x->n - 1e-9), "%s: %zu nonzero after the mask", x->name, nz);
    }
    snprintf(sub, sizeof sub, "%s/jobs/%s/state.bin", dir, id);
    unlink(sub);
    snprintf(sub, sizeof sub, "%s/jobs/%s", dir, id);
    rmdir(sub);
    snprintf(sub, sizeof sub, "%s/jobs", dir);
    rmdir(sub);
    rmdir(dir);
    ds_trainer_free(a);
    ds_trainer_free(b);
}

static void refusals(ds_model *m) {
    ds_err err = {{0}};
    ds_adapter_kind kind;
    CHECK_EQ_INT(ds_train_kind_parse("diff-pruning", &kind, &err), 0);
    CHECK_EQ_INT(kind, DS_ADAPTER_DELTA);
    CHECK(ds_train_method_is_diff_pruning("Diff_Pruning") && !ds_train_method_is_diff_pruning("bitfit"));
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    const struct {
        float density;
        int32_t warmup;
        uint32_t targets;
        const char *msg;
    } bad[] = {{0.0f / 0.0f, 1, DS_TRAIN_TARGET(DS_PROJ_Q), "density"},
               {-0.1f, 1, DS_TRAIN_TARGET(DS_PROJ_Q), "density"},
               {1.5f, 1, DS_TRAIN_TARGET(DS_PROJ_Q), "density"},
               {0.1f, 0, DS_TRAIN_TARGET(DS_PROJ_Q), "warmup_steps"},
               {0.1f, 1, 0, "targets"},
               {0.1f, 1, DS_TRAIN_TARGET_LM_HEAD, "targets"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_DELTA);
        sp.density = bad[i].density, sp.dp_warmup_steps = bad[i].warmup, sp.targets = bad[i].targets;
        err.msg[0] = '\0';
        ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
        CHECK_MSG(t == NULL && strstr(err.msg, bad[i].msg), "bad spec %zu: '%s'", i, err.msg);
        ds_trainer_free(t);
    }
    /* density 1 keeps everything; bias: true adds the bias deltas */
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_DELTA);
    sp.density = 1.0f, sp.bias = true, sp.targets = DS_TRAIN_TARGET(DS_PROJ_V);
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s", err.msg);
    if (t) CHECK_EQ_INT(ds_trainer_n_tensors(t), 2 * m->cfg.n_layer);
    ds_trainer_free(t);
}

int main(void) {
    ds_log_set_level(DS_LOG_WARN);
    golden_run("tiny-llama");
    golden_run("tiny-qwen2");
    ds_model *m = tg_load_model("tiny-llama");
    if (m) {
        warmup_save(m);
        resume(m);
        refusals(m);
    }
    ds_model_free(m);
    return ds_test_result();
}
