/* openai_req: table-driven valid/invalid bodies (status + param), parsed values, and the
 * response formatting of openai_resp (checked by re-parsing with cJSON). */
#include <cjson/cJSON.h>
#include <string.h>

#include "ds_test.h"
#include "server/openai_req.h"
#include "server/openai_resp.h"

#define C DS_OAI_COMPLETION
#define CH DS_OAI_CHAT

typedef struct tcase {
    ds_oai_kind kind;
    const char *body;
    int status;        /* 0 = valid */
    const char *param; /* expected param on error ("" = null) */
} tcase;

static const tcase k_cases[] = {
    /* valid completions */
    {C, "{\"model\":\"m\",\"prompt\":\"hi\"}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":[\"a\",\"b\"],\"n\":2,\"stream\":true,\"stream_options\":{\"include_usage\":true}}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":[1,2,3]}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":[[1,2],[3]]}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logprobs\":null,\"repetition_penalty\":1.0,\"ignore_eos\":true}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":0,\"top_p\":1,\"logprobs\":5,\"echo\":true,\"seed\":-1}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\"],\"logit_bias\":{\"50256\":-100,\"1\":100}}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"top_k\":-1,\"min_p\":0.05,\"stop_token_ids\":[2,3],\"min_tokens\":4,\"max_tokens\":4}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"unknown_field\":{\"deep\":[1,2]},\"adapter_id\":\"sql\",\"user\":\"u\"}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"presence_penalty\":-2,\"frequency_penalty\":2,\"skip_special_tokens\":false}", 0, NULL},
    /* invalid completions */
    {C, "", 400, ""},
    {C, "{\"model\":\"m\",\"prompt\":\"x\"", 400, ""},
    {C, "[1,2]", 400, ""},
    {C, "{\"prompt\":\"x\"}", 400, "model"},
    {C, "{\"model\":7,\"prompt\":\"x\"}", 400, "model"},
    {C, "{\"model\":\"m\"}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":[]}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":[\"a\",1]}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":[1,-2]}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":[1,2.5]}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":[[1],[]]}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":{\"a\":1}}", 400, "prompt"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"max_tokens\":0}", 400, "max_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"max_tokens\":\"16\"}", 400, "max_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"max_tokens\":1.5}", 400, "max_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"max_tokens\":1e300}", 400, "max_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":2.5}", 400, "temperature"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":-0.1}", 400, "temperature"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":\"hot\"}", 400, "temperature"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"top_p\":0}", 400, "top_p"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"top_p\":1.01}", 400, "top_p"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"n\":0}", 400, "n"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"n\":129}", 400, "n"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 400, "stop"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stop\":[1]}", 400, "stop"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stop\":5}", 400, "stop"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stream\":\"yes\"}", 400, "stream"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stream_options\":[]}", 400, "stream_options"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stream_options\":{\"include_usage\":1}}", 400, "stream_options.include_usage"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logprobs\":6}", 400, "logprobs"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logprobs\":true}", 400, "logprobs"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"echo\":1}", 400, "echo"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"seed\":\"1\"}", 400, "seed"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"seed\":0.5}", 400, "seed"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"presence_penalty\":2.1}", 400, "presence_penalty"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"frequency_penalty\":-3}", 400, "frequency_penalty"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logit_bias\":{\"abc\":1}}", 400, "logit_bias"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logit_bias\":{\"-1\":1}}", 400, "logit_bias"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logit_bias\":{\"99999999999\":1}}", 400, "logit_bias"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logit_bias\":{\"5\":101}}", 400, "logit_bias"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logit_bias\":[1]}", 400, "logit_bias"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"user\":5}", 400, "user"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"top_k\":-2}", 400, "top_k"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"min_p\":1.5}", 400, "min_p"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"repetition_penalty\":0}", 400, "repetition_penalty"},
    /* issue 14: nothing after the JSON value, no NUL in any string */
    {C, "{\"model\":\"m\",\"prompt\":\"hi\"} \r\n\t", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"hi\"} x", 400, ""},
    {C, "{\"model\":\"m\",\"prompt\":\"hi\"}{}", 400, ""},
    {C, "{\"model\":\"m\",\"prompt\":\"a\\u0000b\"}", 400, ""},
    {C, "{\"model\":\"m\\u0000x\",\"prompt\":\"a\"}", 400, ""},
    {C, "{\"model\":\"m\",\"prompt\":\"a\\\\u0000b\"}", 0, NULL}, /* an escaped backslash, then text */
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\\u0000y\"}]}", 400, ""},
    /* issue 14: inside the old ranges but inf/NaN logits (or a 0 after the float conversion) */
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":1e-45}", 400, "temperature"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":0.0009}", 400, "temperature"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":0.001}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"temperature\":1e999}", 400, "temperature"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"top_p\":1e-300}", 400, "top_p"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"min_p\":1e-40}", 400, "min_p"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"repetition_penalty\":1e-38}", 400, "repetition_penalty"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"repetition_penalty\":1e6}", 400, "repetition_penalty"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"repetition_penalty\":100}", 0, NULL},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"presence_penalty\":-1e-30}", 400, "presence_penalty"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"frequency_penalty\":-1e999}", 400, "frequency_penalty"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"logit_bias\":{\"5\":1e999}}", 400, "logit_bias"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stop_token_ids\":[1,\"2\"]}", 400, "stop_token_ids"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"stop_token_ids\":3}", 400, "stop_token_ids"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"ignore_eos\":\"true\"}", 400, "ignore_eos"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"include_stop_str_in_output\":0}", 400, "include_stop_str_in_output"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"skip_special_tokens\":null,\"add_special_tokens\":2}", 400, "add_special_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"min_tokens\":5,\"max_tokens\":4}", 400, "min_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"min_tokens\":-1}", 400, "min_tokens"},
    {C, "{\"model\":\"m\",\"prompt\":\"x\",\"adapter_id\":[]}", 400, "adapter_id"},
    /* valid chat */
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 0, NULL},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]}]}", 0, NULL},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"assistant\",\"content\":null}],\"logprobs\":true,\"top_logprobs\":20}", 0, NULL},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"name\":\"bob\"}],\"max_completion_tokens\":5,\"max_tokens\":9}", 0, NULL},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":0}", 0, NULL},
    /* invalid chat */
    {CH, "{\"model\":\"m\"}", 400, "messages"},
    {CH, "{\"model\":\"m\",\"messages\":[]}", 400, "messages"},
    {CH, "{\"model\":\"m\",\"messages\":{}}", 400, "messages"},
    {CH, "{\"model\":\"m\",\"messages\":[\"hi\"]}", 400, "messages[0]"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"content\":\"hi\"}]}", 400, "messages[0].role"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"\",\"content\":\"b\"}]}", 400, "messages[1].role"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400, "messages[0].content"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{}}]}]}", 400, "messages[0].content[0]"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\"}]}]}", 400, "messages[0].content[1]"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[7]}]}", 400, "messages[0].content[0]"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"name\":1}]}", 400, "messages[0].name"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":3}", 400, "top_logprobs"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,\"top_logprobs\":21}", 400, "top_logprobs"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":2}", 400, "logprobs"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_completion_tokens\":0}", 400, "max_completion_tokens"},
    {CH, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"temperature\":3}", 400, "temperature"},
};

