/* The ds_server facade (ds/server.h): the loop and the HTTP layer, routing through the tables of
 * the handler files, the one reply path (every response is counted in /metrics), the built-in
 * endpoints (/health, /metrics), signals and the shutdown sequence (drain, cancel, abort). */
#include <cjson/cJSON.h>
#include <llhttp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds/adapter.h"
#include "ds/server.h"
#include "ds/train.h"
#include "server/handlers.h"
#include "server/file_store.h"
#include "server/openai_req.h"
#include "server/router.h"
#include "util/mem.h"
#include "util/rng.h"

/* ---- the server facade -------------------------------------------------------------------- */

#define DRAIN_TICK_MS 25     /* how often a draining server checks whether requests are done */
#define CANCEL_GRACE_S 5.0   /* after cancelling leftovers: time for them to end normally */
#define ABORT_GRACE_S 5.0    /* after aborting connections: time for the engine's final events */

struct ds_server {
    uv_loop_t loop;
    ds_http_server http;
    ds_router router;
    ds_server_params params;
    char *host, *api_key, *model_name; /* owned copies of the params' strings */
    ds_engine *engine;
    ds_metrics *metrics;
    uv_async_t stop_async;
    uv_signal_t sig_int, sig_term;
    uv_timer_t drain_timer;
    int64_t created;
    int n_own_handles;     /* stop_async, signals, drain_timer still open */
    int stop_open;         /* atomic: stop_async may be signalled */
    bool stopping, forced;
    int drain_phase;       /* DRAIN_*: what the stop has done so far */
    bool http_closing;     /* ds_http_server_close was called */
    double deadline;       /* ds_time_s() at which the current drain phase gives up */
    ds_server_job *jobs;   /* generations in flight (cancelled when the drain time is up) */
    ds_file_store *files;  /* /v1/files */
    ds_ft_manager *ft;     /* fine-tuning jobs; NULL without an engine */
    uint64_t rand_state;   /* ds_server_random */
};

enum { DRAIN_WAIT = 0, DRAIN_CANCELLED, DRAIN_ABORTED };

ds_server_params ds_server_default_params(void) {
    ds_http_params h = ds_http_default_params();
    ds_server_params p = {
        .host = "127.0.0.1",
        .port = 8000,
        .served_model_name = "default",
        .max_connections = h.max_connections,
        .max_body_bytes = h.limits.max_body_bytes,
        .max_header_bytes = h.limits.max_header_bytes,
        .max_headers = h.limits.max_headers,
        .idle_timeout_s = h.idle_timeout_s,
        .header_timeout_s = h.header_timeout_s,
        .body_timeout_s = h.body_timeout_s,
        .write_timeout_s = h.write_timeout_s,
        .max_write_buffer = h.max_write_buffer,
        .shutdown_timeout_s = 10,
        .handle_signals = true,
    };
    return p;
}

ds_server *ds_server_of(const ds_http_req *r) { return r->srv_ ? r->srv_->user : NULL; }
ds_engine *ds_server_engine(const ds_server *s) { return s->engine; }
const ds_server_params *ds_server_get_params(const ds_server *s) { return &s->params; }
ds_http_server *ds_server_http(ds_server *s) { return &s->http; }
struct ds_adapter_registry *ds_server_registry(const ds_server *s) { return s->params.registry; }
float ds_server_train_budget(const ds_server *s) {
    return s->params.train_budget > 0.0f && s->params.train_budget <= 1.0f ? s->params.train_budget : 0.1f;
}
ds_metrics *ds_server_metrics(ds_server *s) { return s->metrics; }
bool ds_server_draining(const ds_server *s) { return s->stopping; }
ds_file_store *ds_server_files(ds_server *s) { return s->files; }
ds_ft_manager *ds_server_ft_manager(ds_server *s) { return s->ft; }
uint64_t ds_server_random(ds_server *s) { return ds_splitmix64(&s->rand_state); }
int64_t ds_server_created(const ds_server *s) { return s->created; }

bool ds_server_content_special_tokens(const ds_server *s) { return s->params.content_special_tokens; }

int32_t ds_server_max_ctx(const ds_server *s) {
    if (s->params.max_model_len > 0) return s->params.max_model_len;
    return s->engine ? ds_engine_model(s->engine)->cfg.max_ctx : 0;
}

