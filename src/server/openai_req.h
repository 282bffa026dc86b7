/* deltaserve — parsing and validating /v1/completions and /v1/chat/completions request bodies.
 *
 * ds_oai_request_parse turns a JSON body into a ds_oai_request whose sampling part is already in
 * engine types (ds_sampling_params, stop lists), or fails with a 400 invalid_request_error whose
 * `param` names the offending field ("temperature", "messages[1].content[0].text", ...).
 * Unknown fields are ignored (clients send vendor extras); `null` counts as "not given" for every
 * optional field (vLLM's benchmark sends "logprobs": null).
 *
 * Pure functions over memory, no globals: any thread may call them. The loop thread does, in the
 * request handler, before anything is submitted to the engine. */
#ifndef DS_SERVER_OPENAI_REQ_H
#define DS_SERVER_OPENAI_REQ_H

#include "ds/engine.h"
#include "server/openai_resp.h"

#ifdef __cplusplus
extern "C" {
#endif

struct cJSON;

/* Limits beyond the OpenAI ranges, so a body within the size limit cannot ask for absurd work. */
#define DS_OAI_MAX_PROMPTS 1024     /* entries in a batched `prompt` array */
#define DS_OAI_MAX_LOGIT_BIAS 1024  /* entries in `logit_bias` */
#define DS_OAI_MAX_STOP_IDS 1024    /* entries in `stop_token_ids` */
#define DS_OAI_MAX_STOP_STRS 4      /* entries in `stop` (OpenAI's limit; < DS_MAX_STOP) */
#define DS_OAI_MAX_STOP_BYTES 1024  /* bytes in one `stop` string (each choice holds a copy) */
/* Sampling floats: finite, and no non-zero value so small that it turns logits into inf/NaN. */
#define DS_OAI_MIN_TEMPERATURE 1e-3 /* `temperature`: 0 (greedy) or 0.001..2 */
#define DS_OAI_MIN_TOP_P 1e-6       /* `top_p` 1e-6..1; `min_p` and the penalties: 0 or |x| >= 1e-6 */
#define DS_OAI_MIN_REP_PENALTY 1e-3 /* `repetition_penalty`: 0.001..100 */
#define DS_OAI_MAX_REP_PENALTY 100.0

/* One prompt of a completions request: either text or token ids. */
typedef struct ds_oai_prompt {
    const char *text;   /* borrowed from the request's JSON (NUL-terminated); NULL for token ids */
    size_t text_len;
    int32_t *tokens;    /* owned by the request; NULL for text */
    size_t n_tokens;    /* >= 1 when tokens */
} ds_oai_prompt;

/* One chat message. */
typedef struct ds_oai_message {
    const char *role;   /* borrowed, non-empty ("system", "user", "assistant", "tool", ...) */
    char *content;      /* owned, NUL-terminated: the string, text parts joined with "\n", or "" */
    size_t content_len;
    const char *name;   /* borrowed, or NULL */
} ds_oai_message;

typedef struct ds_oai_request {
    ds_oai_kind kind;
    const char *model;       /* borrowed; required (may be "": the handler answers 404) */
    const char *adapter_id;  /* LoRAX per-request adapter, or NULL */
    const char *user;        /* or NULL */

    /* completions */
    ds_oai_prompt *prompts;  /* [n_prompts], n_prompts >= 1 */
    size_t n_prompts;
    bool echo;

    /* chat */
    ds_oai_message *messages; /* [n_messages], n_messages >= 1 */
    size_t n_messages;

    /* common */
    int32_t max_tokens;      /* completions: default 16. chat: max_completion_tokens, else
                                max_tokens, else 0 = "until the context ends" */
    int32_t min_tokens;      /* default 0; <= max_tokens when both given */
    int32_t n;               /* 1..128, default 1 */
    bool stream;
    bool include_usage;      /* stream_options.include_usage */
    int32_t logprobs;        /* -1: none. completions: `logprobs` (0..5). chat: `top_logprobs`
                                (0..20, default 0) when `logprobs` is true */
    const char *stop[DS_MAX_STOP]; /* borrowed, non-empty strings, NULL-terminated */
    int32_t n_stop;
    int32_t *stop_token_ids; /* owned, [n_stop_token_ids] */
    int32_t n_stop_token_ids;
    bool include_stop_str_in_output;
    bool ignore_eos;
    bool skip_special_tokens; /* default true */
    bool add_special_tokens;  /* default: true for completions, false for chat (vLLM: the chat
                                 template already adds BOS) */
    int8_t content_special_tokens; /* chat: -1 = the server's default, else 0 / 1 */
    ds_sampling_params sampling; /* logit_bias points at an owned array */

    /* private */
    struct cJSON *json_;       /* owns every borrowed string above */
    ds_logit_bias *logit_bias_;
} ds_oai_request;

/* Parses a request body strictly: exactly one JSON value with nothing but JSON whitespace after it,
 * and no NUL anywhere (a raw 0 byte or the escape \u0000, which cJSON would turn into a silently
 * truncated string: prompts, names and paths). Returns the tree (the caller cJSON_Deletes it), or
 * NULL with *err set to a 400 (500 when out of memory). Any thread. */
struct cJSON *ds_oai_json_parse(const char *body, size_t len, ds_oai_error *err);

/* Parses `body` (len bytes, need not be NUL-terminated) as a request of `kind`.
 * Returns 0 with *r filled (free with ds_oai_request_free), or an HTTP status (400; 500 when out of
 * memory) with *err filled and *r left empty (ds_oai_request_free is then a harmless no-op). */
int ds_oai_request_parse(ds_oai_request *r, ds_oai_kind kind, const char *body, size_t len, ds_oai_error *err);

/* Frees what the request owns; safe on a zeroed or failed-to-parse request. */
void ds_oai_request_free(ds_oai_request *r);

/* Fills the fields of *g that the body controls: max_tokens (absent from a chat request: 0, which
 * ds_engine_submit resolves to the rest of the context), min_tokens, ignore_eos, stop, stop_token_ids, include_stop_str, skip_special,
 * top_logprobs, sampling. Leaves prompt, adapter, on_event and user to the handler. The pointers
 * copied into *g borrow from *r: valid until ds_oai_request_free (ds_engine_submit copies them). */
void ds_oai_request_to_gen(const ds_oai_request *r, ds_gen_request *g);

#ifdef __cplusplus
}
#endif
#endif