static void test_table(void) {
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        const tcase *tc = &k_cases[i];
        ds_oai_request r;
        ds_oai_error e;
        memset(&e, 0, sizeof e);
        int st = ds_oai_request_parse(&r, tc->kind, tc->body, strlen(tc->body), &e);
        CHECK_MSG(st == tc->status, "case %zu (%s): status %d, want %d (%s)", i, tc->body, st, tc->status, e.message);
        if (tc->status && st == tc->status) {
            CHECK_MSG(e.status == tc->status, "case %zu: e.status %d", i, e.status);
            CHECK_MSG(strcmp(e.param, tc->param) == 0, "case %zu (%s): param '%s', want '%s'", i, tc->body, e.param, tc->param);
            CHECK_MSG(strcmp(e.type, "invalid_request_error") == 0, "case %zu: type %s", i, e.type);
            CHECK_MSG(e.message[0] != '\0', "case %zu: empty message", i);
        }
        ds_oai_request_free(&r);
    }
}

/* Parses body, returns the status; *param gets the error's param. */
static int parse_status(ds_oai_kind kind, const char *body, char *param, size_t cap) {
    ds_oai_request r;
    ds_oai_error e;
    memset(&e, 0, sizeof e);
    int st = ds_oai_request_parse(&r, kind, body, strlen(body), &e);
    snprintf(param, cap, "%s", st ? e.param : "");
    ds_oai_request_free(&r);
    return st;
}

