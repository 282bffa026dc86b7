/* libFuzzer: the HTTP request parser (http_parse.c over llhttp) with small limits, fed in
 * pieces whose sizes come from the input, so request boundaries land everywhere. Every parsed
 * request is checked for the invariants the handlers rely on. */
#include <stdint.h>
#include <string.h>

#include "server/http.h"

static void check_req(const ds_http_req *r, const ds_http_limits *lim) {
    DS_ASSERT(r->path && r->path[0] != '\0' && r->query && r->body);
    DS_ASSERT(r->body_len <= lim->max_body_bytes && r->body[r->body_len] == '\0');
    DS_ASSERT(r->n_headers <= lim->max_headers);
    for (int32_t i = 0; i < r->n_headers; i++) {
        for (const char *p = r->headers[i].name; *p; p++) DS_ASSERT(!(*p >= 'A' && *p <= 'Z'));
        DS_ASSERT(ds_http_req_header(r, r->headers[i].name) != NULL);
    }
    (void)ds_http_req_header(r, "content-type");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const ds_http_limits lim = {.max_body_bytes = 4096, .max_header_bytes = 1024, .max_headers = 16};
    size_t step = (size_t)(data[0] % 64) + 1; /* piece size, 1..64 */
    data++, size--;
    ds_http_parser p;
    ds_http_parser_init(&p, &lim);
    size_t off = 0;
    int guard = 0;
    while (off < size && guard++ < 1000000) {
        size_t n = size - off < step ? size - off : step, used = 0;
        ds_http_parse_result res = ds_http_parser_feed(&p, (const char *)data + off, n, &used);
        DS_ASSERT(used <= n);
        off += used;
        if (res == DS_HTTP_PARSE_ERROR) {
            DS_ASSERT(p.err_status >= 400 && p.err_status < 600);
            break;
        }
        if (res == DS_HTTP_PARSE_REQUEST) {
            ds_http_req *r = ds_http_parser_take(&p);
            DS_ASSERT(r != NULL);
            check_req(r, &lim);
            ds_http_req_free(r);
        } else {
            (void)ds_http_parser_take_expect_continue(&p);
            DS_ASSERT(used == n);
        }
    }
    ds_http_parser_free(&p);
    return 0;
}
