/* A small thread pool for the CPU backend's decode-sized ops (internal).
 *
 * Why not OpenMP for these: a decode step runs hundreds of short parallel regions, and an OpenMP
 * region ends in a barrier that waits for every team thread — when a neighbour process takes a
 * core, one preempted thread stalls the whole step for a scheduler time slice. Here work is a range
 * of chunks claimed atomically: the calling thread takes part, claims whatever no worker has
 * started, and waits only for workers that are in the middle of a chunk. Idle workers spin
 * briefly, then sleep on a futex. */
#ifndef DS_CPU_POOL_H
#define DS_CPU_POOL_H

#include <stdint.h>

typedef struct ds_pool ds_pool;

/* fn(arg, i) for every chunk index i in [0, n). */
typedef void (*ds_pool_fn)(void *arg, int64_t i);

/* n_threads including the caller (1: no workers, everything runs on the caller). NULL on failure. */
ds_pool *ds_pool_create(int n_threads);
void ds_pool_free(ds_pool *p);
int ds_pool_threads(const ds_pool *p);
/* Runs fn over [0, n) and returns when every chunk is done. One caller at a time. */
void ds_pool_run(ds_pool *p, int64_t n, ds_pool_fn fn, void *arg);

#endif
