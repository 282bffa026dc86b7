/* deltaserve — internal HTTP/1.1 server on libuv + llhttp (the route table is router.h).
 *
 * Threading: everything here runs on the loop thread (the thread running uv_run on the loop given
 * to ds_http_server_init), EXCEPT ds_http_server_post, which any thread may call: it is how the
 * engine thread hands work (token events) to the loop thread.
 *
 * Connections: keep-alive; pipelined requests are parsed one at a time and answered in order (the
 * next request is parsed only after the current response is finished); chunked request bodies;
 * `Expect: 100-continue`; limits → 413 (body), 431 (header bytes/count), 503 (connections), 400
 * (malformed, then close); idle / header / body / write timeouts.
 *
 * Request life cycle (the one rule a handler must follow):
 *   the handler receives a ds_http_req* and must end it exactly once, with ds_http_respond() or
 *   ds_http_stream_start() … ds_http_stream_end(), now or later from a loop callback. The request
 *   stays valid until then, EVEN IF THE CLIENT IS GONE: the layer then calls the abort callback
 *   (ds_http_req_on_abort) once, further writes return DS_ECANCELED and do nothing, and the ending
 *   call just frees the request. So a handler waiting for the engine cancels the engine request in
 *   the abort callback and still ends the ds_http_req when the engine's final event arrives. */
#ifndef DS_SERVER_HTTP_H
#define DS_SERVER_HTTP_H

#include <pthread.h>
#include <uv.h>

#include "ds/common.h"
#include "util/sb.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ds_http_server ds_http_server;
typedef struct ds_http_req ds_http_req;
typedef struct ds_http_conn ds_http_conn; /* private to http.c */

/* ---- limits and the request parser (http_parse.c; no I/O, fuzzed on its own) -------------- */

typedef struct ds_http_limits {
    size_t max_body_bytes;   /* request body (after de-chunking) → 413 */
    size_t max_header_bytes; /* request line + header names/values → 431 */
    int32_t max_headers;     /* header count → 431 */
} ds_http_limits;

typedef struct ds_http_header {
    const char *name;  /* lower-cased, NUL-terminated */
    const char *value; /* NUL-terminated, surrounding whitespace trimmed */
} ds_http_header;

/* A parsed request. Public fields are read-only for handlers and valid until the request ends. */
struct ds_http_req {
    int method;              /* llhttp_method_t: HTTP_GET, HTTP_POST, ... */
    const char *method_name; /* "GET", ... (static) */
    const char *path;        /* NUL-terminated, query removed, not percent-decoded */
    const char *query;       /* after '?', "" when none */
    const char *body;        /* NUL-terminated (the NUL is not counted); "" when none */
    size_t body_len;
    uint8_t http_major, http_minor;
    bool keep_alive;         /* the client allows another request on this connection */
    const ds_http_header *headers;
    int32_t n_headers;
    /* Route captures: the segments matched by "{...}" in the route pattern, NUL-terminated. */
    const char *params[4];
    int32_t n_params;

    /* ---- private (http.c / http_parse.c / router.c) ---- */
    ds_http_server *srv_;
    ds_http_conn *conn_;     /* NULL once the client is gone */
    void (*abort_cb_)(ds_http_req *, void *);
    void *abort_ud_;
    ds_sb hbuf_;             /* url, header names and values, NUL-separated */
    ds_sb body_;
    ds_sb extra_headers_;    /* response header lines added by ds_http_req_add_header */
    ds_http_header *hdr_;    /* [max_headers] */
    size_t *hdr_off_;        /* [2*max_headers] offsets into hbuf_ (it may move while parsing) */
    size_t field_start_, value_start_, url_len_, header_bytes_;
    bool in_value_, headers_done_, expect_continue_, upgrade_;
    int state_;              /* http.c: not started / streaming */
    bool chunked_out_;
    char params_buf_[256];   /* router.c: storage for params[] */
};

/* Incremental request parser over llhttp with our limits; one per connection. */
typedef enum {
    DS_HTTP_PARSE_MORE = 0,   /* all input consumed, request not complete yet */
    DS_HTTP_PARSE_REQUEST,    /* a request is complete: take it with ds_http_parser_take */
    DS_HTTP_PARSE_ERROR,      /* malformed or over a limit: answer err_status and close */
} ds_http_parse_result;

