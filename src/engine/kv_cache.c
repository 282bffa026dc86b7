#include "engine/kv_cache.h"

#include <stdlib.h>

int ds_kv_alloc_init(ds_kv_alloc *a, int32_t n_blocks) {
    a->n_blocks = n_blocks;
    a->free_list = malloc(sizeof(int32_t) * (size_t)n_blocks);
    a->refcnt = calloc((size_t)n_blocks, sizeof(int32_t));
    if (!a->free_list || !a->refcnt) {
        ds_kv_alloc_free(a);
        return DS_ENOMEM;
    }
    /* pop order 0,1,2,... so fresh caches fill from the start */
    for (int32_t i = 0; i < n_blocks; i++) a->free_list[i] = n_blocks - 1 - i;
    a->n_free = n_blocks;
    return DS_OK;
}

void ds_kv_alloc_free(ds_kv_alloc *a) {
    free(a->free_list);
    free(a->refcnt);
    a->free_list = NULL;
    a->refcnt = NULL;
    a->n_free = a->n_blocks = 0;
}

int32_t ds_kv_block_take(ds_kv_alloc *a) {
    if (a->n_free == 0) return -1;
    int32_t b = a->free_list[--a->n_free];
    a->refcnt[b] = 1;
    return b;
}

void ds_kv_block_ref(ds_kv_alloc *a, int32_t block) {
    DS_ASSERT(block >= 0 && block < a->n_blocks && a->refcnt[block] > 0);
    a->refcnt[block]++;
}

void ds_kv_block_unref(ds_kv_alloc *a, int32_t block) {
    DS_ASSERT(block >= 0 && block < a->n_blocks && a->refcnt[block] > 0);
    if (--a->refcnt[block] == 0) a->free_list[a->n_free++] = block;
}
