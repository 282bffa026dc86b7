/* Request-body validation. The ranges are OpenAI's (its API reference); vLLM's extras get vLLM's ranges.
 * Every check names its field in `param`, because that is what clients show their users. */
#include "server/openai_req.h"
#include "util/json.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BAD(e, param, ...) ds_oai_error_set((e), 400, (param), NULL, __VA_ARGS__)

/* Field lookup: NULL when absent or JSON null (null means "not given" for optional fields). */
static const cJSON *field(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static int get_bool(const cJSON *o, const char *key, bool *out, ds_oai_error *e) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) return BAD(e, key, "'%s' must be a boolean", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

static int get_str(const cJSON *o, const char *key, const char **out, ds_oai_error *e) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    if (!cJSON_IsString(v)) return BAD(e, key, "'%s' must be a string", key);
    *out = v->valuestring;
    return 0;
}

/* A finite number in [lo, hi] (lo excluded when lo_open). Non-zero values nearer to 0 than `tiny`
 * are refused too: they pass the range yet divide logits into inf/NaN (temperature=1e-45,
 * repetition_penalty=1e-38) or vanish in the float conversion. */
static int get_num(const cJSON *o, const char *key, double lo, double hi, bool lo_open, double tiny, float *out,
                   ds_oai_error *e) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return BAD(e, key, "'%s' must be a finite number", key);
    double d = v->valuedouble;
    if (d > hi || d < lo || (lo_open && d == lo))
        return BAD(e, key, "'%s' must be %s %g and <= %g, got %g", key, lo_open ? ">" : ">=", lo, hi, d);
    if (d != 0 && fabs(d) < tiny)
        return BAD(e, key, "'%s' must be %sat least %g in magnitude, got %g", key, lo < 0 || !lo_open ? "0 or " : "",
                   tiny, d);
    *out = (float)d;
    return 0;
}

static bool is_integer(const cJSON *v) {
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

/* An integer in [lo, hi]; `param` is the name reported (it may differ from `key` for nesting). */
static int int_value(const cJSON *v, const char *param, int64_t lo, int64_t hi, int64_t *out, ds_oai_error *e) {
    if (!is_integer(v)) return BAD(e, param, "'%s' must be an integer", param);
    double d = v->valuedouble;
    if (d < (double)lo || d > (double)hi)
        return BAD(e, param, "'%s' must be between %lld and %lld, got %.17g", param, (long long)lo,
                   (long long)hi, d);
    *out = (int64_t)d;
    return 0;
}

static int get_i32(const cJSON *o, const char *key, int64_t lo, int64_t hi, int32_t *out, bool *given,
                   ds_oai_error *e) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    int64_t x = 0; /* set by int_value on success (GCC cannot see it) */
    int st = int_value(v, key, lo, hi, &x, e);
    if (st) return st;
    *out = (int32_t)x;
    if (given) *given = true;
    return 0;
}

/* Token ids: non-negative int32 (the vocabulary bound is the engine's to check). */
static int token_array(const cJSON *arr, const char *param, int32_t **out, size_t *n_out, size_t max_n,
                       ds_oai_error *e) {
    int n = cJSON_GetArraySize(arr);
    if ((size_t)n > max_n) return BAD(e, param, "'%s' has more than %zu entries", param, max_n);
    int32_t *ids = malloc(sizeof *ids * (size_t)(n ? n : 1));
    if (!ids) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, arr) {
        int64_t x = 0;
        if (int_value(v, param, 0, INT32_MAX, &x, e)) {
            free(ids);
            return 400;
        }
        ids[i++] = (int32_t)x;
    }
    *out = ids;
    *n_out = (size_t)n;
    return 0;
}

