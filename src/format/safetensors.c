/* safetensors reader: header validation, fp32 reads, sharded directories.
 * Spec: huggingface/safetensors README ("Format") and its Rust Metadata::validate. */
#include "format/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian; so must the host be");

/* The reference implementation refuses headers above 100 MB; so do we. */
#define ST_MAX_HEADER (100u << 20)
/* JSON numbers are doubles: integers above 2^53 cannot be represented exactly. */
#define ST_MAX_INT 9007199254740992.0

typedef struct {
    const char *name;
    ds_st_dtype dtype;
    int size; /* bytes per element; 0 = sub-byte or unknown (size not checkable) */
} dtype_info;

static const dtype_info DTYPES[] = {
    {"F32", DS_ST_F32, 4},          {"F16", DS_ST_F16, 2},          {"BF16", DS_ST_BF16, 2},
    {"F64", DS_ST_UNSUPPORTED, 8},  {"I64", DS_ST_UNSUPPORTED, 8},  {"U64", DS_ST_UNSUPPORTED, 8},
    {"I32", DS_ST_UNSUPPORTED, 4},  {"U32", DS_ST_UNSUPPORTED, 4},  {"I16", DS_ST_UNSUPPORTED, 2},
    {"U16", DS_ST_UNSUPPORTED, 2},  {"I8", DS_ST_UNSUPPORTED, 1},   {"U8", DS_ST_UNSUPPORTED, 1},
    {"BOOL", DS_ST_UNSUPPORTED, 1}, {"F8_E4M3", DS_ST_UNSUPPORTED, 1}, {"F8_E5M2", DS_ST_UNSUPPORTED, 1},
    {"F8_E8M0", DS_ST_UNSUPPORTED, 1}, {"C64", DS_ST_UNSUPPORTED, 8},
};

static dtype_info lookup_dtype(const char *s) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (!strcmp(s, DTYPES[i].name)) return DTYPES[i];
    return (dtype_info){s, DS_ST_UNSUPPORTED, 0};
}

/* A JSON number that is an integer in [0, 2^53]. */
static bool json_uint(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return false;
    double d = j->valuedouble;
    if (!(d >= 0 && d <= ST_MAX_INT) || d != (double)(uint64_t)d) return false;
    *out = (uint64_t)d;
    return true;
}

static int parse_shape(ds_st_tensor *t, const cJSON *shape, const char *path, ds_err *err) {
    if (!cJSON_IsArray(shape))
        return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': \"shape\" missing or not an array", path, t->name);
    uint64_t n = 1;
    int nd = 0;
    for (const cJSON *d = shape->child; d; d = d->next, nd++) {
        uint64_t v;
        if (nd >= 64 || !json_uint(d, &v))
            return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': bad \"shape\" entry %d", path, t->name, nd);
        if (__builtin_mul_overflow(n, v, &n) || n > (uint64_t)ST_MAX_INT)
            return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': shape product overflows", path, t->name);
        if (nd < DS_ST_MAX_DIMS) t->shape[nd] = (int64_t)v;
    }
    t->n_dims = nd;
    t->n_elems = n;
    return 0;
}

static int parse_offsets(ds_st_tensor *t, const cJSON *offs, size_t data_size, const char *path, ds_err *err) {
    uint64_t b, e;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !json_uint(offs->child, &b) ||
        !json_uint(offs->child->next, &e))
        return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': \"data_offsets\" must be [begin, end] integers", path,
                          t->name);
    if (b > e || e > data_size)
        return ds_err_set(err, DS_EFORMAT,
                          "%s: tensor '%s': data_offsets [%llu, %llu] out of range (data section is %zu bytes)", path,
                          t->name, (unsigned long long)b, (unsigned long long)e, data_size);
    t->offset = (size_t)b;
    t->nbytes = (size_t)(e - b);
    return 0;
}

static int parse_entry(ds_st_tensor *t, const cJSON *item, const uint8_t *data, size_t data_size, const char *path,
                       ds_err *err) {
    if (!(t->name = strdup(item->string))) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", path);
    if (!cJSON_IsObject(item))
        return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': entry is not an object", path, t->name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    if (!cJSON_IsString(dt))
        return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': \"dtype\" missing or not a string", path, t->name);
    dtype_info di = lookup_dtype(dt->valuestring);
    t->dtype = di.dtype;
    snprintf(t->dtype_name, sizeof t->dtype_name, "%s", dt->valuestring);
    int rc = parse_shape(t, cJSON_GetObjectItemCaseSensitive(item, "shape"), path, err);
    if (rc) return rc;
    if ((rc = parse_offsets(t, cJSON_GetObjectItemCaseSensitive(item, "data_offsets"), data_size, path, err))) return rc;
    uint64_t want;
    if (di.size && (__builtin_mul_overflow(t->n_elems, (uint64_t)di.size, &want) || want != t->nbytes))
        return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s': %zu data bytes, but %llu elements of %s need %llu", path,
                          t->name, t->nbytes, (unsigned long long)t->n_elems, t->dtype_name,
                          (unsigned long long)(t->n_elems * (uint64_t)di.size));
    t->data = data + t->offset;
    return 0;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const ds_st_tensor *)a)->name, ((const ds_st_tensor *)b)->name);
}

