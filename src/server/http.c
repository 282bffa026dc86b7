/* Connections: accept, read, parse (http_parse.c), dispatch, write, time out, close.
 *
 * One loop thread owns everything here. A connection is a uv_tcp_t + uv_timer_t pair in one
 * malloc'd struct, freed only when both close callbacks have run (libuv's rule: the memory of a
 * handle must live until its close callback). Requests are handed to the handler one at a time
 * per connection; pipelined bytes wait unparsed in `in` until the response ends, which is what
 * keeps answers in request order without buffering responses. */
#include <llhttp.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/http.h"
#include "server/openai_resp.h" /* error bodies are OpenAI-shaped, even the layer's own */

#define READ_BUF_SIZE (64 * 1024)
/* Unparsed input kept while a handler runs (pipelined requests); past it we stop reading until
 * the response ends, so a client cannot make us buffer without bound. */
#define IN_BACKLOG_MAX (256 * 1024)
/* After our last response on a closing connection: how long we keep draining the client's
 * unread bytes, so that closing does not turn into a RST that destroys the response in flight. */
#define LINGER_MS 2000
/* Connections over max_connections still get a 503 up to this many more; past that, a plain close. */
#define REJECT_SLACK 64

enum { P_IDLE, P_READ, P_HANDLER, P_DRAIN };      /* connection phase */
enum { RS_NEW, RS_STREAMING };                    /* response state of a request */

struct ds_http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    ds_http_server *srv;
    ds_http_conn *prev, *next;
    ds_http_parser parser;
    ds_sb in;            /* received bytes; [in_off, in.len) not parsed yet */
    size_t in_off;
    ds_http_req *req;    /* with the handler, not ended yet */
    size_t unsent;       /* bytes in uv_write requests not completed */
    int phase;
    int open_handles;
    bool reading, closing, processing, eof, reject, body_timer, lingering;
};

typedef struct wreq {
    uv_write_t req;
    size_t len;
    char data[];
} wreq;

static void conn_process(ds_http_conn *c);
static void conn_close(ds_http_conn *c, bool notify);
static void maybe_finish_close(ds_http_server *s);

ds_http_params ds_http_default_params(void) {
    ds_http_params p = {
        .limits = {.max_body_bytes = 32u << 20, .max_header_bytes = 16u << 10, .max_headers = 100},
        .max_connections = 1024,
        .idle_timeout_s = 60,
        .header_timeout_s = 10,
        .body_timeout_s = 60,
        .write_timeout_s = 60,
        .max_write_buffer = 4u << 20,
    };
    return p;
}

const char *ds_http_status_text(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}

/* ---- timers ------------------------------------------------------------------------------ */

static void on_timer(uv_timer_t *t);

static void conn_arm(ds_http_conn *c, double seconds) {
    if (seconds <= 0) {
        uv_timer_stop(&c->timer);
        return;
    }
    uv_timer_start(&c->timer, on_timer, (uint64_t)(seconds * 1000.0 + 0.5), 0);
}

/* Outside of reading a request: a write timeout while output is pending (a reader that stopped
 * reading); otherwise the idle timeout between requests, the linger period when draining, and
 * nothing while a handler runs (a generation may legitimately take minutes). */
static void conn_progress_timer(ds_http_conn *c) {
    if (c->unsent > 0) conn_arm(c, c->srv->params.write_timeout_s);
    else if (c->phase == P_DRAIN) conn_arm(c, LINGER_MS / 1000.0);
    else if (c->phase == P_IDLE) conn_arm(c, c->srv->params.idle_timeout_s);
    else uv_timer_stop(&c->timer);
}

static void conn_set_phase(ds_http_conn *c, int phase) {
    c->phase = phase;
    c->body_timer = false;
    const ds_http_params *p = &c->srv->params;
    if (phase == P_READ) conn_arm(c, p->header_timeout_s);
    else conn_progress_timer(c);
}

