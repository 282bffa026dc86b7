/* The OpenAI files and fine-tuning endpoints (README.md, "Fine-tuning"):
 *   POST /v1/files (multipart/form-data: file, purpose=fine-tune; or JSON {"filename","content"}),
 *   GET /v1/files, GET|DELETE /v1/files/{id},
 *   POST|GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id}, POST …/{id}/cancel,
 *   GET …/{id}/events, GET …/{id}/checkpoints.
 *
 * Files live in memory (at most FILES_MAX of FILE_MAX_BYTES each) and are validated line by line
 * at upload (400 naming the lines). Jobs are handed to the fine-tuning job manager
 * (src/train/jobs.c), created with the server: one job at a time, whose training steps run on the
 * engine thread between inference steps within --train-budget.
 *
 * Threading: loop thread only; the manager is thread-safe. JSONL validation runs on the loop
 * thread (bounded by FILE_MAX_BYTES). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <llhttp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds/server.h"
#include "ds/train.h"
#include "server/handlers.h"
#include "server/multipart.h"
#include "util/rng.h"

#define EP_FILES "/v1/files"
#define EP_FILE "/v1/files/{id}"
#define EP_JOBS "/v1/fine_tuning/jobs"
#define EP_JOB "/v1/fine_tuning/jobs/{id}"
#define EP_CANCEL "/v1/fine_tuning/jobs/{id}/cancel"
#define EP_EVENTS "/v1/fine_tuning/jobs/{id}/events"
#define EP_CKPTS "/v1/fine_tuning/jobs/{id}/checkpoints"

#define FILES_MAX 64
#define FILE_MAX_BYTES (16u << 20)

typedef struct ft_file {
    char id[40];
    char filename[256];
    char purpose[32];
    int64_t created_at;
    char *data;
    size_t bytes;
} ft_file;

struct ds_ft_state {
    ft_file files[FILES_MAX];
    int32_t n_files;
    uint64_t counter;
    ds_ft_manager *mgr;
};

struct ds_ft_state *ds_handlers_ft_create(ds_server *s, ds_err *err) {
    struct ds_ft_state *st = calloc(1, sizeof *st);
    if (!st) return ds_err_set(err, DS_ENOMEM, "server: out of memory"), NULL;
    st->counter = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)st;
    ds_engine *e = ds_server_engine(s);
    if (e) { /* without a model there is nothing to fine-tune: the job endpoints say so */
        if (!(st->mgr = ds_ft_manager_create(ds_engine_model(e), ds_server_registry(s), err))) return free(st), NULL;
        ds_ft_manager_attach_engine(st->mgr, e, ds_server_train_budget(s));
    }
    return st;
}

void ds_handlers_ft_free(struct ds_ft_state *st) {
    if (!st) return;
    ds_ft_manager_free(st->mgr); /* cancels the running job, joins the training thread */
    for (int32_t i = 0; i < st->n_files; i++) free(st->files[i].data);
    free(st);
}

static struct ds_ft_state *state(ds_server *s) { return ds_server_ft_state(s); }

static uint64_t next_rand(struct ds_ft_state *st) { return ds_splitmix64(&st->counter); }

static ft_file *find_file(struct ds_ft_state *st, const char *id) {
    for (int32_t i = 0; st && i < st->n_files; i++)
        if (!strcmp(st->files[i].id, id)) return &st->files[i];
    return NULL;
}

static void file_json(ds_sb *b, const ft_file *f) {
    ds_sb_puts(b, "{\"id\":");
    ds_sb_json_str(b, f->id, strlen(f->id));
    ds_sb_printf(b, ",\"object\":\"file\",\"bytes\":%zu,\"created_at\":%lld,\"filename\":", f->bytes,
                 (long long)f->created_at);
    ds_sb_json_str(b, f->filename, strlen(f->filename));
    ds_sb_puts(b, ",\"purpose\":");
    ds_sb_json_str(b, f->purpose, strlen(f->purpose));
    ds_sb_puts(b, ",\"status\":\"processed\",\"status_details\":null}");
}

/* The {id} segment (ids are plain ASCII: no decoding needed); 400 when unusable. */
static bool path_id(ds_http_req *req, const char *ep, char *out, size_t cap) {
    if (req->n_params >= 1 && strlen(req->params[0]) < cap && !strchr(req->params[0], '%')) {
        snprintf(out, cap, "%s", req->params[0]);
        return true;
    }
    ds_server_reply_errorf(req, ep, 400, "id", NULL, "malformed id in the path");
    return false;
}

