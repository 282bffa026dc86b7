#include "runner.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "http.h"
#include "stats.h"

typedef struct runner {
    uv_loop_t *loop;
    const dsb_params *p;
    dsb_workload *w;
    dsb_run *run;
    dsb_client *client;
    uv_timer_t arrival_timer, progress_timer;
    uv_signal_t sigint;
    char path[1200];
    uint64_t t0;
    long inflight;
    size_t sent, n_ok, n_fail;
    long long out_tokens;
    dsb_spec pending;
    bool has_pending, exhausted, stopping, cancelling, finished, tty;
    double last_progress;
} runner;

/* One request in flight. */
typedef struct flight {
    dsb_call call;
    runner *R;
    size_t idx;
    char *body;
    uint64_t t_start, t_first, t_last;
    bool got_text, done_seen;
    int n_text, prompt_tokens, completion_tokens;
    dsb_vec itl;
    char *stream_err;
} flight;

static void pump(runner *R);

static double elapsed(const runner *R) { return (double)(uv_hrtime() - R->t0) / 1e9; }

void dsb_endpoint_path(const char *url_path, const char *what, char *out, size_t outlen) {
    size_t n = strlen(url_path);
    const char *tail = "/completions";
    size_t tl = strlen(tail);
    if (n >= tl && strcmp(url_path + n - tl, tail) == 0 && strcmp(what, "models") != 0)
        snprintf(out, outlen, "%s", url_path);
    else if (n >= 3 && strcmp(url_path + n - 3, "/v1") == 0)
        snprintf(out, outlen, "%s/%s", url_path, what);
    else
        snprintf(out, outlen, "%s/v1/%s", url_path, what);
}

/* ---- Progress line ------------------------------------------------------------------------- */

static void print_progress(runner *R, bool final) {
    double t = elapsed(R);
    double rps = t > 0 ? (double)(R->n_ok + R->n_fail) / t : 0.0;
    double tps = t > 0 ? (double)R->out_tokens / t : 0.0;
    fprintf(stderr, "%s[%7.1fs] sent %zu  done %zu  failed %zu  in flight %ld | %.2f req/s  %.1f out tok/s%s",
            R->tty ? "\r" : "", t, R->sent, R->n_ok, R->n_fail, R->inflight, rps, tps,
            R->tty ? "   " : "\n");
    if (final && R->tty) fputc('\n', stderr);
    fflush(stderr);
}

static void on_progress(uv_timer_t *t) {
    runner *R = t->data;
    /* Terminals get a line refreshed every second; logs get one every ten. */
    double now = elapsed(R);
    if (!R->tty && now - R->last_progress < 10.0) return;
    R->last_progress = now;
    print_progress(R, false);
}

/* ---- Finishing ----------------------------------------------------------------------------- */

static void maybe_finish(runner *R) {
    if (R->finished || R->cancelling) return;
    if (!(R->exhausted || R->stopping) || R->inflight > 0) return;
    R->finished = true;
    R->run->duration_s = elapsed(R);
    R->run->connections = dsb_client_connections_opened(R->client);
    if (R->p->progress) print_progress(R, true);
    uv_close((uv_handle_t *)&R->arrival_timer, NULL);
    uv_close((uv_handle_t *)&R->progress_timer, NULL);
    uv_close((uv_handle_t *)&R->sigint, NULL);
    dsb_client_free(R->client);
    R->client = NULL;
}

static void on_sigint(uv_signal_t *s, int signum) {
    runner *R = s->data;
    if (R->stopping) return;
    R->stopping = true;
    R->run->interrupted = true;
    uv_timer_stop(&R->arrival_timer);
    fprintf(stderr, "\ninterrupted: cancelling %ld request(s) in flight\n", R->inflight);
    R->cancelling = true;
    dsb_client_cancel_all(R->client);
    R->cancelling = false;
    maybe_finish(R);
}

/* ---- Per-request measurement --------------------------------------------------------------- */

/* Text of choices[0] of a completions or chat chunk, or NULL / "" when it carries none. */
static const char *chunk_text(const cJSON *j) {
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(j, "choices");
    const cJSON *c0 = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    if (!c0) return NULL;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(c0, "text");
    if (cJSON_IsString(t)) return t->valuestring;
    /* Chat: content, or the reasoning text that reasoning models stream before it (vLLM sends
     * "reasoning_content", newer servers "reasoning"); either is generated tokens. */
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(c0, "delta");
    const char *keys[] = {"content", "reasoning_content", "reasoning"};
    for (int i = 0; i < 3; i++) {
        t = cJSON_GetObjectItemCaseSensitive(d, keys[i]);
        if (cJSON_IsString(t) && t->valuestring[0]) return t->valuestring;
    }
    return NULL;
}