typedef struct ds_http_parser {
    _Alignas(16) char llhttp_[128]; /* llhttp_t storage: keeps llhttp.h out of this header */
    const ds_http_limits *lim;
    ds_http_req *req;         /* request being parsed (owned until taken), or NULL */
    int err_status;           /* 400 / 413 / 431 / 501 on DS_HTTP_PARSE_ERROR */
    const char *err_reason;   /* static text for logs */
    bool started;             /* bytes of the current request have been seen */
    bool paused;
    /* The header section's line ends, scanned ahead of llhttp (which accepts obs-fold): 0 inside
     * a line, 1 after CR, 2 after CRLF, 3 after CRLF CR, 4 past the header section. */
    uint8_t hscan;
} ds_http_parser;

/* `lim` is borrowed for the parser's life. */
void ds_http_parser_init(ds_http_parser *p, const ds_http_limits *lim);
/* Frees a request in progress. */
void ds_http_parser_free(ds_http_parser *p);
/* Feeds up to `len` bytes; *consumed says how many were used (the rest belongs to the next
 * request: feed it again after taking this one). */
ds_http_parse_result ds_http_parser_feed(ds_http_parser *p, const char *data, size_t len, size_t *consumed);
/* After DS_HTTP_PARSE_REQUEST: hands over the request (caller ends it with ds_http_req_free or
 * the response functions) and readies the parser for the next one. */
ds_http_req *ds_http_parser_take(ds_http_parser *p);
/* True when the headers of the current request are complete and it announced
 * `Expect: 100-continue` with a body still to come (cleared by the call). */
bool ds_http_parser_take_expect_continue(ds_http_parser *p);
/* True when bytes of a request have arrived but the request is not complete yet. */
bool ds_http_parser_mid_request(const ds_http_parser *p);

/* Frees a request object that was never handed to a handler. */
void ds_http_req_free(ds_http_req *r);

/* Case-insensitive header lookup; the first occurrence, or NULL. */
const char *ds_http_req_header(const ds_http_req *r, const char *name);

/* ---- the server ------------------------------------------------------------------------- */

typedef void (*ds_http_handler_fn)(ds_http_req *req, void *ud);

typedef struct ds_http_params {
    ds_http_limits limits;
    int32_t max_connections;   /* over it: 503 + close */
    double idle_timeout_s;     /* keep-alive wait for the next request */
    double header_timeout_s;   /* first byte → end of headers (slowloris) */
    double body_timeout_s;     /* end of headers → end of body */
    double write_timeout_s;    /* queued output that makes no progress for this long → abort */
    size_t max_write_buffer;   /* queued-but-unsent bytes per connection; over it → abort */
} ds_http_params;

/* Defaults: 32 MiB body, 16 KiB / 100 headers, 1024 connections, timeouts 60/10/60/60 s, 4 MiB. */
ds_http_params ds_http_default_params(void);

/* A task posted to the loop thread. Embed it in your own message struct (container_of). */
typedef struct ds_http_task {
    struct ds_http_task *next;
    void (*fn)(struct ds_http_task *t); /* runs on the loop thread; owns t from then on */
} ds_http_task;

/* Caller-allocated (embed it or malloc it); initialise with ds_http_server_init, and keep the
 * memory until the close callback of ds_http_server_close has run. Fields are private. */
struct ds_http_server {
    uv_loop_t *loop;
    ds_http_params params;
    ds_http_handler_fn handler;
    void *handler_ud;
    void *user;              /* free for the owner (the ds_server facade puts itself here) */
    uv_tcp_t listener;
    uv_async_t async;
    pthread_mutex_t task_mu;
    ds_http_task *task_head, *task_tail; /* guarded by task_mu */
    bool tasks_open;                     /* guarded by task_mu: posts are accepted */
    ds_http_conn *conns;     /* intrusive list of live connections */
    int32_t n_conns;
    int64_t n_reqs;          /* requests handed to handlers and not yet ended */
    bool listening, closing;
    int n_handles_open;
    void (*close_cb)(ds_http_server *);
    char *read_buf;          /* shared by all connections (one loop thread, read is synchronous) */
    char date[40];           /* cached "Date:" value for second date_sec */
    int64_t date_sec;
    bool finishing;
};

