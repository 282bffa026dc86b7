/* GGUF v2/v3 reader with bounds checks on every read, and ggml block dequantisation.
 * Spec: ggml docs/gguf.md; block layouts: ggml-common.h / ggml-quants.c dequantize_row_*. */
#include "format/gguf.h"

#include "ds/weight.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF and safetensors parsing assume a little-endian host");

/* ---- ggml type table (block size in elements, block size in bytes): ggml.c type_traits ---- */

typedef struct {
    const char *name;
    uint16_t blck, tsize;
} type_info;

static const type_info TYPES[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},        [2] = {"Q4_0", 32, 18},     [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},     [7] = {"Q5_1", 32, 24},     [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 40},
    [10] = {"Q2_K", 256, 84},   [11] = {"Q3_K", 256, 110},  [12] = {"Q4_K", 256, 144},  [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},  [15] = {"Q8_K", 256, 292},  [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50}, [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110},
    [22] = {"IQ2_S", 256, 82},  [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},       [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},       [27] = {"I64", 1, 8},       [28] = {"F64", 1, 8},       [29] = {"IQ1_M", 256, 56},
    [30] = {"BF16", 1, 2},      [34] = {"TQ1_0", 256, 54},  [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},
};
#define N_TYPES (sizeof TYPES / sizeof TYPES[0])

const char *ds_ggml_type_name(uint32_t type) {
    if (type < N_TYPES && TYPES[type].name) return TYPES[type].name;
    static _Thread_local char buf[24];
    snprintf(buf, sizeof buf, "type#%u", type);
    return buf;
}

bool ds_ggml_type_size(uint32_t type, size_t *blck, size_t *type_size) {
    if (type >= N_TYPES || !TYPES[type].name) return false;
    if (blck) *blck = TYPES[type].blck;
    if (type_size) *type_size = TYPES[type].tsize;
    return true;
}

bool ds_ggml_can_dequant(uint32_t type) { return type < DS_DTYPE_COUNT && ds_dtype_supported((int)type); }

/* ---- bounded reader ---- */

typedef struct {
    const uint8_t *p;
    size_t size, pos;
    const char *path;
    ds_err *err;
} rd_t;

static int rd_need(rd_t *r, uint64_t n, const char *what) {
    if (n > r->size - r->pos)
        return ds_err_set(r->err, DS_EFORMAT, "%s: truncated or corrupt: %s at offset %zu needs %llu bytes, %zu left",
                          r->path, what, r->pos, (unsigned long long)n, r->size - r->pos);
    return 0;
}

static int rd_u32(rd_t *r, uint32_t *v, const char *what) {
    int rc = rd_need(r, 4, what);
    if (rc) return rc;
    memcpy(v, r->p + r->pos, 4);
    r->pos += 4;
    return 0;
}

static int rd_u64(rd_t *r, uint64_t *v, const char *what) {
    int rc = rd_need(r, 8, what);
    if (rc) return rc;
    memcpy(v, r->p + r->pos, 8);
    r->pos += 8;
    return 0;
}

/* A GGUF string: u64 length + bytes (no NUL). *s points into the buffer. */
static int rd_str(rd_t *r, const uint8_t **s, uint64_t *len, const char *what) {
    int rc = rd_u64(r, len, what);
    if (rc) return rc;
    if (*len > r->size - r->pos)
        return ds_err_set(r->err, DS_EFORMAT, "%s: corrupt: %s at offset %zu has length %llu but only %zu bytes remain",
                          r->path, what, r->pos - 8, (unsigned long long)*len, r->size - r->pos);
    *s = r->p + r->pos;
    r->pos += (size_t)*len;
    return 0;
}

static char *dup_n(const uint8_t *s, size_t n) {
    char *c = malloc(n + 1);
    if (!c) return NULL;
    memcpy(c, s, n);
    c[n] = 0;
    return c;
}

/* Grows *arr (elements of `size` bytes, zero-filled) so index i fits. Capacity doubles from 64, so the
 * memory follows the entries actually parsed rather than a count read from the file. */
static bool grow(void **arr, size_t *cap, size_t i, size_t size) {
    if (i < *cap) return true;
    size_t n = *cap ? *cap * 2 : 64;
    void *p = realloc(*arr, n * size);
    if (!p) return false;
    memset((char *)p + *cap * size, 0, (n - *cap) * size);
    *arr = p;
    *cap = n;
    return true;
}

