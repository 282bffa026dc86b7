/* Prometheus exposition of the server's counters and the engine's gauges. Bucket bounds are
 * vLLM's, so dashboards and SLO queries written for vLLM read ours unchanged.
 *
 * vllm:request_queue_time_seconds: submit → first admission to the running batch, as the engine
 * reports it with the first token. */
#include "server/metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds/adapter.h"
#include "util/strmap.h"

#define MAX_REQ_SERIES 256   /* (endpoint, status) pairs: routes × statuses, bounded by the router */
#define MAX_ADAPTER_SERIES 4096 /* distinct adapter names counted; later names go to "_other" */

typedef struct hist_def {
    const char *name, *help;
    const double *bounds;
    int n;
    bool model_label; /* vLLM series carry model_name */
} hist_def;

static const double B_TTFT[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
static const double B_ITL[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                               0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double B_E2E[] = {0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,   5.0,   10.0,   15.0,  20.0,
                               30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
static const double B_LOAD[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0};
#define NB(a) (int)(sizeof a / sizeof a[0])

static const hist_def HISTS[DS_HIST_COUNT] = {
    [DS_HIST_TTFT] = {"vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", B_TTFT,
                      NB(B_TTFT), true},
    [DS_HIST_ITL] = {"vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", B_ITL,
                     NB(B_ITL), true},
    [DS_HIST_E2E] = {"vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                     B_E2E, NB(B_E2E), true},
    [DS_HIST_QUEUE] = {"vllm:request_queue_time_seconds",
                       "Histogram of time spent waiting in the queue in seconds.",
                       B_E2E, NB(B_E2E), true},
    [DS_HIST_ADAPTER_LOAD] = {"deltaserve_adapter_load_seconds",
                              "Runtime adapter load latency (read, parse, validate) in seconds.", B_LOAD, NB(B_LOAD),
                              false},
};

typedef struct hist {
    uint64_t counts[32]; /* per bucket, not cumulative; [n] is the +Inf overflow */
    uint64_t count;
    double sum;
} hist;

typedef struct req_series {
    char endpoint[64];
    int status;
    uint64_t n;
} req_series;

struct ds_metrics {
    char *model_name;
    req_series reqs[MAX_REQ_SERIES];
    int n_reqs;
    uint64_t finished[DS_FINISH_ERROR + 1];
    uint64_t prompt_tokens, generation_tokens;
    uint64_t loads_ok, loads_err;
    hist hists[DS_HIST_COUNT];
    ds_strmap *adapter_idx; /* name → index into adapter_names / adapter_counts */
    char **adapter_names;
    uint64_t *adapter_counts;
    int32_t n_adapters;
    uint64_t adapter_other;
    char lora_running[2048], lora_waiting[2048];
    double lora_updated; /* unix time the running/waiting sets last changed */
};

ds_metrics *ds_metrics_create(const char *model_name) {
    ds_metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->model_name = strdup(model_name ? model_name : "");
    m->adapter_idx = ds_strmap_create(64);
    m->adapter_names = calloc(MAX_ADAPTER_SERIES, sizeof *m->adapter_names);
    m->adapter_counts = calloc(MAX_ADAPTER_SERIES, sizeof *m->adapter_counts);
    if (!m->model_name || !m->adapter_idx || !m->adapter_names || !m->adapter_counts) {
        ds_metrics_free(m);
        return NULL;
    }
    m->lora_updated = (double)time(NULL);
    return m;
}

void ds_metrics_free(ds_metrics *m) {
    if (!m) return;
    if (m->adapter_names)
        for (int32_t i = 0; i < m->n_adapters; i++) free(m->adapter_names[i]);
    free(m->adapter_names);
    free(m->adapter_counts);
    ds_strmap_free(m->adapter_idx);
    free(m->model_name);
    free(m);
}

void ds_metrics_count_request(ds_metrics *m, const char *endpoint, int status) {
    if (!m) return;
    for (int i = 0; i < m->n_reqs; i++)
        if (m->reqs[i].status == status && !strcmp(m->reqs[i].endpoint, endpoint)) {
            m->reqs[i].n++;
            return;
        }
    if (m->n_reqs == MAX_REQ_SERIES) return; /* cannot happen with a bounded route table */
    req_series *r = &m->reqs[m->n_reqs++];
    snprintf(r->endpoint, sizeof r->endpoint, "%s", endpoint);
    r->status = status;
    r->n = 1;
}

void ds_metrics_generation_done(ds_metrics *m, ds_finish_reason why, int32_t prompt_tokens, int32_t completion_tokens) {
    if (!m) return;
    if (why >= DS_FINISH_NONE && why <= DS_FINISH_ERROR) m->finished[why]++;
    if (prompt_tokens > 0) m->prompt_tokens += (uint64_t)prompt_tokens;
    if (completion_tokens > 0) m->generation_tokens += (uint64_t)completion_tokens;
}

void ds_metrics_observe(ds_metrics *m, ds_metrics_hist h, double seconds) {
    if (!m || h < 0 || h >= DS_HIST_COUNT) return;
    if (!(seconds >= 0)) seconds = 0; /* NaN or a clock step backwards */
    const hist_def *d = &HISTS[h];
    hist *x = &m->hists[h];
    int b = 0;
    while (b < d->n && seconds > d->bounds[b]) b++;
    x->counts[b]++;
    x->count++;
    x->sum += seconds;
}

void ds_metrics_adapter_request(ds_metrics *m, const char *adapter) {
    if (!m || !adapter || !adapter[0]) return;
    int32_t i;
    size_t len = strlen(adapter);
    if (ds_strmap_get(m->adapter_idx, adapter, len, &i)) {
        m->adapter_counts[i]++;
        return;
    }
    char *name = m->n_adapters < MAX_ADAPTER_SERIES ? strdup(adapter) : NULL;
    if (!name || ds_strmap_put(m->adapter_idx, adapter, len, m->n_adapters) != 0) {
        free(name);
        m->adapter_other++;
        return;
    }
    m->adapter_names[m->n_adapters] = name;
    m->adapter_counts[m->n_adapters++] = 1;
}

void ds_metrics_adapter_load(ds_metrics *m, bool ok) {
    if (!m) return;
    if (ok) m->loads_ok++;
    else m->loads_err++;
}

/* ---- rendering ------------------------------------------------------------------------------ */

/* Label value escaping of the text format: backslash, double quote and newline. */
static void label_value(ds_sb *b, const char *v) {
    for (; *v; v++) {
        if (*v == '\\') ds_sb_puts(b, "\\\\");
        else if (*v == '"') ds_sb_puts(b, "\\\"");
        else if (*v == '\n') ds_sb_puts(b, "\\n");
        else ds_sb_append(b, v, 1);
    }
}

static void head(ds_sb *b, const char *name, const char *type, const char *help) {
    ds_sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* `name{model_name="..."} value` for the vLLM series that carry only the model label. */
static void model_sample(ds_sb *b, const ds_metrics *m, const char *name, double v) {
    ds_sb_printf(b, "%s{model_name=\"", name);
    label_value(b, m->model_name);
    ds_sb_printf(b, "\"} %.17g\n", v);
}

static void simple(ds_sb *b, const ds_metrics *m, const char *name, const char *type, const char *help, double v,
                   bool model_label) {
    head(b, name, type, help);
    if (model_label) model_sample(b, m, name, v);
    else ds_sb_printf(b, "%s %.17g\n", name, v);
}

static void render_hist(ds_sb *b, const ds_metrics *m, ds_metrics_hist h) {
    const hist_def *d = &HISTS[h];
    const hist *x = &m->hists[h];
    head(b, d->name, "histogram", d->help);
    ds_sb lbl;
    ds_sb_init(&lbl);
    if (d->model_label) {
        ds_sb_puts(&lbl, "model_name=\"");
        label_value(&lbl, m->model_name);
        ds_sb_puts(&lbl, "\",");
    }
    const char *l = lbl.data ? lbl.data : "";
    uint64_t cum = 0;
    for (int i = 0; i < d->n; i++) {
        cum += x->counts[i];
        ds_sb_printf(b, "%s_bucket{%sle=\"%g\"} %llu\n", d->name, l, d->bounds[i], (unsigned long long)cum);
    }
    ds_sb_printf(b, "%s_bucket{%sle=\"+Inf\"} %llu\n", d->name, l, (unsigned long long)x->count);
    size_t ll = lbl.len;
    if (ll) lbl.data[ll - 1] = '\0'; /* drop the trailing comma for _sum/_count */
    ds_sb_printf(b, "%s_sum%s%s%s %.17g\n", d->name, ll ? "{" : "", ll ? lbl.data : "", ll ? "}" : "", x->sum);
    ds_sb_printf(b, "%s_count%s%s%s %llu\n", d->name, ll ? "{" : "", ll ? lbl.data : "", ll ? "}" : "",
                 (unsigned long long)x->count);
    ds_sb_free(&lbl);
}

static void render_requests(ds_sb *b, const ds_metrics *m) {
    head(b, "deltaserve_requests_total", "counter", "HTTP requests answered, by route and status code.");
    for (int i = 0; i < m->n_reqs; i++) {
        ds_sb_puts(b, "deltaserve_requests_total{endpoint=\"");
        label_value(b, m->reqs[i].endpoint);
        ds_sb_printf(b, "\",status=\"%d\"} %llu\n", m->reqs[i].status, (unsigned long long)m->reqs[i].n);
    }
    head(b, "vllm:request_success_total", "counter", "Count of successfully processed requests (per choice).");
    static const struct { ds_finish_reason r; const char *name; } fr[] = {
        {DS_FINISH_STOP, "stop"}, {DS_FINISH_LENGTH, "length"}, {DS_FINISH_CANCEL, "abort"}};
    for (size_t i = 0; i < sizeof fr / sizeof fr[0]; i++) {
        ds_sb_puts(b, "vllm:request_success_total{model_name=\"");
        label_value(b, m->model_name);
        ds_sb_printf(b, "\",finished_reason=\"%s\"} %llu\n", fr[i].name, (unsigned long long)m->finished[fr[i].r]);
    }
    simple(b, m, "deltaserve_request_errors_total", "counter", "Generations that ended with an engine error.",
           (double)m->finished[DS_FINISH_ERROR], false);
    simple(b, m, "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed (from usage).",
           (double)m->prompt_tokens, true);
    simple(b, m, "vllm:generation_tokens_total", "counter", "Number of generation tokens processed (from usage).",
           (double)m->generation_tokens, true);
}

/* Co-serving (ds_engine_set_background): the share training units actually took of the engine's
 * busy time, against --train-budget, and how long units were. */
static void render_train(ds_sb *b, const ds_metrics *m, const ds_engine_stats *st) {
    simple(b, m, "deltaserve_train_budget", "gauge", "Share of the engine's busy time training may take (--train-budget).",
           st->bg_budget, false);
    simple(b, m, "deltaserve_train_share", "gauge",
           "Recent share of the engine's busy time (inference steps + training units while requests run) taken by "
           "training units.",
           st->bg_share, false);
    simple(b, m, "deltaserve_train_busy_seconds_total", "counter",
           "Seconds of training units run while requests were running.", st->bg_busy_seconds, false);
    simple(b, m, "deltaserve_engine_step_seconds_total", "counter", "Seconds of inference steps.", st->step_seconds,
           false);
    simple(b, m, "deltaserve_train_units_total", "counter", "Training units run on the engine thread (all).",
           (double)st->bg_units, false);
    simple(b, m, "deltaserve_train_units_busy_total", "counter", "Training units run while requests were running.",
           (double)st->bg_units_busy, false);
    simple(b, m, "deltaserve_train_unit_target_seconds", "gauge", "Duration asked of one training unit now.",
           st->bg_unit_target, false);
    simple(b, m, "deltaserve_train_unit_max_seconds", "gauge", "Longest training unit so far.", st->bg_unit_max,
           false);
    head(b, "deltaserve_train_unit_seconds", "histogram", "Duration of training units in seconds.");
    uint64_t cum = 0;
    for (int i = 0; i < DS_ENGINE_UNIT_BUCKETS; i++) {
        cum += st->bg_unit_hist[i];
        ds_sb_printf(b, "deltaserve_train_unit_seconds_bucket{le=\"%g\"} %llu\n", ds_engine_unit_bounds[i],
                     (unsigned long long)cum);
    }
    ds_sb_printf(b, "deltaserve_train_unit_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)st->bg_units);
    ds_sb_printf(b, "deltaserve_train_unit_seconds_sum %.17g\n", st->bg_seconds);
    ds_sb_printf(b, "deltaserve_train_unit_seconds_count %llu\n", (unsigned long long)st->bg_units);
}

static void render_engine(ds_sb *b, const ds_metrics *m, const ds_engine_stats *st) {
    simple(b, m, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           st->n_running, true);
    simple(b, m, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", st->n_waiting,
           true);
    double usage = st->kv_blocks_total > 0 ? (double)st->kv_blocks_used / st->kv_blocks_total : 0.0;
    simple(b, m, "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage, true);
    head(b, "vllm:cache_config_info", "gauge", "Information of the KV cache configuration.");
    ds_sb_printf(b, "vllm:cache_config_info{block_size=\"%d\",num_gpu_blocks=\"%d\"} 1\n", st->kv_block_size,
                 st->kv_blocks_total);
    simple(b, m, "vllm:num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.",
           (double)st->n_preemptions, true);
    simple(b, m, "deltaserve_kv_blocks_used", "gauge", "KV-cache blocks held by sequences.", st->kv_blocks_used, false);
    simple(b, m, "deltaserve_kv_blocks_window_freed_total", "counter",
           "KV-cache blocks returned to the pool from behind a sliding window (models whose every layer slides).",
           (double)st->kv_blocks_window_freed, false);
    simple(b, m, "deltaserve_engine_steps_total", "counter", "Engine steps (forward passes) run.", (double)st->steps,
           false);
    simple(b, m, "deltaserve_adapter_resident", "gauge", "Adapters resident on the backend (in slots).",
           st->n_adapters_resident, false);
    simple(b, m, "deltaserve_adapter_slots", "gauge", "Resident adapter slots.", st->n_adapter_slots, false);
    simple(b, m, "deltaserve_adapter_device_bytes", "gauge", "Backend memory held by resident adapters.",
           (double)st->adapter_dev_bytes, false);
    simple(b, m, "deltaserve_adapter_uploads_total", "counter", "Adapter uploads to the backend.",
           (double)st->adapter_uploads, false);
    simple(b, m, "deltaserve_adapter_evictions_total", "counter", "Idle adapters evicted from the backend (LRU).",
           (double)st->adapter_evictions, false);
    render_train(b, m, st);
}

/* vllm:lora_requests_info: the value is the unix time the label set last changed (the Gateway
 * API Inference Extension keeps the series with the newest value). */
static void render_lora_info(ds_sb *b, ds_metrics *m, ds_engine *e, int32_t max_lora) {
    char run[sizeof m->lora_running], wait[sizeof m->lora_waiting];
    run[0] = wait[0] = '\0';
    if (e) ds_engine_adapter_activity(e, run, sizeof run, wait, sizeof wait);
    if (strcmp(run, m->lora_running) || strcmp(wait, m->lora_waiting)) {
        memcpy(m->lora_running, run, sizeof run);
        memcpy(m->lora_waiting, wait, sizeof wait);
        m->lora_updated = (double)time(NULL);
    }
    head(b, "vllm:lora_requests_info", "gauge", "Running stats on lora requests.");
    ds_sb_printf(b, "vllm:lora_requests_info{max_lora=\"%d\",running_lora_adapters=\"", max_lora);
    label_value(b, run);
    ds_sb_puts(b, "\",waiting_lora_adapters=\"");
    label_value(b, wait);
    ds_sb_printf(b, "\"} %.1f\n", m->lora_updated);
}

static void render_adapters(ds_sb *b, const ds_metrics *m, struct ds_adapter_registry *reg) {
    ds_adapter_info *info = NULL;
    size_t n = 0;
    if (reg && ds_registry_list(reg, &info, &n) != DS_OK) n = 0;
    simple(b, m, "deltaserve_adapters_loaded", "gauge", "Adapters registered (current versions).", (double)n, false);
    simple(b, m, "deltaserve_adapter_host_bytes", "gauge", "Host memory held by adapters (incl. draining versions).",
           reg ? (double)ds_registry_host_bytes(reg) : 0.0, false);
    head(b, "deltaserve_adapter_version", "gauge", "Current version of each registered adapter.");
    for (size_t i = 0; i < n; i++) {
        ds_sb_puts(b, "deltaserve_adapter_version{adapter=\"");
        label_value(b, info[i].name);
        ds_sb_puts(b, "\",peft_type=\"");
        label_value(b, info[i].peft_type);
        ds_sb_printf(b, "\"} %u\n", info[i].version);
    }
    free(info);
    head(b, "deltaserve_adapter_requests_total", "counter", "Generations submitted per adapter.");
    for (int32_t i = 0; i < m->n_adapters; i++) {
        ds_sb_puts(b, "deltaserve_adapter_requests_total{adapter=\"");
        label_value(b, m->adapter_names[i]);
        ds_sb_printf(b, "\"} %llu\n", (unsigned long long)m->adapter_counts[i]);
    }
    if (m->adapter_other)
        ds_sb_printf(b, "deltaserve_adapter_requests_total{adapter=\"_other\"} %llu\n",
                     (unsigned long long)m->adapter_other);
    head(b, "deltaserve_adapter_loads_total", "counter", "Runtime adapter loads by result.");
    ds_sb_printf(b, "deltaserve_adapter_loads_total{result=\"ok\"} %llu\n", (unsigned long long)m->loads_ok);
    ds_sb_printf(b, "deltaserve_adapter_loads_total{result=\"error\"} %llu\n", (unsigned long long)m->loads_err);
}

void ds_metrics_render(ds_metrics *m, const ds_metrics_sources *src, ds_sb *out) {
    ds_engine_stats st;
    memset(&st, 0, sizeof st);
    if (src && src->engine) ds_engine_stats_get(src->engine, &st);
    render_requests(out, m);
    render_engine(out, m, &st);
    render_lora_info(out, m, src ? src->engine : NULL, src ? src->max_lora : 0);
    render_adapters(out, m, src ? src->registry : NULL);
    for (int h = 0; h < DS_HIST_COUNT; h++) render_hist(out, m, (ds_metrics_hist)h);
}
