/* A training step in bounded units (src/train/train_units.c) against the whole step:
 *   - advanced unit by unit, with the smallest units (one layer / one head chunk) and with mixed
 *     sizes, three optimizer steps give parameters, gradients, AdamW moments, loss and grad norm
 *     BIT-IDENTICAL to ds_trainer_step, and to the step as train_step.c ran it before units existed
 *     (old_step below: tr_forward, tr_head, tr_backward per micro-batch, then the update);
 *   - with the smallest units (half a layer: attention or MLP block, forward, recomputation or
 *     backward) the step takes exactly 2L forward + ceil(label rows / head_rows) head +
 *     max((2 or 4 with recomputation) · (L − lowest trained layer), 1) backward units per
 *     micro-batch, plus one update;
 *   - a generous unit target packs the layers of a micro-batch into one unit once measured;
 *   - evaluation unit by unit gives ds_trainer_eval's loss bit for bit;
 *   - misuse: advance without begin (DS_EINVAL), begin during a step (DS_EBUSY), a bad example
 *     (nothing started), abort (the parameters unchanged).
 * Over LoRA (all linear + lm_head), rsLoRA with recomputation, prompt tuning, prefix tuning and
 * BitFit, on tiny Llama and tiny Qwen2 (biases). */
#include "ds/train.h"
#include "ds_test.h"
#include "train/train_internal.h"
#include "train_examples.h"

#include <string.h>

#define N_EX TX_N_EX

static void make_examples(ds_train_example *ex, int32_t V) { tx_make_examples(ex, V, 12345ull); }

/* The step exactly as train_step.c ran it before units (the whole-pass functions it called). */
static int old_step(ds_trainer *t, const ds_train_example *ex, int32_t n, double *loss, ds_err *err) {
    int64_t n_labels;
    int rc = tr_check_batch(t, ex, n, &n_labels, err);
    if (rc) return rc;
    t->op_rc = 0;
    tr_params_zero_grad(t);
    const float scale = (float)(1.0 / (double)n_labels);
    double sum = 0.0;
    for (int32_t k = 0; k < n;) {
        k = tr_pack(t, ex, n, k);
        tr_forward(t, true);
        sum += tr_head(t, scale, true);
        tr_backward(t);
    }
    if ((rc = tr_op_check(t, err))) return rc;
    *loss = sum / (double)n_labels;
    return tr_apply(t, NULL, err);
}

/* Units of one step with the smallest units, computed from the packing. */
static int32_t expected_units(ds_trainer *t, const ds_train_example *ex, int32_t n) {
    int32_t units = 1; /* the update */
    const int32_t L = t->dim.L, low = tr_backward_low(t);
    for (int32_t k = 0; k < n;) {
        k = tr_pack(t, ex, n, k);
        const int32_t bwd = tr_backward_pieces_per_layer(t) * (L - low);
        units += 2 * L + (t->b.n_lrows + t->head_rows - 1) / t->head_rows + (bwd > 1 ? bwd : 1);
    }
    return units;
}

static bool same_state(const ds_trainer *a, const ds_trainer *b, const char *what) {
    bool ok = a->n_params == b->n_params;
    for (int32_t i = 0; ok && i < a->n_params; i++) {
        const tr_param *p = &a->params[i], *q = &b->params[i];
        const size_t bytes = p->pub.n * sizeof(float);
        ok = p->pub.n == q->pub.n && !memcmp(p->pub.value, q->pub.value, bytes) && !memcmp(p->grad, q->grad, bytes) &&
             !memcmp(p->m, q->m, bytes) && !memcmp(p->v, q->v, bytes);
        if (!ok) fprintf(stderr, "%s: tensor %s differs\n", what, p->pub.name);
    }
    return ok && a->step == b->step;
}

typedef struct cfg {
    const char *name, *model;
    ds_adapter_kind kind;
    uint32_t targets;
    bool rslora;
    ds_recompute recompute;
} cfg;

