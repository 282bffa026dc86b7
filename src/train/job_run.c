/* One fine-tuning job, run by the training thread of jobs.c: its datasets, its trainer (a new
 * adapter or a copy of a loaded one), the epochs of shuffled batches, a checkpoint per epoch, the
 * state saved for a resume, and publication in the registry.
 *
 * Each trainer step and evaluation is handed to the engine thread when an engine is attached,
 * which advances it one bounded unit at a time between inference steps (ds_engine_set_background,
 * ds_trainer_advance: training takes at most --train-budget of the engine's time while requests
 * run), and computed on the training thread itself when none is (tests, tools). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds/model.h"
#include "ds/train.h"
#include "train/dataset.h"
#include "train/jobs_internal.h"
#include "util/durable.h"
#include "util/mem.h"
#include "util/rng.h"

/* ---- co-serving: trainer calls on the engine thread ---------------------------------------- */

/* Engine thread: ONE unit of the pending trainer call (the first also starts it); true while the
 * call has units left, so the engine comes back after its next inference step. */
static bool ft_background(void *ud) {
    ds_ft_manager *m = ud;
    pthread_mutex_lock(&m->mu);
    if (!m->ho.pending) {
        pthread_mutex_unlock(&m->mu);
        return false;
    }
    const bool start = !m->ho.started;
    m->ho.started = true;
    pthread_mutex_unlock(&m->mu);
    ds_trainer *t = m->ho.t;
    int st;
    if (!start && (__atomic_load_n(&m->stop, __ATOMIC_ACQUIRE) || __atomic_load_n(m->ho.cancel, __ATOMIC_ACQUIRE))) {
        ds_trainer_abort(t); /* a shutdown or cancel waits one unit, not a whole step */
        st = ds_err_set(m->ho.err, DS_ECANCELED, "training step interrupted");
    } else {
        st = start ? ds_trainer_begin(t, m->ho.eval ? DS_TRAIN_RUN_EVAL : DS_TRAIN_RUN_STEP, m->ho.ex, m->ho.n,
                                      m->ho.err)
                   : 0;
        if (!st) {
            ds_trainer_set_unit_target(t, ds_engine_background_unit_target(m->engine));
            st = ds_trainer_advance(t, m->ho.stats, m->ho.err);
            if (st == 1) return true;
        }
    }
    pthread_mutex_lock(&m->mu);
    m->ho.pending = false;
    m->ho.status = st;
    m->ho.done = true;
    pthread_cond_broadcast(&m->ho_cv);
    pthread_mutex_unlock(&m->mu);
    return false;
}

/* One trainer call: on the engine thread when attached (co-serving), else right here. */
static int trainer_call(ds_ft_manager *m, const ft_job *j, ds_trainer *t, const ds_train_example *ex, int32_t n,
                        bool eval, ds_train_stats *stats, ds_err *err) {
    if (!m->engine) return eval ? ds_trainer_eval(t, ex, n, stats, err) : ds_trainer_step(t, ex, n, stats, err);
    pthread_mutex_lock(&m->mu);
    m->ho.t = t, m->ho.ex = ex, m->ho.n = n, m->ho.eval = eval, m->ho.stats = stats, m->ho.err = err;
    m->ho.done = m->ho.started = false;
    m->ho.cancel = &j->cancel;
    m->ho.pending = true;
    pthread_mutex_unlock(&m->mu);
    ds_engine_wake_background(m->engine);
    pthread_mutex_lock(&m->mu);
    while (!m->ho.done) pthread_cond_wait(&m->ho_cv, &m->mu);
    int st = m->ho.status;
    pthread_mutex_unlock(&m->mu);
    return st;
}

void ds_ft_manager_attach_engine(ds_ft_manager *m, ds_engine *e, float budget) {
    m->engine = e;
    ds_engine_set_background(e, ft_background, m, budget);
}

static int mkdir_p1(const char *dir, ds_err *err) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return ds_err_set(err, DS_EIO, "cannot create %s: %s", dir, strerror(errno));
    return 0;
}

/* ---- a job ------------------------------------------------------------------------------- */