bool ds_server_is_base_name(const ds_server *s, const char *name) {
    if (!strcmp(name, s->model_name) || !strcmp(name, "base")) return true;
    const char *own = s->engine ? ds_engine_model(s->engine)->cfg.name : NULL;
    return own && own[0] && !strcmp(name, own);
}

/* ---- the reply path (handlers.h) -------------------------------------------------------------- */

/* Every response to a client is counted as deltaserve_requests_total{endpoint,status} here, just
 * before it is sent: routing errors, handler replies and streams alike. */
static void count(ds_http_req *req, const char *endpoint, int status) {
    ds_server *s = ds_server_of(req);
    if (s) ds_metrics_count_request(s->metrics, endpoint, status);
}

int ds_server_reply(ds_http_req *req, const char *endpoint, int status, const char *ctype, const char *body,
                    size_t len) {
    count(req, endpoint, status);
    return ds_http_respond(req, status, ctype, body, len);
}

int ds_server_reply_json(ds_http_req *req, const char *endpoint, int status, ds_sb *b) {
    int rc;
    if (!ds_sb_ok(b)) rc = ds_server_reply_errorf(req, endpoint, 500, NULL, NULL, "out of memory");
    else rc = ds_server_reply(req, endpoint, status, "application/json", b->data ? b->data : "", b->len);
    ds_sb_free(b);
    return rc;
}

int ds_server_reply_error(ds_http_req *req, const char *endpoint, const ds_oai_error *e) {
    /* Clients back off on these; without a hint many retry at once. */
    if (e->status == 429 || e->status == 503) ds_http_req_add_header(req, "Retry-After", "1");
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_error_json(&b, e);
    int rc = ds_server_reply(req, endpoint, e->status, "application/json", b.data ? b.data : "", b.len);
    ds_sb_free(&b);
    return rc;
}

int ds_server_reply_errorf(ds_http_req *req, const char *endpoint, int status, const char *param, const char *code,
                           const char *fmt, ...) {
    ds_oai_error e;
    ds_oai_error_set(&e, status, param, code, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return ds_server_reply_error(req, endpoint, &e);
}

cJSON *ds_server_json_object(ds_http_req *req, const char *endpoint) {
    ds_oai_error e;
    cJSON *o = ds_oai_json_parse(req->body, req->body_len, &e);
    if (!o) {
        ds_server_reply_error(req, endpoint, &e);
        return NULL;
    }
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        ds_server_reply_errorf(req, endpoint, 400, NULL, NULL, "request body must be a JSON object");
        return NULL;
    }
    return o;
}

bool ds_server_path_id(ds_http_req *req, const char *endpoint, char *out, size_t cap) {
    if (req->n_params >= 1 && strlen(req->params[0]) < cap && !strchr(req->params[0], '%')) {
        snprintf(out, cap, "%s", req->params[0]);
        return true;
    }
    ds_server_reply_errorf(req, endpoint, 400, "id", NULL, "malformed id in the path");
    return false;
}

int ds_server_stream_start(ds_http_req *req, const char *endpoint, int status, const char *ctype) {
    count(req, endpoint, status);
    return ds_http_stream_start(req, status, ctype);
}

/* ---- built-in endpoints ------------------------------------------------------------------- */

static void handle_health(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    static const char ok[] = "{\"status\":\"ok\"}", draining[] = "{\"status\":\"draining\"}";
    if (s->stopping) ds_server_reply(req, "/health", 503, "application/json", draining, sizeof draining - 1);
    else ds_server_reply(req, "/health", 200, "application/json", ok, sizeof ok - 1);
}

static void handle_metrics(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    /* The one reply that is counted before it is built: so that a scrape appears in its own output. */
    count(req, "/metrics", 200);
    ds_sb b;
    ds_sb_init(&b);
    ds_metrics_sources src = {.engine = s->engine, .registry = s->params.registry, .max_lora = s->params.max_lora};
    ds_metrics_render(s->metrics, &src, &b);
    static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,"
                              "\"code\":null}}";
    if (!ds_sb_ok(&b)) ds_http_respond(req, 500, "application/json", oom, sizeof oom - 1);
    else ds_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", b.data ? b.data : "", b.len);
    ds_sb_free(&b);
}

