/* /v1/models and the runtime adapter endpoints: vLLM's load_lora_adapter / unload_lora_adapter
 * and a REST view (/v1/adapters). Loads read and validate files, which can take a while for
 * large adapters — or forever on a file system that stops answering — so each runs on its own
 * detached thread (not libuv's small worker pool, which a stuck read would hold) while the loop
 * keeps serving, and has a deadline (--adapter-load-timeout): past it the request is answered 504
 * and the load, whenever it ends, publishes nothing (ds_registry_load_claim). The registry is
 * thread-safe and confines every path to --adapter-dir.
 *
 * Status codes (README.md "Adapters at run time"; vLLM's where it has one): missing/mistyped field 400; name already
 * loaded 400 (vLLM) / 409 (REST); adapter path missing 404; path outside --adapter-dir 403;
 * malformed or incompatible adapter 400; unknown name on unload / GET / DELETE 404. */
#include <cjson/cJSON.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <time.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds/adapter.h"
#include "ds/server.h"
#include "server/handlers.h"
#include "server/openai_req.h"

#define EP_LOAD "/v1/load_lora_adapter"
#define EP_UNLOAD "/v1/unload_lora_adapter"
#define EP_ADAPTERS "/v1/adapters"
#define EP_ADAPTER "/v1/adapters/{id}"
#define EP_MODELS "/v1/models"

/* ---- helpers ------------------------------------------------------------------------------- */

/* `abs` relative to the adapter root (what clients gave us), or abs itself when outside it. */
static const char *relative_path(const char *root_real, const char *abs) {
    size_t n = root_real ? strlen(root_real) : 0;
    if (n && !strncmp(abs, root_real, n) && abs[n] == '/') return abs + n + 1;
    return abs;
}

static char *root_realpath(struct ds_adapter_registry *reg) {
    const char *root = reg ? ds_registry_root(reg) : NULL;
    return root ? realpath(root, NULL) : NULL;
}