/* What a running job has done so far (training thread only). */
typedef struct job_run {
    int64_t step, tokens, total;
    double t_train, last_loss;
    int64_t epoch0, batch0; /* where training starts: batch0 of epoch0 (a resume), else 0, 0 */
    bool suspended;         /* stopped for a shutdown with its state saved: resume at the next start */
} job_run;

#define SAVE_EVERY_S 300.0 /* a running job's state is saved at least this often (and each epoch, and on a stop) */

/* Saves what a resume needs: the state with batch b of epoch ep next, then the record. */
static int job_save_state(ds_ft_manager *m, ft_job *j, ds_trainer *t, const job_run *r, int64_t ep, int64_t b,
                          ds_err *err) {
    if (!m->data_dir) return 0;
    const ft_progress p = {.step = r->step, .tokens = r->tokens, .epoch = ep, .batch = b, .t_train = r->t_train,
                           .last_loss = r->last_loss};
    int st = ft_state_save(m->data_dir, j->info.id, t, &p, err);
    if (!st) st = ft_persist(m, j, err);
    if (st) { /* the job fails on it: say what could not be written */
        char tmp[sizeof err->msg];
        memcpy(tmp, err->msg, sizeof tmp);
        snprintf(err->msg, sizeof err->msg, "cannot save the job's checkpoint: %.440s", tmp);
    }
    return st;
}

/* The trainer for a job in *out: a new adapter, or a copy of a loaded one to continue. Returns 0,
 * DS_ENOTFOUND (the adapter to continue was unloaded) or DS_EINVAL, with a message. */
static int job_trainer(ds_ft_manager *m, ft_job *j, const ds_train_params *tp, ds_trainer **out, ds_err *err) {
    const ds_ft_job_info *I = &j->info;
    if (j->from_adapter) {
        ds_adapter_entry *e = ds_registry_acquire(m->reg, I->model);
        if (!e) return ds_err_set(err, DS_ENOTFOUND, "the adapter '%s' is no longer loaded", I->model);
        *out = ds_trainer_create_from(m->base, e->adapter, false, 0, tp, err);
        ds_registry_release(m->reg, e);
        return *out ? 0 : DS_EINVAL;
    }
    ds_train_adapter_spec sp = ds_train_default_spec(j->kind);
    sp.name = I->fine_tuned_model;
    sp.seed = I->seed;
    if (j->kind == DS_ADAPTER_LORA) {
        sp.r = I->rank;
        sp.lora_alpha = I->alpha;
        sp.targets = I->targets;
        sp.use_rslora = I->use_rslora;
    } else {
        sp.n_virtual = I->n_virtual;
    }
    if (j->kind == DS_ADAPTER_DELTA && I->density > 0) { /* diff pruning (train_dp.c) */
        sp.targets = I->targets;
        sp.density = I->density;
        sp.bias = I->bias;
        sp.dp_warmup_steps = I->dp_warmup_steps > 0 ? I->dp_warmup_steps : tp->total_steps / 4 > 1 ? tp->total_steps / 4 : 1;
    }
    sp.bn = I->bn; /* bottleneck */
    *out = ds_trainer_create(m->base, &sp, tp, err);
    return *out ? 0 : DS_EINVAL;
}

/* One optimizer step on `batch`, then its metrics event and progress. */
static int job_step(ds_ft_manager *m, ft_job *j, ds_trainer *t, const ds_train_example *batch, int32_t nb,
                    int64_t btok, job_run *r, ds_err *err) {
    ds_ft_job_info *I = &j->info;
    ds_train_stats s;
    double t0 = ds_time_s();
    int st = trainer_call(m, j, t, batch, nb, false, &s, err);
    r->t_train += ds_time_s() - t0;
    if (st) return st;
    r->step++, r->tokens += btok;
    r->last_loss = s.loss;
    ds_ft_event e = {.metrics = true, .step = r->step, .train_loss = s.loss, .valid_loss = NAN, .lr = s.lr};
    snprintf(e.level, sizeof e.level, "info");
    snprintf(e.message, sizeof e.message, "Step %lld/%lld: training loss=%.4f", (long long)r->step,
             (long long)r->total, s.loss);
    const double tps = r->t_train > 0 ? (double)r->tokens / r->t_train : 0;
    pthread_mutex_lock(&m->mu);
    ft_add_event_locked(j, &e);
    I->step = r->step;
    I->trained_tokens = r->tokens;
    I->tokens_per_s = tps;
    pthread_mutex_unlock(&m->mu);
    DS_LOGD("fine-tune %s: %s (%.0f tok/s)", I->id, e.message, tps);
    return 0;
}

