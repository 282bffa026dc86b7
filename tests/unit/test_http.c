/* The HTTP layer and router over real loopback sockets: the server runs on its own thread (as in
 * deltaserve), the test talks raw HTTP/1.1 to it. Every wait has a deadline; traffic stays on
 * 127.0.0.1. After each misbehaving client the server must still answer a fresh one. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <llhttp.h>

#include "ds/server.h"
#include "ds_test.h"
#include "server/http.h"
#include "server/router.h"

#define KEY "sekrit"
#define AUTH "Authorization: Bearer " KEY "\r\n"

static struct {
    uv_loop_t loop;
    ds_http_server http;
    ds_router router;
    pthread_t thread;
    atomic_int port;
    atomic_bool closed;
} g;

static atomic_int g_stream_aborts, g_stream_done, g_backpressure, g_engine_aborts, g_engine_finals;

/* ---- test handlers (loop thread) ---------------------------------------------------------- */

/* The router's verdict as a bare status (server.c turns it into OpenAI errors, tested through the
 * facade below). */
static void router_dispatch(ds_http_req *req, void *ud) {
    static const int status_of[] = {[DS_ROUTE_UNAUTHORIZED] = 401, [DS_ROUTE_NOT_FOUND] = 404,
                                    [DS_ROUTE_BAD_METHOD] = 405};
    const ds_route *rt;
    char allow[64];
    ds_route_result res = ds_router_find(ud, req, &rt, allow);
    if (res == DS_ROUTE_FOUND) {
        rt->fn(req, rt->arg);
        return;
    }
    if (res == DS_ROUTE_BAD_METHOD) ds_http_req_add_header(req, "Allow", allow);
    ds_http_respond(req, status_of[res], "text/plain", "", 0);
}

static void h_echo(ds_http_req *req, void *ud) {
    if (req->method == HTTP_GET) ds_http_respond(req, 200, "text/plain", req->query, strlen(req->query));
    else ds_http_respond(req, 200, "application/octet-stream", req->body, req->body_len);
}

static void h_health(ds_http_req *req, void *ud) { ds_http_respond(req, 200, "text/plain", "ok", 2); }

typedef struct slow_ctx {
    uv_timer_t timer;
    ds_http_req *req;
} slow_ctx;

static void free_handle(uv_handle_t *h) { free(h->data); }

static void slow_fire(uv_timer_t *t) {
    slow_ctx *c = t->data;
    ds_http_respond(c->req, 200, "text/plain", "slow", 4); /* DS_ECANCELED if gone: freed anyway */
    uv_close((uv_handle_t *)t, free_handle);
}

static void h_slow(ds_http_req *req, void *ud) {
    slow_ctx *c = calloc(1, sizeof *c);
    c->req = req;
    uv_timer_init(ds_http_req_server(req)->loop, &c->timer);
    c->timer.data = c;
    uv_timer_start(&c->timer, slow_fire, 150, 0);
}

/* GET /stream?n=N&ms=M&size=S : N events of S bytes every M ms, then [DONE]. */
typedef struct stream_ctx {
    uv_timer_t timer;
    ds_http_req *req;
    int i, n, size;
} stream_ctx;

static void stream_finish(stream_ctx *c) {
    if (c->req) ds_http_stream_end(c->req);
    c->req = NULL;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, free_handle);
}

static void stream_abort(ds_http_req *req, void *ud) {
    atomic_fetch_add(&g_stream_aborts, 1);
    stream_finish(ud);
}

static void stream_tick(uv_timer_t *t) {
    stream_ctx *c = t->data;
    char buf[64 * 1024];
    int len = snprintf(buf, sizeof buf, "data: %d", c->i);
    while (len < c->size && len < (int)sizeof buf - 2) buf[len++] = 'x';
    len += snprintf(buf + len, sizeof buf - len, "\n\n");
    if (c->i == c->n) len = snprintf(buf, sizeof buf, "data: [DONE]\n\n");
    if (ds_http_stream_write(c->req, buf, (size_t)len) != 0) {
        atomic_fetch_add(&g_backpressure, 1);
        stream_finish(c);
        return;
    }
    if (c->i++ == c->n) {
        atomic_fetch_add(&g_stream_done, 1);
        stream_finish(c);
    }
}

