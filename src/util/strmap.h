/* deltaserve — a string → int32 hash map (open addressing, linear probing).
 *
 * Keys are arbitrary byte strings (embedded NULs allowed), copied into the map's own arena.
 * Writers need exclusive access; any number of threads may read a map nobody is writing. */
#ifndef DS_UTIL_STRMAP_H
#define DS_UTIL_STRMAP_H

#include "ds/common.h"

typedef struct ds_strmap ds_strmap;

/* Returns an empty map sized for about `expected` keys, or NULL when out of memory. */
ds_strmap *ds_strmap_create(size_t expected);
void ds_strmap_free(ds_strmap *m);

/* Inserts key → val, replacing the value of an existing key. Returns 0, DS_ENOMEM, or DS_ERANGE
 * (more than 4 GiB of key bytes). */
int ds_strmap_put(ds_strmap *m, const char *key, size_t len, int32_t val);

/* Returns true and sets *val (may be NULL) when the key is present. */
bool ds_strmap_get(const ds_strmap *m, const char *key, size_t len, int32_t *val);

size_t ds_strmap_count(const ds_strmap *m);

#endif
