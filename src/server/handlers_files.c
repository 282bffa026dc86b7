/* The OpenAI files endpoints (README.md, "Fine-tuning"): POST /v1/files (multipart/form-data: file,
 * purpose=fine-tune; or JSON {"filename","content"}), GET /v1/files, GET|DELETE /v1/files/{id}.
 * Files are kept by the server's file store (file_store.h; persisted under the data directory) and
 * validated line by line at upload
 * (400 naming the lines), so that a job never starts on data it cannot read.
 *
 * Threading: loop thread only; JSONL validation runs here, bounded by DS_FILE_STORE_MAX_BYTES; the
 * record's write to the data directory (fsync included) runs on a libuv worker. */
#include <cjson/cJSON.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ds/train.h"
#include "server/file_store.h"
#include "server/handlers.h"
#include "server/multipart.h"

#define EP_FILES "/v1/files"
#define EP_FILE "/v1/files/{id}"

static void file_json(ds_sb *b, const ds_file *f) {
    ds_sb_puts(b, "{\"id\":");
    ds_sb_json_str(b, f->id, strlen(f->id));
    ds_sb_printf(b, ",\"object\":\"file\",\"bytes\":%zu,\"created_at\":%lld,\"filename\":", f->bytes,
                 (long long)f->created_at);
    ds_sb_json_str(b, f->filename, strlen(f->filename));
    ds_sb_puts(b, ",\"purpose\":");
    ds_sb_json_str(b, f->purpose, strlen(f->purpose));
    ds_sb_puts(b, ",\"status\":\"processed\",\"status_details\":null}");
}

/* What an upload carries, from either body shape; `data` points into the request (or into `json`). */
typedef struct upload {
    char filename[256], purpose[32];
    const char *data;
    size_t len;
    cJSON *json; /* owned when the body was JSON */
} upload;

/* Parses a multipart/form-data (file, purpose) or JSON {"filename","content","purpose"?} body.
 * Returns false after answering 400. */
static bool parse_upload(ds_http_req *req, upload *u) {
    memset(u, 0, sizeof *u);
    const char *ct = ds_http_req_header(req, "content-type");
    char boundary[96];
    if (ct && ds_multipart_boundary(ct, boundary, sizeof boundary)) {
        ds_multipart_part parts[DS_MULTIPART_MAX_PARTS];
        char why[160];
        int n = ds_multipart_parse(req->body, req->body_len, boundary, parts, DS_MULTIPART_MAX_PARTS, why, sizeof why);
        if (n < 0) return ds_server_reply_errorf(req, EP_FILES, 400, NULL, NULL, "%s", why), false;
        const ds_multipart_part *f = ds_multipart_find(parts, n, "file");
        const ds_multipart_part *p = ds_multipart_find(parts, n, "purpose");
        if (!f) return ds_server_reply_errorf(req, EP_FILES, 400, "file", NULL, "'file' is required"), false;
        if (p) snprintf(u->purpose, sizeof u->purpose, "%.*s", (int)(p->len < 31 ? p->len : 31), p->data);
        snprintf(u->filename, sizeof u->filename, "%s", f->has_filename && f->filename[0] ? f->filename : "upload.jsonl");
        u->data = f->data, u->len = f->len;
        return true;
    }
    if (ct && !strncasecmp(ct, "application/json", 16)) {
        cJSON *json = ds_server_json_object(req, EP_FILES);
        if (!json) return false;
        const cJSON *c = json ? cJSON_GetObjectItemCaseSensitive(json, "content") : NULL;
        const cJSON *fn = json ? cJSON_GetObjectItemCaseSensitive(json, "filename") : NULL;
        const cJSON *p = json ? cJSON_GetObjectItemCaseSensitive(json, "purpose") : NULL;
        if (!cJSON_IsObject(json) || !cJSON_IsString(c)) {
            cJSON_Delete(json);
            ds_server_reply_errorf(req, EP_FILES, 400, "content", NULL,
                                   "send multipart/form-data with 'file' and 'purpose', or a JSON object "
                                   "{\"filename\",\"content\",\"purpose\"?}");
            return false;
        }
        snprintf(u->filename, sizeof u->filename, "%s", cJSON_IsString(fn) ? fn->valuestring : "upload.jsonl");
        snprintf(u->purpose, sizeof u->purpose, "%s", cJSON_IsString(p) ? p->valuestring : "fine-tune");
        u->data = c->valuestring, u->len = strlen(c->valuestring), u->json = json;
        return true;
    }
    ds_server_reply_errorf(req, EP_FILES, 400, NULL, NULL,
                           "Content-Type must be multipart/form-data (file, purpose) or application/json");
    return false;
}

/* The record write (fsync included) of one upload, on a libuv worker so that the loop keeps
 * serving; the request ends in store_done. */
typedef struct store_job {
    uv_work_t work;
    ds_http_req *req;
    ds_file_store *fs;
    ds_file *f;
    int status;
    ds_err err;
} store_job;

static void store_work(uv_work_t *w) {
    store_job *j = w->data;
    j->status = ds_file_store_write(j->fs, j->f, &j->err);
}

static void reply_file(ds_http_req *req, const ds_file *f) {
    ds_sb b;
    ds_sb_init(&b);
    file_json(&b, f);
    ds_server_reply_json(req, EP_FILES, 200, &b);
}

