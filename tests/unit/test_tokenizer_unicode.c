/* Every code point classified as HF `tokenizers` does (tests/data/tokenizer/unicode_classes.json, recorded
 * by tests/golden/gen_tokenizer_golden.py): the pre-tokenizer regex classes as deltaserve hands them to
 * PCRE2, Digits' is_numeric, and the \w / \s checks around added tokens. A PCRE2 or utf8proc with
 * different Unicode tables than the ones tok_unicode.c was measured against fails here, not in the
 * field. */
#include "ds_test.h"
#include "tokenizer/tok_internal.h"
#include "tok_golden.h"

#define N_CP 0x110000

/* Marks the members of one class from its [lo, hi] ranges. */
static bool load_class(const cJSON *root, const char *name, uint8_t *member) {
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, name);
    CHECK_MSG(cJSON_IsArray(arr), "unicode_classes.json has no \"%s\"", name);
    if (!cJSON_IsArray(arr)) return false;
    memset(member, 0, N_CP);
    for (const cJSON *r = arr->child; r; r = r->next) {
        int lo = cJSON_GetArrayItem(r, 0)->valueint, hi = cJSON_GetArrayItem(r, 1)->valueint;
        for (int c = lo; c <= hi && c < N_CP; c++) member[c] = 1;
    }
    return true;
}

static bool is_surrogate(uint32_t c) { return c >= 0xD800 && c < 0xE000; }

/* A single-class pattern, run anchored on each code point. */
static void check_regex_class(const cJSON *root, const char *name, const char *hf_pattern, uint8_t *member) {
    if (!load_class(root, name, member)) return;
    char *pat = tok_regex_for_pcre2(hf_pattern);
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    CHECK_MSG(code != NULL, "pattern %s does not compile", pat);
    free(pat);
    if (!code) return;
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    int bad = 0;
    for (uint32_t c = 1; c < N_CP; c++) {
        if (is_surrogate(c)) continue;
        uint8_t u[4];
        size_t n = tok_utf8_encode(c, u);
        bool m = pcre2_match(code, u, n, 0, PCRE2_ANCHORED, md, NULL) > 0;
        if (m != member[c] && bad++ < 5)
            fprintf(stderr, "%s: U+%04X ours %d, HF %d\n", hf_pattern, (unsigned)c, m, member[c]);
    }
    CHECK_MSG(bad == 0, "%s: %d code points classified differently from HF", hf_pattern, bad);
    pcre2_match_data_free(md);
    pcre2_code_free(code);
}

static void check_fn_class(const cJSON *root, const char *name, bool (*fn)(uint32_t), uint8_t *member) {
    if (!load_class(root, name, member)) return;
    int bad = 0;
    for (uint32_t c = 1; c < N_CP; c++) {
        if (is_surrogate(c)) continue;
        if (fn(c) != member[c] && bad++ < 5)
            fprintf(stderr, "%s: U+%04X ours %d, HF %d\n", name, (unsigned)c, fn(c), member[c]);
    }
    CHECK_MSG(bad == 0, "%s: %d code points classified differently from HF", name, bad);
}

/* The negated forms the patterns use must be exact complements, \S included. */
static void check_negations(uint8_t *member, const cJSON *root) {
    if (!load_class(root, "white_space", member)) return;
    char *pat = tok_regex_for_pcre2("\\S");
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    free(pat);
    CHECK(code != NULL);
    if (!code) return;
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    int bad = 0;
    for (uint32_t c = 1; c < N_CP; c++) {
        uint8_t u[4];
        if (is_surrogate(c)) continue;
        size_t n = tok_utf8_encode(c, u);
        bad += (pcre2_match(code, u, n, 0, PCRE2_ANCHORED, md, NULL) > 0) == member[c];
    }
    CHECK_EQ_INT(bad, 0);
    pcre2_match_data_free(md);
    pcre2_code_free(code);
}

int main(void) {
    cJSON *root = tg_load(TOK_DATA "/unicode_classes.json");
    CHECK(root != NULL);
    if (!root) return ds_test_result();
    uint8_t *member = malloc(N_CP);
    check_regex_class(root, "white_space", "\\s", member);
    check_regex_class(root, "letter", "\\p{L}", member);
    check_regex_class(root, "number", "\\p{N}", member);
    check_regex_class(root, "letter", "[\\p{L}]", member); /* the in-class splice */
    check_negations(member, root);
    check_fn_class(root, "numeric", tok_is_numeric, member);
    check_fn_class(root, "word", tok_is_word, member);
    check_fn_class(root, "rust_white_space", tok_is_white_space, member);
    free(member);
    cJSON_Delete(root);
    return ds_test_result();
}
