/* deltaserve — GGUF reader (v2/v3) and ggml block dequantisation (internal API).
 *
 * Used by the base-model loader (model_gguf.c) and the GGUF-LoRA adapter loader. The reader maps the
 * file read-only and parses the header, metadata and tensor infos with bounds checks on every read:
 * no count or length taken from the file is used before it has been checked against the bytes that
 * remain, so a corrupt file yields DS_EFORMAT with a message naming the file, never an out-of-bounds
 * read or an allocation larger than the file itself.
 *
 * Layout reminder: a tensor's ne[0] is the contiguous dimension (the input dim of a
 * weight), i.e. the REVERSE of the torch shape; a 2-D tensor ne=[in,out] is torch [out][in] row-major,
 * same memory order. Quantised blocks run along ne[0].
 *
 * Threading: ds_gguf_open/close are not concurrent with other calls on the same ds_gguf; every const
 * function may be called from any thread once open has returned. The host must be little-endian. */
#ifndef DS_FORMAT_GGUF_H
#define DS_FORMAT_GGUF_H

#include "ds/common.h"

/* Metadata value types (GGUF numbering). */
typedef enum {
    DS_GGUF_U8 = 0,
    DS_GGUF_I8 = 1,
    DS_GGUF_U16 = 2,
    DS_GGUF_I16 = 3,
    DS_GGUF_U32 = 4,
    DS_GGUF_I32 = 5,
    DS_GGUF_F32 = 6,
    DS_GGUF_BOOL = 7,
    DS_GGUF_STRING = 8,
    DS_GGUF_ARRAY = 9,
    DS_GGUF_U64 = 10,
    DS_GGUF_I64 = 11,
    DS_GGUF_F64 = 12,
    DS_GGUF_NTYPES
} ds_gguf_vtype;

/* ggml tensor types this code names explicitly (GGUF numbering). Other ggml types are still sized
 * correctly for bounds checks; only the ones below can be dequantised. */
enum {
    DS_GGML_F32 = 0,
    DS_GGML_F16 = 1,
    DS_GGML_Q4_0 = 2,
    DS_GGML_Q4_1 = 3,
    DS_GGML_Q8_0 = 8,
    DS_GGML_Q4_K = 12,
    DS_GGML_Q5_K = 13,
    DS_GGML_Q6_K = 14,
    DS_GGML_BF16 = 30,
};

typedef struct ds_gguf_kv {
    char *key;              /* owned, NUL-terminated */
    ds_gguf_vtype type;
    ds_gguf_vtype arr_type; /* element type when type == DS_GGUF_ARRAY */
    uint64_t arr_n;         /* element count when type == DS_GGUF_ARRAY */
    size_t off;             /* file offset of the scalar value, or of the first array element */
    char *str;              /* owned NUL-terminated copy when type == DS_GGUF_STRING, else NULL */
} ds_gguf_kv;

typedef struct ds_gguf_tensor {
    char *name;             /* owned, NUL-terminated */
    uint32_t n_dims;        /* 1..4 */
    uint64_t ne[4];         /* GGUF order (ne[0] contiguous); dims past n_dims are 1 */
    uint32_t type;          /* ggml type id, always one with a known block size */
    uint64_t offset;        /* from the start of the data section; multiple of the alignment */
    uint64_t n_elems;       /* ne[0]*ne[1]*ne[2]*ne[3] */
    uint64_t n_rows;        /* n_elems / ne[0] */
    size_t row_bytes;       /* bytes of one ne[0] row */
    size_t nbytes;          /* row_bytes * n_rows */
    const uint8_t *data;    /* into the mapping, checked in bounds; valid until ds_gguf_close */
} ds_gguf_tensor;

typedef struct ds_gguf {
    ds_file_map map;        /* the mapping (unused by ds_gguf_open_mem) */
    const uint8_t *base;    /* the bytes parsed */
    size_t size;
    char *path;             /* owned; the name used in messages */
    uint32_t version;
    ds_gguf_kv *kv;
    size_t n_kv;
    ds_gguf_tensor *tensors; /* in file order */
    size_t n_tensors;
    uint32_t *by_name;       /* tensor indices sorted by name (for ds_gguf_find_tensor) */
    size_t alignment;        /* general.alignment, default 32 */
    size_t data_off;         /* file offset of the data section */
} ds_gguf;