/* ---- files --------------------------------------------------------------------------------- */

static void handle_file_upload(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    struct ds_ft_state *st = state(s);
    if (!st) {
        ds_server_reply_errorf(req, EP_FILES, 500, NULL, NULL, "out of memory");
        return;
    }
    const char *ct = ds_http_req_header(req, "content-type");
    char boundary[96], filename[256] = "", purpose[32] = "";
    const char *data = NULL;
    size_t len = 0;
    cJSON *json = NULL;
    if (ct && ds_multipart_boundary(ct, boundary, sizeof boundary)) {
        ds_multipart_part parts[DS_MULTIPART_MAX_PARTS];
        char why[160];
        int n = ds_multipart_parse(req->body, req->body_len, boundary, parts, DS_MULTIPART_MAX_PARTS, why, sizeof why);
        if (n < 0) {
            ds_server_reply_errorf(req, EP_FILES, 400, NULL, NULL, "%s", why);
            return;
        }
        const ds_multipart_part *f = ds_multipart_find(parts, n, "file");
        const ds_multipart_part *p = ds_multipart_find(parts, n, "purpose");
        if (!f) {
            ds_server_reply_errorf(req, EP_FILES, 400, "file", NULL, "'file' is required");
            return;
        }
        if (p) snprintf(purpose, sizeof purpose, "%.*s", (int)(p->len < 31 ? p->len : 31), p->data);
        snprintf(filename, sizeof filename, "%s", f->has_filename && f->filename[0] ? f->filename : "upload.jsonl");
        data = f->data, len = f->len;
    } else if (ct && !strncasecmp(ct, "application/json", 16)) {
        json = cJSON_ParseWithLength(req->body, req->body_len);
        const cJSON *c = json ? cJSON_GetObjectItemCaseSensitive(json, "content") : NULL;
        const cJSON *fn = json ? cJSON_GetObjectItemCaseSensitive(json, "filename") : NULL;
        const cJSON *p = json ? cJSON_GetObjectItemCaseSensitive(json, "purpose") : NULL;
        if (!cJSON_IsObject(json) || !cJSON_IsString(c)) {
            cJSON_Delete(json);
            ds_server_reply_errorf(req, EP_FILES, 400, "content", NULL,
                                   "send multipart/form-data with 'file' and 'purpose', or a JSON object "
                                   "{\"filename\",\"content\",\"purpose\"?}");
            return;
        }
        snprintf(filename, sizeof filename, "%s", cJSON_IsString(fn) ? fn->valuestring : "upload.jsonl");
        snprintf(purpose, sizeof purpose, "%s", cJSON_IsString(p) ? p->valuestring : "fine-tune");
        data = c->valuestring, len = strlen(c->valuestring);
    } else {
        ds_server_reply_errorf(req, EP_FILES, 400, NULL, NULL,
                               "Content-Type must be multipart/form-data (file, purpose) or application/json");
        return;
    }
    int status = 0;
    const char *param = NULL;
    char msg[600];
    ds_err err = {{0}};
    if (!purpose[0]) status = 400, param = "purpose", snprintf(msg, sizeof msg, "'purpose' is required");
    else if (strcmp(purpose, "fine-tune"))
        status = 400, param = "purpose",
        snprintf(msg, sizeof msg, "purpose '%s' is not supported (only 'fine-tune')", purpose);
    else if (len > FILE_MAX_BYTES)
        status = 413, param = "file", snprintf(msg, sizeof msg, "the file is larger than %u MiB", FILE_MAX_BYTES >> 20);
    else if (st->n_files >= FILES_MAX)
        status = 409, snprintf(msg, sizeof msg, "too many files (at most %d): delete some first", FILES_MAX);
    else if (ds_ft_data_check(data, len, &err) < 0)
        status = 400, param = "file", snprintf(msg, sizeof msg, "%s", err.msg);
    if (status) {
        cJSON_Delete(json);
        ds_server_reply_errorf(req, EP_FILES, status, param, status == 400 && param && !strcmp(param, "file")
                                                               ? "invalid_file_format" : NULL, "%s", msg);
        return;
    }
    ft_file *f = &st->files[st->n_files];
    memset(f, 0, sizeof *f);
    f->data = malloc(len + 1);
    if (!f->data) {
        cJSON_Delete(json);
        ds_server_reply_errorf(req, EP_FILES, 500, NULL, NULL, "out of memory");
        return;
    }
    memcpy(f->data, data, len);
    f->data[len] = '\0';
    f->bytes = len;
    cJSON_Delete(json);
    snprintf(f->id, sizeof f->id, "file-%016llx", (unsigned long long)next_rand(st));
    snprintf(f->filename, sizeof f->filename, "%s", filename);
    snprintf(f->purpose, sizeof f->purpose, "%s", purpose);
    f->created_at = (int64_t)time(NULL);
    st->n_files++;
    ds_sb b;
    ds_sb_init(&b);
    file_json(&b, f);
    ds_server_reply_json(req, EP_FILES, 200, &b);
}