/* End of an epoch: the validation loss (when there is a validation set) and a checkpoint. */
static int job_epoch_end(ds_ft_manager *m, ft_job *j, ds_trainer *t, const ds_ft_examples *va, int32_t ep,
                         int32_t n_epochs, const job_run *r, ds_err *err) {
    const ds_ft_job_info *I = &j->info;
    ds_ft_checkpoint ck = {.step = r->step, .created_at = (int64_t)time(NULL), .train_loss = r->last_loss,
                           .valid_loss = NAN};
    if (va->n) {
        ds_train_stats vs;
        if (trainer_call(m, j, t, va->ex, (int32_t)va->n, true, &vs, err) == 0) ck.valid_loss = vs.loss;
    }
    snprintf(ck.path, sizeof ck.path, "%s/checkpoint-%lld", I->fine_tuned_model, (long long)r->step);
    char cdir[1400];
    snprintf(cdir, sizeof cdir, "%s/%s", ds_registry_root(m->reg), ck.path);
    int st = ds_trainer_save(t, cdir, m->base->cfg.name, err);
    if (st) return st;
    char drop[sizeof ck.path] = "";
    pthread_mutex_lock(&m->mu);
    if (!DS_GROW(j->ck, j->cap_ck, j->n_ck + 1)) j->ck[j->n_ck++] = ck;
    if (m->limits.keep_checkpoints > 0 && j->n_ck > (size_t)m->limits.keep_checkpoints) { /* keep the newest k */
        snprintf(drop, sizeof drop, "%s", j->ck[0].path);
        memmove(j->ck, j->ck + 1, (j->n_ck - 1) * sizeof *j->ck);
        j->n_ck--;
    }
    pthread_mutex_unlock(&m->mu);
    if (drop[0]) ds_durable_remove_dir(ds_registry_root(m->reg), drop);
    if (va->n)
        ft_job_log(m, j, "info", "Epoch %d/%d done: training loss=%.4f, validation loss=%.4f", (int)ep + 1,
                (int)n_epochs, r->last_loss, ck.valid_loss);
    else ft_job_log(m, j, "info", "Epoch %d/%d done: training loss=%.4f", (int)ep + 1, (int)n_epochs, r->last_loss);
    return 0;
}

/* One epoch's batches from `b0`: a stop (shutdown) saves the state and suspends the job, a cancel
 * ends it, and the state is saved every SAVE_EVERY_S. */
static int epoch_batches(ds_ft_manager *m, ft_job *j, ds_trainer *t, const ds_ft_examples *tr, const int32_t *order,
                         ds_train_example *batch, int32_t bs, int64_t ep, int64_t b0, job_run *r, double *saved,
                         ds_err *err) {
    const int32_t n_ex = (int32_t)tr->n;
    const int64_t per_epoch = (n_ex + bs - 1) / bs;
    for (int64_t b = b0; b < per_epoch; b++) {
        if (__atomic_load_n(&j->cancel, __ATOMIC_ACQUIRE)) return DS_ECANCELED;
        if (ft_stopping(m)) {
            int st = job_save_state(m, j, t, r, ep, b, err);
            if (!st) r->suspended = true;
            return st ? st : DS_ECANCELED;
        }
        if (m->data_dir && ds_time_s() - *saved > SAVE_EVERY_S) {
            int st = job_save_state(m, j, t, r, ep, b, err);
            if (st) return st;
            *saved = ds_time_s();
        }
        int32_t nb = 0;
        int64_t btok = 0;
        for (int64_t i = b * bs; i < n_ex && nb < bs; i++) {
            batch[nb] = tr->ex[order[i]];
            btok += batch[nb++].n_tokens;
        }
        int st = job_step(m, j, t, batch, nb, btok, r, err);
        if (st == DS_ECANCELED) { /* interrupted by a stop or cancel: handled above, batch b not done */
            b--;
            continue;
        }
        if (st) return st;
    }
    return 0;
}

