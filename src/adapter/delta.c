/* deltaserve's own delta adapters: sparse weight deltas and bias deltas on the projections of a
 * frozen base (diff pruning, BitFit, full fine-tunes extracted as deltas by delta_extract.c).
 *
 * A directory with adapter_config.json
 *   {"adapter_type": "delta", "version": 1, "base_model_name_or_path": "...",
 *    "target_modules": ["q_proj", ...], "density": 0.01, "source": "extract"}
 * (density and source are informational; any other key is refused by name) and
 * adapter_model.safetensors holding, per adapted module M = model.layers.<i>.{self_attn|mlp}.<proj>:
 *   M.delta_indptr  I32 [out + 1]   CSR row pointers: 0, non-decreasing, last = nnz
 *   M.delta_indices I32 [nnz]       column of each entry: < in, strictly ascending within a row
 *   M.delta_values  F32|F16|BF16 [nnz]   finite
 *   M.bias_delta    F32|F16|BF16 [out]   added to the projection's output (its bias, if it has one)
 * The projection then computes y = (W + δ) x + b + b_δ. Every tensor is checked against the base
 * model's shapes before anything is allocated from its sizes; a problem names the file and tensor. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapter/loader.h"
#include "util/status.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

enum { T_INDPTR = 0, T_INDICES, T_VALUES, T_BIAS, T_COUNT };
static const char *const tensor_suffix[T_COUNT] = {"delta_indptr", "delta_indices", "delta_values", "bias_delta"};

/* Projection names and base widths, kept here (rather than ds_proj_name / ds_adapter_base_dims) so
 * that the fuzz target compiles this file with the safetensors reader alone. */
static const char *const proj_names[DS_PROJ_COUNT] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"};

static void proj_dims(const ds_model_config *c, int p, int32_t *in, int32_t *out) {
    const int32_t d = c->d_model, q = c->n_head * c->head_dim, kv = c->n_kv_head * c->head_dim, ff = c->d_ff;
    const int32_t ins[DS_PROJ_COUNT] = {d, d, d, q, d, d, ff}, outs[DS_PROJ_COUNT] = {q, kv, kv, d, ff, ff, d};
    *in = ins[p], *out = outs[p];
}

typedef struct delta_ctx {
    const char *cfg_path, *st_path;
    const ds_model *base;
    ds_adapter *a;
    ds_err *err;
    bool target[DS_PROJ_COUNT];
    const ds_st_tensor *(*slots)[T_COUNT]; /* [n_layer * DS_PROJ_COUNT] */
} delta_ctx;

/* ---- adapter_config.json ---- */

static int parse_config(delta_ctx *c, const char *json, size_t len) {
    cJSON *root = cJSON_ParseWithLength(json, len);
    int rc = 0;
    if (!root || !cJSON_IsObject(root)) {
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: not a JSON object", c->cfg_path);
        goto done;
    }
    static const char *const known[] = {"adapter_type", "version", "base_model_name_or_path", "target_modules",
                                        "density", "source"};
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        bool ok = false;
        for (size_t i = 0; i < sizeof known / sizeof *known && !ok; i++) ok = it->string && !strcmp(it->string, known[i]);
        if (!ok) {
            rc = ds_err_set(c->err, DS_EUNSUPPORTED, "%s: unknown key \"%.64s\" in a delta adapter config", c->cfg_path,
                            it->string ? it->string : "?");
            goto done;
        }
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "adapter_type");
    if (!cJSON_IsString(t) || strcmp(t->valuestring, "delta")) {
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: \"adapter_type\" must be \"delta\"", c->cfg_path);
        goto done;
    }
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "version");
    if (v && !(cJSON_IsNumber(v) && v->valuedouble == 1.0)) {
        rc = ds_err_set(c->err, DS_EUNSUPPORTED, "%s: \"version\" must be 1", c->cfg_path);
        goto done;
    }
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(root, "base_model_name_or_path");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(root, "source");
    if ((b && !cJSON_IsString(b) && !cJSON_IsNull(b)) || (s && !cJSON_IsString(s) && !cJSON_IsNull(s))) {
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" must be a string", c->cfg_path,
                        b && !cJSON_IsString(b) && !cJSON_IsNull(b) ? "base_model_name_or_path" : "source");
        goto done;
    }
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(root, "density");
    if (d && !cJSON_IsNull(d) && !(cJSON_IsNumber(d) && d->valuedouble >= 0.0 && d->valuedouble <= 1.0)) {
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: \"density\" must be a number in [0, 1]", c->cfg_path);
        goto done;
    }
    const cJSON *tm = cJSON_GetObjectItemCaseSensitive(root, "target_modules");
    if (!cJSON_IsArray(tm) || cJSON_GetArraySize(tm) == 0) {
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: \"target_modules\" must be a non-empty list of projection names",
                        c->cfg_path);
        goto done;
    }
    cJSON_ArrayForEach(it, tm) {
        int p = -1;
        for (int k = 0; k < DS_PROJ_COUNT && p < 0 && cJSON_IsString(it); k++)
            if (!strcmp(it->valuestring, proj_names[k])) p = k;
        if (p < 0) {
            rc = ds_err_set(c->err, DS_EUNSUPPORTED,
                            "%s: target_modules: \"%.64s\" is not a projection (q_proj, k_proj, v_proj, o_proj, "
                            "gate_proj, up_proj, down_proj)",
                            c->cfg_path, cJSON_IsString(it) ? it->valuestring : "(not a string)");
            goto done;
        }
        c->target[p] = true;
    }
