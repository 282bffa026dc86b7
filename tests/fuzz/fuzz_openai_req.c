/* libFuzzer: request-body validation for both endpoints, then the response formatter over
 * whatever strings survived (the output must stay valid, NUL-free JSON text). */
#include <stdint.h>
#include <string.h>

#include "server/openai_req.h"

static void format_back(const ds_oai_request *r) {
    ds_oai_meta m;
    ds_oai_meta_init(&m, r->kind, r->model);
    ds_sb b;
    ds_sb_init(&b);
    const char *text = r->kind == DS_OAI_CHAT ? r->messages[0].content : r->prompts[0].text;
    size_t len = r->kind == DS_OAI_CHAT ? r->messages[0].content_len : r->prompts[0].text_len;
    ds_oai_top top = {text, len, -1.0f};
    ds_oai_token_lp lp = {text, len, -0.5f, &top, 1, 0};
    ds_oai_choice ch = {.text = text, .len = len, .finish = DS_FINISH_STOP, .lp = &lp, .n_lp = 1};
    ds_oai_usage u = {1, 1};
    ds_oai_response_json(&b, &m, &ch, 1, &u);
    ds_oai_delta d = {.text = text, .len = len, .lp = &lp, .n_lp = 1};
    ds_oai_chunk_json(&b, &m, &d);
    DS_ASSERT(ds_sb_ok(&b) && strlen(b.data) == b.len);
    ds_sb_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (int k = 0; k < 2; k++) {
        ds_oai_request r;
        ds_oai_error e;
        memset(&e, 0, sizeof e);
        int st = ds_oai_request_parse(&r, k ? DS_OAI_CHAT : DS_OAI_COMPLETION, (const char *)data, size, &e);
        if (st == 0) {
            ds_gen_request g;
            memset(&g, 0, sizeof g);
            ds_oai_request_to_gen(&r, &g);
            /* max_tokens 0: chat without one, the engine gives the rest of the context */
            DS_ASSERT((g.max_tokens >= 1 || (k && g.max_tokens == 0)) && r.n >= 1 && r.n <= 128);
            if (!(r.kind == DS_OAI_COMPLETION && r.prompts[0].text == NULL)) format_back(&r);
        } else {
            DS_ASSERT(st == 400 || st == 500);
            DS_ASSERT(e.status == st && e.message[0]);
            ds_sb b;
            ds_sb_init(&b);
            ds_oai_error_json(&b, &e);
            ds_sb_free(&b);
        }
        ds_oai_request_free(&r);
    }
    return 0;
}
