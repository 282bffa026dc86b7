/* Int8-activation kernels for AVX2 (+ FMA, F16C; flags for this file only): see q8kern.h. */
#if defined(__x86_64__)
#define QK8_NAME ds_q8_avx2
#include "backend/cpu/q8kern.h"
#endif
