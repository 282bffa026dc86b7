/* deltaserve — crash-safe files for what the server keeps across restarts (uploaded files,
 * fine-tuning job records and training state): a file is written to a temporary name in its
 * directory, flushed to disk, renamed over the final name and the directory flushed, so that after
 * a crash either the old or the new content is there, never a torn mix.
 *
 * Messages name files relative to the directory given (never the directory itself): they reach
 * API clients, which must not learn the server's paths. Any thread; calls on different names may
 * run at once, two writers of one name must be serialised by the caller. */
#ifndef DS_UTIL_DURABLE_H
#define DS_UTIL_DURABLE_H

#include <stddef.h>

#include "ds/common.h"

typedef struct ds_iovec {
    const void *data;
    size_t len;
} ds_iovec;

/* Writes the concatenation of parts[0..n) as dir/name (name may contain '/': a path below dir
 * whose directories exist) through dir/<name's dir>/.<base>.tmp, fsync and rename. Returns 0 or
 * DS_EIO with "<name>: <strerror>" (e.g. "No space left on device"); the temporary is removed. */
int ds_durable_write(const char *dir, const char *name, const ds_iovec *parts, int n, ds_err *err);

/* mkdir -p of dir/sub (sub may be NULL or ""). Returns 0 or DS_EIO; the message names `sub` (or
 * "the data directory" for dir itself), never dir. */
int ds_durable_mkdir(const char *dir, const char *sub, ds_err *err);

/* Removes the temporaries ".*.tmp" an interrupted write left in dir (not recursive). Returns how
 * many were removed. */
int ds_durable_sweep(const char *dir);

/* Removes dir/sub and the files directly in it (one level: what a job directory holds). */
void ds_durable_remove_dir(const char *dir, const char *sub);

/* Replaces every "root/" (and a bare "root") in msg with "" so that a message names paths
 * relative to root. */
void ds_scrub_path(char *msg, const char *root);

#endif