static void adapter_json(ds_sb *b, const ds_adapter_info *a, const char *root_real) {
    ds_sb_puts(b, "{\"id\":");
    ds_sb_json_str(b, a->name, strlen(a->name));
    ds_sb_printf(b, ",\"object\":\"adapter\",\"version\":%u,\"peft_type\":", a->version);
    ds_sb_json_str(b, a->peft_type, strlen(a->peft_type));
    const char *rel = relative_path(root_real, a->path);
    ds_sb_puts(b, ",\"path\":");
    ds_sb_json_str(b, rel, strlen(rel));
    ds_sb_printf(b, ",\"bytes\":%zu,\"created\":%lld,\"refs\":%d,\"load_ms\":", a->host_bytes, (long long)a->created,
                 (int)a->refs);
    ds_sb_json_num(b, a->load_ms);
    ds_sb_puts(b, "}");
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes %XX escapes of a path segment into out (NUL-terminated). False when malformed, when
 * it decodes to a NUL, or when it does not fit. */
static bool url_decode(const char *in, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; in[i]; i++) {
        int c = (unsigned char)in[i];
        if (c == '%') {
            int hi = hex_digit(in[i + 1]), lo = hi < 0 ? -1 : hex_digit(in[i + 2]);
            if (lo < 0 || (hi | lo) == 0) return false;
            c = hi * 16 + lo;
            i += 2;
        }
        if (o + 1 >= cap) return false;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return true;
}

/* Removes "<root>/" from a message in place: clients gave relative paths and need not learn
 * where the adapter directory lives on the server. */
static void strip_root(char *msg, const char *root_real) {
    size_t n = root_real ? strlen(root_real) : 0;
    char *p;
    while (n && (p = strstr(msg, root_real)) && p[n] == '/') memmove(p, p + n + 1, strlen(p + n + 1) + 1);
}

/* Maps a registry status to the HTTP answer. */
static int load_status_http(int st, bool vllm) {
    switch (st) {
    case DS_EBUSY: return vllm ? 400 : 409;
    case DS_ENOTFOUND: return 404;
    case DS_EPERM: return 403;
    case DS_ENOMEM: return 500;
    default: return 400; /* DS_EINVAL (name), DS_EFORMAT / DS_EUNSUPPORTED / DS_EIO (adapter files) */
    }
}

/* ---- /v1/models ---------------------------------------------------------------------------- */

static void handle_models(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    const ds_server_params *p = ds_server_get_params(s);
    struct ds_adapter_registry *reg = ds_server_registry(s);
    ds_adapter_info *info = NULL;
    size_t n = 0;
    if (reg && ds_registry_list(reg, &info, &n) != DS_OK) n = 0;
    ds_oai_model_entry *m = calloc(n + 1, sizeof *m);
    char *root_real = root_realpath(reg);
    if (!m) {
        free(info), free(root_real);
        ds_server_reply_errorf(req, EP_MODELS, 500, NULL, NULL, "out of memory");
        return;
    }
    int32_t ctx = ds_server_max_ctx(s);
    m[0] = (ds_oai_model_entry){.id = p->served_model_name, .created = ds_server_created(s), .max_model_len = ctx};
    for (size_t i = 0; i < n; i++)
        m[i + 1] = (ds_oai_model_entry){.id = info[i].name, .created = (int64_t)info[i].created,
                                        .root = relative_path(root_real, info[i].path),
                                        .parent = p->served_model_name, .max_model_len = ctx};
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_models_json(&b, m, n + 1);
    free(m), free(info), free(root_real);
    ds_server_reply_json(req, EP_MODELS, 200, &b);
}

/* ---- loads (worker thread) ------------------------------------------------------------------ */

#define MAX_LOADS 16 /* load threads alive at once, stuck ones included; more get 503 */

/* Load threads alive (process-wide: one server per process). Loop thread increments, load
 * threads decrement as their last act. */
static int g_loads;

typedef struct load_job {
    ds_http_task task;  /* the thread's completion, posted to the loop */
    uv_timer_t timer;   /* the deadline */
    ds_http_req *req;   /* NULL once answered */
    ds_server *srv;
    struct ds_adapter_registry *reg;
    bool vllm;          /* vLLM endpoint: text answer; else the REST adapter object */
    bool replace, existed;
    char *name, *path;
    int claim;          /* ds_registry_load_claim: 0 loading, 1 published by the thread, 2 abandoned */
    int holds;          /* loop side: the timer handle and the pending completion (each 1) */
    double timeout_s, delay_s;
    int status;
    double seconds;
    ds_err err;
} load_job;

static void load_job_free(load_job *j) {
    free(j->name), free(j->path), free(j);
}

static void load_release(load_job *j) {
    if (--j->holds == 0) load_job_free(j);
}

static void on_timer_closed(uv_handle_t *h) { load_release(h->data); }

/* The test hook (ds_server_params.test_load_delay_s): a load of a path whose last component
 * starts with "slow" first waits this long, in slices, ending early once the load was abandoned. */
static void test_delay(load_job *j) {
    const char *base = strrchr(j->path, '/');
    base = base ? base + 1 : j->path;
    if (j->delay_s <= 0 || strncmp(base, "slow", 4)) return;
    for (double t0 = ds_time_s(); ds_time_s() - t0 < j->delay_s;) {
        if (__atomic_load_n(&j->claim, __ATOMIC_ACQUIRE) == 2) return;
        nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
    }
}

static void load_finished(ds_http_task *t);

static void *load_thread(void *arg) {
    load_job *j = arg;
    double t0 = ds_time_s();
    test_delay(j);
    j->status = ds_registry_load_claim(j->reg, j->name, j->path, j->replace, &j->claim, &j->err);
    j->seconds = ds_time_s() - t0;
    j->task.fn = load_finished;
    if (ds_http_server_post(ds_server_http(j->srv), &j->task) != 0) {
        /* the server has closed its loop: nobody waits for this answer any more (the request
         * was answered or dropped at close) */
    }
    __atomic_fetch_sub(&g_loads, 1, __ATOMIC_ACQ_REL);
    return NULL;
}

bool ds_handlers_adapters_drain(double timeout_s) {
    for (double t0 = ds_time_s(); __atomic_load_n(&g_loads, __ATOMIC_ACQUIRE) > 0;) {
        if (ds_time_s() - t0 > timeout_s) {
            DS_LOGW("server: %d adapter load(s) still blocked at exit", __atomic_load_n(&g_loads, __ATOMIC_ACQUIRE));
            return false;
        }
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
    return true;
}

static void load_reply_ok(load_job *j) {
    const char *ep = j->vllm ? EP_LOAD : EP_ADAPTERS;
    if (j->vllm) {
        ds_sb b;
        ds_sb_init(&b);
        ds_sb_printf(&b, "Success: LoRA adapter '%s' added successfully.", j->name);
        ds_server_reply(j->req, ep, 200, "text/plain; charset=utf-8", b.data ? b.data : "", b.len);
        ds_sb_free(&b);
        return;
    }
    ds_adapter_info info;
    struct ds_adapter_registry *reg = ds_server_registry(j->srv);
    if (ds_registry_info(reg, j->name, &info) != DS_OK) { /* unloaded again in the meantime */
        ds_server_reply_errorf(j->req, ep, 409, "id", NULL, "adapter '%s' was unloaded while loading", j->name);
        return;
    }
    char *root_real = root_realpath(reg);
    ds_sb b;
    ds_sb_init(&b);
    adapter_json(&b, &info, root_real);
    free(root_real);
    ds_server_reply_json(j->req, ep, j->existed ? 200 : 201, &b);
}

/* The deadline passed: answer 504 unless the thread is publishing right now. */
static void on_deadline(uv_timer_t *t) {
    load_job *j = t->data;
    int expect = 0;
    if (!__atomic_compare_exchange_n(&j->claim, &expect, 2, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return; /* published: load_finished answers */
    DS_LOGW("adapter '%s': load abandoned after %.1f s (--adapter-load-timeout)", j->name, j->timeout_s);
    ds_metrics_adapter_load(ds_server_metrics(j->srv), false);
    ds_server_reply_errorf(j->req, j->vllm ? EP_LOAD : EP_ADAPTERS, 504, j->vllm ? "lora_path" : "path", NULL,
                           "loading adapter '%s' did not finish within %.0f s (--adapter-load-timeout): the load "
                           "was abandoned and publishes nothing; is the file system slow or stuck?",
                           j->name, j->timeout_s);
    j->req = NULL;
    uv_close((uv_handle_t *)&j->timer, on_timer_closed);
}

/* Loop thread: the load thread is done (or the loop is closing with the task still queued). */
static void load_finished(ds_http_task *t) {
    load_job *j = (load_job *)((char *)t - offsetof(load_job, task));
    if (!j->req) { /* answered by the deadline: the thread's result was discarded */
        load_release(j);
        return;
    }
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, on_timer_closed);
    ds_metrics *m = ds_server_metrics(j->srv);
    ds_metrics_adapter_load(m, j->status == DS_OK);
    if (j->status == DS_OK) {
        ds_metrics_observe(m, DS_HIST_ADAPTER_LOAD, j->seconds);
        load_reply_ok(j);
    } else {
        DS_LOGI("adapter '%s': load failed: %s", j->name, j->err.msg);
        char *root_real = root_realpath(ds_server_registry(j->srv));
        strip_root(j->err.msg, root_real);
        free(root_real);
        const char *param = j->status == DS_EINVAL || j->status == DS_EBUSY ? (j->vllm ? "lora_name" : "id")
                                                                             : (j->vllm ? "lora_path" : "path");
        ds_server_reply_errorf(j->req, j->vllm ? EP_LOAD : EP_ADAPTERS, load_status_http(j->status, j->vllm), param,
                               NULL, "%s", j->err.msg);
    }
    j->req = NULL;
    load_release(j);
}

/* Queues the load; the request is ended by load_done. */
static void start_load(ds_http_req *req, ds_server *s, bool vllm, const char *name, const char *path, bool replace) {
    const char *ep = vllm ? EP_LOAD : EP_ADAPTERS;
    struct ds_adapter_registry *reg = ds_server_registry(s);
    ds_adapter_info info;
    load_job *j = calloc(1, sizeof *j);
    if (j) j->name = strdup(name), j->path = strdup(path);
    if (!j || !j->name || !j->path) {
        if (j) free(j->name), free(j->path), free(j);
        ds_server_reply_errorf(req, ep, 500, NULL, NULL, "out of memory");
        return;
    }
    j->req = req, j->srv = s, j->reg = reg, j->vllm = vllm, j->replace = replace;
    j->existed = ds_registry_info(reg, name, &info) == DS_OK;
    const ds_server_params *p = ds_server_get_params(s);
    j->timeout_s = p->adapter_load_timeout_s > 0 ? p->adapter_load_timeout_s : 60;
    j->delay_s = p->test_load_delay_s;
    if (__atomic_add_fetch(&g_loads, 1, __ATOMIC_ACQ_REL) > MAX_LOADS) {
        __atomic_fetch_sub(&g_loads, 1, __ATOMIC_ACQ_REL);
        load_job_free(j);
        ds_server_reply_errorf(req, ep, 503, NULL, NULL,
                               "%d adapter loads are in progress (or stuck on a slow file system); try again later",
                               MAX_LOADS);
        return;
    }
    pthread_attr_t attr;
    pthread_t th;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    j->holds = 2;
    uv_timer_init(ds_server_http(s)->loop, &j->timer);
    j->timer.data = j;
    uv_timer_start(&j->timer, on_deadline, (uint64_t)(j->timeout_s * 1000.0 + 0.5), 0);
    if (pthread_create(&th, &attr, load_thread, j) != 0) {
        __atomic_fetch_sub(&g_loads, 1, __ATOMIC_ACQ_REL);
        j->holds = 1; /* no completion will come */
        j->req = NULL;
        uv_close((uv_handle_t *)&j->timer, on_timer_closed);
        ds_server_reply_errorf(req, ep, 503, NULL, NULL, "cannot start the adapter load");
    }
    pthread_attr_destroy(&attr);
}

/* Checks shared by both load endpoints. Returns false after answering. */
static bool load_allowed(ds_http_req *req, ds_server *s, const char *ep, const char *name_param, const char *name) {
    if (!ds_server_registry(s)) {
        ds_server_reply_errorf(req, ep, 400, NULL, NULL,
                               "adapters are disabled: start the server with --adapter-dir DIR");
        return false;
    }
    if (ds_server_is_base_name(s, name)) {
        ds_server_reply_errorf(req, ep, 400, name_param, NULL, "'%s' is the base model's name", name);
        return false;
    }
    return true;
}

/* A required string field (non-empty). Answers 400 naming it and returns NULL otherwise. */
static const char *req_str(ds_http_req *req, const char *ep, const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) ds_server_reply_errorf(req, ep, 400, key, NULL, "'%s' is required", key);
    else if (!cJSON_IsString(v) || !v->valuestring[0])
        ds_server_reply_errorf(req, ep, 400, key, NULL, "'%s' must be a non-empty string", key);
    else return v->valuestring;
    return NULL;
}

/* An optional boolean; false after answering 400. */
static bool opt_bool(ds_http_req *req, const char *ep, const cJSON *o, const char *key, bool *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) return true;
    if (!cJSON_IsBool(v)) {
        ds_server_reply_errorf(req, ep, 400, key, NULL, "'%s' must be a boolean", key);
        return false;
    }
    *out = cJSON_IsTrue(v);
    return true;
}

/* POST /v1/load_lora_adapter {"lora_name","lora_path","load_inplace"?} */
static void handle_vllm_load(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    cJSON *o = ds_server_json_object(req, EP_LOAD);
    if (!o) return;
    bool inplace = false;
    const char *name = req_str(req, EP_LOAD, o, "lora_name");
    const char *path = name ? req_str(req, EP_LOAD, o, "lora_path") : NULL;
    if (path && opt_bool(req, EP_LOAD, o, "load_inplace", &inplace) && load_allowed(req, s, EP_LOAD, "lora_name", name))
        start_load(req, s, true, name, path, inplace);
    cJSON_Delete(o);
}

/* POST /v1/adapters {"id","path","replace"?} */
static void handle_rest_load(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    cJSON *o = ds_server_json_object(req, EP_ADAPTERS);
    if (!o) return;
    bool replace = false;
    const char *name = req_str(req, EP_ADAPTERS, o, "id");
    const char *path = name ? req_str(req, EP_ADAPTERS, o, "path") : NULL;
    if (path && opt_bool(req, EP_ADAPTERS, o, "replace", &replace) && load_allowed(req, s, EP_ADAPTERS, "id", name))
        start_load(req, s, false, name, path, replace);
    cJSON_Delete(o);
}

/* ---- unload / list / get ------------------------------------------------------------------- */

/* Retires `name`: new requests get 404, running ones finish on the version they hold. */
static int unload(ds_server *s, const char *name, ds_err *err) {
    struct ds_adapter_registry *reg = ds_server_registry(s);
    if (!reg) return ds_err_set(err, DS_ENOTFOUND, "The lora adapter '%s' cannot be found.", name);
    return ds_registry_unload(reg, name, err);
}

static void handle_vllm_unload(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    cJSON *o = ds_server_json_object(req, EP_UNLOAD);
    if (!o) return;
    const char *name = req_str(req, EP_UNLOAD, o, "lora_name");
    ds_err err = {{0}};
    if (name && unload(s, name, &err) != DS_OK) {
        ds_server_reply_errorf(req, EP_UNLOAD, 404, "lora_name", NULL, "%s", err.msg);
    } else if (name) {
        ds_sb b;
        ds_sb_init(&b);
        ds_sb_printf(&b, "Success: LoRA adapter '%s' removed successfully.", name);
        ds_server_reply(req, EP_UNLOAD, 200, "text/plain; charset=utf-8", b.data ? b.data : "", b.len);
        ds_sb_free(&b);
    }
    cJSON_Delete(o);
}

static void handle_list(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    struct ds_adapter_registry *reg = ds_server_registry(s);
    ds_adapter_info *info = NULL;
    size_t n = 0;
    if (reg && ds_registry_list(reg, &info, &n) != DS_OK) n = 0;
    char *root_real = root_realpath(reg);
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"object\":\"list\",\"data\":[");
    for (size_t i = 0; i < n; i++) {
        if (i) ds_sb_puts(&b, ",");
        adapter_json(&b, &info[i], root_real);
    }
    ds_sb_puts(&b, "]}");
    free(info), free(root_real);
    ds_server_reply_json(req, EP_ADAPTERS, 200, &b);
}

