/* Allocation helpers (util/mem.h). */
#include "util/mem.h"

#include <stdlib.h>
#include <string.h>

#include "ds/common.h"

char *ds_strdup(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

int ds_grow(void *pp, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return DS_OK;
    size_t ncap = *cap ? *cap : 16, bytes;
    while (ncap < need)
        if (!ds_mul_ok(ncap, 2, &ncap)) return DS_ENOMEM;
    if (!ds_mul_ok(ncap, elem, &bytes)) return DS_ENOMEM;
    void *p; /* the caller's T * is read and written through memcpy: no aliasing through void ** */
    memcpy(&p, pp, sizeof p);
    void *np = realloc(p, bytes);
    if (!np) return DS_ENOMEM;
    memcpy(pp, &np, sizeof np);
    *cap = ncap;
    return DS_OK;
}