static int cmp_off(const void *a, const void *b) {
    const ds_st_tensor *x = *(const ds_st_tensor *const *)a, *y = *(const ds_st_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* Names unique; byte ranges disjoint (empty tensors may sit anywhere). */
static int check_layout(ds_st_file *f, ds_err *err) {
    qsort(f->tensors, f->n_tensors, sizeof *f->tensors, cmp_name);
    for (size_t i = 1; i < f->n_tensors; i++)
        if (!strcmp(f->tensors[i - 1].name, f->tensors[i].name))
            return ds_err_set(err, DS_EFORMAT, "%s: duplicate tensor '%s'", f->path, f->tensors[i].name);
    const ds_st_tensor **ord = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof *ord);
    if (!ord) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", f->path);
    for (size_t i = 0; i < f->n_tensors; i++) ord[i] = &f->tensors[i];
    qsort(ord, f->n_tensors, sizeof *ord, cmp_off);
    int rc = 0;
    size_t end = 0;
    const ds_st_tensor *prev = NULL;
    for (size_t i = 0; i < f->n_tensors && !rc; i++) {
        if (ord[i]->nbytes == 0) continue;
        if (prev && ord[i]->offset < end)
            rc = ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' overlaps tensor '%s'", f->path, ord[i]->name, prev->name);
        end = ord[i]->offset + ord[i]->nbytes;
        prev = ord[i];
    }
    free(ord);
    return rc;
}

static int parse_tensors(ds_st_file *f, const cJSON *root, const uint8_t *data, size_t data_size, ds_err *err) {
    size_t n = 0;
    for (const cJSON *it = root->child; it; it = it->next)
        if (strcmp(it->string, "__metadata__")) n++;
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    if (!f->tensors) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", f->path);
    for (const cJSON *it = root->child; it; it = it->next) {
        if (!strcmp(it->string, "__metadata__")) continue;
        int rc = parse_entry(&f->tensors[f->n_tensors++], it, data, data_size, f->path, err);
        if (rc) return rc;
    }
    return check_layout(f, err);
}

static int parse(ds_st_file *f, const uint8_t *base, size_t size, ds_err *err) {
    uint64_t hlen;
    if (size < 8) return ds_err_set(err, DS_EFORMAT, "%s: too small for a safetensors file (%zu bytes)", f->path, size);
    memcpy(&hlen, base, 8);
    if (hlen > size - 8)
        return ds_err_set(err, DS_EFORMAT, "%s: header length %llu runs past the end of the file (%zu bytes)", f->path,
                          (unsigned long long)hlen, size);
    if (hlen > ST_MAX_HEADER)
        return ds_err_set(err, DS_EFORMAT, "%s: header length %llu exceeds the 100 MB limit", f->path,
                          (unsigned long long)hlen);
    /* Parse a NUL-terminated copy: the mapping is not terminated and cJSON is safest on C strings. */
    char *hdr = malloc((size_t)hlen + 1);
    if (!hdr) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", f->path);
    memcpy(hdr, base + 8, (size_t)hlen);
    hdr[hlen] = 0;
    cJSON *root = cJSON_ParseWithLength(hdr, (size_t)hlen);
    free(hdr);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return ds_err_set(err, DS_EFORMAT, "%s: header is not a valid JSON object", f->path);
    }
    int rc = parse_tensors(f, root, base + 8 + hlen, size - 8 - (size_t)hlen, err);
    cJSON_Delete(root);
    return rc;
}

int ds_st_open_mem(ds_st_file *f, const void *data, size_t size, const char *name, ds_err *err) {
    memset(f, 0, sizeof *f);
    f->map.fd = -1;
    if (!(f->path = strdup(name ? name : "<memory>"))) return ds_err_set(err, DS_ENOMEM, "out of memory");
    int rc = parse(f, data, size, err);
    if (rc) ds_st_close(f);
    return rc;
}

int ds_st_open(ds_st_file *f, const char *path, ds_err *err) {
    ds_file_map map;
    int rc = ds_file_map_open(&map, path, err);
    if (rc) {
        memset(f, 0, sizeof *f);
        f->map.fd = -1;
        return rc;
    }
    if ((rc = ds_st_open_mem(f, map.data, map.size, path, err))) {
        ds_file_map_close(&map);
        return rc;
    }
    f->map = map;
    return 0;
}

