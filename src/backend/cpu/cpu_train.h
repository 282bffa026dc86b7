/* deltaserve — the CPU backend's training-op table (cpu_train.c), hung off its ds_backend_iface. */
#ifndef DS_CPU_TRAIN_H
#define DS_CPU_TRAIN_H

#include "ds/backend.h"
#include "ds/backend_train.h"

extern const struct ds_backend_train_iface ds_cpu_train_iface;

/* Bottleneck-adapter training ops (cpu_train_bn.c), entries bn_fwd / bn_bwd of the table. */
int ds_cpu_train_bn_fwd(void *ctx, const ds_train_bn_args *a, const float *z, float *hpre, float *tmp, float *y);
int ds_cpu_train_bn_bwd(void *ctx, const ds_train_bn_args *a, const float *z, const float *hpre, const float *dy,
                        float *dz, float *ddown, float *ddown_b, float *dup, float *dup_b, float *tmp);

#endif