static void handle_file_list(ds_http_req *req, void *ud) {
    (void)ud;
    struct ds_ft_state *st = state(ds_server_of(req));
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"list\",\"data\":[");
    for (int32_t i = 0; st && i < st->n_files; i++) {
        if (i) ds_sb_puts(&b, ",");
        file_json(&b, &st->files[i]);
    }
    ds_sb_puts(&b, "],\"has_more\":false}");
    ds_server_reply_json(req, EP_FILES, 200, &b);
}

static void handle_file_get(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    if (!path_id(req, EP_FILE, id, sizeof id)) return;
    ft_file *f = find_file(state(ds_server_of(req)), id);
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
    if (!path_id(req, EP_FILE, id, sizeof id)) return;
    struct ds_ft_state *st = state(ds_server_of(req));
    ft_file *f = find_file(st, id);
    if (!f) {
        ds_server_reply_errorf(req, EP_FILE, 404, "id", "file_not_found", "No such File object: %s", id);
        return;
    }
    free(f->data); /* jobs copied what they need */
    int32_t i = (int32_t)(f - st->files);
    memmove(&st->files[i], &st->files[i + 1], (size_t)(st->n_files - i - 1) * sizeof *f);
    st->n_files--;
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"id\":");
    ds_sb_json_str(&b, id, strlen(id));
    ds_sb_puts(&b, ",\"object\":\"file\",\"deleted\":true}");
    ds_server_reply_json(req, EP_FILE, 200, &b);
}

/* ---- jobs ---------------------------------------------------------------------------------- */

static void num_or_null(ds_sb *b, double v) {
    if (isfinite(v)) ds_sb_json_num(b, v);
    else ds_sb_puts(b, "null");
}

static const char *kind_method(const char *method) {
    return !strcmp(method, "supervised") ? "supervised" : method;
}

