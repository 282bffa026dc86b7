/* Fine-tuning jobs on disk (jobs_internal.h): the record (job.json), the data files and the
 * resumable training state (state.bin) of each job under <data_dir>/jobs/<id>/. Records are read
 * back with the care given to requests: every field is type- and range-checked, and a record that
 * fails is skipped with a log line. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "util/json.h"
#include "train/jobs_internal.h"
#include "train/train_internal.h"
#include "util/durable.h"
#include "util/mem.h"
#include "util/sb.h"

#define RECORD_MAX (64u << 20)        /* job.json (events included) */
#define DATA_MAX ((16u << 20) + 1024) /* a data file: at most an uploaded file */
#define STATE_MAGIC "DSFTSTA1"

static const char *status_names[] = {"queued", "running", "succeeded", "failed", "cancelled"};

/* ---- record: encode --------------------------------------------------------------------------- */

static void key_str(ds_sb *b, const char *key, const char *v) {
    ds_sb_printf(b, ",\"%s\":", key);
    ds_sb_json_str(b, v, strlen(v));
}

static void key_num(ds_sb *b, const char *key, double v) {
    ds_sb_printf(b, ",\"%s\":", key);
    if (isfinite(v)) ds_sb_printf(b, "%.17g", v);
    else ds_sb_puts(b, "null");
}

char *ft_record_encode(const ft_job *j, size_t *len) {
    const ds_ft_job_info *I = &j->info;
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"version\":1");
    key_str(&b, "id", I->id);
    key_str(&b, "status", status_names[I->status]);
    key_str(&b, "model", I->model);
    key_str(&b, "fine_tuned_model", I->fine_tuned_model);
    key_str(&b, "training_file", I->training_file);
    key_str(&b, "validation_file", I->validation_file);
    key_str(&b, "method", I->method);
    key_str(&b, "error", I->error);
    key_str(&b, "error_code", I->error_code);
    ds_sb_printf(&b, ",\"kind\":%d,\"from_adapter\":%s,\"has_validation\":%s", (int)j->kind,
                 j->from_adapter ? "true" : "false", j->valid || j->valid_len ? "true" : "false");
    ds_sb_printf(&b, ",\"created_at\":%lld,\"finished_at\":%lld,\"trained_tokens\":%lld,\"step\":%lld,"
                     "\"total_steps\":%lld,\"n_epochs\":%d,\"batch_size\":%d,\"rank\":%d,\"n_virtual\":%d,"
                     "\"targets\":%u,\"use_rslora\":%s,\"seed\":\"%llu\"",
                 (long long)I->created_at, (long long)I->finished_at, (long long)I->trained_tokens,
                 (long long)I->step, (long long)I->total_steps, (int)I->n_epochs, (int)I->batch_size, (int)I->rank,
                 (int)I->n_virtual, (unsigned)I->targets, I->use_rslora ? "true" : "false",
                 (unsigned long long)I->seed);
    key_num(&b, "learning_rate", I->learning_rate);
    key_num(&b, "alpha", I->alpha);
    key_num(&b, "lr_multiplier", I->lr_multiplier);
    key_num(&b, "tokens_per_s", I->tokens_per_s);
    if (I->density > 0) { /* diff pruning (optional keys: older records have none) */
        key_num(&b, "density", I->density);
        ds_sb_printf(&b, ",\"dp_warmup_steps\":%d,\"bias\":%s", (int)I->dp_warmup_steps, I->bias ? "true" : "false");
    }
    if (j->kind == DS_ADAPTER_BOTTLENECK) /* its hyperparameters (ds_train_bn_opts), to resume with */
        ds_sb_printf(&b, ",\"bn\":{\"reduction_factor\":%d,\"placement\":%d,\"act\":%d,\"init\":%d,\"scaling\":%.9g}",
                     (int)I->bn.reduction_factor, (int)I->bn.placement, (int)I->bn.act, (int)I->bn.init,
                     (double)I->bn.scaling);
    ds_sb_puts(&b, ",\"events\":[");
    for (size_t i = 0; i < j->n_ev; i++) {
        const ds_ft_event *e = &j->ev[i];
        ds_sb_printf(&b, "%s{\"seq\":%lld,\"created_at\":%lld,\"metrics\":%s,\"step\":%lld", i ? "," : "",
                     (long long)e->seq, (long long)e->created_at, e->metrics ? "true" : "false", (long long)e->step);
        key_num(&b, "train_loss", e->train_loss);
        key_num(&b, "valid_loss", e->valid_loss);
        key_num(&b, "lr", e->lr);
        key_str(&b, "level", e->level);
        key_str(&b, "message", e->message);
        ds_sb_puts(&b, "}");
    }
    ds_sb_puts(&b, "],\"checkpoints\":[");
    for (size_t i = 0; i < j->n_ck; i++) {
        const ds_ft_checkpoint *c = &j->ck[i];
        ds_sb_printf(&b, "%s{\"step\":%lld,\"created_at\":%lld", i ? "," : "", (long long)c->step,
                     (long long)c->created_at);
        key_num(&b, "train_loss", c->train_loss);
        key_num(&b, "valid_loss", c->valid_loss);
        key_str(&b, "path", c->path);
        ds_sb_puts(&b, "}");
    }
    ds_sb_puts(&b, "]}\n");
    if (!ds_sb_ok(&b)) {
        ds_sb_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data;
}

