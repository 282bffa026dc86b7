#include "http.h"

#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

#define READ_BUF_SIZE (64u << 10)

typedef struct dsb_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_connect_t connect_req;
    uv_write_t write_req;
    llhttp_t parser;
    dsb_sse sse;
    dsb_client *client;
    dsb_call *call;          /* the call in flight, NULL when idle or closing */
    char *head;              /* request head being written; owned */
    size_t head_cap;
    uint64_t t_read;         /* uv_hrtime() of the read being parsed */
    int pending_closes;      /* handles still to close before the struct is freed */
    dsb_http_error deferred; /* failure to report from the timer (never from inside send) */
    bool closing, writing, reused, got_bytes, msg_done, sse_mode, idle;
    struct dsb_conn *prev, *next; /* client->all */
    struct dsb_conn *next_idle;   /* client->idle stack */
} dsb_conn;

struct dsb_client {
    uv_loop_t *loop;
    struct sockaddr_storage addr;
    char host_header[300];
    char *extra_headers;
    uint64_t timeout_ms;
    dsb_conn *all, *idle;
    size_t n_conns, opened;
    bool freeing;
    char rbuf[READ_BUF_SIZE]; /* shared: libuv calls read_cb right after alloc_cb, one at a time */
};

static llhttp_settings_t g_settings;
static bool g_settings_ready;

static void finish(dsb_conn *conn, dsb_http_error err, const char *msg, bool keep_alive);
static int open_and_send(dsb_client *c, dsb_call *call);

const char *dsb_http_error_name(dsb_http_error e) {
    switch (e) {
    case DSB_HTTP_OK: return "ok";
    case DSB_HTTP_ECONNECT: return "connect";
    case DSB_HTTP_EIO: return "io";
    case DSB_HTTP_ECLOSED: return "closed";
    case DSB_HTTP_EPROTO: return "protocol";
    case DSB_HTTP_ETIMEOUT: return "timeout";
    case DSB_HTTP_ECANCELED: return "canceled";
    }
    return "unknown";
}

/* ---- URL ----------------------------------------------------------------------------------- */

static int parse_port(const char *s, size_t n, int *port) {
    if (n == 0 || n > 5) return -1;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < 1 || v > 65535) return -1;
    *port = v;
    return 0;
}

int dsb_url_parse(const char *url, dsb_url *u, char *err, size_t errlen) {
    memset(u, 0, sizeof(*u));
    u->port = 80;
    if (strncmp(url, "http://", 7) != 0) {
        snprintf(err, errlen, "URL '%s' must start with http:// (TLS is not supported)", url);
        return -1;
    }
    const char *h = url + 7, *slash = strchr(h, '/');
    const char *auth_end = slash ? slash : h + strlen(h);
    const char *host_end = auth_end, *port_start = NULL;
    if (*h == '[') { /* IPv6 literal */
        const char *rb = memchr(h, ']', (size_t)(auth_end - h));
        if (!rb) goto bad;
        h++;
        host_end = rb;
        if (rb + 1 < auth_end) {
            if (rb[1] != ':') goto bad;
            port_start = rb + 2;
        }
    } else {
        const char *colon = memchr(h, ':', (size_t)(auth_end - h));
        if (colon) {
            host_end = colon;
            port_start = colon + 1;
        }
    }
    size_t hl = (size_t)(host_end - h);
    if (hl == 0 || hl >= sizeof(u->host)) goto bad;
    memcpy(u->host, h, hl);
    if (port_start && parse_port(port_start, (size_t)(auth_end - port_start), &u->port) != 0) goto bad;
    if (slash) {
        size_t pl = strlen(slash);
        while (pl > 0 && slash[pl - 1] == '/') pl--;
        if (pl >= sizeof(u->path)) goto bad;
        memcpy(u->path, slash, pl);
    }
    return 0;
bad:
    snprintf(err, errlen, "cannot parse URL '%s' (want http://HOST[:PORT][/PATH])", url);
    return -1;
}

/* ---- Connection life cycle ----------------------------------------------------------------- */