/* Maps and parses `path`. Returns 0, or DS_EIO/DS_EFORMAT/DS_EUNSUPPORTED/DS_ENOMEM with a message
 * naming the file and what is wrong; on failure *g needs no ds_gguf_close (it is zeroed). */
int ds_gguf_open(ds_gguf *g, const char *path, ds_err *err);
/* Same over caller memory (tests, fuzzing): `data` is borrowed and must outlive *g; `name` is used in
 * messages. */
int ds_gguf_open_mem(ds_gguf *g, const void *data, size_t size, const char *name, ds_err *err);
/* Frees everything open allocated; safe on a zeroed or already-closed ds_gguf. */
void ds_gguf_close(ds_gguf *g);

/* Metadata lookup: the entry for `key`, or NULL. Valid until ds_gguf_close. */
const ds_gguf_kv *ds_gguf_find_kv(const ds_gguf *g, const char *key);
/* Typed getters. Integers of any width/sign convert when the value fits; f32 accepts F32/F64.
 * Return 0; DS_ENOTFOUND when the key is absent (err still names the key); DS_EFORMAT when the type
 * is wrong or the value does not fit. Outputs are untouched on failure. */
int ds_gguf_get_str(const ds_gguf *g, const char *key, const char **out, ds_err *err); /* valid until close */
int ds_gguf_get_u32(const ds_gguf *g, const char *key, uint32_t *out, ds_err *err);
int ds_gguf_get_i32(const ds_gguf *g, const char *key, int32_t *out, ds_err *err);
int ds_gguf_get_u64(const ds_gguf *g, const char *key, uint64_t *out, ds_err *err);
int ds_gguf_get_f32(const ds_gguf *g, const char *key, float *out, ds_err *err);
int ds_gguf_get_bool(const ds_gguf *g, const char *key, bool *out, ds_err *err);
/* Arrays: *out is malloc'd (caller frees); *n the element count. i32 accepts any integer element type
 * whose values fit; f32 accepts F32/F64 elements. */
int ds_gguf_get_i32_array(const ds_gguf *g, const char *key, int32_t **out, size_t *n, ds_err *err);
int ds_gguf_get_f32_array(const ds_gguf *g, const char *key, float **out, size_t *n, ds_err *err);
/* String array: *out is ONE malloc'd block holding the pointer table and the NUL-terminated strings;
 * free(*out) releases all of it. */
int ds_gguf_get_str_array(const ds_gguf *g, const char *key, char ***out, size_t *n, ds_err *err);

/* Tensor lookup by exact name (binary search), or NULL. Valid until ds_gguf_close. */
const ds_gguf_tensor *ds_gguf_find_tensor(const ds_gguf *g, const char *name);

/* ggml type facts. ds_ggml_type_name returns a static string ("Q4_K", or "type#77" style for
 * unknown ids, in a thread-local buffer). ds_ggml_type_size gives the block size in elements and in
 * bytes; false for unknown ids. ds_ggml_can_dequant: whether the type is one deltaserve dequantises
 * (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K: ds/weight.h). */
const char *ds_ggml_type_name(uint32_t type);
bool ds_ggml_type_size(uint32_t type, size_t *blck, size_t *type_size);
bool ds_ggml_can_dequant(uint32_t type);

/* Dequantises n elements (a multiple of the type's block size) from packed blocks `src` to fp32 `dst`,
 * bit-for-bit as ggml-quants.c dequantize_row_* does. Returns 0, DS_EINVAL for a bad n, or
 * DS_EUNSUPPORTED for a type that cannot be dequantised. Pure function; any thread. */
int ds_ggml_dequant_row(uint32_t type, const void *src, float *dst, size_t n);

/* Dequantises rows [row0, row0+n_rows) of tensor t (each ne[0] floats) into out
 * (n_rows*ne[0] floats). Returns 0, DS_ERANGE for rows out of range, or DS_EUNSUPPORTED with a
 * message naming the tensor and its type. Any thread. */
int ds_gguf_dequant_rows(const ds_gguf *g, const ds_gguf_tensor *t, uint64_t row0, uint64_t n_rows, float *out,
                         ds_err *err);
/* Whole tensor; n_out must equal t->n_elems (DS_EINVAL otherwise). */
int ds_gguf_dequant(const ds_gguf *g, const ds_gguf_tensor *t, float *out, size_t n_out, ds_err *err);

#endif
