/* deltaserve — safetensors reader (internal API), used by the HF model loader and the PEFT adapter
 * loader.
 *
 * Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
 * [begin, end]}, "__metadata__": {...}}, then the data section; offsets are relative to the data
 * section. Every file is validated at open: header length vs file size, JSON shape, integral
 * non-negative shape/offsets, offsets inside the data section, tensors not overlapping, byte size ==
 * product(shape) * dtype size with overflow checks, duplicate names. Any violation gives DS_EFORMAT
 * with a message naming the file (and tensor).
 *
 * Threading: open/close are not concurrent with other calls on the same object; const functions may be
 * called from any thread once open has returned. */
#ifndef DS_FORMAT_SAFETENSORS_H
#define DS_FORMAT_SAFETENSORS_H

#include "ds/common.h"

typedef enum {
    DS_ST_F32 = 0,
    DS_ST_F16,
    DS_ST_BF16,
    DS_ST_UNSUPPORTED, /* any other dtype (I64, F64, F8_*, ...): listed, but ds_st_read_f32 refuses it */
} ds_st_dtype;

#define DS_ST_MAX_DIMS 4

typedef struct ds_st_tensor {
    char *name;              /* owned by the file, NUL-terminated */
    ds_st_dtype dtype;
    char dtype_name[16];     /* as written in the header ("BF16", "I64", ...), truncated if longer */
    int n_dims;              /* true rank; > DS_ST_MAX_DIMS makes the tensor unreadable */
    int64_t shape[DS_ST_MAX_DIMS]; /* torch order, first n_dims (up to 4) valid */
    uint64_t n_elems;        /* product of all dims (1 for a scalar) */
    size_t offset;           /* from the start of the data section */
    size_t nbytes;           /* end - begin */
    const uint8_t *data;     /* into the mapping; valid until ds_st_close */
} ds_st_tensor;

typedef struct ds_st_file {
    ds_file_map map;
    char *path;              /* owned; used in messages */
    ds_st_tensor *tensors;   /* sorted by name */
    size_t n_tensors;
} ds_st_file;

/* Maps and validates one .safetensors file. Returns 0, or DS_EIO / DS_EFORMAT / DS_ENOMEM with a
 * message naming the file; on failure *f is zeroed and needs no ds_st_close. */
int ds_st_open(ds_st_file *f, const char *path, ds_err *err);
/* Same over caller memory (tests, fuzzing): `data` is borrowed and must outlive *f. */
int ds_st_open_mem(ds_st_file *f, const void *data, size_t size, const char *name, ds_err *err);
/* Frees everything; safe on a zeroed or closed ds_st_file. */
void ds_st_close(ds_st_file *f);
/* Tensor by exact name (binary search), or NULL. Valid until ds_st_close. */
const ds_st_tensor *ds_st_find(const ds_st_file *f, const char *name);

/* Checks that t has exactly nd dims equal to shape[] (nd <= 4). Returns 0 or DS_EFORMAT with a message
 * naming path, the tensor and both shapes. Lets callers validate before allocating. Any thread. */
int ds_st_check_shape(const ds_st_tensor *t, const char *path, const int64_t *shape, int nd, ds_err *err);

/* Reads tensor t into out (n_out floats) converting F16/BF16 to fp32. When expect_shape is not NULL
 * the tensor must have exactly expect_ndims dims equal to expect_shape[]; n_out must equal n_elems.
 * `path` names the file in messages (may be NULL). Returns 0, DS_EFORMAT (shape mismatch),
 * DS_EUNSUPPORTED (dtype or rank) or DS_EINVAL (n_out). Any thread. */
int ds_st_read_f32(const ds_st_tensor *t, const char *path, const int64_t *expect_shape, int expect_ndims, float *out,
                   size_t n_out, ds_err *err);

/* A model directory: model.safetensors, or model.safetensors.index.json ("weight_map": name → shard
 * file in the same directory) with its shards. Every weight_map entry must exist in its shard; a
 * tensor name present in two shards is an error. */
typedef struct ds_st_entry {
    const ds_st_tensor *t;   /* into files[file] */
    uint32_t file;
} ds_st_entry;

typedef struct ds_st_set {
    ds_st_file *files;
    size_t n_files;
    ds_st_entry *entries;    /* every tensor of every file, sorted by name */
    size_t n_entries;
} ds_st_set;

/* Opens the safetensors of directory `dir`. Returns 0, DS_ENOTFOUND (neither file present), or
 * DS_EIO / DS_EFORMAT / DS_EPERM (shard name with a path separator) / DS_ENOMEM with a message; on
 * failure *s is zeroed. */
int ds_st_set_open_dir(ds_st_set *s, const char *dir, ds_err *err);
void ds_st_set_close(ds_st_set *s);
/* Tensor by name across all files, or NULL; *file (if not NULL) gets the file it lives in. */
const ds_st_tensor *ds_st_set_find(const ds_st_set *s, const char *name, const ds_st_file **file);

#endif
