/* Base model from one GGUF file (llama.cpp layout): config from `<arch>.*` metadata, matrices kept
 * in their file format (views into the mapping; Q/K rows un-permuted into owned copies) in Hugging
 * Face orientation, fp32 vectors, the tokenizer from `tokenizer.ggml.*`. */
#include "ds/model.h"
#include "format/gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    ds_gguf g;
    ds_model *m;
    const char *path;
    ds_err *err;
    bool verbose;
    bool weights;           /* load_weights: false reads only what the tokenizer needs */
    ds_dtype quantize;      /* --quantize target or DS_DTYPE_NONE */
    bool *used;             /* [g.n_tensors] tensors consumed, to report leftovers */
    size_t n_loaded, n_expected;
    size_t type_count[48];  /* per ggml type, tensors loaded */
    double t0;
} gctx;

/* ---- config ---- */

static int arch_key(gctx *c, char *buf, size_t cap, const char *suffix) {
    int n = snprintf(buf, cap, "%s.%s", c->m->cfg.arch_name, suffix);
    return n > 0 && (size_t)n < cap ? 0 : ds_err_set(c->err, DS_EINVAL, "%s: metadata key too long", c->path);
}

/* An `<arch>.<suffix>` integer; absent keeps *out (the default) unless required. */
static int get_int(gctx *c, const char *suffix, int32_t *out, bool required) {
    char key[128];
    uint32_t v;
    int rc = arch_key(c, key, sizeof key, suffix);
    if (!rc) rc = ds_gguf_get_u32(&c->g, key, &v, c->err);
    if (rc == DS_ENOTFOUND && !required) return 0;
    if (rc == DS_ENOTFOUND) return ds_err_set(c->err, DS_EFORMAT, "%s: required metadata '%s' is missing", c->path, key);
    if (rc) return rc;
    if (v > INT32_MAX) return ds_err_set(c->err, DS_EFORMAT, "%s: metadata '%s' = %u is too large", c->path, key, v);
    *out = (int32_t)v;
    return 0;
}

static int get_float(gctx *c, const char *suffix, float *out, bool required) {
    char key[128];
    int rc = arch_key(c, key, sizeof key, suffix);
    if (!rc) rc = ds_gguf_get_f32(&c->g, key, out, c->err);
    if (rc == DS_ENOTFOUND && !required) return 0;
    if (rc == DS_ENOTFOUND) return ds_err_set(c->err, DS_EFORMAT, "%s: required metadata '%s' is missing", c->path, key);
    return rc;
}

static int read_arch(gctx *c, ds_model_config *cfg) {
    const char *arch, *type, *name;
    int rc = ds_gguf_get_str(&c->g, "general.architecture", &arch, c->err);
    if (rc == DS_ENOTFOUND) return ds_err_set(c->err, DS_EFORMAT, "%s: general.architecture is missing", c->path);
    if (rc) return rc;
    if (!ds_gguf_get_str(&c->g, "general.type", &type, NULL) && !strcmp(type, "adapter"))
        return ds_err_set(c->err, DS_EINVAL, "%s: is a LoRA adapter (general.type = adapter), not a base model", c->path);
    if (!strcmp(arch, "llama")) cfg->arch = DS_ARCH_LLAMA;
    else if (!strcmp(arch, "mistral")) cfg->arch = DS_ARCH_MISTRAL;
    else if (!strcmp(arch, "qwen2")) cfg->arch = DS_ARCH_QWEN2;
    else if (!strcmp(arch, "qwen3")) cfg->arch = DS_ARCH_QWEN3;
    else if (!strcmp(arch, "phi3")) cfg->arch = DS_ARCH_PHI3;
    else if (!strcmp(arch, "gemma3")) cfg->arch = DS_ARCH_GEMMA3;
    else if (c->weights)
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: architecture '%s' is not supported (llama, mistral, qwen2, qwen3, phi3, gemma3)", c->path,
                          arch);
    /* else: tokenizer only (deltaserve tokenize) — the architecture does not matter */
    snprintf(cfg->arch_name, sizeof cfg->arch_name, "%s", arch);
    if (!ds_gguf_get_str(&c->g, "general.name", &name, NULL)) snprintf(cfg->name, sizeof cfg->name, "%s", name);
    cfg->qkv_bias = cfg->arch == DS_ARCH_QWEN2;
    cfg->qk_norm = cfg->arch == DS_ARCH_QWEN3 || cfg->arch == DS_ARCH_GEMMA3;
    cfg->fused_qkv = cfg->fused_gate_up = cfg->arch == DS_ARCH_PHI3;
    cfg->post_norms = cfg->arch == DS_ARCH_GEMMA3;
    cfg->ffn_act = cfg->arch == DS_ARCH_GEMMA3 ? DS_FFN_GELU_TANH : DS_FFN_SILU;
    return 0;
}