/* prompt: string | [string] | [int] | [[int]] */
static int parse_prompt(ds_oai_request *r, const cJSON *root, ds_oai_error *e) {
    const cJSON *p = field(root, "prompt");
    if (!p) return BAD(e, "prompt", "'prompt' is required");
    if (cJSON_IsString(p)) {
        if (!(r->prompts = calloc(1, sizeof *r->prompts))) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
        r->n_prompts = 1;
        r->prompts[0].text = p->valuestring;
        r->prompts[0].text_len = strlen(p->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(p)) return BAD(e, "prompt", "'prompt' must be a string, an array of strings, or token ids");
    int n = cJSON_GetArraySize(p);
    if (n == 0) return BAD(e, "prompt", "'prompt' must not be empty");
    const cJSON *first = p->child;
    if (cJSON_IsNumber(first)) { /* one prompt of token ids */
        if (!(r->prompts = calloc(1, sizeof *r->prompts))) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
        r->n_prompts = 1;
        return token_array(p, "prompt", &r->prompts[0].tokens, &r->prompts[0].n_tokens, SIZE_MAX, e);
    }
    if (n > DS_OAI_MAX_PROMPTS) return BAD(e, "prompt", "'prompt' has more than %d entries", DS_OAI_MAX_PROMPTS);
    if (!(r->prompts = calloc((size_t)n, sizeof *r->prompts))) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    r->n_prompts = (size_t)n;
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, p) {
        ds_oai_prompt *dst = &r->prompts[i++];
        if (cJSON_IsString(first) && cJSON_IsString(v)) {
            dst->text = v->valuestring;
            dst->text_len = strlen(v->valuestring);
        } else if (cJSON_IsArray(first) && cJSON_IsArray(v) && cJSON_GetArraySize(v) > 0) {
            int st = token_array(v, "prompt", &dst->tokens, &dst->n_tokens, SIZE_MAX, e);
            if (st) return st;
        } else {
            return BAD(e, "prompt", "'prompt' entries must all be strings or all be non-empty token arrays");
        }
    }
    return 0;
}

/* content: string | null | [{type:"text", text}]; parts are joined with "\n" as vLLM does. */
static int parse_content(ds_oai_message *m, const cJSON *c, size_t idx, ds_oai_error *e) {
    char param[96];
    snprintf(param, sizeof param, "messages[%zu].content", idx);
    ds_sb sb;
    ds_sb_init(&sb);
    ds_sb_puts(&sb, ""); /* so that an empty content is "" rather than NULL */
    if (c && cJSON_IsString(c)) {
        ds_sb_puts(&sb, c->valuestring);
    } else if (c && cJSON_IsArray(c)) {
        size_t j = 0;
        const cJSON *part;
        cJSON_ArrayForEach(part, c) {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
            snprintf(param, sizeof param, "messages[%zu].content[%zu]", idx, j);
            if (!cJSON_IsObject(part) || !cJSON_IsString(type)) {
                ds_sb_free(&sb);
                return BAD(e, param, "'%s' must be an object with a 'type'", param);
            }
            if (strcmp(type->valuestring, "text") != 0) {
                ds_sb_free(&sb);
                return BAD(e, param, "content part type '%.40s' is not supported (text only)", type->valuestring);
            }
            if (!cJSON_IsString(text)) {
                ds_sb_free(&sb);
                return BAD(e, param, "'%s.text' must be a string", param);
            }
            if (j++) ds_sb_puts(&sb, "\n");
            ds_sb_puts(&sb, text->valuestring);
        }
    } else if (c) {
        ds_sb_free(&sb);
        return BAD(e, param, "'%s' must be a string or an array of content parts", param);
    }
    if (!ds_sb_ok(&sb)) {
        ds_sb_free(&sb);
        return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    }
    m->content = sb.data;
    m->content_len = sb.len;
    return 0;
}

static int parse_messages(ds_oai_request *r, const cJSON *root, ds_oai_error *e) {
    const cJSON *ms = field(root, "messages");
    if (!ms) return BAD(e, "messages", "'messages' is required");
    if (!cJSON_IsArray(ms)) return BAD(e, "messages", "'messages' must be an array");
    int n = cJSON_GetArraySize(ms);
    if (n == 0) return BAD(e, "messages", "'messages' must not be empty");
    if (!(r->messages = calloc((size_t)n, sizeof *r->messages))) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    r->n_messages = (size_t)n;
    size_t i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, ms) {
        char param[96];
        ds_oai_message *dst = &r->messages[i];
        if (!cJSON_IsObject(m)) {
            snprintf(param, sizeof param, "messages[%zu]", i);
            return BAD(e, param, "'%s' must be an object", param);
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role) || !role->valuestring[0]) {
            snprintf(param, sizeof param, "messages[%zu].role", i);
            return BAD(e, param, "'%s' must be a non-empty string", param);
        }
        dst->role = role->valuestring;
        const cJSON *name = field(m, "name");
        if (name && !cJSON_IsString(name)) {
            snprintf(param, sizeof param, "messages[%zu].name", i);
            return BAD(e, param, "'%s' must be a string", param);
        }
        dst->name = name ? name->valuestring : NULL;
        int st = parse_content(dst, field(m, "content"), i, e);
        if (st) return st;
        i++;
    }
    return 0;
}

