/* ds-bench's client and runner against the fake server on 127.0.0.1 (ephemeral port):
 *  - timings: the fake server sends the first token 100 ms after the request, then one every
 *    20 ms (5 tokens), usage, [DONE]; the measured TTFT / ITL / TPOT / E2E must match what the
 *    server did (its recorded send times) within 4 ms (TPOT 2 ms);
 *  - chat: the role-only first chunk must not count as the first token;
 *  - keep-alive: sequential requests reuse one connection;
 *  - failures: HTTP 500, a connection closed mid-stream, an error event, a non-HTTP answer, no
 *    answer (timeout), a refused connection — all counted as failed with a reason, none crashes;
 *  - a keep-alive connection the server dropped while idle is retried on a fresh one;
 *  - per-adapter accounting with adapters chosen through "model" or another field.
 * Every run is bounded by a request count and a per-request timeout. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "ds_test.h"
#include "fake_server.h"
#include "report.h"
#include "runner.h"
#include "workload.h"

#define TTFT_MS 100
#define ITL_MS 20
#define TOL_MS 4.0 /* client measurement vs the server's recorded send times */

static fake_server *g_srv;
static int g_port;
static char g_url[64];
static fake_record g_recs[256];

static void base_params(dsb_params *p, const char *model) {
    dsb_params_default(p);
    p->url = g_url;
    p->model = model;
    p->num_prompts = 3;
    p->max_concurrency = 1;
    p->input_len = 16;
    p->output_len = 5;
    p->timeout_s = 5;
    p->progress = false;
}

