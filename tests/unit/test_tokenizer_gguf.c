/* SmolLM2's real tokenizer (49152 tokens, 48900 merges, `smollm` pre-tokenizer) against the committed
 * HF ids. The vocab comes straight from models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_model.sh)
 * through a small self-contained GGUF metadata reader, so CI needs neither Python nor the model loader;
 * SKIPs without the GGUF. When the generator has also exported models/SmolLM2-135M-Instruct.tokenizer.json
 * (git-ignored), the tokenizer.json loader is checked against the same ids. */
#include <unistd.h>

#include "ds_test.h"
#include "tok_golden.h"

#define GGUF_PATH DS_MODELS_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SMOL_JSON DS_MODELS_DIR "/SmolLM2-135M-Instruct.tokenizer.json"
#define SMOL_CFG DS_MODELS_DIR "/SmolLM2-135M-Instruct.tokenizer_config.json"

/* ---- a bounds-checked reader for the GGUF header's key/value pairs (ggml docs/gguf.md) ---- */

typedef struct rd {
    const uint8_t *p;
    size_t n, off;
    bool bad;
} rd;

static uint64_t rd_u(rd *r, size_t w) {
    uint64_t v = 0;
    if (r->bad || w > r->n - r->off) {
        r->bad = true;
        return 0;
    }
    for (size_t i = 0; i < w; i++) v |= (uint64_t)r->p[r->off + i] << (8 * i);
    r->off += w;
    return v;
}

static char *rd_str(rd *r) {
    uint64_t len = rd_u(r, 8);
    if (r->bad || len > r->n - r->off) {
        r->bad = true;
        return NULL;
    }
    char *s = malloc(len + 1);
    memcpy(s, r->p + r->off, len);
    s[len] = 0;
    r->off += len;
    return s;
}

