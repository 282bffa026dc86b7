#include "report.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double dsb_result_tpot(const dsb_result *r) {
    if (!r->ok || r->output_tokens < 2) return 0.0;
    return (r->latency_s - r->ttft_s) / (double)(r->output_tokens - 1);
}

static bool meets_slo(const dsb_result *r, const dsb_params *p) {
    if (p->slo_ttft_ms > 0 && r->ttft_s * 1e3 > p->slo_ttft_ms) return false;
    if (p->slo_tpot_ms > 0 && dsb_result_tpot(r) * 1e3 > p->slo_tpot_ms) return false;
    if (p->slo_e2el_ms > 0 && r->latency_s * 1e3 > p->slo_e2el_ms) return false;
    return true;
}

typedef struct samples {
    dsb_vec ttft, tpot, itl, e2el;
} samples;

static int collect(const dsb_run *run, int adapter, const dsb_params *p, dsb_metrics *m, samples *s) {
    for (size_t i = 0; i < run->n; i++) {
        const dsb_result *r = &run->r[i];
        if (adapter != DSB_ALL_ADAPTERS && r->adapter != adapter) continue;
        if (!r->ok) {
            m->failed++;
            continue;
        }
        m->completed++;
        m->total_input += r->prompt_tokens;
        m->total_output += r->output_tokens;
        if (dsb_params_has_slo(p) && meets_slo(r, p)) m->good++;
        int rc = dsb_vec_push(&s->ttft, r->ttft_s * 1e3) | dsb_vec_push(&s->e2el, r->latency_s * 1e3);
        if (r->output_tokens > 1) rc |= dsb_vec_push(&s->tpot, dsb_result_tpot(r) * 1e3);
        for (size_t k = 0; k < r->n_itl; k++) rc |= dsb_vec_push(&s->itl, r->itl_s[k] * 1e3);
        if (rc != 0) return -1;
    }
    return 0;
}

int dsb_metrics_compute(const dsb_run *run, int adapter, const dsb_params *p, dsb_metrics *m) {
    memset(m, 0, sizeof(*m));
    samples s;
    memset(&s, 0, sizeof(s));
    int rc = collect(run, adapter, p, m, &s);
    double d = run->duration_s;
    m->duration_s = d;
    if (d > 0) {
        m->request_throughput = (double)m->completed / d;
        m->output_throughput = (double)m->total_output / d;
        m->total_token_throughput = (double)(m->total_input + m->total_output) / d;
        m->request_goodput = (double)m->good / d;
    }
    dsb_summarize(s.ttft.v, s.ttft.n, p->percentiles, p->n_percentiles, &m->ttft);
    dsb_summarize(s.tpot.v, s.tpot.n, p->percentiles, p->n_percentiles, &m->tpot);
    dsb_summarize(s.itl.v, s.itl.n, p->percentiles, p->n_percentiles, &m->itl);
    dsb_summarize(s.e2el.v, s.e2el.n, p->percentiles, p->n_percentiles, &m->e2el);
    dsb_vec_free(&s.ttft);
    dsb_vec_free(&s.tpot);
    dsb_vec_free(&s.itl);
    dsb_vec_free(&s.e2el);
    return rc;
}

/* "p99", "p99.9": vLLM's naming (integer percentiles without a decimal point). */
static void pct_name(double q, char *out, size_t n) {
    if (q == floor(q))
        snprintf(out, n, "p%d", (int)q);
    else
        snprintf(out, n, "p%g", q);
}

/* ---- Terminal ------------------------------------------------------------------------------ */

static void line_kv(FILE *f, const char *k, const char *fmt, double v) {
    char buf[64];
    snprintf(buf, sizeof(buf), fmt, v);
    fprintf(f, "%-40s %-10s\n", k, buf);
}

static void print_metric(FILE *f, const char *header, const char *name, const dsb_summary *s, const dsb_params *p) {
    char k[64];
    int pad = (50 - (int)strlen(header)) / 2;
    fprintf(f, "%.*s%s%.*s\n", pad, "-------------------------", header,
            50 - pad - (int)strlen(header), "-------------------------");
    snprintf(k, sizeof(k), "Mean %s (ms):", name);
    line_kv(f, k, "%.2f", s->mean);
    snprintf(k, sizeof(k), "Median %s (ms):", name);
    line_kv(f, k, "%.2f", s->median);
    for (int i = 0; i < p->n_percentiles; i++) {
        char pn[16];
        pct_name(p->percentiles[i], pn, sizeof(pn));
        pn[0] = 'P';
        snprintf(k, sizeof(k), "%s %s (ms):", pn, name);
        line_kv(f, k, "%.2f", s->pct[i]);
    }
}

