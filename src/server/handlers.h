/* deltaserve — what the endpoint handler files (handlers_gen.c, handlers_adapters.c) share with
 * the server facade (router.c): accessors to the server's state and reply helpers that also count
 * the request in /metrics.
 *
 * Threading: LOOP THREAD ONLY, like every handler. */
#ifndef DS_SERVER_HANDLERS_H
#define DS_SERVER_HANDLERS_H

#include "server/http.h"
#include "server/metrics.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ds_adapter_registry;

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

/* Route registration (called by ds_server_create). Return 0 or DS_ERANGE (table full). */
int ds_handlers_gen_register(ds_server *s);      /* /v1/completions, /v1/chat/completions */
int ds_handlers_adapters_register(ds_server *s); /* /v1/models, vLLM load/unload, /v1/adapters */
int ds_handlers_ft_register(ds_server *s);       /* /v1/files, /v1/fine_tuning/jobs (handlers_ft.c) */

/* The fine-tuning endpoints' state (files, the training manager): created on first use by
 * handlers_ft.c, freed by ds_handlers_ft_free from ds_server_free (joins the training thread). */
struct ds_ft_state;
struct ds_ft_state **ds_server_ft_state(ds_server *s);
void ds_handlers_ft_free(ds_server *s);
/* The fine-tuning job manager (created on first use), or NULL with a message. Loop thread. */
struct ds_ft_manager *ds_handlers_ft_manager(ds_server *s, ds_err *err);
struct ds_ft_job_info;
/* Appends a job as an OpenAI fine_tuning.job object. */
void ds_handlers_ft_job_json(ds_sb *b, const struct ds_ft_job_info *j);
/* POST /v1/adapters/{id}/train: a small synchronous online update (handlers_train.c). */
void ds_handle_adapter_train(ds_http_req *req, void *ud);

/* Reply helpers: send, END the request, and count it as deltaserve_requests_total{endpoint,status}.
 * `endpoint` is the route pattern. ds_server_reply_json frees *b (500 when it ran out of memory). */
int ds_server_reply(ds_http_req *req, const char *endpoint, int status, const char *ctype, const char *body,
                    size_t len);
int ds_server_reply_json(ds_http_req *req, const char *endpoint, int status, ds_sb *b);
int ds_server_reply_error(ds_http_req *req, const char *endpoint, const ds_oai_error *e);
int ds_server_reply_errorf(ds_http_req *req, const char *endpoint, int status, const char *param, const char *code,
                           const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Counts a request that the handler ends itself (streams). */
void ds_server_count(ds_http_req *req, const char *endpoint, int status);

#ifdef __cplusplus
}
#endif
#endif