static void targets_json(ds_sb *b, uint32_t targets) {
    static const char *names[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    ds_sb_puts(b, "[");
    bool first = true;
    for (int p = 0; p < DS_PROJ_COUNT; p++)
        if (targets & DS_TRAIN_TARGET(p)) ds_sb_printf(b, "%s\"%s\"", first ? "" : ",", names[p]), first = false;
    if (targets & DS_TRAIN_TARGET_LM_HEAD) ds_sb_printf(b, "%s\"lm_head\"", first ? "" : ","), first = false;
    if (targets & DS_TRAIN_TARGET_EMBED) ds_sb_printf(b, "%s\"embed_tokens\"", first ? "" : ",");
    ds_sb_puts(b, "]");
}

static void job_json(ds_sb *b, const ds_ft_job_info *j) {
    ds_sb_puts(b, "{\"object\":\"fine_tuning.job\",\"id\":");
    ds_sb_json_str(b, j->id, strlen(j->id));
    ds_sb_puts(b, ",\"model\":");
    ds_sb_json_str(b, j->model, strlen(j->model));
    ds_sb_printf(b, ",\"created_at\":%lld,\"finished_at\":", (long long)j->created_at);
    if (j->finished_at) ds_sb_printf(b, "%lld", (long long)j->finished_at);
    else ds_sb_puts(b, "null");
    ds_sb_puts(b, ",\"fine_tuned_model\":");
    if (j->status == DS_FT_SUCCEEDED) ds_sb_json_str(b, j->fine_tuned_model, strlen(j->fine_tuned_model));
    else ds_sb_puts(b, "null");
    ds_sb_puts(b, ",\"organization_id\":\"deltaserve\",\"result_files\":[],\"status\":");
    const char *sn = ds_ft_status_name(j->status);
    ds_sb_json_str(b, sn, strlen(sn));
    ds_sb_puts(b, ",\"training_file\":");
    ds_sb_json_str(b, j->training_file, strlen(j->training_file));
    ds_sb_puts(b, ",\"validation_file\":");
    if (j->validation_file[0]) ds_sb_json_str(b, j->validation_file, strlen(j->validation_file));
    else ds_sb_puts(b, "null");
    ds_sb_printf(b, ",\"trained_tokens\":%lld,\"error\":", (long long)j->trained_tokens);
    if (j->status == DS_FT_FAILED) {
        ds_sb_puts(b, "{\"code\":");
        ds_sb_json_str(b, j->error_code, strlen(j->error_code));
        ds_sb_puts(b, ",\"message\":");
        ds_sb_json_str(b, j->error, strlen(j->error));
        ds_sb_puts(b, ",\"param\":\"training_file\"}");
    } else {
        ds_sb_puts(b, "null");
    }
    /* hyperparameters: what the job uses (n_epochs / batch_size resolved once it started) */
    ds_sb hp;
    ds_sb_init(&hp);
    ds_sb_puts(&hp, "{\"n_epochs\":");
    if (j->n_epochs > 0) ds_sb_printf(&hp, "%d", (int)j->n_epochs);
    else ds_sb_puts(&hp, "\"auto\"");
    ds_sb_puts(&hp, ",\"batch_size\":");
    if (j->batch_size > 0) ds_sb_printf(&hp, "%d", (int)j->batch_size);
    else ds_sb_puts(&hp, "\"auto\"");
    ds_sb_puts(&hp, ",\"learning_rate_multiplier\":");
    ds_sb_json_num(&hp, j->lr_multiplier);
    ds_sb_puts(&hp, ",\"learning_rate\":");
    ds_sb_json_num(&hp, j->learning_rate);
    if (!strcmp(j->method, "prompt_tuning") || !strcmp(j->method, "prefix_tuning")) {
        ds_sb_printf(&hp, ",\"num_virtual_tokens\":%d", (int)j->n_virtual);
    } else {
        ds_sb_printf(&hp, ",\"rank\":%d,\"alpha\":", (int)j->rank);
        ds_sb_json_num(&hp, j->alpha);
        ds_sb_puts(&hp, ",\"target_modules\":");
        targets_json(&hp, j->targets);
        ds_sb_puts(&hp, j->use_rslora ? ",\"use_rslora\":true" : ",\"use_rslora\":false");
    }
    ds_sb_puts(&hp, "}");
    const char *hps = hp.data ? hp.data : "{}";
    ds_sb_printf(b, ",\"hyperparameters\":%s,\"method\":{\"type\":\"%s\",\"%s\":{\"hyperparameters\":%s}}", hps,
                 kind_method(j->method), kind_method(j->method), hps);
    ds_sb_free(&hp);
    ds_sb_printf(b, ",\"seed\":%llu,\"estimated_finish\":null,\"integrations\":[],\"metadata\":null",
                 (unsigned long long)j->seed);
    ds_sb_printf(b, ",\"step\":%lld,\"total_steps\":%lld,\"tokens_per_second\":", (long long)j->step,
                 (long long)j->total_steps);
    ds_sb_json_num(b, j->tokens_per_s);
    ds_sb_puts(b, ",\"adapter_id\":");
    ds_sb_json_str(b, j->fine_tuned_model, strlen(j->fine_tuned_model));
    ds_sb_puts(b, "}");
}

static bool valid_suffix(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64) return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '_' && s[i] != '.') return false;
    return true;
}

/* Reads an integer hyperparameter ("auto" / null → 0). False after answering 400. */
static bool hp_int(ds_http_req *req, const cJSON *hp, const char *key, int32_t lo, int32_t hi, int32_t *out) {
    const cJSON *v = hp ? cJSON_GetObjectItemCaseSensitive(hp, key) : NULL;
    if (!v || cJSON_IsNull(v) || (cJSON_IsString(v) && !strcmp(v->valuestring, "auto"))) return true;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < lo || v->valuedouble > hi) {
        ds_server_reply_errorf(req, EP_JOBS, 400, key, NULL, "'%s' must be an integer in [%d, %d] or \"auto\"", key,
                               (int)lo, (int)hi);
        return false;
    }
    *out = (int32_t)v->valuedouble;
    return true;
}