/* ---- writing ----------------------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
    wreq *w = (wreq *)req;
    ds_http_conn *c = req->handle->data;
    c->unsent -= w->len;
    free(w);
    if (status < 0) {
        if (!c->closing) DS_LOGD("http: write failed: %s", uv_strerror(status));
        conn_close(c, true); /* the client is gone: tell the request's owner */
        return;
    }
    if (!c->closing && c->phase != P_READ) conn_progress_timer(c);
}

/* Copies the parts into one write. On failure the connection is closed without notifying the
 * handler (callers inside handler calls report DS_ECANCELED instead). */
static int conn_write(ds_http_conn *c, const uv_buf_t *parts, int n) {
    if (c->closing) return DS_ECANCELED;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += parts[i].len;
    wreq *w = malloc(sizeof *w + total);
    if (!w) goto fail;
    w->len = 0;
    for (int i = 0; i < n; i++) {
        memcpy(w->data + w->len, parts[i].base, parts[i].len);
        w->len += parts[i].len;
    }
    uv_buf_t b = uv_buf_init(w->data, (unsigned)total);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        free(w);
        goto fail;
    }
    bool was_idle = c->unsent == 0;
    c->unsent += total;
    if (was_idle && c->phase != P_READ) conn_progress_timer(c);
    return 0;
fail:
    if (c->req) {
        c->req->conn_ = NULL;
        c->req = NULL;
    }
    conn_close(c, false);
    return DS_ECANCELED;
}

