/* Model loaders: the HF and GGUF forms of the tiny golden models agree weight for weight (proves the
 * Q/K unpermute and tied handling), RoPE frequencies match transformers, and broken HF directories
 * fail by name. */
#include "ds/model.h"
#include "test_weights.h"
#include "ds_test.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static ds_model_params quiet(bool tok) {
    ds_model_params p = ds_model_default_params();
    p.verbose = false;
    p.load_tokenizer = tok;
    return p;
}

/* ---- HF vs GGUF ---- */

/* Compares n floats; exact (tol 0) for F32 GGUFs, normalised MSE for quantised ones. */
static void cmp(const char *what, const float *a, const float *b, size_t n, double nmse_tol) {
    if (!a || !b) {
        CHECK_MSG(a == b, "%s: present in one form only", what);
        return;
    }
    double err = 0, ref = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        err += d * d;
        ref += (double)a[i] * a[i];
        if (!(fabs(d) <= mx)) mx = fabs(d);
    }
    if (nmse_tol == 0) CHECK_MSG(mx == 0, "%s: max |diff| %g", what, mx);
    else CHECK_MSG(err <= nmse_tol * ref, "%s: nmse %g", what, err / (ref > 0 ? ref : 1));
}

static void cmp_models(const ds_model *h, const ds_model *g, double tol) {
    const ds_model_config *a = &h->cfg, *b = &g->cfg;
    CHECK(a->arch == b->arch && a->n_vocab == b->n_vocab && a->d_model == b->d_model && a->n_layer == b->n_layer);
    CHECK(a->n_head == b->n_head && a->n_kv_head == b->n_kv_head && a->head_dim == b->head_dim && a->d_ff == b->d_ff);
    CHECK(a->max_ctx == b->max_ctx && a->rms_eps == b->rms_eps && a->rope_theta == b->rope_theta);
    CHECK(a->qkv_bias == b->qkv_bias && a->tied_embeddings == b->tied_embeddings);
    /* the model's features, whichever file they came from (Phi-3, Gemma 3) */
    CHECK(a->qk_norm == b->qk_norm && a->fused_qkv == b->fused_qkv && a->post_norms == b->post_norms &&
          a->ffn_act == b->ffn_act);
    CHECK(a->sliding_window == b->sliding_window && !memcmp(a->layer_sliding, b->layer_sliding, sizeof a->layer_sliding));
    /* (rope_scaling itself may differ: a llama3 GGUF carries its scaling as rope_freqs; inv_freq is compared below) */
    CHECK(a->rope_theta_swa == b->rope_theta_swa && a->embed_scale == b->embed_scale);
    CHECK(a->attn_scale == b->attn_scale && a->final_softcap == b->final_softcap);
    CHECK((h->output.data == h->tok_embd.data) == a->tied_embeddings && (g->output.data == g->tok_embd.data) == b->tied_embeddings);
    const size_t d = (size_t)a->d_model, q = (size_t)a->n_head * a->head_dim, kv = (size_t)a->n_kv_head * a->head_dim;
    const size_t ff = (size_t)a->d_ff, v = (size_t)a->n_vocab;
    cmp("tok_embd", TW(h->tok_embd), TW(g->tok_embd), v * d, tol);
    cmp("output", TW(h->output), TW(g->output), v * d, tol);
    cmp("output_norm", h->output_norm, g->output_norm, d, 0);
    for (int l = 0; l < a->n_layer; l++) {
        const ds_layer_weights *x = &h->layers[l], *y = &g->layers[l];
        cmp("attn_norm", x->attn_norm, y->attn_norm, d, 0);
        cmp("wq", TW(x->wq), TW(y->wq), q * d, tol);
        cmp("wk", TW(x->wk), TW(y->wk), kv * d, tol);
        cmp("wv", TW(x->wv), TW(y->wv), kv * d, tol);
        cmp("bq", x->bq, y->bq, q, 0);
        cmp("bk", x->bk, y->bk, kv, 0);
        cmp("bv", x->bv, y->bv, kv, 0);
        cmp("wo", TW(x->wo), TW(y->wo), d * q, tol);
        cmp("ffn_norm", x->ffn_norm, y->ffn_norm, d, 0);
        cmp("w_gate", TW(x->w_gate), TW(y->w_gate), ff * d, tol);
        cmp("w_up", TW(x->w_up), TW(y->w_up), ff * d, tol);
        cmp("w_down", TW(x->w_down), TW(y->w_down), d * ff, tol);
        if (a->qk_norm) {
            cmp("q_norm", x->q_norm, y->q_norm, (size_t)a->head_dim, 0);
            cmp("k_norm", x->k_norm, y->k_norm, (size_t)a->head_dim, 0);
        }
        if (a->post_norms) {
            cmp("attn_post_norm", x->attn_post_norm, y->attn_post_norm, d, 0);
            cmp("ffn_post_norm", x->ffn_post_norm, y->ffn_post_norm, d, 0);
        }
    }
    for (int i = 0; a->rope_theta_swa > 0 && i < a->head_dim / 2; i++)
        CHECK_MSG(h->inv_freq_swa[i] == g->inv_freq_swa[i], "inv_freq_swa[%d] %g vs %g", i, h->inv_freq_swa[i],
                  g->inv_freq_swa[i]);
    /* GGUF llama3 carries rope_freqs divisors computed in float64 by the converter: ~1 ulp apart. */
    for (int i = 0; i < a->head_dim / 2; i++)
        CHECK_MSG(fabs(h->inv_freq[i] - g->inv_freq[i]) <= 1e-6 * h->inv_freq[i], "inv_freq[%d] %g vs %g", i,
                  h->inv_freq[i], g->inv_freq[i]);
}