static bool hp_float(ds_http_req *req, const cJSON *hp, const char *key, double lo, double hi, float *out) {
    const cJSON *v = hp ? cJSON_GetObjectItemCaseSensitive(hp, key) : NULL;
    if (!v || cJSON_IsNull(v) || (cJSON_IsString(v) && !strcmp(v->valuestring, "auto"))) return true;
    if (!cJSON_IsNumber(v) || !(v->valuedouble > lo) || v->valuedouble > hi) {
        ds_server_reply_errorf(req, EP_JOBS, 400, key, NULL, "'%s' must be a number in (%g, %g] or \"auto\"", key, lo,
                               hi);
        return false;
    }
    *out = (float)v->valuedouble;
    return true;
}

static bool hp_targets(ds_http_req *req, const cJSON *hp, uint32_t *out) {
    const cJSON *v = hp ? cJSON_GetObjectItemCaseSensitive(hp, "target_modules") : NULL;
    if (!v || cJSON_IsNull(v)) return true;
    static const struct { const char *name; uint32_t bit; } map[] = {
        {"q", DS_TRAIN_TARGET(DS_PROJ_Q)}, {"k", DS_TRAIN_TARGET(DS_PROJ_K)}, {"v", DS_TRAIN_TARGET(DS_PROJ_V)},
        {"o", DS_TRAIN_TARGET(DS_PROJ_O)}, {"gate", DS_TRAIN_TARGET(DS_PROJ_GATE)},
        {"up", DS_TRAIN_TARGET(DS_PROJ_UP)}, {"down", DS_TRAIN_TARGET(DS_PROJ_DOWN)},
        {"lm_head", DS_TRAIN_TARGET_LM_HEAD}, {"embed_tokens", DS_TRAIN_TARGET_EMBED}};
    if (cJSON_IsString(v) && (!strcmp(v->valuestring, "all-linear") || !strcmp(v->valuestring, "all_linear"))) {
        *out = DS_TRAIN_TARGET_ALL_LINEAR;
        return true;
    }
    uint32_t bits = 0;
    int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(v, i);
        if (!cJSON_IsString(e)) {
            n = -1;
            break;
        }
        char name[32];
        snprintf(name, sizeof name, "%s", e->valuestring);
        size_t l = strlen(name);
        if (l > 5 && !strcmp(name + l - 5, "_proj")) name[l - 5] = '\0';
        uint32_t bit = 0;
        for (size_t k = 0; k < sizeof map / sizeof map[0]; k++)
            if (!strcmp(name, map[k].name)) bit = map[k].bit;
        if (!bit) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "target_modules", NULL,
                                   "unknown target module '%.40s' (q,k,v,o,gate,up,down[_proj], lm_head, "
                                   "embed_tokens or \"all-linear\")", e->valuestring);
            return false;
        }
        bits |= bit;
    }
    if (n <= 0) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "target_modules", NULL,
                               "'target_modules' must be a non-empty array of module names or \"all-linear\"");
        return false;
    }
    *out = bits;
    return true;
}

static ds_ft_manager *manager(ds_server *s, ds_err *err) {
    ds_ft_manager *m = state(s)->mgr;
    if (!m) ds_err_set(err, DS_EUNSUPPORTED, "no model is loaded");
    return m;
}

ds_ft_manager *ds_handlers_ft_manager(ds_server *s, ds_err *err) { return manager(s, err); }
void ds_handlers_ft_job_json(ds_sb *b, const ds_ft_job_info *j) { job_json(b, j); }

