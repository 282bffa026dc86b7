/* Fine-tuning jobs: JSONL datasets → (tokens, labels) examples, a FIFO of jobs run one at a time by
 * a training thread, PEFT checkpoints under the adapter directory, and publication in the registry
 * (include/ds/train.h, "Fine-tuning jobs"; docs/ARCHITECTURE.md, "Training beside serving").
 *
 * The training thread drives a job (datasets, epochs, checkpoints, events); each trainer step and
 * evaluation is handed to the engine thread when an engine is attached, which advances it one
 * bounded unit at a time between inference steps (ds_engine_set_background, ds_trainer_advance:
 * training takes at most --train-budget of the engine's time while requests run), and computed on
 * the training thread itself when none is (tests, tools).
 *
 * Locking: m->mu guards the job list and every job's info / events / checkpoints; the training
 * thread holds it only to publish progress, never while computing. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds/model.h"
#include "ds/tokenizer.h"
#include "ds/train.h"
#include "train/dataset.h"
#include "train/jobs_internal.h"
#include "util/durable.h"
#include "util/mem.h"
#include "util/rng.h"

#define MAX_JOBS 256

const char *ds_ft_status_name(ds_ft_status s) {
    static const char *names[] = {"queued", "running", "succeeded", "failed", "cancelled"};
    return (unsigned)s < 5 ? names[s] : "unknown";
}

/* ---- jobs ---------------------------------------------------------------------------------- */

struct ds_ft_manager {
    const ds_model *base;
    ds_adapter_registry *reg;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    ft_job *head, *tail; /* creation order */
    size_t n_jobs;
    uint64_t counter;
    char *data_dir;      /* jobs persist under data_dir/jobs/ (job_store.c); NULL: memory only */
    pthread_mutex_t io_mu; /* serialises record writes (taken before mu, never inside it) */
    /* co-serving: trainer calls handed to the engine thread (under mu) */
    ds_engine *engine;
    pthread_cond_t ho_cv;
    struct {
        ds_trainer *t;
        const ds_train_example *ex;
        int32_t n;
        bool eval, pending, started, done;
        const int *cancel; /* the job's cancel flag (atomic) */
        ds_train_stats *stats;
        ds_err *err;
        int status;
    } ho;
    ds_ft_limits limits; /* under mu */
};

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

static void job_free(ft_job *j) {
    if (!j) return;
    free(j->ev), free(j->ck), free(j->train), free(j->valid), free(j);
}

/* Under m->mu. */
static void add_event_locked(ft_job *j, const ds_ft_event *e) {
    if (DS_GROW(j->ev, j->cap_ev, j->n_ev + 1)) return;
    j->ev[j->n_ev] = *e;
    j->ev[j->n_ev].seq = (int64_t)j->n_ev + 1;
    j->ev[j->n_ev].created_at = (int64_t)time(NULL);
    j->n_ev++;
}

