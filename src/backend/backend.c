/* Backend selection by name. The CUDA backend is a module (libds_cuda.so, cuda/CMakeLists.txt)
 * loaded on first use: a CPU-only run never maps cuBLASLt (~150 MB of resident memory at start)
 * and a binary built with CUDA still starts on a host without the CUDA libraries. */
#include "ds/backend.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

ds_backend_params ds_backend_default_params(void) {
    ds_backend_params p = {.n_threads = 0, .device = 0};
    return p;
}

#ifdef DS_HAVE_CUDA
typedef ds_backend *(*cuda_create_fn)(const ds_backend_params *, ds_err *);
static cuda_create_fn cuda_create;
static char cuda_why[512];

/* $DS_CUDA_MODULE, then libds_cuda.so beside the executable or one folder up (tests/ and bench/
 * binaries live below the build folder), then the build folder itself. */
static void load_cuda(void) {
    char exe[PATH_MAX], path[PATH_MAX + 32];
    const char *cands[4] = {getenv("DS_CUDA_MODULE"), NULL, NULL, DS_CUDA_MODULE_PATH};
    char c1[PATH_MAX + 32], c2[PATH_MAX + 32];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        snprintf(c1, sizeof c1, "%s/libds_cuda.so", exe);
        snprintf(c2, sizeof c2, "%s/../libds_cuda.so", exe);
        cands[1] = c1;
        cands[2] = c2;
    }
    snprintf(cuda_why, sizeof cuda_why, "libds_cuda.so not found");
    for (int i = 0; i < 4; i++) {
        if (!cands[i] || access(cands[i], R_OK)) continue;
        snprintf(path, sizeof path, "%s", cands[i]);
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            snprintf(cuda_why, sizeof cuda_why, "%s", dlerror());
            return;
        }
        if (!(cuda_create = (cuda_create_fn)dlsym(h, "ds_backend_cuda_create")))
            snprintf(cuda_why, sizeof cuda_why, "%s: no ds_backend_cuda_create", path);
        return; /* the module stays loaded for the process's lifetime */
    }
}
#endif

ds_backend *ds_backend_create(const char *name, const ds_backend_params *params, ds_err *err) {
    ds_backend_params def = ds_backend_default_params();
    if (!params) params = &def;
    if (!name || !strcmp(name, "cpu")) return ds_backend_cpu_create(params, err);
    if (!strcmp(name, "cuda")) {
#ifdef DS_HAVE_CUDA
        static pthread_once_t once = PTHREAD_ONCE_INIT;
        pthread_once(&once, load_cuda);
        if (cuda_create) return cuda_create(params, err);
        ds_err_set(err, DS_EUNSUPPORTED, "backend 'cuda': cannot load the CUDA module: %s", cuda_why);
        return NULL;
#else
        ds_err_set(err, DS_EUNSUPPORTED, "backend 'cuda': this build has no CUDA backend (DS_CUDA=OFF)");
        return NULL;
#endif
    }
    ds_err_set(err, DS_EINVAL, "unknown backend '%s' (expected cpu or cuda)", name);
    return NULL;
}

void ds_backend_free(ds_backend *b) {
    if (!b) return;
    if (b->iface && b->iface->free) b->iface->free(b->ctx);
    free(b);
}
