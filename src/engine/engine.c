/* The engine thread: continuous batching over the paged KV cache (docs/ARCHITECTURE.md, "The data
 * path of one request": requests arrive through ds_engine_submit, events leave through callbacks).
 * Each step takes every running sequence's pending tokens (a decode is 1 token, a prefill a chunk)
 * up to the token budget, admits waiting requests while blocks and slots allow, runs one forward,
 * samples, and emits events. When blocks run out, the most recently admitted sequence is
 * preempted (its blocks freed, recomputed later) — never dropped. */
#include "engine/engine_internal.h"
#include "util/mem.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ds_engine_params ds_engine_default_params(void) {
    ds_engine_params p = {.max_batch_tokens = 512, .max_seqs = 64, .kv_block_size = 16,
                          .kv_cache_bytes = (size_t)256 << 20, .max_ctx = 0, .max_queue = 1024,
                          .n_threads = 0, .registry = NULL, .adapter_budget_bytes = (size_t)512 << 20,
                          .max_adapters = 64};
    return p;
}

ds_gen_request ds_gen_request_default(void) {
    ds_gen_request r;
    memset(&r, 0, sizeof r);
    r.max_tokens = 16;
    r.skip_special = true;
    r.top_logprobs = -1;
    r.sampling = ds_sampling_default_params();
    return r;
}

static void *engine_main(void *arg);

static int engine_init(ds_engine *e, ds_err *err) {
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = e->p.n_threads;
    bp.int8_activations = e->p.int8_activations;
    e->backend = ds_backend_create(e->p.backend ? e->p.backend : "cpu", &bp, err);
    if (!e->backend) return DS_EDEVICE;
    ds_llama_params lp = ds_llama_default_params();
    lp.max_tokens = e->p.max_batch_tokens;
    lp.max_seqs = e->p.max_seqs;
    lp.max_out = e->p.max_seqs; /* one sampled row per sequence per step */
    lp.kv_block_size = e->p.kv_block_size;
    lp.kv_bytes = e->p.kv_cache_bytes;
    lp.max_blocks_per_seq = (e->max_ctx + e->p.kv_block_size - 1) / e->p.kv_block_size + 2;
    e->llama = ds_llama_create(e->model, e->backend, &lp, err);
    if (!e->llama) return DS_EDEVICE;
    /* Gemma 3's global layers read the whole context: only a model whose every layer slides frees. */
    e->kv_window = 0;
    for (int32_t il = 0; il < e->model->cfg.n_layer; il++) {
        const int32_t w = ds_model_layer_window(&e->model->cfg, il);
        if (w <= 0) {
            e->kv_window = 0;
            break;
        }
        if (w > e->kv_window) e->kv_window = w;
    }
    int st = ds_kv_alloc_init(&e->kv, ds_llama_n_kv_blocks(e->llama));
    if (st) return ds_err_set(err, st, "out of memory");
    if (ds_engine_batch_init(e) != DS_OK) return ds_err_set(err, DS_ENOMEM, "out of memory for batch buffers");
    e->reg = e->p.registry;
    if (e->p.max_adapters < 1) e->p.max_adapters = 1;
    e->slots = calloc((size_t)e->p.max_adapters, sizeof *e->slots);
    if (!e->slots) return ds_err_set(err, DS_ENOMEM, "out of memory");
    e->b.plan = ds_adapter_plan_create(e->llama, e->p.max_seqs, e->p.max_batch_tokens, err);
    return e->b.plan ? DS_OK : DS_ENOMEM;
}

