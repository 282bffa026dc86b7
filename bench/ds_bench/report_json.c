/* The --json result (vLLM-compatible keys) and the --sweep summary. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "report.h"

static void pct_key(double q, const char *metric, char *out, size_t n) {
    if (q == floor(q))
        snprintf(out, n, "p%d_%s_ms", (int)q, metric);
    else
        snprintf(out, n, "p%g_%s_ms", q, metric);
}

static bool add_summary(cJSON *o, const char *metric, const dsb_summary *s, const dsb_params *p) {
    char k[64];
    bool ok = true;
    snprintf(k, sizeof(k), "mean_%s_ms", metric);
    ok = ok && cJSON_AddNumberToObject(o, k, s->mean);
    snprintf(k, sizeof(k), "median_%s_ms", metric);
    ok = ok && cJSON_AddNumberToObject(o, k, s->median);
    snprintf(k, sizeof(k), "std_%s_ms", metric);
    ok = ok && cJSON_AddNumberToObject(o, k, s->std);
    for (int i = 0; ok && i < p->n_percentiles; i++) {
        pct_key(p->percentiles[i], metric, k, sizeof(k));
        ok = cJSON_AddNumberToObject(o, k, s->pct[i]) != NULL;
    }
    return ok;
}

/* The aggregate keys shared by the run object and each per-adapter object. */
static bool add_metrics(cJSON *o, const dsb_metrics *m, const dsb_params *p) {
    bool ok = cJSON_AddNumberToObject(o, "duration", m->duration_s) &&
              cJSON_AddNumberToObject(o, "completed", (double)m->completed) &&
              cJSON_AddNumberToObject(o, "failed", (double)m->failed) &&
              cJSON_AddNumberToObject(o, "total_input_tokens", (double)m->total_input) &&
              cJSON_AddNumberToObject(o, "total_output_tokens", (double)m->total_output) &&
              cJSON_AddNumberToObject(o, "request_throughput", m->request_throughput) &&
              (dsb_params_has_slo(p) ? cJSON_AddNumberToObject(o, "request_goodput", m->request_goodput)
                                     : cJSON_AddNullToObject(o, "request_goodput")) &&
              cJSON_AddNumberToObject(o, "output_throughput", m->output_throughput) &&
              cJSON_AddNumberToObject(o, "total_token_throughput", m->total_token_throughput);
    return ok && add_summary(o, "ttft", &m->ttft, p) && add_summary(o, "tpot", &m->tpot, p) &&
           add_summary(o, "itl", &m->itl, p) && add_summary(o, "e2el", &m->e2el, p);
}

/* Per-request arrays, in send order, failed requests included (as vLLM: 0 / [] / ""). */
static bool add_arrays(cJSON *o, const dsb_run *run, const dsb_workload *w) {
    cJSON *in = cJSON_AddArrayToObject(o, "input_lens"), *out = cJSON_AddArrayToObject(o, "output_lens");
    cJSON *ttft = cJSON_AddArrayToObject(o, "ttfts"), *itls = cJSON_AddArrayToObject(o, "itls");
    cJSON *lat = cJSON_AddArrayToObject(o, "latencies"), *err = cJSON_AddArrayToObject(o, "errors");
    cJSON *ad = cJSON_AddArrayToObject(o, "adapters"), *st = cJSON_AddArrayToObject(o, "start_times");
    if (!in || !out || !ttft || !itls || !lat || !err || !ad || !st) return false;
    for (size_t i = 0; i < run->n; i++) {
        const dsb_result *r = &run->r[i];
        cJSON *gaps = cJSON_CreateArray();
        if (!gaps) return false;
        for (size_t k = 0; k < r->n_itl; k++) cJSON_AddItemToArray(gaps, cJSON_CreateNumber(r->itl_s[k]));
        cJSON_AddItemToArray(itls, gaps);
        cJSON_AddItemToArray(in, cJSON_CreateNumber(r->prompt_tokens));
        cJSON_AddItemToArray(out, cJSON_CreateNumber(r->output_tokens));
        cJSON_AddItemToArray(ttft, cJSON_CreateNumber(r->ttft_s));
        cJSON_AddItemToArray(lat, cJSON_CreateNumber(r->latency_s));
        cJSON_AddItemToArray(err, cJSON_CreateString(r->error ? r->error : ""));
        cJSON_AddItemToArray(ad, cJSON_CreateString(dsb_workload_adapter_name(w, r->adapter)));
        cJSON_AddItemToArray(st, cJSON_CreateNumber(r->start_s));
    }
    return true;
}

