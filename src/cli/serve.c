/* deltaserve serve: load the model, scan the adapter directory, start the engine and the
 * OpenAI-compatible HTTP server, and run until SIGINT/SIGTERM (then drain and exit 0). */
#include "cli/cli.h"
#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds/server.h"
#include "ds/train.h"

#include <libgen.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *SERVE_HELP =
    "usage: deltaserve serve [-m MODEL] [--adapter-dir DIR] [--port N] [options] [--]\n"
    "\n"
    "Serves the OpenAI-compatible API (completions, chat, models), runtime adapter loading\n"
    "(vLLM's /v1/load_lora_adapter and /v1/adapters), /health and Prometheus /metrics.\n"
    "SIGINT/SIGTERM stop it gracefully: /health turns 503, new requests are refused, running\n"
    "ones finish (up to --shutdown-timeout), then the rest is cancelled and it exits 0.\n"
    "\n"
    "model and adapters:\n"
    "  -m, --model PATH          GGUF file or Hugging Face directory (default: $DS_MODEL, else\n"
    "                            models/SmolLM2-135M-Instruct.Q4_1.gguf from scripts/fetch_model.sh)\n"
    "      --served-model-name N the base model's id in the API (default: the model file's stem);\n"
    "                            \"base\" and the model's own name also select the base model\n"
    "      --adapter-dir DIR     directory of adapters (PEFT directories, GGUF LoRA files); every\n"
    "                            one found is loaded at start (named after its directory / file\n"
    "                            stem), and runtime loads may only read paths inside it\n"
    "                            (default: none; adapters disabled)\n"
    "      --max-adapters N      adapters resident in the engine at once (default 64)\n"
    "      --adapter-budget-mb N backend memory for resident adapters, LRU-evicted (default 512);\n"
    "                            a request for an adapter larger than all of it is refused (400)\n"
    "      --adapter-load-timeout S  seconds a runtime adapter load may take; a slower one (a stuck\n"
    "                            file system) is answered 504 and publishes nothing (default 60)\n"
    "      --data-dir DIR        uploaded files and fine-tuning jobs are kept here across restarts:\n"
    "                            files are listed again, a running job resumes from its last\n"
    "                            checkpoint (SIGTERM saves one) (default: DIR/.deltaserve under\n"
    "                            --adapter-dir; without --adapter-dir, or with \"none\": memory only)\n"
    "\n"
    "network:\n"
    "      --host ADDR           listen address (default 127.0.0.1; 0.0.0.0 for all interfaces)\n"
    "      --port N              listen port (default 8000)\n"
    "      --api-key KEY         require \"Authorization: Bearer KEY\" on every endpoint but\n"
    "                            /health (default: $DS_API_KEY, else no authentication);\n"
    "                            at most 255 bytes (a longer key is refused at start, exit 2)\n"
    "      --max-connections N   open connections; more get 503 (default 1024)\n"
    "      --max-body-mb N       request body limit; larger bodies get 413 (default 32)\n"
    "      --header-timeout S    seconds a client may take to send a request's headers (slower\n"
    "                            ones get 408; default 10)\n"
    "      --content-special-tokens  chat: parse special tokens (\"<|im_end|>\", ...) typed inside\n"
    "                            message contents (default: they stay text, so a client cannot\n"
    "                            end its own turn; a request's \"content_special_tokens\" overrides)\n"
    "      --shutdown-timeout S  seconds running requests may take to finish on SIGTERM before\n"
    "                            they are cancelled (default 30)\n"
    "\n"
    "engine:\n"
    "      --max-model-len N     context length per request, prompt + completion (default: the\n"
    "                            model's, capped to what the KV cache holds)\n"
    "      --kv-cache-mb N       KV cache size (default 256)\n"
    "      --max-batch-tokens N  tokens per engine step, prefill chunks + decodes (default 512)\n"
    "      --max-seqs N          sequences running at once (default 64)\n"
    "      --max-queue N         waiting requests; more get 429 (default 1024)\n"
    "  -t, --threads N           CPU threads (default 0 = all cores)\n"
    "      --quantize TYPE       q8_0 | q4_k: quantise 16/32-bit weight matrices at load (default:\n"
    "                            keep the file's formats; quantised GGUF tensors stay as they are)\n"
    "      --int8-activations    CPU: multiply quantised weights (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)\n"
    "                            with int8-quantised activations, as llama.cpp does: faster, not\n"
    "                            the exact fp32 numerics of the default (README: accuracy)\n"
    "      --backend NAME        compute backend: cpu (default) or cuda (builds with CUDA, on a GPU)\n"
    "      --train-budget F      share of the engine's time fine-tuning jobs may take while requests\n"
    "                            are running, 0 < F <= 1 (default 0.1; idle time is all theirs)\n"
    "\n"
    "fine-tuning limits (checked when a job is created; over them: 400):\n"
    "                            the adapter a job would produce must fit --adapter-budget-mb\n"
    "      --ft-max-epochs N     largest n_epochs (default 50)\n"
    "      --ft-disk-quota-mb N  disk one job may use: adapter + kept checkpoints + resumable state\n"
    "                            (default 4096)\n"
    "      --ft-keep-checkpoints K  keep only the newest K epoch checkpoints (default 2)\n"
    "\n"
    "      --log-level LEVEL     error | warn | info | debug (default info; also $DS_LOG)\n"
    "  -h, --help                this text\n";