static const uint8_t VT_SIZE[DS_GGUF_NTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* ---- metadata ---- */

static int parse_array(rd_t *r, ds_gguf_kv *kv) {
    uint32_t at;
    int rc = rd_u32(r, &at, "array element type");
    if (rc) return rc;
    if (at >= DS_GGUF_NTYPES)
        return ds_err_set(r->err, DS_EFORMAT, "%s: metadata '%s': unknown array element type %u", r->path, kv->key, at);
    if (at == DS_GGUF_ARRAY)
        return ds_err_set(r->err, DS_EUNSUPPORTED, "%s: metadata '%s': nested arrays are not supported", r->path, kv->key);
    if ((rc = rd_u64(r, &kv->arr_n, "array count"))) return rc;
    kv->arr_type = (ds_gguf_vtype)at;
    kv->off = r->pos;
    /* Every element takes at least its fixed size (8 for a string's length): check the count against
     * the remaining bytes before walking, so a corrupt count fails at once. */
    uint64_t min_el = at == DS_GGUF_STRING ? 8 : VT_SIZE[at];
    if (kv->arr_n > (r->size - r->pos) / min_el)
        return ds_err_set(r->err, DS_EFORMAT, "%s: corrupt: metadata '%s' array count %llu exceeds the %zu bytes left",
                          r->path, kv->key, (unsigned long long)kv->arr_n, r->size - r->pos);
    if (at != DS_GGUF_STRING) {
        r->pos += (size_t)(kv->arr_n * min_el);
        return 0;
    }
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        const uint8_t *s;
        uint64_t len;
        if ((rc = rd_str(r, &s, &len, kv->key))) return rc;
    }
    return 0;
}

static int parse_kv(rd_t *r, ds_gguf_kv *kv) {
    const uint8_t *s;
    uint64_t len;
    int rc = rd_str(r, &s, &len, "metadata key");
    if (rc) return rc;
    if (!(kv->key = dup_n(s, (size_t)len))) return ds_err_set(r->err, DS_ENOMEM, "%s: out of memory", r->path);
    uint32_t t;
    if ((rc = rd_u32(r, &t, "metadata value type"))) return rc;
    if (t >= DS_GGUF_NTYPES)
        return ds_err_set(r->err, DS_EFORMAT, "%s: metadata '%s' has unknown value type %u", r->path, kv->key, t);
    kv->type = (ds_gguf_vtype)t;
    if (t == DS_GGUF_ARRAY) return parse_array(r, kv);
    kv->off = r->pos;
    if (t == DS_GGUF_STRING) {
        if ((rc = rd_str(r, &s, &len, kv->key))) return rc;
        kv->off += 8;
        if (!(kv->str = dup_n(s, (size_t)len))) return ds_err_set(r->err, DS_ENOMEM, "%s: out of memory", r->path);
        return 0;
    }
    if ((rc = rd_need(r, VT_SIZE[t], kv->key))) return rc;
    r->pos += VT_SIZE[t];
    return 0;
}

static int cmp_kv(const void *a, const void *b) {
    return strcmp(((const ds_gguf_kv *)a)->key, ((const ds_gguf_kv *)b)->key);
}

static int parse_metadata(ds_gguf *g, rd_t *r, uint64_t n_kv) {
    /* Each entry needs >= 13 bytes (key length, type, 1-byte value). */
    if (n_kv > (r->size - r->pos) / 13)
        return ds_err_set(r->err, DS_EFORMAT, "%s: corrupt header: %llu metadata entries cannot fit in %zu bytes",
                          g->path, (unsigned long long)n_kv, r->size - r->pos);
    size_t cap = 0;
    for (uint64_t i = 0; i < n_kv; i++) {
        if (!grow((void **)&g->kv, &cap, (size_t)i, sizeof *g->kv))
            return ds_err_set(r->err, DS_ENOMEM, "%s: out of memory", g->path);
        g->n_kv = (size_t)i + 1; /* so close() frees the partially parsed entry */
        int rc = parse_kv(r, &g->kv[i]);
        if (rc) return rc;
    }
    if (g->n_kv > 1) qsort(g->kv, g->n_kv, sizeof *g->kv, cmp_kv); /* lookups bsearch; duplicates adjacent */
    for (size_t i = 1; i < g->n_kv; i++)
        if (!strcmp(g->kv[i - 1].key, g->kv[i].key))
            return ds_err_set(r->err, DS_EFORMAT, "%s: duplicate metadata key '%s'", g->path, g->kv[i].key);
    return 0;
}

