/* The OpenAI fine-tuning job endpoints (README.md, "Fine-tuning"):
 *   POST|GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id}, POST …/{id}/cancel,
 *   GET …/{id}/events, GET …/{id}/checkpoints.
 *
 * A job names uploaded files (handlers_files.c) and is handed to the server's fine-tuning job
 * manager (src/train/jobs.c), created with the server: one job at a time, whose training steps run
 * on the engine thread between inference steps within --train-budget.
 *
 * Threading: loop thread only, but for ds_ft_submit, which stores the job under the data directory
 * and so runs on a libuv worker (the manager is thread-safe). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <llhttp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds/server.h"
#include "ds/train.h"
#include "server/file_store.h"
#include "server/handlers.h"

#define EP_JOBS "/v1/fine_tuning/jobs"
#define EP_JOB "/v1/fine_tuning/jobs/{id}"
#define EP_CANCEL "/v1/fine_tuning/jobs/{id}/cancel"
#define EP_EVENTS "/v1/fine_tuning/jobs/{id}/events"
#define EP_CKPTS "/v1/fine_tuning/jobs/{id}/checkpoints"

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
    } else if (!strcmp(j->method, "diff_pruning")) {
        ds_sb_puts(&hp, ",\"density\":");
        ds_sb_json_num(&hp, j->density);
        if (j->dp_warmup_steps > 0) ds_sb_printf(&hp, ",\"warmup_steps\":%d", (int)j->dp_warmup_steps);
        else ds_sb_puts(&hp, ",\"warmup_steps\":\"auto\"");
        ds_sb_puts(&hp, j->bias ? ",\"bias\":true,\"target_modules\":" : ",\"bias\":false,\"target_modules\":");
        targets_json(&hp, j->targets);
    } else if (!strcmp(j->method, "bottleneck")) {
        ds_handlers_ft_bn_json(&hp, &j->bn); /* handlers_ft_bn.c */
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

void ds_handlers_ft_job_json(ds_sb *b, const ds_ft_job_info *j) { job_json(b, j); }

/* 'model' is a non-empty string (checked before the files, the rest of it after them). */
static bool model_given(ds_http_req *req, const cJSON *o) {
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(o, "model");
    if (cJSON_IsString(model) && model->valuestring[0]) return true;
    ds_server_reply_errorf(req, EP_JOBS, 400, "model", NULL, "'model' is required (a string)");
    return false;
}

/* training_file (required) and validation_file (optional) as stored files. False after answering. */
static bool parse_files(ds_http_req *req, ds_file_store *fs, const cJSON *o, const ds_file **train,
                        const ds_file **valid) {
    const cJSON *tf = cJSON_GetObjectItemCaseSensitive(o, "training_file");
    const cJSON *vf = cJSON_GetObjectItemCaseSensitive(o, "validation_file");
    if (!cJSON_IsString(tf) || !tf->valuestring[0]) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "training_file", NULL, "'training_file' is required (a file id)");
        return false;
    }
    if (!(*train = ds_file_store_find(fs, tf->valuestring))) {
        ds_server_reply_errorf(req, EP_JOBS, 404, "training_file", "file_not_found", "No such File object: %s",
                               tf->valuestring);
        return false;
    }
    *valid = NULL;
    if (vf && !cJSON_IsNull(vf) && (!cJSON_IsString(vf) || !(*valid = ds_file_store_find(fs, vf->valuestring)))) {
        ds_server_reply_errorf(req, EP_JOBS, 404, "validation_file", "file_not_found", "No such File object: %s",
                               cJSON_IsString(vf) ? vf->valuestring : "(not a string)");
        return false;
    }
    return true;
}

/* model (the base, or a loaded adapter to continue), the new adapter's name (ft-<suffix>, or a random
 * one: written to name[128]) and the seed. False after answering. */
