/* One engine step: schedule, build the batch (grouped by adapter slot), forward, sample, emit. */
#include "engine/engine_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ds_engine_batch_init(ds_engine *e) {
    engine_batch *b = &e->b;
    const size_t T = (size_t)e->p.max_batch_tokens, S = (size_t)e->p.max_seqs;
    const size_t mb = (size_t)ds_llama_max_blocks_per_seq(e->llama);
    b->tokens = malloc(T * 4);
    b->pos = malloc(T * 4);
    b->tok_seq = malloc(T * 4);
    b->tok_kv = malloc(T * 4);
    b->out_rows = malloc(T * 4);
    b->seq_adapter = malloc(S * 4);
    b->seq_prefix = calloc(S, 4);
    b->block_tables = malloc(S * mb * 4);
    b->seqs = malloc(S * sizeof *b->seqs);
    b->n_sched = malloc(S * 4);
    b->logits = malloc(S * (size_t)e->model->cfg.n_vocab * 4);
    b->raw_logits = malloc((size_t)e->model->cfg.n_vocab * 4);
    b->segs = malloc(S * sizeof *b->segs);
    b->soft_rows = malloc(T * 4);
    b->soft_src = malloc(T * sizeof *b->soft_src);
    b->slot_devs = calloc((size_t)(e->p.max_adapters > 0 ? e->p.max_adapters : 1), sizeof *b->slot_devs);
    if (!b->tokens || !b->pos || !b->tok_seq || !b->tok_kv || !b->out_rows || !b->seq_adapter || !b->seq_prefix ||
        !b->block_tables || !b->seqs || !b->n_sched || !b->logits || !b->raw_logits || !b->segs ||
        !b->soft_rows || !b->soft_src || !b->slot_devs)
        return DS_ENOMEM;
    return DS_OK;
}

void ds_engine_batch_free(ds_engine *e) {
    engine_batch *b = &e->b;
    void *ptrs[] = {b->tokens, b->pos, b->tok_seq, b->tok_kv, b->out_rows, b->seq_adapter, b->seq_prefix,
                    b->block_tables, b->seqs, b->n_sched, b->logits, b->raw_logits, b->segs, b->soft_rows, (void *)b->soft_src, (void *)b->slot_devs};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) free(ptrs[i]);
    ds_plan *plan = b->plan;
    memset(b, 0, sizeof *b);
    b->plan = plan;
}

void ds_engine_queue_waiting(ds_engine *e, ds_seq *s, bool front) {
    s->state = SEQ_WAITING;
    if (front) {
        s->next = e->waiting;
        e->waiting = s;
        return;
    }
    s->next = NULL;
    ds_seq **pp = &e->waiting;
    while (*pp) pp = &(*pp)->next;
    *pp = s;
}

/* Drops every block reference (own and shared prefix ones): the sequence will recompute. */
static void release_blocks(ds_engine *e, ds_seq *s) {
    for (int32_t i = 0; i < s->n_blocks; i++)
        if (s->blocks[i] >= 0) ds_kv_block_unref(&e->kv, s->blocks[i]); /* -1: freed behind the window */
    s->n_blocks = 0;
    s->n_window_freed = 0;
    s->n_prefix_blocks = 0;
    s->n_computed = 0;
    ds_engine_slot_detach(e, s);
}

static void unlink_seq(ds_seq **list, ds_seq *s) {
    for (ds_seq **pp = list; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            s->next = NULL;
            return;
        }
}

static int32_t blocks_for(const ds_engine *e, const ds_seq *s, int32_t n_own) {
    return s->n_prefix_blocks + (n_own + e->p.kv_block_size - 1) / e->p.kv_block_size;
}

/* Ensures s has blocks for its first n_own own KV slots. Returns false when the pool is empty. */
static bool grow_blocks(ds_engine *e, ds_seq *s, int32_t n_own) {
    const int32_t need = blocks_for(e, s, n_own);
    if (need > s->cap_blocks) {
        int32_t cap = need + 8;
        int32_t *nb = realloc(s->blocks, sizeof(int32_t) * (size_t)cap);
        if (!nb) return false;
        s->blocks = nb;
        s->cap_blocks = cap;
    }
    while (s->n_blocks < need) {
        int32_t b = ds_kv_block_take(&e->kv);
        if (b < 0) return false;
        s->blocks[s->n_blocks++] = b;
    }
    return true;
}