static void handle_job_create(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    struct ds_adapter_registry *reg = ds_server_registry(s);
    if (!reg || !ds_registry_root(reg)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, NULL, NULL,
                               "fine-tuning is disabled: start the server with --adapter-dir DIR (trained adapters "
                               "are saved there)");
        return;
    }
    struct ds_ft_state *st = state(s);
    cJSON *o = cJSON_ParseWithLength(req->body, req->body_len);
    if (!st || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        ds_server_reply_errorf(req, EP_JOBS, 400, NULL, NULL, "request body must be a JSON object");
        return;
    }
    ds_ft_job_spec sp = {0};
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(o, "model");
    const cJSON *tf = cJSON_GetObjectItemCaseSensitive(o, "training_file");
    const cJSON *vf = cJSON_GetObjectItemCaseSensitive(o, "validation_file");
    const cJSON *suffix = cJSON_GetObjectItemCaseSensitive(o, "suffix");
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(o, "seed");
    const cJSON *method = cJSON_GetObjectItemCaseSensitive(o, "method");
    const cJSON *hp = cJSON_GetObjectItemCaseSensitive(o, "hyperparameters"); /* legacy, top level */
    char name[128];
    ds_err err = {{0}};
    ft_file *train = NULL, *valid = NULL;
    if (!cJSON_IsString(model) || !model->valuestring[0]) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "model", NULL, "'model' is required (a string)");
        goto out;
    }
    if (!cJSON_IsString(tf) || !tf->valuestring[0]) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "training_file", NULL, "'training_file' is required (a file id)");
        goto out;
    }
    if (!(train = find_file(st, tf->valuestring))) {
        ds_server_reply_errorf(req, EP_JOBS, 404, "training_file", "file_not_found", "No such File object: %s",
                               tf->valuestring);
        goto out;
    }
    if (vf && !cJSON_IsNull(vf)) {
        if (!cJSON_IsString(vf) || !(valid = find_file(st, vf->valuestring))) {
            ds_server_reply_errorf(req, EP_JOBS, 404, "validation_file", "file_not_found", "No such File object: %s",
                                   cJSON_IsString(vf) ? vf->valuestring : "(not a string)");
            goto out;
        }
    }
    sp.model = model->valuestring;
    if (!ds_server_is_base_name(s, model->valuestring)) {
        ds_adapter_info info;
        if (ds_registry_info(reg, model->valuestring, &info) != DS_OK) {
            ds_server_reply_errorf(req, EP_JOBS, 404, "model", "model_not_found",
                                   "The model `%s` does not exist (give the base model or a loaded adapter).",
                                   model->valuestring);
            goto out;
        }
        sp.from_adapter = true;
    }
    if (suffix && !cJSON_IsNull(suffix)) {
        if (!cJSON_IsString(suffix) || !valid_suffix(suffix->valuestring)) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "suffix", NULL,
                                   "'suffix' must be 1-64 characters of [A-Za-z0-9._-]");
            goto out;
        }
        snprintf(name, sizeof name, "ft-%s", suffix->valuestring);
    } else {
        snprintf(name, sizeof name, "ft-%08llx", (unsigned long long)(next_rand(st) & 0xffffffffu));
    }
    if (ds_server_is_base_name(s, name)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "suffix", NULL, "'%s' is the base model's name", name);
        goto out;
    }
    sp.fine_tuned_model = name;
    if (seed && !cJSON_IsNull(seed)) {
        if (!cJSON_IsNumber(seed) || seed->valuedouble < 0 || seed->valuedouble != floor(seed->valuedouble)) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "seed", NULL, "'seed' must be a non-negative integer");
            goto out;
        }
        sp.seed = (uint64_t)seed->valuedouble;
    } else {
        sp.seed = next_rand(st) & 0x7fffffffu;
    }
    /* method */
    sp.method = "supervised";
    sp.kind = DS_ADAPTER_LORA;
    if (method && !cJSON_IsNull(method)) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(method, "type");
        if (!cJSON_IsObject(method) || !cJSON_IsString(type)) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "method", NULL, "'method' must be an object with a 'type'");
            goto out;
        }
        const char *t = type->valuestring;
        if (!strcmp(t, "supervised")) {
            sp.method = "supervised";
        } else if (!strcmp(t, "dpo") || !strcmp(t, "reinforcement")) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "method.type", "unsupported",
                                   "method '%s' is not supported: supervised, lora, prompt_tuning or prefix_tuning", t);
            goto out;
        } else {
            int rc = ds_train_kind_parse(t, &sp.kind, &err);
            if (rc != DS_OK) {
                ds_server_reply_errorf(req, EP_JOBS, 400, "method.type", NULL, "%s", err.msg);
                goto out;
            }
            sp.method = sp.kind == DS_ADAPTER_LORA ? "lora" : sp.kind == DS_ADAPTER_PROMPT ? "prompt_tuning"
                                                                                            : "prefix_tuning";
        }
        const cJSON *sub = cJSON_GetObjectItemCaseSensitive(method, t);
        const cJSON *mhp = cJSON_IsObject(sub) ? cJSON_GetObjectItemCaseSensitive(sub, "hyperparameters") : NULL;
        if (mhp) hp = mhp;
    }
    if (hp && !cJSON_IsObject(hp)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "hyperparameters", NULL, "'hyperparameters' must be an object");
        goto out;
    }
    int32_t r = 0;
    if (!hp_int(req, hp, "n_epochs", 1, 1000, &sp.n_epochs) || !hp_int(req, hp, "batch_size", 1, 256, &sp.batch_size) ||
        !hp_float(req, hp, "learning_rate_multiplier", 0, 1000, &sp.lr_multiplier) ||
        !hp_float(req, hp, "learning_rate", 0, 10, &sp.learning_rate) || !hp_int(req, hp, "rank", 1, 1024, &sp.rank) ||
        !hp_int(req, hp, "r", 1, 1024, &r) || !hp_float(req, hp, "alpha", 0, 1e6, &sp.alpha) ||
        !hp_float(req, hp, "lora_alpha", 0, 1e6, &sp.alpha) || !hp_targets(req, hp, &sp.targets) ||
        !hp_int(req, hp, "num_virtual_tokens", 1, 512, &sp.n_virtual))
        goto out;
    if (r && !sp.rank) sp.rank = r;
    const cJSON *rs = hp ? cJSON_GetObjectItemCaseSensitive(hp, "use_rslora") : NULL;
    if (rs && !cJSON_IsBool(rs) && !cJSON_IsNull(rs)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "use_rslora", NULL, "'use_rslora' must be a boolean");
        goto out;
    }
    sp.use_rslora = cJSON_IsTrue(rs);
    sp.training_file = train->id;
    sp.train_data = train->data, sp.train_len = train->bytes;
    if (valid) sp.validation_file = valid->id, sp.valid_data = valid->data, sp.valid_len = valid->bytes;
    ds_ft_manager *mgr = manager(s, &err);
    char id[48];
    if (!mgr || ds_ft_submit(mgr, &sp, id, &err) != DS_OK) {
        ds_server_reply_errorf(req, EP_JOBS, mgr ? 400 : 503, NULL, NULL, "%s", err.msg);
        goto out;
    }
    ds_ft_job_info info;
    ds_ft_get(mgr, id, &info);
    ds_sb b;
    ds_sb_init(&b);
    job_json(&b, &info);
    ds_server_reply_json(req, EP_JOBS, 200, &b);
