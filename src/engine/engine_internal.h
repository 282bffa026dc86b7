/* Engine internals shared by engine.c (thread, API) and scheduler.c (one step). */
#ifndef DS_ENGINE_INTERNAL_H
#define DS_ENGINE_INTERNAL_H

#include "ds/adapter.h"
#include "ds/engine.h"
#include "engine/kv_cache.h"
#include "engine/seq.h"

#include <pthread.h>

/* Per-step batch buffers, sized at start-up (max_batch_tokens / max_seqs). */
typedef struct engine_batch {
    int32_t *tokens, *pos, *tok_seq, *tok_kv, *out_rows, *seq_adapter, *block_tables, *seq_prefix;
    ds_seq **seqs;    /* [max_seqs] sequences in this step, batch order */
    int32_t *n_sched; /* [max_seqs] tokens scheduled per sequence */
    float *logits;    /* [max_seqs][n_vocab] */
    float *raw_logits; /* [n_vocab] copy for logprobs */
    /* the step's adapters, and the plan built from them once per step (src/adapter/plan.c) */
    ds_adapter_seg *segs;       /* [max_seqs] */
    int32_t *soft_rows;         /* [max_batch_tokens] */
    const float **soft_src;     /* [max_batch_tokens] */
    const ds_adapter_dev **slot_devs; /* [max_adapters] */
    ds_plan *plan;              /* sized for max_seqs segments, max_batch_tokens tokens */
} engine_batch;

/* A resident adapter slot (engine thread only). */
typedef struct engine_slot {
    ds_adapter_entry *entry;    /* referenced while resident; NULL = free */
    ds_adapter_dev dev;
    int32_t *prefix_blocks;     /* prefix tuning: pinned KV blocks (one reference held here) */
    int32_t n_prefix_blocks;
    int32_t active;             /* running sequences using it (recomputed each step) */
    uint64_t last_used;         /* step number */
} engine_slot;

struct ds_engine {
    const ds_model *model;
    ds_engine_params p;
    int32_t max_ctx;
    ds_backend *backend;
    ds_llama *llama;
    ds_kv_alloc kv;
    /* Every layer slides (Mistral): the widest window, else 0. Own KV blocks that no later token can
     * attend are then returned to the pool as a sequence grows (scheduler.c free_behind_window). */
    int32_t kv_window;
    uint64_t kv_window_freed; /* blocks so returned (engine thread; copied into stats) */
    engine_batch b;
    /* shared with other threads, under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    bool thread_started, stop;
    ds_seq *incoming, *incoming_tail;
    size_t n_incoming;
    uint64_t *cancels;
    size_t n_cancels, cap_cancels;
    uint64_t next_id;
    ds_engine_stats stats;
    /* engine thread only */
    ds_seq *waiting; /* FIFO (preempted ones go to the front) */
    ds_seq *running; /* admission order */
    ds_adapter_registry *reg;
    engine_slot *slots; /* [max_adapters] */
    size_t slot_bytes;  /* backend bytes of resident adapters */
    uint64_t step_no;
    int32_t in_flight;  /* submitted, not finished (under mu) */
    char act_running[2048], act_waiting[2048]; /* adapter ids, comma-separated (under mu) */
    /* background hook (ds_engine_set_background); bg_pending under mu, the times engine-only */
    bool (*bg_run)(void *);
    void *bg_ud;
    float bg_budget;
    bool bg_pending, bg_busy;
    uint64_t bg_wakes;
    double t_inf, t_bg; /* decayed seconds in steps / in the hook while requests ran (share) */
    double step_avg;    /* recent mean inference step, seconds (0 before the first) */
    bool bg_idle;       /* the unit being run has no request beside it (engine thread) */
};

int ds_engine_batch_init(ds_engine *e);
void ds_engine_batch_free(ds_engine *e);
/* Appends (or, front=true, prepends) a sequence to the waiting queue. */
void ds_engine_queue_waiting(ds_engine *e, ds_seq *s, bool front);
/* Runs one scheduling + forward + sampling step. */
void ds_engine_step(ds_engine *e);
/* Finishes every sequence with DS_FINISH_CANCEL (shutdown). */
void ds_engine_cancel_all(ds_engine *e);

/* adapters.c: makes s's adapter resident (sets s->adapter_slot, takes prefix block references).
 * Returns 0, DS_EBUSY (no slot or budget free right now: try next step), or another status
 * (the sequence must fail; message in err). */
int ds_engine_slot_attach(ds_engine *e, ds_seq *s, ds_err *err);
/* Whether entry's adapter can ever fit the adapter budget: 0, or DS_EUNSUPPORTED with a message
 * (the request fails at once instead of waiting for room that eviction can never make). */
int ds_engine_adapter_fits(const ds_engine *e, const ds_adapter_entry *entry, ds_err *err);
/* Drops a sequence's prefix references (its own blocks are released by the caller). */
void ds_engine_slot_detach(ds_engine *e, ds_seq *s);
/* Frees slots whose adapter version was retired and that no running sequence uses. */
void ds_engine_slots_gc(ds_engine *e);
void ds_engine_slots_free(ds_engine *e);
/* Releases a finished sequence's registry reference. */
void ds_engine_seq_release(ds_engine *e, ds_seq *s);
#endif