/* The epochs: each shuffles the examples (Fisher-Yates, seeded by the job: a resume replays the
 * shuffles of the epochs before r->epoch0), trains on batches of `bs`, ends with job_epoch_end and
 * saves the state. Returns 0, DS_ECANCELED or an error. */
static int job_epochs(ds_ft_manager *m, ft_job *j, ds_trainer *t, const ds_ft_examples *tr, const ds_ft_examples *va,
                      int32_t bs, int32_t n_epochs, job_run *r, ds_err *err) {
    const int32_t n_ex = (int32_t)tr->n;
    int32_t *order = malloc((size_t)n_ex * sizeof *order);
    ds_train_example *batch = malloc((size_t)bs * sizeof *batch);
    int st = order && batch ? 0 : ds_err_set(err, DS_ENOMEM, "out of memory");
    for (int32_t i = 0; !st && i < n_ex; i++) order[i] = i;
    uint64_t rng = j->info.seed ^ 0x5eedull;
    double saved = ds_time_s();
    for (int32_t ep = 0; ep < n_epochs && !st; ep++) {
        for (int32_t i = n_ex - 1; i > 0; i--) {
            int32_t k = (int32_t)(ds_splitmix64(&rng) % (uint64_t)(i + 1)), x = order[i];
            order[i] = order[k], order[k] = x;
        }
        if (ep < r->epoch0) continue;
        st = epoch_batches(m, j, t, tr, order, batch, bs, ep, ep == r->epoch0 ? r->batch0 : 0, r, &saved, err);
        if (!st) st = job_epoch_end(m, j, t, va, ep, n_epochs, r, err);
        if (!st) st = job_save_state(m, j, t, r, ep + 1, 0, err), saved = ds_time_s();
    }
    free(order), free(batch);
    return st;
}

/* Both datasets tokenised; the validation set stays empty without a validation file. */
static int job_datasets(ds_ft_manager *m, ft_job *j, ds_ft_examples *tr, ds_ft_examples *va, ds_err *err) {
    int st = ds_ft_examples_build(m->base, j->train, j->train_len, tr, err);
    if (st || !j->valid) return st;
    if ((st = ds_ft_examples_build(m->base, j->valid, j->valid_len, va, err))) {
        char tmp[sizeof err->msg];
        memcpy(tmp, err->msg, sizeof tmp);
        snprintf(err->msg, sizeof err->msg, "validation file: %.480s", tmp);
    }
    return st;
}

/* A saved state into t and r, when the job was running at the last stop. 0 (resumed or nothing to
 * resume) or DS_EFORMAT / DS_EIO: the job cannot resume and fails, saying why. */
static int job_resume(ds_ft_manager *m, ft_job *j, ds_trainer *t, int32_t n_epochs, int64_t per_epoch, job_run *r,
                      ds_err *err) {
    if (!m->data_dir || !j->restarted) return 0;
    ft_progress p;
    int st = ft_state_load(m->data_dir, j->info.id, t, &p, err);
    if (st == DS_ENOTFOUND) {
        ft_job_log(m, j, "info", "No checkpoint was saved before the restart: training starts from the beginning");
        return 0;
    }
    if (!st && (p.epoch > n_epochs || p.batch >= per_epoch || p.step > r->total))
        st = ds_err_set(err, DS_EFORMAT, "the saved position (epoch %lld, batch %lld) does not fit the job",
                        (long long)p.epoch, (long long)p.batch);
    if (st) {
        char tmp[sizeof err->msg];
        memcpy(tmp, err->msg, sizeof tmp);
        snprintf(err->msg, sizeof err->msg, "cannot resume from the job's checkpoint: %.440s", tmp);
        return st == DS_ENOTFOUND ? DS_EFORMAT : st;
    }
    r->step = p.step, r->tokens = p.tokens, r->t_train = p.t_train, r->last_loss = p.last_loss;
    r->epoch0 = p.epoch, r->batch0 = p.batch;
    pthread_mutex_lock(&m->mu);
    j->info.step = r->step;
    j->info.trained_tokens = r->tokens;
    pthread_mutex_unlock(&m->mu);
    ft_job_log(m, j, "info", "Resumed from the checkpoint at step %lld/%lld (epoch %lld, batch %lld)",
            (long long)p.step, (long long)r->total, (long long)p.epoch + 1, (long long)p.batch + 1);
    return 0;
}

