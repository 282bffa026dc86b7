/* /v1/completions and /v1/chat/completions: the glue between the HTTP layer and the engine.
 *
 * Life of a request (loop thread unless noted):
 *   handler: parse + validate → pick the adapter → tokenize (chat: render the model's template)
 *   → one engine submit per choice (prompts × n) with user = the choice → start the SSE stream
 *   only once every submit succeeded (so a refusal is still a plain JSON error) → register the
 *   abort callback (client gone: cancel every engine request).
 *   engine thread: on_engine_event copies the event into one malloc'd message with an embedded
 *   ds_http_task and posts it (the final event uses a message allocated at submit time, so a
 *   request can never lose its end to an allocation failure).
 *   loop thread: on_task writes the chunk, or accumulates text for a non-streaming answer; the
 *   final event of the last choice ends the HTTP request and frees the context.
 * The HTTP request therefore stays open until the engine has delivered every final event, which
 * is what makes "every request is ended exactly once" and "nothing is freed while the engine may
 * still post to it" hold together, also when the client disconnects. */
#include <llhttp.h>
#include <stdlib.h>
#include <string.h>

#include "ds/adapter.h"
#include "ds/server.h"
#include "ds/tokenizer.h"
#include "server/handlers.h"
#include "server/openai_req.h"
#include "util/mem.h"

#define GEN_EP_COMPLETIONS "/v1/completions"
#define GEN_EP_CHAT "/v1/chat/completions"
#define GEN_FINAL_MSG_CAP 512  /* bytes of an engine error message kept for the client */
#define GEN_MAX_CHOICES 1024   /* prompts × n per request; more is refused with 400 */

typedef struct gen_choice gen_choice;
typedef struct gen_ctx gen_ctx;

/* One engine event, copied on the engine thread and run on the loop thread. */
typedef struct gen_msg {
    ds_http_task task; /* first member: on_task casts back */
    gen_choice *choice;
    ds_event_type type;
    int32_t token;
    float logprob;
    float queue_s; /* first token: engine-reported time in the waiting queue */
    int32_t n_top;
    ds_top_logprob top[DS_MAX_TOP_LOGPROBS];
    ds_finish_reason finish;
    int32_t prompt_tokens, completion_tokens;
    int status;
    size_t len;
    char text[]; /* token text, or the error message of a DS_EV_ERROR */
} gen_msg;

/* Logprobs of one generated token, kept for a non-streaming answer. */
typedef struct lp_rec {
    int32_t token, offset, n_top;
    float logprob;
    ds_top_logprob top[DS_MAX_TOP_LOGPROBS];
} lp_rec;

struct gen_choice {
    gen_ctx *ctx;
    size_t prompt;          /* index of its prompt */
    uint64_t id;            /* engine request id; 0 until submitted */
    gen_msg *final_msg;     /* the final event's message, taken by the engine thread */
    int lost;               /* atomic: a token event could not be copied (out of memory) */
    bool done, got_token;
    int32_t prompt_tokens, completion_tokens;
    ds_finish_reason finish;
    ds_sb text;             /* non-streaming: echo + completion text */
    size_t tok_bytes;       /* bytes of the generated tokens so far (text_offset) */
    lp_rec *lp;
    size_t n_lp, cap_lp;
    double t_last;          /* time of the last token (inter-token latency) */
};

struct gen_ctx {
    ds_server_job job;      /* first member: cancelled when a stop runs out of drain time */
    ds_http_req *req;
    ds_server *srv;
    ds_http_server *http;   /* immutable: the engine thread posts to it */
    ds_engine *engine;
    const ds_tokenizer *tok;
    const char *ep;         /* route pattern, for metrics */
    ds_oai_meta meta;       /* meta.model points at `model` */
    char *model, *adapter;  /* owned; adapter NULL for the base model */
    bool stream, include_usage, echo;
    bool streaming;         /* the SSE response has started */
    bool aborted;           /* client gone (or too slow): engine requests cancelled */
    bool failed;            /* err holds the answer; the other choices were cancelled */
    bool shutdown;          /* cancelled by the server's stop */
    int32_t top_n, n;       /* logprobs alternatives (-1: none); choices per prompt */
    ds_oai_error err;
    size_t n_prompts, n_choices, n_submitted, n_done;
    int32_t **ids;          /* [n_prompts] token ids */
    size_t *n_ids;
    char **echo_text;       /* [n_prompts] with echo, else NULL */
    size_t *echo_len;
    double t_arrival;
    ds_sb sb;               /* scratch for chunks */
    gen_choice choices[];
};