typedef struct serve_opts {
    const char *model, *served_name, *adapter_dir, *data_dir, *host, *api_key, *log_level, *backend, *quantize;
    double train_budget;
    long port, max_batch_tokens, max_seqs, kv_mb, max_model_len, max_queue, max_adapters, adapter_mb, threads;
    long max_body_mb, max_connections, ft_max_epochs, ft_disk_mb, ft_keep;
    bool int8_act, content_special;
    double shutdown_timeout, header_timeout, load_timeout;
} serve_opts;

static void opts_default(serve_opts *o) {
    memset(o, 0, sizeof *o);
    o->host = "127.0.0.1";
    o->port = 8000;
    o->max_batch_tokens = 512;
    o->max_seqs = 64;
    o->kv_mb = 256;
    o->max_queue = 1024;
    o->max_adapters = 64;
    o->adapter_mb = 512;
    o->max_body_mb = 32;
    o->max_connections = 1024;
    o->shutdown_timeout = 30;
    o->header_timeout = 10;
    o->load_timeout = 60;
    const ds_ft_limits fl = ds_ft_default_limits();
    o->ft_max_epochs = fl.max_epochs;
    o->ft_disk_mb = (long)(fl.disk_quota_bytes >> 20);
    o->ft_keep = fl.keep_checkpoints;
    const char *key = getenv("DS_API_KEY");
    o->api_key = key && *key ? key : NULL;
}

/* An integer flag: returns 1 when `a` is `name` (and the value parsed), -1 on a bad value. */
static int int_flag(const char *a, const char *name, const char *v, long lo, long hi, long *out) {
    if (strcmp(a, name)) return 0;
    return ds_cli_int(a, v, lo, hi, out) ? 1 : -1;
}

/* A string flag. */
static int str_flag(const char *a, const char *name, const char *alias, const char *v, const char **out) {
    if (strcmp(a, name) && (!alias || strcmp(a, alias))) return 0;
    if (!v) return fprintf(stderr, "deltaserve: %s needs a value\n", a), -1;
    *out = v;
    return 1;
}

