/* ds-bench — metrics over a run, the terminal summary, and the vLLM-compatible JSON result.
 * Pure functions of a finished run; any thread. */
#ifndef DSB_REPORT_H
#define DSB_REPORT_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdio.h>

#include "cli.h"
#include "runner.h"
#include "stats.h"
#include "workload.h"

#define DSB_ALL_ADAPTERS (-1000) /* adapter filter: every request */

typedef struct dsb_metrics {
    size_t completed, failed;
    long long total_input, total_output;   /* over completed requests, as vLLM */
    double duration_s;                     /* the whole run's, also for per-adapter metrics */
    double request_throughput, output_throughput, total_token_throughput;
    size_t good;                           /* completed requests meeting every SLO bound */
    double request_goodput;                /* good / duration; 0 without an SLO */
    /* In milliseconds. TPOT = (latency - TTFT) / (output_tokens - 1) for requests with more than
     * one output token; ITL pools every gap of every completed request. */
    dsb_summary ttft, tpot, itl, e2el;
} dsb_metrics;

/* Fills m for the requests of `adapter` (an index, DSB_BASE, or DSB_ALL_ADAPTERS). Returns 0, or
 * -1 when out of memory. */
int dsb_metrics_compute(const dsb_run *run, int adapter, const dsb_params *p, dsb_metrics *m);

/* Time per output token of one request in seconds (0 when it has fewer than two tokens). */
double dsb_result_tpot(const dsb_result *r);

/* Terminal summary: vLLM's table, a per-adapter table, and the most frequent errors. */
void dsb_report_print(FILE *f, const dsb_run *run, const dsb_workload *w, const dsb_params *p);

/* JSON object for one run: vLLM's keys (duration, completed, failed, total_*_tokens, *_throughput,
 * request_goodput, {mean,median,std,pNN}_{ttft,tpot,itl,e2el}_ms, input_lens, output_lens, ttfts,
 * itls, latencies, errors — per-request times in seconds as in vLLM), plus "adapters" (per request),
 * "per_adapter" (the same metrics without arrays for each adapter and the base) and the run's
 * configuration. Caller owns the result; NULL when out of memory. */
cJSON *dsb_report_json(const dsb_run *run, const dsb_workload *w, const dsb_params *p);

/* One row per swept rate. */
typedef struct dsb_sweep_row {
    double rate;
    dsb_metrics m;
    size_t n;       /* completed + failed */
} dsb_sweep_row;

/* The knee: the highest offered rate at which the server still keeps up — achieved request
 * throughput >= 90% of the offered rate and, with an SLO, >= 90% of requests meet it (goodput
 * >= 90% of throughput). Returns the row index, or -1 when even the lowest rate fails. */
int dsb_sweep_knee(const dsb_sweep_row *rows, int n, const dsb_params *p);

void dsb_report_sweep_print(FILE *f, const dsb_sweep_row *rows, int n, const dsb_params *p);

/* Writes doc (pretty-printed) to path. Returns 0, or -1 with a message in err. */
int dsb_report_write(const char *path, const cJSON *doc, char *err, size_t errlen);

#endif
