/* deltaserve — the CPU backend's training-op table (cpu_train.c), hung off its ds_backend_iface. */
#ifndef DS_CPU_TRAIN_H
#define DS_CPU_TRAIN_H

#include "ds/backend.h"

extern const struct ds_backend_train_iface ds_cpu_train_iface;

#endif