/* `<arch>.rope.scaling.*`: "none", or "linear" (inv_freq / factor: llama.cpp's freq_scale, which
 * Gemma 3 applies to its global layers only). Llama-3 scaling arrives as the rope_freqs tensor
 * instead (see load_rope). */
static int read_rope_scaling(gctx *c) {
    char key[128];
    const char *type = NULL;
    float factor = 1.0f;
    int rc = arch_key(c, key, sizeof key, "rope.scaling.type");
    if (!rc) rc = ds_gguf_get_str(&c->g, key, &type, c->err);
    if (rc == DS_ENOTFOUND) return 0;
    if (rc) return rc;
    if ((rc = get_float(c, "rope.scaling.factor", &factor, false))) return rc;
    if (!strcmp(type, "none") || (!strcmp(type, "linear") && factor == 1.0f)) return 0;
    if (!strcmp(type, "linear")) {
        c->m->cfg.rope_scaling = DS_ROPE_SCALING_LINEAR;
        c->m->cfg.rope_factor = factor;
        return 0;
    }
    return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: RoPE scaling type '%s' (factor %g) is not supported", c->path, type,
                      factor);
}

/* Gemma 3 as llama.cpp runs it (llama-model.cpp, LLM_ARCH_GEMMA3): with a sliding window, every layer
 * but each 6th slides and uses RoPE base 10000 unscaled; scores × 1/sqrt(head_dim), or 1/sqrt(n_embd /
 * n_head) for the 62-layer 27B (its query_pre_attn_scalar); embeddings × sqrt(n_embd); the optional
 * final_logit_softcapping. The norms are stored as 1 + w already (convert_hf_to_gguf.py). */
static int read_gemma3(gctx *c, int32_t window) {
    ds_model_config *cfg = &c->m->cfg;
    char key[128];
    if (!arch_key(c, key, sizeof key, "attention.sliding_window_pattern") && ds_gguf_find_kv(&c->g, key))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: metadata '%s' is not supported", c->path, key);
    if (window > 0) {
        cfg->rope_theta_swa = 10000.0f;
        for (int32_t i = 0; i < cfg->n_layer && i < DS_MODEL_MAX_LAYER; i++)
            if (i % 6 < 5) ds_model_set_sliding(cfg, i);
    }
    const int32_t hd = cfg->head_dim ? cfg->head_dim : cfg->d_model / (cfg->n_head ? cfg->n_head : 1);
    cfg->attn_scale = 1.0f / sqrtf((float)(cfg->n_layer == 62 ? cfg->d_model / (cfg->n_head ? cfg->n_head : 1) : hd));
    cfg->embed_scale = sqrtf((float)cfg->d_model);
    return get_float(c, "final_logit_softcapping", &cfg->final_softcap, false);
}