static void idle_remove(dsb_client *c, dsb_conn *conn) {
    if (!conn->idle) return;
    for (dsb_conn **p = &c->idle; *p; p = &(*p)->next_idle) {
        if (*p == conn) {
            *p = conn->next_idle;
            break;
        }
    }
    conn->idle = false;
    conn->next_idle = NULL;
}

static void on_handle_closed(uv_handle_t *h) {
    dsb_conn *conn = h->data;
    if (--conn->pending_closes > 0) return;
    dsb_client *c = conn->client;
    if (conn->prev) conn->prev->next = conn->next;
    else c->all = conn->next;
    if (conn->next) conn->next->prev = conn->prev;
    dsb_sse_free(&conn->sse);
    free(conn->head);
    free(conn);
    if (--c->n_conns == 0 && c->freeing) {
        free(c->extra_headers);
        free(c);
    }
}

static void close_conn(dsb_conn *conn) {
    if (conn->closing) return;
    conn->closing = true;
    idle_remove(conn->client, conn);
    conn->pending_closes = 2;
    uv_close((uv_handle_t *)&conn->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&conn->timer, on_handle_closed);
}

static void sse_event(void *ud, const char *data, size_t len) {
    dsb_conn *conn = ud;
    if (conn->call && conn->call->on_sse) conn->call->on_sse(conn->call, data, len, conn->t_read);
}

static dsb_conn *conn_new(dsb_client *c) {
    dsb_conn *conn = calloc(1, sizeof(*conn));
    if (!conn) return NULL;
    conn->client = c;
    if (uv_tcp_init(c->loop, &conn->tcp) != 0) {
        free(conn);
        return NULL;
    }
    uv_timer_init(c->loop, &conn->timer);
    conn->tcp.data = conn->timer.data = conn->connect_req.data = conn->write_req.data = conn;
    dsb_sse_init(&conn->sse, sse_event, conn);
    conn->next = c->all;
    if (c->all) c->all->prev = conn;
    c->all = conn;
    c->n_conns++;
    return conn;
}

/* ---- Parsing the response ------------------------------------------------------------------ */

static int on_headers_complete(llhttp_t *p) {
    dsb_conn *conn = p->data;
    if (conn->call) conn->call->status = p->status_code;
    conn->sse_mode = p->status_code == 200;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
    dsb_conn *conn = p->data;
    dsb_call *call = conn->call;
    if (!call) return 0;
    if (conn->sse_mode && call->on_body) {
        call->on_body(call, at, len);
        return 0;
    }
    if (conn->sse_mode) {
        (void)dsb_sse_feed(&conn->sse, at, len); /* failure checked after llhttp_execute */
        return 0;
    }
    size_t room = sizeof(call->resp) - 1 - call->resp_len;
    size_t n = len < room ? len : room;
    memcpy(call->resp + call->resp_len, at, n);
    call->resp_len += n;
    call->resp[call->resp_len] = '\0';
    return 0;
}

static int on_message_complete(llhttp_t *p) {
    dsb_conn *conn = p->data;
    conn->msg_done = true;
    if (conn->sse_mode && conn->call && !conn->call->on_body) dsb_sse_finish(&conn->sse);
    /* Pause so that finish() runs outside llhttp_execute and stray bytes are detected. */
    return HPE_PAUSED;
}

static void settings_init(void) {
    if (g_settings_ready) return;
    llhttp_settings_init(&g_settings);
    g_settings.on_headers_complete = on_headers_complete;
    g_settings.on_body = on_body;
    g_settings.on_message_complete = on_message_complete;
    g_settings_ready = true;
}

/* ---- Request ------------------------------------------------------------------------------- */

static bool can_retry(dsb_conn *conn) {
    return conn->reused && !conn->got_bytes && conn->call && conn->call->tries_ == 0 &&
           !conn->client->freeing;
}

