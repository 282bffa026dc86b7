/* Training bottleneck adapters (src/train/train_bn.c, src/backend/cpu/cpu_train_bn.c,
 * src/train/ah_save.c) against the AdapterHub `adapters` package (tests/data/train/bottleneck/,
 * made by tests/golden/gen_train_bottleneck.py): sequential, Houlsby and parallel adapters on tiny
 * Llama and tiny Qwen2, two non-linearities per placement, from seeded non-zero parameters:
 *   loss                      |ours − ref| <= 1e-5 · |ref|                     (train_golden.h)
 *   every gradient tensor     max|ours − ref| <= 1e-4 · max(max|ref|, 1e-6)   (train_golden.h)
 *   one AdamW step            every parameter max|Δ| <= 1e-5 · max|ref| (elements whose gradient is
 *                             < 1e-4 of the tensor's max: <= 2·lr, the sign of a near-zero gradient
 *                             decides Adam's first step)
 *   the same gradients with activation recomputation (bit for bit) and one sequence per
 *   micro-batch (1e-5 of each tensor's scale)
 * and, from a spec per placement: the package's initialisation (mam_adapter: up = 0, the identity;
 * bert: N(0, 0.02²)), a few steps lower the loss, ds_trainer_save writes an AdapterHub directory
 * that ds_adapter_load reads back bit for bit, and the served model (ds_llama + the bottleneck op)
 * gives the training forward's loss (tiny Llama and tiny Qwen2); refusals by name.
 * DS_BN_EXPORT=<dir>: those trained adapters stay in <dir>/<model>/<placement> with their served
 * logits (ds_logits.json), for gen_train_bottleneck.py --check-saved <dir>/<model>/<placement> <model>. */
#include "ds/adapter.h"
#include "ds/model.h"
#include "ds/train.h"
#include "ds_test.h"
#include "golden.h"
#include "adapter_run.h"
#include "train_golden.h"

#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* One AdamW step vs torch: |Δ| <= 1e-5·max|ref|, or 2·lr where the gradient is relatively tiny. */
static void check_step(const char *cs, const ds_train_tensor *x, const cJSON *after, const cJSON *grad, float lr) {
    double pmax = golden_max_abs(after), gmax = golden_max_abs(grad), worst = 0;
    for (size_t j = 0; j < x->n; j++) {
        const double want = cJSON_GetArrayItem(after, (int)j)->valuedouble;
        const double g = cJSON_GetArrayItem(grad, (int)j)->valuedouble, d = fabs(x->value[j] - want);
        const double tol = g != 0 && fabs(g) < 1e-4 * gmax ? 2.0001 * lr : 1e-5 * fmax(pmax, 1e-6);
        CHECK_MSG(d <= tol, "%s: after AdamW, %s[%zu]: %.9g vs %.9g", cs, x->name, j, x->value[j], want);
        worst = fmax(worst, d / fmax(pmax, 1e-6));
        if (d > tol) break;
    }
    (void)worst;
}

/* The same gradients with activation recomputation (bit for bit: the hooks re-save per layer) and
 * with one sequence per micro-batch (accumulation: fp32 summation order only, 1e-5 of the scale). */