static int read_config(gctx *c) {
    ds_model_config *cfg = &c->m->cfg;
    int rc = read_arch(c, cfg);
    int32_t rope_dim = 0, v_len = 0;
    if (!rc && !c->weights) { /* tokenizer only: the vocabulary size is all it checks against */
        const ds_gguf_tensor *emb = ds_gguf_find_tensor(&c->g, "token_embd.weight");
        cfg->n_vocab = emb && emb->ne[1] <= INT32_MAX ? (int32_t)emb->ne[1] : INT32_MAX;
        return 0;
    }
    cfg->max_ctx = 2048;
    cfg->rope_theta = 10000.0f;
    if (!rc) rc = get_int(c, "block_count", &cfg->n_layer, true);
    if (!rc) rc = get_int(c, "embedding_length", &cfg->d_model, true);
    if (!rc) rc = get_int(c, "feed_forward_length", &cfg->d_ff, true);
    if (!rc) rc = get_int(c, "attention.head_count", &cfg->n_head, true);
    if (!rc) rc = get_int(c, "attention.head_count_kv", &cfg->n_kv_head, false);
    if (!rc) rc = get_int(c, "context_length", &cfg->max_ctx, false);
    if (!rc) rc = get_int(c, "attention.key_length", &cfg->head_dim, false);
    if (!rc) rc = get_int(c, "attention.value_length", &v_len, false);
    if (!rc) rc = get_int(c, "rope.dimension_count", &rope_dim, false);
    if (!rc) rc = get_float(c, "rope.freq_base", &cfg->rope_theta, false);
    if (!rc) rc = get_float(c, "attention.layer_norm_rms_epsilon", &cfg->rms_eps, true);
    if (!rc) rc = read_rope_scaling(c);
    int32_t window = 0; /* sliding-window attention on every layer (llama.cpp writes one window) */
    if (!rc) rc = get_int(c, "attention.sliding_window", &window, false);
    if (rc) return rc;
    if (window < 0) return ds_err_set(c->err, DS_EFORMAT, "%s: attention.sliding_window %d is negative", c->path, window);
    if (!rc && cfg->arch == DS_ARCH_GEMMA3) rc = read_gemma3(c, window);
    else if (window > 0)
        for (int32_t i = 0; i < cfg->n_layer && i < DS_MODEL_MAX_LAYER; i++) ds_model_set_sliding(cfg, i);
    if (rc) return rc;
    if (window > 0 && window < cfg->max_ctx) cfg->sliding_window = window;
    const ds_gguf_tensor *emb = ds_gguf_find_tensor(&c->g, "token_embd.weight");
    if (!emb) return ds_err_set(c->err, DS_EFORMAT, "%s: missing tensor 'token_embd.weight'", c->path);
    cfg->n_vocab = emb->ne[1] <= INT32_MAX ? (int32_t)emb->ne[1] : -1;
    if ((rc = ds_model_config_validate(cfg, c->path, c->err))) return rc;
    if (v_len && v_len != cfg->head_dim)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: value_length %d != key_length %d is not supported", c->path,
                          v_len, cfg->head_dim);
    if (rope_dim && rope_dim != cfg->head_dim && cfg->arch != DS_ARCH_PHI3)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: partial RoPE (rope.dimension_count %d, head_dim %d) is not supported",
                          c->path, rope_dim, cfg->head_dim);
    if (rope_dim && rope_dim != cfg->head_dim) { /* Phi-3 family (Phi-4-mini): RoPE on the first rope_dim */
        cfg->n_rot = rope_dim;
        return ds_model_config_validate(cfg, c->path, c->err);
    }
    return 0;
}

/* ---- tensors ---- */

static void progress(gctx *c) {
    c->n_loaded++;
    size_t q_prev = (c->n_loaded - 1) * 4 / c->n_expected, q = c->n_loaded * 4 / c->n_expected;
    if (c->verbose && q != q_prev && q < 4)
        DS_LOGI("loading %s: %zu%% (%zu/%zu tensors, %.1f s)", c->path, q * 25, c->n_loaded, c->n_expected,
                ds_time_s() - c->t0);
}

/* GGUF row r of a llama Q/K weight came from HF row unperm(r): convert_hf_to_gguf reshapes HF rows to
 * (n_head, 2, hd/2) and swaps the last two axes, so GGUF row h·hd + 2i + j = HF row h·hd + j·hd/2 + i. */
static uint64_t unperm(uint64_t r, uint64_t hd) {
    uint64_t h = r / hd, w = r % hd;
    return h * hd + (w % 2) * (hd / 2) + w / 2;
}

static const ds_gguf_tensor *find_checked(gctx *c, const char *name, int64_t rows, int64_t cols, bool optional,
                                          int *rc) {
    const ds_gguf_tensor *t = ds_gguf_find_tensor(&c->g, name);
    *rc = 0;
    if (!t) {
        if (!optional) *rc = ds_err_set(c->err, DS_EFORMAT, "%s: missing tensor '%s'", c->path, name);
        return NULL;
    }
    if (t->ne[0] != (uint64_t)cols || t->ne[1] != (uint64_t)rows || t->ne[2] != 1 || t->ne[3] != 1) {
        *rc = ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' has ne [%llu, %llu, %llu, %llu], expected [%lld, %lld]",
                         c->path, name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                         (unsigned long long)t->ne[2], (unsigned long long)t->ne[3], (long long)cols, (long long)rows);
        return NULL;
    }
    if (!ds_ggml_can_dequant(t->type))
        *rc = ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' has type %s, which deltaserve does not support "
                         "(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                         c->path, name, ds_ggml_type_name(t->type));
    return *rc ? NULL : t;
}

static void mark_used(gctx *c, const ds_gguf_tensor *t) {
    c->used[t - c->g.tensors] = true;
    if (t->type < sizeof c->type_count / sizeof c->type_count[0]) c->type_count[t->type]++;
    progress(c);
}

/* A vector (norm weight, bias) of n elements as fp32; perm_heads > 0 undoes the Q/K permutation
 * (a bias's elements move like the weight's rows). Missing + optional → *dst NULL. */
