/* The activations of ds_act on the host: the CPU backend's bottleneck op and the AdapterHub prefix
 * loader (src/adapter/ah_prefix.c) evaluate them here; the formulas are src/backend/act_math.h's,
 * which the CUDA kernels share. fp32, as torch. */
#include "backend/act_math.h"

float ds_act_eval(ds_act a, float x) { return ds_act_f((int32_t)a, x); }