static const ds_route builtin_routes[] = {
    {HTTP_GET, "/health", handle_health, NULL, DS_ROUTE_PUBLIC},
    {HTTP_GET, "/metrics", handle_metrics, NULL, 0},
};
static const ds_route_table builtin_table = {builtin_routes, sizeof builtin_routes / sizeof builtin_routes[0]};

/* Looked up in this order; the first route that matches method and path wins. */
static const ds_route_table *const route_tables[] = {
    &builtin_table,
    &ds_handlers_gen_routes,
    &ds_handlers_adapters_routes,
    &ds_handlers_files_routes,
    &ds_handlers_ft_routes,
    &ds_handlers_train_routes,
};

/* The HTTP handler: while draining, everything but /health is refused before routing, so that
 * no new work starts; the client is told to go elsewhere and close the connection. Routing errors
 * are labelled with the pattern of a route on that path, unknown paths all with "other" so that
 * clients cannot grow the metric series without bound. */
static void server_dispatch(ds_http_req *req, void *ud) {
    ds_server *s = ud;
    if (s->stopping && strcmp(req->path, "/health") != 0) {
        ds_http_req_add_header(req, "Connection", "close");
        ds_server_reply_errorf(req, "other", 503, NULL, NULL, "the server is shutting down");
        return;
    }
    const ds_route *rt;
    char allow[64];
    switch (ds_router_find(&s->router, req, &rt, allow)) {
    case DS_ROUTE_FOUND:
        rt->fn(req, rt->arg);
        break;
    case DS_ROUTE_UNAUTHORIZED:
        ds_http_req_add_header(req, "WWW-Authenticate", "Bearer");
        ds_server_reply_errorf(req, rt ? rt->pattern : "other", 401, NULL, "invalid_api_key",
                               "Incorrect API key provided.");
        break;
    case DS_ROUTE_NOT_FOUND:
        ds_server_reply_errorf(req, "other", 404, NULL, NULL, "Invalid URL (%s %.200s)", req->method_name, req->path);
        break;
    case DS_ROUTE_BAD_METHOD:
        ds_http_req_add_header(req, "Allow", allow);
        ds_server_reply_errorf(req, rt->pattern, 405, NULL, NULL, "Method %s not allowed for %.200s (allowed: %s)",
                               req->method_name, req->path, allow);
        break;
    }
}

/* ---- shutdown ----------------------------------------------------------------------------- */

static void on_own_handle_closed(uv_handle_t *h) {
    ds_server *s = h->data;
    s->n_own_handles--;
}

static void close_own_handles(ds_server *s) {
    __atomic_store_n(&s->stop_open, 0, __ATOMIC_RELEASE);
    uv_handle_t *hs[] = {(uv_handle_t *)&s->stop_async, (uv_handle_t *)&s->sig_int, (uv_handle_t *)&s->sig_term,
                         (uv_handle_t *)&s->drain_timer};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++)
        if (!uv_is_closing(hs[i])) uv_close(hs[i], on_own_handle_closed);
}

static void on_http_closed(ds_http_server *h) {
    ds_server *s = h->user;
    close_own_handles(s);
}

static void close_http(ds_server *s) {
    if (s->http_closing) return;
    s->http_closing = true;
    ds_http_server_close(&s->http, on_http_closed); /* aborts what is still in flight */
}

void ds_server_job_add(ds_server *s, ds_server_job *j) {
    j->prev = NULL;
    j->next = s->jobs;
    if (s->jobs) s->jobs->prev = j;
    s->jobs = j;
}

void ds_server_job_remove(ds_server *s, ds_server_job *j) {
    if (j->prev) j->prev->next = j->next;
    else if (s->jobs == j) s->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    j->prev = j->next = NULL;
}

static void cancel_jobs(ds_server *s) {
    for (ds_server_job *j = s->jobs, *n; j; j = n) {
        n = j->next; /* cancel may end the job synchronously */
        j->cancel(j);
    }
}

/* Drain state machine, one tick every DRAIN_TICK_MS. Nothing pending → close. Drain time up →
 * cancel the generations (they end normally, streams with an error event). Still pending after
 * CANCEL_GRACE_S → abort the connections (their abort callbacks cancel what is left). Still
 * pending after ABORT_GRACE_S → give up on them (run returns DS_EBUSY). */