static void test_pair(const char *name, const char *gguf_file, double tol) {
    char dir[PATH_MAX / 2], gg[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/models/%s", DS_TEST_DATA, name);
    snprintf(gg, sizeof gg, "%s/%s", dir, gguf_file);
    if (access(dir, R_OK) || access(gg, R_OK)) {
        printf("SKIP (part): %s absent; tests/golden/gen_models.py writes it\n", gg);
        return;
    }
    ds_model_params p = quiet(true);
    ds_err e1 = {{0}}, e2 = {{0}};
    ds_model *h = ds_model_load(dir, &p, &e1), *g = ds_model_load(gg, &p, &e2);
    CHECK_MSG(h, "%s: %s", name, e1.msg);
    CHECK_MSG(g, "%s: %s", name, e2.msg);
    if (h && g) {
        printf("%s: HF and %s agree? checking %zu params\n", name, gguf_file, h->n_params);
        cmp_models(h, g, tol);
        CHECK_EQ_INT(h->n_params, g->n_params);
    }
    ds_model_free(h);
    ds_model_free(g);
}

/* ---- RoPE against transformers (tests/data/quant/rope.json) ---- */

static void test_rope_golden(void) {
    char *text = NULL;
    ds_err err;
    CHECK_MSG(ds_file_read_all(DS_TEST_DATA "/quant/rope.json", 1 << 20, &text, NULL, &err) == 0,
              "rope.json missing: run tests/golden/gen_quant_golden.py");
    cJSON *j = cJSON_Parse(text);
    free(text);
    const cJSON *c;
    int n_cases = 0, exact = 0, total = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases")) {
        ds_model_config cfg = {0};
        cfg.head_dim = (int)cJSON_GetObjectItem(c, "head_dim")->valuedouble;
        cfg.rope_theta = (float)cJSON_GetObjectItem(c, "theta")->valuedouble;
        const cJSON *s = cJSON_GetObjectItem(c, "scaling");
        if (cJSON_IsObject(s)) {
            cfg.rope_scaling = DS_ROPE_SCALING_LLAMA3;
            cfg.rope_factor = (float)cJSON_GetObjectItem(s, "factor")->valuedouble;
            cfg.rope_low_freq_factor = (float)cJSON_GetObjectItem(s, "low_freq_factor")->valuedouble;
            cfg.rope_high_freq_factor = (float)cJSON_GetObjectItem(s, "high_freq_factor")->valuedouble;
            cfg.rope_orig_ctx = (int)cJSON_GetObjectItem(s, "original_max_position_embeddings")->valuedouble;
        }
        float inv[512];
        ds_rope_inv_freq(&cfg, inv);
        int i = 0;
        const cJSON *v;
        cJSON_ArrayForEach(v, cJSON_GetObjectItem(c, "inv_freq")) {
            /* torch's vectorised pow may differ from a correctly rounded one by an ulp. */
            CHECK_MSG(fabs(inv[i] - v->valuedouble) <= 2.5e-7 * v->valuedouble, "case %d [%d]: %.9g vs %.9g", n_cases, i,
                      inv[i], v->valuedouble);
            exact += inv[i] == (float)v->valuedouble;
            total++;
            i++;
        }
        CHECK_EQ_INT(i, cfg.head_dim / 2);
        n_cases++;
    }
    printf("rope: %d/%d inv_freq values bit-identical to transformers\n", exact, total);
    CHECK(n_cases == 4 && exact >= total - 4);
    cJSON_Delete(j);
}