/* ---- record: parse ---------------------------------------------------------------------------- */

typedef struct rd {
    const cJSON *o;
    bool ok;
    const char *bad; /* the first field that failed */
} rd;

static const cJSON *rd_get(rd *r, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->o, key);
    if (!v && r->ok) r->ok = false, r->bad = key;
    return v;
}

static void rd_fail(rd *r, const char *key) {
    if (r->ok) r->ok = false, r->bad = key;
}

static void rd_str(rd *r, const char *key, char *out, size_t cap) {
    const cJSON *v = rd_get(r, key);
    if (!v) return;
    /* well-formed UTF-8 only, as the encoder writes it: a record then survives a rewrite unchanged */
    if (!cJSON_IsString(v) || strlen(v->valuestring) >= cap || !ds_utf8_valid(v->valuestring, strlen(v->valuestring)))
        return rd_fail(r, key);
    memcpy(out, v->valuestring, strlen(v->valuestring) + 1);
}

static int64_t rd_int(rd *r, const char *key, double lo, double hi) {
    const cJSON *v = rd_get(r, key);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi) ||
        v->valuedouble != floor(v->valuedouble))
        return rd_fail(r, key), 0;
    return (int64_t)v->valuedouble;
}

/* A finite number in [lo, hi], or NaN for null. */
static double rd_num(rd *r, const char *key, double lo, double hi) {
    const cJSON *v = rd_get(r, key);
    if (!v) return NAN;
    if (cJSON_IsNull(v)) return NAN;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi)) return rd_fail(r, key), NAN;
    return v->valuedouble;
}

static bool rd_bool(rd *r, const char *key) {
    const cJSON *v = rd_get(r, key);
    if (v && !cJSON_IsBool(v)) rd_fail(r, key);
    return v && cJSON_IsTrue(v);
}

/* An adapter id as ds_ft_submit accepts it, and a relative checkpoint path without "..". */
static bool safe_name(const char *s, bool allow_slash) {
    if (!s[0] || s[0] == '.' || s[0] == '/' || strstr(s, "..")) return false;
    return allow_slash || !strchr(s, '/');
}

static bool valid_job_id(const char *id) {
    if (strncmp(id, "ftjob-", 6) || strlen(id) != 30) return false;
    for (const char *p = id + 6; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) return false;
    return true;
}