static void set_stream_err(flight *f, const char *prefix, const cJSON *j) {
    if (f->stream_err) return;
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(e, "message");
    const char *msg = cJSON_IsString(m) ? m->valuestring : cJSON_IsString(e) ? e->valuestring : "";
    size_t n = strlen(prefix) + strlen(msg) + 3;
    f->stream_err = malloc(n);
    if (f->stream_err) snprintf(f->stream_err, n, "%s%s%s", prefix, *msg ? ": " : "", msg);
}

static void on_sse(dsb_call *call, const char *data, size_t len, uint64_t t) {
    flight *f = call->ud;
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        f->done_seen = true;
        return;
    }
    cJSON *j = cJSON_ParseWithLength(data, len);
    if (!j) {
        set_stream_err(f, "invalid JSON in the stream", NULL);
        return;
    }
    if (cJSON_GetObjectItemCaseSensitive(j, "error")) set_stream_err(f, "error event", j);
    const char *text = chunk_text(j);
    if (text && *text) {
        if (!f->got_text) {
            f->t_first = t;
            f->got_text = true;
        } else {
            (void)dsb_vec_push(&f->itl, (double)(t - f->t_last) / 1e9);
        }
        f->t_last = t;
        f->n_text++;
    }
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(j, "usage");
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(u, "prompt_tokens");
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(u, "completion_tokens");
    if (cJSON_IsNumber(pt)) f->prompt_tokens = pt->valueint;
    if (cJSON_IsNumber(ct)) f->completion_tokens = ct->valueint;
    cJSON_Delete(j);
}

/* "HTTP 404: <error.message>" from a non-200 response. */
static char *http_error_text(const dsb_call *call) {
    char buf[512];
    cJSON *j = cJSON_ParseWithLength(call->resp, call->resp_len);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    const cJSON *m = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "message") : e;
    if (cJSON_IsString(m))
        snprintf(buf, sizeof(buf), "HTTP %d: %s", call->status, m->valuestring);
    else
        snprintf(buf, sizeof(buf), "HTTP %d: %.200s", call->status, call->resp);
    cJSON_Delete(j);
    return strdup(buf);
}

static char *failure_reason(const flight *f) {
    const dsb_call *call = &f->call;
    if (call->error != DSB_HTTP_OK) return strdup(call->errmsg[0] ? call->errmsg : dsb_http_error_name(call->error));
    if (call->status != 200) return http_error_text(call);
    if (f->stream_err) return strdup(f->stream_err);
    if (!f->got_text) return strdup("no tokens in the response stream");
    return NULL;
}

static void record(runner *R, flight *f) {
    dsb_result *res = &R->run->r[f->idx];
    res->http_status = f->call.status;
    res->error = failure_reason(f);
    res->ok = res->error == NULL;
    res->prompt_tokens = f->prompt_tokens >= 0 ? f->prompt_tokens : res->req_input_len;
    if (!res->ok) {
        if (!res->error) res->error = strdup("out of memory");
        R->n_fail++;
        return;
    }
    res->ttft_s = (double)(f->t_first - f->t_start) / 1e9;
    res->latency_s = (double)(f->t_last - f->t_start) / 1e9;
    res->output_tokens = f->completion_tokens >= 0 ? f->completion_tokens : f->n_text;
    res->itl_s = f->itl.v; /* ownership moves to the result */
    res->n_itl = f->itl.n;
    f->itl.v = NULL;
    R->n_ok++;
    R->out_tokens += res->output_tokens;
}

static void on_done(dsb_call *call) {
    flight *f = call->ud;
    runner *R = f->R;
    R->inflight--;
    if (call->error == DSB_HTTP_ECANCELED && R->stopping) {
        R->run->cancelled++;
        R->run->r[f->idx].cancelled = true;
    } else {
        record(R, f);
    }
    dsb_vec_free(&f->itl);
    free(f->stream_err);
    free(f->body);
    free(f);
    pump(R);
}

/* ---- Sending ------------------------------------------------------------------------------- */