ds_engine *ds_engine_create(const ds_model *model, const ds_engine_params *params, ds_err *err) {
    ds_engine *e = calloc(1, sizeof *e);
    if (!e) {
        ds_err_set(err, DS_ENOMEM, "out of memory");
        return NULL;
    }
    e->model = model;
    e->p = params ? *params : ds_engine_default_params();
    e->max_ctx = e->p.max_ctx > 0 && e->p.max_ctx < model->cfg.max_ctx ? e->p.max_ctx : model->cfg.max_ctx;
    if (e->p.max_batch_tokens < 1 || e->p.max_seqs < 1 || e->p.kv_block_size < 1 || e->p.max_queue < 1) {
        ds_err_set(err, DS_EINVAL, "engine: max_batch_tokens, max_seqs, kv_block_size, max_queue must be >= 1");
        free(e);
        return NULL;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->next_id = 1;
    if (engine_init(e, err) != DS_OK) {
        ds_engine_free(e);
        return NULL;
    }
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        ds_err_set(err, DS_ENOMEM, "cannot start the engine thread");
        ds_engine_free(e);
        return NULL;
    }
    e->thread_started = true;
    DS_LOGI("engine: %d KV blocks of %d tokens (%.1f MiB), batch %d tokens, %d sequences, context %d%s%s",
            e->kv.n_blocks, e->p.kv_block_size, (double)e->p.kv_cache_bytes / (1 << 20), e->p.max_batch_tokens,
            e->p.max_seqs, e->max_ctx,
            e->p.int8_activations ? ", int8 activations for quantised weights" : "",
            e->kv_window ? ", KV blocks behind the sliding window freed" : "");
    return e;
}

static void free_list(ds_seq *s) {
    while (s) {
        ds_seq *n = s->next;
        ds_seq_free(s);
        s = n;
    }
}

