/* deltaserve — a minimal multipart/form-data parser (RFC 7578) for POST /v1/files: the parts of a
 * request body already held in memory, each with its form name, optional filename and content.
 * Parts point into the body (no copies). */
#ifndef DS_SERVER_MULTIPART_H
#define DS_SERVER_MULTIPART_H

#include <stdbool.h>
#include <stddef.h>

#define DS_MULTIPART_MAX_PARTS 16

typedef struct ds_multipart_part {
    char name[64];        /* form field name ("" when absent) */
    char filename[256];   /* "" when absent */
    bool has_filename;
    char content_type[96];
    const char *data;     /* into the body */
    size_t len;
} ds_multipart_part;

/* Extracts the boundary from a Content-Type header ("multipart/form-data; boundary=..."). False
 * when it is not multipart/form-data or has no (valid) boundary. */
bool ds_multipart_boundary(const char *content_type, char *out, size_t cap);

/* Splits body into parts. Returns the number of parts (>= 0), or -1 with a reason in why when the
 * body is malformed (no opening boundary, unterminated part, missing headers, too many parts). */
int ds_multipart_parse(const char *body, size_t len, const char *boundary, ds_multipart_part *parts, int max_parts,
                       char *why, size_t why_cap);

/* The first part named `name`, or NULL. */
const ds_multipart_part *ds_multipart_find(const ds_multipart_part *parts, int n, const char *name);

#endif
