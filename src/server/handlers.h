/* deltaserve — what the endpoint handler files (handlers_*.c) share with the server facade
 * (server.c): their route tables, accessors to the server's state, and the reply path, which counts
 * every response in /metrics.
 *
 * Threading: LOOP THREAD ONLY, like every handler. */
#ifndef DS_SERVER_HANDLERS_H
#define DS_SERVER_HANDLERS_H

#include "server/http.h"
#include "server/metrics.h"
#include "server/openai_resp.h"
#include "server/router.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ds_adapter_registry;
typedef struct ds_server ds_server;
typedef struct ds_server_params ds_server_params;
typedef struct ds_engine ds_engine;

/* ---- accessors ------------------------------------------------------------------------------ */

/* The server behind a request (the ds_http_server's `user`); NULL for a bare ds_http_server. */
ds_server *ds_server_of(const ds_http_req *r);
ds_engine *ds_server_engine(const ds_server *s); /* may be NULL (no model: generation answers 503) */
/* The parameters given to ds_server_create, with the strings pointing at the server's own copies. */
const ds_server_params *ds_server_get_params(const ds_server *s);
/* The HTTP layer (its loop, for uv_queue_work and posts from other threads). */
ds_http_server *ds_server_http(ds_server *s);
/* The adapter registry given in ds_server_params (may be NULL). */
struct ds_adapter_registry *ds_server_registry(const ds_server *s);
/* Share of engine time fine-tuning may use while requests run (ds_server_params.train_budget). */
float ds_server_train_budget(const ds_server *s);
ds_metrics *ds_server_metrics(ds_server *s);
/* True once a stop began: new work is refused with 503 while in-flight requests finish. */
bool ds_server_draining(const ds_server *s);
/* Server start time (unix seconds): the `created` of /v1/models entries. */
int64_t ds_server_created(const ds_server *s);
/* The context length requests must fit in: max_model_len, else the engine model's max_ctx. */
int32_t ds_server_max_ctx(const ds_server *s);
/* ds_server_params.content_special_tokens */
bool ds_server_content_special_tokens(const ds_server *s);
/* True when `name` means the base model: the served name, the model's own (general.name) name,
 * or "base". */
bool ds_server_is_base_name(const ds_server *s, const char *name);

/* Work in flight that a stop may have to cut short (a generation): when the drain time is up the
 * server calls cancel() on each, which must make the work end soon and normally (a stream then
 * ends with an error event and [DONE] instead of a cut connection). Caller-allocated; add when the
 * work starts, remove before it is freed. */
typedef struct ds_server_job {
    struct ds_server_job *prev, *next;
    void (*cancel)(struct ds_server_job *j);
} ds_server_job;
void ds_server_job_add(ds_server *s, ds_server_job *j);
void ds_server_job_remove(ds_server *s, ds_server_job *j);

/* The uploaded files (/v1/files), created with the server. */
struct ds_file_store *ds_server_files(ds_server *s);
/* The fine-tuning job manager, created with the server when it has an engine (NULL otherwise: no
 * model, nothing to fine-tune); freed by ds_server_free, which joins its training thread. */
struct ds_ft_manager *ds_server_ft_manager(ds_server *s);
/* 64 random bits for names and seeds (splitmix64 over a per-server seed; not cryptographic). */
uint64_t ds_server_random(ds_server *s);

/* ---- route tables (static, one per handler file; server.c looks them up in this order) -------- */

extern const ds_route_table ds_handlers_gen_routes;      /* /v1/completions, /v1/chat/completions */
extern const ds_route_table ds_handlers_adapters_routes; /* /v1/models, vLLM load/unload, /v1/adapters */
/* Waits up to timeout_s for the adapter load threads still alive (a stuck one ignores its
 * deadline). True when none is left; false: one may still touch the server, which must then not be
 * freed. After the loop has closed; any thread. */
bool ds_handlers_adapters_drain(double timeout_s);
extern const ds_route_table ds_handlers_files_routes;    /* /v1/files */
extern const ds_route_table ds_handlers_ft_routes;       /* /v1/fine_tuning/jobs */
extern const ds_route_table ds_handlers_train_routes;    /* POST /v1/adapters/{id}/train */

struct ds_ft_job_info;
/* Appends a job as an OpenAI fine_tuning.job object (handlers_ft.c). */
void ds_handlers_ft_job_json(ds_sb *b, const struct ds_ft_job_info *j);
struct ds_train_bn_opts;
struct cJSON;
/* Method "bottleneck": its hyperparameters (reduction_factor, placement, non_linearity, scaling,
 * init_weights; absent / null / "auto": the config's default) into *o, resolved
 * (ds_train_bn_resolve). False after answering 400 naming the field. Appends them to a job's
 * hyperparameters object (",\"reduction_factor\":16,..."). (handlers_ft_bn.c) */
bool ds_handlers_ft_bn_parse(ds_http_req *req, const struct cJSON *hp, struct ds_train_bn_opts *o);
void ds_handlers_ft_bn_json(ds_sb *b, const struct ds_train_bn_opts *o);

/* ---- the reply path (server.c) ------------------------------------------------------------------ */

/* Handlers answer only through these: each sends, counts the request as
 * deltaserve_requests_total{endpoint,status} (`endpoint` is the route pattern) and, except
 * ds_server_stream_start, ENDS the request. ds_server_reply_json frees *b (500 when it ran out of
 * memory). Errors are {"error":{...}} with Retry-After on 429 / 503. */
int ds_server_reply(ds_http_req *req, const char *endpoint, int status, const char *ctype, const char *body,
                    size_t len);
int ds_server_reply_json(ds_http_req *req, const char *endpoint, int status, ds_sb *b);
int ds_server_reply_error(ds_http_req *req, const char *endpoint, const ds_oai_error *e);
int ds_server_reply_errorf(ds_http_req *req, const char *endpoint, int status, const char *param, const char *code,
                           const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* The request body as a JSON object, parsed strictly (ds_oai_json_parse: nothing after the value,
 * no NUL, so a path or name is never cut short); NULL after answering 400 when it is not one. The
 * caller cJSON_Deletes the tree. */
struct cJSON *ds_server_json_object(ds_http_req *req, const char *endpoint);
/* Copies the route's first {param} into out[cap] (ids are plain ASCII: no percent-decoding). False
 * after answering 400 "malformed id in the path" when it is too long or percent-encoded. */
bool ds_server_path_id(ds_http_req *req, const char *endpoint, char *out, size_t cap);

/* Starts a streamed response (ds_http_stream_start) and counts it; the handler writes and ends the
 * stream with ds_http_stream_write / ds_http_stream_end. Returns 0 or DS_ECANCELED. */
int ds_server_stream_start(ds_http_req *req, const char *endpoint, int status, const char *ctype);

#ifdef __cplusplus
}
#endif
#endif
