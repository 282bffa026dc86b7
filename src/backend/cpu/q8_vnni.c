/* Int8-activation kernels for AVX-512 VNNI on 256-bit vectors (flags for this file only): see
 * q8kern.h. */
#if defined(__x86_64__)
#define QK8_NAME ds_q8_vnni
#define QK8_VNNI 1
#include "backend/cpu/q8kern.h"
#endif