static void gen_on_token(gen_ctx *x, gen_choice *c, const gen_msg *m);
static void gen_on_final(gen_ctx *x, gen_choice *c, const gen_msg *m);

/* ---- context --------------------------------------------------------------------------------- */

static void gen_ctx_free(gen_ctx *x) {
    if (!x) return;
    for (size_t i = 0; i < x->n_choices; i++) {
        ds_sb_free(&x->choices[i].text);
        free(x->choices[i].lp);
        free(x->choices[i].final_msg); /* only still here when never submitted */
    }
    for (size_t i = 0; i < x->n_prompts; i++) {
        free(x->ids[i]);
        if (x->echo_text) free(x->echo_text[i]);
    }
    free(x->ids), free(x->n_ids), free(x->echo_text), free(x->echo_len);
    free(x->model), free(x->adapter);
    ds_sb_free(&x->sb);
    free(x);
}

static gen_ctx *gen_ctx_create(ds_http_req *req, ds_server *s, const ds_oai_request *r, const char *adapter) {
    size_t n_prompts = r->kind == DS_OAI_CHAT ? 1 : r->n_prompts, n_choices = n_prompts * (size_t)r->n;
    gen_ctx *x = calloc(1, sizeof *x + n_choices * sizeof(gen_choice));
    if (!x) return NULL;
    x->n_prompts = n_prompts, x->n_choices = n_choices, x->n = r->n;
    x->req = req, x->srv = s, x->http = ds_server_http(s), x->engine = ds_server_engine(s);
    x->tok = ds_engine_model(x->engine)->tok;
    x->ep = r->kind == DS_OAI_CHAT ? GEN_EP_CHAT : GEN_EP_COMPLETIONS;
    x->stream = r->stream, x->include_usage = r->include_usage, x->echo = r->echo, x->top_n = r->logprobs;
    x->t_arrival = ds_time_s();
    x->model = strdup(r->model);
    x->adapter = adapter ? strdup(adapter) : NULL;
    x->ids = calloc(n_prompts, sizeof *x->ids);
    x->n_ids = calloc(n_prompts, sizeof *x->n_ids);
    if (x->echo) x->echo_text = calloc(n_prompts, sizeof *x->echo_text), x->echo_len = calloc(n_prompts, sizeof(size_t));
    for (size_t i = 0; i < n_choices; i++) x->choices[i].ctx = x, x->choices[i].prompt = i / (size_t)r->n;
    if (!x->model || (adapter && !x->adapter) || !x->ids || !x->n_ids || (x->echo && (!x->echo_text || !x->echo_len))) {
        gen_ctx_free(x);
        return NULL;
    }
    ds_oai_meta_init(&x->meta, r->kind, x->model);
    return x;
}

/* The prompt text that `echo` repeats: as sent, or decoded from the sent token ids. */
static int gen_set_echo(gen_ctx *x, size_t i, const char *text, size_t len) {
    char *out = NULL;
    size_t n = 0;
    if (text) {
        if ((out = malloc(len + 1))) memcpy(out, text, len), out[len] = '\0', n = len;
    } else if (!x->tok || ds_tokenizer_decode(x->tok, x->ids[i], x->n_ids[i], false, &out, &n) != DS_OK) {
        out = strdup(""), n = 0;
    }
    if (!out) return DS_ENOMEM;
    x->echo_text[i] = out;
    x->echo_len[i] = n;
    return 0;
}