/* ---- a synthetic HF directory ---- */

enum { L = 2, D = 32, H = 4, KV = 2, FF = 64, V = 48 };

typedef struct {
    char name[96];
    int rows, cols; /* rows 0: vector */
} hf_t;

/* Writes config.json (`extra` goes first, so it wins over the defaults after it: cJSON returns the first
 * of duplicate keys) and model.safetensors holding every
 * tensor but `omit` (BF16 for q_proj weights to exercise conversion). */
static void write_hf(const char *dir, const char *model_type, const char *extra, const char *omit, bool tied) {
    char path[PATH_MAX], cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\"model_type\":\"%s\"%s,\"hidden_size\":%d,\"intermediate_size\":%d,\"num_hidden_layers\":%d,"
             "\"num_attention_heads\":%d,\"num_key_value_heads\":%d,\"vocab_size\":%d,\"rms_norm_eps\":1e-5,"
             "\"tie_word_embeddings\":%s,\"head_dim\":null,\"rope_scaling\":null}",
             model_type, extra, D, FF, L, H, KV, V, tied ? "true" : "false");
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *fp = fopen(path, "w");
    fputs(cfg, fp);
    fclose(fp);
    hf_t t[64];
    int n = 0;
    const bool bias = !strcmp(model_type, "qwen2");
    snprintf(t[n].name, 96, "model.embed_tokens.weight"), t[n].rows = V, t[n++].cols = D;
    snprintf(t[n].name, 96, "model.norm.weight"), t[n].rows = 0, t[n++].cols = D;
    if (!tied) snprintf(t[n].name, 96, "lm_head.weight"), t[n].rows = V, t[n++].cols = D;
    for (int l = 0; l < L; l++) {
        const char *s[] = {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                           "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                           "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"};
        const int r[] = {0, D, KV * D / H, KV * D / H, D, 0, FF, FF, D, 0, 0, 0};
        const int c[] = {D, D, D, D, D, D, D, D, FF, D, KV * D / H, KV * D / H};
        for (int k = 0; k < (bias ? 12 : 9); k++)
            snprintf(t[n].name, 96, "model.layers.%d.%s", l, s[k]), t[n].rows = r[k], t[n++].cols = c[k];
    }
    char *hdr = malloc(16384);
    size_t hn = 0, off = 0;
    uint8_t *data = malloc(1 << 20);
    hn += (size_t)sprintf(hdr + hn, "{");
    for (int i = 0; i < n; i++) {
        if (omit && !strcmp(omit, t[i].name)) continue;
        const bool bf = strstr(t[i].name, "q_proj.weight") != NULL;
        size_t cnt = (size_t)(t[i].rows ? t[i].rows : 1) * t[i].cols, nb = cnt * (bf ? 2 : 4);
        for (size_t j = 0; j < cnt; j++) {
            float v = (float)((j * 7 + (size_t)i * 13) % 29) / 29.0f - 0.5f;
            if (bf) {
                uint16_t b = ds_f32_to_bf16(v);
                memcpy(data + off + 2 * j, &b, 2);
            } else {
                memcpy(data + off + 4 * j, &v, 4);
            }
        }
        if (t[i].rows)
            hn += (size_t)sprintf(hdr + hn, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%d,%d],\"data_offsets\":[%zu,%zu]}",
                                  hn > 1 ? "," : "", t[i].name, bf ? "BF16" : "F32", t[i].rows, t[i].cols, off, off + nb);
        else
            hn += (size_t)sprintf(hdr + hn, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]}",
                                  hn > 1 ? "," : "", t[i].name, t[i].cols, off, off + nb);
        off += nb;
    }
    hn += (size_t)sprintf(hdr + hn, "}");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    fp = fopen(path, "wb");
    uint64_t h64 = hn;
    fwrite(&h64, 8, 1, fp), fwrite(hdr, 1, hn, fp), fwrite(data, 1, off, fp);
    fclose(fp);
    free(hdr);
    free(data);
}

