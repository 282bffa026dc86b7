/* OpenMP's wait policy before libgomp starts: see omp_env.h. */
#include "util/omp_env.h"

#include <stdlib.h>
#include <unistd.h>

void ds_omp_env_reexec(char **argv) {
    if (getenv("GOMP_SPINCOUNT") || getenv("OMP_WAIT_POLICY")) return;
    if (setenv("GOMP_SPINCOUNT", DS_GOMP_SPINCOUNT, 1) != 0) return;
    execv("/proc/self/exe", argv);
    /* no /proc or no exec: run on with libgomp's default policy (the variable stays set, so a child
     * process inherits the short spin) */
}