/* The server dropped a reused keep-alive connection before answering: resend on a new one. */
static void retry_on_new_conn(dsb_conn *conn) {
    dsb_call *call = conn->call;
    conn->call = NULL;
    uv_timer_stop(&conn->timer);
    close_conn(conn);
    call->tries_++;
    if (open_and_send(conn->client, call) != 0) {
        call->error = DSB_HTTP_EIO;
        snprintf(call->errmsg, sizeof(call->errmsg), "out of memory reconnecting");
        call->on_done(call);
    }
}

static void on_write(uv_write_t *req, int status) {
    dsb_conn *conn = req->data;
    conn->writing = false;
    if (status >= 0 || !conn->call || conn->closing) return;
    if (can_retry(conn)) {
        retry_on_new_conn(conn);
        return;
    }
    char msg[128];
    snprintf(msg, sizeof(msg), "write: %s", uv_strerror(status));
    finish(conn, DSB_HTTP_EIO, msg, false);
}

static int build_head(dsb_conn *conn, const dsb_call *call) {
    dsb_client *c = conn->client;
    const char *fmt = "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: ds-bench\r\nAccept: text/event-stream, "
                      "application/json\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n%s\r\n";
    const char *extra = c->extra_headers ? c->extra_headers : "";
    int n = snprintf(NULL, 0, fmt, call->method, call->path, c->host_header, call->body_len, extra);
    if (n < 0) return -1;
    if ((size_t)n + 1 > conn->head_cap) {
        char *h = realloc(conn->head, (size_t)n + 1);
        if (!h) return -1;
        conn->head = h;
        conn->head_cap = (size_t)n + 1;
    }
    snprintf(conn->head, conn->head_cap, fmt, call->method, call->path, c->host_header, call->body_len, extra);
    return n;
}

/* Writes the request on a connected socket and arms the parser for its response.
 * Returns 0 or a negative libuv error (UV_ENOMEM when the head cannot be built). */
static int start_request(dsb_conn *conn) {
    dsb_call *call = conn->call;
    llhttp_init(&conn->parser, HTTP_RESPONSE, &g_settings);
    conn->parser.data = conn;
    dsb_sse_reset(&conn->sse);
    conn->got_bytes = conn->msg_done = conn->sse_mode = false;
    int n = build_head(conn, call);
    if (n < 0) return UV_ENOMEM;
    uv_buf_t bufs[2] = {uv_buf_init(conn->head, (unsigned)n),
                        uv_buf_init((char *)(call->body ? call->body : ""), (unsigned)call->body_len)};
    int rc = uv_write(&conn->write_req, (uv_stream_t *)&conn->tcp, bufs, call->body_len ? 2 : 1, on_write);
    if (rc == 0) conn->writing = true;
    return rc;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    dsb_conn *conn = h->data;
    buf->base = conn->client->rbuf;
    buf->len = READ_BUF_SIZE;
}

static void on_eof_or_error(dsb_conn *conn, ssize_t nread) {
    char msg[128];
    if (nread == UV_EOF) {
        /* A close-delimited body ends here; llhttp_finish runs on_message_complete for it. */
        (void)llhttp_finish(&conn->parser);
        if (conn->msg_done) {
            finish(conn, DSB_HTTP_OK, NULL, false);
            return;
        }
    }
    if (can_retry(conn)) {
        retry_on_new_conn(conn);
        return;
    }
    if (nread == UV_EOF) {
        finish(conn, DSB_HTTP_ECLOSED,
               conn->got_bytes ? "server closed the connection mid-response" : "server closed the connection",
               false);
        return;
    }
    snprintf(msg, sizeof(msg), "read: %s", uv_strerror((int)nread));
    finish(conn, DSB_HTTP_EIO, msg, false);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    dsb_conn *conn = s->data;
    if (conn->closing) return;
    if (!conn->call) { /* idle: EOF, error or unexpected bytes all end the connection */
        if (nread != 0) close_conn(conn);
        return;
    }
    if (nread < 0) {
        on_eof_or_error(conn, nread);
        return;
    }
    if (nread == 0) return;
    conn->t_read = uv_hrtime();
    conn->got_bytes = true;
    llhttp_errno_t rc = llhttp_execute(&conn->parser, buf->base, (size_t)nread);
    if (rc == HPE_PAUSED && conn->msg_done) {
        const char *pos = llhttp_get_error_pos(&conn->parser);
        bool stray = pos && pos < buf->base + nread; /* bytes after the response: don't reuse */
        finish(conn, DSB_HTTP_OK, NULL, llhttp_should_keep_alive(&conn->parser) && !stray);
    } else if (rc != HPE_OK) {
        char msg[128];
        snprintf(msg, sizeof(msg), "bad HTTP response: %s (%s)", llhttp_errno_name(rc),
                 llhttp_get_error_reason(&conn->parser));
        finish(conn, DSB_HTTP_EPROTO, msg, false);
    } else if (conn->sse.failed) {
        finish(conn, DSB_HTTP_EPROTO, "SSE line too long or out of memory", false);
    }
}

