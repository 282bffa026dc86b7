/* ds-bench: multi-adapter load generator for OpenAI-compatible servers. See bench/README.md. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "cli.h"
#include "report.h"
#include "runner.h"
#include "workload.h"

static void print_config(const dsb_params *p, const dsb_workload *w, double rate) {
    char r[32];
    snprintf(r, sizeof(r), isinf(rate) ? "inf" : "%.2f", rate);
    printf("Target: %s (%s)  model: %s  adapters: %d (%s)  base fraction: %.2f\n", p->url,
           p->endpoint == DSB_EP_CHAT ? "chat" : "completions", w->model ? w->model : "-", w->n_adapters,
           p->traffic_split ? "split" : p->adapter_dist, p->base_fraction);
    printf("Traffic request rate: %s  burstiness: %g%s  max concurrency: %d  seed: %llu\n", r, p->burstiness,
           p->burstiness == 1.0 ? " (Poisson)" : "", p->max_concurrency, (unsigned long long)p->seed);
    fflush(stdout);
}

static int write_json(const dsb_params *p, cJSON *doc) {
    char err[512];
    if (!doc) {
        fprintf(stderr, "ds-bench: out of memory building JSON\n");
        return -1;
    }
    int rc = dsb_report_write(p->json_path, doc, err, sizeof(err));
    if (rc != 0) fprintf(stderr, "ds-bench: %s\n", err);
    cJSON_Delete(doc);
    return rc;
}

/* One run at `rate`: summary on stdout, its JSON object appended to `runs` when given. */
static int run_once(uv_loop_t *loop, const dsb_params *p, dsb_workload *w, double rate, dsb_run *run) {
    char err[512];
    print_config(p, w, rate);
    if (dsb_run_benchmark(loop, p, w, rate, run, err, sizeof(err)) != 0) {
        fprintf(stderr, "ds-bench: %s\n", err);
        return -1;
    }
    dsb_report_print(stdout, run, w, p);
    return 0;
}

static int run_single(uv_loop_t *loop, const dsb_params *p, dsb_workload *w, bool *interrupted) {
    dsb_run run;
    if (run_once(loop, p, w, p->request_rate, &run) != 0) return -1;
    *interrupted = run.interrupted;
    int rc = p->json_path ? write_json(p, dsb_report_json(&run, w, p)) : 0;
    dsb_run_free(&run);
    return rc;
}

static int run_sweep(uv_loop_t *loop, const dsb_params *p, dsb_workload *w, bool *interrupted) {
    dsb_sweep_row rows[DSB_MAX_SWEEP];
    cJSON *doc = p->json_path ? cJSON_CreateObject() : NULL;
    cJSON *arr = doc ? cJSON_AddArrayToObject(doc, "sweep") : NULL;
    int n = 0, rc = 0;
    for (int i = 0; i < p->n_sweep && !*interrupted; i++) {
        dsb_run run;
        printf("\n### Sweep %d/%d\n", i + 1, p->n_sweep);
        if (run_once(loop, p, w, p->sweep_rates[i], &run) != 0) {
            rc = -1;
            break;
        }
        *interrupted = run.interrupted;
        rows[n].rate = p->sweep_rates[i];
        rows[n].n = run.n;
        if (dsb_metrics_compute(&run, DSB_ALL_ADAPTERS, p, &rows[n].m) == 0) n++;
        if (arr) cJSON_AddItemToArray(arr, dsb_report_json(&run, w, p));
        dsb_run_free(&run);
    }
    if (n > 0) dsb_report_sweep_print(stdout, rows, n, p);
    if (doc) {
        int knee = dsb_sweep_knee(rows, n, p);
        if (knee >= 0 && !isinf(rows[knee].rate)) cJSON_AddNumberToObject(doc, "knee_request_rate", rows[knee].rate);
        else cJSON_AddNullToObject(doc, "knee_request_rate");
        if (write_json(p, doc) != 0) rc = -1;
    }
    return rc;
}

int main(int argc, char **argv) {
    dsb_params p;
    char err[512];
    dsb_params_default(&p);
    int rc = dsb_cli_parse(argc, argv, &p, err, sizeof(err));
    if (rc != 0) {
        if (rc < 0) fprintf(stderr, "ds-bench: %s\n", err);
        return rc < 0 ? 1 : 0;
    }
    signal(SIGPIPE, SIG_IGN); /* a server closing mid-write is an error to count, not a crash */
    dsb_workload w;
    if (dsb_workload_init(&w, &p, err, sizeof(err)) != 0) {
        fprintf(stderr, "ds-bench: %s\n", err);
        return 1;
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    if (!w.model && dsb_workload_needs_model(&w)) {
        char *model = dsb_fetch_model(&loop, &p, err, sizeof(err));
        if (!model || dsb_workload_set_model(&w, model) != 0) {
            fprintf(stderr, "ds-bench: --model not given and %s\n", model ? "out of memory" : err);
            free(model);
            dsb_workload_free(&w);
            uv_loop_close(&loop);
            return 1;
        }
        free(model);
    }
    bool interrupted = false;
    rc = p.n_sweep ? run_sweep(&loop, &p, &w, &interrupted) : run_single(&loop, &p, &w, &interrupted);
    dsb_workload_free(&w);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    if (rc != 0) return 1;
    return interrupted ? 130 : 0;
}
