/* Test harness for the training golden tests (test_train_bn.c, test_train_bitfit.c,
 * test_train_diff_pruning.c; tg_load_model also test_train_grad.c and test_train_interop.c): the
 * tiny models, the micro-batch of a reference.json ("examples": [{"tokens", "labels"}], written by
 * tests/golden/train_batch.py for gen_train_bitfit.py, gen_train_diff_pruning.py and
 * gen_train_bottleneck.py) and the loss and gradient checks they share:
 *   loss                    |ours − ref| <= TG_LOSS_RTOL · |ref|
 *   every gradient tensor   max|ours − ref| <= TG_GRAD_RTOL · max(max|ref|, 1e-6)
 * Single-threaded, like the tests. */
#ifndef DS_TEST_TRAIN_GOLDEN_H
#define DS_TEST_TRAIN_GOLDEN_H

#include "ds/model.h"
#include "ds/train.h"
#include "ds_test.h"
#include "golden.h"

#include <stdbool.h>
#include <string.h>

#define TG_FN static __attribute__((unused))
#define TG_LOSS_RTOL 1e-5
#define TG_GRAD_RTOL 1e-4
#define TG_MAX_EXAMPLES 4

/* tests/data/models/<name> without its tokenizer, or NULL (CHECKed, with the loader's message). */
TG_FN ds_model *tg_load_model(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/models/%s", DS_TEST_DATA, name);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_tokenizer = false;
    ds_model *m = ds_model_load(path, &mp, &err);
    CHECK_MSG(m != NULL, "%s: %s", name, err.msg);
    return m;
}

/* ref's "examples" as ex[0..n) (n returned, at most TG_MAX_EXAMPLES: more fail a CHECK). Their
 * token and label arrays are bufs[2i], bufs[2i + 1] (malloc'd: tg_free_examples). */
TG_FN int tg_read_examples(const cJSON *ref, ds_train_example ex[TG_MAX_EXAMPLES],
                           int32_t *bufs[2 * TG_MAX_EXAMPLES]) {
    const cJSON *arr = cJSON_GetObjectItem(ref, "examples"), *e;
    CHECK_MSG(cJSON_GetArraySize(arr) <= TG_MAX_EXAMPLES, "%d examples, at most %d", cJSON_GetArraySize(arr),
              TG_MAX_EXAMPLES);
    int n_ex = 0;
    cJSON_ArrayForEach(e, arr) {
        if (n_ex == TG_MAX_EXAMPLES) break;
        int n, nl;
        bufs[2 * n_ex] = golden_ids(cJSON_GetObjectItem(e, "tokens"), &n);
        bufs[2 * n_ex + 1] = golden_ids(cJSON_GetObjectItem(e, "labels"), &nl);
        CHECK_MSG(nl == n, "example %d: %d labels for %d tokens", n_ex, nl, n);
        ex[n_ex] = (ds_train_example){.tokens = bufs[2 * n_ex], .labels = bufs[2 * n_ex + 1], .n_tokens = n};
        n_ex++;
    }
    return n_ex;
}

TG_FN void tg_free_examples(int32_t *bufs[2 * TG_MAX_EXAMPLES], int n_ex) {
    for (int i = 0; i < 2 * n_ex; i++) free(bufs[i]);
}

/* One golden case: the model, the adapter it starts from (NULL when the test builds the trainer from
 * a spec), dir/reference.json and its micro-batch. */
typedef struct tg_case {
    ds_model *m;
    ds_adapter *init;
    cJSON *ref;
    ds_train_example ex[TG_MAX_EXAMPLES];
    int32_t *bufs[2 * TG_MAX_EXAMPLES];
    int n_ex;
} tg_case;

/* Opens tests/data/models/<model>, the adapter in dir (with_adapter) and dir/reference.json. False
 * (CHECKed, with what in the message) when one fails: tg_case_close still frees what was opened. */
TG_FN bool tg_case_open(tg_case *c, const char *model, const char *dir, bool with_adapter, const char *what) {
    memset(c, 0, sizeof *c);
    char path[600];
    snprintf(path, sizeof path, "%s/reference.json", dir);
    ds_err err = {{0}};
    c->m = tg_load_model(model);
    c->init = c->m && with_adapter ? ds_adapter_load(dir, c->m, NULL, &err) : NULL;
    c->ref = golden_load_json(path);
    const bool ok = c->m && (c->init || !with_adapter) && c->ref;
    CHECK_MSG(ok, "%s: %s%s", what, c->ref ? "" : "no reference.json; ", err.msg);
    if (ok) c->n_ex = tg_read_examples(c->ref, c->ex, c->bufs);
    return ok;
}

TG_FN void tg_case_close(tg_case *c) {
    tg_free_examples(c->bufs, c->n_ex);
    cJSON_Delete(c->ref);
    ds_adapter_free(c->init);
    ds_model_free(c->m);
}

/* The loss against the reference's; what names it in the failure message. */
TG_FN void tg_check_loss(const char *what, double loss, double want) {
    CHECK_MSG(fabs(loss - want) <= TG_LOSS_RTOL * fabs(want), "%s: loss %.8g vs %.8g", what, loss, want);
}

/* Every trainer tensor's gradient against grads[its name] (a reference of its size each, and no
 * other reference). Returns the worst error relative to each tensor's scale. */
TG_FN double tg_check_grads(const ds_trainer *t, const cJSON *grads, const char *what) {
    int n_t = 0;
    double worst = 0;
    for (int32_t i = 0; i < ds_trainer_n_tensors(t); i++) {
        const ds_train_tensor *tt = ds_trainer_tensor(t, i);
        const cJSON *g = cJSON_GetObjectItem(grads, tt->name);
        const bool have = g != NULL && cJSON_GetArraySize(g) == (int)tt->n;
        CHECK_MSG(have, "%s: no reference gradient of %zu values for %s", what, tt->n, tt->name);
        if (!have) continue;
        const double scale = fmax(golden_max_abs(g), 1e-6), d = golden_max_diff(tt->grad, g, (int)tt->n);
        CHECK_MSG(d <= TG_GRAD_RTOL * scale, "%s %s: max|d grad| %.3g > %.3g", what, tt->name, d,
                  TG_GRAD_RTOL * scale);
        worst = fmax(worst, d / scale);
        n_t++;
    }
    CHECK_EQ_INT(n_t, cJSON_GetArraySize(grads));
    return worst;
}

#endif