static const char *http_date(ds_http_server *s) {
    time_t now = time(NULL);
    if ((int64_t)now != s->date_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(s->date, sizeof s->date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        s->date_sec = (int64_t)now;
    }
    return s->date;
}

/* Status line and headers. `length` < 0: chunked (HTTP/1.1) or close-delimited. */
static void format_head(ds_sb *h, ds_http_server *s, int status, const char *ctype, long long length, bool chunked,
                        bool close, bool http10, const ds_sb *extra) {
    ds_sb_printf(h, "HTTP/1.1 %d %s\r\nDate: %s\r\nServer: deltaserve\r\n", status, ds_http_status_text(status),
                 http_date(s));
    if (ctype) ds_sb_printf(h, "Content-Type: %s\r\n", ctype);
    if (length >= 0) ds_sb_printf(h, "Content-Length: %lld\r\n", length);
    if (chunked) ds_sb_puts(h, "Transfer-Encoding: chunked\r\n");
    if (ctype && strncmp(ctype, "text/event-stream", 17) == 0)
        ds_sb_puts(h, "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
    if (close) ds_sb_puts(h, "Connection: close\r\n");
    else if (http10) ds_sb_puts(h, "Connection: keep-alive\r\n");
    if (extra && extra->len) ds_sb_append(h, extra->data, extra->len);
    ds_sb_puts(h, "\r\n");
}

/* A complete response from the layer itself (errors before any handler runs); then drain. */
static void conn_send_error(ds_http_conn *c, int status, const char *msg) {
    ds_oai_error e;
    ds_oai_error_set(&e, status, NULL, NULL, "%s", msg);
    ds_sb body, head;
    ds_sb_init(&body);
    ds_sb_init(&head);
    ds_oai_error_json(&body, &e);
    format_head(&head, c->srv, status, "application/json", (long long)body.len, false, true, false, NULL);
    if (ds_sb_ok(&body) && ds_sb_ok(&head)) {
        uv_buf_t parts[2] = {uv_buf_init(head.data, (unsigned)head.len), uv_buf_init(body.data, (unsigned)body.len)};
        conn_write(c, parts, 2);
    }
    ds_sb_free(&body);
    ds_sb_free(&head);
}

/* ---- closing ----------------------------------------------------------------------------- */

static void on_conn_handle_closed(uv_handle_t *h) {
    ds_http_conn *c = h->data;
    if (--c->open_handles > 0) return;
    ds_http_server *s = c->srv;
    if (c->prev) c->prev->next = c->next;
    else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    s->n_conns--;
    ds_sb_free(&c->in);
    free(c);
    maybe_finish_close(s);
}

/* Immediate close. With `notify`, an in-flight request learns through its abort callback. */
static void conn_close(ds_http_conn *c, bool notify) {
    if (c->closing) return;
    c->closing = true;
    uv_timer_stop(&c->timer);
    if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
    ds_http_parser_free(&c->parser);
    ds_http_req *r = c->req;
    c->req = NULL;
    if (r) {
        r->conn_ = NULL;
        void (*cb)(ds_http_req *, void *) = r->abort_cb_;
        r->abort_cb_ = NULL;
        if (notify && cb) cb(r, r->abort_ud_); /* may end r: it no longer points at us */
    }
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
    ds_http_conn *c = req->handle->data;
    if (status < 0 && !c->closing) conn_close(c, false);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf);

static void conn_start_reading(ds_http_conn *c) {
    if (c->reading || c->closing) return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = true;
    else conn_close(c, true);
}

/* Graceful close after our last response: flush, FIN, then read and discard until the client
 * closes or the linger timer fires. */
static void conn_drain(ds_http_conn *c) {
    if (c->closing || c->phase == P_DRAIN) return;
    conn_set_phase(c, P_DRAIN);
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        conn_close(c, false);
        return;
    }
    conn_start_reading(c);
}

static void on_timer(uv_timer_t *t) {
    ds_http_conn *c = t->data;
    switch (c->phase) {
    case P_READ:
        conn_send_error(c, 408, c->body_timer ? "timed out reading the request body"
                                              : "timed out reading the request headers");
        conn_drain(c);
        break;
    case P_HANDLER:
        DS_LOGD("http: client too slow to read, closing");
        conn_close(c, true);
        break;
    default: /* idle keep-alive, or the end of draining */
        conn_close(c, true);
        break;
    }
}

/* ---- request hand-off -------------------------------------------------------------------- */

static void dispatch(ds_http_conn *c, ds_http_req *r) {
    ds_http_server *s = c->srv;
    r->srv_ = s;
    r->conn_ = c;
    r->state_ = RS_NEW;
    c->req = r;
    s->n_reqs++;
    conn_set_phase(c, P_HANDLER);
    s->handler(r, s->handler_ud);
}

/* The handler ended r: free it and carry on with the connection. */
static void req_end(ds_http_req *r) {
    ds_http_server *s = r->srv_;
    ds_http_conn *c = r->conn_;
    bool keep = r->keep_alive;
    ds_http_req_free(r);
    s->n_reqs--;
    if (c) {
        c->req = NULL;
        if (keep && !c->eof && !s->closing) {
            conn_set_phase(c, P_IDLE);
            conn_start_reading(c);
            conn_process(c);
        } else {
            conn_drain(c);
        }
    }
    maybe_finish_close(s);
}

/* After a parse step that needs more bytes: timers for slow clients and `100 Continue`. */
static void conn_after_partial(ds_http_conn *c) {
    if (c->phase == P_IDLE && c->parser.started) conn_set_phase(c, P_READ);
    const ds_http_req *pr = c->parser.req;
    if (c->phase == P_READ && !c->body_timer && pr && pr->headers_done_) {
        c->body_timer = true;
        conn_arm(c, c->srv->params.body_timeout_s);
    }
    if (ds_http_parser_take_expect_continue(&c->parser)) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        uv_buf_t b = uv_buf_init((char *)cont, sizeof cont - 1);
        conn_write(c, &b, 1);
    }
}

/* Parses what is buffered and dispatches complete requests, one at a time. Not re-entrant: a
 * handler that answers synchronously ends its request inside dispatch(), and the loop below then
 * continues with the next pipelined request instead of recursing. */
static void conn_process(ds_http_conn *c) {
    if (c->processing) return;
    c->processing = true;
    while (!c->closing && (c->phase == P_IDLE || c->phase == P_READ) && c->in_off < c->in.len) {
        size_t used = 0;
        ds_http_parse_result pr = ds_http_parser_feed(&c->parser, c->in.data + c->in_off, c->in.len - c->in_off, &used);
        c->in_off += used;
        if (pr == DS_HTTP_PARSE_MORE) {
            conn_after_partial(c);
        } else if (pr == DS_HTTP_PARSE_ERROR) {
            DS_LOGD("http: bad request (%d %s)", c->parser.err_status, c->parser.err_reason);
            conn_send_error(c, c->parser.err_status, c->parser.err_reason ? c->parser.err_reason : "bad request");
            conn_drain(c);
        } else {
            dispatch(c, ds_http_parser_take(&c->parser));
        }
    }
    if (c->in_off == c->in.len) {
        ds_sb_reset(&c->in);
        c->in_off = 0;
    }
    c->processing = false;
}

