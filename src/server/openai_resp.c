/* OpenAI-shaped response formatting. Hand-written JSON rather than cJSON trees: a streaming
 * chunk is produced per token, and building/freeing a tree for each would dominate the loop
 * thread's time. Field order follows api.openai.com so diffs against recorded responses are easy. */
#include "server/openai_resp.h"
#include "util/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void json_str_or_null(ds_sb *b, const char *s) {
    if (s) ds_sb_json_str(b, s, strlen(s));
    else ds_sb_puts(b, "null");
}

/* ---- errors ------------------------------------------------------------------------------ */

const char *ds_oai_error_type_for(int status) {
    if (status == 429) return "rate_limit_error";
    if (status >= 500) return "server_error";
    return "invalid_request_error";
}

int ds_oai_error_set(ds_oai_error *e, int status, const char *param, const char *code, const char *fmt, ...) {
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", ds_oai_error_type_for(status));
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return status;
}

void ds_oai_error_json(ds_sb *b, const ds_oai_error *e) {
    ds_sb_puts(b, "{\"error\":{\"message\":");
    ds_sb_json_str(b, e->message, strlen(e->message));
    ds_sb_puts(b, ",\"type\":");
    json_str_or_null(b, e->type[0] ? e->type : ds_oai_error_type_for(e->status));
    ds_sb_puts(b, ",\"param\":");
    json_str_or_null(b, e->param[0] ? e->param : NULL);
    ds_sb_puts(b, ",\"code\":");
    json_str_or_null(b, e->code[0] ? e->code : NULL);
    ds_sb_puts(b, "}}");
}

int ds_oai_status_for(int ds_status) {
    switch (ds_status) {
    case DS_OK: return 200;
    case DS_EINVAL: case DS_ERANGE: case DS_EFORMAT: case DS_EUNSUPPORTED: return 400;
    case DS_EPERM: return 403;
    case DS_ENOTFOUND: return 404;
    case DS_EBUSY: return 503;
    case DS_ECANCELED: return 503; /* only our own cancels (shutdown) reach a client */
    default: return 500;
    }
}

/* ---- ids ---------------------------------------------------------------------------------- */

/* Ids only need to be unique and unguessable enough not to collide across restarts: a counter
 * mixed with a per-process seed (time, pid, address) through splitmix64. */
static uint64_t next_random(void) {
    static uint64_t seed, counter;
    uint64_t s = __atomic_load_n(&seed, __ATOMIC_RELAXED);
    if (!s) {
        uint64_t fresh = ds_time_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&seed;
        fresh = ds_splitmix64(&fresh) | 1;
        uint64_t expected = 0;
        __atomic_compare_exchange_n(&seed, &expected, fresh, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        s = __atomic_load_n(&seed, __ATOMIC_RELAXED);
    }
    uint64_t x = s + __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED) * 0xD1B54A32D192ED03ull;
    return ds_splitmix64(&x);
}

void ds_oai_meta_init(ds_oai_meta *m, ds_oai_kind kind, const char *model) {
    m->kind = kind;
    m->model = model;
    m->created = (int64_t)time(NULL);
    snprintf(m->id, sizeof m->id, "%s%016llx%016llx", kind == DS_OAI_CHAT ? "chatcmpl-" : "cmpl-",
             (unsigned long long)next_random(), (unsigned long long)next_random());
}

/* ---- completions / chat ------------------------------------------------------------------- */

const char *ds_oai_finish_str(ds_finish_reason f) {
    switch (f) {
    case DS_FINISH_STOP: return "stop";
    case DS_FINISH_LENGTH: return "length";
    case DS_FINISH_CANCEL: return "abort";
    case DS_FINISH_ERROR: return "error";
    default: return NULL;
    }
}

static void head_json(ds_sb *b, const ds_oai_meta *m, bool chunk) {
    const char *obj = m->kind == DS_OAI_CHAT ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                             : "text_completion";
    ds_sb_puts(b, "{\"id\":");
    ds_sb_json_str(b, m->id, strlen(m->id));
    ds_sb_printf(b, ",\"object\":\"%s\",\"created\":%lld,\"model\":", obj, (long long)m->created);
    json_str_or_null(b, m->model);
}

