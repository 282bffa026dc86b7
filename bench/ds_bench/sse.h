/* ds-bench — incremental Server-Sent Events parser (WHATWG "event stream interpretation").
 *
 * Bytes may be fed in arbitrary pieces (a `data:` line split across TCP reads or HTTP chunks).
 * Lines end with LF, CRLF or CR; `data:` values (one optional leading space stripped) are joined
 * with '\n' and dispatched on a blank line; comment lines (starting with ':') and the other
 * fields (event, id, retry) are ignored. Single-threaded; the caller owns the struct. */
#ifndef DSB_SSE_H
#define DSB_SSE_H

#include <stdbool.h>
#include <stddef.h>

/* Called once per event with its data (NUL-terminated; valid only during the call). */
typedef void (*dsb_sse_cb)(void *ud, const char *data, size_t len);

typedef struct dsb_sse {
    dsb_sse_cb cb;
    void *ud;
    size_t max_bytes;  /* longest line or event accepted; longer input is an error */
    char *line;        /* current partial line */
    size_t line_len, line_cap;
    char *data;        /* data of the current event */
    size_t data_len, data_cap;
    bool has_data;     /* at least one data: line in the current event */
    bool after_cr;     /* last byte was CR: a following LF belongs to the same line break */
    bool failed;
} dsb_sse;

/* Default limit on one line / one event (bytes). */
#define DSB_SSE_MAX_BYTES (8u << 20)

void dsb_sse_init(dsb_sse *p, dsb_sse_cb cb, void *ud);

/* Forgets any partial line or event (for reuse on the next response); keeps buffers. */
void dsb_sse_reset(dsb_sse *p);

/* Parses len bytes. Returns 0, or -1 once a line or event exceeds max_bytes or memory runs out
 * (further input is then ignored until dsb_sse_reset). */
int dsb_sse_feed(dsb_sse *p, const char *buf, size_t len);

/* End of stream: a last event not followed by a blank line is dispatched anyway (servers that
 * close right after `data: [DONE]\n` are common), so nothing is lost. */
void dsb_sse_finish(dsb_sse *p);

void dsb_sse_free(dsb_sse *p);

#endif