static void check_variants(const ds_model *m, const ds_adapter *init, const ds_train_params *p0,
                           const ds_train_example *ex, int n_ex, const ds_trainer *ref, const char *what) {
    for (int v = 0; v < 2; v++) {
        ds_train_params p = *p0;
        if (v == 0) p.recompute = DS_RECOMPUTE_ON;
        else p.micro_batch_seqs = 1;
        ds_err err = {{0}};
        ds_trainer *t = ds_trainer_create_from(m, init, false, 0.0f, &p, &err);
        ds_train_stats s;
        CHECK_MSG(t && ds_trainer_compute_grads(t, ex, n_ex, &s, &err) == 0, "%s: %s", what, err.msg);
        if (!t) continue;
        CHECK(v == 0 ? s.recompute : s.n_micro_batches == n_ex);
        for (int32_t i = 0; i < ds_trainer_n_tensors(t); i++) {
            const ds_train_tensor *a = ds_trainer_tensor(t, i), *b = ds_trainer_tensor(ref, i);
            double d = 0, mx = 1e-6;
            for (size_t j = 0; j < a->n; j++) d = fmax(d, fabs(a->grad[j] - b->grad[j])), mx = fmax(mx, fabs(b->grad[j]));
            if (v == 0) CHECK_MSG(d == 0, "%s: recomputation changed %s by %.3g", what, a->name, d);
            else CHECK_MSG(d <= 1e-5 * mx, "%s: accumulation changed %s by %.3g of %.3g", what, a->name, d, mx);
        }
        ds_trainer_free(t);
    }
}

static void grads_vs_torch(const char *model, const char *cs) {
    char dir[512], what[128];
    snprintf(dir, sizeof dir, "%s/train/bottleneck/%s/%s", DS_TEST_DATA, model, cs);
    snprintf(what, sizeof what, "%s/%s", model, cs);
    tg_case c;
    ds_err err = {{0}};
    ds_trainer *t = NULL;
    if (!tg_case_open(&c, model, dir, true, what)) goto out;
    const cJSON *adam = cJSON_GetObjectItem(c.ref, "adamw");
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    p.schedule = DS_LR_CONSTANT;
    p.max_grad_norm = 0;
    p.lr = (float)cJSON_GetObjectItem(adam, "lr")->valuedouble;
    p.weight_decay = (float)cJSON_GetObjectItem(adam, "weight_decay")->valuedouble;
    p.eps = (float)cJSON_GetObjectItem(adam, "eps")->valuedouble;
    t = ds_trainer_create_from(c.m, c.init, false, 0.0f, &p, &err);
    CHECK_MSG(t != NULL, "%s: %s", what, err.msg);
    ds_train_stats s;
    if (t && ds_trainer_compute_grads(t, c.ex, c.n_ex, &s, &err) == 0) {
        const double want = cJSON_GetObjectItem(c.ref, "loss")->valuedouble;
        tg_check_loss(what, s.loss, want);
        const cJSON *grads = cJSON_GetObjectItem(c.ref, "grads");
        const double worst = tg_check_grads(t, grads, what);
        check_variants(c.m, c.init, &p, c.ex, c.n_ex, t, what);
        CHECK_MSG(ds_trainer_apply(t, &s, &err) == 0, "%s: apply: %s", what, err.msg);
        const cJSON *after = cJSON_GetObjectItem(adam, "params");
        for (int32_t i = 0; i < ds_trainer_n_tensors(t); i++) {
            const ds_train_tensor *tt = ds_trainer_tensor(t, i);
            const cJSON *a = cJSON_GetObjectItem(after, tt->name), *g = cJSON_GetObjectItem(grads, tt->name);
            CHECK_MSG(a && g && cJSON_GetArraySize(a) == (int)tt->n, "%s: no reference for %s", what, tt->name);
            if (a && g && cJSON_GetArraySize(a) == (int)tt->n) check_step(what, tt, a, g, p.lr);
        }
        printf("%s: loss %.7f (torch %.7f), %d gradients, worst relative error %.2e; AdamW step checked\n", what,
               s.loss, want, cJSON_GetArraySize(grads), worst);
    } else {
        CHECK_MSG(0, "%s: compute_grads: %s", what, err.msg);
    }
out:
    ds_trainer_free(t);
    tg_case_close(&c);
}