static bool parse_model(ds_http_req *req, ds_server *s, const cJSON *o, ds_ft_job_spec *sp, char name[128]) {
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(o, "model");
    const cJSON *suffix = cJSON_GetObjectItemCaseSensitive(o, "suffix");
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(o, "seed");
    if (!model_given(req, o)) return false;
    sp->model = model->valuestring;
    if (!ds_server_is_base_name(s, model->valuestring)) {
        ds_adapter_info info;
        if (ds_registry_info(ds_server_registry(s), model->valuestring, &info) != DS_OK) {
            ds_server_reply_errorf(req, EP_JOBS, 404, "model", "model_not_found",
                                   "The model `%s` does not exist (give the base model or a loaded adapter).",
                                   model->valuestring);
            return false;
        }
        sp->from_adapter = true;
    }
    if (suffix && !cJSON_IsNull(suffix)) {
        if (!cJSON_IsString(suffix) || !valid_suffix(suffix->valuestring)) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "suffix", NULL,
                                   "'suffix' must be 1-64 characters of [A-Za-z0-9._-]");
            return false;
        }
        snprintf(name, 128, "ft-%s", suffix->valuestring);
    } else {
        snprintf(name, 128, "ft-%08llx", (unsigned long long)(ds_server_random(s) & 0xffffffffu));
    }
    if (ds_server_is_base_name(s, name)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "suffix", NULL, "'%s' is the base model's name", name);
        return false;
    }
    sp->fine_tuned_model = name;
    if (seed && !cJSON_IsNull(seed)) {
        if (!cJSON_IsNumber(seed) || seed->valuedouble < 0 || seed->valuedouble != floor(seed->valuedouble)) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "seed", NULL, "'seed' must be a non-negative integer");
            return false;
        }
        sp->seed = (uint64_t)seed->valuedouble;
    } else {
        sp->seed = ds_server_random(s) & 0x7fffffffu;
    }
    return true;
}

/* method {type, <type>: {hyperparameters}}: the adapter kind, and the hyperparameters object to
 * read (*hp: the method's, else the legacy top-level one). False after answering. */
static bool parse_method(ds_http_req *req, const cJSON *o, ds_ft_job_spec *sp, const cJSON **hp) {
    const cJSON *method = cJSON_GetObjectItemCaseSensitive(o, "method");
    *hp = cJSON_GetObjectItemCaseSensitive(o, "hyperparameters"); /* legacy, top level */
    sp->method = "supervised";
    sp->kind = DS_ADAPTER_LORA;
    if (method && !cJSON_IsNull(method)) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(method, "type");
        if (!cJSON_IsObject(method) || !cJSON_IsString(type)) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "method", NULL, "'method' must be an object with a 'type'");
            return false;
        }
        const char *t = type->valuestring;
        ds_err err = {{0}};
        if (!strcmp(t, "supervised")) {
            sp->method = "supervised";
        } else if (!strcmp(t, "dpo") || !strcmp(t, "reinforcement")) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "method.type", "unsupported",
                                   "method '%s' is not supported: supervised, lora, prompt_tuning, prefix_tuning, bitfit, "
                                   "diff_pruning or bottleneck",
                                   t);
            return false;
        } else if (ds_train_kind_parse(t, &sp->kind, &err) != DS_OK) {
            ds_server_reply_errorf(req, EP_JOBS, 400, "method.type", NULL, "%s", err.msg);
            return false;
        } else {
            sp->method = sp->kind == DS_ADAPTER_LORA     ? "lora"
                         : sp->kind == DS_ADAPTER_PROMPT ? "prompt_tuning"
                         : sp->kind == DS_ADAPTER_DELTA  ? (ds_train_method_is_diff_pruning(t) ? "diff_pruning" : "bitfit")
                         : sp->kind == DS_ADAPTER_BOTTLENECK ? "bottleneck"
                                                         : "prefix_tuning";
        }
        const cJSON *sub = cJSON_GetObjectItemCaseSensitive(method, t);
        const cJSON *mhp = cJSON_IsObject(sub) ? cJSON_GetObjectItemCaseSensitive(sub, "hyperparameters") : NULL;
        if (mhp) *hp = mhp;
    }
    if (*hp && !cJSON_IsObject(*hp)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "hyperparameters", NULL, "'hyperparameters' must be an object");
        return false;
    }
    return true;
}

/* Diff pruning's hyperparameters: density (fraction kept, (0, 1], default 0.01), warmup_steps (dense
 * steps before the mask; default a quarter of the job), bias, and target_modules (required:
 * projections only). False after answering. */