static void on_drain_tick(uv_timer_t *t) {
    ds_server *s = t->data;
    double now = ds_time_s();
    int64_t pending = ds_http_server_pending(&s->http);
    if (pending == 0) {
        if (!s->http_closing) DS_LOGI("server: all requests finished");
        close_http(s);
    } else if (now < s->deadline) {
        return;
    } else if (s->drain_phase == DRAIN_WAIT) {
        DS_LOGW("server: %lld request(s) still running after %.1f s; cancelling them", (long long)pending,
                s->params.shutdown_timeout_s);
        s->drain_phase = DRAIN_CANCELLED;
        s->deadline = now + CANCEL_GRACE_S;
        cancel_jobs(s);
    } else if (s->drain_phase == DRAIN_CANCELLED) {
        DS_LOGW("server: %lld request(s) did not end when cancelled; closing their connections", (long long)pending);
        s->drain_phase = DRAIN_ABORTED;
        s->deadline = now + ABORT_GRACE_S;
        close_http(s);
    } else {
        DS_LOGW("server: %lld request(s) still pending after aborting; exiting without them", (long long)pending);
        s->forced = true;
        close_own_handles(s);
        uv_stop(&s->loop);
    }
}

static void begin_stop(ds_server *s) {
    if (s->stopping) return;
    s->stopping = true;
    int64_t pending = ds_http_server_pending(&s->http);
    if (pending) DS_LOGI("server: shutting down; draining %lld request(s) (up to %.1f s)", (long long)pending,
                         s->params.shutdown_timeout_s);
    else DS_LOGI("server: shutting down");
    uv_signal_stop(&s->sig_int);
    uv_signal_stop(&s->sig_term);
    ds_ft_manager_stop(s->ft); /* the running job checkpoints while requests drain */
    s->deadline = ds_time_s() + (s->params.shutdown_timeout_s > 0 ? s->params.shutdown_timeout_s : 0);
    uv_timer_start(&s->drain_timer, on_drain_tick, 0, DRAIN_TICK_MS);
}

static void on_stop_async(uv_async_t *a) { begin_stop(a->data); }
static void on_signal(uv_signal_t *sg, int signum) { begin_stop(sg->data); }

/* ---- create / run / free ------------------------------------------------------------------ */

static char *dup_str(const char *s, const char *fallback) { return ds_strdup(s && s[0] ? s : fallback); }

static ds_http_params http_params_of(const ds_server_params *p) {
    ds_http_params h = ds_http_default_params();
    h.limits.max_body_bytes = p->max_body_bytes;
    h.limits.max_header_bytes = p->max_header_bytes;
    h.limits.max_headers = p->max_headers;
    h.max_connections = p->max_connections;
    h.idle_timeout_s = p->idle_timeout_s;
    h.header_timeout_s = p->header_timeout_s;
    h.body_timeout_s = p->body_timeout_s;
    h.write_timeout_s = p->write_timeout_s;
    h.max_write_buffer = p->max_write_buffer;
    return h;
}

static void init_own_handles(ds_server *s) {
    uv_async_init(&s->loop, &s->stop_async, on_stop_async);
    uv_signal_init(&s->loop, &s->sig_int);
    uv_signal_init(&s->loop, &s->sig_term);
    uv_timer_init(&s->loop, &s->drain_timer);
    s->stop_async.data = s->sig_int.data = s->sig_term.data = s->drain_timer.data = s;
    s->n_own_handles = 4;
    __atomic_store_n(&s->stop_open, 1, __ATOMIC_RELEASE);
}

static void free_strings(ds_server *s) {
    free(s->host);
    free(s->api_key);
    free(s->model_name);
    ds_metrics_free(s->metrics);
}

