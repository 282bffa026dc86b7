/* The trainer's memory is the backend's (issue 11 item 1): training through a recording shim
 * backend (tests/unit/shim_backend.h) whose memory is PROT_NONE whenever control is outside the
 * backend, so any host dereference of a trainer buffer, batch array, parameter, gradient or moment
 * by src/train/ is a SIGSEGV.
 *   - the shim faults on a host read of its memory (checked in a child process: the test can fail);
 *   - per setup (LoRA all linear + lm_head + embed_tokens, rsLoRA with recomputation, prompt tuning,
 *     prefix tuning, BitFit on Qwen2 (biases), bottleneck sequential / parallel, diff pruning with
 *     its mask fixed after the first step), three optimizer steps through the shim give loss, grad
 *     norm, parameters, gradients and AdamW moments BIT-IDENTICAL to the same steps on the plain
 *     CPU backend;
 *   - during a step nothing is downloaded (the loss and the squared norms come back as the ops'
 *     host scalars), except diff pruning's one download of δ when its mask is fixed; the only
 *     uploads are the four index arrays of each micro-batch; no alloc / release inside a step;
 *   - publication (ds_trainer_save, ds_trainer_snapshot, ds_trainer_adapter) and the jobs' state
 *     save / load (job_store.c) run through the shim and give the same files / values as the CPU
 *     trainer; a trainer continuing from the snapshot (ds_trainer_create_from) evaluates and steps
 *     bit-identically on both backends. */
#include "ds/train.h"
#include "ds_test.h"
#include "shim_backend.h"
#include "train/jobs_internal.h"
#include "util/durable.h"
#include "train/train_internal.h"
#include "train_examples.h"

#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#define N_EX TX_N_EX

static void make_examples(ds_train_example *ex, int32_t V) { tx_make_examples(ex, V, 4242ull); }

typedef struct cfg {
    const char *name, *model;
    ds_adapter_kind kind;
    uint32_t targets;
    bool rslora;
    ds_recompute recompute;
    int bn; /* bottleneck placement + 1, 0: none */
    float density; /* diff pruning */
} cfg;

static ds_trainer *make(const ds_model *m, const cfg *c, ds_backend *be) {
    ds_train_adapter_spec sp = ds_train_default_spec(c->kind);
    if (c->kind == DS_ADAPTER_LORA || c->density > 0) sp.targets = c->targets;
    sp.use_rslora = c->rslora;
    sp.r = 4;
    sp.n_virtual = 5;
    sp.seed = 11;
    sp.density = c->density;
    sp.dp_warmup_steps = 1;
    if (c->bn) sp.bn.placement = (ds_train_bn_placement)(c->bn - 1), sp.bn.reduction_factor = 8;
    ds_train_params p = ds_train_default_params();
    p.micro_batch_tokens = 80; /* two micro-batches: 45+20 and 58 (+5 virtual rows each) */
    p.lr = 1e-2f;
    p.head_rows = 16;
    p.recompute = c->recompute;
    p.backend = be;
    ds_err err = {{0}};
    ds_trainer *t = ds_trainer_create(m, &sp, &p, &err);
    CHECK_MSG(t != NULL, "%s: %s", c->name, err.msg);
    if (!t) return NULL;
    /* zero-initialised tensors (LoRA B, biases, δ): non-zero values so every gradient path works,
     * written through the backend (tr_param_io uploads) */
    for (int32_t i = 0; i < t->n_params; i++) {
        const size_t n = t->params[i].pub.n;
        float *h = malloc(n * sizeof *h);
        CHECK(h && tr_param_io(t, i, TR_VALUE, h, false) == 0);
        for (size_t j = 0; h && j < n; j++)
            if (h[j] == 0.0f) h[j] = 1e-2f * (float)((int)((j + (size_t)i) % 7) - 3);
        CHECK(h && tr_param_io(t, i, TR_VALUE, h, true) == 0);
        free(h);
    }
    return t;
}

/* Every tensor's value, gradient and moments downloaded and compared bit for bit. */
static bool same_state(const ds_trainer *a, const ds_trainer *b, const char *what) {
    bool ok = a->n_params == b->n_params && a->step == b->step;
    for (int32_t i = 0; ok && i < a->n_params; i++) {
        const size_t n = a->params[i].pub.n;
        ok = n == b->params[i].pub.n;
        float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
        for (int k = TR_VALUE; ok && k <= TR_GRAD; k++)
            ok = x && y && !tr_param_io(a, i, k, x, false) && !tr_param_io(b, i, k, y, false) &&
                 !memcmp(x, y, n * sizeof *x);
        if (!ok) fprintf(stderr, "%s: tensor %s differs\n", what, a->params[i].pub.name);
        free(x), free(y);
    }
    return ok;
}

