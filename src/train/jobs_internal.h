/* deltaserve — what the fine-tuning job files share (jobs.c keeps the jobs, job_run.c runs one,
 * job_store.c keeps them under the data directory). Private to src/train/. */
#ifndef DS_TRAIN_JOBS_INTERNAL_H
#define DS_TRAIN_JOBS_INTERNAL_H

#include <pthread.h>

#include "ds/engine.h"
#include "ds/train.h"

typedef struct ft_job {
    ds_ft_job_info info;
    ds_ft_event *ev;
    size_t n_ev, cap_ev;
    ds_ft_checkpoint *ck;
    size_t n_ck, cap_ck;
    char *train, *valid;
    size_t train_len, valid_len;
    bool from_adapter;
    ds_adapter_kind kind;
    int cancel; /* atomic */
    bool restarted; /* was queued or running when the server stopped: resume from state.bin */
    struct ft_job *next;
} ft_job;

/* Where a running job is: what a resume needs besides the trainer's own state. */
typedef struct ft_progress {
    int64_t step, tokens;  /* optimizer steps done, tokens trained */
    int64_t epoch, batch;  /* the next batch to train: batch `batch` of epoch `epoch` (0-based) */
    double t_train, last_loss;
} ft_progress;

/* ---- job_store.c: the on-disk layout under <data_dir>/jobs/<id>/ ----
 *   job.json     the record: ds_ft_job_info, method, events, checkpoints (ft_record_*)
 *   train.jsonl  the training data (and valid.jsonl), kept until the job ends
 *   state.bin    the last resumable state: progress, adapter parameters, AdamW moments, step
 * Every file is written crash-safely (util/durable.h). Messages name files relative to data_dir. */

/* The record as JSON text (malloc'd, caller frees; NULL when out of memory). */
char *ft_record_encode(const ft_job *j, size_t *len);
/* Parses a record into a zeroed *j (info, kind, from_adapter, events, checkpoints; caller frees
 * j->ev and j->ck). Every field is checked as a request is; DS_EFORMAT with a message otherwise.
 * Pure; fuzzed (tests/fuzz/fuzz_records.c). */
int ft_record_parse(const char *buf, size_t len, ft_job *j, ds_err *err);

/* Writes a record encoded by ft_record_encode. */
int ft_store_write_record(const char *data_dir, const char *id, const char *text, size_t len, ds_err *err);
/* Creates the job's directory and writes its data files. */
int ft_store_write_data(const char *data_dir, const ft_job *j, ds_err *err);
/* Loads every job under data_dir/jobs/ in creation order (a list through ->next, into *head);
 * unreadable records are skipped with a log line. Unfinished jobs get their data back (or fail,
 * saying it was lost), and temporaries an interrupted save left under adapter_root/<their
 * adapter>/ (and its checkpoint-* directories) are removed (adapter_root may be NULL). Returns
 * the number loaded. */
size_t ft_store_load(const char *data_dir, const char *adapter_root, ft_job **head);
void ft_store_remove(const char *data_dir, const char *id);
void ft_store_drop_state(const char *data_dir, const char *id); /* state and data of a finished job */

/* state.bin: the trainer's parameters, AdamW moments and step, with the progress. */
int ft_state_save(const char *data_dir, const char *id, const ds_trainer *t, const ft_progress *p, ds_err *err);
/* Restores a saved state into t (made with the job's spec) and *p. DS_ENOTFOUND when there is
 * none; DS_EFORMAT when it is corrupt or does not fit the trainer. */
int ft_state_load(const char *data_dir, const char *id, ds_trainer *t, ft_progress *p, ds_err *err);

/* A parsed state.bin (views into the buffer; floats may be unaligned). */
typedef struct ft_state_tensor {
    const char *name; /* not NUL-terminated */
    uint32_t name_len;
    uint64_t n;
    const unsigned char *value, *m, *v; /* [n] floats each */
} ft_state_tensor;
typedef struct ft_state_view {
    ft_progress p;
    int64_t trainer_step;
    uint32_t n_tensors;
    ft_state_tensor *t; /* [n_tensors], malloc'd: caller frees */
} ft_state_view;
/* Pure; fuzzed. DS_EFORMAT (bad magic, truncated, checksum) or DS_ENOMEM. */
int ft_state_parse(const unsigned char *buf, size_t len, ft_state_view *out, ds_err *err);

/* ---- ft_limits.c ---- */
/* Checks a job against L before it is queued: 0, or DS_EINVAL saying which limit and its flag.
 * A job that continues an adapter (sp->from_adapter) is sized as that adapter in reg. */
int ft_limits_check(const ds_ft_limits *L, const ds_model *m, ds_adapter_registry *reg, const ds_ft_job_spec *sp,
                    ds_err *err);

/* ---- jobs.c / job_run.c: the manager ----
 * jobs.c keeps the job list, the training thread and the API of include/ds/train.h; job_run.c
 * runs one job (datasets, trainer, epochs, checkpoints, resume) and hands its trainer calls to the
 * engine thread when one is attached (co-serving). */
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

static inline bool ft_stopping(ds_ft_manager *m) { return __atomic_load_n(&m->stop, __ATOMIC_ACQUIRE); }
/* Under m->mu: appends an event (numbered and dated here). */
void ft_add_event_locked(ft_job *j, const ds_ft_event *e);
/* An event at `level` ("info", "error"), also logged; takes m->mu. */
void ft_job_log(ds_ft_manager *m, ft_job *j, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Writes the record of a queued or running job. 0, or DS_EIO / DS_ENOMEM with a message. */
int ft_persist(ds_ft_manager *m, ft_job *j, ds_err *err);
/* The whole job, on the training thread (job_run.c). 0, DS_ECANCELED or an error (message in
 * err); *suspended when a stop saved its state for the next start. */
int ft_run_job(ds_ft_manager *m, ft_job *j, bool *suspended, ds_err *err);

#endif