static void usage_json(ds_sb *b, const ds_oai_usage *u) {
    ds_sb_printf(b, "\"usage\":{\"prompt_tokens\":%d,\"total_tokens\":%lld,\"completion_tokens\":%d}",
                 (int)u->prompt_tokens, (long long)u->prompt_tokens + u->completion_tokens,
                 (int)u->completion_tokens);
}

/* Legacy completions logprobs: parallel arrays. */
static void completion_lp_json(ds_sb *b, const ds_oai_token_lp *lp, size_t n) {
    ds_sb_puts(b, "{\"tokens\":[");
    for (size_t i = 0; i < n; i++) {
        if (i) ds_sb_puts(b, ",");
        ds_sb_json_str(b, lp[i].text, lp[i].len);
    }
    ds_sb_puts(b, "],\"token_logprobs\":[");
    for (size_t i = 0; i < n; i++) {
        if (i) ds_sb_puts(b, ",");
        ds_sb_json_num(b, lp[i].logprob);
    }
    ds_sb_puts(b, "],\"top_logprobs\":[");
    for (size_t i = 0; i < n; i++) {
        ds_sb_puts(b, i ? ",{" : "{");
        for (int32_t k = 0; k < lp[i].n_top; k++) {
            if (k) ds_sb_puts(b, ",");
            ds_sb_json_str(b, lp[i].top[k].text, lp[i].top[k].len);
            ds_sb_puts(b, ":");
            ds_sb_json_num(b, lp[i].top[k].logprob);
        }
        ds_sb_puts(b, "}");
    }
    ds_sb_puts(b, "],\"text_offset\":[");
    for (size_t i = 0; i < n; i++) ds_sb_printf(b, i ? ",%d" : "%d", (int)lp[i].text_offset);
    ds_sb_puts(b, "]}");
}

static void bytes_json(ds_sb *b, const char *s, size_t n) {
    ds_sb_puts(b, "[");
    for (size_t i = 0; i < n; i++) ds_sb_printf(b, i ? ",%u" : "%u", (unsigned)(unsigned char)s[i]);
    ds_sb_puts(b, "]");
}

/* Chat logprobs: {"content":[{token, logprob, bytes, top_logprobs:[{token, logprob, bytes}]}]} */
static void chat_lp_json(ds_sb *b, const ds_oai_token_lp *lp, size_t n) {
    ds_sb_puts(b, "{\"content\":[");
    for (size_t i = 0; i < n; i++) {
        ds_sb_puts(b, i ? ",{\"token\":" : "{\"token\":");
        ds_sb_json_str(b, lp[i].text, lp[i].len);
        ds_sb_puts(b, ",\"logprob\":");
        ds_sb_json_num(b, lp[i].logprob);
        ds_sb_puts(b, ",\"bytes\":");
        bytes_json(b, lp[i].text, lp[i].len);
        ds_sb_puts(b, ",\"top_logprobs\":[");
        for (int32_t k = 0; k < lp[i].n_top; k++) {
            const ds_oai_top *t = &lp[i].top[k];
            ds_sb_puts(b, k ? ",{\"token\":" : "{\"token\":");
            ds_sb_json_str(b, t->text, t->len);
            ds_sb_puts(b, ",\"logprob\":");
            ds_sb_json_num(b, t->logprob);
            ds_sb_puts(b, ",\"bytes\":");
            bytes_json(b, t->text, t->len);
            ds_sb_puts(b, "}");
        }
        ds_sb_puts(b, "]}");
    }
    ds_sb_puts(b, "],\"refusal\":null}");
}

static void logprobs_json(ds_sb *b, ds_oai_kind kind, const ds_oai_token_lp *lp, size_t n) {
    if (!lp) ds_sb_puts(b, "null");
    else if (kind == DS_OAI_CHAT) chat_lp_json(b, lp, n);
    else completion_lp_json(b, lp, n);
}