/* ---- reading ------------------------------------------------------------------------------ */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    ds_http_conn *c = h->data;
    *buf = uv_buf_init(c->srv->read_buf, READ_BUF_SIZE);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
    ds_http_conn *c = st->data;
    if (n == 0 || c->closing) return;
    if (n < 0) { /* EOF or reset. A request in flight is abandoned: nobody will read its answer. */
        c->eof = true;
        if (n != UV_EOF) DS_LOGD("http: read error: %s", uv_strerror((int)n));
        if (c->phase == P_READ) DS_LOGD("http: truncated request");
        conn_close(c, true);
        return;
    }
    if (c->phase == P_DRAIN || c->reject) return; /* discarding */
    if (c->in_off > 0 && c->in_off == c->in.len) {
        ds_sb_reset(&c->in);
        c->in_off = 0;
    }
    ds_sb_append(&c->in, buf->base, (size_t)n);
    if (!ds_sb_ok(&c->in)) {
        conn_close(c, true);
        return;
    }
    if (c->phase == P_HANDLER) {
        if (c->in.len - c->in_off > IN_BACKLOG_MAX) {
            uv_read_stop(st);
            c->reading = false;
        }
        return;
    }
    conn_process(c);
}

/* ---- accepting ---------------------------------------------------------------------------- */

static void reject_busy(ds_http_conn *c) {
    c->reject = true;
    conn_send_error(c, 503, "too many connections, retry later");
    conn_drain(c);
}

static void on_connection(uv_stream_t *l, int status) {
    ds_http_server *s = l->data;
    if (status < 0) {
        DS_LOGW("http: accept: %s", uv_strerror(status));
        return;
    }
    ds_http_conn *c = calloc(1, sizeof *c);
    if (!c) return;
    c->srv = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
    ds_http_parser_init(&c->parser, &s->params.limits);
    c->phase = P_IDLE;
    if (uv_accept(l, (uv_stream_t *)&c->tcp) != 0 || s->closing || s->n_conns > s->params.max_connections + REJECT_SLACK) {
        conn_close(c, false);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1); /* SSE tokens are small writes that must not wait for Nagle */
    if (s->n_conns > s->params.max_connections) {
        reject_busy(c);
        return;
    }
    conn_set_phase(c, P_IDLE);
    conn_start_reading(c);
}

/* ---- server ------------------------------------------------------------------------------- */

static void run_tasks(uv_async_t *a) {
    ds_http_server *s = a->data;
    for (;;) { /* one at a time, so a task that finishes the close sees the rest in order */
        pthread_mutex_lock(&s->task_mu);
        ds_http_task *t = s->task_head;
        if (t) {
            s->task_head = t->next;
            if (!s->task_head) s->task_tail = NULL;
        }
        pthread_mutex_unlock(&s->task_mu);
        if (!t) return;
        t->fn(t);
    }
}

int ds_http_server_init(ds_http_server *s, uv_loop_t *loop, const ds_http_params *p, ds_http_handler_fn handler,
                        void *handler_ud, ds_err *err) {
    /* A write to a socket the peer has closed raises SIGPIPE, whose default action kills the
     * process; libuv reports EPIPE instead once it is ignored. Process-wide, as in every server. */
    signal(SIGPIPE, SIG_IGN);
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->params = p ? *p : ds_http_default_params();
    if (s->params.limits.max_headers < 1) s->params.limits.max_headers = 1;
    s->handler = handler;
    s->handler_ud = handler_ud;
    if (!(s->read_buf = malloc(READ_BUF_SIZE))) return ds_err_set(err, DS_ENOMEM, "http: out of memory");
    pthread_mutex_init(&s->task_mu, NULL);
    s->tasks_open = true;
    int rc = uv_tcp_init(loop, &s->listener);
    if (rc == 0) rc = uv_async_init(loop, &s->async, run_tasks);
    if (rc != 0) {
        free(s->read_buf);
        s->read_buf = NULL;
        return ds_err_set(err, DS_EIO, "http: %s", uv_strerror(rc));
    }
    s->listener.data = s->async.data = s;
    s->n_handles_open = 2;
    return 0;
}