out:
    cJSON_Delete(o);
}

static void handle_job_list(ds_http_req *req, void *ud) {
    (void)ud;
    struct ds_ft_state *st = state(ds_server_of(req));
    ds_ft_job_info *jobs = NULL;
    size_t n = 0;
    if (st && st->mgr && ds_ft_list(st->mgr, &jobs, &n) != DS_OK) n = 0;
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"list\",\"data\":[");
    for (size_t i = 0; i < n; i++) {
        if (i) ds_sb_puts(&b, ",");
        job_json(&b, &jobs[i]);
    }
    ds_sb_puts(&b, "],\"has_more\":false}");
    free(jobs);
    ds_server_reply_json(req, EP_JOBS, 200, &b);
}

/* The job named in the path, or NULL after answering 404. */
static ds_ft_manager *job_of(ds_http_req *req, const char *ep, char *id, size_t cap, ds_ft_job_info *info) {
    if (!path_id(req, ep, id, cap)) return NULL;
    struct ds_ft_state *st = state(ds_server_of(req));
    if (!st || !st->mgr || ds_ft_get(st->mgr, id, info) != DS_OK) {
        ds_server_reply_errorf(req, ep, 404, "fine_tuning_job_id", "fine_tuning_job_not_found",
                               "Could not find fine tune job: %s", id);
        return NULL;
    }
    return st->mgr;
}

static void handle_job_get(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    ds_ft_job_info info;
    if (!job_of(req, EP_JOB, id, sizeof id, &info)) return;
    ds_sb b;
    ds_sb_init(&b);
    job_json(&b, &info);
    ds_server_reply_json(req, EP_JOB, 200, &b);
}

static void handle_job_cancel(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    ds_ft_job_info info;
    ds_ft_manager *m = job_of(req, EP_CANCEL, id, sizeof id, &info);
    if (!m) return;
    ds_err err = {{0}};
    if (ds_ft_cancel(m, id, &err) != DS_OK) {
        ds_server_reply_errorf(req, EP_CANCEL, 400, NULL, NULL, "Cannot cancel job %s: %s", id, err.msg);
        return;
    }
    ds_ft_get(m, id, &info);
    ds_sb b;
    ds_sb_init(&b);
    job_json(&b, &info);
    ds_server_reply_json(req, EP_CANCEL, 200, &b);
}

/* ?limit=N from the query string (default dflt). */
static size_t query_limit(const ds_http_req *req, size_t dflt) {
    const char *q = req->query ? strstr(req->query, "limit=") : NULL;
    if (!q || (q != req->query && q[-1] != '&')) return dflt;
    long v = strtol(q + 6, NULL, 10);
    return v > 0 ? (size_t)v : dflt;
}