/* Runs a benchmark; returns its run (caller frees). */
static int run(const dsb_params *p, dsb_workload *w, dsb_run *out) {
    char err[256];
    if (dsb_workload_init(w, p, err, sizeof(err)) != 0) {
        fprintf(stderr, "workload: %s\n", err);
        return -1;
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    int rc = dsb_run_benchmark(&loop, p, w, p->request_rate, out, err, sizeof(err));
    if (rc != 0) fprintf(stderr, "run: %s\n", err);
    CHECK(uv_loop_close(&loop) == 0); /* every handle was closed */
    return rc;
}

static double ms(uint64_t ns) { return (double)ns / 1e6; }

/* Deviations of one request's measurements from what the server recorded doing, beyond
 * tolerance (0 = all good); the last one is described in `why`. */
static int timing_misses(const dsb_result *r, const fake_record *rec, char *why, size_t n) {
    int miss = 0;
    double s_ttft = ms(rec->t_tok_ns[0] - rec->t_recv_ns), s_e2e = ms(rec->t_tok_ns[4] - rec->t_recv_ns);
    double c_ttft = r->ttft_s * 1e3, c_e2e = r->latency_s * 1e3;
    double s_tpot = (s_e2e - s_ttft) / 4, c_tpot = dsb_result_tpot(r) * 1e3;
#define MISS(cond, ...) \
    if (!(cond)) miss++, snprintf(why, n, __VA_ARGS__)
    MISS(fabs(c_ttft - s_ttft) < TOL_MS, "ttft %.2f ms, server %.2f", c_ttft, s_ttft);
    MISS(fabs(c_e2e - s_e2e) < TOL_MS, "e2e %.2f ms, server %.2f", c_e2e, s_e2e);
    MISS(fabs(c_tpot - s_tpot) < TOL_MS / 2, "tpot %.2f ms, server %.2f", c_tpot, s_tpot);
    for (size_t k = 0; k < r->n_itl && k < 4; k++) {
        double s_gap = ms(rec->t_tok_ns[k + 1] - rec->t_tok_ns[k]), c_gap = r->itl_s[k] * 1e3;
        MISS(fabs(c_gap - s_gap) < TOL_MS, "itl[%zu] %.2f ms, server %.2f", k, c_gap, s_gap);
    }
#undef MISS
    return miss;
}

/* What the fake server did must be what it was asked to do (sanity of the reference itself);
 * generous bounds: the server's own timers run on a shared machine too. */
static void check_server_schedule(const fake_record *rec) {
    double s_ttft = ms(rec->t_tok_ns[0] - rec->t_recv_ns), s_e2e = ms(rec->t_tok_ns[4] - rec->t_recv_ns);
    CHECK_MSG(s_ttft >= TTFT_MS - 1 && s_ttft < TTFT_MS + 100, "server ttft %.2f ms", s_ttft);
    CHECK_MSG(s_e2e >= TTFT_MS + 4 * ITL_MS - 1 && s_e2e < TTFT_MS + 4 * ITL_MS + 100, "server e2e %.2f", s_e2e);
}

/* Non-timing facts, which must hold on every attempt. */
static void check_shape(const dsb_result *r, const fake_record *rec, dsb_endpoint ep) {
    CHECK_MSG(r->ok, "error: %s", r->error ? r->error : "");
    CHECK_EQ_INT(rec->n_tok, 5);
    CHECK_EQ_INT(r->n_itl, 4);
    CHECK_EQ_INT(r->output_tokens, 5); /* from usage */
    CHECK_EQ_INT(r->prompt_tokens, 7); /* the fake's usage.prompt_tokens */
    CHECK(strstr(rec->path, ep == DSB_EP_CHAT ? "/v1/chat/completions" : "/v1/completions") == rec->path);
    CHECK(rec->ignore_eos && rec->stream_usage && rec->max_tokens == 5);
    if (rec->n_tok == 5) check_server_schedule(rec);
}

/* One run of 3 sequential requests; returns the number of timing misses. */
static int timing_attempt(dsb_endpoint ep, char *why, size_t n) {
    dsb_params p;
    base_params(&p, "fake-base");
    p.endpoint = ep;
    p.ignore_eos = true;
    size_t before = fake_server_records(g_srv, g_recs, 256);
    int conns_before = fake_server_connections(g_srv);
    dsb_workload w;
    dsb_run r;
    if (run(&p, &w, &r) != 0) return 1;
    size_t after = fake_server_records(g_srv, g_recs, 256);
    CHECK_EQ_INT(r.n, 3);
    CHECK_EQ_INT(after - before, 3);
    int misses = 0;
    for (size_t i = 0; i < r.n && i < after - before && before + i < 256; i++) {
        check_shape(&r.r[i], &g_recs[before + i], ep);
        if (r.r[i].ok && g_recs[before + i].n_tok == 5 && r.r[i].n_itl == 4)
            misses += timing_misses(&r.r[i], &g_recs[before + i], why, n);
    }
    CHECK_EQ_INT(r.connections, 1); /* keep-alive: three sequential requests, one connection */
    CHECK_EQ_INT(fake_server_connections(g_srv) - conns_before, 1);
    dsb_metrics m;
    CHECK(dsb_metrics_compute(&r, DSB_ALL_ADAPTERS, &p, &m) == 0);
    CHECK(m.completed == 3 && m.failed == 0 && m.total_output == 15 && m.itl.n == 12);
    dsb_run_free(&r);
    dsb_workload_free(&w);
    return misses;
}

/* 90th percentile of how late a 2 ms sleep wakes up: the scheduler noise of this machine now. */
static double sleep_jitter_ms(void) {
    double late[20];
    for (int i = 0; i < 20; i++) {
        uint64_t t0 = uv_hrtime();
        struct timespec d = {0, 2000000};
        nanosleep(&d, NULL);
        late[i] = ms(uv_hrtime() - t0) - 2.0;
    }
    dsb_summary s;
    double q = 90;
    dsb_summarize(late, 20, &q, 1, &s);
    return s.pct[0];
}

/* The timing checks measure wall-clock behaviour: a run passes when every request is within
 * TOL_MS of the server's record. Up to 5 runs are tried, so that one scheduler hiccup does not
 * fail the test while a real error (which shows on every run) does. When all runs miss on a
 * machine so loaded that a 2 ms sleep wakes up over 1 ms late, the client cannot resolve a few
 * ms and the timing verdict is waived (printed); every non-timing check still applies. */
static void test_timing(dsb_endpoint ep) {
    char why[160] = "";
    int misses = 0;
    for (int attempt = 0; attempt < 5; attempt++) {
        misses = timing_attempt(ep, why, sizeof(why));
        if (misses == 0) break;
        fprintf(stderr, "timing attempt %d (%s): %d misses, last: %s\n", attempt + 1,
                ep == DSB_EP_CHAT ? "chat" : "completions", misses, why);
    }
    if (misses == 0) return;
    double jitter = sleep_jitter_ms();
    if (jitter > 1.0) {
        printf("NOTE: timing tolerance waived: this machine is overloaded (2 ms sleeps wake %.1f ms late)\n", jitter);
        return;
    }
    CHECK_MSG(misses == 0, "%s (sleep jitter %.2f ms)", why, jitter);
}

/* Every request of a run against `model` fails; returns the first error text. */
static void expect_failures(const char *url, const char *model, const char *needle) {
    dsb_params p;
    base_params(&p, model);
    p.url = url;
    p.timeout_s = 0.3; /* for "hang" */
    dsb_workload w;
    dsb_run r;
    if (run(&p, &w, &r) != 0) return;
    CHECK_EQ_INT(r.n, 3);
    for (size_t i = 0; i < r.n; i++) {
        CHECK(!r.r[i].ok && r.r[i].output_tokens == 0);
        CHECK_MSG(r.r[i].error && strstr(r.r[i].error, needle), "%s: error '%s' lacks '%s'", model,
                  r.r[i].error ? r.r[i].error : "(null)", needle);
    }
    dsb_metrics m;
    dsb_metrics_compute(&r, DSB_ALL_ADAPTERS, &p, &m);
    CHECK_EQ_INT(m.completed, 0);
    CHECK_EQ_INT(m.failed, 3);
    dsb_report_print(stdout, &r, &w, &p); /* the summary of an all-failed run must not crash */
    dsb_run_free(&r);
    dsb_workload_free(&w);
}

static void test_failures(void) {
    expect_failures(g_url, "fail500", "HTTP 500: fake failure");
    expect_failures(g_url, "cut", "closed");
    expect_failures(g_url, "errevent", "boom");
    expect_failures(g_url, "garbage", "bad HTTP response");
    expect_failures(g_url, "hang", "timed out");
    char refused[64];
    int port = fake_closed_port();
    CHECK(port > 0);
    snprintf(refused, sizeof(refused), "http://127.0.0.1:%d", port);
    expect_failures(refused, "fake-base", "connect");
}

/* 2 adapters + base traffic at an open-loop rate, one adapter failing: per-adapter counts. */
static void test_adapters(const char *field) {
    dsb_params p;
    base_params(&p, "fake-base");
    p.num_prompts = 40;
    p.max_concurrency = 0;
    p.request_rate = 200;
    p.output_len = 2;
    p.adapter_names = field ? "lora-a,lora-b" : "nousage,fail500";
    p.traffic_split = "0.5,0.5";
    p.base_fraction = 0.25;
    p.adapter_field = field;
    dsb_workload w;
    dsb_run r;
    if (run(&p, &w, &r) != 0) return;
    CHECK_EQ_INT(r.n, 40);
    size_t n_base = 0;
    for (size_t i = 0; i < r.n; i++) {
        n_base += r.r[i].adapter == DSB_BASE;
        /* Through "model": adapter 1 is the failing one. Through a field: every request is OK. */
        CHECK(r.r[i].ok == (field || r.r[i].adapter != 1));
    }
    CHECK(n_base > 2 && n_base < 20);
    dsb_metrics m0, m1, mb;
    dsb_metrics_compute(&r, 0, &p, &m0);
    dsb_metrics_compute(&r, 1, &p, &m1);
    dsb_metrics_compute(&r, DSB_BASE, &p, &mb);
    CHECK_EQ_INT(m0.completed + m0.failed + m1.completed + m1.failed + mb.completed + mb.failed, 40);
    if (!field) {
        CHECK(m1.completed == 0 && m1.failed > 0);
        CHECK(m0.total_output == 2 * (long long)m0.completed); /* no usage: counted text chunks */
    }
    cJSON *j = dsb_report_json(&r, &w, &p);
    CHECK(j != NULL);
    const cJSON *pa = cJSON_GetObjectItem(j, "per_adapter");
    CHECK(cJSON_GetObjectItem(pa, field ? "lora-a" : "nousage") != NULL);
    CHECK(cJSON_GetObjectItem(pa, "fake-base") != NULL);
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetObjectItem(j, "ttfts")), 40);
    cJSON_Delete(j);
    size_t total = fake_server_records(g_srv, g_recs, 256);
    if (field && total >= 40 && total <= 256) { /* adapter ids went in the field, "model" is the base */
        for (size_t i = total - 40; i < total; i++) CHECK(strcmp(g_recs[i].model, "fake-base") == 0);
    }
    dsb_run_free(&r);
    dsb_workload_free(&w);
}

