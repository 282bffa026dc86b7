/* deltaserve — the engine: one thread that owns the model, KV cache, adapters and backend, and
 * runs continuous batching. Other threads talk to it only through this API (submit, cancel,
 * stats) and receive results through the event callback.
 *
 * Threading: ds_engine_submit / ds_engine_cancel / ds_engine_stats / adapter calls are safe from
 * any thread. Event callbacks run ON THE ENGINE THREAD: they must be quick and must not call back
 * into the engine except ds_engine_cancel (typically: copy the event into a queue and
 * uv_async_send). */
#ifndef DS_ENGINE_H
#define DS_ENGINE_H

#include "ds/common.h"
#include "ds/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ds_engine ds_engine;

#define DS_MAX_STOP 8
#define DS_MAX_TOP_LOGPROBS 20

typedef struct ds_logit_bias {
    int32_t token;
    float bias;
} ds_logit_bias;

typedef struct ds_sampling_params {
    float temperature;        /* 0 → greedy. default 1 */
    float top_p;              /* (0,1], default 1 */
    int32_t top_k;            /* <= 0 → off */
    float min_p;              /* 0 → off */
    float repetition_penalty; /* 1 → off (HF/vLLM semantics: over prompt + output) */
    float presence_penalty;   /* OpenAI semantics over output tokens */
    float frequency_penalty;
    uint64_t seed;            /* used when has_seed */
    bool has_seed;
    const ds_logit_bias *logit_bias; /* borrowed until submit returns (copied) */
    int32_t n_logit_bias;
} ds_sampling_params;

ds_sampling_params ds_sampling_default_params(void);

typedef enum {
    DS_FINISH_NONE = 0,
    DS_FINISH_STOP,     /* EOS / stop string / stop token */
    DS_FINISH_LENGTH,   /* max_tokens or context end */
    DS_FINISH_CANCEL,   /* client went away / cancel */
    DS_FINISH_ERROR,
} ds_finish_reason;

typedef enum {
    DS_EV_TOKEN = 1,  /* one sampled token (text may be empty while a UTF-8 char is incomplete);
                       * token == -1: trailing text flushed at the end, not a new token */
    DS_EV_DONE,       /* final event of a request: finish reason and usage */
    DS_EV_ERROR,      /* final event: request failed (status, message) */
} ds_event_type;

typedef struct ds_top_logprob {
    int32_t token;
    float logprob;
} ds_top_logprob;

typedef struct ds_gen_event {
    ds_event_type type;
    uint64_t request_id;
    void *user;
    /* DS_EV_TOKEN */
    int32_t token;
    const char *text;        /* new complete UTF-8 text (stop strings already cut); valid during the callback */
    size_t text_len;
    float logprob;           /* log-softmax of the sampled token (before penalties/temperature) */
    float queue_s;           /* first token only: seconds from submit to first scheduling (else 0) */
    int32_t n_top;
    ds_top_logprob top[DS_MAX_TOP_LOGPROBS];
    /* DS_EV_DONE / DS_EV_ERROR */
    ds_finish_reason finish;
    int32_t prompt_tokens;
    int32_t completion_tokens;
    int status;              /* DS_E* for DS_EV_ERROR */
    const char *message;     /* error message, valid during the callback */
} ds_gen_event;

typedef void (*ds_event_cb)(const ds_gen_event *ev);

typedef struct ds_gen_request {
    const int32_t *prompt;   /* copied by submit */
    size_t n_prompt;
    const char *adapter;     /* adapter id, or NULL / "" for the base model */
    const char *adapter_fallback; /* used when `adapter` is not registered (SGLang's "base:adapter"
                              * names both the whole string and the part after the colon): an
                              * adapter id, or "" for the base model. NULL: no fallback */
    int32_t max_tokens;      /* tokens to generate, >= 1; 0 → the rest of the context: what the
                              * context length and the KV cache leave after the prompt and the
                              * adapter's virtual tokens */
    int32_t min_tokens;      /* EOS/stop ignored before this many tokens */
    bool ignore_eos;
    const char *stop[DS_MAX_STOP]; /* stop strings (copied), NULL-terminated list */
    const int32_t *stop_token_ids; /* copied */
    int32_t n_stop_token_ids;
    bool include_stop_str;   /* keep a matched stop string in the text */
    bool skip_special;       /* default true: control tokens produce no text */
    int32_t top_logprobs;    /* -1: no logprobs; 0..20: sampled token logprob + that many alternatives */
    ds_sampling_params sampling;
    ds_event_cb on_event;    /* required */
    void *user;
} ds_gen_request;

ds_gen_request ds_gen_request_default(void);

typedef struct ds_engine_params {
    int32_t max_batch_tokens;   /* tokens per step (prefill chunks + decodes); default 512 */
    int32_t max_seqs;           /* running sequences; default 64 */
    int32_t kv_block_size;      /* tokens per KV block; default 16 */
    size_t kv_cache_bytes;      /* KV pool size; default 256 MiB */
    int32_t max_ctx;            /* 0 → the model's max_ctx */
    int32_t max_queue;          /* waiting requests before submit says DS_EBUSY; default 1024 */
    int32_t n_threads;          /* CPU backend threads; 0 → all cores */
    bool int8_activations;      /* CPU: ds_backend_params.int8_activations; default false */
    const char *backend;        /* "cpu" (default) or "cuda" (ds_backend_create) */
    struct ds_adapter_registry *registry; /* borrowed; NULL → base model only */
    size_t adapter_budget_bytes;/* resident adapter memory on the backend; default 512 MiB */
    int32_t max_adapters;       /* resident adapter slots; default 64 */
} ds_engine_params;

