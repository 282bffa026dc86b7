/* Fine-tuning jobs: JSONL datasets → (tokens, labels) examples, a FIFO of jobs run one at a time by
 * a training thread, PEFT checkpoints under the adapter directory, and publication in the registry
 * (include/ds/train.h, "Fine-tuning jobs"; docs/ARCHITECTURE.md, "Training beside serving").
 *
 * The training thread takes the queued jobs in order and runs each (job_run.c: datasets, epochs,
 * checkpoints, events; its trainer steps run on the engine thread when one is attached).
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

static void job_free(ft_job *j) {
    if (!j) return;
    free(j->ev), free(j->ck), free(j->train), free(j->valid), free(j);
}

/* Under m->mu. */
void ft_add_event_locked(ft_job *j, const ds_ft_event *e) {
    if (DS_GROW(j->ev, j->cap_ev, j->n_ev + 1)) return;
    j->ev[j->n_ev] = *e;
    j->ev[j->n_ev].seq = (int64_t)j->n_ev + 1;
    j->ev[j->n_ev].created_at = (int64_t)time(NULL);
    j->n_ev++;
}

void ft_job_log(ds_ft_manager *m, ft_job *j, const char *level, const char *fmt, ...) {
    ds_ft_event e = {.valid_loss = NAN};
    snprintf(e.level, sizeof e.level, "%s", level);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    DS_LOGI("fine-tune %s: %s", j->info.id, e.message);
    pthread_mutex_lock(&m->mu);
    ft_add_event_locked(j, &e);
    pthread_mutex_unlock(&m->mu);
}

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
int ft_persist(ds_ft_manager *m, ft_job *j, ds_err *err) {
    if (!m->data_dir) return 0;
    record_text rt;
    pthread_mutex_lock(&m->io_mu);
    pthread_mutex_lock(&m->mu);
    encode_locked(m, j, &rt);
    pthread_mutex_unlock(&m->mu);
    return write_unlock(m, &rt, err);
}

/* ft_persist() where a failure can only be logged (the job's outcome is already decided). */
static void persist_or_log(ds_ft_manager *m, ft_job *j) {
    ds_err err = {{0}};
    if (ft_persist(m, j, &err)) DS_LOGW("fine-tune %s: cannot write the job record: %s", j->info.id, err.msg);
}

/* Messages reach clients: they name paths relative to the adapter and data directories. */
static void scrub(ds_ft_manager *m, char *msg) {
    if (m->reg && ds_registry_root(m->reg)) ds_scrub_path(msg, ds_registry_root(m->reg));
    if (m->data_dir) ds_scrub_path(msg, m->data_dir);
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
        ft_job_log(m, j, "info", j->restarted ? "Fine-tuning job started again after a server restart"
                                           : "Fine-tuning job started");
        persist_or_log(m, j);
        ds_err err = {{0}};
        bool suspended = false;
        int st = ft_run_job(m, j, &suspended, &err);
        scrub(m, err.msg);
        if (suspended) {
            ft_job_log(m, j, "info", "Checkpointed at step %lld for a server shutdown: the job resumes when the server "
                    "starts again", (long long)j->info.step);
            persist_or_log(m, j);
            pthread_mutex_lock(&m->mu);
            continue; /* stays 'running' on disk; m->stop ends the loop */
        }
        if (st && st != DS_ECANCELED) ft_job_log(m, j, "error", "Fine-tuning job failed: %s", err.msg);
        else if (!st) ft_job_log(m, j, "info", "The job has successfully completed");
        else ft_job_log(m, j, "info", "Fine-tuning job cancelled");
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
                ft_job_log(m, j, "info", "The server restarted: the job resumes from its last checkpoint");
        } else if (was == DS_FT_FAILED && !j->info.finished_at) { /* its data was lost (job_store.c) */
            j->info.finished_at = (int64_t)time(NULL);
            ft_job_log(m, j, "error", "Fine-tuning job failed: %s", j->info.error);
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
    ft_add_event_locked(j, &e); /* filled in once the id is known */
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