/* The server drops each keep-alive connection right after the response: the next request is
 * usually written on the dead connection before its EOF is read, and must be retried on a new one. */
static void test_stale_keepalive(void) {
    dsb_params p;
    base_params(&p, "closeafter");
    p.num_prompts = 6;
    p.output_len = 2;
    dsb_workload w;
    dsb_run r;
    int conns_before = fake_server_connections(g_srv);
    if (run(&p, &w, &r) != 0) return;
    CHECK_EQ_INT(r.n, 6);
    for (size_t i = 0; i < r.n; i++) CHECK_MSG(r.r[i].ok, "request %zu: %s", i, r.r[i].error ? r.r[i].error : "");
    CHECK_EQ_INT(fake_server_connections(g_srv) - conns_before, 6);
    dsb_run_free(&r);
    dsb_workload_free(&w);
}

static void test_fetch_model(void) {
    dsb_params p;
    base_params(&p, NULL);
    char err[256];
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *m = dsb_fetch_model(&loop, &p, err, sizeof(err));
    CHECK_MSG(m && strcmp(m, "fake-base") == 0, "model %s (%s)", m ? m : "NULL", err);
    free(m);
    CHECK(uv_loop_close(&loop) == 0);
}

int main(void) {
    fake_server_params fp = {.ttft_ms = TTFT_MS, .itl_ms = ITL_MS};
    g_srv = fake_server_start(&fp, &g_port);
    if (!g_srv) return 1;
    snprintf(g_url, sizeof(g_url), "http://127.0.0.1:%d", g_port);
    test_timing(DSB_EP_COMPLETIONS);
    test_timing(DSB_EP_CHAT);
    test_failures();
    test_adapters(NULL);
    test_adapters("adapter_id");
    test_stale_keepalive();
    test_fetch_model();
    fake_server_stop(g_srv);
    return ds_test_result();
}