void ds_oai_response_json(ds_sb *b, const ds_oai_meta *m, const ds_oai_choice *choices, size_t n,
                          const ds_oai_usage *usage) {
    head_json(b, m, false);
    ds_sb_puts(b, ",\"choices\":[");
    for (size_t i = 0; i < n; i++) {
        const ds_oai_choice *c = &choices[i];
        ds_sb_printf(b, "%s{\"index\":%d,", i ? "," : "", (int)c->index);
        if (m->kind == DS_OAI_CHAT) {
            ds_sb_puts(b, "\"message\":{\"role\":\"assistant\",\"content\":");
            ds_sb_json_str(b, c->text ? c->text : "", c->text ? c->len : 0);
            ds_sb_puts(b, "}");
        } else {
            ds_sb_puts(b, "\"text\":");
            ds_sb_json_str(b, c->text ? c->text : "", c->text ? c->len : 0);
        }
        ds_sb_puts(b, ",\"logprobs\":");
        logprobs_json(b, m->kind, c->lp, c->n_lp);
        ds_sb_puts(b, ",\"finish_reason\":");
        json_str_or_null(b, ds_oai_finish_str(c->finish));
        ds_sb_puts(b, "}");
    }
    ds_sb_puts(b, "]");
    if (usage) {
        ds_sb_puts(b, ",");
        usage_json(b, usage);
    }
    ds_sb_puts(b, "}");
}

void ds_oai_chunk_json(ds_sb *b, const ds_oai_meta *m, const ds_oai_delta *d) {
    head_json(b, m, true);
    ds_sb_printf(b, ",\"choices\":[{\"index\":%d,", (int)d->index);
    const char *text = d->text ? d->text : "";
    size_t len = d->text ? d->len : 0;
    if (m->kind == DS_OAI_CHAT) {
        if (d->first) {
            ds_sb_puts(b, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}");
        } else if (len == 0 && d->finish != DS_FINISH_NONE) {
            ds_sb_puts(b, "\"delta\":{}");
        } else {
            ds_sb_puts(b, "\"delta\":{\"content\":");
            ds_sb_json_str(b, text, len);
            ds_sb_puts(b, "}");
        }
    } else {
        ds_sb_puts(b, "\"text\":");
        ds_sb_json_str(b, text, len);
    }
    ds_sb_puts(b, ",\"logprobs\":");
    logprobs_json(b, m->kind, d->lp, d->n_lp);
    ds_sb_puts(b, ",\"finish_reason\":");
    json_str_or_null(b, ds_oai_finish_str(d->finish));
    ds_sb_puts(b, "}]}");
}

void ds_oai_usage_chunk_json(ds_sb *b, const ds_oai_meta *m, const ds_oai_usage *u) {
    head_json(b, m, true);
    ds_sb_puts(b, ",\"choices\":[],");
    usage_json(b, u);
    ds_sb_puts(b, "}");
}

/* ---- /v1/models ------------------------------------------------------------------------- */

void ds_oai_models_json(ds_sb *b, const ds_oai_model_entry *models, size_t n) {
    ds_sb_puts(b, "{\"object\":\"list\",\"data\":[");
    for (size_t i = 0; i < n; i++) {
        const ds_oai_model_entry *e = &models[i];
        ds_sb_puts(b, i ? ",{\"id\":" : "{\"id\":");
        json_str_or_null(b, e->id);
        ds_sb_printf(b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":", (long long)e->created);
        json_str_or_null(b, e->owned_by ? e->owned_by : "deltaserve");
        ds_sb_puts(b, ",\"root\":");
        json_str_or_null(b, e->root ? e->root : e->id);
        ds_sb_puts(b, ",\"parent\":");
        json_str_or_null(b, e->parent);
        if (e->max_model_len > 0) ds_sb_printf(b, ",\"max_model_len\":%d", (int)e->max_model_len);
        ds_sb_puts(b, "}");
    }
    ds_sb_puts(b, "]}");
}

/* ---- SSE ---------------------------------------------------------------------------------- */

void ds_sse_data(ds_sb *b, const char *payload, size_t len) {
    ds_sb_append(b, "data: ", 6);
    ds_sb_append(b, payload, len);
    ds_sb_append(b, "\n\n", 2);
}

void ds_sse_done(ds_sb *b) { ds_sb_puts(b, "data: [DONE]\n\n"); }

void ds_sse_error(ds_sb *b, const ds_oai_error *e) {
    ds_sb_puts(b, "data: ");
    ds_oai_error_json(b, e);
    ds_sb_puts(b, "\n\n");
}

void ds_sse_comment(ds_sb *b, const char *text) {
    ds_sb_puts(b, ": ");
    /* A newline would end the comment early and inject an event: cut at the first one. */
    ds_sb_append(b, text, strcspn(text, "\r\n"));
    ds_sb_puts(b, "\n\n");
}