static bool parse_dp(ds_http_req *req, const cJSON *hp, ds_ft_job_spec *sp) {
    sp->density = 0.01f;
    if (!hp_float(req, hp, "density", 0, 1, &sp->density) || !hp_int(req, hp, "warmup_steps", 1, 1000000, &sp->dp_warmup_steps))
        return false;
    const cJSON *bias = hp ? cJSON_GetObjectItemCaseSensitive(hp, "bias") : NULL;
    if (bias && !cJSON_IsBool(bias) && !cJSON_IsNull(bias)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "bias", NULL, "'bias' must be a boolean");
        return false;
    }
    sp->bias = cJSON_IsTrue(bias);
    if (!sp->targets || (sp->targets & ~DS_TRAIN_TARGET_ALL_LINEAR)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "target_modules", NULL,
                               "diff_pruning needs 'target_modules': projections among q,k,v,o,gate,up,down_proj "
                               "or \"all-linear\" (its dense warm-up holds a full-size delta of each)");
        return false;
    }
    if (sp->from_adapter) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "model", NULL,
                               "diff_pruning trains a new delta: give the base model, not an adapter");
        return false;
    }
    return true;
}

/* The hyperparameters (OpenAI's names plus PEFT's: r, lora_alpha, target_modules, use_rslora,
 * num_virtual_tokens; diff pruning's: parse_dp). False after answering. */
static bool parse_hyperparameters(ds_http_req *req, const cJSON *hp, ds_ft_job_spec *sp) {
    int32_t r = 0;
    if (!hp_int(req, hp, "n_epochs", 1, 1000, &sp->n_epochs) || !hp_int(req, hp, "batch_size", 1, 256, &sp->batch_size) ||
        !hp_float(req, hp, "learning_rate_multiplier", 0, 1000, &sp->lr_multiplier) ||
        !hp_float(req, hp, "learning_rate", 0, 10, &sp->learning_rate) || !hp_int(req, hp, "rank", 1, 1024, &sp->rank) ||
        !hp_int(req, hp, "r", 1, 1024, &r) || !hp_float(req, hp, "alpha", 0, 1e6, &sp->alpha) ||
        !hp_float(req, hp, "lora_alpha", 0, 1e6, &sp->alpha) || !hp_targets(req, hp, &sp->targets) ||
        !hp_int(req, hp, "num_virtual_tokens", 1, 512, &sp->n_virtual))
        return false;
    if (r && !sp->rank) sp->rank = r;
    const cJSON *rs = hp ? cJSON_GetObjectItemCaseSensitive(hp, "use_rslora") : NULL;
    if (rs && !cJSON_IsBool(rs) && !cJSON_IsNull(rs)) {
        ds_server_reply_errorf(req, EP_JOBS, 400, "use_rslora", NULL, "'use_rslora' must be a boolean");
        return false;
    }
    sp->use_rslora = cJSON_IsTrue(rs);
    if (!strcmp(sp->method, "diff_pruning")) return parse_dp(req, hp, sp);
    return sp->kind != DS_ADAPTER_BOTTLENECK || ds_handlers_ft_bn_parse(req, hp, &sp->bn); /* handlers_ft_bn.c */
}

/* A job being submitted: ds_ft_submit stores it under the data directory (data, record, fsync),
 * so it runs on a libuv worker and the loop keeps serving; the request ends in submit_done. */
typedef struct submit_job {
    uv_work_t work;
    ds_http_req *req;
    ds_ft_manager *mgr;
    cJSON *body;
    ds_ft_job_spec sp;
    char name[128], train_id[48], valid_id[48], id[48];
    char *train, *valid;
    int status;
    ds_err err;
} submit_job;

static void submit_free(submit_job *j) {
    cJSON_Delete(j->body);
    free(j->train), free(j->valid), free(j);
}

static void submit_work(uv_work_t *w) {
    submit_job *j = w->data;
    j->status = ds_ft_submit(j->mgr, &j->sp, j->id, &j->err);
}