/* Parses argv[*i] (and its value). Returns 0 ok, 1 help shown, -1 error. */
static int parse_opt(serve_opts *o, int argc, char **argv, int *i) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) return fputs(SERVE_HELP, stdout), 1;
    int r = 0;
    if (!r) r = str_flag(a, "--model", "-m", v, &o->model);
    if (!r) r = str_flag(a, "--served-model-name", NULL, v, &o->served_name);
    if (!r) r = str_flag(a, "--adapter-dir", NULL, v, &o->adapter_dir);
    if (!r) r = str_flag(a, "--data-dir", NULL, v, &o->data_dir);
    if (!r) r = str_flag(a, "--host", NULL, v, &o->host);
    if (!r) r = str_flag(a, "--api-key", NULL, v, &o->api_key);
    if (!r) r = str_flag(a, "--log-level", NULL, v, &o->log_level);
    if (!r) r = str_flag(a, "--backend", NULL, v, &o->backend);
    if (!r) r = str_flag(a, "--quantize", NULL, v, &o->quantize);
    if (!r && !strcmp(a, "--int8-activations")) o->int8_act = true, r = 2;
    if (!r && !strcmp(a, "--content-special-tokens")) o->content_special = true, r = 2;
    if (!r) r = int_flag(a, "--port", v, 0, 65535, &o->port);
    if (!r) r = int_flag(a, "--max-batch-tokens", v, 1, 1 << 20, &o->max_batch_tokens);
    if (!r) r = int_flag(a, "--max-seqs", v, 1, 1 << 16, &o->max_seqs);
    if (!r) r = int_flag(a, "--kv-cache-mb", v, 1, 1 << 24, &o->kv_mb);
    if (!r) r = int_flag(a, "--max-model-len", v, 16, 1 << 24, &o->max_model_len);
    if (!r) r = int_flag(a, "--max-queue", v, 1, 1 << 24, &o->max_queue);
    if (!r) r = int_flag(a, "--max-adapters", v, 1, 1 << 16, &o->max_adapters);
    if (!r) r = int_flag(a, "--adapter-budget-mb", v, 1, 1 << 24, &o->adapter_mb);
    if (!r) r = int_flag(a, "--threads", v, 0, 1024, &o->threads);
    if (!r) r = int_flag(a, "-t", v, 0, 1024, &o->threads);
    if (!r) r = int_flag(a, "--max-body-mb", v, 1, 4096, &o->max_body_mb);
    if (!r) r = int_flag(a, "--max-connections", v, 1, 1 << 20, &o->max_connections);
    if (!r) r = int_flag(a, "--ft-max-epochs", v, 1, 1000, &o->ft_max_epochs);
    if (!r) r = int_flag(a, "--ft-disk-quota-mb", v, 1, 1L << 30, &o->ft_disk_mb);
    if (!r) r = int_flag(a, "--ft-keep-checkpoints", v, 1, 1000, &o->ft_keep);
    if (!r && !strcmp(a, "--adapter-load-timeout")) r = ds_cli_float(a, v, 0.1, 86400, &o->load_timeout) ? 1 : -1;
    if (!r && !strcmp(a, "--header-timeout")) r = ds_cli_float(a, v, 0.1, 3600, &o->header_timeout) ? 1 : -1;
    if (!r && !strcmp(a, "--train-budget")) r = ds_cli_float(a, v, 0.01, 1, &o->train_budget) ? 1 : -1;
    if (!r && !strcmp(a, "--shutdown-timeout")) r = ds_cli_float(a, v, 0, 86400, &o->shutdown_timeout) ? 1 : -1;
    if (r == 0) return fprintf(stderr, "deltaserve serve: unknown option '%s' (see --help)\n", a), -1;
    if (r < 0) return -1;
    if (r == 1) ++*i; /* options with a value; 2: a switch */
    return 0;
}

static bool set_log_level(const char *s) {
    static const char *names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, names[i])) return ds_log_set_level((ds_log_level)i), true;
    fprintf(stderr, "deltaserve: --log-level must be error, warn, info or debug\n");
    return false;
}

/* "models/SmolLM2-135M-Instruct.Q4_1.gguf" → "SmolLM2-135M-Instruct.Q4_1" (a directory: its name). */
static void file_stem(const char *path, char *out, size_t cap) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    size_t n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/') tmp[--n] = '\0';
    snprintf(out, cap, "%s", basename(tmp));
    n = strlen(out);
    if (n > 5 && !strcmp(out + n - 5, ".gguf")) out[n - 5] = '\0';
}

/* The context a request may use: the model's, the flag's, and what the KV cache can hold (the
 * engine reserves one block beyond a sequence's tokens). */
static int32_t pick_context(const ds_model *m, const serve_opts *o, const ds_engine_params *ep) {
    const ds_model_config *c = &m->cfg;
    int64_t ctx = c->max_ctx;
    if (o->max_model_len > 0 && o->max_model_len < ctx) ctx = o->max_model_len;
    else if (o->max_model_len > ctx)
        DS_LOGW("serve: --max-model-len %ld is more than the model's %d; using %d", o->max_model_len, c->max_ctx,
                c->max_ctx);
    size_t block_bytes = (size_t)ep->kv_block_size * (size_t)c->n_kv_head * (size_t)c->head_dim * sizeof(float) * 2 *
                         (size_t)c->n_layer;
    int64_t blocks = (int64_t)(ep->kv_cache_bytes / block_bytes);
    int64_t kv_tokens = (blocks - 1) * ep->kv_block_size;
    bool all_slide = c->n_layer > 0; /* blocks behind the window are freed (src/engine/scheduler.c) */
    for (int32_t il = 0; il < c->n_layer; il++) all_slide &= ds_model_layer_window(c, il) > 0;
    if (kv_tokens < ctx && !all_slide) {
        DS_LOGI("serve: context limited to %lld tokens by the KV cache (%ld MiB; raise --kv-cache-mb for more)",
                (long long)kv_tokens, o->kv_mb);
        ctx = kv_tokens;
    }
    char wsum[160];
    ds_model_weight_summary(m, wsum, sizeof wsum);
    DS_LOGI("serve: memory: model weights %s, KV cache %lld blocks x %d tokens = %.1f MiB, "
            "adapters up to %d resident in %.0f MiB",
            wsum, (long long)blocks, ep->kv_block_size,
            (double)(blocks * (int64_t)block_bytes) / (1 << 20), ep->max_adapters,
            (double)ep->adapter_budget_bytes / (1 << 20));
    return (int32_t)ctx;
}

