/* The math libraries' settings before they start: see cpu_env.h. */
#include "backend/cpu/cpu_env.h"

#include <cblas.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

const char *ds_blas_core_for(const char *detected, bool avx2, bool avx512) {
    if (!detected || !avx2) return NULL;
    /* OpenBLAS's names for its x86 kernel sets with AVX2 (or wider) GEMM kernels */
    static const char *const wide[] = {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids", "Excavator"};
    for (size_t i = 0; i < sizeof wide / sizeof *wide; i++)
        if (!strcasecmp(detected, wide[i])) return NULL;
    return avx512 ? "SkylakeX" : "Haswell";
}

static const char *blas_core_fix(void) {
    if (getenv("OPENBLAS_CORETYPE")) return NULL; /* the user's choice */
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512cd");
    return ds_blas_core_for(openblas_get_corename(), avx2, avx512);
#else
    return NULL;
#endif
}

void ds_cpu_env_reexec(char **argv) {
    bool again = false;
    if (!getenv("GOMP_SPINCOUNT") && !getenv("OMP_WAIT_POLICY"))
        again |= setenv("GOMP_SPINCOUNT", DS_GOMP_SPINCOUNT, 1) == 0;
    const char *core = blas_core_fix(), *was = openblas_get_corename();
    if (core && setenv("OPENBLAS_CORETYPE", core, 1) == 0 && setenv("DS_BLAS_CORE_WAS", was, 1) == 0) again = true;
    if (!again) return;
    execv("/proc/self/exe", argv);
    /* no /proc or no exec: run on with the libraries' defaults (the variables stay set, so a child
     * process inherits them) */
}