static int load_vec(gctx *c, const char *name, int64_t n, int perm_heads, bool optional, float **dst) {
    int rc;
    const ds_gguf_tensor *t = find_checked(c, name, 1, n, optional, &rc);
    *dst = NULL;
    if (!t) return rc;
    float *p = ds_model_alloc_floats(c->m, (size_t)n);
    if (!p) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory for tensor '%s'", c->path, name);
    if (perm_heads > 0) {
        float *tmp = malloc((size_t)n * sizeof *tmp);
        if (!tmp) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
        rc = ds_gguf_dequant_rows(&c->g, t, 0, 1, tmp, c->err);
        for (int64_t i = 0; i < n && !rc; i++) p[unperm((uint64_t)i, (uint64_t)n / (uint64_t)perm_heads)] = tmp[i];
        free(tmp);
    } else {
        rc = ds_gguf_dequant_rows(&c->g, t, 0, 1, p, c->err);
    }
    if (rc) return rc;
    c->m->weight_bytes[DS_DTYPE_F32] += (size_t)n * sizeof(float);
    c->m->n_params += (size_t)n;
    *dst = p;
    mark_used(c, t);
    return 0;
}

/* A matrix of torch shape [rows][cols] (GGUF ne = [cols, rows]) kept in its file format: a view
 * into the mapping, or an owned copy when rows move (perm_heads > 0 undoes the Q/K row
 * permutation; blocks run along a row, so whole rows move) or --quantize converts it. */
static int load_mat(gctx *c, const char *name, int64_t rows, int64_t cols, int perm_heads, bool optional, ds_weight *dst) {
    int rc;
    const ds_gguf_tensor *t = find_checked(c, name, rows, cols, optional, &rc);
    memset(dst, 0, sizeof *dst);
    if (!t) return rc;
    if (rows > INT32_MAX || cols > INT32_MAX)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is too large", c->path, name);
    int64_t *perm = NULL;
    if (perm_heads > 0) {
        if (!(perm = malloc((size_t)rows * sizeof *perm))) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
        const uint64_t hd = (uint64_t)rows / (uint64_t)perm_heads;
        for (int64_t r = 0; r < rows; r++) perm[unperm((uint64_t)r, hd)] = r;
    }
    rc = ds_model_set_weight(c->m, dst, t->data, (ds_dtype)t->type, t->row_bytes, (int32_t)rows, (int32_t)cols, perm,
                             true, c->quantize);
    free(perm);
    if (rc) return ds_err_set(c->err, rc, "%s: tensor '%s' (%s): %s", c->path, name, ds_ggml_type_name(t->type),
                              ds_strerror(rc));
    dst->file_view = dst->data == t->data; /* a view of the kept read-only mapping, not a copy */
    /* a copy (rows un-permuted, or --quantize): the file's pages it was made from are not read
     * again, so they leave the resident set (Llama's Q and K: 8 MiB of SmolLM2, 89 MiB of a 1B Q8_0) */
    if (!dst->file_view) ds_file_map_release(t->data, (size_t)rows * t->row_bytes);
    mark_used(c, t);
    return 0;
}

/* A fused matrix (Phi-3's attn_qkv [q|k|v], ffn_up [gate|up]) of sum rows[k] rows: n views into the
 * mapping, one per part (blocks run along a row, so any row range is a valid view). */
static int load_mat_split(gctx *c, const char *name, int64_t cols, int n, const int64_t *rows, ds_weight **dst) {
    int64_t total = 0;
    for (int k = 0; k < n; k++) total += rows[k];
    int rc;
    const ds_gguf_tensor *t = find_checked(c, name, total, cols, false, &rc);
    if (!t) return rc;
    if (total > INT32_MAX || cols > INT32_MAX)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is too large", c->path, name);
    const uint8_t *src = t->data;
    for (int k = 0; k < n; k++) {
        rc = ds_model_set_weight(c->m, dst[k], src, (ds_dtype)t->type, t->row_bytes, (int32_t)rows[k], (int32_t)cols,
                                 NULL, true, c->quantize);
        if (rc)
            return ds_err_set(c->err, rc, "%s: tensor '%s' (%s): %s", c->path, name, ds_ggml_type_name(t->type),
                              ds_strerror(rc));
        src += (size_t)rows[k] * t->row_bytes;
    }
    mark_used(c, t);
    return 0;
}

/* Phi-3 (llama.cpp's phi3 layout, no Q/K permutation): attn_qkv and ffn_up = gate_up_proj (2·n_ff rows,
 * gate first). */