static void job_log(ds_ft_manager *m, ft_job *j, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void job_log(ds_ft_manager *m, ft_job *j, const char *level, const char *fmt, ...) {
    ds_ft_event e = {.valid_loss = NAN};
    snprintf(e.level, sizeof e.level, "%s", level);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    DS_LOGI("fine-tune %s: %s", j->info.id, e.message);
    pthread_mutex_lock(&m->mu);
    add_event_locked(j, &e);
    pthread_mutex_unlock(&m->mu);
}

static bool stopping(ds_ft_manager *m) { return __atomic_load_n(&m->stop, __ATOMIC_ACQUIRE); }

/* Record writes: io_mu is taken first (writes of one job land in the order their snapshots were
 * taken), the record is encoded under mu (a consistent snapshot) and written outside it, so the
 * engine thread never waits for a disk. A finished job may be evicted by a submit as soon as mu
 * is released: its final write uses only the encoded text and the id copied with it. */
typedef struct record_text {
    char id[48];
    char *text;
    size_t len;
} record_text;

static void encode_locked(ds_ft_manager *m, const ft_job *j, record_text *rt) {
    rt->text = m->data_dir ? ft_record_encode(j, &rt->len) : NULL;
    snprintf(rt->id, sizeof rt->id, "%s", j->info.id);
}

/* Writes rt and releases io_mu. */
static int write_unlock(ds_ft_manager *m, record_text *rt, ds_err *err) {
    int st = !m->data_dir ? 0
             : rt->text   ? ft_store_write_record(m->data_dir, rt->id, rt->text, rt->len, err)
                          : ds_err_set(err, DS_ENOMEM, "out of memory");
    pthread_mutex_unlock(&m->io_mu);
    free(rt->text);
    rt->text = NULL;
    return st;
}

/* The record of a queued or running job (never evicted). 0, or DS_EIO / DS_ENOMEM with a message. */
static int persist(ds_ft_manager *m, ft_job *j, ds_err *err) {
    if (!m->data_dir) return 0;
    record_text rt;
    pthread_mutex_lock(&m->io_mu);
    pthread_mutex_lock(&m->mu);
    encode_locked(m, j, &rt);
    pthread_mutex_unlock(&m->mu);
    return write_unlock(m, &rt, err);
}

/* persist() where a failure can only be logged (the job's outcome is already decided). */
static void persist_or_log(ds_ft_manager *m, ft_job *j) {
    ds_err err = {{0}};
    if (persist(m, j, &err)) DS_LOGW("fine-tune %s: cannot write the job record: %s", j->info.id, err.msg);
}

/* Messages reach clients: they name paths relative to the adapter and data directories. */
static void scrub(ds_ft_manager *m, char *msg) {
    if (m->reg && ds_registry_root(m->reg)) ds_scrub_path(msg, ds_registry_root(m->reg));
    if (m->data_dir) ds_scrub_path(msg, m->data_dir);
}

static int mkdir_p1(const char *dir, ds_err *err) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return ds_err_set(err, DS_EIO, "cannot create %s: %s", dir, strerror(errno));
    return 0;
}

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
    if (!st) st = persist(m, j, err);
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
    add_event_locked(j, &e);
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
        job_log(m, j, "info", "Epoch %d/%d done: training loss=%.4f, validation loss=%.4f", (int)ep + 1,
                (int)n_epochs, r->last_loss, ck.valid_loss);
    else job_log(m, j, "info", "Epoch %d/%d done: training loss=%.4f", (int)ep + 1, (int)n_epochs, r->last_loss);
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
        if (stopping(m)) {
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
        job_log(m, j, "info", "No checkpoint was saved before the restart: training starts from the beginning");
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
    job_log(m, j, "info", "Resumed from the checkpoint at step %lld/%lld (epoch %lld, batch %lld)",
            (long long)p.step, (long long)r->total, (long long)p.epoch + 1, (long long)p.batch + 1);
    return 0;
}

/* The whole job on the training thread. Returns 0, DS_ECANCELED or an error (message in err);
 * *suspended when a stop saved its state for the next start. */
static int run_job(ds_ft_manager *m, ft_job *j, bool *suspended, ds_err *err) {
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
    job_log(m, j, "info", "Training started: %d examples (%lld tokens), %d epochs of %lld steps, batch size %d",
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
    job_log(m, j, "info", "Published adapter '%s' (%lld tokens trained, %.0f tokens/s)", I->fine_tuned_model,
            (long long)r.tokens, r.t_train > 0 ? r.tokens / r.t_train : 0.0);
done:
    *suspended = r.suspended;
    ds_trainer_free(t);
    ds_ft_examples_free(&tr), ds_ft_examples_free(&va);
    return st;
}

/* Training yields the CPU to serving: this thread (and the OpenMP/BLAS workers it creates, which
 * inherit the nice value on Linux) runs at the lowest priority, so what runs here — tokenising
 * datasets, saving checkpoints, and the steps themselves when no engine is attached — uses the
 * cycles the engine leaves idle. */
static void lower_priority(void) {
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) != 0)
        DS_LOGW("fine-tuning: cannot lower the training thread's priority; serving may slow down while jobs run");
}

