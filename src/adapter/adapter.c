/* Host-side adapters: defaults, allocation, freeing, and ds_adapter_load's dispatch between a PEFT
 * directory, an AdapterHub bottleneck adapter directory, a deltaserve delta adapter directory
 * (adapter_config.json with "adapter_type") and a llama.cpp GGUF LoRA file. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapter/loader.h"

ds_adapter_load_params ds_adapter_default_load_params(void) {
    return (ds_adapter_load_params){.name = NULL, .user_scale = 1.0f};
}

ds_lora_module *ds_lora_module_new(int32_t rank, int32_t in, int32_t out) {
    size_t na, nb;
    if (rank < 1 || in < 1 || out < 1 || !ds_mul_ok((size_t)rank, (size_t)in, &na) ||
        !ds_mul_ok((size_t)rank, (size_t)out, &nb) || !ds_mul_ok(na, sizeof(float), &na) ||
        !ds_mul_ok(nb, sizeof(float), &nb))
        return NULL;
    ds_lora_module *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    *m = (ds_lora_module){.rank = rank, .in = in, .out = out, .scale = 1.0f};
    m->A = malloc(na);
    m->B = malloc(nb);
    if (!m->A || !m->B) {
        ds_lora_module_free(m);
        return NULL;
    }
    return m;
}

void ds_lora_module_free(ds_lora_module *m) {
    if (!m) return;
    free(m->A);
    free(m->B);
    free(m->bias_B);
    free(m->dora_scale);
    free(m);
}

size_t ds_lora_module_bytes(const ds_lora_module *m) {
    size_t n = (size_t)m->rank * ((size_t)m->in + (size_t)m->out);
    if (m->bias_B) n += (size_t)m->out;
    if (m->dora_scale) n += (size_t)m->out;
    return n * sizeof(float);
}

int ds_adapter_alloc_lora_table(ds_adapter *a, ds_err *err) {
    if (!(a->lora = calloc((size_t)a->n_layer * DS_PROJ_COUNT, sizeof *a->lora)))
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    return 0;
}

int ds_adapter_alloc_ia3_table(ds_adapter *a, ds_err *err) {
    if (!(a->ia3 = calloc((size_t)a->n_layer * DS_PROJ_COUNT, sizeof *a->ia3)))
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    return 0;
}

void ds_adapter_free(ds_adapter *a) {
    if (!a) return;
    size_t n = (size_t)a->n_layer * DS_PROJ_COUNT;
    for (size_t i = 0; a->lora && i < n; i++) ds_lora_module_free(a->lora[i]);
    for (size_t i = 0; a->ia3 && i < n; i++) free(a->ia3[i]);
    for (size_t i = 0; a->bn && i < (size_t)a->n_layer * DS_BN_SITES; i++) ds_bn_module_free(a->bn[i]);
    for (size_t i = 0; a->delta && i < n; i++) ds_delta_module_free(a->delta[i]);
    for (size_t i = 0; a->dbias && i < n; i++) free(a->dbias[i]);
    free(a->delta);
    free(a->dbias);
    free(a->bn);
    free(a->lora);
    free(a->ia3);
    ds_lora_module_free(a->lm_head);
    ds_lora_module_free(a->embed);
    free(a->prompt);
    free(a->prefix);
    free(a->name);
    free(a->path);
    free(a);
}

/* Default id: the last path component, without a ".gguf" extension. */
static char *default_name(const char *path) {
    size_t end = strlen(path);
    while (end > 1 && path[end - 1] == '/') end--;
    size_t start = end;
    while (start > 0 && path[start - 1] != '/') start--;
    size_t n = end - start;
    if (n > 5 && !strncmp(path + end - 5, ".gguf", 5)) n -= 5;
    return strndup(path + start, n);
}

static bool is_gguf_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block (issue 14) */
    if (fd < 0) return false;
    struct stat st;
    char magic[4];
    bool ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && read(fd, magic, 4) == 4 && !memcmp(magic, "GGUF", 4);
    close(fd);
    return ok;
}

static ds_adapter *new_adapter(const char *path, const ds_model *base, const ds_adapter_load_params *p, ds_err *err) {
    ds_adapter *a = calloc(1, sizeof *a);
    if (!a) {
        ds_err_set(err, DS_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    a->n_layer = base->cfg.n_layer;
    a->d_model = base->cfg.d_model;
    for (int p = 0; p < DS_PROJ_COUNT; p++) ds_adapter_base_dims(base, p, &a->proj_in[p], &a->proj_out[p]);
    char *real = realpath(path, NULL);
    a->path = real ? real : strdup(path);
    a->name = p->name ? strdup(p->name) : default_name(path);
    if (!a->path || !a->name) {
        ds_adapter_free(a);
        ds_err_set(err, DS_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    return a;
}

ds_adapter *ds_adapter_load(const char *path, const ds_model *base, const ds_adapter_load_params *params,
                            ds_err *err) {
    ds_adapter_load_params p = params ? *params : ds_adapter_default_load_params();
    if (!path || !*path || !base) {
        ds_err_set(err, DS_EINVAL, "ds_adapter_load: %s", !base ? "no base model" : "empty path");
        return NULL;
    }
    if (p.name && !*p.name) {
        ds_err_set(err, DS_EINVAL, "%s: empty adapter name", path);
        return NULL;
    }
    if (!isfinite(p.user_scale)) {
        ds_err_set(err, DS_EINVAL, "%s: user_scale must be finite", path);
        return NULL;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        ds_err_set(err, errno == ENOENT ? DS_ENOTFOUND : DS_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    bool dir = S_ISDIR(st.st_mode);
    if (!dir && !(S_ISREG(st.st_mode) && is_gguf_file(path))) {
        ds_err_set(err, DS_EFORMAT, "%s: neither an adapter directory (PEFT, AdapterHub) nor a GGUF LoRA file", path);
        return NULL;
    }
    ds_adapter *a = new_adapter(path, base, &p, err);
    if (!a) return NULL;
    int rc = !dir                        ? ds_gguf_lora_load(a, path, base, p.user_scale, err)
             : ds_bottleneck_is_dir(path) ? ds_bottleneck_load(a, path, base, err)
             : ds_delta_is_dir(path)      ? ds_delta_load(a, path, base, err)
                                          : ds_peft_load(a, path, base, err);
    if (rc) {
        ds_adapter_free(a);
        return NULL;
    }
    return a;
}
