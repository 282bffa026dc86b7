/* AVX2 + FMA + F16C kernels (compiled with those flags only in this file): see qkern.h. */
#if defined(__x86_64__)
#define QK_NAME ds_qk_avx2
#define QK_VW 8
#include "backend/cpu/qkern.h"
#endif
