/* The uploaded-file store (file_store.h). A flat array: at most DS_FILE_STORE_MAX files, so a linear
 * search is as fast as anything else and keeps upload order for listing. */
#include "server/file_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds/common.h"
#include "util/rng.h"

struct ds_file_store {
    ds_file files[DS_FILE_STORE_MAX];
    int32_t n_files;
    uint64_t counter; /* splitmix64 state for the ids */
};

ds_file_store *ds_file_store_create(void) {
    ds_file_store *fs = calloc(1, sizeof *fs);
    if (fs) fs->counter = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)fs;
    return fs;
}

void ds_file_store_free(ds_file_store *fs) {
    if (!fs) return;
    for (int32_t i = 0; i < fs->n_files; i++) free(fs->files[i].data);
    free(fs);
}

int ds_file_store_add(ds_file_store *fs, const char *filename, const char *purpose, const char *data, size_t len,
                      const ds_file **out) {
    if (fs->n_files >= DS_FILE_STORE_MAX) return DS_EBUSY;
    if (len > DS_FILE_STORE_MAX_BYTES) return DS_ERANGE;
    ds_file *f = &fs->files[fs->n_files];
    memset(f, 0, sizeof *f);
    if (!(f->data = malloc(len + 1))) return DS_ENOMEM;
    memcpy(f->data, data, len);
    f->data[len] = '\0';
    f->bytes = len;
    snprintf(f->id, sizeof f->id, "file-%016llx", (unsigned long long)ds_splitmix64(&fs->counter));
    snprintf(f->filename, sizeof f->filename, "%s", filename);
    snprintf(f->purpose, sizeof f->purpose, "%s", purpose);
    f->created_at = (int64_t)time(NULL);
    fs->n_files++;
    *out = f;
    return 0;
}

const ds_file *ds_file_store_find(const ds_file_store *fs, const char *id) {
    for (int32_t i = 0; i < fs->n_files; i++)
        if (!strcmp(fs->files[i].id, id)) return &fs->files[i];
    return NULL;
}

int32_t ds_file_store_count(const ds_file_store *fs) { return fs->n_files; }
const ds_file *ds_file_store_at(const ds_file_store *fs, int32_t i) { return &fs->files[i]; }

int ds_file_store_delete(ds_file_store *fs, const char *id) {
    const ds_file *f = ds_file_store_find(fs, id);
    if (!f) return DS_ENOTFOUND;
    int32_t i = (int32_t)(f - fs->files);
    free(fs->files[i].data);
    memmove(&fs->files[i], &fs->files[i + 1], (size_t)(fs->n_files - i - 1) * sizeof fs->files[0]);
    fs->n_files--;
    return 0;
}