static void *train_thread(void *arg) {
    ds_ft_manager *m = arg;
    lower_priority();
    pthread_mutex_lock(&m->mu);
    for (;;) {
        ft_job *j = NULL;
        for (ft_job *x = m->head; x; x = x->next)
            if (x->info.status == DS_FT_QUEUED) {
                j = x;
                break;
            }
        if (m->stop) break;
        if (!j) {
            pthread_cond_wait(&m->cv, &m->mu);
            continue;
        }
        j->info.status = DS_FT_RUNNING;
        pthread_mutex_unlock(&m->mu);
        job_log(m, j, "info", j->restarted ? "Fine-tuning job started again after a server restart"
                                           : "Fine-tuning job started");
        persist_or_log(m, j);
        ds_err err = {{0}};
        bool suspended = false;
        int st = run_job(m, j, &suspended, &err);
        scrub(m, err.msg);
        if (suspended) {
            job_log(m, j, "info", "Checkpointed at step %lld for a server shutdown: the job resumes when the server "
                    "starts again", (long long)j->info.step);
            persist_or_log(m, j);
            pthread_mutex_lock(&m->mu);
            continue; /* stays 'running' on disk; m->stop ends the loop */
        }
        if (st && st != DS_ECANCELED) job_log(m, j, "error", "Fine-tuning job failed: %s", err.msg);
        else if (!st) job_log(m, j, "info", "The job has successfully completed");
        else job_log(m, j, "info", "Fine-tuning job cancelled");
        record_text rt;
        pthread_mutex_lock(&m->io_mu);
        pthread_mutex_lock(&m->mu);
        /* a cancel may already have marked the job (cancelled wins unless the job had finished) */
        if (j->info.status == DS_FT_RUNNING) {
            if (!st) j->info.status = DS_FT_SUCCEEDED;
            else if (st == DS_ECANCELED) j->info.status = DS_FT_CANCELLED;
            else {
                j->info.status = DS_FT_FAILED;
                snprintf(j->info.error, sizeof j->info.error, "%s", err.msg);
                snprintf(j->info.error_code, sizeof j->info.error_code, "%s",
                         st == DS_EINVAL || st == DS_ERANGE ? "invalid_training_file"
                         : st == DS_EIO                     ? "storage_error"
                                                            : "training_error");
            }
            j->info.finished_at = (int64_t)time(NULL);
        }
        free(j->train), free(j->valid); /* the data is not needed any more */
        j->train = j->valid = NULL;
        encode_locked(m, j, &rt);
        pthread_mutex_unlock(&m->mu);
        if (m->data_dir) ft_store_drop_state(m->data_dir, rt.id); /* under io_mu: no eviction meanwhile */
        ds_err werr = {{0}};
        if (write_unlock(m, &rt, &werr)) DS_LOGW("fine-tune %s: cannot write the job record: %s", rt.id, werr.msg);
        pthread_mutex_lock(&m->mu);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

/* The jobs stored under data_dir: finished ones are listed again, queued ones queue again, and
 * one that was running resumes from its state (run_job). */
static void load_jobs(ds_ft_manager *m) {
    ds_err err = {{0}};
    if (ds_durable_mkdir(m->data_dir, "jobs", &err)) {
        DS_LOGW("fine-tune: %s; new jobs will fail until it can be created", err.msg);
        return;
    }
    ft_job *head = NULL;
    size_t n = ft_store_load(m->data_dir, m->reg ? ds_registry_root(m->reg) : NULL, &head), n_resume = 0;
    for (ft_job *j = head, *next; j; j = next) {
        next = j->next;
        j->next = NULL;
        if (m->n_jobs >= MAX_JOBS) { /* more than we keep: the oldest go */
            ft_store_remove(m->data_dir, m->head->info.id);
            ft_job *old = m->head;
            m->head = old->next;
            job_free(old);
            m->n_jobs--;
        }
        if (m->tail) m->tail->next = j;
        else m->head = j;
        m->tail = j;
        m->n_jobs++;
        const ds_ft_status was = j->info.status;
        if (was == DS_FT_QUEUED || was == DS_FT_RUNNING) {
            j->restarted = was == DS_FT_RUNNING;
            j->info.status = DS_FT_QUEUED;
            n_resume++;
            if (was == DS_FT_RUNNING)
                job_log(m, j, "info", "The server restarted: the job resumes from its last checkpoint");
        } else if (was == DS_FT_FAILED && !j->info.finished_at) { /* its data was lost (job_store.c) */
            j->info.finished_at = (int64_t)time(NULL);
            job_log(m, j, "error", "Fine-tuning job failed: %s", j->info.error);
            persist_or_log(m, j);
        }
    }
    if (n) DS_LOGI("fine-tune: %zu stored job(s) loaded, %zu to run", n, n_resume);
}

ds_ft_manager *ds_ft_manager_create(const ds_model *base, ds_adapter_registry *reg, const char *data_dir,
                                    ds_err *err) {
    ds_ft_manager *m = calloc(1, sizeof *m);
    if (!m) return ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    m->base = base, m->reg = reg;
    m->limits = ds_ft_default_limits();
    m->counter = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)m << 16);
    if (data_dir && data_dir[0] && !(m->data_dir = ds_strdup(data_dir)))
        return free(m), ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    pthread_mutex_init(&m->mu, NULL);
    pthread_mutex_init(&m->io_mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    pthread_cond_init(&m->ho_cv, NULL);
    if (m->data_dir) load_jobs(m);
    if (pthread_create(&m->thread, NULL, train_thread, m) != 0) {
        ds_ft_manager_free(m);
        return ds_err_set(err, DS_ENOMEM, "cannot start the training thread"), NULL;
    }
    m->thread_started = true;
    return m;
}

void ds_ft_manager_set_limits(ds_ft_manager *m, const ds_ft_limits *l) {
    pthread_mutex_lock(&m->mu);
    m->limits = *l;
    pthread_mutex_unlock(&m->mu);
}

static int submit_limits(ds_ft_manager *m, const ds_ft_job_spec *sp, ds_err *err) {
    pthread_mutex_lock(&m->mu);
    const ds_ft_limits L = m->limits;
    pthread_mutex_unlock(&m->mu);
    return ft_limits_check(&L, m->base, m->reg, sp, err);
}

void ds_ft_manager_stop(ds_ft_manager *m) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    __atomic_store_n(&m->stop, true, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
}

void ds_ft_manager_free(ds_ft_manager *m) {
    if (!m) return;
    ds_ft_manager_stop(m);
    if (m->thread_started) pthread_join(m->thread, NULL);
    if (m->engine) ds_engine_set_background(m->engine, NULL, NULL, 0); /* waits out a call in progress */
    for (ft_job *j = m->head, *n; j; j = n) n = j->next, job_free(j);
    pthread_mutex_destroy(&m->mu), pthread_mutex_destroy(&m->io_mu);
    pthread_cond_destroy(&m->cv), pthread_cond_destroy(&m->ho_cv);
    free(m->data_dir);
    free(m);
}

static ft_job *find_locked(ds_ft_manager *m, const char *id) {
    for (ft_job *j = m->head; j; j = j->next)
        if (!strcmp(j->info.id, id)) return j;
    return NULL;
}

/* A new job from the spec (not yet listed or stored), or NULL with a message. */
static ft_job *job_new(const ds_ft_job_spec *sp, ds_err *err) {
    ft_job *j = calloc(1, sizeof *j);
    if (!j) return ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    j->train = malloc(sp->train_len + 1);
    j->valid = sp->valid_data ? malloc(sp->valid_len + 1) : NULL;
    if (!j->train || (sp->valid_data && !j->valid))
        return job_free(j), ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    memcpy(j->train, sp->train_data, sp->train_len), j->train[sp->train_len] = '\0', j->train_len = sp->train_len;
    if (j->valid)
        memcpy(j->valid, sp->valid_data, sp->valid_len), j->valid[sp->valid_len] = '\0', j->valid_len = sp->valid_len;
    j->from_adapter = sp->from_adapter;
    j->kind = sp->kind;
    ds_ft_job_info *I = &j->info;
    I->status = DS_FT_QUEUED;
    snprintf(I->model, sizeof I->model, "%s", sp->model ? sp->model : "");
    snprintf(I->fine_tuned_model, sizeof I->fine_tuned_model, "%s", sp->fine_tuned_model);
    snprintf(I->training_file, sizeof I->training_file, "%s", sp->training_file ? sp->training_file : "");
    snprintf(I->validation_file, sizeof I->validation_file, "%s", sp->validation_file ? sp->validation_file : "");
    snprintf(I->method, sizeof I->method, "%s", sp->method ? sp->method : "supervised");
    I->created_at = (int64_t)time(NULL);
    I->n_epochs = sp->n_epochs;
    I->batch_size = sp->batch_size;
    I->rank = sp->rank > 0 ? sp->rank : 8;
    I->alpha = sp->alpha > 0 ? sp->alpha : 2.0f * (float)I->rank;
    I->use_rslora = sp->use_rslora;
    I->targets = sp->targets ? sp->targets : DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_V);
    I->n_virtual = sp->n_virtual > 0 ? sp->n_virtual : 20;
    I->density = sp->kind == DS_ADAPTER_DELTA ? sp->density : 0.0f;
    I->dp_warmup_steps = sp->dp_warmup_steps > 0 ? sp->dp_warmup_steps : 0;
    I->bias = sp->bias;
    I->lr_multiplier = sp->lr_multiplier > 0 ? sp->lr_multiplier : 1.0f;
    /* diff pruning moves weights themselves: AdamW steps of ~lr per entry, so a LoRA-sized rate;
     * bottleneck adapters: 1e-3 (not tuned here; they are commonly trained at 1e-4..1e-3, and the soft
     * prompts' 3e-2 would swamp the bert-initialised weights) */
    float base_lr = j->kind == DS_ADAPTER_LORA || I->density > 0 ? 2e-4f : j->kind == DS_ADAPTER_BOTTLENECK ? 1e-3f : 3e-2f;
    I->learning_rate = sp->learning_rate > 0 ? sp->learning_rate : base_lr * I->lr_multiplier;
    I->seed = sp->seed;
    I->bn = sp->bn.reduction_factor > 0 ? sp->bn : ds_train_bn_default_opts();
    ds_train_bn_resolve(&I->bn);
    ds_ft_event e = {.valid_loss = NAN};
    snprintf(e.level, sizeof e.level, "info");
    add_event_locked(j, &e); /* filled in once the id is known */
    return j;
}