static void store_done(uv_work_t *w, int uv_status) {
    store_job *j = w->data;
    if (j->status == 0 && uv_status == 0) {
        reply_file(j->req, ds_file_store_commit(j->fs, j->f));
    } else { /* the data directory is full or unwritable: this upload fails, the server goes on */
        ds_file_store_discard(j->fs, j->f);
        ds_server_reply_errorf(j->req, EP_FILES, 500, NULL, "storage_error", "cannot store the file: %s",
                               j->status ? j->err.msg : "the write was cancelled");
    }
    free(j);
}

static void handle_file_upload(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    ds_file_store *fs = ds_server_files(s);
    upload u;
    if (!parse_upload(req, &u)) return;
    int status = 0;
    const char *param = NULL;
    char msg[600];
    ds_err err = {{0}};
    if (!u.purpose[0]) status = 400, param = "purpose", snprintf(msg, sizeof msg, "'purpose' is required");
    else if (strcmp(u.purpose, "fine-tune"))
        status = 400, param = "purpose",
        snprintf(msg, sizeof msg, "purpose '%s' is not supported (only 'fine-tune')", u.purpose);
    else if (u.len > DS_FILE_STORE_MAX_BYTES)
        status = 413, param = "file",
        snprintf(msg, sizeof msg, "the file is larger than %u MiB", DS_FILE_STORE_MAX_BYTES >> 20);
    else if (ds_file_store_count(fs) >= DS_FILE_STORE_MAX)
        status = 409, snprintf(msg, sizeof msg, "too many files (at most %d): delete some first", DS_FILE_STORE_MAX);
    else if (ds_ft_data_check(u.data, u.len, &err) < 0)
        status = 400, param = "file", snprintf(msg, sizeof msg, "%s", err.msg);
    ds_file *f = NULL;
    const char *code = status == 400 && param && !strcmp(param, "file") ? "invalid_file_format" : NULL;
    int st = status ? 0 : ds_file_store_prepare(fs, u.filename, u.purpose, u.data, u.len, &f, &err);
    if (st == DS_EBUSY) /* uploads still being written hold their slots */
        status = 409, snprintf(msg, sizeof msg, "too many files (at most %d): delete some first", DS_FILE_STORE_MAX);
    else if (st) status = 500, snprintf(msg, sizeof msg, "%s", err.msg);
    cJSON_Delete(u.json); /* prepare copied the data */
    if (status) {
        ds_server_reply_errorf(req, EP_FILES, status, param, code, "%s", msg);
        return;
    }
    store_job *j = calloc(1, sizeof *j);
    if (!j) {
        ds_file_store_discard(fs, f);
        ds_server_reply_errorf(req, EP_FILES, 500, NULL, NULL, "out of memory");
        return;
    }
    j->req = req, j->fs = fs, j->f = f;
    j->work.data = j;
    if (uv_queue_work(ds_server_http(s)->loop, &j->work, store_work, store_done) != 0) {
        ds_file_store_discard(fs, f);
        free(j);
        ds_server_reply_errorf(req, EP_FILES, 500, NULL, NULL, "cannot queue the file's write");
    }
}

static void handle_file_list(ds_http_req *req, void *ud) {
    (void)ud;
    ds_file_store *fs = ds_server_files(ds_server_of(req));
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"list\",\"data\":[");
    for (int32_t i = 0; i < ds_file_store_count(fs); i++) {
        if (i) ds_sb_puts(&b, ",");
        file_json(&b, ds_file_store_at(fs, i));
    }
    ds_sb_puts(&b, "],\"has_more\":false}");
    ds_server_reply_json(req, EP_FILES, 200, &b);
}

static void handle_file_get(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    if (!ds_server_path_id(req, EP_FILE, id, sizeof id)) return;
    const ds_file *f = ds_file_store_find(ds_server_files(ds_server_of(req)), id);
    if (!f) {
        ds_server_reply_errorf(req, EP_FILE, 404, "id", "file_not_found", "No such File object: %s", id);
        return;
    }
    ds_sb b;
    ds_sb_init(&b);
    file_json(&b, f);
    ds_server_reply_json(req, EP_FILE, 200, &b);
}

static void handle_file_delete(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    if (!ds_server_path_id(req, EP_FILE, id, sizeof id)) return;
    /* Jobs copied what they need when they were created: deleting is always safe. */
    ds_err err = {{0}};
    int st = ds_file_store_delete(ds_server_files(ds_server_of(req)), id, &err);
    if (st == DS_ENOTFOUND) {
        ds_server_reply_errorf(req, EP_FILE, 404, "id", "file_not_found", "No such File object: %s", id);
        return;
    }
    if (st) {
        ds_server_reply_errorf(req, EP_FILE, 500, NULL, "storage_error", "%s", err.msg);
        return;
    }
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"id\":");
    ds_sb_json_str(&b, id, strlen(id));
    ds_sb_puts(&b, ",\"object\":\"file\",\"deleted\":true}");
    ds_server_reply_json(req, EP_FILE, 200, &b);
}

static const ds_route routes[] = {
    {HTTP_POST, EP_FILES, handle_file_upload, NULL, 0},
    {HTTP_GET, EP_FILES, handle_file_list, NULL, 0},
    {HTTP_GET, EP_FILE, handle_file_get, NULL, 0},
    {HTTP_DELETE, EP_FILE, handle_file_delete, NULL, 0},
};
const ds_route_table ds_handlers_files_routes = {routes, sizeof routes / sizeof routes[0]};
