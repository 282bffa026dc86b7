/* The route table (auth, 404/405) and the ds_server facade: the loop, the HTTP layer, the
 * built-in endpoints, signals and the shutdown sequence. */
#include <llhttp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "ds/server.h"
#include "server/http.h"
#include "server/openai_req.h"

/* ---- router ------------------------------------------------------------------------------- */

void ds_router_init(ds_router *r, const char *api_key) {
    memset(r, 0, sizeof *r);
    if (api_key) snprintf(r->api_key, sizeof r->api_key, "%s", api_key);
}

int ds_router_add(ds_router *r, int method, const char *pattern, ds_http_handler_fn fn, void *ud, unsigned flags) {
    if (r->n_routes >= (int32_t)(sizeof r->routes / sizeof r->routes[0]) || strlen(pattern) >= sizeof r->routes[0].pattern)
        return DS_ERANGE;
    ds_route *rt = &r->routes[r->n_routes++];
    rt->method = method;
    snprintf(rt->pattern, sizeof rt->pattern, "%s", pattern);
    rt->fn = fn;
    rt->ud = ud;
    rt->flags = flags;
    return 0;
}

/* Matches path against pattern segment by segment; "{x}" takes one non-empty segment, copied
 * NUL-terminated into req->params_buf_ (when req is not NULL). */
static bool route_match(const char *pattern, const char *path, ds_http_req *req) {
    size_t used = 0;
    int32_t np = 0;
    while (*pattern && *path) {
        if (*pattern == '{') {
            const char *pe = strchr(pattern, '}');
            size_t seg = strcspn(path, "/");
            if (!pe || seg == 0 || np >= 4 || used + seg + 1 > sizeof req->params_buf_) return false;
            if (req) {
                memcpy(req->params_buf_ + used, path, seg);
                req->params_buf_[used + seg] = '\0';
                req->params[np] = req->params_buf_ + used;
            }
            np++;
            used += seg + 1;
            pattern = pe + 1;
            path += seg;
        } else if (*pattern++ != *path++) {
            return false;
        }
    }
    if (*pattern || *path) return false;
    if (req) req->n_params = np;
    return true;
}

/* Constant-time comparison so the key cannot be guessed byte by byte from response times. */
static bool key_equal(const char *given, size_t given_len, const char *key) {
    size_t key_len = strlen(key);
    unsigned diff = (unsigned)(given_len ^ key_len);
    for (size_t i = 0; i < key_len; i++) diff |= (unsigned char)key[i] ^ (unsigned char)(i < given_len ? given[i] : 0);
    return diff == 0;
}

