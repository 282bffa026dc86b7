/* deltaserve — the uploaded files behind /v1/files: a bounded store of JSONL training data,
 * referenced by fine-tuning jobs as training_file / validation_file. With a data directory every
 * file is also a record `files/<id>` under it (a JSON header line, then the bytes; written
 * crash-safely, util/durable.h), loaded again at start; without one the store is memory only.
 *
 * Threading: loop thread only (the handlers), except ds_file_store_write; jobs copy what they need
 * when they are created, so a file may be deleted while a job that used it runs. */
#ifndef DS_SERVER_FILE_STORE_H
#define DS_SERVER_FILE_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "ds/common.h"

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
    int64_t seq;        /* upload order, kept across restarts */
} ds_file;

typedef struct ds_file_store ds_file_store;

/* A store persisted under data_dir/files/ (NULL: memory only). What is there is loaded: leftover
 * temporaries are removed, and a record that cannot be read is skipped with a log line (never a
 * failure: the server keeps serving). A directory that cannot be created is logged and retried at
 * each upload. Returns NULL only when out of memory. data_dir is copied. */
ds_file_store *ds_file_store_create(const char *data_dir);
void ds_file_store_free(ds_file_store *fs);

/* Stores a copy of data[0..len) under a fresh id; the strings are truncated to their fields.
 * Returns 0, DS_EBUSY when the store is full, DS_ERANGE when len > DS_FILE_STORE_MAX_BYTES,
 * DS_ENOMEM, or DS_EIO when the record cannot be written (err: why, e.g. "No space left on
 * device", naming no server path; nothing is stored). *out (valid until the next add or delete)
 * is the stored file. */
int ds_file_store_add(ds_file_store *fs, const char *filename, const char *purpose, const char *data, size_t len,
                      const ds_file **out, ds_err *err);

/* The same in steps, so that the disk write can run on a worker thread (handlers_files.c):
 * ds_file_store_prepare (loop thread) reserves a slot and gives a copy of the data its id and
 * order (DS_EBUSY / DS_ERANGE / DS_ENOMEM as above; *out is owned by the store's caller until
 * committed or discarded); ds_file_store_write (ANY thread; reads only the data directory, which
 * never changes) writes its record, 0 or DS_EIO; ds_file_store_commit (loop thread) lists it and
 * returns the stored file (valid until the next add or delete); ds_file_store_discard frees it. */
int ds_file_store_prepare(ds_file_store *fs, const char *filename, const char *purpose, const char *data, size_t len,
                          ds_file **out, ds_err *err);
int ds_file_store_write(const ds_file_store *fs, const ds_file *f, ds_err *err);
const ds_file *ds_file_store_commit(ds_file_store *fs, ds_file *f);
void ds_file_store_discard(ds_file_store *fs, ds_file *f);

/* The file with this id, or NULL; valid until the next add or delete. */
const ds_file *ds_file_store_find(const ds_file_store *fs, const char *id);

/* Files in upload order: i in [0, ds_file_store_count). */
int32_t ds_file_store_count(const ds_file_store *fs);
const ds_file *ds_file_store_at(const ds_file_store *fs, int32_t i);

/* Returns 0, DS_ENOTFOUND, or DS_EIO when the record cannot be removed (the file stays). */
int ds_file_store_delete(ds_file_store *fs, const char *id, ds_err *err);

/* Parses a stored record (a JSON header line {"id","filename","purpose","created_at","bytes",
 * "seq"} then exactly `bytes` bytes): fills *meta (data NULL) and *data_off. Returns 0 or
 * DS_EFORMAT with a message. Pure; fuzzed (tests/fuzz/fuzz_records.c). */
int ds_file_record_parse(const char *buf, size_t len, ds_file *meta, size_t *data_off, ds_err *err);

#ifdef __cplusplus
}
#endif
#endif
