#include "sse.h"

#include <stdlib.h>
#include <string.h>

void dsb_sse_init(dsb_sse *p, dsb_sse_cb cb, void *ud) {
    memset(p, 0, sizeof(*p));
    p->cb = cb;
    p->ud = ud;
    p->max_bytes = DSB_SSE_MAX_BYTES;
}

void dsb_sse_reset(dsb_sse *p) {
    p->line_len = 0;
    p->data_len = 0;
    p->has_data = false;
    p->after_cr = false;
    p->failed = false;
}

void dsb_sse_free(dsb_sse *p) {
    free(p->line);
    free(p->data);
    p->line = p->data = NULL;
    p->line_cap = p->data_cap = 0;
}

/* Ensures room for `need` bytes plus a NUL. */
static int reserve(char **buf, size_t *cap, size_t need) {
    if (need + 1 <= *cap) return 0;
    size_t c = *cap ? *cap : 256;
    while (c < need + 1) c *= 2;
    char *b = realloc(*buf, c);
    if (!b) return -1;
    *buf = b;
    *cap = c;
    return 0;
}

static void dispatch(dsb_sse *p) {
    if (p->has_data) {
        p->data[p->data_len] = '\0';
        p->cb(p->ud, p->data, p->data_len);
    }
    p->data_len = 0;
    p->has_data = false;
}

/* One complete line (without its terminator). */
static int process_line(dsb_sse *p, const char *line, size_t len) {
    if (len == 0) {
        dispatch(p);
        return 0;
    }
    if (line[0] == ':') return 0; /* comment / keep-alive */
    const char *colon = memchr(line, ':', len);
    size_t name_len = colon ? (size_t)(colon - line) : len;
    if (name_len != 4 || memcmp(line, "data", 4) != 0) return 0; /* event/id/retry: not needed */
    const char *val = colon ? colon + 1 : line + len;
    size_t vlen = (size_t)(line + len - val);
    if (vlen > 0 && val[0] == ' ') {
        val++;
        vlen--;
    }
    size_t need = p->data_len + (p->has_data ? 1 : 0) + vlen;
    if (need > p->max_bytes || reserve(&p->data, &p->data_cap, need) != 0) return -1;
    if (p->has_data) p->data[p->data_len++] = '\n';
    memcpy(p->data + p->data_len, val, vlen);
    p->data_len += vlen;
    p->has_data = true;
    return 0;
}

static int append_line(dsb_sse *p, const char *buf, size_t len) {
    if (p->line_len + len > p->max_bytes) return -1;
    if (reserve(&p->line, &p->line_cap, p->line_len + len) != 0) return -1;
    memcpy(p->line + p->line_len, buf, len);
    p->line_len += len;
    return 0;
}

/* Ends the current line: parse straight from `buf` when nothing is buffered (the common case). */
static int end_line(dsb_sse *p, const char *buf, size_t len) {
    if (p->line_len == 0) return process_line(p, buf, len);
    if (append_line(p, buf, len) != 0) return -1;
    int rc = process_line(p, p->line, p->line_len);
    p->line_len = 0;
    return rc;
}

int dsb_sse_feed(dsb_sse *p, const char *buf, size_t len) {
    if (p->failed) return -1;
    size_t i = 0;
    if (p->after_cr && len > 0 && buf[0] == '\n') i = 1; /* second half of a CRLF split across reads */
    p->after_cr = false;
    size_t start = i;
    for (; i < len; i++) {
        char c = buf[i];
        if (c != '\n' && c != '\r') continue;
        if (end_line(p, buf + start, i - start) != 0) goto fail;
        if (c == '\r') {
            if (i + 1 < len && buf[i + 1] == '\n')
                i++;
            else if (i + 1 == len)
                p->after_cr = true;
        }
        start = i + 1;
    }
    if (start < len && append_line(p, buf + start, len - start) != 0) goto fail;
    return 0;
fail:
    p->failed = true;
    return -1;
}

void dsb_sse_finish(dsb_sse *p) {
    if (p->failed) return;
    if (p->line_len > 0) {
        (void)process_line(p, p->line, p->line_len);
        p->line_len = 0;
    }
    dispatch(p);
}