static int query_int(const char *q, const char *key, int dflt) {
    const char *p = strstr(q, key);
    return p ? atoi(p + strlen(key)) : dflt;
}

static void h_stream(ds_http_req *req, void *ud) {
    stream_ctx *c = calloc(1, sizeof *c);
    c->req = req;
    c->n = query_int(req->query, "n=", 5);
    c->size = query_int(req->query, "size=", 0);
    int ms = query_int(req->query, "ms=", 2);
    uv_timer_init(ds_http_req_server(req)->loop, &c->timer);
    c->timer.data = c;
    ds_http_req_on_abort(req, stream_abort, c);
    ds_http_stream_start(req, 200, "text/event-stream");
    uv_timer_start(&c->timer, stream_tick, (uint64_t)ms, (uint64_t)ms);
}

/* POST /engine: the recommended engine glue, with a thread standing in for the engine. The
 * "engine" thread posts one task per event; the abort callback only flags the cancel (as
 * ds_engine_cancel would), and the request ends when the final event arrives. */
typedef struct eng_req {
    ds_http_req *req;
    atomic_bool cancel;
    int n;
} eng_req;

typedef struct eng_msg {
    ds_http_task task; /* first member: the task pointer is the message pointer */
    eng_req *er;
    int i;
    bool final;
} eng_msg;

static void eng_deliver(ds_http_task *t) {
    eng_msg *m = (eng_msg *)t;
    eng_req *er = m->er;
    char buf[64];
    if (!m->final) {
        int len = snprintf(buf, sizeof buf, "data: tok%d\n\n", m->i);
        ds_http_stream_write(er->req, buf, (size_t)len); /* DS_ECANCELED after a disconnect: fine */
    } else {
        ds_http_stream_write(er->req, "data: [DONE]\n\n", 14);
        ds_http_stream_end(er->req);
        atomic_fetch_add(&g_engine_finals, 1);
        free(er); /* the engine thread's last act was posting this message */
    }
    free(m);
}

static void eng_post(eng_req *er, int i, bool final) {
    eng_msg *m = calloc(1, sizeof *m);
    m->er = er;
    m->i = i;
    m->final = final;
    m->task.fn = eng_deliver;
    if (ds_http_server_post(&g.http, &m->task) != 0) free(m);
}

static void *eng_thread(void *arg) {
    eng_req *er = arg;
    for (int i = 0; i < er->n && !atomic_load(&er->cancel); i++) {
        usleep(3000);
        eng_post(er, i, false);
    }
    eng_post(er, 0, true);
    return NULL;
}

static void eng_abort(ds_http_req *req, void *ud) {
    eng_req *er = ud;
    atomic_fetch_add(&g_engine_aborts, 1);
    atomic_store(&er->cancel, true);
}

static void h_engine(ds_http_req *req, void *ud) {
    eng_req *er = calloc(1, sizeof *er);
    er->req = req;
    er->n = atoi(req->body);
    ds_http_req_on_abort(req, eng_abort, er);
    ds_http_stream_start(req, 200, "text/event-stream");
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&t, &attr, eng_thread, er);
    pthread_attr_destroy(&attr);
}

static void h_jobs(ds_http_req *req, void *ud) {
    char b[128];
    int n = snprintf(b, sizeof b, "%s|%s", req->params[0], req->n_params > 1 ? req->params[1] : "-");
    ds_http_respond(req, 200, "text/plain", b, (size_t)n);
}

/* ---- server thread ------------------------------------------------------------------------ */