/* Cancels every submitted choice that has not ended. */
static void cancel_running(gen_ctx *x) {
    for (size_t i = 0; i < x->n_submitted; i++)
        if (!x->choices[i].done) ds_engine_cancel(x->engine, x->choices[i].id);
}

/* The client is gone: stop generating; the request still ends when the final events arrive. */
static void gen_abort(gen_ctx *x) {
    if (x->aborted) return;
    x->aborted = true;
    cancel_running(x);
}

/* A submit was refused after others were accepted: they are cancelled, and the error is the
 * answer once they have ended. */
static void gen_fail_submitted(gen_ctx *x, const ds_oai_error *e) {
    x->failed = true;
    x->err = *e;
    cancel_running(x);
}

/* ---- streaming ------------------------------------------------------------------------------- */

static void write_sb(gen_ctx *x) {
    if (x->aborted) return;
    if (!ds_sb_ok(&x->sb) || ds_http_stream_write(x->req, x->sb.data, x->sb.len) != 0) gen_abort(x);
}

static void send_chunk(gen_ctx *x, const ds_oai_delta *d) {
    if (x->aborted) return;
    ds_sb_reset(&x->sb);
    ds_sb_puts(&x->sb, "data: ");
    ds_oai_chunk_json(&x->sb, &x->meta, d);
    ds_sb_puts(&x->sb, "\n\n");
    write_sb(x);
}

/* Headers, then per choice the chat role delta or the echoed prompt. */
static void gen_stream_begin(gen_ctx *x) {
    x->streaming = true;
    if (ds_server_stream_start(x->req, x->ep, 200, "text/event-stream") != 0) {
        gen_abort(x);
        return;
    }
    for (size_t i = 0; i < x->n_choices; i++) {
        ds_oai_delta d = {.index = (int32_t)i, .first = x->meta.kind == DS_OAI_CHAT};
        if (x->echo) d.text = x->echo_text[x->choices[i].prompt], d.len = x->echo_len[x->choices[i].prompt];
        if (d.first || d.len) send_chunk(x, &d);
    }
}

/* Records the first failure; a stream carries it as an error event. Other choices stop. */
static void fail(gen_ctx *x, int status, const char *msg) {
    if (x->failed) return;
    x->failed = true;
    ds_oai_error_set(&x->err, status, NULL, NULL, "%s", msg);
    if (x->streaming && !x->aborted) {
        ds_sb_reset(&x->sb);
        ds_sse_error(&x->sb, &x->err);
        write_sb(x);
    }
    cancel_running(x);
}

/* ---- engine thread → loop thread ----------------------------------------------------------- */

static void on_task(ds_http_task *t);

/* ENGINE THREAD. Reads only what is immutable after submit (the choice's ctx, http server). */
static void on_engine_event(const ds_gen_event *ev) {
    gen_choice *c = ev->user;
    gen_msg *m;
    if (ev->type == DS_EV_TOKEN) {
        m = malloc(sizeof *m + ev->text_len + 1);
        if (!m) { /* the text is lost; the final event reports it as an error */
            __atomic_store_n(&c->lost, 1, __ATOMIC_RELAXED);
            return;
        }
        m->len = ev->text_len;
        if (ev->text_len) memcpy(m->text, ev->text, ev->text_len);
    } else {
        m = c->final_msg;
        c->final_msg = NULL;
        const char *msg = ev->type == DS_EV_ERROR && ev->message ? ev->message : "";
        m->len = strnlen(msg, GEN_FINAL_MSG_CAP - 1);
        memcpy(m->text, msg, m->len);
    }
    m->text[m->len] = '\0';
    m->choice = c;
    m->type = ev->type;
    m->token = ev->token;
    m->logprob = ev->logprob;
    m->queue_s = ev->queue_s;
    m->n_top = ev->n_top < 0 ? 0 : ev->n_top > DS_MAX_TOP_LOGPROBS ? DS_MAX_TOP_LOGPROBS : ev->n_top;
    memcpy(m->top, ev->top, sizeof(ds_top_logprob) * (size_t)m->n_top);
    m->finish = ev->finish;
    m->prompt_tokens = ev->prompt_tokens;
    m->completion_tokens = ev->completion_tokens;
    m->status = ev->status;
    m->task.fn = on_task;
    /* Refused only once the server has closed, i.e. after a forced shutdown: drop it. */
    if (ds_http_server_post(c->ctx->http, &m->task) != 0) free(m);
}

