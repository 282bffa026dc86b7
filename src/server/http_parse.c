/* The request parser: llhttp plus our limits and storage. Kept free of I/O so the fuzz target
 * can drive it with arbitrary bytes and splits, and http.c only moves bytes and timers.
 *
 * llhttp hands us spans that may be split across reads, so url/header bytes are appended to one
 * growable buffer (hbuf_) and addressed by offset until the headers are complete; only then are
 * pointers taken (trailers after a chunked body are counted against the limit but not stored, so
 * the buffer never moves after that). */
#include <ctype.h>
#include <llhttp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "server/http.h"

_Static_assert(sizeof(llhttp_t) <= sizeof(((ds_http_parser *)0)->llhttp_), "llhttp_t storage too small");

#define LL(p) ((llhttp_t *)(void *)(p)->llhttp_)

static ds_http_parser *parser_of(llhttp_t *lp) { return (ds_http_parser *)lp->data; }

/* Fails the parse with an HTTP status; the returned code makes llhttp stop. */
static int fail(llhttp_t *lp, int status, const char *reason) {
    ds_http_parser *p = parser_of(lp);
    p->err_status = status;
    p->err_reason = reason;
    llhttp_set_error_reason(lp, reason);
    return HPE_USER;
}

static bool count_header_bytes(ds_http_parser *p, size_t n) {
    ds_http_req *r = p->req;
    return ds_add_ok(r->header_bytes_, n, &r->header_bytes_) && r->header_bytes_ <= p->lim->max_header_bytes;
}

static int on_message_begin(llhttp_t *lp) {
    ds_http_parser *p = parser_of(lp);
    p->started = true;
    if (p->req) return 0; /* cannot happen: the previous request was taken */
    ds_http_req *r = calloc(1, sizeof *r);
    size_t nh = (size_t)(p->lim->max_headers > 0 ? p->lim->max_headers : 1);
    if (r) r->hdr_off_ = calloc(2 * nh, sizeof *r->hdr_off_);
    if (!r || !r->hdr_off_) {
        free(r);
        return fail(lp, 503, "out of memory");
    }
    p->req = r;
    return 0;
}

static int on_url(llhttp_t *lp, const char *at, size_t len) {
    ds_http_parser *p = parser_of(lp);
    if (!count_header_bytes(p, len)) return fail(lp, 431, "request line too long");
    ds_sb_append(&p->req->hbuf_, at, len);
    return p->req->hbuf_.oom ? fail(lp, 503, "out of memory") : 0;
}

static int on_url_complete(llhttp_t *lp) {
    ds_http_req *r = parser_of(lp)->req;
    r->url_len_ = r->hbuf_.len;
    ds_sb_append(&r->hbuf_, "", 1);
    r->field_start_ = r->hbuf_.len;
    return r->hbuf_.oom ? fail(lp, 503, "out of memory") : 0;
}