const ds_gguf_kv *ds_gguf_find_kv(const ds_gguf *g, const char *key) {
    if (!g->n_kv) return NULL;
    ds_gguf_kv probe = {.key = (char *)key};
    return bsearch(&probe, g->kv, g->n_kv, sizeof *g->kv, cmp_kv);
}

/* ---- tensor infos ---- */

static int tensor_sizes(rd_t *r, ds_gguf_tensor *t) {
    size_t blck, tsize;
    if (!ds_ggml_type_size(t->type, &blck, &tsize))
        return ds_err_set(r->err, DS_EUNSUPPORTED, "%s: tensor '%s' has unknown ggml type %u", r->path, t->name, t->type);
    uint64_t n = 1;
    for (int j = 0; j < 4; j++) {
        if (t->ne[j] == 0 || t->ne[j] > (uint64_t)INT64_MAX || __builtin_mul_overflow(n, t->ne[j], &n) ||
            n > (uint64_t)INT64_MAX)
            return ds_err_set(r->err, DS_EFORMAT, "%s: tensor '%s' has an invalid shape (dim %d = %llu)", r->path,
                              t->name, j, (unsigned long long)t->ne[j]);
    }
    if (t->ne[0] % blck)
        return ds_err_set(r->err, DS_EFORMAT, "%s: tensor '%s': row length %llu is not a multiple of the %s block size %zu",
                          r->path, t->name, (unsigned long long)t->ne[0], ds_ggml_type_name(t->type), blck);
    t->n_elems = n;
    t->n_rows = n / t->ne[0];
    t->row_bytes = (size_t)(t->ne[0] / blck) * tsize; /* < ne0 * 292 / 32: no overflow */
    if (!ds_mul_ok(t->row_bytes, (size_t)t->n_rows, &t->nbytes))
        return ds_err_set(r->err, DS_EFORMAT, "%s: tensor '%s' is too large", r->path, t->name);
    return 0;
}

static int parse_tensor_info(rd_t *r, ds_gguf_tensor *t) {
    const uint8_t *s;
    uint64_t len;
    int rc = rd_str(r, &s, &len, "tensor name");
    if (rc) return rc;
    if (!(t->name = dup_n(s, (size_t)len))) return ds_err_set(r->err, DS_ENOMEM, "%s: out of memory", r->path);
    if ((rc = rd_u32(r, &t->n_dims, "tensor n_dims"))) return rc;
    if (t->n_dims == 0 || t->n_dims > 4)
        return ds_err_set(r->err, DS_EFORMAT, "%s: tensor '%s' has %u dimensions (must be 1..4)", r->path, t->name,
                          t->n_dims);
    for (int j = 0; j < 4; j++) t->ne[j] = 1;
    for (uint32_t j = 0; j < t->n_dims; j++)
        if ((rc = rd_u64(r, &t->ne[j], "tensor dims"))) return rc;
    if ((rc = rd_u32(r, &t->type, "tensor type"))) return rc;
    if ((rc = rd_u64(r, &t->offset, "tensor offset"))) return rc;
    return tensor_sizes(r, t);
}

/* Sorting keys paired with tensor indices (qsort has no context argument). */
typedef struct {
    const char *name;
    uint64_t off;
    uint32_t idx;
} sort_key;

static int cmp_key_name(const void *a, const void *b) {
    return strcmp(((const sort_key *)a)->name, ((const sort_key *)b)->name);
}

static int cmp_key_off(const void *a, const void *b) {
    uint64_t x = ((const sort_key *)a)->off, y = ((const sort_key *)b)->off;
    return x < y ? -1 : x > y;
}