/* issue 14: what one small body can make every choice hold is bounded (stop bytes; n x prompts is
 * capped by the handler, GEN_MAX_CHOICES). */
static void test_amplification_limits(void) {
    char stop[DS_OAI_MAX_STOP_BYTES + 2], body[8192], param[96];
    memset(stop, 's', sizeof stop - 1);
    stop[DS_OAI_MAX_STOP_BYTES] = 0; /* exactly the limit: fine */
    snprintf(body, sizeof body, "{\"model\":\"m\",\"prompt\":\"x\",\"stop\":[\"a\",\"%s\"]}", stop);
    CHECK_EQ_INT(parse_status(C, body, param, sizeof param), 0);
    stop[DS_OAI_MAX_STOP_BYTES] = 's', stop[DS_OAI_MAX_STOP_BYTES + 1] = 0;
    snprintf(body, sizeof body, "{\"model\":\"m\",\"prompt\":\"x\",\"stop\":[\"a\",\"%s\"]}", stop);
    CHECK_EQ_INT(parse_status(C, body, param, sizeof param), 400);
    CHECK(!strcmp(param, "stop"));
    snprintf(body, sizeof body, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stop\":\"%s\"}",
             stop);
    CHECK_EQ_INT(parse_status(CH, body, param, sizeof param), 400);
    CHECK(!strcmp(param, "stop"));
}

static void test_values_completion(void) {
    const char *body = "{\"model\":\"sql-lora\",\"prompt\":[[5,6,7],[8]],\"max_tokens\":64,\"temperature\":0.5,"
                       "\"top_p\":0.9,\"n\":3,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                       "\"stop\":[\"\\n\",\"\",\"END\"],\"logprobs\":2,\"seed\":42,\"logit_bias\":{\"7\":-5.5},"
                       "\"top_k\":40,\"min_p\":0.1,\"repetition_penalty\":1.1,\"stop_token_ids\":[2],"
                       "\"include_stop_str_in_output\":true,\"ignore_eos\":true,\"min_tokens\":3,"
                       "\"skip_special_tokens\":false,\"add_special_tokens\":false,\"adapter_id\":\"a1\"}";
    ds_oai_request r;
    ds_oai_error e;
    CHECK_EQ_INT(ds_oai_request_parse(&r, C, body, strlen(body), &e), 0);
    CHECK(strcmp(r.model, "sql-lora") == 0);
    CHECK(r.adapter_id && strcmp(r.adapter_id, "a1") == 0);
    CHECK_EQ_INT(r.n_prompts, 2);
    CHECK(r.prompts[0].text == NULL && r.prompts[0].n_tokens == 3 && r.prompts[0].tokens[2] == 7);
    CHECK(r.prompts[1].n_tokens == 1 && r.prompts[1].tokens[0] == 8);
    CHECK_EQ_INT(r.max_tokens, 64);
    CHECK_EQ_INT(r.n, 3);
    CHECK(r.stream && r.include_usage);
    CHECK_EQ_INT(r.n_stop, 2); /* the empty stop string is dropped */
    CHECK(strcmp(r.stop[0], "\n") == 0 && strcmp(r.stop[1], "END") == 0 && r.stop[2] == NULL);
    CHECK_EQ_INT(r.logprobs, 2);
    CHECK(r.sampling.has_seed && r.sampling.seed == 42);
    CHECK_EQ_INT(r.sampling.n_logit_bias, 1);
    CHECK(r.sampling.logit_bias[0].token == 7 && r.sampling.logit_bias[0].bias == -5.5f);
    CHECK_EQ_INT(r.sampling.top_k, 40);
    CHECK_NEAR(r.sampling.temperature, 0.5, 1e-6);
    CHECK_NEAR(r.sampling.top_p, 0.9, 1e-6);
    CHECK_NEAR(r.sampling.min_p, 0.1, 1e-6);
    CHECK_NEAR(r.sampling.repetition_penalty, 1.1, 1e-6);
    CHECK(r.n_stop_token_ids == 1 && r.stop_token_ids[0] == 2);
    CHECK(r.include_stop_str_in_output && r.ignore_eos && !r.skip_special_tokens && !r.add_special_tokens);
    CHECK_EQ_INT(r.min_tokens, 3);

    ds_gen_request g;
    memset(&g, 0, sizeof g);
    ds_oai_request_to_gen(&r, &g);
    CHECK_EQ_INT(g.max_tokens, 64);
    CHECK_EQ_INT(g.min_tokens, 3);
    CHECK(g.ignore_eos && g.include_stop_str && !g.skip_special);
    CHECK(g.stop[0] == r.stop[0] && g.stop[1] == r.stop[1] && g.stop[2] == NULL);
    CHECK_EQ_INT(g.top_logprobs, 2);
    CHECK(g.sampling.logit_bias == r.sampling.logit_bias && g.n_stop_token_ids == 1);
    ds_oai_request_free(&r);
    ds_oai_request_free(&r); /* double free is a no-op */
}

