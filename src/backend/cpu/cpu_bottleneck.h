/* deltaserve — the CPU backend's bottleneck-adapter op (cpu_bottleneck.c) and the backend scratch it
 * shares with the other CPU ops (cpu_backend.c). Engine thread, like every op. */
#ifndef DS_CPU_BOTTLENECK_H
#define DS_CPU_BOTTLENECK_H

#include "ds/backend.h"

/* The bottleneck op on the CPU over n_segs host segments (see ds_bn_seg); cpu_backend.c's
 * bottleneck slot resolves its plan range to them. */
int ds_cpu_bottleneck(void *ctx, const float *x, float *o, int32_t d, const ds_bn_seg *segs, int32_t n_segs);
/* At least n floats of the backend's grow-once op scratch, or NULL on OOM. Valid until the next op. */
float *ds_cpu_scratch(void *ctx, size_t n);

#endif
