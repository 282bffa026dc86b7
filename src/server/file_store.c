/* The uploaded-file store (file_store.h). A flat array: at most DS_FILE_STORE_MAX files, so a linear
 * search is as fast as anything else and keeps upload order for listing. With a data directory each
 * file is one record, files/<id>: a JSON header line and the bytes, so that one crash-safe rename
 * (util/durable.h) makes a file appear whole or not at all. */
#include "util/json.h"
#include "server/file_store.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/durable.h"
#include "util/mem.h"
#include "util/rng.h"
#include "util/sb.h"

#define HEADER_MAX 4096 /* a record's header line */

struct ds_file_store {
    ds_file files[DS_FILE_STORE_MAX];
    int32_t n_files;
    uint64_t counter; /* splitmix64 state for the ids */
    int64_t next_seq;
    int32_t n_pending; /* prepared, not yet committed or discarded: their slots are reserved */
    char *dir;        /* data_dir, or NULL; never changes (ds_file_store_write reads it off-thread) */
};

/* ---- records ---------------------------------------------------------------------------------- */

static bool valid_id(const char *id) {
    if (strncmp(id, "file-", 5) || strlen(id) != 21) return false;
    for (const char *p = id + 5; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) return false;
    return true;
}

static bool str_field(const cJSON *h, const char *key, char *out, size_t cap) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, key);
    if (!cJSON_IsString(v) || strlen(v->valuestring) >= cap) return false;
    memcpy(out, v->valuestring, strlen(v->valuestring) + 1);
    return true;
}

static bool int_field(const cJSON *h, const char *key, double lo, double hi, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi) || v->valuedouble != floor(v->valuedouble))
        return false;
    *out = v->valuedouble;
    return true;
}

int ds_file_record_parse(const char *buf, size_t len, ds_file *meta, size_t *data_off, ds_err *err) {
    memset(meta, 0, sizeof *meta);
    const char *nl = memchr(buf, '\n', len < HEADER_MAX ? len : HEADER_MAX);
    if (!nl) return ds_err_set(err, DS_EFORMAT, "no header line");
    char why[96];
    cJSON *h = ds_json_parse_strict(buf, (size_t)(nl - buf), why, sizeof why); /* no NUL, nothing after it */
    double created = 0, bytes = 0, seq = 0;
    int st = 0;
    if (!cJSON_IsObject(h)) st = ds_err_set(err, DS_EFORMAT, "the header is not a JSON object");
    else if (!str_field(h, "id", meta->id, sizeof meta->id) || !valid_id(meta->id))
        st = ds_err_set(err, DS_EFORMAT, "bad 'id'");
    else if (!str_field(h, "filename", meta->filename, sizeof meta->filename) ||
             !str_field(h, "purpose", meta->purpose, sizeof meta->purpose))
        st = ds_err_set(err, DS_EFORMAT, "bad 'filename' or 'purpose'");
    else if (!int_field(h, "created_at", 0, 1e15, &created) || !int_field(h, "seq", 0, 1e15, &seq) ||
             !int_field(h, "bytes", 0, DS_FILE_STORE_MAX_BYTES, &bytes))
        st = ds_err_set(err, DS_EFORMAT, "bad 'created_at', 'seq' or 'bytes'");
    else if ((size_t)bytes != len - (size_t)(nl + 1 - buf))
        st = ds_err_set(err, DS_EFORMAT, "%zu bytes of data where the header says %.0f", len - (size_t)(nl + 1 - buf),
                        bytes);
    cJSON_Delete(h);
    if (st) return st;
    meta->created_at = (int64_t)created;
    meta->seq = (int64_t)seq;
    meta->bytes = (size_t)bytes;
    *data_off = (size_t)(nl + 1 - buf);
    return 0;
}