static void test_values_defaults(void) {
    const char *body = "{\"model\":\"m\",\"prompt\":\"hello\",\"seed\":-1}";
    ds_oai_request r;
    ds_oai_error e;
    CHECK_EQ_INT(ds_oai_request_parse(&r, C, body, strlen(body), &e), 0);
    CHECK_EQ_INT(r.max_tokens, 16);
    CHECK_EQ_INT(r.n, 1);
    CHECK_EQ_INT(r.logprobs, -1);
    CHECK(!r.stream && !r.include_usage && !r.echo);
    CHECK(r.skip_special_tokens && r.add_special_tokens);
    CHECK(r.sampling.temperature == 1.0f && r.sampling.top_p == 1.0f && r.sampling.repetition_penalty == 1.0f);
    CHECK(r.sampling.has_seed && r.sampling.seed == UINT64_MAX);
    CHECK(r.n_prompts == 1 && r.prompts[0].text_len == 5 && strcmp(r.prompts[0].text, "hello") == 0);
    ds_oai_request_free(&r);

    const char *chat = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                       "{\"type\":\"text\",\"text\":\"b\"}]},{\"role\":\"assistant\"}],\"max_tokens\":9,"
                       "\"max_completion_tokens\":5,\"logprobs\":true}";
    CHECK_EQ_INT(ds_oai_request_parse(&r, CH, chat, strlen(chat), &e), 0);
    CHECK_EQ_INT(r.n_messages, 2);
    CHECK(strcmp(r.messages[0].content, "a\nb") == 0 && r.messages[0].content_len == 3);
    CHECK(strcmp(r.messages[1].role, "assistant") == 0 && r.messages[1].content[0] == '\0');
    CHECK_EQ_INT(r.max_tokens, 5); /* max_completion_tokens wins */
    CHECK_EQ_INT(r.logprobs, 0);   /* logprobs:true without top_logprobs */
    CHECK(!r.add_special_tokens);
    ds_oai_request_free(&r);

    const char *chat2 = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    CHECK_EQ_INT(ds_oai_request_parse(&r, CH, chat2, strlen(chat2), &e), 0);
    CHECK_EQ_INT(r.max_tokens, 0);
    ds_gen_request g;
    memset(&g, 0, sizeof g);
    ds_oai_request_to_gen(&r, &g);
    CHECK_EQ_INT(g.max_tokens, 0); /* the engine resolves 0 to the rest of the context */
    CHECK_EQ_INT(g.top_logprobs, -1);
    ds_oai_request_free(&r);
}

/* Parses JSON produced by the formatter; NULL (and a failed check) if invalid. */
static cJSON *reparse(const ds_sb *b) {
    CHECK(ds_sb_ok(b));
    cJSON *j = cJSON_ParseWithLength(b->data, b->len);
    CHECK_MSG(j != NULL, "invalid JSON: %s", b->data);
    return j;
}