/* One stop string: bounded, because every choice of the request holds its own copy. */
static int add_stop(ds_oai_request *r, const char *str, ds_oai_error *e) {
    size_t n = strlen(str);
    if (n > DS_OAI_MAX_STOP_BYTES)
        return BAD(e, "stop", "'stop' strings may be at most %d bytes, got %zu", DS_OAI_MAX_STOP_BYTES, n);
    if (n) r->stop[r->n_stop++] = str;
    return 0;
}

/* stop: string | [string] (<= 4); empty strings are dropped (they would match everywhere). */
static int parse_stop(ds_oai_request *r, const cJSON *root, ds_oai_error *e) {
    const cJSON *s = field(root, "stop");
    if (!s) return 0;
    if (cJSON_IsString(s)) return add_stop(r, s->valuestring, e);
    if (!cJSON_IsArray(s)) return BAD(e, "stop", "'stop' must be a string or an array of strings");
    if (cJSON_GetArraySize(s) > DS_OAI_MAX_STOP_STRS)
        return BAD(e, "stop", "'stop' may hold at most %d strings", DS_OAI_MAX_STOP_STRS);
    const cJSON *v;
    cJSON_ArrayForEach(v, s) {
        if (!cJSON_IsString(v)) return BAD(e, "stop", "'stop' entries must be strings");
        int st = add_stop(r, v->valuestring, e);
        if (st) return st;
    }
    return 0;
}

/* logit_bias: {"<token id>": -100..100} */
static int parse_logit_bias(ds_oai_request *r, const cJSON *root, ds_oai_error *e) {
    const cJSON *lb = field(root, "logit_bias");
    if (!lb) return 0;
    if (!cJSON_IsObject(lb)) return BAD(e, "logit_bias", "'logit_bias' must be an object");
    int n = cJSON_GetArraySize(lb);
    if (n > DS_OAI_MAX_LOGIT_BIAS) return BAD(e, "logit_bias", "'logit_bias' has more than %d entries", DS_OAI_MAX_LOGIT_BIAS);
    if (n == 0) return 0;
    if (!(r->logit_bias_ = calloc((size_t)n, sizeof *r->logit_bias_))) return ds_oai_error_set(e, 500, NULL, NULL, "out of memory");
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, lb) {
        const char *k = v->string;
        size_t klen = strlen(k);
        if (klen == 0 || klen > 10 || strspn(k, "0123456789") != klen || strtoll(k, NULL, 10) > INT32_MAX)
            return BAD(e, "logit_bias", "'logit_bias' keys must be token ids, got \"%.32s\"", k);
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < -100 || v->valuedouble > 100)
            return BAD(e, "logit_bias", "'logit_bias' values must be numbers between -100 and 100");
        r->logit_bias_[i].token = (int32_t)strtol(k, NULL, 10);
        r->logit_bias_[i].bias = (float)v->valuedouble;
        i++;
    }
    r->sampling.logit_bias = r->logit_bias_;
    r->sampling.n_logit_bias = n;
    return 0;
}

static int parse_seed(ds_oai_request *r, const cJSON *root, ds_oai_error *e) {
    const cJSON *v = field(root, "seed");
    if (!v) return 0;
    /* Any 64-bit value, signed or not; doubles hold them exactly only up to 2^53, which is fine
     * for reproducibility because the same JSON always parses to the same double. */
    if (!is_integer(v) || v->valuedouble < -9223372036854775808.0 || v->valuedouble >= 18446744073709551616.0)
        return BAD(e, "seed", "'seed' must be a 64-bit integer");
    double d = v->valuedouble;
    r->sampling.seed = d < 0 ? (uint64_t)(int64_t)d : (uint64_t)d;
    r->sampling.has_seed = true;
    return 0;
}