static void *server_main(void *arg) {
    ds_http_params p = ds_http_default_params();
    p.limits.max_body_bytes = 1024;
    p.limits.max_header_bytes = 2048;
    p.limits.max_headers = 20;
    p.max_connections = 8;
    p.idle_timeout_s = 0.5;
    p.header_timeout_s = 0.3;
    p.body_timeout_s = 0.3;
    p.write_timeout_s = 2;
    p.max_write_buffer = 64 * 1024;
    uv_loop_init(&g.loop);
    static const ds_route routes[] = {
        {HTTP_GET, "/health", h_health, NULL, DS_ROUTE_PUBLIC},
        {HTTP_GET, "/echo", h_echo, NULL, 0},
        {HTTP_POST, "/echo", h_echo, NULL, 0},
        {HTTP_GET, "/slow", h_slow, NULL, 0},
        {HTTP_GET, "/stream", h_stream, NULL, 0},
        {HTTP_POST, "/engine", h_engine, NULL, 0},
        {HTTP_GET, "/v1/models", h_health, NULL, 0},
        {HTTP_GET, "/jobs/{id}/events/{ev}", h_jobs, NULL, 0},
        {HTTP_GET, "/jobs/{id}", h_jobs, NULL, 0},
    };
    static const ds_route_table table = {routes, sizeof routes / sizeof routes[0]};
    static const ds_route_table *const tables[] = {&table};
    CHECK_EQ_INT(ds_router_init(&g.router, KEY, tables, 1), 0);
    ds_err err;
    if (ds_http_server_init(&g.http, &g.loop, &p, router_dispatch, &g.router, &err) != 0 ||
        ds_http_server_listen(&g.http, "127.0.0.1", 0, &err) != 0) {
        fprintf(stderr, "server: %s\n", err.msg);
        atomic_store(&g.port, -1);
        return NULL;
    }
    atomic_store(&g.port, ds_http_server_port(&g.http));
    uv_run(&g.loop, UV_RUN_DEFAULT);
    uv_loop_close(&g.loop);
    return NULL;
}

static void on_closed(ds_http_server *s) { atomic_store(&g.closed, true); }

static void stop_task(ds_http_task *t) {
    ds_http_server_close(&g.http, on_closed);
    free(t);
}

/* ---- client helpers ----------------------------------------------------------------------- */

typedef struct client {
    int fd;
    char buf[256 * 1024];
    size_t len;
} client;

typedef struct resp {
    int status;
    char head[4096];
    char body[64 * 1024];
    size_t body_len;
} resp;

static int connect_fd(int rcvbuf) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (rcvbuf) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atomic_load(&g.port))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static client *client_new(void) {
    client *c = calloc(1, sizeof *c);
    c->fd = connect_fd(0);
    CHECK(c->fd >= 0);
    return c;
}

static void client_free(client *c) {
    if (c->fd >= 0) close(c->fd);
    free(c);
}

static void send_str(client *c, const char *s) {
    size_t n = strlen(s), off = 0;
    while (off < n) {
        ssize_t w = send(c->fd, s + off, n - off, MSG_NOSIGNAL);
        if (w <= 0) break;
        off += (size_t)w;
    }
}

/* Reads more bytes; false on EOF, error or the 5 s timeout. */
static bool fill(client *c) {
    if (c->len >= sizeof c->buf - 1) return false;
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
    if (n <= 0) return false;
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    return true;
}

static void consume(client *c, size_t n) {
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    c->buf[c->len] = '\0';
}

/* Position just past the next CRLF at or after `from`, filling as needed; 0 if none. */
static size_t line_end(client *c, size_t from) {
    for (;;) {
        char *p = c->len > from ? strstr(c->buf + from, "\r\n") : NULL;
        if (p) return (size_t)(p - c->buf) + 2;
        if (!fill(c)) return 0;
    }
}

static bool read_chunked(client *c, resp *r) {
    for (;;) {
        size_t le = line_end(c, 0);
        if (!le) return false;
        size_t sz = strtoul(c->buf, NULL, 16);
        consume(c, le);
        while (c->len < sz + 2)
            if (!fill(c)) return false;
        if (sz == 0) {
            consume(c, 2);
            return true;
        }
        if (r->body_len + sz < sizeof r->body) memcpy(r->body + r->body_len, c->buf, sz), r->body_len += sz;
        consume(c, sz + 2);
    }
}

/* Reads one response (a 1xx counts as one). Returns the status, or -1 on EOF/timeout. */
static int read_resp(client *c, resp *r) {
    memset(r, 0, sizeof *r);
    char *end;
    while (!(end = strstr(c->buf, "\r\n\r\n")))
        if (!fill(c)) return -1;
    size_t hlen = (size_t)(end - c->buf) + 4;
    memcpy(r->head, c->buf, hlen < sizeof r->head ? hlen : sizeof r->head - 1);
    consume(c, hlen);
    if (sscanf(r->head, "HTTP/1.%*d %d", &r->status) != 1) return -1;
    if (r->status < 200) return r->status;
    const char *cl = strcasestr(r->head, "\r\nContent-Length:");
    if (strcasestr(r->head, "\r\nTransfer-Encoding: chunked")) return read_chunked(c, r) ? r->status : -1;
    if (cl) {
        size_t n = strtoul(cl + 17, NULL, 10);
        while (c->len < n)
            if (!fill(c)) return -1;
        memcpy(r->body, c->buf, n < sizeof r->body ? n : sizeof r->body - 1);
        r->body_len = n;
        consume(c, n);
        return r->status;
    }
    while (fill(c)) {} /* close-delimited */
    memcpy(r->body, c->buf, c->len < sizeof r->body ? c->len : sizeof r->body - 1);
    r->body_len = c->len;
    consume(c, c->len);
    return r->status;
}

