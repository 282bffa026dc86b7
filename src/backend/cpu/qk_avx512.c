/* AVX-512 (F/BW/VL) kernels (compiled with those flags only in this file): see qkern.h. */
#if defined(__x86_64__)
#define QK_NAME ds_qk_avx512
#define QK_VW 16
#include "backend/cpu/qkern.h"
#endif