static void print_main(FILE *f, const dsb_run *run, const dsb_metrics *m, const dsb_params *p) {
    fprintf(f, "============ Serving Benchmark Result ============\n");
    line_kv(f, "Successful requests:", "%.0f", (double)m->completed);
    line_kv(f, "Failed requests:", "%.0f", (double)m->failed);
    if (run->interrupted) line_kv(f, "Cancelled (interrupted) requests:", "%.0f", (double)run->cancelled);
    if (isinf(run->offered_rate))
        fprintf(f, "%-40s %-10s\n", "Request rate configured (RPS):", "inf");
    else
        line_kv(f, "Request rate configured (RPS):", "%.2f", run->offered_rate);
    line_kv(f, "Benchmark duration (s):", "%.2f", m->duration_s);
    line_kv(f, "Total input tokens:", "%.0f", (double)m->total_input);
    line_kv(f, "Total generated tokens:", "%.0f", (double)m->total_output);
    line_kv(f, "Request throughput (req/s):", "%.2f", m->request_throughput);
    if (dsb_params_has_slo(p)) line_kv(f, "Request goodput (req/s):", "%.2f", m->request_goodput);
    line_kv(f, "Output token throughput (tok/s):", "%.2f", m->output_throughput);
    line_kv(f, "Total Token throughput (tok/s):", "%.2f", m->total_token_throughput);
    print_metric(f, "Time to First Token", "TTFT", &m->ttft, p);
    print_metric(f, "Time per Output Token (excl. 1st token)", "TPOT", &m->tpot, p);
    print_metric(f, "Inter-token Latency", "ITL", &m->itl, p);
    print_metric(f, "End-to-end Latency", "E2EL", &m->e2el, p);
    fprintf(f, "==================================================\n");
}

typedef struct arow {
    int adapter;
    size_t n;
} arow;

static int cmp_arow(const void *a, const void *b) {
    const arow *x = a, *y = b;
    if (x->n != y->n) return x->n < y->n ? 1 : -1;
    return (x->adapter > y->adapter) - (x->adapter < y->adapter);
}

/* Requests per adapter (index a+1, slot 0 for the base), sorted by traffic; caller frees. */
static arow *adapter_rows(const dsb_run *run, const dsb_workload *w, int *n_rows) {
    int n = w->n_adapters + 1;
    arow *rows = calloc((size_t)n, sizeof(arow));
    if (!rows) return NULL;
    for (int i = 0; i < n; i++) rows[i].adapter = i - 1;
    for (size_t i = 0; i < run->n; i++) {
        int a = run->r[i].adapter;
        if (a >= DSB_BASE && a < w->n_adapters) rows[a + 1].n++;
    }
    qsort(rows, (size_t)n, sizeof(arow), cmp_arow);
    while (n > 0 && rows[n - 1].n == 0) n--;
    *n_rows = n;
    return rows;
}

static void print_adapters(FILE *f, const dsb_run *run, const dsb_workload *w, const dsb_params *p) {
    int n = 0;
    arow *rows = adapter_rows(run, w, &n);
    if (!rows || n == 0 || (n == 1 && rows[0].adapter == DSB_BASE)) {
        free(rows);
        return;
    }
    fprintf(f, "---------------------------------------------------- Per adapter -----------------------------------------------------\n");
    fprintf(f, "%-24s %6s %6s %5s %9s %9s %9s %9s %9s %9s %9s\n", "adapter", "share", "ok", "fail", "in tok",
            "out tok", "TTFT avg", "TTFT p99", "TPOT avg", "TPOT p99", "E2EL avg");
    int shown = n < p->max_adapter_rows ? n : p->max_adapter_rows;
    double p99[1] = {99.0};
    dsb_params q = *p;
    memcpy(q.percentiles, p99, sizeof(p99));
    q.n_percentiles = 1;
    for (int i = 0; i < shown; i++) {
        dsb_metrics m;
        if (dsb_metrics_compute(run, rows[i].adapter, &q, &m) != 0) break;
        fprintf(f, "%-24.24s %5.1f%% %6zu %5zu %9lld %9lld %9.2f %9.2f %9.2f %9.2f %9.2f\n",
                dsb_workload_adapter_name(w, rows[i].adapter), 100.0 * (double)rows[i].n / (double)run->n,
                m.completed, m.failed, m.total_input, m.total_output, m.ttft.mean, m.ttft.pct[0], m.tpot.mean,
                m.tpot.pct[0], m.e2el.mean);
    }
    if (shown < n) fprintf(f, "... %d more adapters (all of them are in --json)\n", n - shown);
    fprintf(f, "(times in ms; share = fraction of requests sent)\n");
    free(rows);
}

typedef struct err_count {
    const char *msg;
    size_t n;
} err_count;

static int cmp_err(const void *a, const void *b) {
    const err_count *x = a, *y = b;
    return (x->n < y->n) - (x->n > y->n);
}

static void print_errors(FILE *f, const dsb_run *run) {
    err_count e[64];
    int ne = 0;
    size_t other = 0;
    for (size_t i = 0; i < run->n; i++) {
        const char *msg = run->r[i].error;
        if (!msg) continue;
        int k = 0;
        while (k < ne && strcmp(e[k].msg, msg) != 0) k++;
        if (k < ne) e[k].n++;
        else if (ne < 64) e[ne++] = (err_count){msg, 1};
        else other++;
    }
    if (ne == 0) return;
    qsort(e, (size_t)ne, sizeof(err_count), cmp_err);
    fprintf(f, "Errors (most frequent first):\n");
    for (int k = 0; k < ne && k < 8; k++) fprintf(f, "  %6zu x %.100s\n", e[k].n, e[k].msg);
    if (ne > 8 || other) fprintf(f, "  ... and more distinct errors (see --json)\n");
}

void dsb_report_print(FILE *f, const dsb_run *run, const dsb_workload *w, const dsb_params *p) {
    dsb_metrics m;
    if (dsb_metrics_compute(run, DSB_ALL_ADAPTERS, p, &m) != 0) {
        fprintf(f, "ds-bench: out of memory computing the summary\n");
        return;
    }
    print_main(f, run, &m, p);
    print_adapters(f, run, w, p);
    print_errors(f, run);
    fflush(f);
}