/* With every layer sliding, the next token to compute (own slot n_computed) attends to own slots from
 * n_computed + 1 - window on, and later tokens to fewer: own blocks wholly below that are never read
 * again (attention starts at the window, src/backend/cpu/attn_kern.h and cuda/attention.cu), so they go
 * back to the pool. Their table entries become -1; the table keeps its positions, so slot -> block
 * stays block_tables[slot / block_size]. Prefix blocks are the adapter slot's and stay. */
static void free_behind_window(ds_engine *e, ds_seq *s) {
    if (!e->kv_window) return;
    const int32_t lo = s->n_computed + 1 - e->kv_window, dead = lo > 0 ? lo / e->p.kv_block_size : 0;
    for (; s->n_window_freed < dead && s->n_prefix_blocks + s->n_window_freed < s->n_blocks; s->n_window_freed++) {
        int32_t *b = &s->blocks[s->n_prefix_blocks + s->n_window_freed];
        if (*b < 0) continue;
        ds_kv_block_unref(&e->kv, *b);
        *b = -1;
        e->kv_window_freed++;
    }
}

/* Preempts the most recently admitted running sequence admitted after `keep` (recompute later).
 * Those are not scheduled in this step yet (running is scanned in admission order); when there is
 * none, `keep` is itself the newest and the caller preempts it (LIFO, as vLLM). */
static bool preempt_one(ds_engine *e, ds_seq *keep) {
    ds_seq *victim = NULL;
    for (ds_seq *s = keep->next; s; s = s->next) victim = s;
    if (!victim) return false;
    unlink_seq(&e->running, victim);
    release_blocks(e, victim);
    ds_engine_queue_waiting(e, victim, true);
    e->stats.n_preemptions++;
    DS_LOGD("engine: preempted request %llu (%d tokens to recompute)", (unsigned long long)victim->id,
            victim->n_tokens);
    return true;
}

/* Counted out of in_flight BEFORE the final event, so whoever sees the event also sees the count. */
static void leave_flight(ds_engine *e) {
    pthread_mutex_lock(&e->mu);
    e->in_flight--;
    pthread_mutex_unlock(&e->mu);
}

static void finish_seq(ds_engine *e, ds_seq *s, ds_finish_reason why) {
    release_blocks(e, s);
    leave_flight(e);
    ds_seq_finish(s, why);
    ds_engine_seq_release(e, s);
    ds_seq_free(s);
}

static void fail_seq(ds_engine *e, ds_seq *s, int status, const char *msg) {
    release_blocks(e, s);
    leave_flight(e);
    ds_seq_fail(s, status, msg);
    ds_engine_seq_release(e, s);
    ds_seq_free(s);
}

static void reap_cancelled(ds_engine *e) {
    ds_seq **lists[] = {&e->running, &e->waiting};
    for (int l = 0; l < 2; l++) {
        for (ds_seq **pp = lists[l]; *pp;) {
            ds_seq *s = *pp;
            if (!s->cancel) {
                pp = &s->next;
                continue;
            }
            *pp = s->next;
            finish_seq(e, s, DS_FINISH_CANCEL);
        }
    }
}

/* Adds up to `budget` of s's pending tokens to the step. Returns tokens scheduled, -1 when s itself
 * cannot get blocks even after preempting everyone else. */
static int32_t schedule_seq(ds_engine *e, ds_seq *s, int32_t budget, int32_t *n_seqs) {
    int32_t pending = s->n_tokens - s->n_computed;
    int32_t n = pending < budget ? pending : budget;
    if (n <= 0 || *n_seqs >= e->p.max_seqs) return 0;
    free_behind_window(e, s);
    while (!grow_blocks(e, s, s->n_computed + n))
        if (!preempt_one(e, s)) return -1;
    e->b.seqs[*n_seqs] = s;
    e->b.n_sched[*n_seqs] = n;
    (*n_seqs)++;
    return n;
}