/* True when the server closes the connection (EOF or reset) within the recv timeout. */
static bool sees_close(client *c) {
    char tmp[4096];
    for (int i = 0; i < 1000; i++) {
        ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
        if (n < 0) return false; /* timeout */
    }
    return false;
}

static bool wait_until(atomic_int *v, int target, double seconds) {
    double end = ds_time_s() + seconds;
    while (ds_time_s() < end) {
        if (atomic_load(v) >= target) return true;
        usleep(2000);
    }
    return atomic_load(v) >= target;
}

/* The server still answers a fresh client. */
static void check_alive(const char *after) {
    client *c = client_new();
    resp r;
    send_str(c, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_MSG(read_resp(c, &r) == 200 && strcmp(r.body, "ok") == 0, "server not alive after %s", after);
    client_free(c);
}

static bool is_error_json(const resp *r, const char *code_or_null) {
    if (!strcasestr(r->head, "Content-Type: application/json")) return false;
    if (!strstr(r->body, "{\"error\":{\"message\":") || !strstr(r->body, "\"type\":") || !strstr(r->body, "\"param\":"))
        return false;
    if (!code_or_null) return strstr(r->body, "\"code\":") != NULL;
    char want[64];
    snprintf(want, sizeof want, "\"code\":\"%s\"", code_or_null);
    return strstr(r->body, want) != NULL;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_keep_alive(void) {
    client *c = client_new();
    resp r;
    for (int i = 0; i < 3; i++) {
        char req[128], want[16];
        snprintf(req, sizeof req, "GET /echo?n%d HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n", i);
        snprintf(want, sizeof want, "n%d", i);
        send_str(c, req);
        CHECK_EQ_INT(read_resp(c, &r), 200);
        CHECK(strcmp(r.body, want) == 0);
        CHECK(!strcasestr(r.head, "Connection: close") && strcasestr(r.head, "\r\nDate: "));
    }
    send_str(c, "GET /echo?k HTTP/1.0\r\nConnection: keep-alive\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "k") == 0 && strcasestr(r.head, "Connection: keep-alive"));
    /* HTTP/1.0 without keep-alive: answered, then closed. */
    send_str(c, "GET /echo?old HTTP/1.0\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "old") == 0 && strcasestr(r.head, "Connection: close"));
    CHECK(sees_close(c));
    client_free(c);

    c = client_new();
    send_str(c, "GET /echo?bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "bye") == 0 && strcasestr(r.head, "Connection: close"));
    CHECK(sees_close(c));
    client_free(c);
}

static void test_pipelining(void) {
    client *c = client_new();
    resp r;
    /* The slow one answers after 150 ms, the others at once: order must still hold. */
    send_str(c, "GET /slow HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n"
                "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 5\r\n\r\nhello"
                "GET /echo?third HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n"
                "GET /jobs/ft-1/events/e9 HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "slow") == 0);
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "hello") == 0);
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "third") == 0);
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "ft-1|e9") == 0);
    client_free(c);
}

static void test_chunked_body(void) {
    client *c = client_new();
    resp r;
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Transfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "hello world") == 0);
    /* Split into tiny writes: the parser must cope with any boundary. */
    const char *msg = "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    for (const char *p = msg; *p; p += 7) {
        char part[8] = {0};
        strncpy(part, p, 7);
        send_str(c, part);
        usleep(500);
        if (strlen(p) < 7) break;
    }
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "abc") == 0);
    client_free(c);
}

static void test_expect_continue(void) {
    client *c = client_new();
    resp r;
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 100);
    send_str(c, "ping");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "ping") == 0);
    /* Too large: 413 straight away, without asking for the body. */
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 413);
    CHECK(is_error_json(&r, NULL));
    CHECK(sees_close(c));
    client_free(c);
    check_alive("expect");
}