/* Returns a malloc'd array of n keys sorted by cmp, or NULL on OOM. */
static sort_key *sorted_keys(const ds_gguf *g, int (*cmp)(const void *, const void *)) {
    sort_key *k = malloc((g->n_tensors ? g->n_tensors : 1) * sizeof *k);
    if (!k) return NULL;
    for (size_t i = 0; i < g->n_tensors; i++)
        k[i] = (sort_key){g->tensors[i].name, g->tensors[i].offset, (uint32_t)i};
    qsort(k, g->n_tensors, sizeof *k, cmp);
    return k;
}

/* Data bounds: each tensor aligned, inside the file, and not overlapping the next one. */
static int check_data(ds_gguf *g, ds_err *err) {
    for (size_t i = 0; i < g->n_tensors; i++) {
        ds_gguf_tensor *t = &g->tensors[i];
        size_t end;
        if (t->offset % g->alignment)
            return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' data offset %llu is not aligned to %zu", g->path,
                              t->name, (unsigned long long)t->offset, g->alignment);
        if (g->data_off > g->size || t->offset > g->size - g->data_off || !ds_add_ok(g->data_off + (size_t)t->offset, t->nbytes, &end) ||
            end > g->size)
            return ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' data (offset %llu, %zu bytes) runs past the end of the file (%zu bytes)",
                              g->path, t->name, (unsigned long long)t->offset, t->nbytes, g->size);
        t->data = g->base + g->data_off + t->offset;
    }
    sort_key *ord = sorted_keys(g, cmp_key_off);
    if (!ord) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", g->path);
    int rc = 0;
    for (size_t i = 1; i < g->n_tensors && !rc; i++) {
        const ds_gguf_tensor *a = &g->tensors[ord[i - 1].idx], *b = &g->tensors[ord[i].idx];
        if (b->offset < a->offset + a->nbytes)
            rc = ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' data overlaps tensor '%s'", g->path, b->name, a->name);
    }
    free(ord);
    return rc;
}

static int parse_tensors(ds_gguf *g, rd_t *r, uint64_t n) {
    /* Each info needs >= 32 bytes (name length, n_dims, one dim, type, offset). */
    if (n > (r->size - r->pos) / 32 || n > UINT32_MAX)
        return ds_err_set(r->err, DS_EFORMAT, "%s: corrupt header: %llu tensor infos cannot fit in %zu bytes", g->path,
                          (unsigned long long)n, r->size - r->pos);
    size_t cap = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (!grow((void **)&g->tensors, &cap, (size_t)i, sizeof *g->tensors))
            return ds_err_set(r->err, DS_ENOMEM, "%s: out of memory", g->path);
        g->n_tensors = (size_t)i + 1;
        int rc = parse_tensor_info(r, &g->tensors[i]);
        if (rc) return rc;
    }
    sort_key *k = sorted_keys(g, cmp_key_name);
    g->by_name = malloc((g->n_tensors ? g->n_tensors : 1) * sizeof *g->by_name);
    if (!k || !g->by_name) {
        free(k);
        return ds_err_set(r->err, DS_ENOMEM, "%s: out of memory", g->path);
    }
    for (size_t i = 0; i < g->n_tensors; i++) g->by_name[i] = k[i].idx;
    free(k);
    for (size_t i = 1; i < g->n_tensors; i++)
        if (!strcmp(g->tensors[g->by_name[i - 1]].name, g->tensors[g->by_name[i]].name))
            return ds_err_set(r->err, DS_EFORMAT, "%s: duplicate tensor name '%s'", g->path,
                              g->tensors[g->by_name[i]].name);
    return 0;
}

const ds_gguf_tensor *ds_gguf_find_tensor(const ds_gguf *g, const char *name) {
    size_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const ds_gguf_tensor *t = &g->tensors[g->by_name[mid]];
        int c = strcmp(name, t->name);
        if (!c) return t;
        if (c < 0) hi = mid;
        else lo = mid + 1;
    }
    return NULL;
}

/* ---- open / close ---- */

static int parse_alignment(ds_gguf *g, ds_err *err) {
    g->alignment = 32;
    uint32_t a = 0;
    int rc = ds_gguf_get_u32(g, "general.alignment", &a, err);
    if (rc == DS_ENOTFOUND) return 0;
    if (rc) return rc;
    if (a == 0 || (a & (a - 1)) || a > (1u << 20))
        return ds_err_set(err, DS_EFORMAT, "%s: general.alignment %u is not a power of two in 1..2^20", g->path, a);
    g->alignment = a;
    return 0;
}