static ds_trainer *make(const ds_model *m, const cfg *c, double unit_s) {
    ds_train_adapter_spec sp = ds_train_default_spec(c->kind);
    if (c->kind == DS_ADAPTER_LORA) {
        sp.targets = c->targets;
        sp.use_rslora = c->rslora;
        sp.r = 4;
    }
    sp.n_virtual = 5;
    sp.seed = 7;
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 80; /* two micro-batches: 45+20 and 58 (+5 virtual rows each) */
    p.lr = 1e-2f;
    p.head_rows = 16; /* several head chunks per micro-batch */
    p.recompute = c->recompute;
    p.unit_seconds = unit_s;
    ds_err err = {{0}};
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s: %s", c->name, err.msg);
    if (t && c->kind == DS_ADAPTER_LORA) /* B = 0 at start: make every gradient path non-trivial */
        for (int32_t i = 0; i < t->n_params; i++)
            for (size_t j = 0; j < t->params[i].pub.n; j++)
                if (t->params[i].pub.value[j] == 0.0f) t->params[i].pub.value[j] = 1e-2f * (float)((int)(j % 7) - 3);
    return t;
}

/* Runs a whole step unit by unit; returns the units it took (or -1). */
static int32_t unit_step(ds_trainer *t, ds_train_run what, const ds_train_example *ex, int32_t n, ds_train_stats *s) {
    ds_err err = {{0}};
    int rc = ds_trainer_begin(t, what, ex, n, &err);
    CHECK_MSG(rc == 0, "begin: %s", err.msg);
    if (rc) return -1;
    int32_t units = 0;
    do {
        rc = ds_trainer_advance(t, s, &err);
        units++;
        CHECK(ds_trainer_busy(t) == (rc == 1));
    } while (rc == 1);
    CHECK_MSG(rc == 0, "advance: %s", err.msg);
    CHECK_EQ_INT(s->n_units, units);
    return rc ? -1 : units;
}

static void check_cfg(const ds_model *m, const cfg *c) {
    ds_train_example ex[N_EX];
    make_examples(ex, m->cfg.n_vocab);
    ds_trainer *whole = make(m, c, 0.01), *old = make(m, c, 0.01), *small = make(m, c, 0.0),
               *mixed = make(m, c, 2e-4), *big = make(m, c, 1.0);
    if (!whole || !old || !small || !mixed || !big) goto out;
    CHECK(same_state(whole, small, c->name)); /* same start */
    int32_t max_big = 0;
    for (int k = 0; k < 3; k++) {
        ds_err err = {{0}};
        ds_train_stats sw, ss, sm, sb;
        double old_loss = 0;
        CHECK_MSG(ds_trainer_step(whole, ex, N_EX, &sw, &err) == 0, "%s: %s", c->name, err.msg);
        CHECK_MSG(old_step(old, ex, N_EX, &old_loss, &err) == 0, "%s: %s", c->name, err.msg);
        const int32_t want = expected_units(small, ex, N_EX);
        const int32_t got = unit_step(small, DS_TRAIN_RUN_STEP, ex, N_EX, &ss);
        CHECK_MSG(got == want, "%s: %d units with the smallest units, expected %d", c->name, got, want);
        unit_step(mixed, DS_TRAIN_RUN_STEP, ex, N_EX, &sm);
        const int32_t nb = unit_step(big, DS_TRAIN_RUN_STEP, ex, N_EX, &sb);
        if (k > 0 && nb > max_big) max_big = nb;
        CHECK_MSG(sw.loss == ss.loss && sw.loss == sm.loss && sw.loss == sb.loss && sw.loss == old_loss,
                  "%s step %d: loss %.17g / %.17g / %.17g / %.17g / old %.17g", c->name, k, sw.loss, ss.loss, sm.loss,
                  sb.loss, old_loss);
        CHECK(sw.grad_norm == ss.grad_norm && sw.grad_norm == sm.grad_norm && sw.lr == ss.lr);
        CHECK_EQ_INT(sw.n_micro_batches, 2);
        CHECK_EQ_INT(ss.step, k + 1);
        CHECK_MSG(sw.loss > 0 && sw.grad_norm > 0, "%s: loss %g grad norm %g", c->name, sw.loss, sw.grad_norm);
        CHECK(same_state(whole, old, c->name));
        CHECK(same_state(whole, small, c->name));
        CHECK(same_state(whole, mixed, c->name));
        CHECK(same_state(whole, big, c->name));
        if (k == 0) printf("%-18s step 1: loss %.6f, %d units with the smallest units\n", c->name, sw.loss, got);
    }
    /* measured: forward, head and backward of a micro-batch fit a 1 s unit each */
    CHECK_MSG(max_big <= 3 * 2 + 1, "%s: %d units with a 1 s target", c->name, max_big);
    /* evaluation */
    ds_train_stats se, su;
    ds_err err = {{0}};
    CHECK(ds_trainer_eval(whole, ex, N_EX, &se, &err) == 0);
    unit_step(small, DS_TRAIN_RUN_EVAL, ex, N_EX, &su);
    CHECK_MSG(se.loss == su.loss, "%s eval: %.17g vs %.17g", c->name, se.loss, su.loss);
    CHECK_EQ_INT(su.step, 3);
out:
    ds_trainer_free(whole), ds_trainer_free(old), ds_trainer_free(small), ds_trainer_free(mixed), ds_trainer_free(big);
}