done:
    cJSON_Delete(root);
    return rc;
}

/* ---- tensors ---- */

/* "model.layers.<i>.<self_attn|mlp>.<proj>.<suffix>" → layer, proj, role; false when not of that form. */
static bool parse_name(const char *name, int32_t n_layer, int32_t *layer, int *proj, int *role) {
    static const char pre[] = "model.layers.";
    if (strncmp(name, pre, sizeof pre - 1)) return false;
    const char *p = name + sizeof pre - 1;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] != '.')) return false;
    long l = 0;
    while (*p >= '0' && *p <= '9') {
        l = l * 10 + (*p++ - '0');
        if (l >= n_layer) return false;
    }
    if (*p++ != '.') return false;
    for (int k = 0; k < DS_PROJ_COUNT; k++) {
        char mod[64];
        snprintf(mod, sizeof mod, "%s.%s.", k <= DS_PROJ_O ? "self_attn" : "mlp", proj_names[k]);
        if (strncmp(p, mod, strlen(mod))) continue;
        for (int r = 0; r < T_COUNT; r++)
            if (!strcmp(p + strlen(mod), tensor_suffix[r])) {
                *layer = (int32_t)l, *proj = k, *role = r;
                return true;
            }
    }
    return false;
}

static int collect(delta_ctx *c, const ds_st_file *st) {
    const size_t n_slots = (size_t)c->a->n_layer * DS_PROJ_COUNT;
    if (st->n_tensors == 0) return ds_err_set(c->err, DS_EFORMAT, "%s: no tensors", c->st_path);
    if (!(c->slots = calloc(n_slots, sizeof *c->slots))) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    for (size_t i = 0; i < st->n_tensors; i++) {
        const ds_st_tensor *t = &st->tensors[i];
        int32_t layer;
        int proj, role;
        if (!parse_name(t->name, c->a->n_layer, &layer, &proj, &role))
            return ds_err_set(c->err, DS_EFORMAT,
                              "%s: tensor '%.200s' is not a delta tensor of this base "
                              "(model.layers.<0..%d>.<self_attn|mlp>.<proj>.{delta_indptr,delta_indices,"
                              "delta_values,bias_delta})",
                              c->st_path, t->name, c->a->n_layer - 1);
        if (!c->target[proj])
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%.200s': %s is not in target_modules", c->st_path,
                              t->name, proj_names[proj]);
        c->slots[(size_t)layer * DS_PROJ_COUNT + proj][role] = t;
    }
    return 0;
}

static int check_1d(delta_ctx *c, const ds_st_tensor *t, bool index, int64_t n) {
    if (index ? strcmp(t->dtype_name, "I32") : t->dtype == DS_ST_UNSUPPORTED)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' has dtype %s; expected %s", c->st_path, t->name,
                          t->dtype_name, index ? "I32" : "F32, F16 or BF16");
    if (n < 0) { /* length given by the data: any 1-D tensor */
        if (t->n_dims != 1)
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must be 1-D (has %d dims)", c->st_path, t->name,
                              t->n_dims);
        return 0;
    }
    return ds_st_check_shape(t, c->st_path, &n, 1, c->err);
}