int ds_http_server_listen(ds_http_server *s, const char *host, int port, ds_err *err) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    if (port < 0 || port > 65535 || getaddrinfo(host && host[0] ? host : NULL, portstr, &hints, &ai) != 0 || !ai)
        return ds_err_set(err, DS_EINVAL, "http: cannot resolve listen address %s:%d", host ? host : "*", port);
    int rc = uv_tcp_bind(&s->listener, ai->ai_addr, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
    freeaddrinfo(ai);
    if (rc != 0) return ds_err_set(err, DS_EIO, "http: cannot listen on %s:%d: %s", host ? host : "*", port, uv_strerror(rc));
    s->listening = true;
    return 0;
}

int ds_http_server_port(const ds_http_server *s) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (!s->listening || uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len) != 0) return -1;
    if (ss.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -1;
}

static void on_server_handle_closed(uv_handle_t *h) {
    ds_http_server *s = h->data;
    if (--s->n_handles_open > 0) return;
    free(s->read_buf);
    s->read_buf = NULL;
    if (s->close_cb) s->close_cb(s);
}

static void maybe_finish_close(ds_http_server *s) {
    if (!s->closing || s->finishing || s->n_conns > 0 || s->n_reqs > 0) return;
    s->finishing = true;
    pthread_mutex_lock(&s->task_mu);
    s->tasks_open = false;
    pthread_mutex_unlock(&s->task_mu);
    run_tasks(&s->async); /* what was posted before the door closed still runs */
    uv_close((uv_handle_t *)&s->async, on_server_handle_closed);
}

void ds_http_server_close(ds_http_server *s, void (*close_cb)(ds_http_server *)) {
    if (s->closing) return;
    s->closing = true;
    s->close_cb = close_cb;
    uv_close((uv_handle_t *)&s->listener, on_server_handle_closed);
    for (ds_http_conn *c = s->conns; c; c = c->next) conn_close(c, true);
    maybe_finish_close(s);
}

int ds_http_server_post(ds_http_server *s, ds_http_task *t) {
    t->next = NULL;
    pthread_mutex_lock(&s->task_mu);
    if (!s->tasks_open) {
        pthread_mutex_unlock(&s->task_mu);
        return DS_ECANCELED;
    }
    if (s->task_tail) s->task_tail->next = t;
    else s->task_head = t;
    s->task_tail = t;
    /* Under the lock: the loop closes the async handle only after closing the door, also under
     * the lock, so this never touches a closed handle. */
    uv_async_send(&s->async);
    pthread_mutex_unlock(&s->task_mu);
    return 0;
}

int64_t ds_http_server_pending(const ds_http_server *s) { return s->n_reqs; }

/* ---- responses ---------------------------------------------------------------------------- */

void ds_http_req_on_abort(ds_http_req *r, void (*cb)(ds_http_req *, void *), void *ud) {
    r->abort_cb_ = cb;
    r->abort_ud_ = ud;
}

bool ds_http_req_aborted(const ds_http_req *r) { return r->conn_ == NULL; }

ds_http_server *ds_http_req_server(const ds_http_req *r) { return r->srv_; }

void ds_http_req_add_header(ds_http_req *r, const char *name, const char *value) {
    if (strpbrk(name, "\r\n:") || strpbrk(value, "\r\n")) return;
    ds_sb_printf(&r->extra_headers_, "%s: %s\r\n", name, value);
}

static bool must_close(const ds_http_req *r) {
    return !r->keep_alive || r->conn_->eof || r->srv_->closing;
}