static int load_layer_fused(gctx *c, int i) {
    const ds_model_config *cfg = &c->m->cfg;
    ds_layer_weights *l = &c->m->layers[i];
    const int64_t d = cfg->d_model, q = (int64_t)cfg->n_head * cfg->head_dim, kv = (int64_t)cfg->n_kv_head * cfg->head_dim;
    char n[6][96];
    static const char *suffix[6] = {"attn_norm.weight", "attn_qkv.weight", "attn_output.weight",
                                    "ffn_norm.weight",  "ffn_up.weight",   "ffn_down.weight"};
    for (int k = 0; k < 6; k++) snprintf(n[k], sizeof n[k], "blk.%d.%s", i, suffix[k]);
    const int64_t qkv_rows[3] = {q, kv, kv}, gu_rows[2] = {cfg->d_ff, cfg->d_ff};
    ds_weight *qkv[3] = {&l->wq, &l->wk, &l->wv}, *gu[2] = {&l->w_gate, &l->w_up};
    int rc = load_vec(c, n[0], d, 0, false, &l->attn_norm);
    if (!rc) rc = load_mat_split(c, n[1], d, 3, qkv_rows, qkv);
    if (!rc) rc = load_mat(c, n[2], d, q, 0, false, &l->wo);
    if (!rc) rc = load_vec(c, n[3], d, 0, false, &l->ffn_norm);
    if (!rc) rc = load_mat_split(c, n[4], d, 2, gu_rows, gu);
    if (!rc) rc = load_mat(c, n[5], d, cfg->d_ff, 0, false, &l->w_down);
    return rc;
}

static int load_layer(gctx *c, int i) {
    const ds_model_config *cfg = &c->m->cfg;
    ds_layer_weights *l = &c->m->layers[i];
    const int64_t d = cfg->d_model, q = (int64_t)cfg->n_head * cfg->head_dim, kv = (int64_t)cfg->n_kv_head * cfg->head_dim;
    /* Only the llama converter permutes Q/K; the Qwen and Gemma converters keep HF order. */
    const bool perm = cfg->arch == DS_ARCH_LLAMA || cfg->arch == DS_ARCH_MISTRAL;
    const int ph = perm ? cfg->n_head : 0, pkv = perm ? cfg->n_kv_head : 0;
    char n[12][96];
    const char *suffix[12] = {"attn_norm.weight", "attn_q.weight",  "attn_k.weight",  "attn_v.weight",
                              "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                              "ffn_down.weight", "attn_q.bias",     "attn_k.bias",    "attn_v.bias"};
    for (int k = 0; k < 12; k++) snprintf(n[k], sizeof n[k], "blk.%d.%s", i, suffix[k]);
    int rc = load_vec(c, n[0], d, 0, false, &l->attn_norm);
    if (!rc) rc = load_mat(c, n[1], q, d, ph, false, &l->wq);
    if (!rc) rc = load_mat(c, n[2], kv, d, pkv, false, &l->wk);
    if (!rc) rc = load_mat(c, n[3], kv, d, 0, false, &l->wv);
    if (!rc) rc = load_mat(c, n[4], d, q, 0, false, &l->wo);
    if (!rc) rc = load_vec(c, n[5], d, 0, false, &l->ffn_norm);
    if (!rc) rc = load_mat(c, n[6], cfg->d_ff, d, 0, false, &l->w_gate);
    if (!rc) rc = load_mat(c, n[7], cfg->d_ff, d, 0, false, &l->w_up);
    if (!rc) rc = load_mat(c, n[8], d, cfg->d_ff, 0, false, &l->w_down);
    if (!rc && cfg->qkv_bias) rc = load_vec(c, n[9], q, ph, false, &l->bq);
    if (!rc && cfg->qkv_bias) rc = load_vec(c, n[10], kv, pkv, false, &l->bk);
    if (!rc && cfg->qkv_bias) rc = load_vec(c, n[11], kv, 0, false, &l->bv);
    if (cfg->qk_norm) {
        char qn[96], kn[96];
        snprintf(qn, sizeof qn, "blk.%d.attn_q_norm.weight", i);
        snprintf(kn, sizeof kn, "blk.%d.attn_k_norm.weight", i);
        if (!rc) rc = load_vec(c, qn, cfg->head_dim, 0, false, &l->q_norm);
        if (!rc) rc = load_vec(c, kn, cfg->head_dim, 0, false, &l->k_norm);
    }
    if (cfg->post_norms) {
        char an[96], fn[96];
        snprintf(an, sizeof an, "blk.%d.post_attention_norm.weight", i);
        snprintf(fn, sizeof fn, "blk.%d.post_ffw_norm.weight", i);
        if (!rc) rc = load_vec(c, an, d, 0, false, &l->attn_post_norm);
        if (!rc) rc = load_vec(c, fn, d, 0, false, &l->ffn_post_norm);
    }
    return rc;
}

/* Biases this model struct cannot hold (o_proj, MLP) are refused rather than silently dropped; a llama
 * file with attn_q.bias (attention_bias) gets q/k/v biases. */
static int check_biases(gctx *c) {
    static const char *unsupported[] = {"attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias",
                                        "attn_qkv.bias"};
    for (size_t k = 0; k < sizeof unsupported / sizeof unsupported[0]; k++) {
        char name[64];
        snprintf(name, sizeof name, "blk.0.%s", unsupported[k]);
        if (ds_gguf_find_tensor(&c->g, name))
            return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s': output/MLP biases are not supported", c->path,
                              name);
    }
    if (ds_gguf_find_tensor(&c->g, "blk.0.attn_q.bias")) c->m->cfg.qkv_bias = true;
    return 0;
}