static void misuse(const ds_model *m) {
    const cfg c = {"misuse", NULL, DS_ADAPTER_LORA, DS_TRAIN_TARGET(DS_PROJ_Q), false, DS_RECOMPUTE_AUTO};
    ds_trainer *t = make(m, &c, 0.0), *ref = make(m, &c, 0.0);
    if (!t || !ref) goto out;
    ds_train_example ex[N_EX];
    make_examples(ex, m->cfg.n_vocab);
    ds_err err = {{0}};
    ds_train_stats s;
    CHECK_EQ_INT(ds_trainer_advance(t, &s, &err), DS_EINVAL);
    int32_t bad_tok[2] = {1, m->cfg.n_vocab};
    ds_train_example bad = {.tokens = bad_tok, .n_tokens = 2};
    CHECK_EQ_INT(ds_trainer_begin(t, DS_TRAIN_RUN_STEP, &bad, 1, &err), DS_EINVAL);
    CHECK(!ds_trainer_busy(t));
    CHECK_EQ_INT(ds_trainer_begin(t, DS_TRAIN_RUN_STEP, ex, N_EX, &err), 0);
    CHECK_EQ_INT(ds_trainer_advance(t, &s, &err), 1);
    CHECK_EQ_INT(ds_trainer_begin(t, DS_TRAIN_RUN_STEP, ex, N_EX, &err), DS_EBUSY);
    CHECK_EQ_INT(ds_trainer_step(t, ex, N_EX, &s, &err), DS_EBUSY);
    ds_trainer_abort(t);
    CHECK(!ds_trainer_busy(t));
    CHECK_EQ_INT(ds_trainer_steps_done(t), 0);
    CHECK(ds_trainer_step(t, ex, N_EX, &s, &err) == 0);
    CHECK(ds_trainer_step(ref, ex, N_EX, &s, &err) == 0);
    CHECK(same_state(t, ref, "after abort"));
out:
    ds_trainer_free(t), ds_trainer_free(ref);
}

int main(void) {
    const uint32_t all = DS_TRAIN_TARGET_ALL_LINEAR | DS_TRAIN_TARGET_LM_HEAD;
    const cfg cfgs[] = {
        {"lora all+lm_head", "tiny-llama", DS_ADAPTER_LORA, all, false, DS_RECOMPUTE_OFF},
        {"rslora recompute", "tiny-llama", DS_ADAPTER_LORA, all | DS_TRAIN_TARGET_EMBED, true, DS_RECOMPUTE_ON},
        {"lora o_proj", "tiny-llama", DS_ADAPTER_LORA, DS_TRAIN_TARGET(DS_PROJ_O), false, DS_RECOMPUTE_OFF},
        {"lora lm_head only", "tiny-llama", DS_ADAPTER_LORA, DS_TRAIN_TARGET_LM_HEAD, false, DS_RECOMPUTE_OFF},
        {"prompt tuning", "tiny-llama", DS_ADAPTER_PROMPT, 0, false, DS_RECOMPUTE_OFF},
        {"prefix tuning", "tiny-llama", DS_ADAPTER_PREFIX, 0, false, DS_RECOMPUTE_ON},
        {"bitfit qwen2", "tiny-qwen2", DS_ADAPTER_DELTA, 0, false, DS_RECOMPUTE_OFF},
        {"lora qwen2", "tiny-qwen2", DS_ADAPTER_LORA, all, false, DS_RECOMPUTE_OFF},
    };
    ds_model *models[2] = {0};
    tx_load_models(models);
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
        const ds_model *m = tx_model(models, cfgs[i].model);
        if (m) check_cfg(m, &cfgs[i]);
    }
    if (models[0]) misuse(models[0]);
    ds_model_free(models[0]), ds_model_free(models[1]);
    return ds_test_result();
}