static int parse_sampling(ds_oai_request *r, const cJSON *o, ds_oai_error *e) {
    ds_sampling_params *s = &r->sampling;
    int st;
    if ((st = get_num(o, "temperature", 0, 2, false, DS_OAI_MIN_TEMPERATURE, &s->temperature, e))) return st;
    if ((st = get_num(o, "top_p", 0, 1, true, DS_OAI_MIN_TOP_P, &s->top_p, e))) return st;
    if ((st = get_i32(o, "top_k", -1, INT32_MAX, &s->top_k, NULL, e))) return st;
    if ((st = get_num(o, "min_p", 0, 1, false, DS_OAI_MIN_TOP_P, &s->min_p, e))) return st;
    if ((st = get_num(o, "repetition_penalty", DS_OAI_MIN_REP_PENALTY, DS_OAI_MAX_REP_PENALTY, false, 0,
                      &s->repetition_penalty, e)))
        return st;
    if ((st = get_num(o, "presence_penalty", -2, 2, false, DS_OAI_MIN_TOP_P, &s->presence_penalty, e))) return st;
    if ((st = get_num(o, "frequency_penalty", -2, 2, false, DS_OAI_MIN_TOP_P, &s->frequency_penalty, e))) return st;
    if ((st = parse_seed(r, o, e))) return st;
    return parse_logit_bias(r, o, e);
}

static int parse_stop_ids(ds_oai_request *r, const cJSON *root, ds_oai_error *e) {
    const cJSON *v = field(root, "stop_token_ids");
    if (!v) return 0;
    if (!cJSON_IsArray(v)) return BAD(e, "stop_token_ids", "'stop_token_ids' must be an array of token ids");
    size_t n = 0;
    int st = token_array(v, "stop_token_ids", &r->stop_token_ids, &n, DS_OAI_MAX_STOP_IDS, e);
    r->n_stop_token_ids = (int32_t)n;
    return st;
}

/* Fields shared by both endpoints. */
static int parse_common(ds_oai_request *r, const cJSON *o, ds_oai_error *e) {
    int st;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(o, "model");
    if (!model || cJSON_IsNull(model)) return BAD(e, "model", "'model' is required");
    if (!cJSON_IsString(model)) return BAD(e, "model", "'model' must be a string");
    r->model = model->valuestring;
    if ((st = get_str(o, "adapter_id", &r->adapter_id, e)) || (st = get_str(o, "user", &r->user, e))) return st;
    if ((st = get_i32(o, "n", 1, 128, &r->n, NULL, e))) return st;
    if ((st = get_bool(o, "stream", &r->stream, e))) return st;
    const cJSON *so = field(o, "stream_options");
    if (so && !cJSON_IsObject(so)) return BAD(e, "stream_options", "'stream_options' must be an object");
    if (so) {
        const cJSON *iu = field(so, "include_usage");
        if (iu && !cJSON_IsBool(iu))
            return BAD(e, "stream_options.include_usage", "'stream_options.include_usage' must be a boolean");
        r->include_usage = iu && cJSON_IsTrue(iu);
    }
    if ((st = parse_stop(r, o, e)) || (st = parse_stop_ids(r, o, e))) return st;
    if ((st = get_bool(o, "include_stop_str_in_output", &r->include_stop_str_in_output, e)) ||
        (st = get_bool(o, "ignore_eos", &r->ignore_eos, e)) ||
        (st = get_bool(o, "skip_special_tokens", &r->skip_special_tokens, e)) ||
        (st = get_bool(o, "add_special_tokens", &r->add_special_tokens, e)))
        return st;
    const cJSON *cst = field(o, "content_special_tokens");
    if (cst && !cJSON_IsBool(cst)) return BAD(e, "content_special_tokens", "'content_special_tokens' must be a boolean");
    if (cst) r->content_special_tokens = cJSON_IsTrue(cst) ? 1 : 0;
    return parse_sampling(r, o, e);
}