static void on_task(ds_http_task *t) {
    gen_msg *m = (gen_msg *)t; /* task is the first member */
    gen_choice *c = m->choice;
    if (m->type == DS_EV_TOKEN) gen_on_token(c->ctx, c, m);
    else gen_on_final(c->ctx, c, m);
    free(m);
}

/* ---- events (loop thread) -------------------------------------------------------------------- */

static const char *token_text(const gen_ctx *x, int32_t id, size_t *len) {
    const char *p = x->tok ? ds_tokenizer_token_bytes(x->tok, id, len) : NULL;
    if (!p) *len = 0;
    return p ? p : "";
}

/* The response view of one logprob record; tops must hold DS_MAX_TOP_LOGPROBS entries. */
static void lp_view(const gen_ctx *x, const lp_rec *r, ds_oai_token_lp *out, ds_oai_top *tops) {
    out->text = token_text(x, r->token, &out->len);
    out->logprob = r->logprob;
    out->text_offset = r->offset;
    for (int32_t k = 0; k < r->n_top; k++) {
        tops[k].text = token_text(x, r->top[k].token, &tops[k].len);
        tops[k].logprob = r->top[k].logprob;
    }
    out->top = tops;
    out->n_top = r->n_top;
}

static void observe_token_timing(gen_ctx *x, gen_choice *c, float queue_s) {
    ds_metrics *mt = ds_server_metrics(x->srv);
    double now = ds_time_s();
    if (!c->got_token) {
        ds_metrics_observe(mt, DS_HIST_TTFT, now - x->t_arrival);
        ds_metrics_observe(mt, DS_HIST_QUEUE, queue_s);
        c->got_token = true;
    } else {
        ds_metrics_observe(mt, DS_HIST_ITL, now - c->t_last);
    }
    c->t_last = now;
}

static bool push_lp(gen_choice *c, const lp_rec *r) {
    if (DS_GROW(c->lp, c->cap_lp, c->n_lp + 1)) return false;
    c->lp[c->n_lp++] = *r;
    return true;
}

/* token == -1 carries trailing text only: it is neither counted nor given logprobs. */
static void gen_on_token(gen_ctx *x, gen_choice *c, const gen_msg *m) {
    if (m->token >= 0) observe_token_timing(x, c, m->queue_s);
    if (x->aborted || x->failed) return;
    lp_rec rec;
    bool has_lp = x->top_n >= 0 && m->token >= 0;
    if (has_lp) {
        size_t tl;
        token_text(x, m->token, &tl);
        size_t base = x->echo ? x->echo_len[c->prompt] : 0;
        rec = (lp_rec){.token = m->token, .offset = (int32_t)(base + c->tok_bytes), .n_top = m->n_top,
                       .logprob = m->logprob};
        memcpy(rec.top, m->top, sizeof(ds_top_logprob) * (size_t)m->n_top);
        c->tok_bytes += tl;
    }
    if (x->stream) {
        if (!m->len && !has_lp) return; /* nothing to say yet (incomplete UTF-8, held for a stop string) */
        ds_oai_token_lp lp;
        ds_oai_top tops[DS_MAX_TOP_LOGPROBS];
        if (has_lp) lp_view(x, &rec, &lp, tops);
        ds_oai_delta d = {.index = (int32_t)(c - x->choices), .text = m->text, .len = m->len,
                          .lp = has_lp ? &lp : NULL, .n_lp = has_lp};
        send_chunk(x, &d);
        return;
    }
    ds_sb_append(&c->text, m->text, m->len);
    if ((has_lp && !push_lp(c, &rec)) || !ds_sb_ok(&c->text)) fail(x, 500, "out of memory");
}

