/* Chat templates: ds_chat_render must equal transformers' apply_chat_template output recorded in
 * tests/data/tokenizer/chat_golden.json (SmolLM2's real ChatML template, Llama-3, Llama-2, Mistral),
 * including the conversations those templates refuse. */
#include "ds_test.h"
#include "tok_golden.h"

static ds_chat_format expected_format(const char *name) {
    if (!strcmp(name, "llama3")) return DS_CHAT_LLAMA3;
    if (!strcmp(name, "llama2")) return DS_CHAT_LLAMA2;
    if (!strcmp(name, "mistral")) return DS_CHAT_MISTRAL;
    return DS_CHAT_CHATML;
}

static void run_case(const cJSON *templates, const cJSON *c, int idx) {
    const char *name = cJSON_GetObjectItemCaseSensitive(c, "template")->valuestring;
    const char *tmpl =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(templates, name), "template")->valuestring;
    bool gen = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt"));
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c, "messages"),
                *want = cJSON_GetObjectItemCaseSensitive(c, "output");
    ds_chat_format fmt = ds_chat_detect(tmpl);
    CHECK_EQ_INT(fmt, expected_format(name));
    size_t n = (size_t)cJSON_GetArraySize(msgs), i = 0;
    ds_chat_msg *m = calloc(n + 1, sizeof *m);
    for (const cJSON *e = msgs->child; e; e = e->next, i++) {
        m[i].role = cJSON_GetObjectItemCaseSensitive(e, "role")->valuestring;
        m[i].content = cJSON_GetObjectItemCaseSensitive(e, "content")->valuestring;
    }
    char *sys = ds_chat_default_system(tmpl), *out = NULL;
    int rc = ds_chat_render(fmt, m, n, gen, sys, &out);
    if (cJSON_IsString(want)) {
        CHECK_MSG(rc == 0 && out && !strcmp(out, want->valuestring), "case %d (%s, gen=%d): got\n[%s]\nwant\n[%s]", idx,
                  name, gen, out ? out : "(error)", want->valuestring);
    } else {
        CHECK_MSG(rc == DS_EINVAL && out == NULL, "case %d (%s): HF refuses this conversation, got rc %d", idx, name,
                  rc);
    }
    free(out);
    free(sys);
    free(m);
}

static void test_golden(void) {
    cJSON *g = tg_load(TOK_DATA "/chat_golden.json");
    CHECK(g != NULL);
    if (!g) return;
    const cJSON *templates = cJSON_GetObjectItemCaseSensitive(g, "templates"),
                *cases = cJSON_GetObjectItemCaseSensitive(g, "cases");
    int idx = 0;
    for (const cJSON *c = cases->child; c; c = c->next) run_case(templates, c, idx++);
    CHECK(idx >= 80);
    /* Only the ChatML template carries a default system prompt. */
    char *sys = ds_chat_default_system(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(templates, "chatml_smollm2"), "template")
            ->valuestring);
    CHECK(sys && !strcmp(sys, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
    free(sys);
    CHECK(ds_chat_default_system(
              cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(templates, "llama3"), "template")
                  ->valuestring) == NULL);
    cJSON_Delete(g);
}

/* Default-system extraction from other ChatML templates, written the way they ship (\n escapes). */
static void test_default_system(void) {
    static const char qwen2[] =
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
    static const char qwen25[] =
        "{%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + "
        "'<|im_end|>\\n' }}\n    {%- else %}\n        {{- \"<|im_start|>system\\nYou are Qwen, it's \\\"great\\\"."
        "<|im_end|>\\n\" }}\n    {%- endif %}";
    static const char plain[] =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}";
    char *s = ds_chat_default_system(qwen2);
    CHECK(s && !strcmp(s, "You are a helpful assistant."));
    free(s);
    s = ds_chat_default_system(qwen25);
    CHECK_MSG(s && !strcmp(s, "You are Qwen, it's \"great\"."), "got [%s]", s ? s : "(null)");
    free(s);
    CHECK(ds_chat_default_system(plain) == NULL);
    CHECK(ds_chat_default_system(NULL) == NULL);
    CHECK_EQ_INT(ds_chat_detect(NULL), DS_CHAT_CHATML);
    CHECK_EQ_INT(ds_chat_detect(plain), DS_CHAT_CHATML);
}

static void test_refusals(void) {
    char *out = (char *)1;
    ds_chat_msg bad_role[] = {{"us<er", "hi"}};
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_CHATML, bad_role, 1, true, NULL, &out), DS_EINVAL);
    CHECK(out == NULL);
    ds_chat_msg null_content[] = {{"user", NULL}};
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_LLAMA3, null_content, 1, true, NULL, &out), DS_EINVAL);
    ds_chat_msg null_role[] = {{NULL, "x"}};
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_CHATML, null_role, 1, true, NULL, &out), DS_EINVAL);
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_CHATML, NULL, 0, true, NULL, &out), DS_EINVAL);
    CHECK_EQ_INT(ds_chat_render((ds_chat_format)42, bad_role, 1, true, NULL, &out), DS_EINVAL);
    ds_chat_msg ok[] = {{"user", "hi"}};
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_CHATML, ok, 1, false, NULL, NULL), DS_EINVAL);
    /* Mistral ignores default_system (it has no system role) rather than failing. */
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_MISTRAL, ok, 1, false, "sys", &out), 0);
    CHECK(out && !strcmp(out, "<s>[INST] hi [/INST]"));
    free(out);
    /* Llama-2 folds a default system prompt into the first turn. */
    CHECK_EQ_INT(ds_chat_render(DS_CHAT_LLAMA2, ok, 1, false, "be brief", &out), 0);
    CHECK(out && !strcmp(out, "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST]"));
    free(out);
}

int main(void) {
    test_golden();
    test_default_system();
    test_refusals();
    return ds_test_result();
}