void ds_engine_free(ds_engine *e) {
    if (!e) return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stop = true;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    for (ds_seq *s = e->incoming; s; s = s->next) ds_engine_seq_release(e, s);
    free_list(e->incoming);
    ds_engine_slots_free(e);
    ds_adapter_plan_free(e->b.plan);
    ds_engine_batch_free(e);
    ds_kv_alloc_free(&e->kv);
    ds_llama_free(e->llama);
    ds_backend_free(e->backend);
    free(e->cancels);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

/* The registered version `name` stands for ("" or NULL: the base model, *entry NULL), with a
 * reference taken. Returns 0 or DS_ENOTFOUND. */
static int acquire_adapter(ds_engine *e, const char *name, ds_adapter_entry **entry) {
    *entry = NULL;
    if (!name || !name[0]) return DS_OK;
    return e->reg && (*entry = ds_registry_acquire(e->reg, name)) ? DS_OK : DS_ENOTFOUND;
}

/* Resolves the adapter once (taking a reference) and returns the extra context it occupies. */
static int resolve_adapter(ds_engine *e, const ds_gen_request *r, ds_adapter_entry **entry, int32_t *n_virt,
                           int32_t *n_prefix, ds_err *err) {
    *n_virt = *n_prefix = 0;
    int st = acquire_adapter(e, r->adapter, entry);
    if (st && r->adapter_fallback) st = acquire_adapter(e, r->adapter_fallback, entry);
    if (st) return ds_err_set(err, DS_ENOTFOUND, "The model `%s` does not exist.", r->adapter);
    if (!*entry) return DS_OK;
    if ((st = ds_engine_adapter_fits(e, *entry, err))) return st; /* the caller releases *entry */
    const ds_adapter *a = (*entry)->adapter;
    if (a->kind == DS_ADAPTER_PROMPT) *n_virt = a->n_virtual;
    if (a->prefix) *n_prefix = a->n_virtual; /* prefix tuning, alone or in a MAM union */
    return DS_OK;
}

/* KV blocks a sequence of n slots (extra of them the adapter's virtual ones) holds at its peak: all
 * of them, one spare. With every layer sliding, at most the window and one step's chunk (the blocks
 * behind are freed as it grows: one more for a block boundary), the prefix's blocks and one spare. */
static int64_t kv_need(const ds_engine *e, int64_t n, int64_t extra) {
    const int64_t bs = e->p.kv_block_size, all = (n + bs - 1) / bs + 1;
    if (!e->kv_window) return all;
    const int64_t win = ((int64_t)e->kv_window - 1 + e->p.max_batch_tokens + bs - 1) / bs + 1 + (extra + bs - 1) / bs + 1;
    return win < all ? win : all;
}

/* max_tokens 0: the rest of the context — the context length and the KV cache (one block spare,
 * as validate_request reserves it) less the prompt and the adapter's virtual tokens; at least 1,
 * so that a prompt that fills the context is refused by validate_request with its message. */
static int32_t resolve_max_tokens(const ds_engine *e, const ds_gen_request *r, int32_t extra) {
    if (r->max_tokens != 0) return r->max_tokens;
    int64_t room = (int64_t)e->max_ctx - (int64_t)r->n_prompt - extra;
    const int64_t kv_room = (int64_t)(e->kv.n_blocks - 1) * e->p.kv_block_size - (int64_t)r->n_prompt - extra;
    if (kv_room < room && kv_need(e, (int64_t)r->n_prompt + extra + room, extra) > e->kv.n_blocks) room = kv_room;
    return room > INT32_MAX ? INT32_MAX : room < 1 ? 1 : (int32_t)room;
}

static int validate_request(ds_engine *e, const ds_gen_request *r, int32_t extra, ds_err *err) {
    if (!r->on_event) return ds_err_set(err, DS_EINVAL, "request has no event callback");
    if (r->n_prompt == 0) return ds_err_set(err, DS_EINVAL, "prompt is empty");
    if (r->max_tokens < 1) return ds_err_set(err, DS_EINVAL, "max_tokens must be at least 1");
    for (size_t i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= e->model->cfg.n_vocab)
            return ds_err_set(err, DS_EINVAL, "prompt token %d is out of range [0, %d)", r->prompt[i],
                              e->model->cfg.n_vocab);
    if ((int64_t)r->n_prompt + r->max_tokens + extra > e->max_ctx)
        return ds_err_set(err, DS_ERANGE,
                          "This model's maximum context length is %d tokens. However, you requested %lld tokens "
                          "(%zu in the prompt, %d for the completion%s).",
                          e->max_ctx, (long long)r->n_prompt + r->max_tokens + extra, r->n_prompt, r->max_tokens,
                          extra ? ", plus the adapter's virtual tokens" : "");
    const int64_t need = kv_need(e, (int64_t)r->n_prompt + r->max_tokens + extra, extra);
    if (need > e->kv.n_blocks)
        return ds_err_set(err, DS_ERANGE, "request needs %lld KV blocks but the cache holds %d", (long long)need,
                          e->kv.n_blocks);
    return DS_OK;
}

/* Refuses a request after its adapter was resolved. Returns 0 for submit. */
static uint64_t refuse(ds_engine *e, ds_adapter_entry *entry, int st, int *status) {
    if (entry) ds_registry_release(e->reg, entry);
    if (status) *status = st;
    return 0;
}

uint64_t ds_engine_submit(ds_engine *e, const ds_gen_request *req, ds_submit_info *info, int *status, ds_err *err) {
    ds_adapter_entry *entry = NULL;
    int32_t n_virt, n_prefix;
    int st = resolve_adapter(e, req, &entry, &n_virt, &n_prefix, err);
    ds_gen_request r = *req;
    if (!st) {
        r.max_tokens = resolve_max_tokens(e, req, n_virt + n_prefix);
        st = validate_request(e, &r, n_virt + n_prefix, err);
    }
    if (st) return refuse(e, entry, st, status);
    pthread_mutex_lock(&e->mu);
    if ((int64_t)e->n_incoming + e->stats.n_waiting >= e->p.max_queue || e->stop) {
        pthread_mutex_unlock(&e->mu);
        ds_err_set(err, DS_EBUSY, "the server is overloaded: %d requests are waiting", e->p.max_queue);
        return refuse(e, entry, DS_EBUSY, status);
    }
    uint64_t id = e->next_id++;
    pthread_mutex_unlock(&e->mu);
    ds_seq *s = ds_seq_create(id, &r, e->model->cfg.n_vocab, n_virt);
    if (!s) {
        ds_err_set(err, DS_ENOMEM, "out of memory");
        return refuse(e, entry, DS_ENOMEM, status);
    }
    s->entry = entry;
    s->n_prefix = n_prefix;
    s->pos_base = entry && entry->adapter->prefix_pos0 ? 0 : n_prefix;
    if (info) { /* before the sequence is queued: once it is, it may end and drop the entry */
        snprintf(info->adapter, sizeof info->adapter, "%s", entry ? entry->name : "");
        info->adapter_version = entry ? entry->version : 0;
        info->max_tokens = r.max_tokens;
    }
    pthread_mutex_lock(&e->mu);
    s->next = NULL;
    if (e->incoming_tail) e->incoming_tail->next = s;
    else e->incoming = s;
    e->incoming_tail = s;
    e->n_incoming++;
    e->in_flight++;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (status) *status = DS_OK;
    return id;
}

void ds_engine_cancel(ds_engine *e, uint64_t id) {
    pthread_mutex_lock(&e->mu);
    if (!DS_GROW(e->cancels, e->cap_cancels, e->n_cancels + 1)) e->cancels[e->n_cancels++] = id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void ds_engine_stats_get(ds_engine *e, ds_engine_stats *out) {
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    out->n_waiting += (int32_t)e->n_incoming;
    pthread_mutex_unlock(&e->mu);
}

const ds_model *ds_engine_model(const ds_engine *e) { return e->model; }

void ds_engine_adapter_activity(ds_engine *e, char *running, size_t running_cap, char *waiting, size_t waiting_cap) {
    pthread_mutex_lock(&e->mu);
    snprintf(running, running_cap, "%s", e->act_running);
    snprintf(waiting, waiting_cap, "%s", e->act_waiting);
    pthread_mutex_unlock(&e->mu);
}

int32_t ds_engine_in_flight(ds_engine *e) {
    pthread_mutex_lock(&e->mu);
    int32_t n = e->in_flight;
    pthread_mutex_unlock(&e->mu);
    return n;
}

/* Moves submitted requests into the waiting queue and marks cancelled sequences. */
static void take_inbox(ds_engine *e) {
    ds_seq *in = e->incoming;
    e->incoming = e->incoming_tail = NULL;
    e->n_incoming = 0;
    for (size_t i = 0; i < e->n_cancels; i++) {
        uint64_t id = e->cancels[i];
        for (ds_seq *s = in; s; s = s->next)
            if (s->id == id) s->cancel = true;
        for (ds_seq *s = e->waiting; s; s = s->next)
            if (s->id == id) s->cancel = true;
        for (ds_seq *s = e->running; s; s = s->next)
            if (s->id == id) s->cancel = true;
    }
    e->n_cancels = 0;
    while (in) {
        ds_seq *n = in->next;
        ds_engine_queue_waiting(e, in, false);
        in = n;
    }
}

void ds_engine_set_background(ds_engine *e, bool (*run)(void *ud), void *ud, float budget) {
    pthread_mutex_lock(&e->mu);
    while (e->bg_busy) pthread_cond_wait(&e->cv, &e->mu); /* never swap the hook mid-call */
    e->bg_run = run;
    e->bg_ud = ud;
    e->bg_budget = budget > 0.0f && budget <= 1.0f ? budget : 0.5f;
    pthread_mutex_unlock(&e->mu);
}

void ds_engine_wake_background(ds_engine *e) {
    pthread_mutex_lock(&e->mu);
    e->bg_pending = true;
    e->bg_wakes++;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

const double ds_engine_unit_bounds[DS_ENGINE_UNIT_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025,
                                                             0.05,  0.1,    0.25,  0.5,  1.0};

/* A unit run while no request is running may take this long: a request that arrives meanwhile
 * waits at most that for its first step (TTFT), and training alone runs in units large enough to
 * be efficient — cut to the busy target (~3 ms at budget 0.1) it trained at 107 tokens/s against
 * 199 in units of ~10 ms (bench/train_coserve.sh, SmolLM2). */
#define IDLE_UNIT_S 0.025

double ds_engine_background_unit_target(const ds_engine *e) {
    double x = 0.01;
    if (e->step_avg > 0) {
        const double b = e->bg_budget;
        x = b / (1.0 - b + 1e-9) * e->step_avg;
    }
    if (e->bg_idle && x < IDLE_UNIT_S) x = IDLE_UNIT_S;
    return x < 0.001 ? 0.001 : x > 0.1 ? 0.1 : x;
}

/* Half-life of the share's memory: the budget tracks the last ~10 s of load. */
#define SHARE_DECAY_S 14.4

/* Records one unit of dt seconds (busy: requests were running) in the stats; under mu. */
static void note_unit(ds_engine *e, double dt, bool busy) {
    ds_engine_stats *st = &e->stats;
    st->bg_units++;
    st->bg_seconds += dt;
    if (busy) st->bg_units_busy++, st->bg_busy_seconds += dt;
    if (dt > st->bg_unit_max) st->bg_unit_max = dt;
    int k = 0;
    while (k < DS_ENGINE_UNIT_BUCKETS && dt > ds_engine_unit_bounds[k]) k++;
    st->bg_unit_hist[k]++;
}

/* Runs one unit of the background hook when it is within its share of the engine's busy time
 * (always when no request runs). Only time while requests run counts: t_inf and t_bg decay with
 * it, so training while idle never eats into the budget later. */
static void maybe_background(ds_engine *e, bool inference, double dt_inf) {
    e->bg_idle = !inference;
    if (inference) {
        const double decay = exp(-dt_inf / SHARE_DECAY_S);
        e->t_inf = e->t_inf * decay + dt_inf;
        e->t_bg *= decay;
        e->step_avg = e->step_avg > 0 ? 0.9 * e->step_avg + 0.1 * dt_inf : dt_inf;
    }
    const double b = e->bg_budget;
    const bool allowed = !inference || e->t_bg <= b / (1.0 - b + 1e-9) * e->t_inf;
    pthread_mutex_lock(&e->mu);
    e->stats.bg_budget = e->bg_budget;
    e->stats.bg_unit_target = ds_engine_background_unit_target(e);
    e->stats.bg_share = e->t_inf + e->t_bg > 0 ? e->t_bg / (e->t_inf + e->t_bg) : 0.0;
    bool (*run)(void *) = allowed ? e->bg_run : NULL;
    void *ud = e->bg_ud;
    const uint64_t wakes = e->bg_wakes;
    e->bg_busy = run != NULL;
    pthread_mutex_unlock(&e->mu);
    if (!run) return;
    const double t0 = ds_time_s();
    const bool more = run(ud);
    const double dt = ds_time_s() - t0;
    if (inference) {
        const double decay = exp(-dt / SHARE_DECAY_S);
        e->t_inf *= decay;
        e->t_bg = e->t_bg * decay + dt;
    }
    pthread_mutex_lock(&e->mu);
    note_unit(e, dt, inference);
    e->stats.bg_share = e->t_inf + e->t_bg > 0 ? e->t_bg / (e->t_inf + e->t_bg) : 0.0;
    e->bg_busy = false;
    if (!more && e->bg_wakes == wakes) e->bg_pending = false; /* a wake during the call keeps it pending */
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

static void *engine_main(void *arg) {
    ds_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        take_inbox(e);
        if (e->stop) break;
        const bool inference = e->waiting || e->running, bg = e->bg_run && e->bg_pending;
        if (!inference && !bg) {
            pthread_cond_wait(&e->cv, &e->mu);
            continue;
        }
        pthread_mutex_unlock(&e->mu);
        double dt = 0;
        if (inference) {
            const double t0 = ds_time_s();
            ds_engine_step(e);
            dt = ds_time_s() - t0;
        }
        if (bg) maybe_background(e, inference, dt);
        pthread_mutex_lock(&e->mu);
        e->stats.step_seconds += dt;
    }
    pthread_mutex_unlock(&e->mu);
    ds_engine_cancel_all(e);
    return NULL;
}
