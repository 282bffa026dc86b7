/* deltaserve — the OpenAI-compatible HTTP server.
 *
 * One network thread (the one that calls ds_server_run) owns every socket, parser and response
 * writer; it never runs the model. It talks to the engine only through ds_engine_submit /
 * ds_engine_cancel and receives token events that the engine thread posts back to it.
 *
 * Typical use (src/main.c):
 *     ds_server_params sp = ds_server_default_params();
 *     sp.port = 8000; sp.api_key = getenv("DS_API_KEY");
 *     sp.served_model_name = "SmolLM2-135M"; sp.max_model_len = model->cfg.max_ctx;
 *     ds_server *srv = ds_server_create(engine, &sp, &err);   // binds now: errors show early
 *     ds_server_run(srv);          // until SIGINT/SIGTERM or ds_server_stop
 *     ds_server_free(srv);
 *     ds_engine_free(engine);      // after the server: no request can reach it any more
 *
 * Thread rules: ds_server_stop is safe from any thread and from a signal handler; every other
 * call belongs to the thread that created the server. */
#ifndef DS_SERVER_H
#define DS_SERVER_H

#include "ds/common.h"
#include "ds/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ds_server ds_server;

/* The longest API key accepted (bytes); the router keeps it in a fixed buffer one byte longer. */
#define DS_API_KEY_MAX 255

typedef struct ds_server_params {
    const char *host;              /* listen address (name or IP); default "127.0.0.1" */
    int port;                      /* default 8000; 0 → an ephemeral port (see ds_server_port) */
    const char *api_key;           /* NULL or "" → no auth; else every endpoint but /health needs
                                      "Authorization: Bearer <api_key>" (401 otherwise); at most
                                      DS_API_KEY_MAX bytes (ds_server_create fails otherwise) */
    const char *served_model_name; /* the base model's id in /v1/models and responses; default
                                      "default" */
    int32_t max_model_len;         /* context length reported by /v1/models; <= 0 → omitted */

    int32_t max_connections;       /* default 1024; over it a new connection gets 503 and close */
    size_t max_body_bytes;         /* request body limit, default 32 MiB → 413 */
    size_t max_header_bytes;       /* request line + headers, default 16 KiB → 431 */
    int32_t max_headers;           /* default 100 → 431 */
    double idle_timeout_s;         /* keep-alive idle, default 60 */
    double header_timeout_s;       /* first byte → end of headers, default 10 → 408 */
    double body_timeout_s;         /* end of headers → end of body, default 60 → 408 */
    double write_timeout_s;        /* pending output with no progress, default 60 → drop client */
    size_t max_write_buffer;       /* unsent bytes per connection, default 4 MiB → drop client */
    double shutdown_timeout_s;     /* stop: wait this long for in-flight requests, default 10 */
    bool handle_signals;           /* SIGINT/SIGTERM → graceful stop; default true */

    /* Added with the adapter endpoints (zero / NULL keeps the old behaviour): */
    struct ds_adapter_registry *registry; /* borrowed, may be NULL (no adapter endpoints beyond
                                      empty lists); the engine's registry; must outlive the server */
    int32_t max_lora;              /* resident adapter slots (engine max_adapters), reported as
                                      max_lora in vllm:lora_requests_info; default 0 */
    float train_budget;            /* fine-tuning jobs run on the engine thread between inference
                                      steps, using at most this share of its time while requests
                                      run (0..1]; <= 0 → 0.1 */
    bool content_special_tokens;   /* chat: match special tokens inside message contents (default
                                      false: a "<|im_end|>" typed by a client stays text and cannot
                                      end its turn); a request's "content_special_tokens" overrides */
    const char *data_dir;          /* uploaded files and fine-tuning jobs persist here (files/,
                                      jobs/; see src/server/file_store.h, include/ds/train.h);
                                      NULL → memory only. Copied. */
    double adapter_load_timeout_s; /* a runtime adapter load that takes longer is answered 504 and
                                      publishes nothing (default 0 → 60 s) */
    double test_load_delay_s;      /* tests only: loads of paths whose last component starts with
                                      "slow" first wait this long (a slow file system); default 0 */
    const struct ds_ft_limits *ft_limits; /* what one fine-tuning job may cost (include/ds/train.h);
                                      read during ds_server_create; NULL → ds_ft_default_limits() */
} ds_server_params;

ds_server_params ds_server_default_params(void);

/* Creates the server, registers the routes and binds host:port. `engine` is borrowed (may be
 * NULL: generation endpoints then answer 503) and must outlive the server's run. Strings in
 * `params` are copied. Returns NULL with a message (e.g. the port is in use). */
ds_server *ds_server_create(ds_engine *engine, const ds_server_params *params, ds_err *err);

/* The bound port (useful with port 0), or -1. */
int ds_server_port(const ds_server *s);

/* Serves until stopped. On stop it drains: /health answers 503, new requests get 503 (and
 * "Connection: close"), in-flight requests run to completion for up to shutdown_timeout_s; then
 * what is left is aborted (engine requests cancelled) and given a few more seconds to end.
 * Returns 0 once every request has ended, or DS_EBUSY if some were still pending at the end (the
 * server then leaks what they hold rather than free memory the engine may still post to).
 * Call at most once. */
int ds_server_run(ds_server *s);

/* ANY THREAD, async-signal-safe: asks a running (or about to run) server to stop. A no-op once
 * ds_server_run has returned. */
void ds_server_stop(ds_server *s);

/* Frees the server (after ds_server_run returned, or instead of running it). NULL is a no-op. */
void ds_server_free(ds_server *s);

#ifdef __cplusplus
}
#endif
#endif