static bool add_per_adapter(cJSON *o, const dsb_run *run, const dsb_workload *w, const dsb_params *p) {
    cJSON *pa = cJSON_AddObjectToObject(o, "per_adapter");
    if (!pa) return false;
    for (int a = DSB_BASE; a < w->n_adapters; a++) {
        bool used = false;
        for (size_t i = 0; i < run->n && !used; i++) used = run->r[i].adapter == a;
        if (!used) continue;
        dsb_metrics m;
        cJSON *x = cJSON_CreateObject();
        if (!x || dsb_metrics_compute(run, a, p, &m) != 0 || !add_metrics(x, &m, p)) {
            cJSON_Delete(x);
            return false;
        }
        cJSON_AddBoolToObject(x, "is_base", a == DSB_BASE);
        /* Two entries cannot share a key: a base model named like an adapter gets a suffix. */
        const char *name = dsb_workload_adapter_name(w, a);
        char key[300];
        snprintf(key, sizeof(key), "%s%s", name, cJSON_GetObjectItemCaseSensitive(pa, name) ? " (base)" : "");
        cJSON_AddItemToObject(pa, key, x);
    }
    return true;
}

static bool add_config(cJSON *o, const dsb_run *run, const dsb_workload *w, const dsb_params *p) {
    char date[32];
    time_t now = time(NULL);
    struct tm tm;
    strftime(date, sizeof(date), "%Y%m%d-%H%M%S", localtime_r(&now, &tm));
    bool ok = cJSON_AddStringToObject(o, "date", date) &&
              cJSON_AddStringToObject(o, "backend", p->endpoint == DSB_EP_CHAT ? "openai-chat" : "openai") &&
              cJSON_AddStringToObject(o, "model_id", w->model ? w->model : "") &&
              cJSON_AddStringToObject(o, "base_url", p->url);
    if (ok && isinf(run->offered_rate)) ok = cJSON_AddStringToObject(o, "request_rate", "inf") != NULL;
    else if (ok) ok = cJSON_AddNumberToObject(o, "request_rate", run->offered_rate) != NULL;
    ok = ok && cJSON_AddNumberToObject(o, "burstiness", p->burstiness);
    ok = ok && (p->max_concurrency > 0 ? cJSON_AddNumberToObject(o, "max_concurrency", p->max_concurrency)
                                       : cJSON_AddNullToObject(o, "max_concurrency"));
    ok = ok && cJSON_AddNumberToObject(o, "num_prompts", (double)run->n) &&
         cJSON_AddNumberToObject(o, "seed", (double)p->seed) &&
         cJSON_AddNumberToObject(o, "num_adapters", w->n_adapters) &&
         cJSON_AddStringToObject(o, "adapter_dist", p->traffic_split ? "split" : p->adapter_dist) &&
         cJSON_AddNumberToObject(o, "base_fraction", p->base_fraction) &&
         cJSON_AddBoolToObject(o, "interrupted", run->interrupted) &&
         cJSON_AddNumberToObject(o, "cancelled", (double)run->cancelled) &&
         cJSON_AddNumberToObject(o, "connections", (double)run->connections);
    return ok;
}