static int parse(ds_gguf *g, ds_err *err) {
    rd_t r = {.p = g->base, .size = g->size, .pos = 0, .path = g->path, .err = err};
    uint32_t version;
    uint64_t n_tensors, n_kv;
    if (g->size < 4 || memcmp(g->base, "GGUF", 4))
        return ds_err_set(err, DS_EFORMAT, "%s: not a GGUF file (bad magic)", g->path);
    r.pos = 4;
    int rc = rd_u32(&r, &version, "header version");
    if (rc) return rc;
    if (version == 1 || version > 0xffff)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: GGUF version %u is not supported (need 2 or 3%s)", g->path,
                          version, version > 0xffff ? "; big-endian files are not supported" : "");
    if (version == 0 || version > 3)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: GGUF version %u is not supported (need 2 or 3)", g->path, version);
    g->version = version;
    if ((rc = rd_u64(&r, &n_tensors, "tensor count")) || (rc = rd_u64(&r, &n_kv, "metadata count"))) return rc;
    if ((rc = parse_metadata(g, &r, n_kv))) return rc;
    if ((rc = parse_tensors(g, &r, n_tensors))) return rc;
    if ((rc = parse_alignment(g, err))) return rc;
    size_t pad = (g->alignment - r.pos % g->alignment) % g->alignment;
    g->data_off = r.pos + pad; /* r.pos <= size, pad < 2^20: no overflow */
    return check_data(g, err);
}

int ds_gguf_open_mem(ds_gguf *g, const void *data, size_t size, const char *name, ds_err *err) {
    memset(g, 0, sizeof *g);
    g->map.fd = -1;
    g->base = data;
    g->size = size;
    g->path = strdup(name ? name : "<memory>");
    if (!g->path) return ds_err_set(err, DS_ENOMEM, "out of memory");
    int rc = parse(g, err);
    if (rc) ds_gguf_close(g);
    return rc;
}

int ds_gguf_open(ds_gguf *g, const char *path, ds_err *err) {
    ds_file_map map;
    int rc = ds_file_map_open(&map, path, err);
    if (rc) {
        memset(g, 0, sizeof *g);
        g->map.fd = -1;
        return rc;
    }
    rc = ds_gguf_open_mem(g, map.data, map.size, path, err);
    if (rc) {
        ds_file_map_close(&map);
        return rc;
    }
    g->map = map;
    return 0;
}

void ds_gguf_close(ds_gguf *g) {
    for (size_t i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str);
    }
    for (size_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->kv);
    free(g->tensors);
    free(g->by_name);
    free(g->path);
    if (g->map.data) ds_file_map_close(&g->map); /* set only by a successful ds_gguf_open */
    memset(g, 0, sizeof *g);
    g->map.fd = -1;
}

/* ---- typed metadata getters ---- */

static const ds_gguf_kv *need_kv(const ds_gguf *g, const char *key, ds_err *err, int *rc) {
    const ds_gguf_kv *kv = ds_gguf_find_kv(g, key);
    *rc = kv ? 0 : ds_err_set(err, DS_ENOTFOUND, "%s: metadata key '%s' not found", g->path, key);
    return kv;
}

static int wrong_type(const ds_gguf *g, const ds_gguf_kv *kv, const char *want, ds_err *err) {
    return ds_err_set(err, DS_EFORMAT, "%s: metadata '%s' has the wrong type (%u) or value, expected %s", g->path,
                      kv->key, (unsigned)kv->type, want);
}

/* An integer of any GGUF width/sign, as sign + magnitude so every range check is exact. */
typedef struct {
    bool neg;
    uint64_t mag;
} ival;

static ival from_i64(int64_t x) { return (ival){x < 0, x < 0 ? (uint64_t)0 - (uint64_t)x : (uint64_t)x}; }