/* Serves `a` on probe tokens: logits [n][V] (malloc'd), or NULL. */
static float *serve_logits(const ds_model *m, const ds_adapter *a, int32_t *toks, int n) {
    ds_err err = {{0}};
    ds_backend *b = ds_backend_create("cpu", NULL, &err);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)8 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = b ? ds_llama_create(m, b, &lp, &err) : NULL;
    ds_adapter_dev dev;
    const bool up = L && ds_adapter_dev_upload(b, a, &dev, &err) == 0;
    CHECK_MSG(up, "serve: %s", err.msg);
    float *logits = up ? malloc(sizeof(float) * (size_t)n * m->cfg.n_vocab) : NULL;
    if (logits) {
        ar_ctx c;
        ar_init(&c, L, m);
        ar_add(&c, &dev);
        int32_t *tk[1] = {toks};
        if (ar_step(&c, tk, &n, logits)) free(logits), logits = NULL;
        ar_free(&c);
    }
    if (up) ds_adapter_dev_release(b, &dev);
    ds_llama_free(L);
    ds_backend_free(b);
    return logits;
}

/* Mean CE of tokens[1..n) from served logits. */
static double served_loss(const float *logits, const int32_t *toks, int n, int V) {
    double sum = 0;
    for (int i = 0; i + 1 < n; i++) {
        const float *r = logits + (size_t)i * V;
        double mx = r[0], z = 0;
        for (int v = 1; v < V; v++) mx = fmax(mx, r[v]);
        for (int v = 0; v < V; v++) z += exp(r[v] - mx);
        sum += mx + log(z) - r[toks[i + 1]];
    }
    return sum / (n - 1);
}