static void expect_hf_fail(const char *dir, const char *mt, const char *extra, const char *omit, const char *needle) {
    write_hf(dir, mt, extra, omit, false);
    ds_model_params p = quiet(true);
    ds_err err = {{0}};
    ds_model *m = ds_model_load(dir, &p, &err);
    CHECK_MSG(!m && strstr(err.msg, needle) && strstr(err.msg, dir), "want '%s', got '%s'", needle, err.msg);
    ds_model_free(m);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "w");
    fputs(text, fp);
    fclose(fp);
}

static void test_hf_dir(void) {
    char dir[] = "/tmp/ds_test_hf_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    ds_model_params p = quiet(true);
    ds_err err = {{0}};
    write_hf(dir, "qwen2", "", NULL, true);
    write_text(dir, "tokenizer_config.json", "{\"chat_template\":[{\"name\":\"tool_use\",\"template\":\"T\"},"
                                             "{\"name\":\"default\",\"template\":\"{{ messages }}\"}]}");
    ds_model *m = ds_model_load(dir, &p, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        CHECK(m->cfg.arch == DS_ARCH_QWEN2 && m->cfg.qkv_bias && m->cfg.tied_embeddings && m->output.data == m->tok_embd.data);
        CHECK(m->cfg.head_dim == D / H && m->cfg.n_kv_head == KV && m->cfg.rope_theta == 10000.0f);
        CHECK(m->tok == NULL && m->chat_template && !strcmp(m->chat_template, "{{ messages }}"));
        CHECK(m->layers[1].bv != NULL && TW(m->layers[0].wq)[1] == ds_bf16_to_f32(ds_f32_to_bf16((float)((7 + 3 * 13) % 29) / 29.0f - 0.5f)));
        CHECK_EQ_INT(ds_model_check_complete(m, &err), 0);
    }
    ds_model_free(m);
    unlink(strcat(strcpy((char[PATH_MAX]){0}, dir), "/tokenizer_config.json"));
    write_text(dir, "chat_template.jinja", "J");
    write_hf(dir, "llama", ",\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":8.0,"
                           "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":64}",
             NULL, false);
    m = ds_model_load(dir, &p, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        CHECK(m->cfg.rope_scaling == DS_ROPE_SCALING_LLAMA3 && m->cfg.rope_theta == 500000.0f && m->cfg.rope_orig_ctx == 64);
        CHECK(!m->cfg.tied_embeddings && m->output.data != m->tok_embd.data && !m->cfg.qkv_bias);
        CHECK(m->chat_template && !strcmp(m->chat_template, "J"));
    }
    ds_model_free(m);

    /* Sliding-window attention: Mistral on every layer; Qwen2 (with use_sliding_window) from
     * max_window_layers, or where layer_types says (interleaved too); a window at least the context is full
     * attention. */
    write_hf(dir, "mistral", ",\"max_position_embeddings\":128,\"sliding_window\":32", NULL, false);
    m = ds_model_load(dir, &p, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) {
        CHECK_EQ_INT(m->cfg.max_ctx, 128);
        CHECK(ds_model_layer_window(&m->cfg, 0) == 32 && ds_model_layer_window(&m->cfg, 1) == 32);
    }
    ds_model_free(m);
    write_hf(dir, "mistral", ",\"max_position_embeddings\":128,\"sliding_window\":null", NULL, false);
    m = ds_model_load(dir, &p, &err);
    if (m) CHECK(m->cfg.max_ctx == 128 && ds_model_layer_window(&m->cfg, 0) == 0);
    ds_model_free(m);
    write_hf(dir, "mistral", ",\"max_position_embeddings\":128,\"sliding_window\":128", NULL, false);
    m = ds_model_load(dir, &p, &err);
    if (m) CHECK(ds_model_layer_window(&m->cfg, 1) == 0);
    ds_model_free(m);
    write_hf(dir, "qwen2", ",\"max_position_embeddings\":128,\"sliding_window\":16,\"use_sliding_window\":true,"
             "\"max_window_layers\":1", NULL, false);
    m = ds_model_load(dir, &p, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) CHECK(ds_model_layer_window(&m->cfg, 0) == 0 && ds_model_layer_window(&m->cfg, 1) == 16);
    ds_model_free(m);
    write_hf(dir, "qwen2", ",\"max_position_embeddings\":128,\"sliding_window\":16,\"use_sliding_window\":false",
             NULL, false);
    m = ds_model_load(dir, &p, &err);
    if (m) CHECK(ds_model_layer_window(&m->cfg, 1) == 0);
    ds_model_free(m);
    write_hf(dir, "qwen2", ",\"max_position_embeddings\":128,\"sliding_window\":8,\"use_sliding_window\":true,"
             "\"layer_types\":[\"full_attention\",\"sliding_attention\"]", NULL, false);
    m = ds_model_load(dir, &p, &err);
    if (m) CHECK(ds_model_layer_window(&m->cfg, 0) == 0 && ds_model_layer_window(&m->cfg, 1) == 8);
    ds_model_free(m);
    write_hf(dir, "qwen2", ",\"max_position_embeddings\":128,\"sliding_window\":8,\"use_sliding_window\":true,"
             "\"layer_types\":[\"sliding_attention\",\"full_attention\"]", NULL, false);
    m = ds_model_load(dir, &p, &err);
    CHECK_MSG(m, "%s", err.msg);
    if (m) CHECK(ds_model_layer_window(&m->cfg, 0) == 8 && ds_model_layer_window(&m->cfg, 1) == 0);
    ds_model_free(m);

    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