/* Everything but the loop and the handles: copies of the params, metrics. */
static bool init_state(ds_server *s, ds_engine *engine, const ds_server_params *params) {
    s->params = params ? *params : ds_server_default_params();
    s->host = dup_str(s->params.host, "127.0.0.1");
    s->api_key = dup_str(s->params.api_key, NULL);
    s->model_name = dup_str(s->params.served_model_name, "default");
    s->params.host = s->host;
    s->params.api_key = s->api_key;
    s->params.served_model_name = s->model_name;
    s->engine = engine;
    s->created = (int64_t)time(NULL);
    s->rand_state = (uint64_t)s->created * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)s;
    s->metrics = s->model_name ? ds_metrics_create(s->model_name) : NULL;
    return s->host && s->model_name && s->metrics && (!s->params.api_key || s->api_key);
}

ds_server *ds_server_create(ds_engine *engine, const ds_server_params *params, ds_err *err) {
    ds_server *s = calloc(1, sizeof *s);
    if (!s) {
        ds_err_set(err, DS_ENOMEM, "server: out of memory");
        return NULL;
    }
    if (!init_state(s, engine, params) || uv_loop_init(&s->loop) != 0) {
        ds_err_set(err, DS_ENOMEM, "server: out of memory");
        free_strings(s), free(s);
        return NULL;
    }
    ds_http_params hp = http_params_of(&s->params);
    if (ds_http_server_init(&s->http, &s->loop, &hp, server_dispatch, s, err) != 0) {
        uv_loop_close(&s->loop);
        free_strings(s), free(s);
        return NULL;
    }
    s->http.user = s;
    init_own_handles(s);
    if (ds_router_init(&s->router, s->api_key, route_tables, sizeof route_tables / sizeof route_tables[0]) != 0) {
        ds_err_set(err, DS_ERANGE, "server: the API key is longer than %zu bytes", sizeof s->router.api_key - 1);
        ds_server_free(s);
        return NULL;
    }
    if (!(s->files = ds_file_store_create(s->params.data_dir))) {
        ds_err_set(err, DS_ENOMEM, "server: out of memory");
        ds_server_free(s);
        return NULL;
    }
    if (s->engine) { /* without a model there is nothing to fine-tune: the job endpoints say so */
        if (!(s->ft = ds_ft_manager_create(ds_engine_model(s->engine), s->params.registry, s->params.data_dir,
                                           err))) {
            ds_server_free(s);
            return NULL;
        }
        ds_ft_manager_attach_engine(s->ft, s->engine, ds_server_train_budget(s));
        if (s->params.ft_limits) ds_ft_manager_set_limits(s->ft, s->params.ft_limits);
    }
    if (ds_http_server_listen(&s->http, s->host, s->params.port, err) != 0) {
        ds_server_free(s);
        return NULL;
    }
    return s;
}

int ds_server_port(const ds_server *s) { return ds_http_server_port(&s->http); }

int ds_server_run(ds_server *s) {
    if (s->params.handle_signals) {
        uv_signal_start(&s->sig_int, on_signal, SIGINT);
        uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    }
    DS_LOGI("server: listening on http://%s:%d (model \"%s\"%s)", s->host, ds_server_port(s), s->model_name,
            s->api_key ? ", API key required" : "");
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return s->forced ? DS_EBUSY : 0;
}

void ds_server_stop(ds_server *s) {
    if (s && __atomic_load_n(&s->stop_open, __ATOMIC_ACQUIRE)) uv_async_send(&s->stop_async);
}

void ds_server_free(ds_server *s) {
    if (!s) return;
    if (!s->forced) {
        begin_stop(s); /* no-op after a normal run; closes everything when never run */
        uv_run(&s->loop, UV_RUN_DEFAULT);
        if (uv_loop_close(&s->loop) != 0) DS_LOGW("server: event loop still busy at free");
        if (!ds_handlers_adapters_drain(s->params.shutdown_timeout_s > 1 ? s->params.shutdown_timeout_s : 1)) {
            ds_ft_manager_free(s->ft);
            return; /* a load thread blocked in the file system still holds s: leak it */
        }
    } else {
        /* Requests were still pending: the engine may still post to s->http. Leak rather than
         * free memory another thread may touch. */
        DS_LOGW("server: leaking the server state after a forced shutdown");
        ds_ft_manager_free(s->ft); /* the training thread reads the model: stop it before the engine goes */
        return;
    }
    ds_ft_manager_free(s->ft); /* cancels the running job, joins the training thread */
    ds_file_store_free(s->files);
    free_strings(s);
    free(s);
}
