/* multipart/form-data (RFC 7578 / RFC 2046 §5.1) over a body held in memory. */
#include "server/multipart.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static const char *find(const char *hay, size_t n, const char *needle, size_t m) {
    if (m == 0 || n < m) return NULL;
    for (size_t i = 0; i + m <= n; i++)
        if (hay[i] == needle[0] && !memcmp(hay + i, needle, m)) return hay + i;
    return NULL;
}

/* Value of parameter `key` in a header value "form-data; name=\"x\"; filename=\"y\"" (quoted or
 * token). False when absent. */
static bool header_param(const char *v, size_t n, const char *key, char *out, size_t cap) {
    size_t kl = strlen(key);
    size_t i = 0;
    while (i < n) {
        /* next ';' outside quotes */
        while (i < n && v[i] != ';') {
            if (v[i] == '"') {
                for (i++; i < n && v[i] != '"'; i++)
                    if (v[i] == '\\') i++;
            }
            i++;
        }
        if (i >= n) break;
        i++;
        while (i < n && (v[i] == ' ' || v[i] == '\t')) i++;
        if (i + kl < n && !strncasecmp(v + i, key, kl) && v[i + kl] == '=') {
            i += kl + 1;
            size_t o = 0;
            if (i < n && v[i] == '"') {
                for (i++; i < n && v[i] != '"'; i++) {
                    if (v[i] == '\\' && i + 1 < n) i++;
                    if (o + 1 < cap) out[o++] = v[i];
                }
            } else {
                for (; i < n && v[i] != ';' && v[i] != ' ' && v[i] != '\t'; i++)
                    if (o + 1 < cap) out[o++] = v[i];
            }
            out[o] = '\0';
            return true;
        }
    }
    return false;
}

bool ds_multipart_boundary(const char *ct, char *out, size_t cap) {
    if (!ct) return false;
    while (*ct == ' ') ct++;
    if (strncasecmp(ct, "multipart/form-data", 19) != 0) return false;
    if (!header_param(ct, strlen(ct), "boundary", out, cap)) return false;
    size_t n = strlen(out);
    return n >= 1 && n <= 70;
}

static void copy_trim(char *out, size_t cap, const char *v, size_t n) {
    while (n && (*v == ' ' || *v == '\t')) v++, n--;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
    if (n >= cap) n = cap - 1;
    memcpy(out, v, n);
    out[n] = '\0';
}

int ds_multipart_parse(const char *body, size_t len, const char *boundary, ds_multipart_part *parts, int max_parts,
                       char *why, size_t why_cap) {
    char delim[80];
    int dl = snprintf(delim, sizeof delim, "\r\n--%s", boundary);
    if (dl <= 4 || (size_t)dl >= sizeof delim) return snprintf(why, why_cap, "bad boundary"), -1;
    /* the first delimiter may come without the leading CRLF (no preamble) */
    const char *p;
    if (len >= (size_t)dl - 2 && !memcmp(body, delim + 2, (size_t)dl - 2)) p = body + dl - 2;
    else if ((p = find(body, len, delim, (size_t)dl))) p += dl;
    else return snprintf(why, why_cap, "the multipart boundary was not found in the body"), -1;
    const char *end = body + len;
    int n = 0;
    for (;;) {
        if (end - p >= 2 && p[0] == '-' && p[1] == '-') return n; /* close delimiter */
        while (p < end && (*p == ' ' || *p == '\t')) p++;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
            return snprintf(why, why_cap, "malformed multipart body (no CRLF after a boundary)"), -1;
        p += 2;
        if (n >= max_parts) return snprintf(why, why_cap, "too many multipart parts (at most %d)", max_parts), -1;
        ds_multipart_part *pt = &parts[n];
        memset(pt, 0, sizeof *pt);
        /* headers */
        bool disposition = false;
        for (;;) {
            const char *eol = find(p, (size_t)(end - p), "\r\n", 2);
            if (!eol) return snprintf(why, why_cap, "malformed multipart body (unterminated part headers)"), -1;
            if (eol == p) {
                p += 2;
                break;
            }
            const char *colon = memchr(p, ':', (size_t)(eol - p));
            if (!colon) return snprintf(why, why_cap, "malformed multipart part header"), -1;
            size_t hn = (size_t)(colon - p), vn = (size_t)(eol - colon - 1);
            if (hn == 19 && !strncasecmp(p, "Content-Disposition", 19)) {
                disposition = true;
                header_param(colon + 1, vn, "name", pt->name, sizeof pt->name);
                pt->has_filename = header_param(colon + 1, vn, "filename", pt->filename, sizeof pt->filename);
            } else if (hn == 12 && !strncasecmp(p, "Content-Type", 12)) {
                copy_trim(pt->content_type, sizeof pt->content_type, colon + 1, vn);
            }
            p = eol + 2;
        }
        if (!disposition) return snprintf(why, why_cap, "a multipart part has no Content-Disposition"), -1;
        const char *q = find(p, (size_t)(end - p), delim, (size_t)dl);
        if (!q) return snprintf(why, why_cap, "malformed multipart body (no closing boundary)"), -1;
        pt->data = p;
        pt->len = (size_t)(q - p);
        n++;
        p = q + dl;
    }
}

const ds_multipart_part *ds_multipart_find(const ds_multipart_part *parts, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(parts[i].name, name)) return &parts[i];
    return NULL;
}