static ds_engine_params engine_params_of(const serve_opts *o) {
    ds_engine_params ep = ds_engine_default_params();
    ep.max_batch_tokens = (int32_t)o->max_batch_tokens;
    ep.max_seqs = (int32_t)o->max_seqs;
    ep.kv_cache_bytes = (size_t)o->kv_mb << 20;
    ep.max_queue = (int32_t)o->max_queue;
    ep.max_adapters = (int32_t)o->max_adapters;
    ep.adapter_budget_bytes = (size_t)o->adapter_mb << 20;
    ep.n_threads = (int32_t)o->threads;
    ep.int8_activations = o->int8_act;
    ep.backend = o->backend;
    return ep;
}

/* --data-dir, else .deltaserve under the adapter directory: fine-tuned adapters live there too,
 * so one directory holds a deployment's state (the adapter scan skips dot entries). NULL: memory
 * only. */
static const char *data_dir_of(const serve_opts *o, char *buf, size_t cap) {
    if (o->data_dir) return strcmp(o->data_dir, "none") && o->data_dir[0] ? o->data_dir : NULL;
    if (!o->adapter_dir) return NULL;
    snprintf(buf, cap, "%s/.deltaserve", o->adapter_dir);
    return buf;
}

static ds_server_params server_params_of(const serve_opts *o, const char *name, int32_t ctx,
                                         ds_adapter_registry *reg, const char *data_dir) {
    ds_server_params sp = ds_server_default_params();
    sp.data_dir = data_dir;
    sp.host = o->host;
    sp.port = (int)o->port;
    sp.api_key = o->api_key;
    sp.served_model_name = name;
    sp.max_model_len = ctx;
    sp.max_connections = (int32_t)o->max_connections;
    sp.max_body_bytes = (size_t)o->max_body_mb << 20;
    sp.shutdown_timeout_s = o->shutdown_timeout;
    sp.header_timeout_s = o->header_timeout;
    sp.registry = reg;
    sp.max_lora = (int32_t)o->max_adapters;
    sp.train_budget = (float)o->train_budget;
    sp.content_special_tokens = o->content_special;
    sp.adapter_load_timeout_s = o->load_timeout;
    /* test hook (tests/server/test_load_timeout.py): simulates a slow file system */
    const char *delay = getenv("DS_TEST_SLOW_LOAD_S");
    if (delay && *delay) sp.test_load_delay_s = atof(delay);
    return sp;
}

/* Warm-up: one 1-token generation before the server listens. It proves the backend runs, touches
 * the weights and thread pools once, and makes the engine publish its stats (KV blocks, slots),
 * which /metrics reports from the first scrape on. */
typedef struct warmup {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    ds_event_type type;
    char msg[256];
} warmup;

