/* deltaserve — the uploaded files behind /v1/files: a bounded in-memory store of JSONL training
 * data, referenced by fine-tuning jobs as training_file / validation_file.
 *
 * Threading: loop thread only (the handlers); jobs copy what they need when they are created, so a
 * file may be deleted while a job that used it runs. */
#ifndef DS_SERVER_FILE_STORE_H
#define DS_SERVER_FILE_STORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DS_FILE_STORE_MAX 64               /* files held at once */
#define DS_FILE_STORE_MAX_BYTES (16u << 20) /* per file */

typedef struct ds_file {
    char id[40]; /* "file-<16 hex>" */
    char filename[256];
    char purpose[32];
    int64_t created_at; /* unix seconds */
    char *data;         /* NUL-terminated (not counted in bytes); owned by the store */
    size_t bytes;
} ds_file;

typedef struct ds_file_store ds_file_store;

/* Returns an empty store, or NULL when out of memory. */
ds_file_store *ds_file_store_create(void);
void ds_file_store_free(ds_file_store *fs);

/* Stores a copy of data[0..len) under a fresh id; the strings are truncated to their fields.
 * Returns 0, DS_EBUSY when the store is full, DS_ERANGE when len > DS_FILE_STORE_MAX_BYTES, or
 * DS_ENOMEM. *out (valid until the next add or delete) is the stored file. */
int ds_file_store_add(ds_file_store *fs, const char *filename, const char *purpose, const char *data, size_t len,
                      const ds_file **out);

/* The file with this id, or NULL; valid until the next add or delete. */
const ds_file *ds_file_store_find(const ds_file_store *fs, const char *id);

/* Files in upload order: i in [0, ds_file_store_count). */
int32_t ds_file_store_count(const ds_file_store *fs);
const ds_file *ds_file_store_at(const ds_file_store *fs, int32_t i);

/* Returns 0 or DS_ENOTFOUND. */
int ds_file_store_delete(ds_file_store *fs, const char *id);

#ifdef __cplusplus
}
#endif
#endif