static int write_record(const ds_file_store *fs, const ds_file *f, ds_err *err) {
    int st = ds_durable_mkdir(fs->dir, "files", err);
    if (st) return st;
    ds_sb h;
    ds_sb_init(&h);
    ds_sb_puts(&h, "{\"id\":");
    ds_sb_json_str(&h, f->id, strlen(f->id));
    ds_sb_puts(&h, ",\"filename\":");
    ds_sb_json_str(&h, f->filename, strlen(f->filename));
    ds_sb_puts(&h, ",\"purpose\":");
    ds_sb_json_str(&h, f->purpose, strlen(f->purpose));
    ds_sb_printf(&h, ",\"created_at\":%lld,\"seq\":%lld,\"bytes\":%zu}\n", (long long)f->created_at,
                 (long long)f->seq, f->bytes);
    if (!ds_sb_ok(&h) || h.len > HEADER_MAX) {
        ds_sb_free(&h);
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    }
    char name[64];
    snprintf(name, sizeof name, "files/%s", f->id);
    const ds_iovec parts[2] = {{h.data, h.len}, {f->data, f->bytes}};
    st = ds_durable_write(fs->dir, name, parts, 2, err);
    ds_sb_free(&h);
    return st;
}

static int by_seq(const void *a, const void *b) {
    const ds_file *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* One record into the next slot; false (logged) when it is unreadable or a duplicate. */
static bool load_record(ds_file_store *fs, const char *path, const char *name) {
    char *buf = NULL;
    size_t len = 0, off = 0;
    ds_err err = {{0}};
    ds_file *f = &fs->files[fs->n_files];
    int st = ds_file_read_all(path, DS_FILE_STORE_MAX_BYTES + HEADER_MAX, &buf, &len, &err);
    if (!st) st = ds_file_record_parse(buf, len, f, &off, &err);
    if (!st && strcmp(f->id, name)) st = ds_err_set(&err, DS_EFORMAT, "the record's id is not its name");
    if (!st && ds_file_store_find(fs, f->id)) st = ds_err_set(&err, DS_EFORMAT, "duplicate id");
    if (st) {
        ds_scrub_path(err.msg, fs->dir);
        DS_LOGW("files: skipping the stored file %s: %s", name, err.msg);
        free(buf);
        return false;
    }
    memmove(buf, buf + off, f->bytes); /* the data, NUL-terminated, owned by the store */
    buf[f->bytes] = '\0';
    f->data = buf;
    fs->n_files++;
    if (f->seq >= fs->next_seq) fs->next_seq = f->seq + 1;
    return true;
}

static void load_all(ds_file_store *fs) {
    ds_err err = {{0}};
    if (ds_durable_mkdir(fs->dir, "files", &err)) {
        DS_LOGW("files: %s; uploads will fail until it can be created", err.msg);
        return;
    }
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/files", fs->dir);
    int swept = ds_durable_sweep(dir);
    if (swept) DS_LOGI("files: removed %d temporary file(s) of an interrupted upload", swept);
    DIR *d = opendir(dir);
    if (!d) return;
    for (struct dirent *de; (de = readdir(d));) {
        if (de->d_name[0] == '.') continue;
        if (fs->n_files >= DS_FILE_STORE_MAX) {
            DS_LOGW("files: more than %d stored files; the rest are not loaded", DS_FILE_STORE_MAX);
            break;
        }
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        load_record(fs, path, de->d_name);
    }
    closedir(d);
    qsort(fs->files, (size_t)fs->n_files, sizeof fs->files[0], by_seq);
    if (fs->n_files) DS_LOGI("files: %d stored file(s) loaded", (int)fs->n_files);
}

/* ---- the store -------------------------------------------------------------------------------- */

ds_file_store *ds_file_store_create(const char *data_dir) {
    ds_file_store *fs = calloc(1, sizeof *fs);
    if (!fs) return NULL;
    fs->counter = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)fs;
    if (data_dir && data_dir[0]) {
        if (!(fs->dir = ds_strdup(data_dir))) return free(fs), NULL;
        load_all(fs);
    }
    return fs;
}

void ds_file_store_free(ds_file_store *fs) {
    if (!fs) return;
    for (int32_t i = 0; i < fs->n_files; i++) free(fs->files[i].data);
    free(fs->dir);
    free(fs);
}

