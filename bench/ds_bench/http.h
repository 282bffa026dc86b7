/* ds-bench — minimal HTTP/1.1 client on libuv for streaming (SSE) responses.
 *
 * One dsb_client per target host holds a pool of keep-alive connections on one uv loop: a call
 * takes an idle connection or opens a new one, so the number of open connections follows the
 * number of calls in flight. Responses are parsed with llhttp (chunked, Content-Length or
 * close-delimited bodies); a 200 body is fed to an SSE parser and every event is handed to the
 * caller with the time its bytes were read. A request that fails on a reused connection before
 * any response byte arrived (the server closed an idle keep-alive connection) is retried once on
 * a fresh connection, as browsers and aiohttp do.
 *
 * Everything here runs on the loop's thread only. Plain http:// only (no TLS). */
#ifndef DSB_HTTP_H
#define DSB_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* ---- URLs ---------------------------------------------------------------------------------- */

typedef struct dsb_url {
    char host[256]; /* without brackets for IPv6 literals */
    int port;
    char path[1024]; /* "" when the URL has no path; never ends with '/' */
} dsb_url;

/* Parses "http://HOST[:PORT][/PATH]" (HOST may be "[v6]"); default port 80.
 * Returns 0, or -1 with a message in err. */
int dsb_url_parse(const char *url, dsb_url *u, char *err, size_t errlen);

/* ---- Calls --------------------------------------------------------------------------------- */

typedef enum {
    DSB_HTTP_OK = 0,
    DSB_HTTP_ECONNECT,  /* could not connect (refused, unreachable, DNS) */
    DSB_HTTP_EIO,       /* read or write error on an established connection */
    DSB_HTTP_ECLOSED,   /* server closed the connection before the response was complete */
    DSB_HTTP_EPROTO,    /* malformed HTTP response or an oversized SSE line */
    DSB_HTTP_ETIMEOUT,  /* the call took longer than the client's timeout */
    DSB_HTTP_ECANCELED, /* cancelled by dsb_client_cancel_all / dsb_client_free */
} dsb_http_error;

typedef struct dsb_call dsb_call;
typedef void (*dsb_call_sse_cb)(dsb_call *call, const char *data, size_t len, uint64_t t_ns);
typedef void (*dsb_call_done_cb)(dsb_call *call);
typedef void (*dsb_call_body_cb)(dsb_call *call, const char *data, size_t len);

/* Caller-allocated; must stay valid (not moved or freed) until on_done has been called. */
struct dsb_call {
    /* Inputs, borrowed until on_done. */
    const char *method;    /* "POST" or "GET" */
    const char *path;      /* request target, e.g. "/v1/completions" */
    const char *body;      /* may be NULL when body_len == 0 */
    size_t body_len;
    dsb_call_sse_cb on_sse;   /* each SSE event of a 200 response; t_ns from uv_hrtime() at read */
    dsb_call_body_cb on_body; /* when set, a 200 body goes here raw instead of to the SSE parser */
    dsb_call_done_cb on_done; /* exactly once; may free the call and may send new calls */
    void *ud;

    /* Outputs, valid in on_done. */
    int status;            /* HTTP status, 0 if no response head arrived */
    dsb_http_error error;
    char errmsg[160];      /* human-readable reason when error != DSB_HTTP_OK */
    char resp[2048];       /* first bytes of a non-200 body, NUL-terminated */
    size_t resp_len;
    bool complete;         /* the HTTP message ended properly (final chunk / full length) */

    /* Private to the client. */
    struct dsb_conn *conn_;
    int tries_;
};

/* ---- Client -------------------------------------------------------------------------------- */

typedef struct dsb_client_params {
    const char *host;
    int port;
    const char *extra_headers; /* raw lines each ending in "\r\n" (e.g. Authorization), or NULL */
    double timeout_s;          /* per call, from send to the end of the response; <= 0: none */
} dsb_client_params;

typedef struct dsb_client dsb_client;

/* Resolves the host (blocking getaddrinfo, once) and creates a client on `loop`.
 * Returns NULL with a message in err on failure. Free with dsb_client_free. */
dsb_client *dsb_client_create(uv_loop_t *loop, const dsb_client_params *p, char *err, size_t errlen);

/* Starts a call. Returns 0, and every failure (including a refused connection) is then reported
 * asynchronously through call->on_done, never from inside this function; or returns -1 when not
 * even a socket handle could be allocated (out of memory), and on_done will not be called.
 * Must not be called once dsb_client_free has been. */
int dsb_client_send(dsb_client *c, dsb_call *call);

/* Fails every call in flight with DSB_HTTP_ECANCELED (on_done runs before this returns) and
 * closes their connections. Idle connections stay open. */
void dsb_client_cancel_all(dsb_client *c);

/* Cancels calls in flight (as above), closes every connection and frees the client once the last
 * close callback has run: keep running the loop until it has no more active handles. */
void dsb_client_free(dsb_client *c);

/* Number of TCP connections opened so far (to check keep-alive reuse). */
size_t dsb_client_connections_opened(const dsb_client *c);

/* Static name of an error code, e.g. "connect". */
const char *dsb_http_error_name(dsb_http_error e);

#endif