/* Initialises the server on `loop` (not yet listening). Returns 0 or a DS_E* with a message. */
int ds_http_server_init(ds_http_server *s, uv_loop_t *loop, const ds_http_params *p, ds_http_handler_fn handler,
                        void *handler_ud, ds_err *err);

/* Binds and listens on host:port (port 0 = ephemeral). Returns 0, DS_EIO (bind/listen failed;
 * the message names the address), or DS_EINVAL (bad address). */
int ds_http_server_listen(ds_http_server *s, const char *host, int port, ds_err *err);

/* The bound port (after listen), or -1. */
int ds_http_server_port(const ds_http_server *s);

/* Graceful close: stops accepting, closes idle connections, aborts in-flight requests (their abort
 * callbacks run), then waits until every handler has ended its request and every connection is
 * closed, runs the posted tasks still queued, and calls close_cb (may be NULL). Posts made after
 * that are refused. Call once, from the loop thread. */
void ds_http_server_close(ds_http_server *s, void (*close_cb)(ds_http_server *));

/* ANY THREAD. Queues t->fn(t) to run on the loop thread, in post order. Returns 0, or
 * DS_ECANCELED once the server has closed (t is then not run; the caller still owns it). */
int ds_http_server_post(ds_http_server *s, ds_http_task *t);

/* Requests handed to handlers and not yet ended (for shutdown and tests). */
int64_t ds_http_server_pending(const ds_http_server *s);

/* ---- responses (loop thread) ------------------------------------------------------------ */

/* Sets a callback for "the client is gone" (disconnect, write error, timeout, write buffer over
 * its bound, server close). It runs at most once, from a loop callback — never from inside the
 * handler's own ds_http_* call (those report DS_ECANCELED instead). After it the request is still
 * valid and must still be ended. */
void ds_http_req_on_abort(ds_http_req *r, void (*cb)(ds_http_req *r, void *ud), void *ud);

/* True once the client is gone (writes would fail). */
bool ds_http_req_aborted(const ds_http_req *r);

/* The server that owns the request (to post tasks from other threads). */
ds_http_server *ds_http_req_server(const ds_http_req *r);

/* Adds a header line to the response not yet started ("Allow", "GET"). Name and value must not
 * contain CR/LF (they are dropped if they do). */
void ds_http_req_add_header(ds_http_req *r, const char *name, const char *value);

/* Sends a complete response and ENDS the request (r is freed). Returns 0, or DS_ECANCELED when
 * the client was already gone (r is freed all the same). `body` is copied. */
int ds_http_respond(ds_http_req *r, int status, const char *content_type, const char *body, size_t len);

/* Starts a streamed response: status line and headers now, body in chunks (chunked transfer
 * encoding; HTTP/1.0 clients get close-delimited framing). Does NOT end the request.
 * Returns 0 or DS_ECANCELED (client gone: still end it with ds_http_stream_end). */
int ds_http_stream_start(ds_http_req *r, int status, const char *content_type);

/* Queues `len` bytes (copied) as one chunk. Returns 0, or DS_ECANCELED when the client is gone or
 * is so slow that the connection's unsent bytes would pass max_write_buffer — then the connection
 * is closed and the handler should cancel its work (the abort callback is NOT called for this). */
int ds_http_stream_write(ds_http_req *r, const char *data, size_t len);

/* Bytes queued on the connection but not yet accepted by the kernel (0 once the client is gone). */
size_t ds_http_stream_buffered(const ds_http_req *r);

/* Ends the stream (last chunk) and ENDS the request. Returns 0 or DS_ECANCELED. */
int ds_http_stream_end(ds_http_req *r);

/* "OK", "Not Found", ... ("Unknown" for codes we never send). */
const char *ds_http_status_text(int status);

#ifdef __cplusplus
}
#endif
#endif