static void on_connect(uv_connect_t *req, int status) {
    dsb_conn *conn = req->data;
    if (conn->closing || !conn->call) return;
    if (status < 0) {
        char msg[128];
        snprintf(msg, sizeof(msg), "connect: %s", uv_strerror(status));
        finish(conn, DSB_HTTP_ECONNECT, msg, false);
        return;
    }
    uv_tcp_nodelay(&conn->tcp, 1);
    int rc = uv_read_start((uv_stream_t *)&conn->tcp, on_alloc, on_read);
    if (rc != 0) {
        char msg[128];
        snprintf(msg, sizeof(msg), "read_start: %s", uv_strerror(rc));
        finish(conn, DSB_HTTP_ECONNECT, msg, false);
        return;
    }
    rc = start_request(conn);
    if (rc != 0) {
        char msg[128];
        snprintf(msg, sizeof(msg), "write: %s", uv_strerror(rc));
        finish(conn, DSB_HTTP_EIO, msg, false);
    }
}

static void on_timer(uv_timer_t *t) {
    dsb_conn *conn = t->data;
    if (!conn->call || conn->closing) return;
    if (conn->deferred != DSB_HTTP_OK) {
        finish(conn, conn->deferred, NULL, false); /* message already in call->errmsg */
        return;
    }
    finish(conn, DSB_HTTP_ETIMEOUT, "request timed out", false);
}

/* ---- Completion ---------------------------------------------------------------------------- */

/* Ends the call on `conn`: the connection goes back to the idle pool when the response ended
 * cleanly and the server allows keep-alive, otherwise it is closed. Runs on_done last, outside
 * llhttp_execute, so on_done may send new calls (possibly on this very connection). */
static void finish(dsb_conn *conn, dsb_http_error err, const char *msg, bool keep_alive) {
    dsb_call *call = conn->call;
    dsb_client *c = conn->client;
    if (!call) return;
    conn->call = NULL;
    call->conn_ = NULL;
    uv_timer_stop(&conn->timer);
    call->error = err;
    call->complete = conn->msg_done;
    if (msg) snprintf(call->errmsg, sizeof(call->errmsg), "%s", msg);
    if (err == DSB_HTTP_OK && keep_alive && !conn->writing && !c->freeing) {
        conn->reused = true;
        conn->idle = true;
        conn->next_idle = c->idle;
        c->idle = conn;
    } else {
        close_conn(conn);
    }
    call->on_done(call);
}

static void arm_timer(dsb_conn *conn) {
    uint64_t ms = conn->client->timeout_ms;
    if (ms > 0) uv_timer_start(&conn->timer, on_timer, ms, 0);
}

/* Reports a failure that happened synchronously inside send, from the next loop iteration. */
static void defer_failure(dsb_conn *conn, dsb_http_error err, const char *what, int uv_err) {
    snprintf(conn->call->errmsg, sizeof(conn->call->errmsg), "%s: %s", what, uv_strerror(uv_err));
    conn->deferred = err;
    uv_timer_start(&conn->timer, on_timer, 0, 0);
}

/* Opens a connection for `call`. Returns 0 (later failures arrive through on_done) or -1 when no
 * handle could be allocated, in which case on_done has NOT been called. */
