/* Backend selection by name. */
#include "ds/backend.h"

#include <stdlib.h>
#include <string.h>

ds_backend_params ds_backend_default_params(void) {
    ds_backend_params p = {.n_threads = 0, .device = 0};
    return p;
}

#ifdef DS_HAVE_CUDA
ds_backend *ds_backend_cuda_create(const ds_backend_params *params, ds_err *err);
#endif

ds_backend *ds_backend_create(const char *name, const ds_backend_params *params, ds_err *err) {
    ds_backend_params def = ds_backend_default_params();
    if (!params) params = &def;
    if (!name || !strcmp(name, "cpu")) return ds_backend_cpu_create(params, err);
    if (!strcmp(name, "cuda")) {
#ifdef DS_HAVE_CUDA
        return ds_backend_cuda_create(params, err);
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