static void append_running(ds_engine *e, ds_seq *s) {
    s->state = SEQ_RUNNING;
    if (!s->sched_ns) s->sched_ns = ds_time_ns();
    s->next = NULL;
    ds_seq **pp = &e->running;
    while (*pp) pp = &(*pp)->next;
    *pp = s;
}

/* Admits waiting sequences (FIFO, skipping ones whose adapter cannot be made resident yet) while
 * slots, blocks and budget last. */
static void admit(ds_engine *e, int32_t *budget, int32_t *n_seqs, int32_t n_running) {
    for (ds_seq **pp = &e->waiting; *pp && *budget > 0 && n_running < e->p.max_seqs && *n_seqs < e->p.max_seqs;) {
        ds_seq *s = *pp;
        ds_err err = {{0}};
        int st = ds_engine_slot_attach(e, s, &err);
        if (st == DS_EBUSY) { /* its adapter waits for a slot; others go ahead */
            pp = &s->next;
            continue;
        }
        *pp = s->next;
        if (st) {
            fail_seq(e, s, st, err.msg);
            continue;
        }
        int32_t n = s->n_tokens - s->n_computed < *budget ? s->n_tokens - s->n_computed : *budget;
        if (blocks_for(e, s, s->n_computed + n) - s->n_blocks > e->kv.n_free) { /* no room without preempting */
            release_blocks(e, s);
            s->next = *pp;
            *pp = s;
            break;
        }
        append_running(e, s);
        n_running++;
        *budget -= schedule_seq(e, s, *budget, n_seqs);
    }
}

/* Picks this step's work: running sequences first, then waiting ones while blocks last. */
static int32_t schedule(ds_engine *e) {
    int32_t budget = e->p.max_batch_tokens, n_seqs = 0;
    /* s->next is read after scheduling s: preemption only removes sequences after s */
    for (ds_seq *s = e->running; s && budget > 0; s = s->next) {
        int32_t n = schedule_seq(e, s, budget, &n_seqs);
        if (n < 0) { /* alone and still no room: wait in the queue */
            unlink_seq(&e->running, s);
            release_blocks(e, s);
            ds_engine_queue_waiting(e, s, true);
            break;
        }
        budget -= n;
    }
    int32_t n_running = 0;
    for (ds_seq *s = e->running; s; s = s->next) n_running++;
    admit(e, &budget, &n_seqs, n_running);
    return n_seqs;
}

/* Stable order by adapter slot so each adapter's tokens form one segment. */
static void sort_by_slot(ds_engine *e, int32_t n) {
    for (int32_t i = 1; i < n; i++) {
        ds_seq *s = e->b.seqs[i];
        int32_t ns = e->b.n_sched[i], j = i;
        while (j > 0 && e->b.seqs[j - 1]->adapter_slot > s->adapter_slot) {
            e->b.seqs[j] = e->b.seqs[j - 1];
            e->b.n_sched[j] = e->b.n_sched[j - 1];
            j--;
        }
        e->b.seqs[j] = s;
        e->b.n_sched[j] = ns;
    }
}

/* Adds sequence i's scheduled tokens to the flat batch at row *t. */
static void add_seq_tokens(ds_engine *e, int32_t i, int32_t *t, int32_t *n_soft) {
    engine_batch *b = &e->b;
    ds_seq *s = b->seqs[i];
    for (int32_t j = 0; j < b->n_sched[i]; j++, (*t)++) {
        const int32_t k = s->n_computed + j;
        b->tokens[*t] = s->tokens[k];
        b->pos[*t] = s->pos_base + k;
        b->tok_kv[*t] = s->n_prefix + k;
        b->tok_seq[*t] = i;
        if (k < s->n_virt) {
            b->soft_rows[*n_soft] = *t;
            b->soft_src[(*n_soft)++] = e->slots[s->adapter_slot].dev.prompt_rows[k];
        }
    }
}