static void on_warmup_event(const ds_gen_event *ev) {
    warmup *w = ev->user;
    if (ev->type == DS_EV_TOKEN) return;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    w->type = ev->type;
    snprintf(w->msg, sizeof w->msg, "%s", ev->message ? ev->message : "");
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static bool warm_up(ds_engine *e, const ds_model *m) {
    warmup w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    int32_t tok = m->tok && ds_tokenizer_bos(m->tok) >= 0 ? ds_tokenizer_bos(m->tok) : 0;
    ds_gen_request r = ds_gen_request_default();
    r.prompt = &tok, r.n_prompt = 1, r.max_tokens = 1, r.sampling.temperature = 0;
    r.on_event = on_warmup_event, r.user = &w;
    ds_err err = {{0}};
    int st;
    double t0 = ds_time_s();
    if (!ds_engine_submit(e, &r, NULL, &st, &err)) return fprintf(stderr, "deltaserve: warm-up: %s\n", err.msg), false;
    pthread_mutex_lock(&w.mu);
    while (!w.done) pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (w.type == DS_EV_ERROR) return fprintf(stderr, "deltaserve: warm-up failed: %s\n", w.msg), false;
    DS_LOGI("serve: warm-up step done in %.0f ms", (ds_time_s() - t0) * 1e3);
    return true;
}

/* Engine + server over a loaded model and registry; returns the exit code. */
static int serve(const ds_model *m, ds_adapter_registry *reg, const serve_opts *o) {
    char name[256];
    if (o->served_name) snprintf(name, sizeof name, "%s", o->served_name);
    else file_stem(o->model, name, sizeof name);
    ds_engine_params ep = engine_params_of(o);
    ep.registry = reg;
    ep.max_ctx = pick_context(m, o, &ep);
    if (ep.max_ctx < 16) return fprintf(stderr, "deltaserve: the KV cache is too small (--kv-cache-mb)\n"), 1;
    ds_err err = {{0}};
    ds_engine *e = ds_engine_create(m, &ep, &err);
    if (!e) return fprintf(stderr, "deltaserve: cannot start the engine: %s\n", err.msg), 1;
    if (!warm_up(e, m)) {
        ds_engine_free(e);
        return 1;
    }
    char ddir[PATH_MAX + 16];
    const char *data_dir = data_dir_of(o, ddir, sizeof ddir);
    if (data_dir) DS_LOGI("serve: files and fine-tuning jobs are kept in %s", data_dir);
    else DS_LOGI("serve: no data directory: uploaded files and fine-tuning jobs are kept in memory only");
    ds_server_params sp = server_params_of(o, name, ep.max_ctx, reg, data_dir);
    ds_ft_limits fl = ds_ft_default_limits();
    fl.max_adapter_bytes = ep.adapter_budget_bytes; /* a trained adapter can always be scheduled */
    fl.max_epochs = (int32_t)o->ft_max_epochs;
    fl.disk_quota_bytes = (uint64_t)o->ft_disk_mb << 20;
    fl.keep_checkpoints = (int32_t)o->ft_keep;
    sp.ft_limits = &fl;
    ds_server *srv = ds_server_create(e, &sp, &err);
    if (!srv) {
        fprintf(stderr, "deltaserve: %s\n", err.msg);
        ds_engine_free(e);
        return 1;
    }
    int rc = ds_server_run(srv);
    ds_server_free(srv);
    ds_engine_free(e); /* after the server: no request can reach it any more */
    DS_LOGI("serve: stopped");
    return rc == 0 ? 0 : 1;
}

/* glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
 * which such blocks come from the heap and stay with the process: every fine-tuning job (its
 * activation buffers are tens of MiB) then left RSS higher (+550 MiB after four small jobs,
 * bench/results/soak-20261202T1915Z). A fixed threshold keeps big blocks mmapped, so freeing them
 * returns the memory; the steady-state serving path does not allocate (docs/ARCHITECTURE.md). */
static void fix_mmap_threshold(void) {
#ifdef __GLIBC__
    mallopt(M_MMAP_THRESHOLD, 256 << 10);
#endif
}

int ds_cli_serve(int argc, char **argv) {
    fix_mmap_threshold();
    serve_opts o;
    opts_default(&o);
    for (int i = 1; i < argc; i++) {
        /* serve takes no positional arguments; "--" is accepted (and ends the options) so that
         * every subcommand parses the same way. */
        const char *extra = !strcmp(argv[i], "--") ? argv[i + 1] : ds_cli_is_option(argv[i]) ? NULL : argv[i];
        if (extra) return fprintf(stderr, "deltaserve serve: unexpected argument '%s' (see --help)\n", extra), 2;
        if (!strcmp(argv[i], "--")) break;
        int r = parse_opt(&o, argc, argv, &i);
        if (r) return r > 0 ? 0 : 2;
    }
    if (o.log_level && !set_log_level(o.log_level)) return 2;
    if (o.api_key && strlen(o.api_key) > DS_API_KEY_MAX) /* refused, never truncated: a prefix must not authenticate */
        return fprintf(stderr, "deltaserve: the API key (--api-key or $DS_API_KEY) is %zu bytes; at most %d are "
                       "accepted\n", strlen(o.api_key), DS_API_KEY_MAX), 2;
    /* A file-size limit (RLIMIT_FSIZE) must fail the write that passes it (EFBIG: the upload or the
     * job fails with a message), not kill the server with SIGXFSZ. */
    signal(SIGXFSZ, SIG_IGN);
    if (!o.model && !(o.model = ds_cli_default_model(argv[0]))) return 1;
    ds_model *m = ds_cli_load_model(o.model, o.quantize);
    if (!m) return 1;
    ds_adapter_registry *reg = NULL;
    if (o.adapter_dir) {
        ds_err err = {{0}};
        if (!(reg = ds_registry_create(m, o.adapter_dir, &err))) {
            fprintf(stderr, "deltaserve: --adapter-dir: %s\n", err.msg);
            ds_model_free(m);
            return 1;
        }
        ds_registry_scan(reg); /* logs each adapter and the total */
    }
    int rc = serve(m, reg, &o);
    ds_registry_free(reg);
    ds_model_free(m);
    return rc;
}
