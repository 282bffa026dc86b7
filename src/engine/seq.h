/* A sequence inside the engine: the request's copy, its tokens, KV blocks, sampler and the text
 * state that implements stop strings. Engine thread only (after submit hands it over). */
#ifndef DS_SEQ_H
#define DS_SEQ_H

#include "ds/engine.h"
#include "ds/tokenizer.h"
#include "engine/sampler.h"

typedef enum { SEQ_WAITING = 0, SEQ_RUNNING, SEQ_FINISHED } seq_state;

typedef struct ds_seq {
    uint64_t id;
    seq_state state;
    /* request */
    int32_t n_prompt, max_tokens, min_tokens;
    bool ignore_eos, include_stop_str, skip_special;
    int32_t top_logprobs;
    char *stop[DS_MAX_STOP];
    int32_t n_stop;
    size_t max_stop_len;
    int32_t *stop_ids;
    int32_t n_stop_ids;
    struct ds_adapter_entry *entry; /* adapter version (referenced) or NULL for the base */
    int32_t adapter_slot; /* resident slot while running, -1 = base */
    int32_t n_virt;       /* soft-prompt rows at the head of tokens[] (prompt tuning / P-tuning) */
    int32_t n_prefix;     /* prefix-tuning KV slots ahead of the sequence's own (shared blocks) */
    int32_t pos_base;     /* RoPE position of token 0: n_prefix, or 0 (ds_adapter.prefix_pos0) */
    int32_t n_prefix_blocks;
    ds_event_cb on_event;
    void *user;
    ds_sampler sampler;
    /* tokens: [n_virt placeholders] prompt, then generated; KV holds the first n_computed */
    int32_t *tokens;
    int32_t n_tokens, cap_tokens, n_computed, n_gen;
    int32_t *blocks;      /* [prefix blocks][own blocks]; -1 = freed behind the sliding window */
    int32_t n_blocks, cap_blocks;
    int32_t n_window_freed; /* own blocks from the first one that were freed behind the window */
    /* text: detok state and text held back because it may start a stop string */
    ds_detok detok;
    char *held;
    size_t held_len, held_cap;
    bool cancel;
    uint64_t arrival_ns, first_token_ns, sched_ns; /* sched_ns: first admitted to running */
    struct ds_seq *next;
} ds_seq;

/* Builds a sequence from a request (deep copies). NULL on OOM. */
/* n_virt placeholder tokens are put ahead of the prompt (soft-prompt rows). */
ds_seq *ds_seq_create(uint64_t id, const ds_gen_request *req, int32_t n_vocab, int32_t n_virt);
void ds_seq_free(ds_seq *s);

/* Appends a sampled token and emits its DS_EV_TOKEN event (text after stop-string handling).
 * Returns the finish reason that this token causes (DS_FINISH_NONE to continue). */
ds_finish_reason ds_seq_accept(ds_seq *s, const ds_tokenizer *tok, int32_t token, const float *raw_logits,
                               int32_t n_vocab, int32_t max_ctx);

/* Emits the final DS_EV_DONE (flushing held text first, unless the finish was a stop string). */
void ds_seq_finish(ds_seq *s, ds_finish_reason why);
/* Emits a DS_EV_ERROR as the final event. */
void ds_seq_fail(ds_seq *s, int status, const char *msg);
#endif