/* inv_freq from theta; llama3-style files also carry rope_freqs.weight [hd/2], the per-frequency
 * divisors convert_hf_to_gguf derived from rope_scaling: inv_freq[i] = base[i] / rope_freqs[i]. */
static int load_rope(gctx *c) {
    ds_model *m = c->m;
    const int half = m->cfg.head_dim / 2;
    float *freqs;
    if (!(m->inv_freq = ds_model_alloc_floats(m, (size_t)half)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
    ds_rope_inv_freq(&m->cfg, m->inv_freq);
    if (m->cfg.rope_theta_swa > 0) {
        if (!(m->inv_freq_swa = ds_model_alloc_floats(m, (size_t)half)))
            return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
        ds_rope_inv_freq_swa(&m->cfg, m->inv_freq_swa);
    }
    int rc = load_vec(c, "rope_freqs.weight", half, 0, true, &freqs);
    if (rc || !freqs) return rc;
    m->n_params -= (size_t)half; /* not a weight */
    m->weight_bytes[DS_DTYPE_F32] -= (size_t)half * sizeof(float);
    for (int i = 0; i < half; i++) {
        if (!(freqs[i] > 0))
            return ds_err_set(c->err, DS_EFORMAT, "%s: rope_freqs.weight[%d] = %g is not positive", c->path, i, freqs[i]);
        m->inv_freq[i] /= freqs[i];
    }
    return 0;
}

static int load_weights(gctx *c) {
    ds_model *m = c->m;
    const ds_model_config *cfg = &m->cfg;
    int rc = check_biases(c);
    if (rc) return rc;
    c->n_expected = 2 +
                    (size_t)cfg->n_layer * (cfg->fused_qkv ? 6 : (cfg->qkv_bias ? 12 : 9) + (cfg->qk_norm ? 2 : 0) +
                                                                 (cfg->post_norms ? 2 : 0)) +
                    1;
    if (ds_gguf_find_tensor(&c->g, "rope_factors_long.weight") || ds_gguf_find_tensor(&c->g, "rope_factors_short.weight"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: LongRoPE (rope_factors_long / rope_factors_short) is not supported",
                          c->path);
    if (!(m->layers = calloc((size_t)cfg->n_layer, sizeof *m->layers)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
    if ((rc = load_mat(c, "token_embd.weight", cfg->n_vocab, cfg->d_model, 0, false, &m->tok_embd))) return rc;
    for (int i = 0; i < cfg->n_layer && !rc; i++) rc = cfg->fused_qkv ? load_layer_fused(c, i) : load_layer(c, i);
    if (!rc) rc = load_vec(c, "output_norm.weight", cfg->d_model, 0, false, &m->output_norm);
    if (!rc) rc = load_mat(c, "output.weight", cfg->n_vocab, cfg->d_model, 0, true, &m->output);
    if (rc) return rc;
    m->cfg.tied_embeddings = m->output.data == NULL;
    if (!m->output.data) m->output = m->tok_embd;
    return load_rope(c);
}

/* ---- tokenizer ---- */

static int pre_type(gctx *c, ds_pre_type *pre) {
    const char *s = "default";
    int rc = ds_gguf_get_str(&c->g, "tokenizer.ggml.pre", &s, c->err);
    if (rc && rc != DS_ENOTFOUND) return rc;
    if (!strcmp(s, "smollm")) *pre = DS_PRE_SMOLLM;
    else if (!strcmp(s, "llama-bpe") || !strcmp(s, "llama3") || !strcmp(s, "llama-v3")) *pre = DS_PRE_LLAMA3;
    else if (!strcmp(s, "qwen2")) *pre = DS_PRE_QWEN2;
    else if (!strcmp(s, "gpt-2") || !strcmp(s, "default")) *pre = DS_PRE_GPT2;
    else
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tokenizer pre-tokeniser '%s' is not supported (smollm, llama-bpe, qwen2, gpt-2)", c->path, s);
    return 0;
}

/* An optional special-token id: absent → -1; present must index the vocabulary. */
static int token_id(gctx *c, const char *key, int32_t n_tokens, int32_t *out) {
    uint32_t v;
    *out = -1;
    int rc = ds_gguf_get_u32(&c->g, key, &v, c->err);
    if (rc == DS_ENOTFOUND) return 0;
    if (rc) return rc;
    if (v >= (uint32_t)n_tokens)
        return ds_err_set(c->err, DS_EFORMAT, "%s: %s = %u is outside the vocabulary (%d tokens)", c->path, key, v,
                          n_tokens);
    *out = (int32_t)v;
    return 0;
}

static int fill_desc(gctx *c, ds_tokenizer_desc *d, size_t n_tok, size_t n_types) {
    int rc = pre_type(c, &d->pre);
    if (rc) return rc;
    if (n_tok == 0 || n_tok > (size_t)c->m->cfg.n_vocab)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tokenizer has %zu tokens but the embedding has %d rows", c->path,
                          n_tok, c->m->cfg.n_vocab);
    if (d->token_types && n_types != n_tok)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tokenizer.ggml.token_type has %zu entries for %zu tokens", c->path,
                          n_types, n_tok);
    d->n_vocab = (int32_t)n_tok;
    if ((rc = token_id(c, "tokenizer.ggml.bos_token_id", d->n_vocab, &d->bos_id))) return rc;
    if ((rc = token_id(c, "tokenizer.ggml.eos_token_id", d->n_vocab, &d->eos_id))) return rc;
    if ((rc = token_id(c, "tokenizer.ggml.eot_token_id", d->n_vocab, &d->eot_id))) return rc;
    if ((rc = token_id(c, "tokenizer.ggml.padding_token_id", d->n_vocab, &d->pad_id))) return rc;
    /* llama.cpp defaults: Llama-3 BPE adds BOS and ignores merges for in-vocab words; the file's
     * add_bos_token / add_eos_token override. */
    d->ignore_merges = d->pre == DS_PRE_LLAMA3;
    d->add_bos = d->pre == DS_PRE_LLAMA3;
    rc = ds_gguf_get_bool(&c->g, "tokenizer.ggml.add_bos_token", &d->add_bos, c->err);
    if (rc && rc != DS_ENOTFOUND) return rc;
    rc = ds_gguf_get_bool(&c->g, "tokenizer.ggml.add_eos_token", &d->add_eos, c->err);
    return rc == DS_ENOTFOUND ? 0 : rc;
}

static int load_tokenizer(gctx *c) {
    const char *model;
    int rc = ds_gguf_get_str(&c->g, "tokenizer.ggml.model", &model, c->err);
    if (rc == DS_ENOTFOUND) {
        DS_LOGW("%s: no tokenizer in the file; text endpoints will be unavailable", c->path);
        return 0;
    }
    if (rc) return rc;
    const bool spm = !strcmp(model, "llama");
    if (strcmp(model, "gpt2") && !spm)
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tokenizer model '%s' is not supported (byte-level BPE 'gpt2', SentencePiece 'llama')",
                          c->path, model);
    char **tokens = NULL, **merges = NULL;
    int32_t *types = NULL;
    float *scores = NULL;
    size_t n_tok = 0, n_merges = 0, n_types = 0, n_scores = 0;
    ds_tokenizer_desc d = {0};
    rc = ds_gguf_get_str_array(&c->g, "tokenizer.ggml.tokens", &tokens, &n_tok, c->err);
    if (!rc && spm && (rc = ds_gguf_get_f32_array(&c->g, "tokenizer.ggml.scores", &scores, &n_scores, c->err)) ==
                          DS_ENOTFOUND)
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: tokenizer.ggml.scores is missing (a SentencePiece vocabulary needs it)",
                        c->path);
    if (!rc && spm && n_scores != n_tok)
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: tokenizer.ggml.scores has %zu entries for %zu tokens", c->path,
                        n_scores, n_tok);
    if (!rc && !spm) rc = ds_gguf_get_str_array(&c->g, "tokenizer.ggml.merges", &merges, &n_merges, c->err);
    if (!rc) rc = ds_gguf_get_i32_array(&c->g, "tokenizer.ggml.token_type", &types, &n_types, c->err);
    if (rc == DS_ENOTFOUND && tokens && (merges || spm)) rc = 0; /* token_type is optional */
    if (!rc && n_merges > INT32_MAX) rc = ds_err_set(c->err, DS_EFORMAT, "%s: too many merges", c->path);
    d.tokens = (const char *const *)tokens;
    d.token_types = types;
    d.merges = (const char *const *)merges;
    d.n_merges = (int32_t)n_merges;
    if (!rc) rc = fill_desc(c, &d, n_tok, n_types);
    if (!rc && spm) { /* llama.cpp's defaults for SentencePiece: BOS added, dummy prefix on */
        d.spm = true;
        d.scores = scores;
        bool v = true;
        int r2 = ds_gguf_get_bool(&c->g, "tokenizer.ggml.add_bos_token", &v, c->err);
        if (r2 == DS_ENOTFOUND) d.add_bos = true;
        else if (r2) rc = r2;
        d.add_space_prefix = true;
        r2 = ds_gguf_get_bool(&c->g, "tokenizer.ggml.add_space_prefix", &d.add_space_prefix, c->err);
        if (r2 && r2 != DS_ENOTFOUND) rc = r2;
        if (!rc) rc = token_id(c, "tokenizer.ggml.unknown_token_id", d.n_vocab, &d.unk_id);
    }
    if (!rc) {
        ds_err e = {{0}};
        if (!(c->m->tok = ds_tokenizer_create(&d, &e)))
            rc = ds_err_set(c->err, DS_EFORMAT, "%s: tokenizer: %s", c->path, e.msg);
    }
    free(tokens);
    free(merges);
    free(types);
    free(scores);
    return rc;
}

