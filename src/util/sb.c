/* The string builder (util/sb.h). Growth doubles from 256 bytes; a failed allocation latches `oom`
 * so that callers check once at the end instead of after every append. */
#include "util/sb.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds/common.h"

void ds_sb_init(ds_sb *b) { memset(b, 0, sizeof *b); }

void ds_sb_free(ds_sb *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

void ds_sb_reset(ds_sb *b) {
    b->len = 0;
    b->oom = false;
    if (b->data) b->data[0] = '\0';
}

static bool sb_reserve(ds_sb *b, size_t extra) {
    size_t need;
    if (b->oom || !ds_add_ok(b->len, extra, &need) || !ds_add_ok(need, 1, &need)) {
        b->oom = true;
        return false;
    }
    if (need <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) {
        if (!ds_mul_ok(cap, 2, &cap)) {
            b->oom = true;
            return false;
        }
    }
    char *p = realloc(b->data, cap);
    if (!p) {
        b->oom = true;
        return false;
    }
    b->data = p;
    b->cap = cap;
    return true;
}

void ds_sb_append(ds_sb *b, const char *s, size_t n) {
    if (!sb_reserve(b, n)) return;
    if (n) memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void ds_sb_puts(ds_sb *b, const char *s) { ds_sb_append(b, s, strlen(s)); }

void ds_sb_vprintf(ds_sb *b, const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0 || !sb_reserve(b, (size_t)n)) return;
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}

void ds_sb_printf(ds_sb *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    ds_sb_vprintf(b, fmt, ap);
    va_end(ap);
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one (overlongs, surrogates
 * and code points past U+10FFFF are invalid, per RFC 3629). */
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

bool ds_utf8_valid(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    for (size_t i = 0, l; i < n; i += l)
        if (!(l = utf8_seq_len(s + i, n - i))) return false;
    return true;
}

void ds_sb_json_str(ds_sb *b, const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    ds_sb_append(b, "\"", 1);
    size_t run = 0; /* start of the pending run of bytes that need no escaping */
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t sl = c >= 0x20 && c != '"' && c != '\\' && c < 0x80 ? 1 : 0;
        if (c >= 0x80) sl = utf8_seq_len(s + i, n - i);
        if (sl) {
            i += sl;
            continue;
        }
        ds_sb_append(b, str + run, i - run);
        if (c >= 0x80) ds_sb_append(b, "\xEF\xBF\xBD", 3); /* U+FFFD for a bad byte */
        else if (c == '"') ds_sb_append(b, "\\\"", 2);
        else if (c == '\\') ds_sb_append(b, "\\\\", 2);
        else if (c == '\n') ds_sb_append(b, "\\n", 2);
        else if (c == '\r') ds_sb_append(b, "\\r", 2);
        else if (c == '\t') ds_sb_append(b, "\\t", 2);
        else ds_sb_printf(b, "\\u%04x", c);
        i++;
        run = i;
    }
    ds_sb_append(b, str + run, n - run);
    ds_sb_append(b, "\"", 1);
}

void ds_sb_json_num(ds_sb *b, double v) {
    if (!isfinite(v)) v = -9999.0;
    ds_sb_printf(b, "%.9g", v);
}

/* Appends a JSON string, or null for NULL. */
