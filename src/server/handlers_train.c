/* POST /v1/adapters/{id}/train — a small synchronous online update of an existing adapter:
 *   {"examples": [{"messages":[...]} | {"prompt","completion"}, ...] (1..256),
 *    "n_epochs"?: 1..100 (default 1), "learning_rate"?: (0, 10], "batch_size"?: 1..64}
 * It runs as a fine-tuning job that continues the adapter and publishes it under the SAME id (a new
 * version: running requests keep the old one), and answers when the job ends:
 *   200 {"object":"adapter.train","id","version","job":{fine_tuning.job}}
 * or the job's error. The request stays open while the job trains on the engine thread. */
#include "server/handlers.h"

#include "ds/adapter.h"
#include "ds/train.h"

#include <cjson/cJSON.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EP_TRAIN "/v1/adapters/{id}/train"
#define MAX_EXAMPLES 256

typedef struct sync_train {
    uv_timer_t timer;
    ds_http_req *req; /* NULL once answered */
    ds_ft_manager *mgr;
    ds_adapter_registry *reg;
    char job[48], adapter[128];
} sync_train;

static void on_closed(uv_handle_t *h) { free(h->data); }

static void finish(sync_train *x) {
    uv_timer_stop(&x->timer);
    uv_close((uv_handle_t *)&x->timer, on_closed);
}

/* Answers from the job's final state. */
static void answer(sync_train *x, const ds_ft_job_info *info) {
    ds_http_req *req = x->req;
    x->req = NULL;
    if (info->status != DS_FT_SUCCEEDED) {
        int status = info->status == DS_FT_CANCELLED ? 409 : 400;
        ds_server_reply_errorf(req, EP_TRAIN, status, NULL, info->error_code[0] ? info->error_code : NULL,
                               "training %s: %s", ds_ft_status_name(info->status),
                               info->error[0] ? info->error : "no detail");
        return;
    }
    ds_adapter_info ai;
    uint32_t version = ds_registry_info(x->reg, x->adapter, &ai) == DS_OK ? ai.version : 0;
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"adapter.train\",\"id\":");
    ds_sb_json_str(&b, x->adapter, strlen(x->adapter));
    ds_sb_printf(&b, ",\"version\":%u,\"job\":", version);
    ds_handlers_ft_job_json(&b, info);
    ds_sb_puts(&b, "}");
    ds_server_reply_json(req, EP_TRAIN, 200, &b);
}

static void poll_job(uv_timer_t *t) {
    sync_train *x = t->data;
    ds_ft_job_info info;
    if (ds_ft_get(x->mgr, x->job, &info) != DS_OK) {
        memset(&info, 0, sizeof info);
        info.status = DS_FT_FAILED;
        snprintf(info.error, sizeof info.error, "the job disappeared");
    }
    if (info.status == DS_FT_QUEUED || info.status == DS_FT_RUNNING) {
        /* A shutdown stops the job at its next step (ds_ft_manager_stop; it resumes at the next
         * start): end the request now rather than hold the drain until it times out. */
        if (!x->req || !ds_server_draining(ds_server_of(x->req))) return;
        ds_http_req *req = x->req;
        x->req = NULL;
        ds_server_reply_errorf(req, EP_TRAIN, 503, NULL, NULL,
                               "the server is shutting down: job %s stops at its next step and resumes when the "
                               "server starts again", x->job);
        finish(x);
        return;
    }
    if (x->req) answer(x, &info);
    finish(x);
}

/* Client gone or server closing: the job goes on (it publishes when done); the request ends now. */
static void on_abort(ds_http_req *req, void *ud) {
    sync_train *x = ud;
    if (!x->req) return;
    x->req = NULL;
    ds_server_reply_errorf(req, EP_TRAIN, 503, NULL, NULL, "the request ended before training finished (job %s)",
                           x->job);
    finish(x);
}

/* Examples → JSONL text (caller frees). NULL after answering 400. */
static char *examples_jsonl(ds_http_req *req, const cJSON *ex, size_t *len) {
    int n = cJSON_IsArray(ex) ? cJSON_GetArraySize(ex) : -1;
    if (n < 1 || n > MAX_EXAMPLES) {
        ds_server_reply_errorf(req, EP_TRAIN, 400, "examples", NULL, "'examples' must be an array of 1..%d examples",
                               MAX_EXAMPLES);
        return NULL;
    }
    ds_sb b;
    ds_sb_init(&b);
    const cJSON *it;
    cJSON_ArrayForEach(it, ex) {
        char *line = cJSON_PrintUnformatted(it);
        if (line) ds_sb_puts(&b, line), ds_sb_puts(&b, "\n");
        free(line);
    }
    ds_err err = {{0}};
    if (!b.data || ds_ft_data_check(b.data, b.len, &err) <= 0) {
        ds_server_reply_errorf(req, EP_TRAIN, 400, "examples", NULL, "%s", b.data ? err.msg : "out of memory");
        ds_sb_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data;
}

/* Optional integer / number fields; false after answering 400. */
static bool opt_num(ds_http_req *req, const cJSON *o, const char *key, double lo, double hi, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) return true;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi)) {
        ds_server_reply_errorf(req, EP_TRAIN, 400, key, NULL, "'%s' must be a number in [%g, %g]", key, lo, hi);
        return false;
    }
    *out = v->valuedouble;
    return true;
}