static int load_chat_template(gctx *c) {
    const char *tmpl;
    int rc = ds_gguf_get_str(&c->g, "tokenizer.chat_template", &tmpl, c->err);
    if (rc == DS_ENOTFOUND) return 0;
    if (rc) return rc;
    if (!(c->m->chat_template = strdup(tmpl))) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
    return 0;
}

/* ---- entry point ---- */

static void log_summary(gctx *c) {
    char mix[256] = "";
    size_t o = 0;
    for (size_t t = 0; t < sizeof c->type_count / sizeof c->type_count[0]; t++)
        if (c->type_count[t] && o < sizeof mix)
            o += (size_t)snprintf(mix + o, sizeof mix - o, "%s%s x%zu", o ? ", " : "", ds_ggml_type_name((uint32_t)t),
                                  c->type_count[t]);
    size_t unused = 0;
    const char *first = NULL;
    for (size_t i = 0; i < c->g.n_tensors; i++)
        if (!c->used[i] && !unused++) first = c->g.tensors[i].name;
    if (unused) DS_LOGW("%s: %zu tensors not used (first: '%s')", c->path, unused, first);
    char mem[160];
    ds_model_weight_summary(c->m, mem, sizeof mem);
    if (c->verbose)
        DS_LOGI("loaded %s: %s, %d layers, %.1fM params (file: %s), %s embeddings, weights in memory %s, %.2f s",
                c->path, c->m->cfg.arch_name, c->m->cfg.n_layer, (double)c->m->n_params / 1e6, mix,
                c->m->cfg.tied_embeddings ? "tied" : "untied", mem, ds_time_s() - c->t0);
}