static int parse_info(rd *r, ft_job *j) {
    ds_ft_job_info *I = &j->info;
    char status[16] = "";
    rd_str(r, "id", I->id, sizeof I->id);
    rd_str(r, "status", status, sizeof status);
    rd_str(r, "model", I->model, sizeof I->model);
    rd_str(r, "fine_tuned_model", I->fine_tuned_model, sizeof I->fine_tuned_model);
    rd_str(r, "training_file", I->training_file, sizeof I->training_file);
    rd_str(r, "validation_file", I->validation_file, sizeof I->validation_file);
    rd_str(r, "method", I->method, sizeof I->method);
    rd_str(r, "error", I->error, sizeof I->error);
    rd_str(r, "error_code", I->error_code, sizeof I->error_code);
    const int64_t kind = rd_int(r, "kind", 0, 16);
    if (r->ok && kind != DS_ADAPTER_LORA && kind != DS_ADAPTER_PROMPT && kind != DS_ADAPTER_PREFIX &&
        kind != DS_ADAPTER_DELTA && kind != DS_ADAPTER_BOTTLENECK)
        rd_fail(r, "kind");
    if (r->ok && kind == DS_ADAPTER_BOTTLENECK) { /* out-of-range options are refused again by the trainer */
        rd sub = {.o = rd_get(r, "bn"), .ok = true};
        if (!cJSON_IsObject(sub.o)) rd_fail(r, "bn");
        I->bn = (ds_train_bn_opts){.reduction_factor = (int32_t)rd_int(&sub, "reduction_factor", 1, 65536),
                                   .placement = (ds_train_bn_placement)rd_int(&sub, "placement", 0, 2),
                                   .act = (int32_t)rd_int(&sub, "act", 0, 64),
                                   .init = (ds_train_bn_init)rd_int(&sub, "init", 0, 2),
                                   .scaling = (float)rd_num(&sub, "scaling", 1e-9, 1e4)};
        if (r->ok && !sub.ok) rd_fail(r, "bn");
    }
    j->kind = (ds_adapter_kind)kind;
    j->from_adapter = rd_bool(r, "from_adapter");
    j->valid_len = rd_bool(r, "has_validation"); /* a flag until the data is loaded */
    I->created_at = rd_int(r, "created_at", 0, 1e15);
    I->finished_at = rd_int(r, "finished_at", 0, 1e15);
    I->trained_tokens = rd_int(r, "trained_tokens", 0, 1e15);
    I->step = rd_int(r, "step", 0, 1e12);
    I->total_steps = rd_int(r, "total_steps", 0, 1e12);
    I->n_epochs = (int32_t)rd_int(r, "n_epochs", 0, 1e6);
    I->batch_size = (int32_t)rd_int(r, "batch_size", 0, 1e6);
    I->rank = (int32_t)rd_int(r, "rank", 1, 4096);
    I->n_virtual = (int32_t)rd_int(r, "n_virtual", 1, 1e5);
    I->targets = (uint32_t)rd_int(r, "targets", 1, 4294967295.0);
    I->use_rslora = rd_bool(r, "use_rslora");
    char seed[24] = "";
    rd_str(r, "seed", seed, sizeof seed);
    char *end = NULL;
    I->seed = strtoull(seed, &end, 10);
    if (r->ok && (!seed[0] || *end)) rd_fail(r, "seed");
    I->learning_rate = (float)rd_num(r, "learning_rate", 0, 1e3);
    I->alpha = (float)rd_num(r, "alpha", 0, 1e9);
    I->lr_multiplier = (float)rd_num(r, "lr_multiplier", 0, 1e6);
    I->tokens_per_s = rd_num(r, "tokens_per_s", 0, 1e12);
    if (!isfinite(I->tokens_per_s)) I->tokens_per_s = 0;
    if (cJSON_GetObjectItemCaseSensitive(r->o, "density")) { /* diff pruning */
        const double d = rd_num(r, "density", 1e-9, 1);
        I->density = isfinite(d) ? (float)d : 0.0f;
        if (r->ok && (!(I->density > 0) || kind != DS_ADAPTER_DELTA)) rd_fail(r, "density");
        I->dp_warmup_steps = (int32_t)rd_int(r, "dp_warmup_steps", 0, 1e6);
        I->bias = rd_bool(r, "bias");
    }
    if (!r->ok) return DS_EFORMAT;
    int s = -1;
    for (int i = 0; i < 5; i++)
        if (!strcmp(status, status_names[i])) s = i;
    if (s < 0) return rd_fail(r, "status"), DS_EFORMAT;
    I->status = (ds_ft_status)s;
    if (!valid_job_id(I->id)) return rd_fail(r, "id"), DS_EFORMAT;
    if (!safe_name(I->fine_tuned_model, false)) return rd_fail(r, "fine_tuned_model"), DS_EFORMAT;
    if (!isfinite(I->learning_rate) || !isfinite(I->alpha) || !isfinite(I->lr_multiplier))
        return rd_fail(r, "learning_rate"), DS_EFORMAT;
    return 0;
}