static int grow_results(dsb_run *run) {
    if (run->n < run->cap) return 0;
    size_t cap = run->cap ? run->cap * 2 : 256;
    dsb_result *r = realloc(run->r, cap * sizeof(dsb_result));
    if (!r) return -1;
    run->r = r;
    run->cap = cap;
    return 0;
}

/* Sends one request; a request that cannot even be built is recorded as failed. */
static void dispatch(runner *R, const dsb_spec *s) {
    dsb_run *run = R->run;
    if (grow_results(run) != 0) {
        R->exhausted = true; /* out of memory: stop sending, report what we have */
        return;
    }
    dsb_result *res = &run->r[run->n];
    memset(res, 0, sizeof(*res));
    res->adapter = s->adapter;
    res->req_input_len = s->input_len;
    res->req_output_len = s->output_len;
    res->arrival_s = s->arrival_s;
    res->start_s = elapsed(R);
    flight *f = calloc(1, sizeof(*f));
    size_t len = 0;
    char *body = f ? dsb_workload_body(R->w, s, &len) : NULL;
    if (!body) {
        free(f);
        res->error = strdup("out of memory building the request");
        res->prompt_tokens = s->input_len;
        run->n++;
        R->n_fail++;
        return;
    }
    f->R = R;
    f->idx = run->n++;
    f->body = body;
    f->prompt_tokens = f->completion_tokens = -1;
    f->call = (dsb_call){.method = "POST", .path = R->path, .body = body, .body_len = len,
                         .on_sse = on_sse, .on_done = on_done, .ud = f};
    R->inflight++;
    R->sent++;
    f->t_start = uv_hrtime();
    if (dsb_client_send(R->client, &f->call) != 0) {
        snprintf(f->call.errmsg, sizeof(f->call.errmsg), "out of memory opening a connection");
        f->call.error = DSB_HTTP_ECONNECT;
        R->inflight--;
        record(R, f);
        free(f->body);
        free(f);
    }
}

static void on_arrival_timer(uv_timer_t *t) { pump(t->data); }

/* Sends every request that is due and allowed by the concurrency cap, then sleeps until the
 * next arrival. Bounded: each pass either sends, stops on the cap, or arms the timer. */
static void pump(runner *R) {
    const dsb_params *p = R->p;
    while (!R->stopping && !R->exhausted) {
        if (p->max_concurrency > 0 && R->inflight >= p->max_concurrency) break;
        if (!R->has_pending) {
            if (!dsb_workload_next(R->w, &R->pending)) {
                R->exhausted = true;
                break;
            }
            R->has_pending = true;
        }
        double now = elapsed(R);
        double due = R->pending.arrival_s;
        if (p->duration_s > 0 && (due > now ? due : now) >= p->duration_s) {
            R->exhausted = true;
            break;
        }
        if (due > now) {
            uint64_t ms = (uint64_t)ceil((due - now) * 1000.0);
            uv_timer_start(&R->arrival_timer, on_arrival_timer, ms, 0);
            break;
        }
        R->has_pending = false;
        dispatch(R, &R->pending);
    }
    maybe_finish(R);
}

static void drop_cancelled(dsb_run *run) {
    size_t j = 0;
    for (size_t i = 0; i < run->n; i++) {
        if (run->r[i].cancelled) {
            free(run->r[i].itl_s);
            free(run->r[i].error);
            continue;
        }
        run->r[j++] = run->r[i];
    }
    run->n = j;
}

static int runner_open(runner *R, char *err, size_t errlen) {
    dsb_url u;
    if (dsb_url_parse(R->p->url, &u, err, errlen) != 0) return -1;
    dsb_endpoint_path(u.path, R->p->endpoint == DSB_EP_CHAT ? "chat/completions" : "completions", R->path,
                      sizeof(R->path));
    char headers[1200] = "";
    const char *key = R->p->api_key ? R->p->api_key : getenv("OPENAI_API_KEY");
    if (key && *key) snprintf(headers, sizeof(headers), "Authorization: Bearer %s\r\n", key);
    dsb_client_params cp = {.host = u.host, .port = u.port, .extra_headers = headers, .timeout_s = R->p->timeout_s};
    R->client = dsb_client_create(R->loop, &cp, err, errlen);
    return R->client ? 0 : -1;
}

