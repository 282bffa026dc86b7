/* deltaserve — small allocation helpers: string duplication and growable arrays. Thread-safe (no
 * state); every function allocates with malloc/realloc, so the caller frees with free(). */
#ifndef DS_UTIL_MEM_H
#define DS_UTIL_MEM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A malloc'd copy of `s`; NULL when `s` is NULL or on allocation failure. */
char *ds_strdup(const char *s);

/* Makes room for at least `need` elements of `elem` bytes in the array whose pointer is at `pp`
 * (a T **, passed as void * so that any element type works without casts) and whose capacity is
 * *cap: doubles from 16 (or from *cap) until it fits. Returns 0, or DS_ENOMEM on allocation
 * failure or size overflow, leaving the array and *cap unchanged. */
int ds_grow(void *pp, size_t *cap, size_t need, size_t elem);

/* ds_grow for an array `arr` (a T *) with a size_t capacity `cap`: DS_GROW(a, a_cap, n + 1). */
#define DS_GROW(arr, cap, need) ds_grow(&(arr), &(cap), (need), sizeof *(arr))

#ifdef __cplusplus
}
#endif
#endif