static void test_limits(void) {
    resp r;
    client *c = client_new();
    char big[3000];
    memset(big, 'a', sizeof big);
    big[sizeof big - 1] = '\0';
    /* Content-Length over the limit, with the body sent anyway (lingering close keeps the 413
     * readable instead of a reset). */
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 2999\r\n\r\n");
    send_str(c, big);
    CHECK_EQ_INT(read_resp(c, &r), 413);
    CHECK(is_error_json(&r, NULL) && strcasestr(r.head, "Connection: close"));
    CHECK(sees_close(c));
    client_free(c);
    check_alive("413");

    c = client_new();
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Transfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 3; i++) send_str(c, "200\r\n"), send_str(c, big + 2999 - 512), send_str(c, "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 413);
    client_free(c);
    check_alive("chunked 413");

    c = client_new();
    send_str(c, "GET /echo HTTP/1.1\r\nHost: t\r\n" AUTH);
    for (int i = 0; i < 30; i++) send_str(c, "X-Many: 1\r\n");
    send_str(c, "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 431);
    CHECK(is_error_json(&r, NULL));
    CHECK(sees_close(c));
    client_free(c);
    check_alive("431 count");

    c = client_new();
    send_str(c, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: ");
    send_str(c, big);
    send_str(c, "\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 431);
    client_free(c);
    check_alive("431 bytes");
}

static void test_malformed(void) {
    resp r;
    client *c = client_new();
    send_str(c, "GARBAGE\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 400);
    CHECK(is_error_json(&r, NULL));
    CHECK(sees_close(c));
    client_free(c);
    check_alive("400");

    c = client_new();
    send_str(c, "GET /echo HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 400); /* smuggling-shaped: both framings */
    client_free(c);

    c = client_new();
    send_str(c, "GET /echo HTTP/1.1\r\nHost: t\r\nExpect: something-else\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 417);
    client_free(c);

    /* Truncated request, then the client goes away. */
    c = client_new();
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 10\r\n\r\nabc");
    usleep(20000);
    client_free(c);
    c = client_new();
    send_str(c, "GET /ech");
    client_free(c);
    check_alive("truncated");
}

static void test_timeouts(void) {
    resp r;
    client *c = client_new();
    double t0 = ds_time_s();
    send_str(c, "GET /echo HTTP/1.1\r\nHost: t\r\n"); /* headers never finish */
    CHECK_EQ_INT(read_resp(c, &r), 408);
    CHECK(ds_time_s() - t0 < 3.0);
    CHECK(sees_close(c));
    client_free(c);

    c = client_new();
    send_str(c, "POST /echo HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 10\r\n\r\nab"); /* body stalls */
    CHECK_EQ_INT(read_resp(c, &r), 408);
    client_free(c);

    c = client_new(); /* idle keep-alive connection: closed quietly */
    t0 = ds_time_s();
    CHECK(sees_close(c));
    CHECK(ds_time_s() - t0 < 3.0);
    client_free(c);
    check_alive("timeouts");
}

static void test_auth_and_routing(void) {
    resp r;
    client *c = client_new();
    send_str(c, "GET /echo?x HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 401);
    send_str(c, "GET /echo?x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 401);
    send_str(c, "GET /echo?x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sekrit2\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 401);
    send_str(c, "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"); /* unknown path, no key: 401 first */
    CHECK_EQ_INT(read_resp(c, &r), 401);
    send_str(c, "GET /echo?x HTTP/1.1\r\nHost: t\r\nauthorization: bearer " KEY "\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    send_str(c, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    send_str(c, "GET /nope HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 404);
    send_str(c, "POST /v1/models HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 0\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 405);
    CHECK(strcasestr(r.head, "\r\nAllow: GET") != NULL);
    send_str(c, "GET /jobs/abc HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "abc|-") == 0);
    send_str(c, "GET /jobs/ HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n"); /* an empty segment is no match */
    CHECK_EQ_INT(read_resp(c, &r), 404);
    client_free(c);
}

static void test_streaming(void) {
    resp r;
    client *c = client_new();
    send_str(c, "GET /stream?n=5&ms=2 HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcasestr(r.head, "Content-Type: text/event-stream") && strcasestr(r.head, "Transfer-Encoding: chunked"));
    CHECK(strstr(r.body, "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\ndata: [DONE]\n\n") == r.body);
    send_str(c, "GET /echo?again HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n"); /* same connection */
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strcmp(r.body, "again") == 0);
    client_free(c);

    /* Disconnect mid-stream: the handler hears about it. */
    int before = atomic_load(&g_stream_aborts);
    c = client_new();
    send_str(c, "GET /stream?n=100000&ms=2 HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    for (int i = 0; i < 100 && !strstr(c->buf, "data: 3\n"); i++) fill(c);
    CHECK(strstr(c->buf, "data: 3\n") != NULL);
    client_free(c);
    CHECK(wait_until(&g_stream_aborts, before + 1, 3.0));
    check_alive("stream disconnect");
}

static void test_backpressure(void) {
    int before = atomic_load(&g_backpressure) + atomic_load(&g_stream_aborts);
    client *c = calloc(1, sizeof *c);
    c->fd = connect_fd(4096); /* small receive window, and we never read */
    CHECK(c->fd >= 0);
    send_str(c, "GET /stream?n=1000000&ms=1&size=16000 HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    /* Either the write buffer bound (DS_ECANCELED from the write) or the write timeout fires. */
    atomic_int sum;
    double end = ds_time_s() + 8.0;
    bool seen = false;
    while (!seen && ds_time_s() < end) {
        atomic_store(&sum, atomic_load(&g_backpressure) + atomic_load(&g_stream_aborts));
        seen = atomic_load(&sum) > before;
        usleep(5000);
    }
    CHECK_MSG(seen && atomic_load(&g_backpressure) > 0, "slow reader was not dropped");
    client_free(c);
    check_alive("backpressure");
}

static void test_engine_glue(void) {
    resp r;
    client *c = client_new();
    int finals = atomic_load(&g_engine_finals);
    send_str(c, "POST /engine HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 2\r\n\r\n20");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strstr(r.body, "data: tok0\n\ndata: tok1\n\n") == r.body && strstr(r.body, "data: tok19\n\ndata: [DONE]\n\n"));
    client_free(c);
    CHECK(wait_until(&g_engine_finals, finals + 1, 3.0));

    /* Disconnect: the abort callback cancels the "engine", whose final event ends the request. */
    int aborts = atomic_load(&g_engine_aborts);
    c = client_new();
    send_str(c, "POST /engine HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 6\r\n\r\n100000");
    for (int i = 0; i < 100 && !strstr(c->buf, "tok2\n"); i++) fill(c);
    client_free(c);
    CHECK(wait_until(&g_engine_aborts, aborts + 1, 3.0));
    CHECK(wait_until(&g_engine_finals, finals + 2, 3.0));
}

static void test_max_connections(void) {
    client *cs[8];
    resp r;
    for (int i = 0; i < 8; i++) { /* fill every slot, each proven accepted by an answer */
        cs[i] = client_new();
        send_str(cs[i], "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
        CHECK_EQ_INT(read_resp(cs[i], &r), 200);
    }
    client *extra = client_new();
    CHECK_EQ_INT(read_resp(extra, &r), 503);
    CHECK(is_error_json(&r, NULL));
    CHECK(sees_close(extra));
    client_free(extra);
    for (int i = 0; i < 8; i++) client_free(cs[i]);
    usleep(50000); /* let the server see the closes */
    check_alive("max connections");
}

/* The public facade: ds_server_create / run / stop / free with the built-in routes (no engine:
 * generation endpoints validate, then answer 503). Runs on its own thread, as in deltaserve. */
static struct {
    ds_server *srv;
    atomic_int port;
    atomic_int run_rc;
} f;

static void *facade_main(void *arg) {
    ds_server_params sp = ds_server_default_params();
    sp.port = 0;
    sp.api_key = KEY;
    sp.served_model_name = "tiny";
    sp.max_model_len = 2048;
    sp.handle_signals = false;
    ds_err err;
    f.srv = ds_server_create(NULL, &sp, &err);
    if (!f.srv) {
        fprintf(stderr, "facade: %s\n", err.msg);
        atomic_store(&f.port, -1);
        return NULL;
    }
    atomic_store(&f.port, ds_server_port(f.srv));
    atomic_store(&f.run_rc, ds_server_run(f.srv));
    ds_server_free(f.srv);
    return NULL;
}

static void test_server_facade(void) {
    pthread_t t;
    atomic_store(&f.port, 0);
    atomic_store(&f.run_rc, 1);
    pthread_create(&t, NULL, facade_main, NULL);
    double end = ds_time_s() + 5.0;
    while (atomic_load(&f.port) == 0 && ds_time_s() < end) usleep(1000);
    CHECK(atomic_load(&f.port) > 0);
    if (atomic_load(&f.port) <= 0) {
        pthread_join(t, NULL);
        return;
    }
    int saved = atomic_load(&g.port);
    atomic_store(&g.port, atomic_load(&f.port)); /* point the client helpers at the facade */
    client *c = client_new();
    resp r;
    send_str(c, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    send_str(c, "GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 401);
    CHECK(is_error_json(&r, "invalid_api_key") && strcasestr(r.head, "WWW-Authenticate: Bearer"));
    send_str(c, "GET /nope HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 404);
    CHECK(is_error_json(&r, NULL) && strstr(r.body, "\"param\":null,\"code\":null"));
    send_str(c, "POST /v1/models HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: 0\r\n\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 405);
    CHECK(is_error_json(&r, NULL) && strcasestr(r.head, "\r\nAllow: GET"));
    /* Every reply, routing errors included, is counted once in /metrics. */
    send_str(c, "GET /metrics HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strstr(r.body, "deltaserve_requests_total{endpoint=\"/v1/models\",status=\"401\"} 1") &&
          strstr(r.body, "deltaserve_requests_total{endpoint=\"/v1/models\",status=\"405\"} 1") &&
          strstr(r.body, "deltaserve_requests_total{endpoint=\"other\",status=\"404\"} 1") &&
          strstr(r.body, "deltaserve_requests_total{endpoint=\"/metrics\",status=\"200\"} 1"));
    send_str(c, "GET /v1/models HTTP/1.1\r\nHost: t\r\n" AUTH "\r\n");
    CHECK_EQ_INT(read_resp(c, &r), 200);
    CHECK(strstr(r.body, "\"id\":\"tiny\"") && strstr(r.body, "\"max_model_len\":2048") && strstr(r.body, "\"parent\":null"));
    const char *bad = "{\"model\":\"tiny\",\"prompt\":\"x\",\"temperature\":9}";
    char req[512];
    snprintf(req, sizeof req, "POST /v1/completions HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: %zu\r\n\r\n%s", strlen(bad), bad);
    send_str(c, req);
    CHECK_EQ_INT(read_resp(c, &r), 400);
    CHECK(strstr(r.body, "\"param\":\"temperature\"") != NULL);
    const char *ok = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n" AUTH "Content-Length: %zu\r\n\r\n%s", strlen(ok), ok);
    send_str(c, req);
    CHECK_EQ_INT(read_resp(c, &r), 503);
    CHECK(is_error_json(&r, NULL));
    /* Stop from another thread with a connection still open: run returns, the client sees EOF. */
    ds_server_stop(f.srv);
    CHECK(sees_close(c));
    client_free(c);
    pthread_join(t, NULL);
    CHECK_EQ_INT(atomic_load(&f.run_rc), 0);
    atomic_store(&g.port, saved);
}

int main(void) {
    atomic_store(&g.port, 0);
    pthread_create(&g.thread, NULL, server_main, NULL);
    double end = ds_time_s() + 5.0;
    while (atomic_load(&g.port) == 0 && ds_time_s() < end) usleep(1000);
    if (atomic_load(&g.port) <= 0) {
        CHECK(!"server did not start");
        return ds_test_result();
    }
    test_keep_alive();
    test_pipelining();
    test_chunked_body();
    test_expect_continue();
    test_limits();
    test_malformed();
    test_auth_and_routing();
    test_streaming();
    test_engine_glue();
    test_max_connections();
    test_timeouts();
    test_backpressure();
    test_server_facade();

    ds_http_task *t = calloc(1, sizeof *t);
    t->fn = stop_task;
    CHECK(ds_http_server_post(&g.http, t) == 0);
    pthread_join(g.thread, NULL);
    CHECK(atomic_load(&g.closed));
    CHECK_EQ_INT(ds_http_server_pending(&g.http), 0);
    ds_http_task late = {0};
    CHECK_EQ_INT(ds_http_server_post(&g.http, &late), DS_ECANCELED);
    return ds_test_result();
}