static int open_and_send(dsb_client *c, dsb_call *call) {
    dsb_conn *conn = conn_new(c);
    if (!conn) return -1;
    c->opened++;
    conn->call = call;
    call->conn_ = conn;
    int rc = uv_tcp_connect(&conn->connect_req, &conn->tcp, (const struct sockaddr *)&c->addr, on_connect);
    if (rc != 0) {
        defer_failure(conn, DSB_HTTP_ECONNECT, "connect", rc);
        return 0;
    }
    arm_timer(conn);
    return 0;
}

int dsb_client_send(dsb_client *c, dsb_call *call) {
    call->status = 0;
    call->error = DSB_HTTP_OK;
    call->errmsg[0] = '\0';
    call->resp[0] = '\0';
    call->resp_len = 0;
    call->complete = false;
    call->tries_ = 0;
    call->conn_ = NULL;
    dsb_conn *conn = c->idle;
    if (!conn) return open_and_send(c, call);
    c->idle = conn->next_idle;
    conn->next_idle = NULL;
    conn->idle = false;
    conn->call = call;
    call->conn_ = conn;
    arm_timer(conn);
    int rc = start_request(conn);
    if (rc != 0) defer_failure(conn, DSB_HTTP_EIO, "write", rc);
    return 0;
}

void dsb_client_cancel_all(dsb_client *c) {
    /* finish() never unlinks (that happens in the close callback), so walking is safe; new
     * connections opened from on_done are pushed at the head, behind the cursor. */
    for (dsb_conn *conn = c->all; conn; conn = conn->next) {
        if (conn->call && !conn->closing) finish(conn, DSB_HTTP_ECANCELED, "cancelled", false);
    }
}

void dsb_client_free(dsb_client *c) {
    if (!c) return;
    c->freeing = true;
    dsb_client_cancel_all(c);
    for (dsb_conn *conn = c->all; conn; conn = conn->next) close_conn(conn);
    if (c->n_conns == 0) {
        free(c->extra_headers);
        free(c);
    }
}

size_t dsb_client_connections_opened(const dsb_client *c) { return c->opened; }

static int resolve(uv_loop_t *loop, const char *host, int port, struct sockaddr_storage *out, char *err,
                   size_t errlen) {
    char port_s[8];
    snprintf(port_s, sizeof(port_s), "%d", port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    uv_getaddrinfo_t req;
    int rc = uv_getaddrinfo(loop, &req, NULL, host, port_s, &hints); /* NULL cb: synchronous */
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve '%s': %s", host, uv_strerror(rc));
        return -1;
    }
    /* Prefer IPv4: "localhost" often resolves to ::1 first while servers commonly listen on
     * 0.0.0.0 or 127.0.0.1 only. */
    const struct addrinfo *pick = req.addrinfo;
    for (const struct addrinfo *a = req.addrinfo; a; a = a->ai_next) {
        if (a->ai_family == AF_INET) {
            pick = a;
            break;
        }
    }
    memcpy(out, pick->ai_addr, pick->ai_addrlen);
    uv_freeaddrinfo(req.addrinfo);
    return 0;
}

dsb_client *dsb_client_create(uv_loop_t *loop, const dsb_client_params *p, char *err, size_t errlen) {
    settings_init();
    dsb_client *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->loop = loop;
    if (resolve(loop, p->host, p->port, &c->addr, err, errlen) != 0) {
        free(c);
        return NULL;
    }
    bool v6 = strchr(p->host, ':') != NULL;
    snprintf(c->host_header, sizeof(c->host_header), v6 ? "[%s]:%d" : "%s:%d", p->host, p->port);
    c->timeout_ms = p->timeout_s > 0 ? (uint64_t)(p->timeout_s * 1000.0 + 0.5) : 0;
    if (p->extra_headers && *p->extra_headers) {
        c->extra_headers = strdup(p->extra_headers);
        if (!c->extra_headers) {
            free(c);
            snprintf(err, errlen, "out of memory");
            return NULL;
        }
    }
    return c;
}