static void test_hf_errors(void) {
    char dir[] = "/tmp/ds_test_hf_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    ds_model_params p = quiet(true);
    ds_err err = {{0}};
    ds_model *m;
    expect_hf_fail(dir, "llama", "", "model.layers.1.mlp.up_proj.weight", "missing tensor 'model.layers.1.mlp.up_proj.weight'");
    expect_hf_fail(dir, "llama", "", "lm_head.weight", "'lm_head.weight'");
    expect_hf_fail(dir, "qwen2", "", "model.layers.0.self_attn.k_proj.bias", "k_proj.bias");
    expect_hf_fail(dir, "gpt_neox", "", NULL, "model_type 'gpt_neox'");
    expect_hf_fail(dir, "llama", ",\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0}", NULL, "'yarn'");
    expect_hf_fail(dir, "llama", ",\"attention_bias\":true", NULL, "attention_bias");
    expect_hf_fail(dir, "llama", ",\"hidden_act\":\"gelu\"", NULL, "'gelu'");
    expect_hf_fail(dir, "llama", ",\"num_key_value_heads\":3", NULL, "num_key_value_heads");
    expect_hf_fail(dir, "llama", ",\"vocab_size\":49", NULL, "model.embed_tokens.weight' has shape [48, 32], expected [49, 32]");
    expect_hf_fail(dir, "llama", ",\"hidden_size\":\"32\"", NULL, "hidden_size");
    /* Phi-3: the fused qkv_proj is required (a Llama-layout file is not split by guesswork); LongRoPE
     * (Phi-3-*-128k) is refused by name; partial rotary (Phi-4-mini) only on Phi-3 and within (0, 1]. */
    expect_hf_fail(dir, "phi3", "", NULL, "missing tensor 'model.layers.0.self_attn.qkv_proj.weight'");
    expect_hf_fail(dir, "phi3", ",\"rope_scaling\":{\"type\":\"longrope\",\"long_factor\":[1],\"short_factor\":[1]}",
                   NULL, "'longrope'");
    expect_hf_fail(dir, "phi3", ",\"partial_rotary_factor\":1.5", NULL, "partial_rotary_factor 1.5 is not in (0, 1]");
    expect_hf_fail(dir, "llama", ",\"partial_rotary_factor\":0.5", NULL, "partial_rotary_factor 0.5 is not supported");
    expect_hf_fail(dir, "phi3", ",\"partial_rotary_factor\":0.03", NULL, "leaves 0 rotary dimensions");
    write_text(dir, "config.json", "{\"model_type\":");
    CHECK(!ds_model_load(dir, &p, &err) && strstr(err.msg, "config.json"));
    write_text(dir, "config.json", "{\"model_type\":\"llama\"}");
    CHECK(!ds_model_load(dir, &p, &err) && strstr(err.msg, "hidden_size"));

    /* With a real tokenizer.json when the tokenizer goldens are present. */
    const char *tj = DS_TEST_DATA "/tokenizer/gpt2_tokenizer.json";
    char *text = NULL;
    if (ds_file_read_all(tj, 1 << 24, &text, NULL, &err) == 0) {
        write_hf(dir, "llama", "", NULL, true);
        write_text(dir, "tokenizer.json", text);
        m = ds_model_load(dir, &p, &err);
        CHECK_MSG(m && m->tok, "with tokenizer.json: %s", err.msg);
        ds_model_free(m);
        p.load_tokenizer = false;
        m = ds_model_load(dir, &p, &err);
        CHECK(m && !m->tok);
        ds_model_free(m);
        free(text);
    }
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    CHECK(!ds_model_load(DS_TEST_DATA "/quant/rope.json", &p, &err) && strstr(err.msg, "neither"));
}

