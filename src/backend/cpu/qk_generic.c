/* Portable kernels (baseline x86-64 / any target): see qkern.h. */
#define QK_NAME ds_qk_generic
#define QK_VW 8
#include "backend/cpu/qkern.h"
