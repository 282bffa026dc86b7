/* Shared by the kernel and model benchmarks: the backend's own memory bandwidth, measured. */
#ifndef DS_BENCH_BW_H
#define DS_BENCH_BW_H

#include "ds/backend.h"

/* Bytes read + written per second by the backend's copy op (cudaMemcpyAsync device→device on
 * CUDA, memcpy on the CPU) on a buffer of `mb` MiB, best of 5 after one warm-up; 0 on failure. */
static inline double bench_copy_bandwidth(ds_backend *b, int mb) {
    const size_t bytes = (size_t)mb << 20;
    void *src = b->iface->alloc(b->ctx, bytes), *dst = b->iface->alloc(b->ctx, bytes);
    double best = 0;
    if (src && dst && !b->iface->copy(b->ctx, dst, src, bytes) && !b->iface->synchronize(b->ctx)) {
        for (int r = 0; r < 5; r++) {
            double t0 = ds_time_s();
            if (b->iface->copy(b->ctx, dst, src, bytes) || b->iface->synchronize(b->ctx)) break;
            double bw = 2.0 * (double)bytes / (ds_time_s() - t0);
            best = bw > best ? bw : best;
        }
    }
    if (src) b->iface->release(b->ctx, src);
    if (dst) b->iface->release(b->ctx, dst);
    return best;
}

/* Default copy size: large enough to leave the caches on each backend. */
static inline int bench_copy_mb_default(const char *backend) { return backend && !__builtin_strcmp(backend, "cpu") ? 64 : 1024; }

#endif