/* The {id} segment, percent-decoded; answers 400 and returns false when malformed. */
static bool path_id(ds_http_req *req, char *out, size_t cap) {
    if (req->n_params >= 1 && url_decode(req->params[0], out, cap)) return true;
    ds_server_reply_errorf(req, EP_ADAPTER, 400, "id", NULL, "malformed adapter id in the path");
    return false;
}

static void handle_get(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    struct ds_adapter_registry *reg = ds_server_registry(s);
    char id[256];
    if (!path_id(req, id, sizeof id)) return;
    ds_adapter_info info;
    if (!reg || ds_registry_info(reg, id, &info) != DS_OK) {
        ds_server_reply_errorf(req, EP_ADAPTER, 404, "id", "adapter_not_found", "The adapter `%s` does not exist.", id);
        return;
    }
    char *root_real = root_realpath(reg);
    ds_sb b;
    ds_sb_init(&b);
    adapter_json(&b, &info, root_real);
    free(root_real);
    ds_server_reply_json(req, EP_ADAPTER, 200, &b);
}

static void handle_delete(ds_http_req *req, void *ud) {
    (void)ud;
    ds_server *s = ds_server_of(req);
    char id[256];
    if (!path_id(req, id, sizeof id)) return;
    ds_err err = {{0}};
    if (unload(s, id, &err) != DS_OK) {
        ds_server_reply_errorf(req, EP_ADAPTER, 404, "id", "adapter_not_found", "The adapter `%s` does not exist.", id);
        return;
    }
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_puts(&b, "{\"id\":");
    ds_sb_json_str(&b, id, strlen(id));
    ds_sb_puts(&b, ",\"object\":\"adapter.deleted\",\"deleted\":true}");
    ds_server_reply_json(req, EP_ADAPTER, 200, &b);
}

static const ds_route routes[] = {
    {HTTP_GET, EP_MODELS, handle_models, NULL, 0},
    {HTTP_POST, EP_LOAD, handle_vllm_load, NULL, 0},
    {HTTP_POST, EP_UNLOAD, handle_vllm_unload, NULL, 0},
    {HTTP_GET, EP_ADAPTERS, handle_list, NULL, 0},
    {HTTP_POST, EP_ADAPTERS, handle_rest_load, NULL, 0},
    {HTTP_GET, EP_ADAPTER, handle_get, NULL, 0},
    {HTTP_DELETE, EP_ADAPTER, handle_delete, NULL, 0},
};
const ds_route_table ds_handlers_adapters_routes = {routes, sizeof routes / sizeof routes[0]};