int ds_ft_submit(ds_ft_manager *m, const ds_ft_job_spec *sp, char id_out[48], ds_err *err) {
    if (!m->reg || !ds_registry_root(m->reg))
        return ds_err_set(err, DS_EINVAL, "fine-tuning needs an adapter directory: start the server with --adapter-dir DIR");
    if (!sp->fine_tuned_model || !sp->fine_tuned_model[0] || strlen(sp->fine_tuned_model) >= 128 ||
        strchr(sp->fine_tuned_model, '/') || sp->fine_tuned_model[0] == '.')
        return ds_err_set(err, DS_EINVAL, "invalid fine-tuned model name");
    if (!sp->train_data || !sp->train_len) return ds_err_set(err, DS_EINVAL, "the training file is empty");
    int lst = submit_limits(m, sp, err);
    if (lst) return lst;
    ft_job *j = job_new(sp, err);
    if (!j) return DS_ENOMEM;
    ds_ft_job_info *I = &j->info;
    pthread_mutex_lock(&m->mu);
    uint64_t r = ds_splitmix64(&m->counter);
    snprintf(I->id, sizeof I->id, "ftjob-%016llx%08llx", (unsigned long long)r,
             (unsigned long long)(ds_splitmix64(&m->counter) & 0xffffffffu));
    pthread_mutex_unlock(&m->mu);
    snprintf(j->ev[0].message, sizeof j->ev[0].message, "Created fine-tuning job: %s", I->id);
    if (m->data_dir) { /* stored before it is listed: a job the server could not keep is refused */
        size_t len = 0;
        char *text = ft_record_encode(j, &len);
        int st = ft_store_write_data(m->data_dir, j, err);
        if (!st) st = text ? ft_store_write_record(m->data_dir, I->id, text, len, err)
                           : ds_err_set(err, DS_ENOMEM, "out of memory");
        free(text);
        if (st) {
            ft_store_remove(m->data_dir, I->id);
            job_free(j);
            char tmp[sizeof err->msg];
            memcpy(tmp, err->msg, sizeof tmp);
            snprintf(err->msg, sizeof err->msg, "cannot store the job: %.460s", tmp);
            return st;
        }
    }
    pthread_mutex_lock(&m->mu);
    ft_job *old = NULL;
    if (m->n_jobs >= MAX_JOBS) { /* forget the oldest finished job */
        ft_job **pp = &m->head;
        while (*pp && ((*pp)->info.status == DS_FT_QUEUED || (*pp)->info.status == DS_FT_RUNNING)) pp = &(*pp)->next;
        if (!*pp) {
            pthread_mutex_unlock(&m->mu);
            if (m->data_dir) ft_store_remove(m->data_dir, I->id);
            job_free(j);
            return ds_err_set(err, DS_EBUSY, "too many fine-tuning jobs queued");
        }
        old = *pp;
        *pp = old->next;
        m->tail = NULL;
        for (ft_job *x = m->head; x; x = x->next) m->tail = x;
        m->n_jobs--;
    }
    if (m->tail) m->tail->next = j;
    else m->head = j;
    m->tail = j;
    m->n_jobs++;
    snprintf(id_out, 48, "%s", I->id);
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
    if (old && m->data_dir) {
        pthread_mutex_lock(&m->io_mu);
        ft_store_remove(m->data_dir, old->info.id);
        pthread_mutex_unlock(&m->io_mu);
    }
    job_free(old);
    return 0;
}