cJSON *dsb_report_json(const dsb_run *run, const dsb_workload *w, const dsb_params *p) {
    dsb_metrics m;
    cJSON *o = cJSON_CreateObject();
    if (!o || dsb_metrics_compute(run, DSB_ALL_ADAPTERS, p, &m) != 0 || !add_config(o, run, w, p) ||
        !add_metrics(o, &m, p) || !add_arrays(o, run, w) || !add_per_adapter(o, run, w, p)) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

int dsb_report_write(const char *path, const cJSON *doc, char *err, size_t errlen) {
    char *s = cJSON_Print(doc);
    if (!s) return snprintf(err, errlen, "out of memory printing JSON"), -1;
    FILE *f = fopen(path, "w");
    int rc = 0;
    if (!f || fputs(s, f) < 0 || fputc('\n', f) == EOF) rc = -1;
    if (f && fclose(f) != 0) rc = -1;
    if (rc != 0) snprintf(err, errlen, "%s: %s", path, strerror(errno));
    free(s);
    return rc;
}

/* ---- Sweep --------------------------------------------------------------------------------- */

static bool keeps_up(const dsb_sweep_row *r, const dsb_params *p) {
    if (r->m.completed == 0) return false;
    /* Closed-loop rows (rate inf) have no offered rate to compare with: only the SLO counts. */
    if (!isinf(r->rate) && r->m.request_throughput < 0.9 * r->rate) return false;
    if (dsb_params_has_slo(p) && (double)r->m.good < 0.9 * (double)r->m.completed) return false;
    if (r->m.failed > r->n / 10) return false;
    return true;
}

int dsb_sweep_knee(const dsb_sweep_row *rows, int n, const dsb_params *p) {
    int knee = -1;
    for (int i = 0; i < n; i++) {
        if (!keeps_up(&rows[i], p)) break; /* rates are swept in increasing order */
        knee = i;
    }
    return knee;
}

void dsb_report_sweep_print(FILE *f, const dsb_sweep_row *rows, int n, const dsb_params *p) {
    bool slo = dsb_params_has_slo(p);
    fprintf(f, "===================================================== Sweep ======================================================\n");
    fprintf(f, "%9s %9s %6s %10s %10s %10s %10s %10s %10s %10s %7s\n", "rate", "req/s", "fail", "out tok/s",
            "TTFT avg", "TTFT p99", "TPOT avg", "TPOT p99", "E2EL avg", "goodput", "SLO ok");
    int best = -1;
    for (int i = 0; i < n; i++) {
        const dsb_metrics *m = &rows[i].m;
        const double p99 = m->ttft.pct[p->n_percentiles - 1], tp99 = m->tpot.pct[p->n_percentiles - 1];
        char rate[16], good[16] = "-", att[16] = "-";
        snprintf(rate, sizeof(rate), isinf(rows[i].rate) ? "inf" : "%.2f", rows[i].rate);
        if (slo) {
            snprintf(good, sizeof(good), "%.2f", m->request_goodput);
            snprintf(att, sizeof(att), "%.0f%%", m->completed ? 100.0 * (double)m->good / (double)m->completed : 0.0);
            if (best < 0 || m->request_goodput > rows[best].m.request_goodput) best = i;
        }
        fprintf(f, "%9s %9.2f %6zu %10.1f %10.2f %10.2f %10.2f %10.2f %10.2f %10s %7s\n", rate,
                m->request_throughput, m->failed, m->output_throughput, m->ttft.mean, p99, m->tpot.mean, tp99,
                m->e2el.mean, good, att);
    }
    fprintf(f, "(times in ms; p99 column = the last of --percentiles)\n");
    int knee = dsb_sweep_knee(rows, n, p);
    if (knee >= 0)
        fprintf(f, "Knee: %.2f req/s — the highest swept rate served at >= 90%% of the offered rate%s%s.\n",
                rows[knee].rate, slo ? " with >= 90% of requests within the SLO" : "",
                knee == n - 1 ? " (the last one: sweep higher rates to find where it bends)" : "");
    else
        fprintf(f, "Knee: below the lowest swept rate (the server did not keep up at any rate).\n");
    if (best >= 0)
        fprintf(f, "Max goodput: %.2f req/s at rate %.2f.\n", rows[best].m.request_goodput, rows[best].rate);
}