static void handle_job_events(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    ds_ft_job_info info;
    ds_ft_manager *m = job_of(req, EP_EVENTS, id, sizeof id, &info);
    if (!m) return;
    ds_ft_event *ev = NULL;
    size_t n = 0;
    if (ds_ft_events(m, id, &ev, &n) != DS_OK) n = 0;
    size_t limit = query_limit(req, 10000);
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"list\",\"data\":[");
    size_t shown = 0;
    for (size_t k = n; k-- > 0 && shown < limit; shown++) { /* newest first, as OpenAI */
        const ds_ft_event *e = &ev[k];
        if (shown) ds_sb_puts(&b, ",");
        ds_sb_printf(&b, "{\"object\":\"fine_tuning.job.event\",\"id\":\"ftevent-%s-%lld\",\"created_at\":%lld,"
                         "\"level\":\"%s\",\"message\":",
                     id + 6, (long long)e->seq, (long long)e->created_at, e->level);
        ds_sb_json_str(&b, e->message, strlen(e->message));
        if (e->metrics) {
            ds_sb_printf(&b, ",\"type\":\"metrics\",\"data\":{\"step\":%lld,\"total_steps\":%lld,\"train_loss\":",
                         (long long)e->step, (long long)info.total_steps);
            num_or_null(&b, e->train_loss);
            ds_sb_puts(&b, ",\"learning_rate\":");
            ds_sb_json_num(&b, e->lr);
            ds_sb_puts(&b, "}}");
        } else {
            ds_sb_puts(&b, ",\"type\":\"message\",\"data\":{}}");
        }
    }
    ds_sb_printf(&b, "],\"has_more\":%s}", shown < n ? "true" : "false");
    free(ev);
    ds_server_reply_json(req, EP_EVENTS, 200, &b);
}

static void handle_job_checkpoints(ds_http_req *req, void *ud) {
    (void)ud;
    char id[64];
    ds_ft_job_info info;
    ds_ft_manager *m = job_of(req, EP_CKPTS, id, sizeof id, &info);
    if (!m) return;
    ds_ft_checkpoint *ck = NULL;
    size_t n = 0;
    if (ds_ft_checkpoints(m, id, &ck, &n) != DS_OK) n = 0;
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"list\",\"data\":[");
    for (size_t k = n, shown = 0; k-- > 0; shown++) { /* newest first */
        const ds_ft_checkpoint *c = &ck[k];
        if (shown) ds_sb_puts(&b, ",");
        ds_sb_printf(&b, "{\"object\":\"fine_tuning.job.checkpoint\",\"id\":\"ftckpt-%s-%lld\",\"created_at\":%lld,"
                         "\"fine_tuning_job_id\":\"%s\",\"fine_tuned_model_checkpoint\":",
                     id + 6, (long long)c->step, (long long)c->created_at, id);
        ds_sb_json_str(&b, c->path, strlen(c->path));
        ds_sb_printf(&b, ",\"step_number\":%lld,\"metrics\":{\"step\":%lld,\"train_loss\":", (long long)c->step,
                     (long long)c->step);
        num_or_null(&b, c->train_loss);
        ds_sb_puts(&b, ",\"valid_loss\":");
        num_or_null(&b, c->valid_loss);
        ds_sb_puts(&b, "}}");
    }
    ds_sb_puts(&b, "],\"has_more\":false}");
    free(ck);
    ds_server_reply_json(req, EP_CKPTS, 200, &b);
}

static const ds_route routes[] = {
    {HTTP_POST, EP_FILES, handle_file_upload, NULL, 0},
    {HTTP_GET, EP_FILES, handle_file_list, NULL, 0},
    {HTTP_GET, EP_FILE, handle_file_get, NULL, 0},
    {HTTP_DELETE, EP_FILE, handle_file_delete, NULL, 0},
    {HTTP_POST, EP_JOBS, handle_job_create, NULL, 0},
    {HTTP_GET, EP_JOBS, handle_job_list, NULL, 0},
    {HTTP_GET, EP_JOB, handle_job_get, NULL, 0},
    {HTTP_POST, EP_CANCEL, handle_job_cancel, NULL, 0},
    {HTTP_GET, EP_EVENTS, handle_job_events, NULL, 0},
    {HTTP_GET, EP_CKPTS, handle_job_checkpoints, NULL, 0},
};
const ds_route_table ds_handlers_ft_routes = {routes, sizeof routes / sizeof routes[0]};