static bool authorized(const ds_router *rt, const ds_http_req *req) {
    if (!rt->api_key[0]) return true;
    const char *h = ds_http_req_header(req, "authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    h += 7;
    while (*h == ' ') h++;
    return key_equal(h, strlen(h), rt->api_key);
}

void ds_router_dispatch(ds_http_req *req, void *ud) {
    ds_router *rt = ud;
    const ds_route *hit = NULL;
    bool known = false, public_path = false;
    char allow[64] = "";
    for (int32_t i = 0; i < rt->n_routes; i++) {
        const ds_route *r = &rt->routes[i];
        if (!route_match(r->pattern, req->path, NULL)) continue;
        known = true;
        public_path |= (r->flags & DS_ROUTE_PUBLIC) != 0;
        if (r->method == req->method && !hit) hit = r;
        else if (strlen(allow) + 10 < sizeof allow)
            snprintf(allow + strlen(allow), sizeof allow - strlen(allow), "%s%s", allow[0] ? ", " : "",
                     llhttp_method_name((llhttp_method_t)r->method));
    }
    /* Auth comes before 404 so that the route table is not visible without the key. */
    if (!public_path && !authorized(rt, req)) {
        ds_http_req_add_header(req, "WWW-Authenticate", "Bearer");
        ds_http_respond_errorf(req, 401, NULL, "invalid_api_key", "Incorrect API key provided.");
        return;
    }
    if (!known) {
        ds_http_respond_errorf(req, 404, NULL, NULL, "Invalid URL (%s %.200s)", req->method_name, req->path);
        return;
    }
    if (!hit) {
        ds_http_req_add_header(req, "Allow", allow);
        ds_http_respond_errorf(req, 405, NULL, NULL, "Method %s not allowed for %.200s (allowed: %s)",
                               req->method_name, req->path, allow);
        return;
    }
    route_match(hit->pattern, req->path, req);
    hit->fn(req, hit->ud);
}

/* ---- the server facade -------------------------------------------------------------------- */

struct ds_server {
    uv_loop_t loop;
    ds_http_server http;
    ds_router router;
    ds_server_params params;
    char *host, *api_key, *model_name; /* owned copies of the params' strings */
    ds_engine *engine;
    uv_async_t stop_async;
    uv_signal_t sig_int, sig_term;
    uv_timer_t drain_timer;
    int64_t created;
    int n_own_handles;     /* stop_async, signals, drain_timer still open */
    int stop_open;         /* atomic: stop_async may be signalled */
    bool stopping, forced;
};

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
ds_router *ds_server_router(ds_server *s) { return &s->router; }
ds_http_server *ds_server_http(ds_server *s) { return &s->http; }

static int respond_json(ds_http_req *req, int status, ds_sb *b) {
    if (!ds_sb_ok(b)) {
        ds_sb_free(b);
        return ds_http_respond_errorf(req, 500, NULL, NULL, "out of memory");
    }
    int rc = ds_http_respond(req, status, "application/json", b->data ? b->data : "", b->len);
    ds_sb_free(b);
    return rc;
}

static void handle_health(ds_http_req *req, void *ud) {
    static const char ok[] = "{\"status\":\"ok\"}";
    ds_http_respond(req, 200, "application/json", ok, sizeof ok - 1);
}

static void handle_models(ds_http_req *req, void *ud) {
    ds_server *s = ud;
    /* The adapter registry adds one entry per adapter here (parent = the base's id). */
    ds_oai_model_entry base = {
        .id = s->model_name, .created = s->created, .max_model_len = s->params.max_model_len};
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_models_json(&b, &base, 1);
    respond_json(req, 200, &b);
}

/* Placeholder until the engine glue (completion handlers) is registered in its place: validates
 * the body, so clients already get precise 400s, then says generation is unavailable. */
static void handle_generate_unwired(ds_http_req *req, void *ud) {
    ds_oai_kind kind = (ds_oai_kind)(intptr_t)ud;
    ds_oai_request r;
    ds_oai_error e;
    if (ds_oai_request_parse(&r, kind, req->body, req->body_len, &e) != 0) {
        ds_http_respond_error(req, &e);
        return;
    }
    ds_oai_request_free(&r);
    ds_http_respond_errorf(req, 503, NULL, NULL, "generation is not available on this server");
}

static int register_routes(ds_server *s) {
    ds_router *rt = &s->router;
    int rc = 0;
    rc |= ds_router_add(rt, HTTP_GET, "/health", handle_health, s, DS_ROUTE_PUBLIC);
    rc |= ds_router_add(rt, HTTP_GET, "/v1/models", handle_models, s, 0);
    rc |= ds_router_add(rt, HTTP_POST, "/v1/completions", handle_generate_unwired, (void *)(intptr_t)DS_OAI_COMPLETION, 0);
    rc |= ds_router_add(rt, HTTP_POST, "/v1/chat/completions", handle_generate_unwired, (void *)(intptr_t)DS_OAI_CHAT, 0);
    return rc ? DS_ERANGE : 0;
}

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

static void on_drain_timeout(uv_timer_t *t) {
    ds_server *s = t->data;
    DS_LOGW("server: %lld request(s) still pending after %.1f s; exiting without them",
            (long long)ds_http_server_pending(&s->http), s->params.shutdown_timeout_s);
    s->forced = true;
    close_own_handles(s);
    uv_stop(&s->loop);
}

static void begin_stop(ds_server *s) {
    if (s->stopping) return;
    s->stopping = true;
    DS_LOGI("server: shutting down");
    uv_signal_stop(&s->sig_int);
    uv_signal_stop(&s->sig_term);
    uv_timer_start(&s->drain_timer, on_drain_timeout, (uint64_t)(s->params.shutdown_timeout_s * 1000.0), 0);
    ds_http_server_close(&s->http, on_http_closed);
}

static void on_stop_async(uv_async_t *a) { begin_stop(a->data); }
static void on_signal(uv_signal_t *sg, int signum) { begin_stop(sg->data); }

static char *dup_str(const char *s, const char *fallback) {
    const char *v = s && s[0] ? s : fallback;
    return v ? strdup(v) : NULL;
}

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

ds_server *ds_server_create(ds_engine *engine, const ds_server_params *params, ds_err *err) {
    ds_server *s = calloc(1, sizeof *s);
    if (!s) {
        ds_err_set(err, DS_ENOMEM, "server: out of memory");
        return NULL;
    }
    s->params = params ? *params : ds_server_default_params();
    s->host = dup_str(s->params.host, "127.0.0.1");
    s->api_key = dup_str(s->params.api_key, NULL);
    s->model_name = dup_str(s->params.served_model_name, "default");
    s->params.host = s->host;
    s->params.api_key = s->api_key;
    s->params.served_model_name = s->model_name;
    s->engine = engine;
    s->created = (int64_t)time(NULL);
    if (!s->host || !s->model_name || (s->params.api_key && !s->api_key) || uv_loop_init(&s->loop) != 0) {
        ds_err_set(err, DS_ENOMEM, "server: out of memory");
        free(s->host), free(s->api_key), free(s->model_name), free(s);
        return NULL;
    }
    ds_http_params hp = http_params_of(&s->params);
    if (ds_http_server_init(&s->http, &s->loop, &hp, ds_router_dispatch, &s->router, err) != 0) {
        uv_loop_close(&s->loop);
        free(s->host), free(s->api_key), free(s->model_name), free(s);
        return NULL;
    }
    s->http.user = s;
    ds_router_init(&s->router, s->api_key);
    init_own_handles(s);
    if (register_routes(s) != 0) {
        ds_err_set(err, DS_ERANGE, "server: route table full");
        ds_server_free(s);
        return NULL;
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
    } else {
        /* Requests were still pending: the engine may still post to s->http. Leak rather than
         * free memory another thread may touch. */
        DS_LOGW("server: leaking the server state after a forced shutdown");
        return;
    }
    free(s->host);
    free(s->api_key);
    free(s->model_name);
    free(s);
}