static int read_vec(delta_ctx *c, const ds_st_tensor *t, size_t n, float **out) {
    if (!(*out = malloc(n ? n * sizeof(float) : 1))) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    const int64_t shape = (int64_t)n;
    int rc = ds_st_read_f32(t, c->st_path, &shape, 1, *out, n, c->err);
    for (size_t i = 0; !rc && i < n; i++)
        if (!isfinite((*out)[i]))
            rc = ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' holds a non-finite value at index %zu", c->st_path,
                            t->name, i);
    return rc;
}

void ds_delta_module_free(ds_delta_module *m) {
    if (!m) return;
    free(m->row_ptr), free(m->col), free(m->val);
    free(m);
}

size_t ds_delta_module_bytes(const ds_delta_module *m) {
    return ((size_t)m->rows + 1) * sizeof(int32_t) + (size_t)m->nnz * (sizeof(int32_t) + sizeof(float));
}

/* One sparse delta: shapes against the base projection [out][in], then the CSR invariants. */
static int load_sparse(delta_ctx *c, const ds_st_tensor *const *ts, int32_t out, int32_t in, ds_delta_module **res) {
    const ds_st_tensor *ip = ts[T_INDPTR], *ix = ts[T_INDICES], *vl = ts[T_VALUES];
    int rc = check_1d(c, ip, true, (int64_t)out + 1);
    if (!rc) rc = check_1d(c, ix, true, -1);
    if (!rc) rc = check_1d(c, vl, false, ix->shape[0]);
    if (rc) return rc;
    const int64_t nnz = ix->shape[0];
    if (nnz > (int64_t)out * in || nnz > INT32_MAX)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': %lld entries for a %d x %d matrix", c->st_path,
                          ix->name, (long long)nnz, out, in);
    ds_delta_module *m = calloc(1, sizeof *m);
    if (!m) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    *res = m;
    *m = (ds_delta_module){.rows = out, .cols = in, .nnz = nnz};
    m->row_ptr = malloc(((size_t)out + 1) * sizeof(int32_t));
    m->col = malloc(nnz ? (size_t)nnz * sizeof(int32_t) : 1);
    if (!m->row_ptr || !m->col) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    memcpy(m->row_ptr, ip->data, ((size_t)out + 1) * sizeof(int32_t));
    memcpy(m->col, ix->data, (size_t)nnz * sizeof(int32_t));
    if (m->row_ptr[0] != 0 || m->row_ptr[out] != nnz)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must start at 0 and end at %lld (the entry count)",
                          c->st_path, ip->name, (long long)nnz);
    for (int32_t r = 0; r < out; r++) {
        const int32_t b = m->row_ptr[r], e = m->row_ptr[r + 1];
        if (e < b || e > nnz)
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': row pointers decrease or pass the end at row %d",
                              c->st_path, ip->name, r);
        for (int32_t k = b; k < e; k++) {
            if (m->col[k] < 0 || m->col[k] >= in)
                return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': column %d of row %d is out of range [0, %d)",
                                  c->st_path, ix->name, m->col[k], r, in);
            if (k > b && m->col[k] <= m->col[k - 1])
                return ds_err_set(c->err, DS_EFORMAT,
                                  "%s: tensor '%s': columns of row %d are not strictly ascending (%d after %d)",
                                  c->st_path, ix->name, r, m->col[k], m->col[k - 1]);
        }
    }
    return read_vec(c, vl, (size_t)nnz, &m->val);
}

static int load_slot(delta_ctx *c, size_t slot) {
    const ds_st_tensor *const *ts = c->slots[slot];
    ds_adapter *a = c->a;
    const int p = (int)(slot % DS_PROJ_COUNT);
    const int32_t out = a->proj_out[p], in = a->proj_in[p];
    const int have = !!ts[T_INDPTR] + !!ts[T_INDICES] + !!ts[T_VALUES];
    if (have != 0 && have != 3) {
        const ds_st_tensor *any = ts[T_INDPTR] ? ts[T_INDPTR] : ts[T_INDICES] ? ts[T_INDICES] : ts[T_VALUES];
        char mod[256];
        snprintf(mod, sizeof mod, "%.200s", any->name);
        *strrchr(mod, '.') = 0;
        return ds_err_set(c->err, DS_EFORMAT, "%s: module '%s' needs all of delta_indptr, delta_indices, delta_values",
                          c->st_path, mod);
    }
    if (have == 3) {
        if (!a->delta && !(a->delta = calloc((size_t)a->n_layer * DS_PROJ_COUNT, sizeof *a->delta)))
            return ds_err_set(c->err, DS_ENOMEM, "out of memory");
        DS_TRY(load_sparse(c, ts, out, in, &a->delta[slot]));
        a->host_bytes += ds_delta_module_bytes(a->delta[slot]);
    }
    if (ts[T_BIAS]) {
        DS_TRY(check_1d(c, ts[T_BIAS], false, out));
        if (!a->dbias && !(a->dbias = calloc((size_t)a->n_layer * DS_PROJ_COUNT, sizeof *a->dbias)))
            return ds_err_set(c->err, DS_ENOMEM, "out of memory");
        DS_TRY(read_vec(c, ts[T_BIAS], (size_t)out, &a->dbias[slot]));
        a->host_bytes += (size_t)out * sizeof(float);
    }
    return 0;
}