/* RFC 9110 token characters: what a header name may hold (llhttp 8 lets spaces through). */
static bool is_tchar(unsigned char c) {
    return isalnum(c) || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int on_header_field(llhttp_t *lp, const char *at, size_t len) {
    ds_http_parser *p = parser_of(lp);
    if (!count_header_bytes(p, len)) return fail(lp, 431, "request headers too large");
    for (size_t i = 0; i < len; i++)
        if (!is_tchar((unsigned char)at[i])) return fail(lp, 400, "invalid character in a header name");
    if (p->req->headers_done_) return 0; /* trailer: counted, not kept */
    ds_sb_append(&p->req->hbuf_, at, len);
    return p->req->hbuf_.oom ? fail(lp, 503, "out of memory") : 0;
}

static int on_header_field_complete(llhttp_t *lp) {
    ds_http_parser *p = parser_of(lp);
    ds_http_req *r = p->req;
    if (r->headers_done_) return 0;
    if (r->n_headers >= p->lim->max_headers) return fail(lp, 431, "too many request headers");
    for (size_t i = r->field_start_; i < r->hbuf_.len; i++)
        r->hbuf_.data[i] = (char)tolower((unsigned char)r->hbuf_.data[i]);
    ds_sb_append(&r->hbuf_, "", 1);
    r->value_start_ = r->hbuf_.len;
    return r->hbuf_.oom ? fail(lp, 503, "out of memory") : 0;
}

static int on_header_value(llhttp_t *lp, const char *at, size_t len) {
    ds_http_parser *p = parser_of(lp);
    if (!count_header_bytes(p, len)) return fail(lp, 431, "request headers too large");
    if (p->req->headers_done_) return 0;
    ds_sb_append(&p->req->hbuf_, at, len);
    return p->req->hbuf_.oom ? fail(lp, 503, "out of memory") : 0;
}

static int on_header_value_complete(llhttp_t *lp) {
    ds_http_req *r = parser_of(lp)->req;
    if (r->headers_done_) return 0;
    while (r->hbuf_.len > r->value_start_ &&
           (r->hbuf_.data[r->hbuf_.len - 1] == ' ' || r->hbuf_.data[r->hbuf_.len - 1] == '\t'))
        r->hbuf_.len--;
    ds_sb_append(&r->hbuf_, "", 1);
    r->hdr_off_[2 * r->n_headers] = r->field_start_;
    r->hdr_off_[2 * r->n_headers + 1] = r->value_start_;
    r->n_headers++;
    r->field_start_ = r->hbuf_.len;
    return r->hbuf_.oom ? fail(lp, 503, "out of memory") : 0;
}

/* Turns offsets into pointers and splits the URL; the buffer no longer moves after this. */
static int finish_headers(llhttp_t *lp, ds_http_req *r) {
    if (!r->hbuf_.data) ds_sb_append(&r->hbuf_, "", 1);
    if (r->hbuf_.oom) return fail(lp, 503, "out of memory");
    r->hdr_ = calloc((size_t)(r->n_headers ? r->n_headers : 1), sizeof *r->hdr_);
    if (!r->hdr_) return fail(lp, 503, "out of memory");
    for (int32_t i = 0; i < r->n_headers; i++) {
        r->hdr_[i].name = r->hbuf_.data + r->hdr_off_[2 * i];
        r->hdr_[i].value = r->hbuf_.data + r->hdr_off_[2 * i + 1];
    }
    r->headers = r->hdr_;
    char *url = r->hbuf_.data;
    char *q = strchr(url, '?');
    if (q) *q++ = '\0';
    char *frag = strchr(q ? q : url, '#');
    if (frag) *frag = '\0';
    r->path = url;
    r->query = q ? q : "";
    if (r->path[0] != '/' && !(lp->method == HTTP_OPTIONS && strcmp(r->path, "*") == 0))
        return fail(lp, 400, "request target must be an absolute path");
    return 0;
}

static int on_headers_complete(llhttp_t *lp) {
    ds_http_parser *p = parser_of(lp);
    ds_http_req *r = p->req;
    if (lp->http_major != 1) return fail(lp, 505, "only HTTP/1.0 and HTTP/1.1 are served");
    int st = finish_headers(lp, r);
    if (st) return st;
    r->headers_done_ = true;
    r->method = lp->method;
    r->method_name = llhttp_method_name((llhttp_method_t)lp->method);
    r->http_major = lp->http_major;
    r->http_minor = lp->http_minor;
    r->keep_alive = llhttp_should_keep_alive(lp);
    if (lp->upgrade) { /* we never switch protocols: answer, then close */
        r->upgrade_ = true;
        r->keep_alive = false;
    }
    bool has_len = (lp->flags & F_CONTENT_LENGTH) != 0, chunked = (lp->flags & F_CHUNKED) != 0;
    if (has_len && lp->content_length > p->lim->max_body_bytes) return fail(lp, 413, "request body too large");
    const char *expect = ds_http_req_header(r, "expect");
    if (expect) {
        if (strcasecmp(expect, "100-continue") != 0) return fail(lp, 417, "unsupported Expect");
        r->expect_continue_ = chunked || (has_len && lp->content_length > 0);
    }
    if (has_len && lp->content_length > 0) {
        /* One allocation for the whole body: the length is already bounded by the limit. */
        size_t want = (size_t)lp->content_length + 1;
        char *b = realloc(r->body_.data, want);
        if (!b) return fail(lp, 503, "out of memory");
        b[0] = '\0';
        r->body_.data = b;
        r->body_.cap = want;
        r->body_.len = 0;
    }
    return 0;
}

static int on_body(llhttp_t *lp, const char *at, size_t len) {
    ds_http_parser *p = parser_of(lp);
    ds_http_req *r = p->req;
    r->expect_continue_ = false; /* the client did not wait: no 100 needed any more */
    size_t total;
    if (!ds_add_ok(r->body_.len, len, &total) || total > p->lim->max_body_bytes)
        return fail(lp, 413, "request body too large");
    ds_sb_append(&r->body_, at, len);
    return r->body_.oom ? fail(lp, 503, "out of memory") : 0;
}

static int on_message_complete(llhttp_t *lp) {
    ds_http_req *r = parser_of(lp)->req;
    if (!r->body_.data) ds_sb_append(&r->body_, "", 0);
    if (r->body_.oom) return fail(lp, 503, "out of memory");
    r->body = r->body_.data ? r->body_.data : "";
    r->body_len = r->body_.len;
    /* Pause so the connection handles one request at a time: the bytes after this one stay
     * unparsed until its response is finished, which keeps pipelined answers in order. */
    return HPE_PAUSED;
}

static const llhttp_settings_t g_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void ds_http_parser_init(ds_http_parser *p, const ds_http_limits *lim) {
    memset(p, 0, sizeof *p);
    p->lim = lim;
    llhttp_init(LL(p), HTTP_REQUEST, &g_settings);
    LL(p)->data = p;
}

void ds_http_parser_free(ds_http_parser *p) {
    ds_http_req_free(p->req);
    p->req = NULL;
}

/* Scans the header section for a line that starts with a space or tab: obs-fold (a continued
 * header value, RFC 9112 §5.2, which a server must reject or unfold) or whitespace before the first
 * header. llhttp 8 joins folded values silently. Stops at the blank line ending the section. */
static bool scan_obs_fold(ds_http_parser *p, const char *data, size_t len) {
    for (size_t i = 0; i < len && p->hscan < 4; i++) {
        const char c = data[i];
        switch (p->hscan) {
        case 0: p->hscan = c == '\r' ? 1 : 0; break;
        case 1: p->hscan = c == '\n' ? 2 : c == '\r' ? 1 : 0; break;
        case 2:
            if (c == ' ' || c == '\t') return false;
            p->hscan = c == '\r' ? 3 : 0;
            break;
        case 3: p->hscan = c == '\n' ? 4 : c == '\r' ? 1 : 0; break;
        }
    }
    return true;
}

ds_http_parse_result ds_http_parser_feed(ds_http_parser *p, const char *data, size_t len, size_t *consumed) {
    llhttp_t *lp = LL(p);
    *consumed = len;
    if (p->err_status) return DS_HTTP_PARSE_ERROR; /* llhttp keeps failing after an error */
    if (p->paused) { /* the caller has not taken the finished request */
        *consumed = 0;
        return DS_HTTP_PARSE_REQUEST;
    }
    if (!scan_obs_fold(p, data, len)) {
        p->err_status = 400;
        p->err_reason = "folded header line (obs-fold) or a header line starting with whitespace";
        return DS_HTTP_PARSE_ERROR;
    }
    llhttp_errno_t rc = llhttp_execute(lp, data, len);
    if (rc == HPE_OK) return DS_HTTP_PARSE_MORE;
    if (rc == HPE_PAUSED || rc == HPE_PAUSED_UPGRADE) {
        const char *pos = llhttp_get_error_pos(lp);
        *consumed = pos && pos >= data && pos <= data + len ? (size_t)(pos - data) : len;
        p->paused = true;
        return DS_HTTP_PARSE_REQUEST;
    }
    if (!p->err_status) {
        p->err_status = 400;
        p->err_reason = llhttp_errno_name(rc);
    }
    return DS_HTTP_PARSE_ERROR;
}

ds_http_req *ds_http_parser_take(ds_http_parser *p) {
    if (!p->paused) return NULL;
    ds_http_req *r = p->req;
    p->req = NULL;
    p->started = false;
    p->hscan = 0;
    p->paused = false;
    if (r && r->upgrade_) {
        /* After an upgrade llhttp treats the rest as another protocol; the connection closes
         * after this response anyway, so park the parser in an error state. */
        p->err_status = 400;
        p->err_reason = "data after upgrade request";
    } else {
        llhttp_resume(LL(p));
    }
    return r;
}

bool ds_http_parser_take_expect_continue(ds_http_parser *p) {
    ds_http_req *r = p->req;
    if (!r || !r->headers_done_ || !r->expect_continue_) return false;
    r->expect_continue_ = false;
    return true;
}

bool ds_http_parser_mid_request(const ds_http_parser *p) { return p->started && !p->paused; }

void ds_http_req_free(ds_http_req *r) {
    if (!r) return;
    ds_sb_free(&r->hbuf_);
    ds_sb_free(&r->body_);
    ds_sb_free(&r->extra_headers_);
    free(r->hdr_);
    free(r->hdr_off_);
    free(r);
}

const char *ds_http_req_header(const ds_http_req *r, const char *name) {
    for (int32_t i = 0; i < r->n_headers && r->headers; i++)
        if (strcasecmp(r->headers[i].name, name) == 0) return r->headers[i].value;
    return NULL;
}