/* max_tokens / max_completion_tokens, then min_tokens against it. */
static int parse_lengths(ds_oai_request *r, const cJSON *o, ds_oai_error *e) {
    bool given = false;
    int st = get_i32(o, "max_tokens", 1, INT32_MAX, &r->max_tokens, &given, e);
    if (!st && r->kind == DS_OAI_CHAT)
        st = get_i32(o, "max_completion_tokens", 1, INT32_MAX, &r->max_tokens, &given, e);
    if (!st) st = get_i32(o, "min_tokens", 0, INT32_MAX, &r->min_tokens, NULL, e);
    if (st) return st;
    if (given && r->min_tokens > r->max_tokens)
        return BAD(e, "min_tokens", "'min_tokens' (%d) must be <= max_tokens (%d)", (int)r->min_tokens, (int)r->max_tokens);
    return 0;
}

static int parse_logprobs(ds_oai_request *r, const cJSON *o, ds_oai_error *e) {
    if (r->kind == DS_OAI_COMPLETION) return get_i32(o, "logprobs", 0, 5, &r->logprobs, NULL, e);
    bool want = false, given = false;
    int32_t top = 0;
    int st = get_bool(o, "logprobs", &want, e);
    if (!st) st = get_i32(o, "top_logprobs", 0, DS_MAX_TOP_LOGPROBS, &top, &given, e);
    if (st) return st;
    if (given && top > 0 && !want)
        return BAD(e, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
    r->logprobs = want ? top : -1;
    return 0;
}

static void set_defaults(ds_oai_request *r, ds_oai_kind kind) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->max_tokens = kind == DS_OAI_COMPLETION ? 16 : 0;
    r->n = 1;
    r->logprobs = -1;
    r->skip_special_tokens = true;
    r->add_special_tokens = kind == DS_OAI_COMPLETION;
    r->content_special_tokens = -1;
    /* Same values as ds_sampling_default_params(); spelled out so this file does not need the
     * engine library to link (the parser is fuzzed on its own). */
    r->sampling.temperature = 1.0f;
    r->sampling.top_p = 1.0f;
    r->sampling.repetition_penalty = 1.0f;
}

cJSON *ds_oai_json_parse(const char *body, size_t len, ds_oai_error *e) {
    char why[96];
    cJSON *root = ds_json_parse_strict(body, len, why, sizeof why);
    if (!root) BAD(e, NULL, "request body %s", why);
    return root;
}

int ds_oai_request_parse(ds_oai_request *r, ds_oai_kind kind, const char *body, size_t len, ds_oai_error *e) {
    set_defaults(r, kind);
    cJSON *root = ds_oai_json_parse(body, len, e);
    if (!root) return e->status;
    r->json_ = root;
    int st = 0;
    if (!cJSON_IsObject(root)) st = BAD(e, NULL, "request body must be a JSON object");
    if (!st) st = parse_common(r, root, e);
    if (!st) st = parse_lengths(r, root, e);
    if (!st) st = parse_logprobs(r, root, e);
    if (!st && kind == DS_OAI_COMPLETION) st = parse_prompt(r, root, e);
    if (!st && kind == DS_OAI_COMPLETION) st = get_bool(root, "echo", &r->echo, e);
    if (!st && kind == DS_OAI_CHAT) st = parse_messages(r, root, e);
    if (st) {
        ds_oai_request_free(r);
        set_defaults(r, kind);
    }
    return st;
}

void ds_oai_request_free(ds_oai_request *r) {
    if (r->prompts)
        for (size_t i = 0; i < r->n_prompts; i++) free(r->prompts[i].tokens);
    free(r->prompts);
    if (r->messages)
        for (size_t i = 0; i < r->n_messages; i++) free(r->messages[i].content);
    free(r->messages);
    free(r->stop_token_ids);
    free(r->logit_bias_);
    cJSON_Delete(r->json_);
    memset(r, 0, sizeof *r);
}

void ds_oai_request_to_gen(const ds_oai_request *r, ds_gen_request *g) {
    g->max_tokens = r->max_tokens > 0 ? r->max_tokens : 0; /* 0: the engine gives the rest of the context */
    g->min_tokens = r->min_tokens;
    g->ignore_eos = r->ignore_eos;
    for (int i = 0; i < DS_MAX_STOP; i++) g->stop[i] = i < r->n_stop ? r->stop[i] : NULL;
    g->stop_token_ids = r->stop_token_ids;
    g->n_stop_token_ids = r->n_stop_token_ids;
    g->include_stop_str = r->include_stop_str_in_output;
    g->skip_special = r->skip_special_tokens;
    g->top_logprobs = r->logprobs;
    g->sampling = r->sampling;
}