/* Every file of directory a equals the one of the same name in b. */
static bool same_dirs(const char *a, const char *b) {
    DIR *d = opendir(a);
    if (!d) return false;
    bool ok = true;
    int files = 0;
    for (struct dirent *e; ok && (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        char pa[600], pb[600];
        snprintf(pa, sizeof pa, "%s/%s", a, e->d_name);
        snprintf(pb, sizeof pb, "%s/%s", b, e->d_name);
        char *x = NULL, *y = NULL;
        size_t nx = 0, ny = 0;
        ds_err err = {{0}};
        ok = !ds_file_read_all(pa, (size_t)1 << 30, &x, &nx, &err) && !ds_file_read_all(pb, (size_t)1 << 30, &y, &ny, &err) &&
             nx == ny && !memcmp(x, y, nx);
        if (!ok) fprintf(stderr, "saved file %s differs\n", e->d_name);
        free(x), free(y);
        files++;
    }
    closedir(d);
    return ok && files > 0;
}

static void rm_tree(const char *dir) {
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", dir);
}

/* Publication and the jobs' state through the shim. */
static void check_publish(const ds_model *m, const cfg *c, ds_trainer *cpu, ds_trainer *sh, ds_backend *be) {
    char da[] = "/tmp/ds_shim_a_XXXXXX", db[] = "/tmp/ds_shim_b_XXXXXX";
    CHECK(mkdtemp(da) && mkdtemp(db));
    ds_err err = {{0}};
    CHECK_MSG(ds_trainer_save(cpu, da, "tiny", &err) == 0, "%s: %s", c->name, err.msg);
    shim *s = be->ctx;
    shim_reset_counts(s);
    CHECK_MSG(ds_trainer_save(sh, db, "tiny", &err) == 0, "%s: %s", c->name, err.msg);
    size_t param_bytes = 0; /* a save downloads the parameters once: values only, no moments */
    for (int32_t i = 0; i < sh->n_params; i++) param_bytes += sh->params[i].pub.n * sizeof(float);
    CHECK_MSG(s->down_bytes == param_bytes && !shim_count(s, "upload"), "%s: save downloaded %zu bytes of %zu",
              c->name, s->down_bytes, param_bytes);
    printf("%-22s save: %ld downloads, %zu B (the parameters)\n", c->name, shim_count(s, "download"), s->down_bytes);
    CHECK_MSG(same_dirs(da, db), "%s: the saved adapters differ", c->name);
    CHECK_MSG(ds_trainer_adapter(sh) != NULL, "%s: ds_trainer_adapter through the shim", c->name);
    ds_adapter *sa = ds_trainer_snapshot(sh, "snap", &err);
    CHECK_MSG(sa != NULL, "%s: %s", c->name, err.msg);
    if (sa && !c->density) { /* continuing from it (create_from uploads it), evaluated and stepped */
        ds_train_params tp = ds_train_default_params();
        tp.micro_batch_tokens = 80;
        ds_trainer *x = ds_trainer_create_from(m, sa, c->rslora, 0, &tp, &err);
        tp.backend = be;
        ds_trainer *y = ds_trainer_create_from(m, sa, c->rslora, 0, &tp, &err);
        CHECK_MSG(x && y, "%s: create_from: %s", c->name, err.msg);
        ds_train_example ex[N_EX];
        make_examples(ex, m->cfg.n_vocab);
        ds_train_stats a = {0}, b = {0};
        CHECK(x && y && !ds_trainer_eval(x, ex, N_EX, &a, &err) && !ds_trainer_eval(y, ex, N_EX, &b, &err));
        CHECK_MSG(!memcmp(&a.loss, &b.loss, sizeof a.loss), "%s: eval loss %.9g / %.9g", c->name, a.loss, b.loss);
        CHECK(x && y && !ds_trainer_step(x, ex, N_EX, &a, &err) && !ds_trainer_step(y, ex, N_EX, &b, &err));
        CHECK_MSG(x && y && same_state(x, y, c->name), "%s: a step from create_from differs", c->name);
        ds_trainer_free(x), ds_trainer_free(y);
    }
    ds_adapter_free(sa);
    /* state.bin written from the shim trainer, read into a fresh one: the same values and moments */
    ft_progress p = {.step = 3, .tokens = 123}, q = {0};
    CHECK_MSG(ds_durable_mkdir(db, "jobs/j1", &err) == 0, "%s", err.msg);
    CHECK_MSG(ft_state_save(db, "j1", sh, &p, &err) == 0, "%s: state save: %s", c->name, err.msg);
    ds_trainer *back = make(m, c, be);
    if (back) {
        CHECK_MSG(ft_state_load(db, "j1", back, &q, &err) == 0, "%s: state load: %s", c->name, err.msg);
        CHECK(q.step == 3 && q.tokens == 123);
        bool ok = back->step == sh->step;
        for (int32_t i = 0; ok && i < sh->n_params; i++) {
            const size_t n = sh->params[i].pub.n;
            float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
            for (int k = TR_VALUE; ok && k <= TR_V; k++)
                ok = x && y && !tr_param_io(sh, i, k, x, false) && !tr_param_io(back, i, k, y, false) &&
                     !memcmp(x, y, n * sizeof *x);
            free(x), free(y);
        }
        CHECK_MSG(ok, "%s: the state loaded through the shim differs", c->name);
    }
    ds_trainer_free(back);
    rm_tree(da), rm_tree(db);
}

static void check_cfg(const ds_model *m, const cfg *c, ds_backend *be) {
    shim *s = be->ctx;
    ds_train_example ex[N_EX];
    make_examples(ex, m->cfg.n_vocab);
    ds_trainer *cpu = make(m, c, NULL), *sh = make(m, c, be);
    if (!cpu || !sh) goto out;
    CHECK_MSG(same_state(cpu, sh, c->name), "%s: initial state differs", c->name);
    for (int step = 0; step < 3; step++) {
        ds_train_stats a = {0}, b = {0};
        ds_err err = {{0}};
        CHECK_MSG(ds_trainer_step(cpu, ex, N_EX, &a, &err) == 0, "%s: %s", c->name, err.msg);
        shim_reset_counts(s);
        CHECK_MSG(ds_trainer_step(sh, ex, N_EX, &b, &err) == 0, "%s: %s", c->name, err.msg);
        CHECK_MSG(!memcmp(&a.loss, &b.loss, sizeof a.loss) && !memcmp(&a.grad_norm, &b.grad_norm, sizeof a.grad_norm),
                  "%s step %d: loss %.9g / %.9g, grad norm %.9g / %.9g", c->name, step, a.loss, b.loss, a.grad_norm,
                  b.grad_norm);
        const bool mask_fixed = c->density > 0 && step == 0; /* warm-up 1: the mask is fixed in this update */
        size_t dp_bytes = 0;
        for (int32_t i = 0; mask_fixed && i < sh->n_params; i++)
            if (strstr(sh->params[i].pub.name, "weight_delta")) dp_bytes += sh->params[i].pub.n * sizeof(float);
        CHECK_MSG(s->down_bytes == dp_bytes, "%s step %d: %zu bytes downloaded during the step (expected %zu)",
                  c->name, step, s->down_bytes, dp_bytes);
        /* uploads: the index arrays of two micro-batches (src, pos, lrow, ltgt), and diff pruning's
         * kept indices once */
        const long want_up = 8 + (mask_fixed ? shim_count(s, "alloc") - 1 : 0);
        CHECK_MSG(shim_count(s, "upload") == want_up, "%s step %d: %ld uploads (expected %ld)", c->name, step,
                  shim_count(s, "upload"), want_up);
        CHECK_MSG(!shim_count(s, "release") && (mask_fixed || !shim_count(s, "alloc")),
                  "%s step %d: %ld allocs, %ld releases during a step", c->name, step, shim_count(s, "alloc"),
                  shim_count(s, "release"));
        CHECK_MSG(shim_count(s, "adamw") == sh->n_params && shim_count(s, "matmul") > 0,
                  "%s step %d: %ld adamw calls for %d tensors", c->name, step, shim_count(s, "adamw"), sh->n_params);
        if (step == 2)
            printf("%-22s step 3: %ld matmul, %ld matmul_t, %ld lora_fwd, %ld attention_fwd, %ld fill, %ld upload "
                   "(%zu B), %ld download\n",
                   c->name, shim_count(s, "matmul"), shim_count(s, "matmul_t"), shim_count(s, "lora_fwd"),
                   shim_count(s, "attention_fwd"), shim_count(s, "fill"), shim_count(s, "upload"), s->up_bytes,
                   shim_count(s, "download"));
    }
    CHECK_MSG(same_state(cpu, sh, c->name), "%s: state after three steps differs", c->name);
    check_publish(m, c, cpu, sh, be);
out:
    ds_trainer_free(cpu), ds_trainer_free(sh);
}

/* The shim is a real check: a host read of its memory kills a child with SIGSEGV. */
static void shim_faults(ds_backend *be) {
    float *p = be->iface->alloc(be->ctx, 16 * sizeof(float));
    CHECK(p != NULL);
    fflush(NULL);
    const pid_t pid = fork();
    if (pid == 0) {
        struct sigaction dfl = {.sa_handler = SIG_DFL}; /* a sanitizer's handler would exit instead */
        sigaction(SIGSEGV, &dfl, NULL);
        volatile float x = p[3];
        (void)x;
        _exit(0);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid);
    CHECK_MSG(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "a host read of shim memory did not fault");
    float h[16] = {1}, back[16] = {0};
    CHECK(be->iface->upload(be->ctx, p, h, sizeof h) == 0 && be->iface->download(be->ctx, back, p, sizeof back) == 0);
    CHECK(back[0] == 1.0f);
    be->iface->release(be->ctx, p);
}

int main(void) {
    const uint32_t all = DS_TRAIN_TARGET_ALL_LINEAR | DS_TRAIN_TARGET_LM_HEAD;
    const uint32_t qv = DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_V);
    const cfg cfgs[] = {
        {"lora all+head+embed", "tiny-llama", DS_ADAPTER_LORA, all | DS_TRAIN_TARGET_EMBED, false, DS_RECOMPUTE_OFF, 0, 0},
        {"rslora recompute", "tiny-llama", DS_ADAPTER_LORA, all | DS_TRAIN_TARGET_EMBED, true, DS_RECOMPUTE_ON, 0, 0},
        {"prompt tuning", "tiny-llama", DS_ADAPTER_PROMPT, 0, false, DS_RECOMPUTE_OFF, 0, 0},
        {"prefix tuning", "tiny-llama", DS_ADAPTER_PREFIX, 0, false, DS_RECOMPUTE_ON, 0, 0},
        {"bitfit qwen2", "tiny-qwen2", DS_ADAPTER_DELTA, 0, false, DS_RECOMPUTE_OFF, 0, 0},
        {"lora qwen2", "tiny-qwen2", DS_ADAPTER_LORA, all, false, DS_RECOMPUTE_OFF, 0, 0},
        {"bottleneck sequential", "tiny-llama", DS_ADAPTER_BOTTLENECK, 0, false, DS_RECOMPUTE_OFF,
         1 + DS_TRAIN_BN_SEQUENTIAL, 0},
        {"bottleneck houlsby", "tiny-qwen2", DS_ADAPTER_BOTTLENECK, 0, false, DS_RECOMPUTE_ON, 1 + DS_TRAIN_BN_HOULSBY, 0},
        {"bottleneck parallel", "tiny-llama", DS_ADAPTER_BOTTLENECK, 0, false, DS_RECOMPUTE_OFF,
         1 + DS_TRAIN_BN_PARALLEL, 0},
        {"diff pruning", "tiny-llama", DS_ADAPTER_DELTA, qv, false, DS_RECOMPUTE_OFF, 0, 0.05f},
    };
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = -1; /* as the trainer's own CPU backend (trainer.c tr_backend_attach) */
    ds_err err = {{0}};
    ds_backend *be = shim_create(&bp, &err);
    CHECK_MSG(be != NULL, "shim: %s", err.msg);
    if (!be) return ds_test_result();
    shim_faults(be);
    ds_model *models[2] = {0};
    tx_load_models(models);
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
        const ds_model *m = tx_model(models, cfgs[i].model);
        if (m) check_cfg(m, &cfgs[i], be);
    }
    ds_model_free(models[0]), ds_model_free(models[1]);
    ds_backend_free(be);
    return ds_test_result();
}