static ds_oai_usage usage_of(const gen_ctx *x) {
    ds_oai_usage u = {0, 0};
    for (size_t i = 0; i < x->n_submitted; i++) {
        const gen_choice *c = &x->choices[i];
        if (i % (size_t)x->n == 0) u.prompt_tokens += c->prompt_tokens; /* n choices share a prompt */
        u.completion_tokens += c->completion_tokens;
    }
    return u;
}

/* The whole non-streaming answer. */
static void respond_full(gen_ctx *x) {
    ds_oai_choice *ch = calloc(x->n_choices, sizeof *ch);
    ds_oai_token_lp **lps = calloc(x->n_choices, sizeof *lps);
    ds_oai_top **tops = calloc(x->n_choices, sizeof *tops);
    bool ok = ch && lps && tops;
    for (size_t i = 0; ok && i < x->n_choices; i++) {
        gen_choice *c = &x->choices[i];
        ch[i] = (ds_oai_choice){.index = (int32_t)i, .text = c->text.data ? c->text.data : "", .len = c->text.len,
                                .finish = c->finish};
        if (x->top_n < 0) continue;
        lps[i] = calloc(c->n_lp ? c->n_lp : 1, sizeof **lps);
        tops[i] = calloc(c->n_lp ? c->n_lp * DS_MAX_TOP_LOGPROBS : 1, sizeof **tops);
        if (!(ok = lps[i] && tops[i])) break;
        for (size_t k = 0; k < c->n_lp; k++) lp_view(x, &c->lp[k], &lps[i][k], &tops[i][k * DS_MAX_TOP_LOGPROBS]);
        ch[i].lp = lps[i], ch[i].n_lp = c->n_lp;
    }
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_usage u = usage_of(x);
    if (ok) ds_oai_response_json(&b, &x->meta, ch, x->n_choices, &u);
    else b.oom = true;
    for (size_t i = 0; lps && tops && i < x->n_choices; i++) free(lps[i]), free(tops[i]);
    free(ch), free(lps), free(tops);
    ds_server_reply_json(x->req, x->ep, 200, &b);
}

/* Every submitted choice has ended: answer and free. */
static void finish(gen_ctx *x) {
    if (x->streaming) {
        if (!x->aborted) {
            ds_sb_reset(&x->sb);
            ds_oai_usage u = usage_of(x);
            if (!x->failed && x->include_usage) {
                ds_sb_puts(&x->sb, "data: ");
                ds_oai_usage_chunk_json(&x->sb, &x->meta, &u);
                ds_sb_puts(&x->sb, "\n\n");
            }
            ds_sse_done(&x->sb);
            write_sb(x);
        }
        ds_http_stream_end(x->req);
    } else if (x->aborted) {
        /* nginx's "client closed request"; the send only frees: nobody is listening */
        ds_server_reply(x->req, x->ep, 499, "application/json", "", 0);
    } else if (x->failed) {
        ds_server_reply_error(x->req, x->ep, &x->err);
    } else {
        respond_full(x);
    }
    ds_server_job_remove(x->srv, &x->job);
    gen_ctx_free(x);
}

static void gen_on_final(gen_ctx *x, gen_choice *c, const gen_msg *m) {
    c->done = true;
    x->n_done++;
    c->finish = m->finish;
    c->prompt_tokens = m->prompt_tokens;
    c->completion_tokens = m->completion_tokens;
    ds_metrics *mt = ds_server_metrics(x->srv);
    ds_metrics_generation_done(mt, m->type == DS_EV_ERROR ? DS_FINISH_ERROR : m->finish, m->prompt_tokens,
                               m->completion_tokens);
    ds_metrics_observe(mt, DS_HIST_E2E, ds_time_s() - x->t_arrival);
    if (m->type == DS_EV_ERROR) {
        DS_LOGW("request %s: engine error: %s", x->meta.id, m->text);
        fail(x, ds_oai_status_for(m->status), m->len ? m->text : "generation failed");
    } else if (m->finish == DS_FINISH_CANCEL && !x->aborted) {
        fail(x, 503, x->shutdown ? "the request was cancelled: the server is shutting down"
                                 : "the request was cancelled");
    } else if (__atomic_load_n(&c->lost, __ATOMIC_RELAXED)) {
        fail(x, 500, "out of memory while generating");
    }
    if (x->stream && !x->aborted && !x->failed) {
        ds_oai_delta d = {.index = (int32_t)(c - x->choices), .finish = m->finish};
        send_chunk(x, &d);
    }
    if (x->n_done == x->n_submitted) finish(x);
}

