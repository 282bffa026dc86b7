/* deltaserve — OpenAI-shaped response bodies: errors, completion / chat completion objects,
 * streaming chunks, logprobs, the /v1/models list, and SSE framing.
 *
 * Everything here is plain formatting into a caller-owned growable buffer (ds_sb, util/sb.h): no I/O, no
 * globals except the id generator's random state, so any thread may call it. The HTTP layer
 * (http.c) and the handlers (loop thread) are the callers in practice. */
#ifndef DS_SERVER_OPENAI_RESP_H
#define DS_SERVER_OPENAI_RESP_H

#include <stdarg.h>

#include "ds/common.h"
#include "ds/engine.h"
#include "util/sb.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ------------------------------------------------------------------------------- */

/* One client-facing error: {"error":{"message","type","param","code"}} plus the HTTP status. */
typedef struct ds_oai_error {
    int status;        /* HTTP status: 400, 401, 404, 405, 413, 429, 500, 503, ... */
    char type[40];     /* "invalid_request_error", "server_error", ... */
    char param[96];    /* offending field ("messages[2].content"), "" → null */
    char code[40];     /* machine code ("invalid_api_key"), "" → null */
    char message[400];
} ds_oai_error;

/* The OpenAI `type` we use for a status: 4xx → "invalid_request_error" (what api.openai.com
 * returns for 400/401/404/413), 429 → "rate_limit_error", 5xx → "server_error". */
const char *ds_oai_error_type_for(int status);

/* Fills *e (type from the status; param/code may be NULL). Returns `status` for tail calls. */
int ds_oai_error_set(ds_oai_error *e, int status, const char *param, const char *code, const char *fmt,
                     ...) __attribute__((format(printf, 5, 6)));

/* Appends {"error":{...}} (all four keys; empty param/code as null). */
void ds_oai_error_json(ds_sb *b, const ds_oai_error *e);

/* Maps a DS_E* status (engine submit, adapter calls) to an HTTP status. */
int ds_oai_status_for(int ds_status);

/* ---- completions / chat ------------------------------------------------------------------ */

typedef enum { DS_OAI_COMPLETION = 0, DS_OAI_CHAT = 1 } ds_oai_kind;

/* What every object and chunk of one response shares. `model` is borrowed for the call. */
typedef struct ds_oai_meta {
    ds_oai_kind kind;
    char id[48];       /* "cmpl-<hex>" / "chatcmpl-<hex>", the same on every chunk */
    int64_t created;   /* unix seconds, the same on every chunk */
    const char *model;
} ds_oai_meta;

/* Fills id (fresh random hex) and created (now). Thread-safe. */
void ds_oai_meta_init(ds_oai_meta *m, ds_oai_kind kind, const char *model);

typedef struct ds_oai_usage {
    int32_t prompt_tokens;
    int32_t completion_tokens;
} ds_oai_usage;

/* One alternative in a top-logprobs list: the token's decoded text (borrowed) and logprob. */
typedef struct ds_oai_top {
    const char *text;
    size_t len;
    float logprob;
} ds_oai_top;

/* Logprob record of one generated token (all pointers borrowed for the call). */
typedef struct ds_oai_token_lp {
    const char *text; /* the sampled token's text */
    size_t len;
    float logprob;
    const ds_oai_top *top; /* [n_top] */
    int32_t n_top;
    int32_t text_offset;   /* completions: offset of this token in the choice's text */
} ds_oai_token_lp;

/* One choice of a non-streaming response. */
typedef struct ds_oai_choice {
    int32_t index;
    const char *text; /* completion text / assistant message content */
    size_t len;
    ds_finish_reason finish;
    const ds_oai_token_lp *lp; /* NULL → "logprobs":null */
    size_t n_lp;
} ds_oai_choice;

/* "stop" | "length" | (cancel) "abort" | (error) "error"; NULL for DS_FINISH_NONE (→ JSON null). */
const char *ds_oai_finish_str(ds_finish_reason f);

/* Appends a whole text_completion / chat.completion object. `usage` may be NULL (omitted). */
void ds_oai_response_json(ds_sb *b, const ds_oai_meta *m, const ds_oai_choice *choices, size_t n,
                          const ds_oai_usage *usage);

/* Streaming: one chunk object (not SSE-framed; wrap with ds_sse_data).
 *   completions: {"choices":[{"index","text","logprobs","finish_reason"}]}
 *   chat:        delta {"content":text}; with `first` the delta is {"role":"assistant","content":""}
 *                (text ignored); with finish != NONE and len == 0 the delta is {}.
 * `lp` (NULL → null) holds the logprobs of the tokens whose text this chunk carries. */
typedef struct ds_oai_delta {
    int32_t index;
    bool first;
    const char *text;
    size_t len;
    ds_finish_reason finish;
    const ds_oai_token_lp *lp;
    size_t n_lp;
} ds_oai_delta;
void ds_oai_chunk_json(ds_sb *b, const ds_oai_meta *m, const ds_oai_delta *d);

/* The include_usage chunk: same id/created, "choices":[] and the usage. */
void ds_oai_usage_chunk_json(ds_sb *b, const ds_oai_meta *m, const ds_oai_usage *u);

/* ---- /v1/models ------------------------------------------------------------------------- */

typedef struct ds_oai_model_entry {
    const char *id;
    int64_t created;
    const char *owned_by;   /* NULL → "deltaserve" */
    const char *root;       /* NULL → id */
    const char *parent;     /* NULL → null (the base); the base's id for an adapter */
    int32_t max_model_len;  /* <= 0 → omitted */
} ds_oai_model_entry;
void ds_oai_models_json(ds_sb *b, const ds_oai_model_entry *models, size_t n);

/* ---- SSE framing ------------------------------------------------------------------------ */

/* Appends "data: <payload>\n\n". The payload must not contain a newline (our JSON never does). */
void ds_sse_data(ds_sb *b, const char *payload, size_t len);
/* Appends "data: [DONE]\n\n". */
void ds_sse_done(ds_sb *b);
/* Appends a mid-stream error event: data: {"error":{...}}\n\n */
void ds_sse_error(ds_sb *b, const ds_oai_error *e);
/* Appends a comment line ": <text>\n\n" (keep-alive ping; clients ignore it). */
void ds_sse_comment(ds_sb *b, const char *text);

#ifdef __cplusplus
}
#endif
#endif