/* Fills the flat batch and the step's adapter segments; returns the number of tokens. */
static int32_t build_batch(ds_engine *e, int32_t n_seqs, ds_batch *out, ds_adapter_batch *ad) {
    engine_batch *b = &e->b;
    const int32_t mb = ds_llama_max_blocks_per_seq(e->llama);
    int32_t t = 0, n_out = 0, n_soft = 0, n_segs = 0;
    sort_by_slot(e, n_seqs);
    for (int32_t i = 0; i < n_seqs; i++) {
        ds_seq *s = b->seqs[i];
        const int32_t start = t;
        add_seq_tokens(e, i, &t, &n_soft);
        if (s->n_computed + b->n_sched[i] == s->n_tokens) b->out_rows[n_out++] = t - 1;
        memcpy(b->block_tables + (size_t)i * mb, s->blocks, sizeof(int32_t) * (size_t)s->n_blocks);
        b->seq_adapter[i] = s->adapter_slot;
        b->seq_prefix[i] = s->n_prefix;
        if (s->adapter_slot < 0) continue;
        if (n_segs && b->segs[n_segs - 1].slot == s->adapter_slot) b->segs[n_segs - 1].len += t - start;
        else b->segs[n_segs++] = (ds_adapter_seg){.start = start, .len = t - start, .slot = s->adapter_slot};
    }
    for (int32_t i = 0; i < e->p.max_adapters; i++) b->slot_devs[i] = e->slots[i].entry ? &e->slots[i].dev : NULL;
    *ad = (ds_adapter_batch){.slots = b->slot_devs, .segs = b->segs, .n_segs = n_segs, .soft_rows = b->soft_rows,
                             .soft_src = b->soft_src, .n_soft = n_soft};
    *out = (ds_batch){.n_tokens = t, .tokens = b->tokens, .pos = b->pos, .tok_seq = b->tok_seq,
                      .tok_kv = b->tok_kv, .n_seqs = n_seqs, .block_tables = b->block_tables,
                      .max_blocks = mb, .seq_prefix = b->seq_prefix, .n_out = n_out, .out_rows = b->out_rows,
                      .seq_adapter = b->seq_adapter};
    return t;
}

/* Samples for every sequence whose chunk reached its last known token; finishes the done ones. */
static void sample_and_emit(ds_engine *e, int32_t n_seqs, uint64_t *gen_tokens) {
    engine_batch *b = &e->b;
    const int32_t V = e->model->cfg.n_vocab;
    int32_t row = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        ds_seq *s = b->seqs[i];
        s->n_computed += b->n_sched[i];
        if (s->n_computed != s->n_tokens) continue;
        float *logits = b->logits + (size_t)row++ * V;
        float *raw = NULL;
        if (s->top_logprobs >= 0) { /* logprobs come from the raw logits, before penalties */
            raw = b->raw_logits;
            memcpy(raw, logits, sizeof(float) * (size_t)V);
        }
        int32_t tok = ds_sampler_sample(&s->sampler, logits, s->tokens + s->n_virt, s->n_tokens - s->n_virt,
                                        s->n_prompt);
        ds_finish_reason why = ds_seq_accept(s, e->model->tok, tok, raw, V, e->max_ctx);
        (*gen_tokens)++;
        if (why != DS_FINISH_NONE) {
            unlink_seq(&e->running, s);
            finish_seq(e, s, why);
        }
    }
}

static int32_t count_prompt_tokens(ds_engine *e, int32_t n_seqs) {
    int32_t n = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        ds_seq *s = e->b.seqs[i];
        const int32_t lo = s->n_computed > s->n_virt ? s->n_computed : s->n_virt;
        const int32_t p_end = s->n_virt + s->n_prompt;
        const int32_t hi = s->n_computed + e->b.n_sched[i] < p_end ? s->n_computed + e->b.n_sched[i] : p_end;
        if (hi > lo) n += hi - lo;
    }
    return n;
}

