/* libFuzzer target for the multipart/form-data parser of POST /v1/files (src/server/multipart.c).
 * Input: a Content-Type header value up to the first '\n', then the body. When the header has no
 * valid boundary the body is parsed with the boundary "b" instead, so that the body parser is
 * always reached. Every part must lie inside the body and carry NUL-terminated fields. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/multipart.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nl = memchr(data, '\n', size);
    size_t hl = nl ? (size_t)(nl - data) : 0;
    char ct[512];
    if (hl >= sizeof ct) hl = sizeof ct - 1;
    memcpy(ct, data, hl), ct[hl] = '\0';
    const char *body = nl ? (const char *)nl + 1 : (const char *)data;
    size_t len = size - (size_t)((const uint8_t *)body - data);
    /* the server hands the parser a heap copy of exactly the body: ASan sees any overread */
    char *copy = malloc(len ? len : 1);
    if (!copy) return 0;
    memcpy(copy, body, len);
    char boundary[96];
    if (!ds_multipart_boundary(ct, boundary, sizeof boundary)) strcpy(boundary, "b");
    else if (strlen(boundary) < 1 || strlen(boundary) > 70) abort();
    ds_multipart_part parts[DS_MULTIPART_MAX_PARTS];
    char why[128];
    int n = ds_multipart_parse(copy, len, boundary, parts, DS_MULTIPART_MAX_PARTS, why, sizeof why);
    if (n < -1 || n > DS_MULTIPART_MAX_PARTS) abort();
    for (int i = 0; i < n; i++) {
        const ds_multipart_part *p = &parts[i];
        if (p->data < copy || p->len > len || p->data + p->len > copy + len) abort();
        if (!memchr(p->name, 0, sizeof p->name) || !memchr(p->filename, 0, sizeof p->filename) ||
            !memchr(p->content_type, 0, sizeof p->content_type))
            abort();
    }
    const ds_multipart_part *f = ds_multipart_find(parts, n > 0 ? n : 0, "file");
    if (f && strcmp(f->name, "file")) abort();
    free(copy);
    return 0;
}