static bool read_ival(const uint8_t *p, ds_gguf_vtype t, ival *v) {
    switch (t) {
    case DS_GGUF_U8: *v = (ival){false, p[0]}; return true;
    case DS_GGUF_I8: *v = from_i64((int8_t)p[0]); return true;
    case DS_GGUF_U16: { uint16_t x; memcpy(&x, p, 2); *v = (ival){false, x}; return true; }
    case DS_GGUF_I16: { int16_t x; memcpy(&x, p, 2); *v = from_i64(x); return true; }
    case DS_GGUF_U32: { uint32_t x; memcpy(&x, p, 4); *v = (ival){false, x}; return true; }
    case DS_GGUF_I32: { int32_t x; memcpy(&x, p, 4); *v = from_i64(x); return true; }
    case DS_GGUF_U64: { uint64_t x; memcpy(&x, p, 8); *v = (ival){false, x}; return true; }
    case DS_GGUF_I64: { int64_t x; memcpy(&x, p, 8); *v = from_i64(x); return true; }
    default: return false;
    }
}

static bool ival_i32(ival v, int32_t *out) {
    if (v.neg ? v.mag > 2147483648u : v.mag > INT32_MAX) return false;
    *out = v.neg ? (int32_t)(-(int64_t)v.mag) : (int32_t)v.mag;
    return true;
}

int ds_gguf_get_str(const ds_gguf *g, const char *key, const char **out, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_kv(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != DS_GGUF_STRING) return wrong_type(g, kv, "string", err);
    *out = kv->str;
    return 0;
}

int ds_gguf_get_u64(const ds_gguf *g, const char *key, uint64_t *out, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_kv(g, key, err, &rc);
    if (!kv) return rc;
    ival v;
    if (kv->type == DS_GGUF_ARRAY || !read_ival(g->base + kv->off, kv->type, &v) || v.neg)
        return wrong_type(g, kv, "a non-negative integer", err);
    *out = v.mag;
    return 0;
}

int ds_gguf_get_u32(const ds_gguf *g, const char *key, uint32_t *out, ds_err *err) {
    uint64_t v;
    int rc = ds_gguf_get_u64(g, key, &v, err);
    if (rc) return rc;
    if (v > UINT32_MAX) return wrong_type(g, ds_gguf_find_kv(g, key), "a 32-bit unsigned integer", err);
    *out = (uint32_t)v;
    return 0;
}

int ds_gguf_get_i32(const ds_gguf *g, const char *key, int32_t *out, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_kv(g, key, err, &rc);
    if (!kv) return rc;
    ival v;
    if (kv->type == DS_GGUF_ARRAY || !read_ival(g->base + kv->off, kv->type, &v) || !ival_i32(v, out))
        return wrong_type(g, kv, "a 32-bit signed integer", err);
    return 0;
}

int ds_gguf_get_f32(const ds_gguf *g, const char *key, float *out, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_kv(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->type == DS_GGUF_F32) {
        memcpy(out, g->base + kv->off, 4);
    } else if (kv->type == DS_GGUF_F64) {
        double d;
        memcpy(&d, g->base + kv->off, 8);
        *out = (float)d;
    } else {
        return wrong_type(g, kv, "a float", err);
    }
    return 0;
}

int ds_gguf_get_bool(const ds_gguf *g, const char *key, bool *out, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_kv(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != DS_GGUF_BOOL) return wrong_type(g, kv, "a bool", err);
    *out = g->base[kv->off] != 0;
    return 0;
}

static const ds_gguf_kv *need_array(const ds_gguf *g, const char *key, ds_err *err, int *rc) {
    const ds_gguf_kv *kv = need_kv(g, key, err, rc);
    if (kv && kv->type != DS_GGUF_ARRAY) {
        *rc = wrong_type(g, kv, "an array", err);
        return NULL;
    }
    return kv;
}

int ds_gguf_get_i32_array(const ds_gguf *g, const char *key, int32_t **out, size_t *n, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_array(g, key, err, &rc);
    if (!kv) return rc;
    /* arr_n * element size was checked against the file size at parse: the allocation is bounded. */
    int32_t *a = malloc(kv->arr_n ? (size_t)kv->arr_n * sizeof *a : 1);
    if (!a) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", g->path);
    size_t es = kv->arr_type < DS_GGUF_NTYPES ? VT_SIZE[kv->arr_type] : 0;
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        ival v;
        if (!read_ival(g->base + kv->off + i * es, kv->arr_type, &v) || !ival_i32(v, &a[i])) {
            free(a);
            return ds_err_set(err, DS_EFORMAT, "%s: metadata '%s' element %llu is not a 32-bit integer", g->path, key,
                              (unsigned long long)i);
        }
    }
    *out = a;
    *n = (size_t)kv->arr_n;
    return 0;
}