/* ---- model → adapter ------------------------------------------------------------------------- */

/* The adapter a request names, or NULL for the base model: `adapter_id` (LoRAX) wins; else
 * `model` is a base name, "base:adapter" (SGLang), or an adapter id (vLLM). */
static const char *pick_adapter(ds_server *s, const ds_oai_request *r, char *buf, size_t cap) {
    if (r->adapter_id && r->adapter_id[0]) return ds_server_is_base_name(s, r->adapter_id) ? NULL : r->adapter_id;
    const char *name = r->model;
    if (ds_server_is_base_name(s, name)) return NULL;
    const char *colon = strchr(name, ':');
    struct ds_adapter_registry *reg = ds_server_registry(s);
    ds_adapter_info info;
    if (colon && (size_t)(colon - name) < cap && !(reg && ds_registry_info(reg, name, &info) == DS_OK)) {
        memcpy(buf, name, (size_t)(colon - name));
        buf[colon - name] = '\0';
        if (ds_server_is_base_name(s, buf)) return colon[1] ? colon + 1 : NULL;
    }
    return name;
}

/* Virtual tokens (prompt / prefix tuning) the adapter adds to the context. */
static int32_t adapter_extra_ctx(ds_server *s, const char *adapter) {
    struct ds_adapter_registry *reg = ds_server_registry(s);
    ds_adapter_entry *e = adapter && reg ? ds_registry_acquire(reg, adapter) : NULL;
    if (!e) return 0;
    int32_t n = e->adapter->kind == DS_ADAPTER_PROMPT || e->adapter->prefix ? e->adapter->n_virtual : 0;
    ds_registry_release(reg, e);
    return n;
}

/* ---- tokenization -------------------------------------------------------------------------- */

static int render_chat(const ds_model *m, const ds_oai_request *r, char **out, ds_oai_error *e) {
    ds_chat_msg *msgs = calloc(r->n_messages, sizeof *msgs);
    if (!msgs) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    for (size_t i = 0; i < r->n_messages; i++) msgs[i] = (ds_chat_msg){r->messages[i].role, r->messages[i].content};
    char *def_sys = ds_chat_default_system(m->chat_template);
    int st = ds_chat_render(ds_chat_detect(m->chat_template), msgs, r->n_messages, true, def_sys, out);
    free(def_sys);
    free(msgs);
    if (st != DS_OK)
        return ds_oai_error_set(e, 400, "messages", NULL,
                                "the messages cannot be rendered with this model's chat template (roles must be "
                                "[A-Za-z0-9_-]+; some templates need alternating user/assistant turns)");
    return 0;
}

/* Fills ids[i] / n_ids[i] for every prompt (one for chat) and, with echo, the prompt texts.
 * Returns 0 or an HTTP status with *e set. */