/* Comma-separated adapter ids of a list (no spaces, each once). */
static void adapter_list(const ds_seq *list, char *out, size_t cap) {
    size_t len = 0;
    out[0] = 0;
    for (const ds_seq *s = list; s; s = s->next) {
        if (!s->entry) continue;
        const char *n = s->entry->name;
        bool dup = false;
        for (const ds_seq *p = list; p != s && !dup; p = p->next) dup = p->entry && !strcmp(p->entry->name, n);
        if (dup) continue;
        int w = snprintf(out + len, cap - len, "%s%s", len ? "," : "", n);
        if (w < 0 || (size_t)w >= cap - len) break;
        len += (size_t)w;
    }
}

static void update_stats(ds_engine *e, int32_t n_prompt_tok, uint64_t gen) {
    int32_t nr = 0, nw = 0, resident = 0;
    for (ds_seq *s = e->running; s; s = s->next) nr++;
    for (ds_seq *s = e->waiting; s; s = s->next) nw++;
    for (int32_t i = 0; i < e->p.max_adapters; i++) resident += e->slots[i].entry != NULL;
    char run[sizeof e->act_running], wait[sizeof e->act_waiting];
    adapter_list(e->running, run, sizeof run);
    adapter_list(e->waiting, wait, sizeof wait);
    pthread_mutex_lock(&e->mu);
    ds_engine_stats *st = &e->stats;
    st->n_running = nr;
    st->n_waiting = nw;
    st->kv_blocks_total = e->kv.n_blocks;
    st->kv_blocks_used = ds_kv_used(&e->kv);
    st->kv_blocks_window_freed = e->kv_window_freed;
    st->kv_block_size = e->p.kv_block_size;
    st->prompt_tokens_total += (uint64_t)n_prompt_tok;
    st->generation_tokens_total += gen;
    st->n_adapter_slots = e->p.max_adapters;
    st->n_adapters_resident = resident;
    st->adapter_dev_bytes = e->slot_bytes;
    memcpy(e->act_running, run, sizeof run);
    memcpy(e->act_waiting, wait, sizeof wait);
    pthread_mutex_unlock(&e->mu);
}

void ds_engine_step(ds_engine *e) {
    e->step_no++;
    reap_cancelled(e);
    ds_engine_slots_gc(e);
    int32_t n_seqs = schedule(e);
    int32_t n_prompt_tok = 0;
    uint64_t gen = 0;
    if (n_seqs > 0) {
        ds_batch batch;
        ds_adapter_batch ad;
        int32_t n_tok = build_batch(e, n_seqs, &batch, &ad);
        n_prompt_tok = count_prompt_tokens(e, n_seqs);
        ds_err err = {{0}};
        const double t0 = ds_time_s();
        int fst = ds_adapter_plan_build(e->b.plan, &ad, &batch); /* once per step, for every layer */
        if (fst) ds_err_set(&err, fst, "adapter plan: step exceeds its limits (%d segments)", ad.n_segs);
        else fst = ds_llama_forward(e->llama, &batch, e->b.plan, e->b.logits, &err);
        const double t1 = ds_time_s();
        if (ds_log_get_level() >= DS_LOG_DEBUG)
            DS_LOGD("engine: step %llu: %d seqs, %d tokens, forward %.2f ms", (unsigned long long)e->step_no, n_seqs,
                    n_tok, (t1 - t0) * 1e3);
        if (fst != DS_OK) {
            DS_LOGE("engine: step of %d tokens failed: %s", n_tok, err.msg);
            for (int32_t i = 0; i < n_seqs; i++) {
                unlink_seq(&e->running, e->b.seqs[i]);
                fail_seq(e, e->b.seqs[i], DS_EDEVICE, err.msg);
            }
        } else {
            sample_and_emit(e, n_seqs, &gen);
        }
        pthread_mutex_lock(&e->mu);
        e->stats.steps++;
        pthread_mutex_unlock(&e->mu);
    }
    update_stats(e, n_prompt_tok, gen);
}

void ds_engine_cancel_all(ds_engine *e) {
    ds_seq **lists[] = {&e->running, &e->waiting};
    for (int l = 0; l < 2; l++) {
        while (*lists[l]) {
            ds_seq *s = *lists[l];
            *lists[l] = s->next;
            finish_seq(e, s, DS_FINISH_CANCEL);
        }
    }
}