static void submit_done(uv_work_t *w, int uv_status) {
    submit_job *j = w->data;
    if (uv_status) j->status = ds_err_set(&j->err, DS_ECANCELED, "the submission was cancelled");
    if (j->status != DS_OK) { /* DS_EIO: the data directory is full or unwritable; the server goes on */
        ds_server_reply_errorf(j->req, EP_JOBS, j->status == DS_EIO || j->status == DS_ECANCELED ? 500 : 400, NULL,
                               j->status == DS_EIO ? "storage_error" : NULL, "%s", j->err.msg);
    } else {
        ds_ft_job_info info;
        ds_ft_get(j->mgr, j->id, &info);
        ds_sb b;
        ds_sb_init(&b);
        job_json(&b, &info);
        ds_server_reply_json(j->req, EP_JOBS, 200, &b);
    }
    submit_free(j);
}

/* A request with several problems hears about the first in this order: model given, files, model
 * known, suffix, seed, method, hyperparameters. */
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
    cJSON *o = ds_server_json_object(req, EP_JOBS);
    if (!o) return;
    submit_job *j = calloc(1, sizeof *j);
    const ds_file *train, *valid;
    const cJSON *hp;
    if (!j) {
        cJSON_Delete(o);
        ds_server_reply_errorf(req, EP_JOBS, 500, NULL, NULL, "out of memory");
        return;
    }
    ds_ft_job_spec *sp = &j->sp;
    j->body = o; /* the spec's strings point into it, j->name and the copies below until the job is stored */
    if (!model_given(req, o) || !parse_files(req, ds_server_files(s), o, &train, &valid) ||
        !parse_model(req, s, o, sp, j->name) || !parse_method(req, o, sp, &hp) || !parse_hyperparameters(req, hp, sp)) {
        submit_free(j);
        return;
    }
    /* Copies: a file may be deleted while the job is being stored. */
    snprintf(j->train_id, sizeof j->train_id, "%s", train->id);
    snprintf(j->valid_id, sizeof j->valid_id, "%s", valid ? valid->id : "");
    j->train = malloc(train->bytes + 1);
    j->valid = valid ? malloc(valid->bytes + 1) : NULL;
    j->mgr = ds_server_ft_manager(s);
    if (!j->mgr || !j->train || (valid && !j->valid)) {
        ds_server_reply_errorf(req, EP_JOBS, j->mgr ? 500 : 503, NULL, NULL, "%s",
                               j->mgr ? "out of memory" : "no model is loaded");
        submit_free(j);
        return;
    }
    memcpy(j->train, train->data, train->bytes);
    sp->training_file = j->train_id;
    sp->train_data = j->train, sp->train_len = train->bytes;
    if (valid) {
        memcpy(j->valid, valid->data, valid->bytes);
        sp->validation_file = j->valid_id, sp->valid_data = j->valid, sp->valid_len = valid->bytes;
    }
    j->req = req;
    j->work.data = j;
    if (uv_queue_work(ds_server_http(s)->loop, &j->work, submit_work, submit_done) != 0) {
        ds_server_reply_errorf(req, EP_JOBS, 500, NULL, NULL, "cannot queue the job");
        submit_free(j);
    }
}

static void handle_job_list(ds_http_req *req, void *ud) {
    (void)ud;
    ds_ft_manager *mgr = ds_server_ft_manager(ds_server_of(req));
    ds_ft_job_info *jobs = NULL;
    size_t n = 0;
    if (mgr && ds_ft_list(mgr, &jobs, &n) != DS_OK) n = 0;
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
    if (!ds_server_path_id(req, ep, id, cap)) return NULL;
    ds_ft_manager *mgr = ds_server_ft_manager(ds_server_of(req));
    if (!mgr || ds_ft_get(mgr, id, info) != DS_OK) {
        ds_server_reply_errorf(req, ep, 404, "fine_tuning_job_id", "fine_tuning_job_not_found",
                               "Could not find fine tune job: %s", id);
        return NULL;
    }
    return mgr;
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
    {HTTP_POST, EP_JOBS, handle_job_create, NULL, 0},
    {HTTP_GET, EP_JOBS, handle_job_list, NULL, 0},
    {HTTP_GET, EP_JOB, handle_job_get, NULL, 0},
    {HTTP_POST, EP_CANCEL, handle_job_cancel, NULL, 0},
    {HTTP_GET, EP_EVENTS, handle_job_events, NULL, 0},
    {HTTP_GET, EP_CKPTS, handle_job_checkpoints, NULL, 0},
};
const ds_route_table ds_handlers_ft_routes = {routes, sizeof routes / sizeof routes[0]};