static int tokenize(gen_ctx *x, const ds_model *m, const ds_oai_request *r, ds_oai_error *e) {
    const char *param = r->kind == DS_OAI_CHAT ? "messages" : "prompt";
    for (size_t i = 0; i < x->n_prompts; i++) {
        char *chat = NULL;
        const char *text = NULL;
        size_t len = 0;
        if (r->kind == DS_OAI_CHAT) {
            if (!m->tok) return ds_oai_error_set(e, 400, param, NULL, "this model has no tokenizer");
            int st = render_chat(m, r, &chat, e);
            if (st) return st;
            text = chat, len = strlen(chat);
        } else if (r->prompts[i].text) {
            if (!m->tok) return ds_oai_error_set(e, 400, param, NULL, "this model has no tokenizer: send token ids");
            text = r->prompts[i].text, len = r->prompts[i].text_len;
        }
        int st = 0;
        if (text) st = ds_tokenizer_encode(m->tok, text, len, r->add_special_tokens, true, &x->ids[i], &x->n_ids[i]);
        else if (!(x->ids[i] = malloc(sizeof(int32_t) * r->prompts[i].n_tokens))) st = DS_ENOMEM;
        else memcpy(x->ids[i], r->prompts[i].tokens, sizeof(int32_t) * (x->n_ids[i] = r->prompts[i].n_tokens));
        free(chat);
        if (st) return ds_oai_error_set(e, st == DS_ENOMEM ? 500 : 400, param, NULL, "cannot tokenize the prompt");
        if (r->echo && gen_set_echo(x, i, r->prompts[i].text, r->prompts[i].text_len) != 0)
            return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    }
    return 0;
}

/* ---- submit ---------------------------------------------------------------------------------- */

/* max_tokens for one prompt: the request's, or for chat without one, the rest of the context. */
static int32_t choice_max_tokens(gen_ctx *x, const ds_oai_request *r, size_t n_prompt, int32_t extra) {
    if (r->max_tokens > 0) return r->max_tokens;
    int64_t room = (int64_t)ds_server_max_ctx(x->srv) - (int64_t)n_prompt - extra;
    ds_engine_stats st;
    ds_engine_stats_get(x->engine, &st);
    if (st.kv_blocks_total > 0) { /* the engine also needs the blocks (one spare, as it reserves) */
        int64_t kv_room = (int64_t)(st.kv_blocks_total - 1) * st.kv_block_size - (int64_t)n_prompt - extra;
        if (kv_room < room) room = kv_room;
    }
    return room > INT32_MAX ? INT32_MAX : room < 1 ? 1 : (int32_t)room; /* < 1: the engine says why */
}

static int submit_error(ds_oai_error *e, int st, const ds_oai_request *r, const char *msg) {
    const char *param = r->kind == DS_OAI_CHAT ? "messages" : "prompt";
    switch (st) {
    case DS_ENOTFOUND: return ds_oai_error_set(e, 404, "model", "model_not_found", "%s", msg);
    case DS_ERANGE: return ds_oai_error_set(e, 400, param, "context_length_exceeded", "%s", msg);
    case DS_EINVAL: return ds_oai_error_set(e, 400, param, NULL, "%s", msg);
    case DS_EBUSY: return ds_oai_error_set(e, 429, NULL, NULL, "%s", msg);
    default: return ds_oai_error_set(e, ds_oai_status_for(st), NULL, NULL, "%s", msg);
    }
}

/* Submits every choice; on a refusal the already-submitted ones are cancelled and *e is set.
 * Returns 0 or the HTTP status. */
static int submit_all(gen_ctx *x, const ds_oai_request *r, ds_oai_error *e) {
    ds_gen_request g = ds_gen_request_default();
    ds_oai_request_to_gen(r, &g);
    g.adapter = x->adapter;
    g.on_event = on_engine_event;
    int32_t extra = r->max_tokens > 0 ? 0 : adapter_extra_ctx(x->srv, x->adapter);
    for (size_t i = 0; i < x->n_choices; i++) {
        gen_choice *c = &x->choices[i];
        size_t p = i / (size_t)x->n;
        g.prompt = x->ids[p];
        g.n_prompt = x->n_ids[p];
        g.max_tokens = choice_max_tokens(x, r, g.n_prompt, extra);
        g.user = c;
        if (x->echo && !x->stream) ds_sb_append(&c->text, x->echo_text[p], x->echo_len[p]);
        /* Same seed for every choice would give n identical answers: offset it per choice. */
        g.sampling.seed = r->sampling.seed + i % (size_t)x->n;
        if (!(c->final_msg = malloc(sizeof *c->final_msg + GEN_FINAL_MSG_CAP)))
            return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
        int st = DS_OK;
        ds_err err = {{0}};
        c->id = ds_engine_submit(x->engine, &g, &st, &err);
        if (!c->id) {
            free(c->final_msg);
            c->final_msg = NULL;
            return submit_error(e, st, r, err.msg);
        }
        x->n_submitted++;
        ds_metrics_adapter_request(ds_server_metrics(x->srv), x->adapter);
    }
    return 0;
}