int ds_http_respond(ds_http_req *r, int status, const char *content_type, const char *body, size_t len) {
    DS_ASSERT(r->state_ == RS_NEW);
    ds_http_conn *c = r->conn_;
    if (!c) {
        req_end(r);
        return DS_ECANCELED;
    }
    bool close = must_close(r);
    r->keep_alive = !close;
    ds_sb head;
    ds_sb_init(&head);
    format_head(&head, r->srv_, status, content_type, (long long)len, false, close, r->http_minor == 0,
                &r->extra_headers_);
    bool head_only = r->method == HTTP_HEAD;
    uv_buf_t parts[2] = {uv_buf_init(head.data, (unsigned)head.len), uv_buf_init((char *)body, (unsigned)len)};
    int rc = ds_sb_ok(&head) ? conn_write(c, parts, head_only || !len ? 1 : 2) : DS_ENOMEM;
    ds_sb_free(&head);
    if (rc) r->keep_alive = false;
    req_end(r);
    return rc ? DS_ECANCELED : 0;
}

/* A handler ended a request without answering (a bug): the client still gets a 500. */
static int respond_empty_error(ds_http_req *r) {
    ds_oai_error e;
    ds_oai_error_set(&e, 500, NULL, NULL, "internal error: empty response");
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_error_json(&b, &e);
    int rc = ds_http_respond(r, 500, "application/json", b.data ? b.data : "", b.len);
    ds_sb_free(&b);
    return rc;
}

int ds_http_stream_start(ds_http_req *r, int status, const char *content_type) {
    DS_ASSERT(r->state_ == RS_NEW);
    r->state_ = RS_STREAMING;
    ds_http_conn *c = r->conn_;
    if (!c) return DS_ECANCELED;
    /* HTTP/1.0 has no chunked encoding: the end of the body is the end of the connection. */
    r->chunked_out_ = !(r->http_major == 1 && r->http_minor == 0);
    bool close = must_close(r) || !r->chunked_out_;
    r->keep_alive = !close;
    ds_sb head;
    ds_sb_init(&head);
    format_head(&head, r->srv_, status, content_type, -1, r->chunked_out_, close, false, &r->extra_headers_);
    uv_buf_t b = uv_buf_init(head.data, (unsigned)head.len);
    int rc = ds_sb_ok(&head) ? conn_write(c, &b, 1) : DS_ENOMEM;
    ds_sb_free(&head);
    return rc ? DS_ECANCELED : 0;
}

int ds_http_stream_write(ds_http_req *r, const char *data, size_t len) {
    DS_ASSERT(r->state_ == RS_STREAMING);
    ds_http_conn *c = r->conn_;
    if (!c) return DS_ECANCELED;
    if (len == 0) return 0; /* an empty chunk would end the body */
    size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
    if (queued + len > c->srv->params.max_write_buffer) {
        /* The reader cannot keep up and we will not buffer without bound: drop the client. */
        DS_LOGD("http: client too slow (%zu bytes queued), closing", queued);
        r->conn_ = NULL;
        c->req = NULL;
        conn_close(c, false);
        return DS_ECANCELED;
    }
    char size_line[24];
    int sl = snprintf(size_line, sizeof size_line, "%zx\r\n", len);
    uv_buf_t parts[3] = {uv_buf_init(size_line, (unsigned)sl), uv_buf_init((char *)data, (unsigned)len),
                         uv_buf_init("\r\n", 2)};
    int rc = r->chunked_out_ ? conn_write(c, parts, 3) : conn_write(c, &parts[1], 1);
    return rc ? DS_ECANCELED : 0;
}

size_t ds_http_stream_buffered(const ds_http_req *r) {
    return r->conn_ ? uv_stream_get_write_queue_size((const uv_stream_t *)&r->conn_->tcp) : 0;
}

int ds_http_stream_end(ds_http_req *r) {
    if (r->state_ == RS_NEW) /* ended without a start: a handler bug, but answer something */
        return respond_empty_error(r);
    int rc = 0;
    if (r->conn_ && r->chunked_out_) {
        uv_buf_t b = uv_buf_init("0\r\n\r\n", 5);
        rc = conn_write(r->conn_, &b, 1);
    }
    if (!r->conn_) rc = DS_ECANCELED;
    req_end(r);
    return rc ? DS_ECANCELED : 0;
}
