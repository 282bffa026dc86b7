/* deltaserve — /metrics: the server's counters and histograms, rendered as Prometheus text 0.0.4
 * together with a snapshot of the engine's gauges (the list: README.md "Health and metrics").
 *
 * Names follow vLLM where a router (Gateway API Inference Extension) or a dashboard expects them
 * (vllm:num_requests_waiting, vllm:kv_cache_usage_perc, vllm:lora_requests_info, ...); what only
 * deltaserve has is called deltaserve_*.
 *
 * Threading: LOOP THREAD ONLY. Token events already arrive there, so the counters need no locks;
 * the engine's own numbers are read through ds_engine_stats_get (which locks) at render time. */
#ifndef DS_SERVER_METRICS_H
#define DS_SERVER_METRICS_H

#include "ds/engine.h"
#include "util/sb.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ds_adapter_registry;
typedef struct ds_metrics ds_metrics;

typedef enum {
    DS_HIST_TTFT = 0,     /* vllm:time_to_first_token_seconds: arrival → first token */
    DS_HIST_ITL,          /* vllm:inter_token_latency_seconds: gap between two tokens of a choice */
    DS_HIST_E2E,          /* vllm:e2e_request_latency_seconds: arrival → final event */
    DS_HIST_QUEUE,        /* vllm:request_queue_time_seconds (see metrics.c for what is measured) */
    DS_HIST_ADAPTER_LOAD, /* deltaserve_adapter_load_seconds: runtime adapter loads (parse+validate) */
    DS_HIST_COUNT
} ds_metrics_hist;

/* `model_name` (copied) is the label vLLM puts on its series. Returns NULL when out of memory. */
ds_metrics *ds_metrics_create(const char *model_name);
void ds_metrics_free(ds_metrics *m);

/* deltaserve_requests_total{endpoint,status}: one answered HTTP request. `endpoint` should be a
 * route pattern (bounded set), not a raw path. */
void ds_metrics_count_request(ds_metrics *m, const char *endpoint, int status);

/* One finished generation (one choice): vllm:request_success_total{finished_reason} and the
 * prompt / generation token counters (from the engine's usage). */
void ds_metrics_generation_done(ds_metrics *m, ds_finish_reason why, int32_t prompt_tokens,
                                int32_t completion_tokens);

void ds_metrics_observe(ds_metrics *m, ds_metrics_hist h, double seconds);

/* deltaserve_adapter_requests_total{adapter}: a generation submitted for `adapter`. */
void ds_metrics_adapter_request(ds_metrics *m, const char *adapter);

/* deltaserve_adapter_loads_total{result="ok"|"error"} */
void ds_metrics_adapter_load(ds_metrics *m, bool ok);

/* What the render reads besides the counters (all may be NULL / 0). */
typedef struct ds_metrics_sources {
    ds_engine *engine;
    struct ds_adapter_registry *registry;
    int32_t max_lora;  /* resident adapter slots (the engine's max_adapters) */
} ds_metrics_sources;

/* Appends the whole exposition (every metric with # HELP and # TYPE once). */
void ds_metrics_render(ds_metrics *m, const ds_metrics_sources *src, ds_sb *out);

#ifdef __cplusplus
}
#endif
#endif