/* ---- handler --------------------------------------------------------------------------------- */

static void on_shutdown(ds_server_job *j) {
    gen_ctx *x = (gen_ctx *)j; /* job is the first member */
    x->shutdown = true;
    cancel_running(x);
}

static void on_abort(ds_http_req *req, void *ud) {
    (void)req;
    gen_abort(ud);
}

/* Everything between a parsed request and a running one. Returns 0 (the context now belongs to
 * the engine events) or an HTTP status with *e set (nothing running). */
static int start(gen_ctx *x, const ds_oai_request *r, ds_oai_error *e) {
    int st = tokenize(x, ds_engine_model(x->engine), r, e);
    if (st) return st;
    st = submit_all(x, r, e);
    if (st) {
        gen_fail_submitted(x, e); /* the ones already running end first; the error follows */
        return x->n_submitted ? 0 : st;
    }
    ds_http_req_on_abort(x->req, on_abort, x);
    x->job.cancel = on_shutdown;
    ds_server_job_add(x->srv, &x->job);
    if (x->stream) gen_stream_begin(x);
    return 0;
}

/* Checks that need the server; returns 0 or an HTTP status with *e set. */
static int precheck(ds_server *s, const ds_oai_request *r, const char *adapter, ds_oai_error *e) {
    size_t n_prompts = r->kind == DS_OAI_CHAT ? 1 : r->n_prompts;
    if (!ds_server_engine(s)) return ds_oai_error_set(e, 503, NULL, NULL, "generation is not available on this server");
    if (adapter && !adapter[0]) return ds_oai_error_set(e, 404, "model", "model_not_found", "The model `` does not exist.");
    if (n_prompts * (size_t)r->n > GEN_MAX_CHOICES)
        return ds_oai_error_set(e, 400, "n", NULL, "too many choices: %zu prompts x n=%d is more than %d", n_prompts,
                                (int)r->n, GEN_MAX_CHOICES);
    return 0;
}

static void handle_generate(ds_http_req *req, void *ud) {
    ds_oai_kind kind = (ds_oai_kind)(intptr_t)ud;
    const char *ep = kind == DS_OAI_CHAT ? GEN_EP_CHAT : GEN_EP_COMPLETIONS;
    ds_server *s = ds_server_of(req);
    ds_oai_request r;
    ds_oai_error e;
    if (ds_oai_request_parse(&r, kind, req->body, req->body_len, &e) != 0) {
        ds_server_reply_error(req, ep, &e);
        return;
    }
    char buf[256];
    const char *adapter = pick_adapter(s, &r, buf, sizeof buf);
    gen_ctx *x = NULL;
    int st = precheck(s, &r, adapter, &e);
    if (!st && !(x = gen_ctx_create(req, s, &r, adapter))) st = ds_oai_error_set(&e, 500, NULL, NULL, "out of memory");
    if (!st && (st = start(x, &r, &e)) != 0) gen_ctx_free(x);
    ds_oai_request_free(&r);
    if (st) ds_server_reply_error(req, ep, &e);
}

static const ds_route routes[] = {
    {HTTP_POST, GEN_EP_COMPLETIONS, handle_generate, (void *)(intptr_t)DS_OAI_COMPLETION, 0},
    {HTTP_POST, GEN_EP_CHAT, handle_generate, (void *)(intptr_t)DS_OAI_CHAT, 0},
};
const ds_route_table ds_handlers_gen_routes = {routes, sizeof routes / sizeof routes[0]};
