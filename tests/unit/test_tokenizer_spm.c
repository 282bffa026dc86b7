/* SentencePiece BPE from GGUF (tokenizer.ggml.model = "llama"; src/tokenizer/spm.c) against the ids
 * sentencepiece gives (tests/golden/gen_spm_golden.py → tests/data/tokenizer/spm/): exact ids for
 * leading, doubled and trailing spaces, newlines and tabs (byte fallback), digits, Chinese and emoji
 * (byte fallback), code, and text around <s> / </s>; BOS with add_special; decoding back to the text
 * (with the dummy prefix's space) and nothing lost when special parsing is off. */
#include "ds/model.h"
#include "ds_test.h"
#include "tok_golden.h"

int main(void) {
    cJSON *g = tg_load(TOK_DATA "/spm/spm_golden.json");
    if (!g) SKIP("no SentencePiece golden (tests/golden/gen_spm_golden.py)");
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_weights = false;
    ds_err err = {{0}};
    ds_model *m = ds_model_load(TOK_DATA "/spm/tokenizer.gguf", &mp, &err);
    CHECK_MSG(m && m->tok, "%s", err.msg);
    if (!m || !m->tok) return ds_model_free(m), cJSON_Delete(g), ds_test_result();
    const ds_tokenizer *t = m->tok;
    CHECK_EQ_INT(ds_tokenizer_n_vocab(t), (int)cJSON_GetObjectItem(g, "vocab_size")->valuedouble);
    CHECK_EQ_INT(ds_tokenizer_bos(t), 1);
    int n_cases = 0, n_fallback = 0;
    for (const cJSON *c = cJSON_GetObjectItem(g, "cases")->child; c; c = c->next, n_cases++) {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        size_t nw, n = 0;
        int32_t *want = tg_ids(cJSON_GetObjectItem(c, "ids"), &nw), *ids = NULL;
        n_fallback += cJSON_IsTrue(cJSON_GetObjectItem(c, "byte_fallback"));
        CHECK(ds_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n) == 0);
        size_t first = 0;
        while (first < n && first < nw && ids[first] == want[first]) first++;
        CHECK_MSG(n == nw && first == n, "'%s': %zu ids, want %zu (first differs at %zu)", text, n, nw, first);
        free(ids);
        CHECK(ds_tokenizer_encode(t, text, strlen(text), true, true, &ids, &n) == 0);
        CHECK_MSG(n == nw + 1 && ids[0] == 1 && !memcmp(ids + 1, want, nw * sizeof *ids), "'%s' with BOS", text);
        free(ids);
        if (!strstr(text, "<s>") && !strstr(text, "</s>") && nw) { /* decode: the dummy prefix's space + text */
            char *out = NULL;
            size_t len = 0;
            CHECK(ds_tokenizer_decode(t, want, nw, false, &out, &len) == 0);
            CHECK_MSG(out && len == strlen(text) + 1 && out[0] == ' ' && !memcmp(out + 1, text, len - 1),
                      "decode '%s' gave '%s'", text, out ? out : "(null)");
            free(out);
        }
        free(want);
    }
    /* special parsing off: "<s>" is text, never id 1 */
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(ds_tokenizer_encode(t, "<s>", 3, false, false, &ids, &n) == 0);
    bool has_bos = false;
    for (size_t i = 0; i < n; i++) has_bos |= ids[i] == 1;
    CHECK(n > 1 && !has_bos);
    free(ids);
    printf("spm: %d cases (%d with byte fallback) equal to sentencepiece\n", n_cases, n_fallback);
    CHECK(n_cases >= 10 && n_fallback >= 3);
    ds_model_free(m);
    cJSON_Delete(g);
    return ds_test_result();
}