/* Gemma 3's config in both styles (the hub's pre-v5 config.json, transformers 5's config-v5.json) gives
 * the same model: local/global layers, the two RoPE tables, the scalars; query_pre_attn_scalar sets the
 * score scale; attention soft-capping and a sliding-attention RoPE scaling are refused by name. */
static void test_gemma3_configs(void) {
    char src[PATH_MAX / 2], v5[PATH_MAX], st[PATH_MAX], dir[] = "/tmp/ds_test_g3_XXXXXX", link[PATH_MAX];
    snprintf(src, sizeof src, "%s/models/tiny-gemma3", DS_TEST_DATA);
    snprintf(v5, sizeof v5, "%s/config-v5.json", src);
    snprintf(st, sizeof st, "%s/model.safetensors", src);
    char *text = NULL;
    ds_err err = {{0}};
    if (access(st, R_OK) || ds_file_read_all(v5, 1 << 20, &text, NULL, &err)) {
        printf("SKIP (part): %s absent; tests/golden/gen_families.py writes it\n", v5);
        return;
    }
    CHECK(mkdtemp(dir) != NULL);
    snprintf(link, sizeof link, "%s/model.safetensors", dir);
    CHECK(symlink(st, link) == 0);
    write_text(dir, "config.json", text);
    ds_model_params p = quiet(false);
    ds_model *a = ds_model_load(src, &p, &err), *b = ds_model_load(dir, &p, &err);
    CHECK_MSG(a && b, "%s", err.msg);
    if (a && b) {
        cmp_models(a, b, 0);
        const ds_model_config *c = &a->cfg;
        CHECK(c->arch == DS_ARCH_GEMMA3 && c->qk_norm && c->post_norms && c->ffn_act == DS_FFN_GELU_TANH);
        CHECK(c->sliding_window == 4 && c->rope_theta == 1e6f && c->rope_theta_swa == 1e4f);
        CHECK(c->rope_scaling == DS_ROPE_SCALING_LINEAR && c->rope_factor == 8.0f && c->final_softcap == 15.0f);
        CHECK(c->embed_scale == 8.0f && c->attn_scale == (float)pow(32.0, -0.5) && c->tied_embeddings);
        for (int l = 0; l < c->n_layer; l++) CHECK_EQ_INT(ds_model_layer_window(c, l), l == 5 ? 0 : 4);
        /* global layers: 1e6 scaled by 1/8; local: 1e4 unscaled */
        CHECK(a->inv_freq[0] == 1.0f / 8.0f && a->inv_freq_swa[0] == 1.0f && a->inv_freq_swa[1] == 1.0f / powf(1e4f, 2.0f / 32));
    }
    ds_model_free(b);
    struct {
        const char *from, *to, *needle;
    } edits[] = {
        {"\"query_pre_attn_scalar\": 32", "\"query_pre_attn_scalar\": 168", NULL},
        {"\"attn_logit_softcapping\": null", "\"attn_logit_softcapping\": 50.0", "attn_logit_softcapping"},
        {"\"hidden_activation\": \"gelu_pytorch_tanh\"", "\"hidden_activation\": \"silu\"", "'silu'"},
        {"\"rope_type\": \"default\"", "\"rope_type\": \"linear\", \"factor\": 2.0", "sliding_attention RoPE type 'linear'"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        char *at = strstr(text, edits[i].from);
        CHECK_MSG(at, "config-v5.json has no %s", edits[i].from);
        if (!at) continue;
        size_t n = strlen(text) + strlen(edits[i].to) + 1;
        char *t = malloc(n);
        snprintf(t, n, "%.*s%s%s", (int)(at - text), text, edits[i].to, at + strlen(edits[i].from));
        write_text(dir, "config.json", t);
        free(t);
        b = ds_model_load(dir, &p, &err);
        if (edits[i].needle) CHECK_MSG(!b && strstr(err.msg, edits[i].needle), "want '%s', got '%s'", edits[i].needle, b ? "loaded" : err.msg);
        else CHECK_MSG(b && b->cfg.attn_scale == (float)pow(168.0, -0.5), "%s", b ? "wrong scale" : err.msg);
        ds_model_free(b);
    }
    ds_model_free(a);
    free(text);
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

int main(void) {
    ds_log_set_level(DS_LOG_ERROR);
    test_gemma3_configs();
    test_rope_golden();
    test_hf_dir();
    test_hf_errors();
    test_pair("tiny-llama", "model.gguf", 0);
    test_pair("tiny-llama", "model-q8_0.gguf", 1e-3);
    test_pair("tiny-qwen2", "model.gguf", 0);
    test_pair("tiny-llama3", "model.gguf", 0);
    test_pair("tiny-phi3", "model.gguf", 0);
    test_pair("tiny-phi3", "model-q8_0.gguf", 1e-3);
    test_pair("tiny-gemma3", "model.gguf", 0);
    return ds_test_result();
}