static size_t scalar_size(uint32_t t) {
    static const uint8_t sz[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < 13 ? sz[t] : 0;
}

static void rd_skip(rd *r, uint32_t t, int depth) {
    if (t == 8) {
        free(rd_str(r));
    } else if (t == 9 && depth < 2) {
        uint32_t et = (uint32_t)rd_u(r, 4);
        uint64_t n = rd_u(r, 8);
        for (uint64_t i = 0; i < n && !r->bad; i++) rd_skip(r, et, depth + 1);
    } else if (scalar_size(t)) {
        rd_u(r, scalar_size(t));
    } else {
        r->bad = true;
    }
}

typedef struct gguf_tok {
    char **tokens, **merges, *pre, *tmpl;
    int32_t *types;
    size_t n_tok, n_merges, n_types;
    int32_t bos, eos, eot, pad;
    bool add_bos, add_eos;
} gguf_tok;

static char **rd_str_array(rd *r, size_t *n) {
    uint32_t et = (uint32_t)rd_u(r, 4);
    uint64_t cnt = rd_u(r, 8);
    if (et != 8 || cnt > r->n) {
        r->bad = true;
        return NULL;
    }
    char **v = calloc(cnt + 1, sizeof *v);
    for (uint64_t i = 0; i < cnt && !r->bad; i++) v[i] = rd_str(r);
    *n = (size_t)cnt;
    return v;
}

static void read_kv(rd *r, gguf_tok *g) {
    char *key = rd_str(r);
    uint32_t t = (uint32_t)rd_u(r, 4);
    if (!key) return;
    if (!strcmp(key, "tokenizer.ggml.tokens") && t == 9) {
        g->tokens = rd_str_array(r, &g->n_tok);
    } else if (!strcmp(key, "tokenizer.ggml.merges") && t == 9) {
        g->merges = rd_str_array(r, &g->n_merges);
    } else if (!strcmp(key, "tokenizer.ggml.token_type") && t == 9) {
        uint32_t et = (uint32_t)rd_u(r, 4);
        uint64_t cnt = rd_u(r, 8);
        if (et != 5 || cnt > r->n / 4) r->bad = true;
        g->types = calloc(cnt + 1, sizeof *g->types);
        for (uint64_t i = 0; i < cnt && !r->bad; i++) g->types[i] = (int32_t)rd_u(r, 4);
        g->n_types = (size_t)cnt;
    } else if ((!strcmp(key, "tokenizer.ggml.pre") || !strcmp(key, "tokenizer.chat_template")) && t == 8) {
        char **dst = !strcmp(key, "tokenizer.ggml.pre") ? &g->pre : &g->tmpl;
        free(*dst);
        *dst = rd_str(r);
    } else if (!strncmp(key, "tokenizer.ggml.", 15) && strstr(key, "_token_id") && (t == 4 || t == 5)) {
        int32_t v = (int32_t)rd_u(r, 4);
        if (strstr(key, ".bos_")) g->bos = v;
        if (strstr(key, ".eos_")) g->eos = v;
        if (strstr(key, ".eot_")) g->eot = v;
        if (strstr(key, ".padding_")) g->pad = v;
    } else if (!strncmp(key, "tokenizer.ggml.add_", 19) && t == 7) {
        bool v = rd_u(r, 1) != 0;
        if (strstr(key, "add_bos_token")) g->add_bos = v;
        if (strstr(key, "add_eos_token")) g->add_eos = v;
    } else {
        rd_skip(r, t, 0);
    }
    free(key);
}

static bool read_gguf_tok(const char *path, gguf_tok *g) {
    memset(g, 0, sizeof *g);
    g->bos = g->eos = g->eot = g->pad = -1;
    ds_file_map m;
    ds_err e = {{0}};
    if (ds_file_map_open(&m, path, &e)) return false;
    rd r = {m.data, m.size, 0, false};
    uint32_t magic = (uint32_t)rd_u(&r, 4), version = (uint32_t)rd_u(&r, 4);
    rd_u(&r, 8); /* n_tensors */
    uint64_t n_kv = rd_u(&r, 8);
    bool ok = magic == 0x46554747u && (version == 2 || version == 3);
    for (uint64_t i = 0; ok && i < n_kv && !r.bad; i++) read_kv(&r, g);
    ds_file_map_close(&m);
    return ok && !r.bad && g->tokens && g->merges;
}

static void free_gguf_tok(gguf_tok *g) {
    for (size_t i = 0; g->tokens && i < g->n_tok; i++) free(g->tokens[i]);
    for (size_t i = 0; g->merges && i < g->n_merges; i++) free(g->merges[i]);
    free(g->tokens);
    free(g->merges);
    free(g->types);
    free(g->pre);
    free(g->tmpl);
}

/* ---- tests ---- */

static ds_tokenizer *from_gguf(const gguf_tok *g) {
    ds_tokenizer_desc d = {
        .n_vocab = (int32_t)g->n_tok,
        .tokens = (const char *const *)g->tokens,
        .token_types = g->n_types == g->n_tok ? g->types : NULL,
        .n_merges = (int32_t)g->n_merges,
        .merges = (const char *const *)g->merges,
        .bos_id = g->bos,
        .eos_id = g->eos,
        .eot_id = g->eot,
        .pad_id = g->pad,
        .add_bos = g->add_bos,
        .add_eos = g->add_eos,
    };
    CHECK_EQ_INT(ds_tokenizer_pre_from_name(g->pre, &d.pre), 0);
    CHECK_EQ_INT(d.pre, DS_PRE_SMOLLM);
    ds_err e = {{0}};
    double t0 = ds_time_s();
    ds_tokenizer *t = ds_tokenizer_create(&d, &e);
    CHECK_MSG(t != NULL, "ds_tokenizer_create: %s", e.msg);
    printf("smollm2: built from GGUF metadata in %.3f s\n", ds_time_s() - t0);
    return t;
}

static void check_smollm_specials(const ds_tokenizer *t) {
    CHECK_EQ_INT(ds_tokenizer_n_vocab(t), 49152);
    CHECK_EQ_INT(ds_tokenizer_find(t, "<|im_start|>"), 1);
    CHECK_EQ_INT(ds_tokenizer_find(t, "<|im_end|>"), 2);
    CHECK_EQ_INT(ds_tokenizer_bos(t), 1);
    CHECK_EQ_INT(ds_tokenizer_eos(t), 2);
    CHECK_EQ_INT(ds_tokenizer_eot(t), 2); /* <|im_end|> ends a turn; <|endoftext|> is only EOG */
    CHECK(ds_tokenizer_is_eog(t, 0) && ds_tokenizer_is_eog(t, 2) && !ds_tokenizer_is_eog(t, 1));
    CHECK(ds_tokenizer_is_special(t, 5) && !ds_tokenizer_is_special(t, 100));
}

/* Encoding a whole chat prompt: the rendered template must tokenise with its markers as single ids. */
static void check_chat_prompt(const ds_tokenizer *t, const char *tmpl) {
    char *sys = ds_chat_default_system(tmpl);
    CHECK(sys && !strcmp(sys, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
    ds_chat_msg msgs[] = {{"user", "What is 2+2?"}};
    char *prompt = NULL;
    CHECK(ds_chat_render(ds_chat_detect(tmpl), msgs, 1, true, sys, &prompt) == 0);
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(prompt && ds_tokenizer_encode(t, prompt, strlen(prompt), true, true, &ids, &n) == 0);
    CHECK(n > 10 && ids[0] == 1 && ids[n - 1] == 198); /* ... <|im_start|> assistant \n */
    free(ids);
    free(prompt);
    free(sys);
}

int main(void) {
    if (access(GGUF_PATH, R_OK) != 0) SKIP("%s not present (run scripts/fetch_model.sh)", GGUF_PATH);
    cJSON *corpus = tg_load(TOK_DATA "/corpus.json"), *golden = tg_load(TOK_DATA "/golden_ids.json");
    CHECK(corpus && golden);
    gguf_tok g;
    bool ok = read_gguf_tok(GGUF_PATH, &g);
    CHECK_MSG(ok, "cannot read tokenizer metadata from %s", GGUF_PATH);
    if (ok && corpus && golden) {
        CHECK_EQ_INT(g.n_tok, 49152);
        CHECK_EQ_INT(g.n_merges, 48900);
        ds_tokenizer *t = from_gguf(&g);
        if (t) {
            tg_run_golden(t, "smollm2", golden, corpus);
            check_smollm_specials(t);
            if (g.tmpl) check_chat_prompt(t, g.tmpl);
            size_t n_tok;
            double s = tg_time_corpus(t, corpus, 100, &n_tok);
            printf("smollm2: corpus x100 = %zu tokens in %.3f s (%.1f M tok/s)\n", n_tok, s, n_tok / s / 1e6);
            CHECK_MSG(s < 1.0 * TG_SLOWDOWN, "smollm2: %.3f s is too slow", s);
        }
        ds_tokenizer_free(t);
    }
    if (access(SMOL_JSON, R_OK) == 0 && corpus && golden) {
        ds_err e = {{0}};
        double t0 = ds_time_s();
        ds_tokenizer *t = ds_tokenizer_load_json(SMOL_JSON, access(SMOL_CFG, R_OK) == 0 ? SMOL_CFG : NULL, &e);
        CHECK_MSG(t != NULL, "%s", e.msg);
        if (t) {
            printf("smollm2: loaded tokenizer.json in %.3f s\n", ds_time_s() - t0);
            tg_run_golden(t, "smollm2", golden, corpus);
            check_smollm_specials(t);
            if (ok && g.tmpl && ds_tokenizer_chat_template(t)) CHECK(!strcmp(ds_tokenizer_chat_template(t), g.tmpl));
        }
        ds_tokenizer_free(t);
    } else {
        printf("note: %s absent (written by tests/golden/gen_tokenizer_golden.py); tokenizer.json path not checked\n",
               SMOL_JSON);
    }
    free_gguf_tok(&g);
    cJSON_Delete(corpus);
    cJSON_Delete(golden);
    return ds_test_result();
}