static void export_logits(const char *dir, const float *logits, const int32_t *toks, int n, int V) {
    char path[700];
    snprintf(path, sizeof path, "%s/ds_logits.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return;
    fprintf(f, "{\"tokens\":[");
    for (int i = 0; i < n; i++) fprintf(f, "%s%d", i ? "," : "", toks[i]);
    fprintf(f, "],\"logits\":[");
    for (size_t i = 0; i < (size_t)n * V; i++) fprintf(f, "%s%.9g", i ? "," : "", logits[i]);
    fprintf(f, "]}\n");
    fclose(f);
    printf("exported %s\n", path);
}

static void spec_train_save_serve(ds_model *m, const char *model, ds_train_bn_placement pl) {
    static const char *const names[] = {"sequential", "houlsby", "parallel"};
    char pn[96];
    snprintf(pn, sizeof pn, "%s/%s", model, names[pl]);
    ds_err err = {{0}};
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_BOTTLENECK);
    sp.name = "bn-trained";
    sp.seed = 7;
    sp.bn.placement = pl;
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 64;
    p.lr = 1e-2f;
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s: %s", pn, err.msg);
    if (!t) return;
    const ds_adapter *a = ds_trainer_adapter(t);
    const int32_t d = m->cfg.d_model, L = m->cfg.n_layer, size = d / 16;
    CHECK_EQ_INT(ds_trainer_n_tensors(t), 4 * L * (pl == DS_TRAIN_BN_HOULSBY ? 2 : 1));
    CHECK_MSG(ds_train_bn_bytes(m, &sp.bn) == a->host_bytes, "%s: size estimate %zu, adapter %zu", pn,
              ds_train_bn_bytes(m, &sp.bn), a->host_bytes);
    const ds_bn_module *b = a->bn[DS_BN_FFN];
    CHECK(b && b->size == size && (pl == DS_TRAIN_BN_HOULSBY) == (a->bn[DS_BN_ATTN] != NULL));
    if (!b) goto done;
    CHECK(b->act == (pl == DS_TRAIN_BN_HOULSBY ? DS_ACT_SILU : DS_ACT_RELU));
    CHECK(b->scale == (pl == DS_TRAIN_BN_PARALLEL ? 4.0f : 1.0f));
    double s2 = 0, up_max = 0, dmax = 0;
    for (int32_t i = 0; i < size * d; i++) s2 += (double)b->down[i] * b->down[i], dmax = fmax(dmax, fabs(b->down[i]));
    for (int32_t i = 0; i < size * d; i++) up_max = fmax(up_max, fabs(b->up[i]));
    const double sd = sqrt(s2 / (size * d));
    if (pl == DS_TRAIN_BN_PARALLEL) { /* mam_adapter: kaiming_uniform(a=√5) down, zero up */
        CHECK_MSG(up_max == 0 && dmax <= 1.0 / sqrt(d) && dmax > 0.8 / sqrt(d), "%s: init up %g down %g", pn, up_max,
                  dmax);
    } else { /* bert: N(0, 0.02²) both */
        CHECK_MSG(fabs(sd - 0.02) < 0.004 && up_max > 0, "%s: init std %g", pn, sd);
    }
    int32_t tok[8] = {5, 77, 140, 3, 9, 200, 31, 64};
    ds_train_example ex = {.tokens = tok, .labels = NULL, .n_tokens = 8};
    ds_train_stats s0, s;
    CHECK(ds_trainer_eval(t, &ex, 1, &s0, &err) == 0);
    for (int k = 0; k < 5; k++) CHECK_MSG(ds_trainer_step(t, &ex, 1, &s, &err) == 0, "%s", err.msg);
    CHECK(ds_trainer_eval(t, &ex, 1, &s, &err) == 0);
    CHECK_MSG(s.loss < s0.loss, "%s: loss %.5f after 5 steps, %.5f before", pn, s.loss, s0.loss);
    const char *exp_dir = getenv("DS_BN_EXPORT");
    char tmp[] = "/tmp/ds_bn_train_XXXXXX", dir[512];
    if (exp_dir) {
        snprintf(dir, sizeof dir, "%s/%s", exp_dir, model);
        mkdir(exp_dir, 0755), mkdir(dir, 0755);
        snprintf(dir, sizeof dir, "%s/%s/%s", exp_dir, model, names[pl]);
    } else {
        snprintf(dir, sizeof dir, "%s", mkdtemp(tmp) ? tmp : "/tmp/ds_bn_train");
    }
    char mname[128];
    snprintf(mname, sizeof mname, "tests/data/models/%s", model);
    CHECK_MSG(ds_trainer_save(t, dir, mname, &err) == 0, "%s: save: %s", pn, err.msg);
    ds_adapter *back = ds_adapter_load(dir, m, NULL, &err);
    CHECK_MSG(back != NULL, "%s: reload: %s", pn, err.msg);
    for (size_t i = 0; back && i < (size_t)L * DS_BN_SITES; i++) {
        const ds_bn_module *x = a->bn[i], *y = back->bn[i];
        CHECK(!x == !y);
        if (!x || !y) continue;
        CHECK(x->size == y->size && x->act == y->act && x->flags == y->flags && x->scale == y->scale);
        CHECK(!memcmp(x->down, y->down, sizeof(float) * (size_t)x->size * d) &&
              !memcmp(x->up, y->up, sizeof(float) * (size_t)x->size * d) &&
              !memcmp(x->down_b, y->down_b, sizeof(float) * (size_t)x->size) &&
              !memcmp(x->up_b, y->up_b, sizeof(float) * (size_t)d));
    }
    if (back) { /* the served model computes what the training forward did */
        float *lg = serve_logits(m, back, tok, 8);
        if (lg) {
            const double sl = served_loss(lg, tok, 8, m->cfg.n_vocab);
            CHECK_MSG(fabs(sl - s.loss) <= 1e-5 * fabs(s.loss), "%s: served loss %.8g, trained %.8g", pn, sl, s.loss);
            printf("%s: loss %.5f -> %.5f in 5 steps; saved, reloaded bit for bit, served loss %.7f (training "
                   "forward %.7f)\n", pn, s0.loss, s.loss, sl, s.loss);
            if (exp_dir) export_logits(dir, lg, tok, 8, m->cfg.n_vocab);
        }
        free(lg);
    }
    ds_adapter_free(back);
    if (!exp_dir) golden_rm_saved(dir);
done:
    ds_trainer_free(t);
}

