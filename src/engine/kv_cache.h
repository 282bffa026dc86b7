/* Paged KV-cache block allocator (host bookkeeping; the pools themselves live in ds_llama).
 * Blocks are refcounted so prefix blocks can be shared by many sequences. Engine thread only. */
#ifndef DS_KV_CACHE_H
#define DS_KV_CACHE_H

#include "ds/common.h"

typedef struct ds_kv_alloc {
    int32_t n_blocks;
    int32_t n_free;
    int32_t *free_list; /* stack of free block ids */
    int32_t *refcnt;    /* [n_blocks] */
} ds_kv_alloc;

int ds_kv_alloc_init(ds_kv_alloc *a, int32_t n_blocks);
void ds_kv_alloc_free(ds_kv_alloc *a);
/* Takes one free block (refcount 1); -1 when none. */
int32_t ds_kv_block_take(ds_kv_alloc *a);
/* Adds a reference to a block already in use. */
void ds_kv_block_ref(ds_kv_alloc *a, int32_t block);
/* Drops a reference; the block returns to the free list at zero. */
void ds_kv_block_unref(ds_kv_alloc *a, int32_t block);
static inline int32_t ds_kv_used(const ds_kv_alloc *a) { return a->n_blocks - a->n_free; }
#endif