static int parse_events(rd *top, ft_job *j) {
    const cJSON *arr = rd_get(top, "events");
    if (!cJSON_IsArray(arr)) return rd_fail(top, "events"), DS_EFORMAT;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr) {
        if (!cJSON_IsObject(e)) return rd_fail(top, "events"), DS_EFORMAT;
        rd r = {.o = e, .ok = true};
        ds_ft_event ev = {0};
        ev.seq = rd_int(&r, "seq", 1, 1e12);
        ev.created_at = rd_int(&r, "created_at", 0, 1e15);
        ev.metrics = rd_bool(&r, "metrics");
        ev.step = rd_int(&r, "step", 0, 1e12);
        ev.train_loss = rd_num(&r, "train_loss", -1e30, 1e30);
        ev.valid_loss = rd_num(&r, "valid_loss", -1e30, 1e30);
        ev.lr = (float)rd_num(&r, "lr", 0, 1e3);
        rd_str(&r, "level", ev.level, sizeof ev.level);
        rd_str(&r, "message", ev.message, sizeof ev.message);
        if (!r.ok) return rd_fail(top, "events"), DS_EFORMAT;
        if (!isfinite(ev.lr)) ev.lr = 0;
        if (DS_GROW(j->ev, j->cap_ev, j->n_ev + 1)) return DS_ENOMEM;
        j->ev[j->n_ev++] = ev;
    }
    return 0;
}

static int parse_checkpoints(rd *top, ft_job *j) {
    const cJSON *arr = rd_get(top, "checkpoints");
    if (!cJSON_IsArray(arr)) return rd_fail(top, "checkpoints"), DS_EFORMAT;
    const cJSON *c;
    cJSON_ArrayForEach(c, arr) {
        if (!cJSON_IsObject(c)) return rd_fail(top, "checkpoints"), DS_EFORMAT;
        rd r = {.o = c, .ok = true};
        ds_ft_checkpoint ck = {0};
        ck.step = rd_int(&r, "step", 0, 1e12);
        ck.created_at = rd_int(&r, "created_at", 0, 1e15);
        ck.train_loss = rd_num(&r, "train_loss", -1e30, 1e30);
        ck.valid_loss = rd_num(&r, "valid_loss", -1e30, 1e30);
        rd_str(&r, "path", ck.path, sizeof ck.path);
        if (!r.ok || !safe_name(ck.path, true)) return rd_fail(top, "checkpoints"), DS_EFORMAT;
        if (DS_GROW(j->ck, j->cap_ck, j->n_ck + 1)) return DS_ENOMEM;
        j->ck[j->n_ck++] = ck;
    }
    return 0;
}

int ft_record_parse(const char *buf, size_t len, ft_job *j, ds_err *err) {
    char why[96];
    cJSON *o = ds_json_parse_strict(buf, len, why, sizeof why); /* no NUL, nothing after the value */
    rd r = {.o = o, .ok = true};
    int st = 0;
    if (!cJSON_IsObject(o)) st = ds_err_set(err, DS_EFORMAT, "not a JSON object");
    else if (rd_int(&r, "version", 1, 1) != 1 || !r.ok) st = ds_err_set(err, DS_EFORMAT, "unknown version");
    else if ((st = parse_info(&r, j)) || (st = parse_events(&r, j)) || (st = parse_checkpoints(&r, j)))
        st = st == DS_ENOMEM ? ds_err_set(err, DS_ENOMEM, "out of memory")
                             : ds_err_set(err, DS_EFORMAT, "bad field '%s'", r.bad ? r.bad : "?");
    cJSON_Delete(o);
    return st;
}

/* ---- the job directory ------------------------------------------------------------------------ */

int ft_store_write_record(const char *data_dir, const char *id, const char *text, size_t len, ds_err *err) {
    char name[96];
    snprintf(name, sizeof name, "jobs/%s/job.json", id);
    return ds_durable_write(data_dir, name, &(ds_iovec){text, len}, 1, err);
}

int ft_store_write_data(const char *data_dir, const ft_job *j, ds_err *err) {
    char sub[80], name[96];
    snprintf(sub, sizeof sub, "jobs/%s", j->info.id);
    int st = ds_durable_mkdir(data_dir, sub, err);
    snprintf(name, sizeof name, "%s/train.jsonl", sub);
    if (!st) st = ds_durable_write(data_dir, name, &(ds_iovec){j->train, j->train_len}, 1, err);
    snprintf(name, sizeof name, "%s/valid.jsonl", sub);
    if (!st && j->valid) st = ds_durable_write(data_dir, name, &(ds_iovec){j->valid, j->valid_len}, 1, err);
    return st;
}