static const char *jstr(const cJSON *o, const char *path0, const char *path1) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, path0);
    if (path1) v = cJSON_GetObjectItemCaseSensitive(v, path1);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static void test_error_json(void) {
    ds_oai_error e;
    ds_oai_error_set(&e, 404, "model", "model_not_found", "The model `%s` does not exist.", "x\"y");
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_error_json(&b, &e);
    cJSON *j = reparse(&b);
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(j, "error");
    CHECK(err && cJSON_GetArraySize(err) == 4);
    CHECK(strcmp(jstr(err, "message", NULL), "The model `x\"y` does not exist.") == 0);
    CHECK(strcmp(jstr(err, "type", NULL), "invalid_request_error") == 0);
    CHECK(strcmp(jstr(err, "param", NULL), "model") == 0);
    CHECK(strcmp(jstr(err, "code", NULL), "model_not_found") == 0);
    cJSON_Delete(j);

    ds_sb_reset(&b);
    ds_oai_error_set(&e, 503, NULL, NULL, "busy");
    ds_sse_error(&b, &e);
    CHECK(strncmp(b.data, "data: {\"error\":{", 16) == 0 && strstr(b.data, "\"param\":null,\"code\":null}}\n\n"));
    CHECK(strstr(b.data, "\"server_error\"") != NULL);
    ds_sb_free(&b);
    CHECK_EQ_INT(ds_oai_status_for(DS_ENOTFOUND), 404);
    CHECK_EQ_INT(ds_oai_status_for(DS_EBUSY), 503);
    CHECK_EQ_INT(ds_oai_status_for(DS_EINVAL), 400);
}

static void test_json_strings(void) {
    ds_sb b;
    ds_sb_init(&b);
    const char raw[] = "a\"\\\n\t\x01\xff\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xed\xa0\x80z";
    ds_sb_json_str(&b, raw, sizeof raw - 1);
    cJSON *j = reparse(&b);
    CHECK(cJSON_IsString(j));
    /* 0xff and the UTF-16 surrogate ED A0 80 become U+FFFD (one per bad byte), the rest survives. */
    if (cJSON_IsString(j))
        CHECK(strcmp(j->valuestring, "a\"\\\n\t\x01\xef\xbf\xbd\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"
                                     "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdz") == 0);
    cJSON_Delete(j);
    ds_sb_reset(&b);
    ds_sb_json_num(&b, -1.0 / 0.0);
    CHECK(strcmp(b.data, "-9999") == 0);
    ds_sb_free(&b);
}

static void test_completion_objects(void) {
    ds_oai_meta m;
    ds_oai_meta_init(&m, C, "m1");
    CHECK(strncmp(m.id, "cmpl-", 5) == 0 && strlen(m.id) == 5 + 32);
    ds_oai_meta m2;
    ds_oai_meta_init(&m2, CH, "m1");
    CHECK(strncmp(m2.id, "chatcmpl-", 9) == 0 && strcmp(m.id + 5, m2.id + 9) != 0);

    ds_oai_top tops[2] = {{"a", 1, -0.1f}, {"b", 1, -2.5f}};
    ds_oai_token_lp lp[2] = {{"a", 1, -0.1f, tops, 2, 0}, {"\xff", 1, -1.0f / 0.0f, tops, 1, 1}};
    ds_oai_choice ch = {.index = 0, .text = "a\xff", .len = 2, .finish = DS_FINISH_LENGTH, .lp = lp, .n_lp = 2};
    ds_oai_usage u = {5, 2};
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_response_json(&b, &m, &ch, 1, &u);
    cJSON *j = reparse(&b);
    CHECK(strcmp(jstr(j, "object", NULL), "text_completion") == 0 && strcmp(jstr(j, "id", NULL), m.id) == 0);
    const cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(c0 && strcmp(jstr(c0, "finish_reason", NULL), "length") == 0);
    const cJSON *lpj = cJSON_GetObjectItem(c0, "logprobs");
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(lpj, "tokens")) == 2);
    CHECK(cJSON_GetArrayItem(cJSON_GetObjectItem(lpj, "token_logprobs"), 1)->valuedouble == -9999.0);
    CHECK(cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(lpj, "top_logprobs"), 0)) == 2);
    CHECK(cJSON_GetArrayItem(cJSON_GetObjectItem(lpj, "text_offset"), 1)->valueint == 1);
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "usage"), "total_tokens")->valueint == 7);
    cJSON_Delete(j);

    ds_sb_reset(&b);
    ch.lp = NULL;
    ch.finish = DS_FINISH_STOP;
    ds_oai_response_json(&b, &m2, &ch, 1, &u);
    j = reparse(&b);
    c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(strcmp(jstr(j, "object", NULL), "chat.completion") == 0);
    CHECK(strcmp(jstr(c0, "message", "role"), "assistant") == 0 && jstr(c0, "message", "content"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(c0, "logprobs")) && strcmp(jstr(c0, "finish_reason", NULL), "stop") == 0);
    cJSON_Delete(j);
    ds_sb_free(&b);
}