int ds_gguf_get_f32_array(const ds_gguf *g, const char *key, float **out, size_t *n, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_array(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->arr_type != DS_GGUF_F32 && kv->arr_type != DS_GGUF_F64) return wrong_type(g, kv, "a float array", err);
    float *a = malloc(kv->arr_n ? (size_t)kv->arr_n * sizeof *a : 1);
    if (!a) return ds_err_set(err, DS_ENOMEM, "%s: out of memory", g->path);
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        if (kv->arr_type == DS_GGUF_F32) {
            memcpy(&a[i], g->base + kv->off + i * 4, 4);
        } else {
            double d;
            memcpy(&d, g->base + kv->off + i * 8, 8);
            a[i] = (float)d;
        }
    }
    *out = a;
    *n = (size_t)kv->arr_n;
    return 0;
}

int ds_gguf_get_str_array(const ds_gguf *g, const char *key, char ***out, size_t *n, ds_err *err) {
    int rc;
    const ds_gguf_kv *kv = need_array(g, key, err, &rc);
    if (!kv) return rc;
    if (kv->arr_type != DS_GGUF_STRING) return wrong_type(g, kv, "a string array", err);
    /* The strings were bounds-checked at parse; total size <= n pointers + file size. */
    size_t total = (size_t)kv->arr_n * sizeof(char *), pos = kv->off;
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        uint64_t len;
        memcpy(&len, g->base + pos, 8);
        pos += 8 + (size_t)len;
        total += (size_t)len + 1;
    }
    char **tab = malloc(total ? total : 1);
    if (!tab) return ds_err_set(err, DS_ENOMEM, "%s: out of memory for '%s'", g->path, key);
    char *dst = (char *)(tab + kv->arr_n);
    pos = kv->off;
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        uint64_t len;
        memcpy(&len, g->base + pos, 8);
        memcpy(dst, g->base + pos + 8, (size_t)len);
        dst[len] = 0;
        tab[i] = dst;
        dst += len + 1;
        pos += 8 + (size_t)len;
    }
    *out = tab;
    *n = (size_t)kv->arr_n;
    return 0;
}

/* ---- dequantisation: src/quant/quant.c (ds/weight.h); ds_dtype ids are ggml's type ids ---- */

int ds_ggml_dequant_row(uint32_t type, const void *src, float *dst, size_t n) {
    if (!ds_ggml_can_dequant(type)) return DS_EUNSUPPORTED;
    return ds_dequant_row((ds_dtype)type, src, dst, (int64_t)n);
}

int ds_gguf_dequant_rows(const ds_gguf *g, const ds_gguf_tensor *t, uint64_t row0, uint64_t n_rows, float *out,
                         ds_err *err) {
    if (!ds_ggml_can_dequant(t->type))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: tensor '%s' has type %s, which deltaserve cannot dequantise "
                          "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                          g->path, t->name, ds_ggml_type_name(t->type));
    if (row0 > t->n_rows || n_rows > t->n_rows - row0)
        return ds_err_set(err, DS_ERANGE, "%s: tensor '%s': rows [%llu, +%llu) out of range", g->path, t->name,
                          (unsigned long long)row0, (unsigned long long)n_rows);
    /* Single-threaded on purpose: an OpenMP team created here (the loading thread) would stay
     * alive beside the engine thread's team, and libgomp then throttles spinning for every team
     * (more managed threads than CPUs), which halved decode speed. Loading stays well under 1 s. */
    for (int64_t r = 0; r < (int64_t)n_rows; r++)
        ds_ggml_dequant_row(t->type, t->data + (row0 + (uint64_t)r) * t->row_bytes, out + (uint64_t)r * t->ne[0],
                            (size_t)t->ne[0]);
    return 0;
}

int ds_gguf_dequant(const ds_gguf *g, const ds_gguf_tensor *t, float *out, size_t n_out, ds_err *err) {
    if (n_out != t->n_elems)
        return ds_err_set(err, DS_EINVAL, "%s: tensor '%s' has %llu elements, buffer holds %zu", g->path, t->name,
                          (unsigned long long)t->n_elems, n_out);
    return ds_gguf_dequant_rows(g, t, 0, t->n_rows, out, err);
}