int dsb_run_benchmark(uv_loop_t *loop, const dsb_params *p, dsb_workload *w, double rate, dsb_run *out,
                      char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    out->offered_rate = rate;
    runner R;
    memset(&R, 0, sizeof(R));
    R.loop = loop;
    R.p = p;
    R.w = w;
    R.run = out;
    R.tty = isatty(STDERR_FILENO) != 0;
    if (runner_open(&R, err, errlen) != 0) return -1;
    dsb_workload_reset(w, rate);
    uv_timer_init(loop, &R.arrival_timer);
    uv_timer_init(loop, &R.progress_timer);
    uv_signal_init(loop, &R.sigint);
    R.arrival_timer.data = R.progress_timer.data = R.sigint.data = &R;
    uv_signal_start(&R.sigint, on_sigint, SIGINT);
    if (p->progress) uv_timer_start(&R.progress_timer, on_progress, 1000, 1000);
    uv_update_time(loop);
    R.t0 = uv_hrtime();
    pump(&R);
    uv_run(loop, UV_RUN_DEFAULT);
    drop_cancelled(out);
    return 0;
}

void dsb_run_free(dsb_run *run) {
    for (size_t i = 0; i < run->n; i++) {
        free(run->r[i].itl_s);
        free(run->r[i].error);
    }
    free(run->r);
    memset(run, 0, sizeof(*run));
}

/* ---- GET /v1/models ------------------------------------------------------------------------ */

typedef struct models_ctx {
    bool done;
    char *json;
    size_t len;
    bool oom;
} models_ctx;

static void models_body(dsb_call *call, const char *data, size_t len) {
    models_ctx *m = call->ud;
    if (m->oom || m->len + len > (64u << 20)) {
        m->oom = true;
        return;
    }
    char *j = realloc(m->json, m->len + len + 1);
    if (!j) {
        m->oom = true;
        return;
    }
    memcpy(j + m->len, data, len);
    m->len += len;
    j[m->len] = '\0';
    m->json = j;
}

static void models_done(dsb_call *call) { ((models_ctx *)call->ud)->done = true; }

static const char *pick_model(const cJSON *data) {
    const cJSON *m, *first = NULL;
    cJSON_ArrayForEach(m, data) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(m, "id");
        if (!cJSON_IsString(id)) continue;
        if (!first) first = id;
        const cJSON *parent = cJSON_GetObjectItemCaseSensitive(m, "parent");
        if (!parent || cJSON_IsNull(parent)) return id->valuestring;
    }
    return first ? first->valuestring : NULL;
}

static char *parse_models(const models_ctx *m, const dsb_call *call, char *err, size_t errlen) {
    if (call->error != DSB_HTTP_OK) return snprintf(err, errlen, "GET /v1/models: %s", call->errmsg), NULL;
    if (call->status != 200)
        return snprintf(err, errlen, "GET /v1/models: HTTP %d: %.200s", call->status, call->resp), NULL;
    cJSON *j = m->json ? cJSON_ParseWithLength(m->json, m->len) : NULL;
    const char *id = pick_model(cJSON_GetObjectItemCaseSensitive(j, "data"));
    char *out = id ? strdup(id) : NULL;
    cJSON_Delete(j);
    if (!out) snprintf(err, errlen, "GET /v1/models: no model id in the response");
    return out;
}

char *dsb_fetch_model(uv_loop_t *loop, const dsb_params *p, char *err, size_t errlen) {
    dsb_url u;
    if (dsb_url_parse(p->url, &u, err, errlen) != 0) return NULL;
    char path[1200], headers[1200] = "";
    dsb_endpoint_path(u.path, "models", path, sizeof(path));
    const char *key = p->api_key ? p->api_key : getenv("OPENAI_API_KEY");
    if (key && *key) snprintf(headers, sizeof(headers), "Authorization: Bearer %s\r\n", key);
    dsb_client_params cp = {.host = u.host, .port = u.port, .extra_headers = headers,
                            .timeout_s = p->timeout_s > 0 && p->timeout_s < 30 ? p->timeout_s : 30};
    dsb_client *c = dsb_client_create(loop, &cp, err, errlen);
    if (!c) return NULL;
    models_ctx m = {0};
    dsb_call call = {.method = "GET", .path = path, .on_body = models_body, .on_done = models_done, .ud = &m};
    dsb_client_send(c, &call);
    while (!m.done && uv_run(loop, UV_RUN_ONCE) != 0) {
    }
    dsb_client_free(c);
    uv_run(loop, UV_RUN_DEFAULT); /* let the connection close */
    char *model = m.done ? parse_models(&m, &call, err, errlen) : NULL;
    if (!m.done) snprintf(err, errlen, "GET /v1/models: no answer");
    free(m.json);
    return model;
}