int ds_ft_cancel(ds_ft_manager *m, const char *id, ds_err *err) {
    record_text rt = {.text = NULL};
    pthread_mutex_lock(&m->io_mu);
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    int st = 0;
    if (!j) st = ds_err_set(err, DS_ENOTFOUND, "fine-tuning job '%s' not found", id);
    else if (j->info.status != DS_FT_QUEUED && j->info.status != DS_FT_RUNNING)
        st = ds_err_set(err, DS_EINVAL, "the job has already %s", ds_ft_status_name(j->info.status));
    else {
        __atomic_store_n(&j->cancel, 1, __ATOMIC_RELEASE);
        j->info.status = DS_FT_CANCELLED;
        j->info.finished_at = (int64_t)time(NULL);
        encode_locked(m, j, &rt);
    }
    pthread_mutex_unlock(&m->mu);
    ds_err werr = {{0}};
    if (!st && write_unlock(m, &rt, &werr)) DS_LOGW("fine-tune %s: cannot write the job record: %s", id, werr.msg);
    else if (st) pthread_mutex_unlock(&m->io_mu);
    return st;
}

int ds_ft_list(ds_ft_manager *m, ds_ft_job_info **out, size_t *n) {
    pthread_mutex_lock(&m->mu);
    *n = 0;
    *out = malloc((m->n_jobs + 1) * sizeof **out);
    if (!*out) return pthread_mutex_unlock(&m->mu), DS_ENOMEM;
    for (ft_job *j = m->head; j; j = j->next) (*out)[(*n)++] = j->info;
    pthread_mutex_unlock(&m->mu);
    for (size_t i = 0; i < *n / 2; i++) { /* newest first */
        ds_ft_job_info x = (*out)[i];
        (*out)[i] = (*out)[*n - 1 - i], (*out)[*n - 1 - i] = x;
    }
    return 0;
}

int ds_ft_get(ds_ft_manager *m, const char *id, ds_ft_job_info *out) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    if (j) *out = j->info;
    pthread_mutex_unlock(&m->mu);
    return j ? 0 : DS_ENOTFOUND;
}

int ds_ft_events(ds_ft_manager *m, const char *id, ds_ft_event **out, size_t *n) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    int st = j ? 0 : DS_ENOTFOUND;
    if (j) {
        *out = malloc((j->n_ev + 1) * sizeof **out);
        if (!*out) st = DS_ENOMEM;
        else memcpy(*out, j->ev, j->n_ev * sizeof **out), *n = j->n_ev;
    }
    pthread_mutex_unlock(&m->mu);
    return st;
}

int ds_ft_checkpoints(ds_ft_manager *m, const char *id, ds_ft_checkpoint **out, size_t *n) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    int st = j ? 0 : DS_ENOTFOUND;
    if (j) {
        *out = malloc((j->n_ck + 1) * sizeof **out);
        if (!*out) st = DS_ENOMEM;
        else memcpy(*out, j->ck, j->n_ck * sizeof **out), *n = j->n_ck;
    }
    pthread_mutex_unlock(&m->mu);
    return st;
}
