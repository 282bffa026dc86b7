/* ds-bench — one benchmark run: sends the workload's requests on a libuv loop (open loop at the
 * arrival times, capped by --max-concurrency; closed loop when the rate is infinite and the
 * concurrency is capped) and records per-request timings.
 *
 * Timings follow vLLM's `bench serve` (vllm/benchmarks/serve.py), with one difference noted:
 *   start    uv_hrtime() just before the request is handed to the client (connect included
 *            when no keep-alive connection is idle);
 *   TTFT     first SSE chunk whose choices[0].text (completions) or choices[0].delta.content
 *            (chat; or delta.reasoning_content / delta.reasoning) is a non-empty string — vLLM
 *            takes the first chunk with any choices, which on the chat endpoint is the role-only
 *            chunk;
 *   ITL      the gap before every later chunk with text (chunks in one read share a timestamp);
 *   latency  (E2EL) the last chunk with text, as vLLM (the usage chunk and [DONE] don't count);
 *   tokens   usage.prompt_tokens / usage.completion_tokens, falling back to the requested input
 *            length and the number of text chunks when the server sends no usage.
 * A request fails on a transport error, a non-200 status, an {"error":...} event, invalid JSON
 * in the stream, or a stream without any text. Single-threaded: everything runs on `loop`. */
#ifndef DSB_RUNNER_H
#define DSB_RUNNER_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "cli.h"
#include "workload.h"

typedef struct dsb_result {
    int adapter;           /* index or DSB_BASE */
    int req_input_len;     /* requested (estimated) input tokens */
    int req_output_len;    /* max_tokens */
    double arrival_s;      /* scheduled arrival, from run start */
    double start_s;        /* actual send time, from run start */
    double ttft_s, latency_s;
    double *itl_s;         /* [n_itl] gaps in seconds; owned */
    size_t n_itl;
    int prompt_tokens;     /* usage.prompt_tokens, else req_input_len */
    int output_tokens;     /* usage.completion_tokens, else text chunks; 0 when failed */
    int http_status;
    bool ok;
    bool cancelled;        /* internal: cancelled results never appear in a returned run */
    char *error;           /* NULL when ok; owned */
} dsb_result;

typedef struct dsb_run {
    dsb_result *r;         /* completed and failed requests in send order; cancelled ones dropped */
    size_t n, cap;
    double offered_rate;   /* the run's --request-rate (INFINITY for closed loop) */
    double duration_s;     /* run start to the last completion (or to the interrupt) */
    size_t cancelled;      /* in flight when interrupted */
    size_t connections;    /* TCP connections opened */
    bool interrupted;      /* SIGINT arrived */
} dsb_run;

/* Runs one benchmark at `rate` on `loop`, which must have no other active handles; returns when
 * the run is over and every handle it opened is closed. SIGINT during the run cancels what is in
 * flight and ends the run early with out->interrupted set. Returns 0 (request failures are
 * results, not errors) or -1 with a message in err (bad URL, unresolvable host, out of memory).
 * Free out with dsb_run_free. */
int dsb_run_benchmark(uv_loop_t *loop, const dsb_params *p, dsb_workload *w, double rate, dsb_run *out,
                      char *err, size_t errlen);
void dsb_run_free(dsb_run *run);

/* Asks GET /v1/models for the base model: the first entry whose "parent" is null or absent,
 * else the first entry. Returns a malloc'd id, or NULL with a message in err. */
char *dsb_fetch_model(uv_loop_t *loop, const dsb_params *p, char *err, size_t errlen);

/* Request path for the endpoint under the URL's path: "/v1/completions" is appended unless the
 * URL already ends with "/v1" (then "/completions") or with "/completions" (used as given).
 * `what` is "completions", "chat/completions" or "models". */
void dsb_endpoint_path(const char *url_path, const char *what, char *out, size_t outlen);

#endif