/* The adapter's kind → job method; false after answering 404/400. */
static bool adapter_method(ds_http_req *req, ds_adapter_registry *reg, const char *id, ds_ft_job_spec *sp) {
    ds_adapter_entry *e = reg ? ds_registry_acquire(reg, id) : NULL;
    if (!e) {
        ds_server_reply_errorf(req, EP_TRAIN, 404, "id", "model_not_found", "The adapter `%s` does not exist.", id);
        return false;
    }
    sp->kind = e->adapter->kind;
    const bool ah_prefix = e->adapter->prefix_pos0; /* AdapterHub's prefix: its own positions, no trainer */
    const bool bitfit = e->adapter->kind == DS_ADAPTER_DELTA && !e->adapter->delta; /* bias deltas only */
    char type[sizeof e->adapter->peft_type];
    snprintf(type, sizeof type, "%s", e->adapter->peft_type);
    ds_registry_release(reg, e);
    sp->method = sp->kind == DS_ADAPTER_LORA ? "lora" : sp->kind == DS_ADAPTER_PROMPT ? "prompt_tuning"
               : sp->kind == DS_ADAPTER_PREFIX && !ah_prefix ? "prefix_tuning" : bitfit ? "bitfit"
               : sp->kind == DS_ADAPTER_BOTTLENECK && !ah_prefix ? "bottleneck" : NULL; /* MAM: no trainer */
    if (!sp->method) ds_server_reply_errorf(req, EP_TRAIN, 400, "id", NULL, "adapter `%s` (%s) is not trainable", id, type);
    return sp->method != NULL;
}

static bool start_job(ds_http_req *req, ds_server *s, const char *id, const cJSON *o, sync_train *x) {
    ds_ft_job_spec sp = {.model = id, .from_adapter = true, .fine_tuned_model = id, .training_file = "inline"};
    double epochs = 1, lr = 0, bs = 0;
    if (!opt_num(req, o, "n_epochs", 1, 100, &epochs) || !opt_num(req, o, "learning_rate", 1e-9, 10, &lr) ||
        !opt_num(req, o, "batch_size", 1, 64, &bs) || !adapter_method(req, ds_server_registry(s), id, &sp))
        return false;
    size_t len = 0;
    char *data = examples_jsonl(req, cJSON_GetObjectItemCaseSensitive(o, "examples"), &len);
    if (!data) return false;
    sp.train_data = data, sp.train_len = len;
    sp.n_epochs = (int32_t)epochs, sp.learning_rate = (float)lr, sp.batch_size = (int32_t)bs;
    ds_err err = {{0}};
    ds_ft_manager *mgr = ds_server_ft_manager(s);
    if (!mgr) ds_err_set(&err, DS_EUNSUPPORTED, "no model is loaded");
    int st = mgr ? ds_ft_submit(mgr, &sp, x->job, &err) : DS_EUNSUPPORTED;
    free(data); /* the job copied it */
    if (st != DS_OK) {
        ds_server_reply_errorf(req, EP_TRAIN, !mgr ? 503 : st == DS_EIO ? 500 : 400, NULL,
                               st == DS_EIO ? "storage_error" : NULL, "%s", err.msg);
        return false;
    }
    x->mgr = mgr;
    return true;
}

static void handle_adapter_train(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    if (req->n_params < 1 || strlen(req->params[0]) >= 128) {
        ds_server_reply_errorf(req, EP_TRAIN, 400, "id", NULL, "malformed adapter id in the path");
        return;
    }
    cJSON *o = ds_server_json_object(req, EP_TRAIN);
    if (!o) return;
    sync_train *x = calloc(1, sizeof *x);
    if (!x) {
        ds_server_reply_errorf(req, EP_TRAIN, 503, NULL, NULL, "out of memory");
        cJSON_Delete(o);
        return;
    }
    snprintf(x->adapter, sizeof x->adapter, "%s", req->params[0]);
    x->reg = ds_server_registry(s);
    bool ok = start_job(req, s, x->adapter, o, x);
    cJSON_Delete(o);
    if (!ok) {
        free(x);
        return;
    }
    x->req = req;
    x->timer.data = x;
    uv_timer_init(ds_http_req_server(req)->loop, &x->timer);
    uv_timer_start(&x->timer, poll_job, 50, 50);
    ds_http_req_on_abort(req, on_abort, x);
}

static const ds_route routes[] = {
    {HTTP_POST, EP_TRAIN, handle_adapter_train, NULL, 0},
};
const ds_route_table ds_handlers_train_routes = {routes, sizeof routes / sizeof routes[0]};