void ds_st_close(ds_st_file *f) {
    for (size_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->path);
    if (f->map.data) ds_file_map_close(&f->map); /* set only by a successful ds_st_open */
    memset(f, 0, sizeof *f);
    f->map.fd = -1;
}

const ds_st_tensor *ds_st_find(const ds_st_file *f, const char *name) {
    if (!f->n_tensors) return NULL;
    ds_st_tensor probe = {.name = (char *)name};
    return bsearch(&probe, f->tensors, f->n_tensors, sizeof *f->tensors, cmp_name);
}

static void shape_str(const int64_t *s, int n, char *buf, size_t cap) {
    size_t o = 0;
    o += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < n && i < DS_ST_MAX_DIMS && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, i ? ", %lld" : "%lld", (long long)s[i]);
    if (n > DS_ST_MAX_DIMS && o < cap) o += (size_t)snprintf(buf + o, cap - o, ", ...");
    if (o < cap) snprintf(buf + o, cap - o, "]");
}

int ds_st_check_shape(const ds_st_tensor *t, const char *path, const int64_t *want, int nd, ds_err *err) {
    bool ok = t->n_dims == nd;
    for (int i = 0; ok && i < nd && i < DS_ST_MAX_DIMS; i++) ok = t->shape[i] == want[i];
    if (ok && nd <= DS_ST_MAX_DIMS) return 0;
    char a[96], b[96];
    shape_str(t->shape, t->n_dims, a, sizeof a);
    shape_str(want, nd, b, sizeof b);
    return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' has shape %s, expected %s", path ? path : "safetensors",
                      t->name, a, b);
}

int ds_st_read_f32(const ds_st_tensor *t, const char *path, const int64_t *expect_shape, int expect_ndims, float *out,
                   size_t n_out, ds_err *err) {
    if (!path) path = "safetensors";
    if (t->dtype == DS_ST_UNSUPPORTED)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: tensor '%s' has dtype %s (supported: F32, F16, BF16)", path,
                          t->name, t->dtype_name);
    if (t->n_dims > DS_ST_MAX_DIMS)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: tensor '%s' has %d dimensions (max %d)", path, t->name, t->n_dims,
                          DS_ST_MAX_DIMS);
    int rc = expect_shape ? ds_st_check_shape(t, path, expect_shape, expect_ndims, err) : 0;
    if (rc) return rc;
    if (n_out != t->n_elems)
        return ds_err_set(err, DS_EINVAL, "%s: tensor '%s' has %llu elements, buffer holds %zu", path, t->name,
                          (unsigned long long)t->n_elems, n_out);
    const uint8_t *p = t->data;
    if (t->dtype == DS_ST_F32) {
        memcpy(out, p, n_out * 4);
    } else {
        float (*cvt)(uint16_t) = t->dtype == DS_ST_F16 ? ds_f16_to_f32 : ds_bf16_to_f32;
        for (size_t i = 0; i < n_out; i++) out[i] = cvt((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
    }
    return 0;
}

/* ---- directories ---- */

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const ds_st_entry *)a)->t->name, ((const ds_st_entry *)b)->t->name);
}

/* Builds the name-sorted index over every file; a name in two files is an error. */
static int build_index(ds_st_set *s, ds_err *err) {
    size_t n = 0;
    for (size_t i = 0; i < s->n_files; i++) n += s->files[i].n_tensors;
    if (!(s->entries = malloc((n ? n : 1) * sizeof *s->entries))) return ds_err_set(err, DS_ENOMEM, "out of memory");
    for (size_t i = 0; i < s->n_files; i++)
        for (size_t j = 0; j < s->files[i].n_tensors; j++)
            s->entries[s->n_entries++] = (ds_st_entry){&s->files[i].tensors[j], (uint32_t)i};
    qsort(s->entries, s->n_entries, sizeof *s->entries, cmp_entry);
    for (size_t i = 1; i < s->n_entries; i++)
        if (!strcmp(s->entries[i - 1].t->name, s->entries[i].t->name))
            return ds_err_set(err, DS_EFORMAT, "tensor '%s' appears in both %s and %s", s->entries[i].t->name,
                              s->files[s->entries[i - 1].file].path, s->files[s->entries[i].file].path);
    return 0;
}