void ft_store_remove(const char *data_dir, const char *id) {
    char sub[80];
    snprintf(sub, sizeof sub, "jobs/%s", id);
    ds_durable_remove_dir(data_dir, sub);
}

void ft_store_drop_state(const char *data_dir, const char *id) {
    static const char *names[] = {"state.bin", "train.jsonl", "valid.jsonl"};
    for (int i = 0; i < 3; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/jobs/%s/%s", data_dir, id, names[i]);
        remove(path);
    }
}

static int read_data(const char *jdir, const char *name, char **out, size_t *len) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", jdir, name);
    ds_err err = {{0}};
    return ds_file_read_all(path, DATA_MAX, out, len, &err);
}

/* One job directory; NULL (logged) when its record cannot be used. */
static ft_job *load_job(const char *data_dir, const char *id) {
    char jdir[4200], path[4400];
    snprintf(jdir, sizeof jdir, "%s/jobs/%s", data_dir, id);
    int swept = ds_durable_sweep(jdir);
    if (swept) DS_LOGI("fine-tune %s: removed %d temporary file(s) of an interrupted write", id, swept);
    snprintf(path, sizeof path, "%s/job.json", jdir);
    struct stat st_rec;
    if (stat(path, &st_rec) != 0 && errno == ENOENT) { /* a submit interrupted before its record was written */
        DS_LOGI("fine-tune: removing jobs/%s, a submission interrupted before it was stored", id);
        ft_store_remove(data_dir, id);
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0;
    ds_err err = {{0}};
    ft_job *j = calloc(1, sizeof *j);
    int st = j ? ds_file_read_all(path, RECORD_MAX, &buf, &len, &err) : ds_err_set(&err, DS_ENOMEM, "out of memory");
    if (!st) st = ft_record_parse(buf, len, j, &err);
    if (!st && strcmp(j->info.id, id)) st = ds_err_set(&err, DS_EFORMAT, "the record's id is not its directory");
    free(buf);
    if (st) {
        ds_scrub_path(err.msg, data_dir);
        DS_LOGW("fine-tune: skipping the stored job %s: %s", id, err.msg);
        if (j) free(j->ev), free(j->ck), free(j);
        return NULL;
    }
    const bool has_valid = j->valid_len != 0;
    j->valid_len = 0;
    if (j->info.status == DS_FT_QUEUED || j->info.status == DS_FT_RUNNING) {
        if (read_data(jdir, "train.jsonl", &j->train, &j->train_len) ||
            (has_valid && read_data(jdir, "valid.jsonl", &j->valid, &j->valid_len))) {
            free(j->train), free(j->valid);
            j->train = j->valid = NULL;
            j->info.status = DS_FT_FAILED;
            snprintf(j->info.error, sizeof j->info.error, "the job's training data was lost before a restart");
            snprintf(j->info.error_code, sizeof j->info.error_code, "storage_error");
        }
    }
    return j;
}

/* Temporaries a crash left in the job's adapter directory or its checkpoints (peft_save.c writes
 * through .<name>.tmp as well). */
static void sweep_adapter(const char *adapter_root, const char *name) {
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/%s", adapter_root, name);
    int n = ds_durable_sweep(dir);
    DIR *d = opendir(dir);
    for (struct dirent *de; d && (de = readdir(d));) {
        if (strncmp(de->d_name, "checkpoint-", 11)) continue;
        char sub[4500];
        snprintf(sub, sizeof sub, "%s/%s", dir, de->d_name);
        n += ds_durable_sweep(sub);
    }
    if (d) closedir(d);
    if (n) DS_LOGI("fine-tune: removed %d temporary file(s) of an interrupted save under %s", n, name);
}

static int by_created(const void *a, const void *b) {
    const ft_job *x = *(ft_job *const *)a, *y = *(ft_job *const *)b;
    if (x->info.created_at != y->info.created_at) return x->info.created_at < y->info.created_at ? -1 : 1;
    const int64_t sx = x->n_ev ? x->ev[0].created_at : 0, sy = y->n_ev ? y->ev[0].created_at : 0;
    return sx != sy ? (sx < sy ? -1 : 1) : strcmp(x->info.id, y->info.id);
}

size_t ft_store_load(const char *data_dir, const char *adapter_root, ft_job **head) {
    *head = NULL;
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/jobs", data_dir);
    DIR *d = opendir(dir);
    if (!d) return 0;
    ft_job **v = NULL;
    size_t n = 0, cap = 0;
    for (struct dirent *de; (de = readdir(d));) {
        if (de->d_name[0] == '.') continue;
        if (!valid_job_id(de->d_name)) {
            DS_LOGW("fine-tune: ignoring jobs/%s in the data directory (not a job)", de->d_name);
            continue;
        }
        ft_job *j = load_job(data_dir, de->d_name);
        if (!j) continue;
        if (adapter_root && (j->info.status == DS_FT_QUEUED || j->info.status == DS_FT_RUNNING))
            sweep_adapter(adapter_root, j->info.fine_tuned_model);
        if (DS_GROW(v, cap, n + 1)) {
            free(j->ev), free(j->ck), free(j->train), free(j->valid), free(j);
            break;
        }
        v[n++] = j;
    }
    closedir(d);
    if (n) qsort(v, n, sizeof *v, by_created);
    for (size_t i = n; i-- > 0;) v[i]->next = *head, *head = v[i];
    free(v);
    return n;
}

/* ---- state.bin -------------------------------------------------------------------------------- */

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

typedef struct wbuf {
    unsigned char *p;
    size_t len, cap;
    bool oom;
} wbuf;

static void put(wbuf *b, const void *src, size_t n) {
    if (b->oom || (b->len + n > b->cap && DS_GROW(b->p, b->cap, b->len + n))) {
        b->oom = true;
        return;
    }
    if (src) memcpy(b->p + b->len, src, n); /* NULL: room the caller fills */
    b->len += n;
}

/* The parameters and moments are resident in the trainer's backend: a state save is one of the
 * moments they are downloaded (tr_param_io), a load one of the moments they are uploaded. */
int ft_state_save(const char *data_dir, const char *id, const ds_trainer *t, const ft_progress *p, ds_err *err) {
    wbuf b = {0};
    const uint32_t version = 1, n = (uint32_t)t->n_params;
    const int64_t ts = t->step;
    put(&b, STATE_MAGIC, 8);
    put(&b, &version, 4), put(&b, &n, 4);
    put(&b, &p->step, 8), put(&b, &p->tokens, 8), put(&b, &p->epoch, 8), put(&b, &p->batch, 8);
    put(&b, &p->t_train, 8), put(&b, &p->last_loss, 8), put(&b, &ts, 8);
    int io = 0;
    for (int32_t i = 0; i < t->n_params && !io; i++) {
        const tr_param *tp = &t->params[i];
        const uint32_t nl = (uint32_t)strlen(tp->pub.name);
        const uint64_t cnt = tp->pub.n;
        put(&b, &nl, 4), put(&b, tp->pub.name, nl), put(&b, &cnt, 8);
        for (int k = TR_VALUE; k <= TR_V && !io; k++) { /* value, m, v downloaded in place */
            const size_t at = b.len;
            put(&b, NULL, cnt * sizeof(float));
            if (!b.oom) io = tr_param_io(t, i, k, b.p + at, false);
        }
    }
    if (io) {
        free(b.p);
        return ds_err_set(err, io, "reading the training state from backend '%s' failed", t->be->iface->name);
    }
    const uint64_t sum = b.oom ? 0 : fnv1a(b.p, b.len);
    put(&b, &sum, 8);
    int st = b.oom ? ds_err_set(err, DS_ENOMEM, "out of memory") : 0;
    char name[96];
    snprintf(name, sizeof name, "jobs/%s/state.bin", id);
    if (!st) st = ds_durable_write(data_dir, name, &(ds_iovec){b.p, b.len}, 1, err);
    free(b.p);
    return st;
}

typedef struct rbuf {
    const unsigned char *p;
    size_t len, off;
} rbuf;

static bool take(rbuf *r, void *dst, size_t n) {
    if (r->len - r->off < n) return false;
    if (dst) memcpy(dst, r->p + r->off, n);
    r->off += n;
    return true;
}

int ft_state_parse(const unsigned char *buf, size_t len, ft_state_view *out, ds_err *err) {
    memset(out, 0, sizeof *out);
    if (len < 8 + 8 + 7 * 8 + 8 || memcmp(buf, STATE_MAGIC, 8))
        return ds_err_set(err, DS_EFORMAT, "not a training state (bad magic or truncated)");
    uint64_t sum;
    memcpy(&sum, buf + len - 8, 8);
    if (sum != fnv1a(buf, len - 8)) return ds_err_set(err, DS_EFORMAT, "checksum mismatch (a torn or corrupt file)");
    rbuf r = {buf, len - 8, 8};
    uint32_t version = 0, n = 0;
    take(&r, &version, 4), take(&r, &n, 4);
    if (version != 1) return ds_err_set(err, DS_EFORMAT, "unknown version %u", (unsigned)version);
    ft_progress *p = &out->p;
    take(&r, &p->step, 8), take(&r, &p->tokens, 8), take(&r, &p->epoch, 8), take(&r, &p->batch, 8);
    take(&r, &p->t_train, 8), take(&r, &p->last_loss, 8), take(&r, &out->trainer_step, 8);
    if (p->step < 0 || p->tokens < 0 || p->epoch < 0 || p->batch < 0 || out->trainer_step < 0 ||
        !(p->t_train >= 0 && p->t_train < 1e12))
        return ds_err_set(err, DS_EFORMAT, "progress out of range");
    if (n > (r.len - r.off) / 12) return ds_err_set(err, DS_EFORMAT, "too many tensors for the file's size");
    if (n && !(out->t = calloc(n, sizeof *out->t))) return ds_err_set(err, DS_ENOMEM, "out of memory");
    out->n_tensors = n;
    for (uint32_t i = 0; i < n; i++) {
        ft_state_tensor *t = &out->t[i];
        if (!take(&r, &t->name_len, 4) || t->name_len > 256 || r.len - r.off < t->name_len) goto bad;
        t->name = (const char *)r.p + r.off;
        r.off += t->name_len;
        if (!take(&r, &t->n, 8) || t->n > (r.len - r.off) / (3 * sizeof(float))) goto bad;
        t->value = r.p + r.off;
        t->m = t->value + t->n * sizeof(float);
        t->v = t->m + t->n * sizeof(float);
        r.off += 3 * t->n * sizeof(float);
    }
    if (r.off != r.len) goto bad;
    return 0;
bad:
    free(out->t);
    out->t = NULL;
    out->n_tensors = 0;
    return ds_err_set(err, DS_EFORMAT, "truncated or malformed tensor table");
}

int ft_state_load(const char *data_dir, const char *id, ds_trainer *t, ft_progress *p, ds_err *err) {
    char path[4400];
    snprintf(path, sizeof path, "%s/jobs/%s/state.bin", data_dir, id);
    FILE *f = fopen(path, "rb");
    if (!f) return DS_ENOTFOUND;
    fclose(f);
    char *buf = NULL;
    size_t len = 0;
    int st = ds_file_read_all(path, (size_t)1 << 34, &buf, &len, err);
    if (st) {
        ds_scrub_path(err->msg, data_dir);
        return st;
    }
    ft_state_view v;
    st = ft_state_parse((const unsigned char *)buf, len, &v, err);
    if (!st && v.n_tensors != (uint32_t)t->n_params)
        st = ds_err_set(err, DS_EFORMAT, "the state has %u tensors, the job's adapter %d", (unsigned)v.n_tensors,
                        (int)t->n_params);
    for (uint32_t i = 0; !st && i < v.n_tensors; i++) {
        const tr_param *tp = &t->params[i];
        if (v.t[i].n != tp->pub.n || v.t[i].name_len != strlen(tp->pub.name) ||
            memcmp(v.t[i].name, tp->pub.name, v.t[i].name_len))
            st = ds_err_set(err, DS_EFORMAT, "tensor %u of the state does not match the job's adapter", (unsigned)i);
    }
    for (uint32_t i = 0; !st && i < v.n_tensors; i++) {
        const unsigned char *src[3] = {v.t[i].value, v.t[i].m, v.t[i].v};
        for (int k = TR_VALUE; k <= TR_V && !st; k++) /* uploaded straight from the file's bytes */
            if ((st = tr_param_io(t, (int32_t)i, k, (void *)src[k], true)))
                ds_err_set(err, st, "writing the training state to backend '%s' failed", t->be->iface->name);
    }
    if (!st) {
        t->step = v.trainer_step;
        *p = v.p;
    }
    free(v.t);
    free(buf);
    return st;
}