/* The whole job on the training thread. Returns 0, DS_ECANCELED or an error (message in err);
 * *suspended when a stop saved its state for the next start. */
int ft_run_job(ds_ft_manager *m, ft_job *j, bool *suspended, ds_err *err) {
    ds_ft_job_info *I = &j->info; /* fields only this thread writes after queueing (under mu when read) */
    ds_ft_examples tr = {0}, va = {0};
    ds_trainer *t = NULL;
    job_run r = {.last_loss = NAN};
    int st = job_datasets(m, j, &tr, &va, err);
    if (st) goto done;
    int32_t n_ex = (int32_t)tr.n;
    int32_t bs = I->batch_size > 0 ? I->batch_size : (n_ex < 4 ? n_ex : 4);
    if (bs > n_ex) bs = n_ex;
    int32_t n_epochs = I->n_epochs > 0 ? I->n_epochs : 3;
    int64_t per_epoch = (n_ex + bs - 1) / bs;
    r.total = per_epoch * n_epochs;

    ds_train_params tp = ds_train_default_params();
    tp.lr = I->learning_rate;
    tp.schedule = DS_LR_LINEAR;
    tp.warmup_steps = 0;
    tp.total_steps = (int32_t)r.total;
    int32_t mb = tr.max_len > va.max_len ? tr.max_len : va.max_len;
    if (j->kind == DS_ADAPTER_PROMPT) mb += I->n_virtual;
    /* Not smaller micro-batches to make units shorter: the time of a layer over a micro-batch is
     * mostly streaming the layer's weights (measured on SmolLM2 Q4_1, 4 examples of 52 tokens: a
     * step takes 3x longer in micro-batches of 64 rows than in one of 512), so a smaller one
     * would cost throughput and barely shorten the unit. */
    tp.micro_batch_tokens = mb > 512 ? mb : 512;
    if ((st = job_trainer(m, j, &tp, &t, err))) goto done;
    pthread_mutex_lock(&m->mu);
    I->total_steps = r.total;
    I->batch_size = bs;
    I->n_epochs = n_epochs;
    pthread_mutex_unlock(&m->mu);
    ft_job_log(m, j, "info", "Training started: %d examples (%lld tokens), %d epochs of %lld steps, batch size %d",
            (int)n_ex, (long long)tr.n_tokens, (int)n_epochs, (long long)per_epoch, (int)bs);
    if ((st = job_resume(m, j, t, n_epochs, per_epoch, &r, err))) goto done;

    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", ds_registry_root(m->reg), I->fine_tuned_model);
    if ((st = mkdir_p1(dir, err)) || (st = job_epochs(m, j, t, &tr, &va, bs, n_epochs, &r, err))) goto done;
    if (__atomic_load_n(&j->cancel, __ATOMIC_ACQUIRE)) { /* a stop now lets the job finish: publishing is quick */
        st = DS_ECANCELED;
        goto done;
    }
    if ((st = ds_trainer_save(t, dir, m->base->cfg.name, err))) goto done;
    if ((st = ds_registry_load(m->reg, I->fine_tuned_model, I->fine_tuned_model, true, err))) goto done;
    ft_job_log(m, j, "info", "Published adapter '%s' (%lld tokens trained, %.0f tokens/s)", I->fine_tuned_model,
            (long long)r.tokens, r.t_train > 0 ? r.tokens / r.t_train : 0.0);
done:
    *suspended = r.suspended;
    ds_trainer_free(t);
    ds_ft_examples_free(&tr), ds_ft_examples_free(&va);
    return st;
}