const ds_st_tensor *ds_st_set_find(const ds_st_set *s, const char *name, const ds_st_file **file) {
    if (!s->n_entries) return NULL;
    ds_st_tensor probe_t = {.name = (char *)name};
    ds_st_entry probe = {.t = &probe_t};
    const ds_st_entry *e = bsearch(&probe, s->entries, s->n_entries, sizeof *s->entries, cmp_entry);
    if (!e) return NULL;
    if (file) *file = &s->files[e->file];
    return e->t;
}

static int join(char *buf, size_t cap, const char *dir, const char *name, ds_err *err) {
    int n = snprintf(buf, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) return ds_err_set(err, DS_EINVAL, "%s: path too long", dir);
    return 0;
}

static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* A shard name from the index must be a plain file name in the same directory. */
static int check_shard_name(const char *idx_path, const char *name, ds_err *err) {
    if (!name[0] || strchr(name, '/') || strchr(name, '\\') || !strcmp(name, ".") || !strcmp(name, ".."))
        return ds_err_set(err, DS_EPERM, "%s: shard name '%s' is not a plain file name", idx_path, name);
    return 0;
}

/* Opens each distinct shard named by weight_map, in first-seen order. */
static int open_shards(ds_st_set *s, const char *dir, const char *idx_path, const cJSON *wm, ds_err *err) {
    size_t n = (size_t)cJSON_GetArraySize(wm);
    const char **names = calloc(n ? n : 1, sizeof *names);
    s->files = calloc(n ? n : 1, sizeof *s->files);
    int rc = names && s->files ? 0 : ds_err_set(err, DS_ENOMEM, "out of memory");
    for (const cJSON *it = wm->child; it && !rc; it = it->next) {
        if (!cJSON_IsString(it)) {
            rc = ds_err_set(err, DS_EFORMAT, "%s: weight_map['%s'] is not a string", idx_path, it->string);
            break;
        }
        if ((rc = check_shard_name(idx_path, it->valuestring, err))) break;
        size_t k = 0;
        while (k < s->n_files && strcmp(names[k], it->valuestring)) k++;
        if (k < s->n_files) continue;
        char path[PATH_MAX];
        if ((rc = join(path, sizeof path, dir, it->valuestring, err))) break;
        if ((rc = ds_st_open(&s->files[s->n_files], path, err))) break;
        names[s->n_files++] = it->valuestring;
    }
    free(names);
    return rc;
}

/* Every weight_map entry must be found in the shard it names. */
static int check_weight_map(const ds_st_set *s, const char *dir, const char *idx_path, const cJSON *wm, ds_err *err) {
    for (const cJSON *it = wm->child; it; it = it->next) {
        const ds_st_file *f = NULL;
        char want[PATH_MAX];
        snprintf(want, sizeof want, "%s/%s", dir, it->valuestring);
        if (!ds_st_set_find(s, it->string, &f) || strcmp(f->path, want))
            return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' is not in shard %s", idx_path, it->string,
                              it->valuestring);
    }
    return 0;
}

static int open_index(ds_st_set *s, const char *dir, const char *idx_path, ds_err *err) {
    char *text = NULL;
    int rc = ds_file_read_all(idx_path, 64u << 20, &text, NULL, err);
    if (rc) return rc;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) rc = ds_err_set(err, DS_EFORMAT, "%s: not JSON with a \"weight_map\" object", idx_path);
    if (!rc) rc = open_shards(s, dir, idx_path, wm, err);
    if (!rc) rc = build_index(s, err);
    if (!rc) rc = check_weight_map(s, dir, idx_path, wm, err);
    cJSON_Delete(root);
    return rc;
}

int ds_st_set_open_dir(ds_st_set *s, const char *dir, ds_err *err) {
    memset(s, 0, sizeof *s);
    char idx[PATH_MAX], single[PATH_MAX];
    int rc = join(idx, sizeof idx, dir, "model.safetensors.index.json", err);
    if (!rc) rc = join(single, sizeof single, dir, "model.safetensors", err);
    if (rc) return rc;
    if (file_exists(idx)) {
        rc = open_index(s, dir, idx, err);
    } else if (file_exists(single)) {
        if (!(s->files = calloc(1, sizeof *s->files))) return ds_err_set(err, DS_ENOMEM, "out of memory");
        rc = ds_st_open(&s->files[0], single, err);
        if (!rc) s->n_files = 1;
        if (!rc) rc = build_index(s, err);
    } else {
        return ds_err_set(err, DS_ENOTFOUND, "%s: no model.safetensors or model.safetensors.index.json", dir);
    }
    if (rc) ds_st_set_close(s);
    return rc;
}

void ds_st_set_close(ds_st_set *s) {
    for (size_t i = 0; i < s->n_files; i++) ds_st_close(&s->files[i]);
    free(s->files);
    free(s->entries);
    memset(s, 0, sizeof *s);
}