static void refusals(ds_model *m) {
    ds_err err = {{0}};
    ds_adapter_kind kind;
    CHECK_EQ_INT(ds_train_kind_parse("bottleneck", &kind, &err), 0);
    CHECK_EQ_INT(kind, DS_ADAPTER_BOTTLENECK);
    ds_train_bn_placement pl;
    CHECK_EQ_INT(ds_train_bn_placement_parse("double_seq_bn", &pl, &err), 0);
    CHECK_EQ_INT(pl, DS_TRAIN_BN_HOULSBY);
    CHECK_EQ_INT(ds_train_bn_placement_parse("diagonal", &pl, &err), DS_EINVAL);
    int32_t act;
    CHECK_EQ_INT(ds_train_bn_act_parse("gelu_new", &act, &err), 0);
    CHECK_EQ_INT(act, DS_ACT_GELU_TANH);
    CHECK_EQ_INT(ds_train_bn_act_parse("sigmoid", &act, &err), DS_EUNSUPPORTED);
    CHECK(strstr(err.msg, "sigmoid") != NULL);
    CHECK_EQ_INT(ds_train_bn_act_parse("nope", &act, &err), DS_EINVAL);
    ds_train_adapter_spec sp = ds_train_default_spec(DS_ADAPTER_BOTTLENECK);
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 32;
    sp.bn.reduction_factor = 0;
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK(t == NULL && strstr(err.msg, "reduction_factor"));
    ds_trainer_free(t);
    sp.bn.reduction_factor = 16;
    sp.bn.act = DS_ACT_SIGMOID;
    t = ds_trainer_create(m, &sp, &p, &err);
    CHECK(t == NULL && strstr(err.msg, "non_linearity"));
    ds_trainer_free(t);
    /* the package's LayerNorm / channel-scaling options are served, not trained */
    ds_adapter *ln = ds_adapter_load(DS_TEST_DATA "/adapters/bottleneck/tiny-llama/bn-ln", m, NULL, &err);
    CHECK_MSG(ln != NULL, "%s", err.msg);
    if (ln) {
        t = ds_trainer_create_from(m, ln, false, 0.0f, &p, &err);
        CHECK_MSG(t == NULL && strstr(err.msg, "LayerNorm"), "%s", err.msg);
        ds_trainer_free(t);
    }
    ds_adapter_free(ln);
    /* a backend without the bottleneck training ops */
    ds_backend *cpu = ds_backend_create("cpu", NULL, &err);
    if (cpu) {
        struct ds_backend_iface f = *cpu->iface;
        struct ds_backend_train_iface tf = *f.train;
        tf.bn_fwd = NULL;
        f.train = &tf;
        ds_backend nb = {.iface = &f, .ctx = cpu->ctx};
        p.backend = &nb;
        sp.bn.act = -1;
        t = ds_trainer_create(m, &sp, &p, &err);
        CHECK_MSG(t == NULL && strstr(err.msg, "bottleneck training ops"), "%s", err.msg);
        ds_trainer_free(t);
        ds_backend_free(cpu);
    }
}

int main(void) {
    ds_log_set_level(DS_LOG_WARN);
    static const char *const llama[] = {"seq-relu", "houlsby-swish", "par-relu"};
    static const char *const qwen[] = {"seq-gelu_new", "houlsby-tanh", "par-gelu"};
    for (int i = 0; i < 3; i++) grads_vs_torch("tiny-llama", llama[i]);
    for (int i = 0; i < 3; i++) grads_vs_torch("tiny-qwen2", qwen[i]);
    ds_model *m = tg_load_model("tiny-llama");
    if (m) {
        for (int pl = 0; pl < 3; pl++) spec_train_save_serve(m, "tiny-llama", (ds_train_bn_placement)pl);
        refusals(m);
    }
    ds_model_free(m);
    if ((m = tg_load_model("tiny-qwen2")))
        for (int pl = 0; pl < 3; pl++) spec_train_save_serve(m, "tiny-qwen2", (ds_train_bn_placement)pl);
    ds_model_free(m);
    return ds_test_result();
}