static int load_all(gctx *c, const ds_model_params *p) {
    int rc = ds_gguf_open(&c->g, c->path, c->err);
    if (rc) return rc;
    if (!(c->used = calloc(c->g.n_tensors ? c->g.n_tensors : 1, sizeof *c->used)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
    if (!(c->m->source_path = strdup(c->path))) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
    if ((rc = read_config(c))) return rc;
    if (p->load_weights && (rc = load_weights(c))) return rc;
    if (p->load_tokenizer && (rc = load_tokenizer(c))) return rc;
    if ((rc = load_chat_template(c))) return rc;
    if (!p->load_weights) return 0;
    if ((rc = ds_model_check_complete(c->m, c->err))) return rc;
    c->m->weights_loaded = true;
    /* matrices are views into the mapping: the model keeps it */
    if ((rc = ds_model_keep_map(c->m, &c->g.map))) return ds_err_set(c->err, rc, "%s: out of memory", c->path);
    log_summary(c);
    return 0;
}

ds_model *ds_model_load_gguf(const char *path, const ds_model_params *params, ds_err *err) {
    ds_model_params def = ds_model_default_params();
    const ds_model_params *p = params ? params : &def;
    gctx c = {.path = path, .err = err, .verbose = p->verbose, .weights = p->load_weights, .quantize = p->quantize,
              .t0 = ds_time_s()};
    if (!path) {
        ds_err_set(err, DS_EINVAL, "ds_model_load_gguf: no path");
        return NULL;
    }
    if (!(c.m = ds_model_new())) {
        ds_err_set(err, DS_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    int rc = load_all(&c, p);
    free(c.used);
    ds_gguf_close(&c.g);
    if (rc) {
        ds_model_free(c.m);
        return NULL;
    }
    return c.m;
}