int ds_file_store_prepare(ds_file_store *fs, const char *filename, const char *purpose, const char *data, size_t len,
                          ds_file **out, ds_err *err) {
    if (fs->n_files + fs->n_pending >= DS_FILE_STORE_MAX) return ds_err_set(err, DS_EBUSY, "too many files");
    if (len > DS_FILE_STORE_MAX_BYTES) return ds_err_set(err, DS_ERANGE, "file too large");
    ds_file *f = calloc(1, sizeof *f);
    if (!f || !(f->data = malloc(len + 1))) return free(f), ds_err_set(err, DS_ENOMEM, "out of memory");
    memcpy(f->data, data, len);
    f->data[len] = '\0';
    f->bytes = len;
    do snprintf(f->id, sizeof f->id, "file-%016llx", (unsigned long long)ds_splitmix64(&fs->counter));
    while (ds_file_store_find(fs, f->id));
    snprintf(f->filename, sizeof f->filename, "%s", filename);
    /* The record stores names as JSON (ds_sb_json_str): invalid UTF-8 would come back changed and
     * perhaps too long. A character cut by the truncation above is dropped; a name still invalid
     * keeps only its ASCII. */
    size_t fl = strlen(f->filename), cut = fl;
    while (cut + 3 > fl && cut > 0 && !ds_utf8_valid(f->filename, cut)) cut--;
    if (ds_utf8_valid(f->filename, cut)) f->filename[cut] = '\0';
    else
        for (char *p = f->filename; *p; p++)
            if ((unsigned char)*p >= 0x80) *p = '?';
    snprintf(f->purpose, sizeof f->purpose, "%s", purpose);
    f->created_at = (int64_t)time(NULL);
    f->seq = fs->next_seq++;
    fs->n_pending++;
    *out = f;
    return 0;
}

int ds_file_store_write(const ds_file_store *fs, const ds_file *f, ds_err *err) {
    return fs->dir ? write_record(fs, f, err) : 0;
}

const ds_file *ds_file_store_commit(ds_file_store *fs, ds_file *f) {
    fs->n_pending--;
    fs->files[fs->n_files] = *f; /* room was reserved by prepare */
    free(f);
    return &fs->files[fs->n_files++];
}

void ds_file_store_discard(ds_file_store *fs, ds_file *f) {
    fs->n_pending--;
    free(f->data);
    free(f);
}

int ds_file_store_add(ds_file_store *fs, const char *filename, const char *purpose, const char *data, size_t len,
                      const ds_file **out, ds_err *err) {
    ds_file *f = NULL;
    int st = ds_file_store_prepare(fs, filename, purpose, data, len, &f, err);
    if (!st && (st = ds_file_store_write(fs, f, err))) ds_file_store_discard(fs, f);
    if (!st) *out = ds_file_store_commit(fs, f);
    return st;
}

const ds_file *ds_file_store_find(const ds_file_store *fs, const char *id) {
    for (int32_t i = 0; i < fs->n_files; i++)
        if (!strcmp(fs->files[i].id, id)) return &fs->files[i];
    return NULL;
}

int32_t ds_file_store_count(const ds_file_store *fs) { return fs->n_files; }
const ds_file *ds_file_store_at(const ds_file_store *fs, int32_t i) { return &fs->files[i]; }

int ds_file_store_delete(ds_file_store *fs, const char *id, ds_err *err) {
    const ds_file *f = ds_file_store_find(fs, id);
    if (!f) return ds_err_set(err, DS_ENOTFOUND, "No such File object: %s", id);
    if (fs->dir) {
        char path[4200];
        snprintf(path, sizeof path, "%s/files/%s", fs->dir, id);
        if (remove(path) != 0 && errno != ENOENT)
            return ds_err_set(err, DS_EIO, "cannot remove the stored file: %s", strerror(errno));
    }
    int32_t i = (int32_t)(f - fs->files);
    free(fs->files[i].data);
    memmove(&fs->files[i], &fs->files[i + 1], (size_t)(fs->n_files - i - 1) * sizeof fs->files[0]);
    fs->n_files--;
    return 0;
}