static void test_chunks(void) {
    ds_oai_meta m;
    ds_oai_meta_init(&m, CH, "m");
    ds_sb b, ev;
    ds_sb_init(&b);
    ds_sb_init(&ev);
    ds_oai_delta d = {.first = true};
    ds_oai_chunk_json(&b, &m, &d);
    CHECK(strstr(b.data, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}") && strstr(b.data, "\"finish_reason\":null"));
    CHECK(strstr(b.data, "\"object\":\"chat.completion.chunk\""));
    ds_sse_data(&ev, b.data, b.len);
    CHECK(strncmp(ev.data, "data: {", 7) == 0 && ev.data[ev.len - 1] == '\n' && ev.data[ev.len - 2] == '\n');

    ds_oai_top t = {"hi", 2, -0.5f};
    ds_oai_token_lp lp = {"hi", 2, -0.5f, &t, 1, 0};
    ds_sb_reset(&b);
    d = (ds_oai_delta){.text = "hi", .len = 2, .lp = &lp, .n_lp = 1};
    ds_oai_chunk_json(&b, &m, &d);
    cJSON *j = reparse(&b);
    const cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(strcmp(jstr(c0, "delta", "content"), "hi") == 0);
    const cJSON *content = cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "logprobs"), "content");
    CHECK(cJSON_GetArraySize(content) == 1);
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetArrayItem(content, 0), "bytes")) == 2);
    cJSON_Delete(j);

    ds_sb_reset(&b);
    d = (ds_oai_delta){.finish = DS_FINISH_STOP};
    ds_oai_chunk_json(&b, &m, &d);
    CHECK(strstr(b.data, "\"delta\":{}") && strstr(b.data, "\"finish_reason\":\"stop\""));

    ds_sb_reset(&b);
    ds_oai_usage u = {3, 4};
    ds_oai_usage_chunk_json(&b, &m, &u);
    j = reparse(&b);
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(j, "choices")) == 0 && strcmp(jstr(j, "id", NULL), m.id) == 0);
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "usage"), "completion_tokens")->valueint == 4);
    cJSON_Delete(j);

    ds_oai_meta mc;
    ds_oai_meta_init(&mc, C, "m");
    ds_sb_reset(&b);
    d = (ds_oai_delta){.index = 1, .text = "x", .len = 1};
    ds_oai_chunk_json(&b, &mc, &d);
    j = reparse(&b);
    c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(strcmp(jstr(j, "object", NULL), "text_completion") == 0 && strcmp(jstr(c0, "text", NULL), "x") == 0);
    CHECK(cJSON_GetObjectItem(c0, "index")->valueint == 1);
    cJSON_Delete(j);

    ds_sb_reset(&ev);
    ds_sse_done(&ev);
    ds_sse_comment(&ev, "ping\ndata: x");
    CHECK(strcmp(ev.data, "data: [DONE]\n\n: ping\n\n") == 0);
    ds_sb_free(&b);
    ds_sb_free(&ev);
}

static void test_models(void) {
    ds_oai_model_entry ms[2] = {{.id = "base", .created = 1, .max_model_len = 2048},
                                {.id = "sql", .created = 2, .parent = "base", .root = "/adapters/sql"}};
    ds_sb b;
    ds_sb_init(&b);
    ds_oai_models_json(&b, ms, 2);
    cJSON *j = reparse(&b);
    CHECK(strcmp(jstr(j, "object", NULL), "list") == 0);
    const cJSON *d0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "data"), 0);
    const cJSON *d1 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "data"), 1);
    CHECK(strcmp(jstr(d0, "root", NULL), "base") == 0 && cJSON_IsNull(cJSON_GetObjectItem(d0, "parent")));
    CHECK(cJSON_GetObjectItem(d0, "max_model_len")->valueint == 2048);
    CHECK(strcmp(jstr(d1, "parent", NULL), "base") == 0 && !cJSON_GetObjectItem(d1, "max_model_len"));
    CHECK(strcmp(jstr(d1, "object", NULL), "model") == 0 && strcmp(jstr(d1, "owned_by", NULL), "deltaserve") == 0);
    cJSON_Delete(j);
    ds_sb_free(&b);
}

int main(void) {
    test_table();
    test_amplification_limits();
    test_values_completion();
    test_values_defaults();
    test_error_json();
    test_json_strings();
    test_completion_objects();
    test_chunks();
    test_models();
    return ds_test_result();
}