static int load_tensors(delta_ctx *c, const ds_st_file *st) {
    int rc = collect(c, st);
    for (size_t s = 0; !rc && s < (size_t)c->a->n_layer * DS_PROJ_COUNT; s++) rc = load_slot(c, s);
    free(c->slots);
    c->slots = NULL;
    return rc;
}

static void init_adapter(ds_adapter *a, const ds_model *base) {
    snprintf(a->peft_type, sizeof a->peft_type, "DELTA");
    a->kind = DS_ADAPTER_DELTA;
    a->n_layer = base->cfg.n_layer;
    a->d_model = base->cfg.d_model;
    for (int p = 0; p < DS_PROJ_COUNT; p++) proj_dims(&base->cfg, p, &a->proj_in[p], &a->proj_out[p]);
}

/* ---- entry points ---- */

bool ds_delta_is_dir(const char *dir) {
    char p[4200];
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    char *json = NULL;
    size_t len = 0;
    ds_err err = {{0}};
    if (ds_file_read_all(p, DS_ADAPTER_CONFIG_MAX, &json, &len, &err)) return false;
    cJSON *root = cJSON_ParseWithLength(json, len);
    free(json);
    const bool is = cJSON_IsObject(root) && cJSON_GetObjectItemCaseSensitive(root, "adapter_type") != NULL;
    cJSON_Delete(root);
    return is;
}

int ds_delta_load(ds_adapter *a, const char *dir, const ds_model *base, ds_err *err) {
    char cfg_path[4200], st_path[4200];
    snprintf(cfg_path, sizeof cfg_path, "%s/adapter_config.json", dir);
    snprintf(st_path, sizeof st_path, "%s/adapter_model.safetensors", dir);
    delta_ctx c = {.cfg_path = cfg_path, .st_path = st_path, .base = base, .a = a, .err = err};
    init_adapter(a, base);
    char *json = NULL;
    size_t len = 0;
    int rc = ds_file_read_all(cfg_path, DS_ADAPTER_CONFIG_MAX, &json, &len, err);
    if (rc) return rc;
    rc = parse_config(&c, json, len);
    free(json);
    if (rc) return rc;
    struct stat sb;
    if (stat(st_path, &sb) != 0)
        return ds_err_set(err, DS_ENOTFOUND, "%s: no adapter_model.safetensors (%s)", dir, strerror(errno));
    ds_st_file st;
    if ((rc = ds_st_open(&st, st_path, err))) return rc;
    rc = load_tensors(&c, &st);
    ds_st_close(&st);
    return rc;
}

int ds_delta_check_mem(const char *json, size_t json_len, const void *st_data, size_t st_len, const ds_model *base,
                       ds_err *err) {
    ds_adapter *a = calloc(1, sizeof *a);
    if (!a) return ds_err_set(err, DS_ENOMEM, "out of memory");
    delta_ctx c = {.cfg_path = "adapter_config.json", .st_path = "adapter_model.safetensors", .base = base, .a = a,
                   .err = err};
    init_adapter(a, base);
    int rc = parse_config(&c, json, json_len);
    ds_st_file st;
    if (!rc && !(rc = ds_st_open_mem(&st, st_data, st_len, c.st_path, err))) {
        rc = load_tensors(&c, &st);
        ds_st_close(&st);
    }
    for (size_t i = 0; i < (size_t)a->n_layer * DS_PROJ_COUNT; i++) {
        if (a->delta) ds_delta_module_free(a->delta[i]);
        if (a->dbias) free(a->dbias[i]);
    }
    free(a->delta), free(a->dbias), free(a);
    return rc;
}