ds_engine_params ds_engine_default_params(void);

/* Creates the engine over a loaded model (borrowed: must outlive the engine) and starts its
 * thread. Returns NULL with a message. */
ds_engine *ds_engine_create(const ds_model *model, const ds_engine_params *params, ds_err *err);

/* Stops the thread: running requests get DS_EV_DONE with DS_FINISH_CANCEL; waits for the thread. */
void ds_engine_free(ds_engine *e);

/* What submit decided for an accepted request. */
typedef struct ds_submit_info {
    char adapter[128];         /* the adapter id it runs with ("" = the base model) */
    uint32_t adapter_version;  /* that adapter's registry version (0 for the base model) */
    int32_t max_tokens;        /* the request's max_tokens, or what 0 resolved to */
} ds_submit_info;

/* Queues a request: resolves its adapter (once; the request holds that version until it ends)
 * and its max_tokens. Returns a request id (> 0) and, when info is not NULL, fills *info; or 0
 * with err set and *status one of: DS_EINVAL (bad params: message says why), DS_ERANGE (the
 * prompt does not fit the context or the KV cache), DS_ENOTFOUND (unknown adapter),
 * DS_EUNSUPPORTED (an adapter that can never fit the adapter budget), DS_EBUSY (queue full).
 * No event is delivered for a refused request. */
uint64_t ds_engine_submit(ds_engine *e, const ds_gen_request *req, ds_submit_info *info, int *status, ds_err *err);

/* Cancels a request (no-op if finished). Its final event is DS_EV_DONE with DS_FINISH_CANCEL,
 * unless it already finished. */
void ds_engine_cancel(ds_engine *e, uint64_t request_id);

/* Bounds (seconds) of the unit-duration histogram of ds_engine_stats. */
#define DS_ENGINE_UNIT_BUCKETS 10
extern const double ds_engine_unit_bounds[DS_ENGINE_UNIT_BUCKETS];

/* Snapshot for /metrics and /health. */
typedef struct ds_engine_stats {
    int32_t n_waiting, n_running;
    int32_t kv_blocks_total, kv_blocks_used, kv_block_size;
    uint64_t kv_blocks_window_freed; /* blocks returned from behind a sliding window (every layer slides) */
    uint64_t n_preemptions;
    uint64_t prompt_tokens_total, generation_tokens_total;
    uint64_t steps;
    int32_t n_adapter_slots, n_adapters_resident;
    size_t adapter_dev_bytes;
    uint64_t adapter_uploads, adapter_evictions;
    /* background work (training units, ds_engine_set_background); seconds on the engine thread */
    uint64_t bg_units, bg_units_busy;  /* units run; of them while requests ran */
    double bg_seconds, bg_busy_seconds; /* time in units; in units run while requests ran */
    double step_seconds;               /* time in inference steps */
    double bg_share;                   /* recent share of the engine's busy time (steps + units run
                                          while requests ran) taken by units, decayed as the budget is */
    float bg_budget;                   /* the --train-budget the share is held to */
    double bg_unit_target;             /* the unit duration asked of the hook now */
    double bg_unit_max;                /* longest unit so far */
    uint64_t bg_unit_hist[DS_ENGINE_UNIT_BUCKETS + 1]; /* units by duration: bucket i counts units
                                          <= ds_engine_unit_bounds[i] and above bucket i-1's bound;
                                          the last counts the rest */
} ds_engine_stats;
void ds_engine_stats_get(ds_engine *e, ds_engine_stats *out);

const ds_model *ds_engine_model(const ds_engine *e);

/* Comma-separated (no spaces) adapter ids of running and of waiting requests, for the Gateway API
 * Inference Extension's vllm:lora_requests_info. Writes NUL-terminated strings (truncated to cap). */
void ds_engine_adapter_activity(ds_engine *e, char *running, size_t running_cap, char *waiting, size_t waiting_cap);

/* Requests submitted and not yet finished (for draining on shutdown). */
int32_t ds_engine_in_flight(ds_engine *e);

/* Background work on the engine thread, between inference steps (training units, so they share
 * the engine's threads instead of competing with them). run(ud) does ONE bounded unit of work
 * (about ds_engine_background_unit_target seconds) and returns true while it has more ready. The
 * engine calls it back to back while no request runs; while requests run, at most once between
 * two inference steps and only while units have taken at most `budget` (0..1] of the engine's
 * recent busy time (steps + units), so an inference step never waits behind more than one unit.
 * Idle-time units do not count against the budget. One hook per engine; set before use, any
 * thread. */
void ds_engine_set_background(ds_engine *e, bool (*run)(void *ud), void *ud, float budget);
/* Tells the engine the hook has work again (any thread). */
void ds_engine_wake_background(ds_engine *e);
/* How long one unit should take (seconds): budget/(1−budget) of the recent mean inference step,
 * so that one unit after every step stays within the budget; at least 25 ms while no request
 * runs (idle time is all training: larger units train faster); within [1 ms, 100 ms]; 10 ms
 * before any step was measured. ENGINE THREAD (from the hook). */
double ds_engine_background_unit_target(const ds_engine *e);

#ifdef __cplusplus
}
#endif
#endif
