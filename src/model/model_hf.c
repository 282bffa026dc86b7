/* Base model from a Hugging Face directory: config.json, model.safetensors (or an index + shards),
 * tokenizer.json + tokenizer_config.json. Weights are read by their HF names and converted to fp32. */
#include "ds/model.h"
#include "format/safetensors.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    ds_st_set set;
    ds_model *m;
    const char *dir;
    char cfg_path[PATH_MAX];
    ds_err *err;
    bool verbose;
    ds_dtype quantize; /* --quantize target or DS_DTYPE_NONE */
    size_t n_loaded, n_expected;
    size_t dtype_count[3]; /* tensors loaded per DS_ST_F32 / F16 / BF16 */
    double t0;
    float partial_rotary; /* partial_rotary_factor (Phi-3), 0 when not given */
} hctx;

static bool exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int join(char *buf, size_t cap, const char *dir, const char *name, ds_err *err) {
    int n = snprintf(buf, cap, "%s/%s", dir, name);
    return n > 0 && (size_t)n < cap ? 0 : ds_err_set(err, DS_EINVAL, "%s: path too long", dir);
}

/* ---- config.json ---- */

static const cJSON *field(const cJSON *o, const char *key) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNull(j) ? NULL : j; /* HF writes null for "use the default" */
}

/* Optional integer field (absent/null keeps *out); required ones fail by name when absent. */
static int get_int(hctx *c, const cJSON *o, const char *key, int32_t *out, bool required) {
    const cJSON *j = field(o, key);
    if (!j) return required ? ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" is missing", c->cfg_path, key) : 0;
    double d = cJSON_IsNumber(j) ? j->valuedouble : -1;
    if (!(d >= 0 && d <= INT32_MAX) || d != (double)(int32_t)d)
        return ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" must be a non-negative integer", c->cfg_path, key);
    *out = (int32_t)d;
    return 0;
}

static int get_float(hctx *c, const cJSON *o, const char *key, float *out, bool required) {
    const cJSON *j = field(o, key);
    if (!j) return required ? ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" is missing", c->cfg_path, key) : 0;
    if (!cJSON_IsNumber(j)) return ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" must be a number", c->cfg_path, key);
    *out = (float)j->valuedouble;
    return 0;
}

static int get_bool(hctx *c, const cJSON *o, const char *key, bool *out) {
    const cJSON *j = field(o, key);
    if (!j) return 0;
    if (!cJSON_IsBool(j)) return ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" must be true or false", c->cfg_path, key);
    *out = cJSON_IsTrue(j);
    return 0;
}

static const char *get_str(const cJSON *o, const char *key) {
    const cJSON *j = field(o, key);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

static int parse_arch(hctx *c, const cJSON *root, ds_model_config *cfg) {
    const char *mt = get_str(root, "model_type"), *act = get_str(root, "hidden_act"), *name;
    if (!mt) return ds_err_set(c->err, DS_EFORMAT, "%s: \"model_type\" is missing", c->cfg_path);
    if (!strcmp(mt, "llama")) cfg->arch = DS_ARCH_LLAMA, cfg->max_ctx = 2048;
    else if (!strcmp(mt, "mistral")) cfg->arch = DS_ARCH_MISTRAL, cfg->max_ctx = 131072;
    else if (!strcmp(mt, "qwen2")) cfg->arch = DS_ARCH_QWEN2, cfg->max_ctx = 32768;
    else if (!strcmp(mt, "qwen3")) cfg->arch = DS_ARCH_QWEN3, cfg->max_ctx = 40960;
    else if (!strcmp(mt, "phi3")) cfg->arch = DS_ARCH_PHI3, cfg->max_ctx = 4096;
    else if (!strcmp(mt, "gemma3_text")) cfg->arch = DS_ARCH_GEMMA3, cfg->max_ctx = 131072;
    else
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: model_type '%s' is not supported (llama, mistral, qwen2, qwen3, phi3, gemma3_text)",
                          c->cfg_path, mt);
    snprintf(cfg->arch_name, sizeof cfg->arch_name, "%s", mt);
    if ((name = get_str(root, "_name_or_path"))) snprintf(cfg->name, sizeof cfg->name, "%s", name);
    if (cfg->arch == DS_ARCH_GEMMA3) { /* Gemma3TextConfig: hidden_activation (hidden_act in older configs) */
        const char *ga = get_str(root, "hidden_activation");
        if (!ga) ga = act;
        if (ga && strcmp(ga, "gelu_pytorch_tanh"))
            return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: hidden_activation '%s' is not supported (gelu_pytorch_tanh)",
                              c->cfg_path, ga);
        act = NULL;
        cfg->ffn_act = DS_FFN_GELU_TANH;
        cfg->post_norms = true;
        cfg->tied_embeddings = true; /* Gemma3TextConfig's default */
    }
    if (act && strcmp(act, "silu"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: hidden_act '%s' is not supported (silu)", c->cfg_path, act);
    bool attn_bias = false, mlp_bias = false;
    int rc = get_bool(c, root, "attention_bias", &attn_bias);
    if (!rc) rc = get_bool(c, root, "mlp_bias", &mlp_bias);
    if (rc) return rc;
    /* Llama's and Qwen3's attention_bias also put a bias on o_proj, which ds_layer_weights has no
     * slot for. */
    if ((attn_bias && cfg->arch != DS_ARCH_QWEN2) || mlp_bias)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: %s = true is not supported", c->cfg_path,
                          mlp_bias ? "mlp_bias" : "attention_bias");
    cfg->qkv_bias = cfg->arch == DS_ARCH_QWEN2; /* Qwen2 always has q/k/v bias, never o_proj bias */
    cfg->qk_norm = cfg->arch == DS_ARCH_QWEN3 || cfg->arch == DS_ARCH_GEMMA3;
    cfg->fused_qkv = cfg->fused_gate_up = cfg->arch == DS_ARCH_PHI3;
    return 0;
}

/* Gemma 3's scalars (transformers Gemma3TextModel / Gemma3Attention / Gemma3ForCausalLM): embeddings ×
 * sqrt(hidden_size), scores × query_pre_attn_scalar^-0.5, final logits soft-capped when
 * final_logit_softcapping is set. Attention soft-capping and bidirectional attention are refused. */
static int parse_gemma3(hctx *c, const cJSON *root, ds_model_config *cfg) {
    float qpas = 256.0f, cap = 0.0f;
    bool bidir = false;
    int rc = get_float(c, root, "query_pre_attn_scalar", &qpas, false);
    if (!rc) rc = get_float(c, root, "final_logit_softcapping", &cap, false);
    if (!rc) rc = get_bool(c, root, "use_bidirectional_attention", &bidir);
    if (rc) return rc;
    if (field(root, "attn_logit_softcapping"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: attn_logit_softcapping is not supported", c->cfg_path);
    if (bidir)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: use_bidirectional_attention = true is not supported", c->cfg_path);
    if (!(qpas > 0)) return ds_err_set(c->err, DS_EFORMAT, "%s: query_pre_attn_scalar must be positive", c->cfg_path);
    cfg->attn_scale = (float)pow((double)qpas, -0.5);
    cfg->final_softcap = cap;
    cfg->embed_scale = (float)sqrt((double)cfg->d_model);
    return 0;
}

/* RoPE of a Gemma 3 config: "rope_parameters" {"full_attention": {...}, "sliding_attention": {...}}
 * (transformers 5), or rope_theta (default 1e6) + rope_local_base_freq (default 1e4) + rope_scaling,
 * which applies to the global (full-attention) layers only. Scaling: default or linear. */
static int gemma3_rope_type(hctx *c, const cJSON *o, const char *what, ds_model_config *cfg, bool global) {
    const char *type = o ? get_str(o, "rope_type") : NULL;
    if (o && !type) type = get_str(o, "type");
    if (!type || !strcmp(type, "default")) return 0;
    if (!global || strcmp(type, "linear"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: %s RoPE type '%s' is not supported (default%s)", c->cfg_path, what,
                          type, global ? ", linear" : "");
    cfg->rope_scaling = DS_ROPE_SCALING_LINEAR;
    return get_float(c, o, "factor", &cfg->rope_factor, true);
}

static int parse_rope_gemma3(hctx *c, const cJSON *root, ds_model_config *cfg) {
    const cJSON *rp = field(root, "rope_parameters"), *full = NULL, *swa = NULL;
    cfg->rope_theta = 1000000.0f;
    cfg->rope_theta_swa = 10000.0f;
    int rc = get_float(c, root, "rope_theta", &cfg->rope_theta, false);
    if (!rc) rc = get_float(c, root, "rope_local_base_freq", &cfg->rope_theta_swa, false);
    if (rc) return rc;
    if (rp) {
        if (!cJSON_IsObject(rp)) return ds_err_set(c->err, DS_EFORMAT, "%s: \"rope_parameters\" must be an object", c->cfg_path);
        full = field(rp, "full_attention"), swa = field(rp, "sliding_attention");
        if ((full && !cJSON_IsObject(full)) || (swa && !cJSON_IsObject(swa)))
            return ds_err_set(c->err, DS_EFORMAT, "%s: rope_parameters.full_attention / sliding_attention must be objects",
                              c->cfg_path);
        if (full) rc = get_float(c, full, "rope_theta", &cfg->rope_theta, false);
        if (!rc && swa) rc = get_float(c, swa, "rope_theta", &cfg->rope_theta_swa, false);
    } else {
        full = field(root, "rope_scaling");
        if (full && !cJSON_IsObject(full))
            return ds_err_set(c->err, DS_EFORMAT, "%s: \"rope_scaling\" must be an object", c->cfg_path);
    }
    if (!rc) rc = gemma3_rope_type(c, full, "full_attention", cfg, true);
    if (!rc) rc = gemma3_rope_type(c, swa, "sliding_attention", cfg, false);
    return rc;
}

/* RoPE: transformers >= 5 writes "rope_parameters" {rope_type, rope_theta, ...}; older configs write
 * "rope_theta" and "rope_scaling" {rope_type | type, ...}. Only default and llama3 are supported. */
static int parse_rope(hctx *c, const cJSON *root, ds_model_config *cfg) {
    if (cfg->arch == DS_ARCH_GEMMA3) return parse_rope_gemma3(c, root, cfg);
    const cJSON *rp = field(root, "rope_parameters"), *rs = rp ? rp : field(root, "rope_scaling");
    if (rs && !cJSON_IsObject(rs))
        return ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" must be an object", c->cfg_path, rp ? "rope_parameters" : "rope_scaling");
    cfg->rope_theta = 10000.0f;
    int rc = get_float(c, root, "rope_theta", &cfg->rope_theta, false);
    if (!rc && rp) rc = get_float(c, rp, "rope_theta", &cfg->rope_theta, false);
    float partial = 1.0f;
    if (!rc) rc = get_float(c, root, "partial_rotary_factor", &partial, false);
    if (!rc && rp) rc = get_float(c, rp, "partial_rotary_factor", &partial, false);
    if (rc) return rc;
    if (partial != 1.0f && cfg->arch != DS_ARCH_PHI3) /* only Phi-3's attention rotates part of a head */
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: partial_rotary_factor %g is not supported for %s", c->cfg_path,
                          partial, cfg->arch_name);
    if (!(partial > 0.0f && partial <= 1.0f))
        return ds_err_set(c->err, DS_EFORMAT, "%s: partial_rotary_factor %g is not in (0, 1]", c->cfg_path, partial);
    c->partial_rotary = partial;
    const char *type = rs ? get_str(rs, "rope_type") : NULL;
    if (rs && !type) type = get_str(rs, "type");
    if (!type || !strcmp(type, "default")) return 0;
    if (strcmp(type, "llama3"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: RoPE scaling type '%s' is not supported (default, llama3)",
                          c->cfg_path, type);
    cfg->rope_scaling = DS_ROPE_SCALING_LLAMA3;
    cfg->rope_orig_ctx = cfg->max_ctx; /* transformers' fallback when the field is absent */
    rc = get_float(c, rs, "factor", &cfg->rope_factor, true);
    if (!rc) rc = get_float(c, rs, "low_freq_factor", &cfg->rope_low_freq_factor, true);
    if (!rc) rc = get_float(c, rs, "high_freq_factor", &cfg->rope_high_freq_factor, true);
    if (!rc) rc = get_int(c, rs, "original_max_position_embeddings", &cfg->rope_orig_ctx, false);
    return rc;
}

/* Marks the layers "layer_types" calls sliding_attention. */
static int mark_layer_types(hctx *c, const cJSON *types, ds_model_config *cfg) {
    if (cJSON_GetArraySize(types) != cfg->n_layer)
        return ds_err_set(c->err, DS_EFORMAT, "%s: layer_types has %d entries for %d layers", c->cfg_path,
                          cJSON_GetArraySize(types), cfg->n_layer);
    int32_t i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, types) {
        const bool sl = cJSON_IsString(t) && !strcmp(t->valuestring, "sliding_attention");
        if (!sl && !(cJSON_IsString(t) && !strcmp(t->valuestring, "full_attention")))
            return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: layer_types[%d] is not full_attention or sliding_attention",
                              c->cfg_path, i);
        if (sl) ds_model_set_sliding(cfg, i);
        i++;
    }
    return 0;
}

/* Sliding-window attention, as transformers decides it: Mistral and Phi-3 on every layer when
 * sliding_window is set (its "layer_types", if any, is ignored there too); Qwen2/Qwen3 only with
 * use_sliding_window, on the layers "layer_types" marks sliding_attention, or else on layers
 * max_window_layers..; Gemma 3 on the layers "layer_types" marks, or else every layer but each
 * sliding_window_pattern-th (default 6), with a window of 4096 when the key is absent. Any
 * interleaving of full and sliding layers is computed as marked (ds_model_layer_window). */
static int parse_sliding(hctx *c, const cJSON *root, ds_model_config *cfg) {
    const cJSON *sw = field(root, "sliding_window"), *types = field(root, "layer_types");
    bool use = cfg->arch == DS_ARCH_MISTRAL || cfg->arch == DS_ARCH_PHI3 || cfg->arch == DS_ARCH_GEMMA3;
    if (sw && !cJSON_IsNumber(sw))
        return ds_err_set(c->err, DS_EFORMAT, "%s: sliding_window must be a number or null", c->cfg_path);
    double win = sw ? sw->valuedouble : 0;
    int rc = 0;
    if (cfg->arch == DS_ARCH_GEMMA3) {
        if (!cJSON_GetObjectItemCaseSensitive(root, "sliding_window")) win = 4096; /* Gemma3TextConfig default */
        int32_t pattern = 6;
        if (cJSON_IsArray(types)) {
            rc = mark_layer_types(c, types, cfg);
        } else if (!(rc = get_int(c, root, "sliding_window_pattern", &pattern, false))) {
            if (pattern < 1) return ds_err_set(c->err, DS_EFORMAT, "%s: sliding_window_pattern must be positive", c->cfg_path);
            for (int32_t i = 0; i < cfg->n_layer; i++)
                if ((i + 1) % pattern) ds_model_set_sliding(cfg, i);
        }
    } else if (cfg->arch == DS_ARCH_QWEN2 || cfg->arch == DS_ARCH_QWEN3) {
        int32_t first = 28; /* transformers' Qwen2Config / Qwen3Config default max_window_layers */
        rc = get_bool(c, root, "use_sliding_window", &use);
        if (!rc) rc = get_int(c, root, "max_window_layers", &first, false);
        if (!rc && use && cJSON_IsArray(types)) rc = mark_layer_types(c, types, cfg);
        else if (!rc && use)
            for (int32_t i = first; i < cfg->n_layer; i++) ds_model_set_sliding(cfg, i);
    } else if (use) {
        for (int32_t i = 0; i < cfg->n_layer; i++) ds_model_set_sliding(cfg, i);
    }
    if (rc || !use || !(win > 0 || win < 0)) return rc;
    if (!(win >= 1 && win <= INT32_MAX))
        return ds_err_set(c->err, DS_EFORMAT, "%s: sliding_window %g is not a usable window", c->cfg_path, win);
    if (win < cfg->max_ctx) cfg->sliding_window = (int32_t)win; /* else never reached: full attention */
    return 0;
}

static int parse_config(hctx *c, const cJSON *root) {
    ds_model_config *cfg = &c->m->cfg;
    if (!cJSON_IsObject(root)) return ds_err_set(c->err, DS_EFORMAT, "%s: not a JSON object", c->cfg_path);
    int rc = parse_arch(c, root, cfg);
    cfg->rms_eps = 1e-6f;
    if (!rc) rc = get_int(c, root, "hidden_size", &cfg->d_model, true);
    if (!rc) rc = get_int(c, root, "intermediate_size", &cfg->d_ff, true);
    if (!rc) rc = get_int(c, root, "num_hidden_layers", &cfg->n_layer, true);
    if (!rc) rc = get_int(c, root, "num_attention_heads", &cfg->n_head, true);
    if (!rc) rc = get_int(c, root, "num_key_value_heads", &cfg->n_kv_head, false);
    if (!rc) rc = get_int(c, root, "head_dim", &cfg->head_dim, false);
    if (!rc) rc = get_int(c, root, "vocab_size", &cfg->n_vocab, true);
    if (!rc) rc = get_int(c, root, "max_position_embeddings", &cfg->max_ctx, false);
    if (!rc) rc = get_float(c, root, "rms_norm_eps", &cfg->rms_eps, false);
    if (!rc) rc = get_bool(c, root, "tie_word_embeddings", &cfg->tied_embeddings);
    if (!rc) rc = parse_rope(c, root, cfg);
    if (!rc && c->partial_rotary > 0 && c->partial_rotary != 1.0f && cfg->n_head > 0) { /* int(head_dim * f) */
        const int32_t hd = cfg->head_dim ? cfg->head_dim : cfg->d_model / cfg->n_head;
        cfg->n_rot = (int32_t)((double)hd * (double)c->partial_rotary);
        if (cfg->n_rot < 2)
            return ds_err_set(c->err, DS_EFORMAT, "%s: partial_rotary_factor %g leaves %d rotary dimensions", c->cfg_path,
                              c->partial_rotary, cfg->n_rot);
    }
    if (!rc && cfg->arch == DS_ARCH_GEMMA3) rc = parse_gemma3(c, root, cfg);
    if (!rc) rc = ds_model_config_validate(cfg, c->cfg_path, c->err);
    if (!rc) rc = parse_sliding(c, root, cfg);
    return rc;
}

static int read_config(hctx *c) {
    char *text = NULL;
    int rc = join(c->cfg_path, sizeof c->cfg_path, c->dir, "config.json", c->err);
    if (!rc) rc = ds_file_read_all(c->cfg_path, 16u << 20, &text, NULL, c->err);
    if (rc) return rc;
    cJSON *root = cJSON_Parse(text);
    free(text);
    rc = root ? parse_config(c, root) : ds_err_set(c->err, DS_EFORMAT, "%s: not valid JSON", c->cfg_path);
    cJSON_Delete(root);
    return rc;
}

/* ---- weights ---- */

static void progress(hctx *c) {
    c->n_loaded++;
    size_t q_prev = (c->n_loaded - 1) * 4 / c->n_expected, q = c->n_loaded * 4 / c->n_expected;
    if (c->verbose && q != q_prev && q < 4)
        DS_LOGI("loading %s: %zu%% (%zu/%zu tensors, %.1f s)", c->dir, q * 25, c->n_loaded, c->n_expected,
                ds_time_s() - c->t0);
}

/* Loads vector `name` [cols] as fp32. */
static int load(hctx *c, const char *name, int64_t rows, int64_t cols, bool optional, float **dst) {
    const ds_st_file *f;
    const ds_st_tensor *t = ds_st_set_find(&c->set, name, &f);
    *dst = NULL;
    if (!t) return optional ? 0 : ds_err_set(c->err, DS_EFORMAT, "%s: missing tensor '%s'", c->dir, name);
    const int64_t shape[2] = {rows ? rows : cols, cols};
    const int nd = rows ? 2 : 1;
    int rc = ds_st_check_shape(t, f->path, shape, nd, c->err);
    if (rc) return rc;
    /* The shape matched a tensor whose bytes lie inside the file: the allocation is bounded by it. */
    size_t n = (size_t)t->n_elems;
    float *p = ds_model_alloc_floats(c->m, n);
    if (!p) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory for tensor '%s'", c->dir, name);
    if ((rc = ds_st_read_f32(t, f->path, shape, nd, p, n, c->err))) return rc;
    *dst = p;
    c->dtype_count[t->dtype]++; /* read_f32 succeeded: one of the three */
    c->m->n_params += n;
    c->m->weight_bytes[DS_DTYPE_F32] += n * sizeof(float);
    progress(c);
    return 0;
}

/* Loads matrix `name` [rows][cols] keeping its 16/32-bit format (an owned copy: the safetensors
 * files are closed after loading), or quantised with --quantize. */
static int load_mat(hctx *c, const char *name, int64_t rows, int64_t cols, bool optional, ds_weight *dst) {
    static const ds_dtype DT[3] = {DS_DTYPE_F32, DS_DTYPE_F16, DS_DTYPE_BF16}; /* ds_st_dtype order */
    const ds_st_file *f;
    const ds_st_tensor *t = ds_st_set_find(&c->set, name, &f);
    memset(dst, 0, sizeof *dst);
    if (!t) return optional ? 0 : ds_err_set(c->err, DS_EFORMAT, "%s: missing tensor '%s'", c->dir, name);
    const int64_t shape[2] = {rows, cols};
    int rc = ds_st_check_shape(t, f->path, shape, 2, c->err);
    if (rc) return rc;
    if (t->dtype > DS_ST_BF16)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' has dtype %s (F32, F16, BF16 are supported)", f->path,
                          name, t->dtype_name);
    if (rows > INT32_MAX || cols > INT32_MAX) return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is too large", f->path, name);
    const ds_dtype st = DT[t->dtype];
    rc = ds_model_set_weight(c->m, dst, t->data, st, ds_dtype_row_bytes(st, cols), (int32_t)rows, (int32_t)cols, NULL,
                             false, c->quantize);
    if (rc) return ds_err_set(c->err, rc, "%s: tensor '%s': %s", f->path, name, ds_strerror(rc));
    c->dtype_count[t->dtype]++;
    progress(c);
    return 0;
}

/* Phi-3's fused matrices: `name` [sum rows[k]][cols] becomes n weights of rows[k] rows each (owned
 * copies, like load_mat). */
static int load_mat_split(hctx *c, const char *name, int64_t cols, int n, const int64_t *rows, ds_weight **dst) {
    static const ds_dtype DT[3] = {DS_DTYPE_F32, DS_DTYPE_F16, DS_DTYPE_BF16};
    const ds_st_file *f;
    const ds_st_tensor *t = ds_st_set_find(&c->set, name, &f);
    if (!t) return ds_err_set(c->err, DS_EFORMAT, "%s: missing tensor '%s'", c->dir, name);
    int64_t total = 0;
    for (int k = 0; k < n; k++) total += rows[k];
    const int64_t shape[2] = {total, cols};
    int rc = ds_st_check_shape(t, f->path, shape, 2, c->err);
    if (rc) return rc;
    if (t->dtype > DS_ST_BF16)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' has dtype %s (F32, F16, BF16 are supported)", f->path,
                          name, t->dtype_name);
    if (total > INT32_MAX || cols > INT32_MAX) return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is too large", f->path, name);
    const ds_dtype st = DT[t->dtype];
    const size_t rb = ds_dtype_row_bytes(st, cols);
    const uint8_t *src = t->data;
    for (int k = 0; k < n; k++) {
        rc = ds_model_set_weight(c->m, dst[k], src, st, rb, (int32_t)rows[k], (int32_t)cols, NULL, false, c->quantize);
        if (rc) return ds_err_set(c->err, rc, "%s: tensor '%s': %s", f->path, name, ds_strerror(rc));
        src += (size_t)rows[k] * rb;
    }
    c->dtype_count[t->dtype]++;
    progress(c);
    return 0;
}

/* Phi-3 layer: qkv_proj [q|k|v] and gate_up_proj [gate|up] (transformers Phi3Attention / Phi3MLP). */
static int load_layer_fused(hctx *c, int i) {
    const ds_model_config *cfg = &c->m->cfg;
    ds_layer_weights *l = &c->m->layers[i];
    const int64_t d = cfg->d_model, q = (int64_t)cfg->n_head * cfg->head_dim, kv = (int64_t)cfg->n_kv_head * cfg->head_dim;
    char n[6][128];
    static const char *suffix[6] = {"input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                    "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"};
    for (int k = 0; k < 6; k++) snprintf(n[k], sizeof n[k], "model.layers.%d.%s", i, suffix[k]);
    const int64_t qkv_rows[3] = {q, kv, kv}, gu_rows[2] = {cfg->d_ff, cfg->d_ff};
    ds_weight *qkv[3] = {&l->wq, &l->wk, &l->wv}, *gu[2] = {&l->w_gate, &l->w_up};
    int rc = load(c, n[0], 0, d, false, &l->attn_norm);
    if (!rc) rc = load_mat_split(c, n[1], d, 3, qkv_rows, qkv);
    if (!rc) rc = load_mat(c, n[2], d, q, false, &l->wo);
    if (!rc) rc = load(c, n[3], 0, d, false, &l->ffn_norm);
    if (!rc) rc = load_mat_split(c, n[4], d, 2, gu_rows, gu);
    if (!rc) rc = load_mat(c, n[5], d, cfg->d_ff, false, &l->w_down);
    return rc;
}

static int load_layer(hctx *c, int i) {
    const ds_model_config *cfg = &c->m->cfg;
    ds_layer_weights *l = &c->m->layers[i];
    const int64_t d = cfg->d_model, q = (int64_t)cfg->n_head * cfg->head_dim, kv = (int64_t)cfg->n_kv_head * cfg->head_dim;
    static const char *suffix[12] = {
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"};
    char n[12][128];
    for (int k = 0; k < 12; k++) snprintf(n[k], sizeof n[k], "model.layers.%d.%s", i, suffix[k]);
    int rc = load(c, n[0], 0, d, false, &l->attn_norm);
    if (!rc) rc = load_mat(c, n[1], q, d, false, &l->wq);
    if (!rc) rc = load_mat(c, n[2], kv, d, false, &l->wk);
    if (!rc) rc = load_mat(c, n[3], kv, d, false, &l->wv);
    if (!rc) rc = load_mat(c, n[4], d, q, false, &l->wo);
    /* Gemma: post_attention_layernorm follows the attention; pre_feedforward_layernorm is the FFN's */
    if (!rc) rc = load(c, n[5], 0, d, false, cfg->post_norms ? &l->attn_post_norm : &l->ffn_norm);
    if (!rc && cfg->post_norms) {
        char pre[128], post[128];
        snprintf(pre, sizeof pre, "model.layers.%d.pre_feedforward_layernorm.weight", i);
        snprintf(post, sizeof post, "model.layers.%d.post_feedforward_layernorm.weight", i);
        rc = load(c, pre, 0, d, false, &l->ffn_norm);
        if (!rc) rc = load(c, post, 0, d, false, &l->ffn_post_norm);
    }
    if (!rc) rc = load_mat(c, n[6], cfg->d_ff, d, false, &l->w_gate);
    if (!rc) rc = load_mat(c, n[7], cfg->d_ff, d, false, &l->w_up);
    if (!rc) rc = load_mat(c, n[8], d, cfg->d_ff, false, &l->w_down);
    if (!rc && cfg->qkv_bias) rc = load(c, n[9], 0, q, false, &l->bq);
    if (!rc && cfg->qkv_bias) rc = load(c, n[10], 0, kv, false, &l->bk);
    if (!rc && cfg->qkv_bias) rc = load(c, n[11], 0, kv, false, &l->bv);
    if (cfg->qk_norm) {
        char qn[128], kn[128];
        snprintf(qn, sizeof qn, "model.layers.%d.self_attn.q_norm.weight", i);
        snprintf(kn, sizeof kn, "model.layers.%d.self_attn.k_norm.weight", i);
        if (!rc) rc = load(c, qn, 0, cfg->head_dim, false, &l->q_norm);
        if (!rc) rc = load(c, kn, 0, cfg->head_dim, false, &l->k_norm);
    }
    return rc;
}

/* Gemma3RMSNorm multiplies by (1 + w), in fp32: folded into the weights once (llama.cpp's converter
 * stores the GGUF norms so too). */
static void fold_gemma_norms(ds_model *m) {
    const ds_model_config *cfg = &m->cfg;
    for (int32_t i = 0; i < cfg->n_layer; i++) {
        ds_layer_weights *l = &m->layers[i];
        float *d_vecs[] = {l->attn_norm, l->attn_post_norm, l->ffn_norm, l->ffn_post_norm};
        for (size_t k = 0; k < 4; k++)
            for (int32_t j = 0; j < cfg->d_model; j++) d_vecs[k][j] = 1.0f + d_vecs[k][j];
        for (int32_t j = 0; j < cfg->head_dim; j++) l->q_norm[j] = 1.0f + l->q_norm[j], l->k_norm[j] = 1.0f + l->k_norm[j];
    }
    for (int32_t j = 0; j < cfg->d_model; j++) m->output_norm[j] = 1.0f + m->output_norm[j];
}

static int load_weights(hctx *c) {
    ds_model *m = c->m;
    const ds_model_config *cfg = &m->cfg;
    int rc = ds_st_set_open_dir(&c->set, c->dir, c->err);
    if (rc) return rc;
    c->n_expected = 2 +
                    (size_t)cfg->n_layer * (cfg->fused_qkv ? 6 : (cfg->qkv_bias ? 12 : 9) + (cfg->qk_norm ? 2 : 0) +
                                                                 (cfg->post_norms ? 2 : 0)) +
                    !cfg->tied_embeddings;
    if (!(m->layers = calloc((size_t)cfg->n_layer, sizeof *m->layers)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->dir);
    rc = load_mat(c, "model.embed_tokens.weight", cfg->n_vocab, cfg->d_model, false, &m->tok_embd);
    for (int i = 0; i < cfg->n_layer && !rc; i++) rc = cfg->fused_qkv ? load_layer_fused(c, i) : load_layer(c, i);
    if (!rc) rc = load(c, "model.norm.weight", 0, cfg->d_model, false, &m->output_norm);
    if (!rc && !cfg->tied_embeddings) rc = load_mat(c, "lm_head.weight", cfg->n_vocab, cfg->d_model, false, &m->output);
    if (rc) return rc;
    if (cfg->tied_embeddings) m->output = m->tok_embd;
    if (c->n_loaded < c->set.n_entries)
        DS_LOGW("%s: %zu tensors in the safetensors were not used", c->dir, c->set.n_entries - c->n_loaded);
    if (cfg->arch == DS_ARCH_GEMMA3) fold_gemma_norms(m);
    if (!(m->inv_freq = ds_model_alloc_floats(m, (size_t)cfg->head_dim / 2)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->dir);
    ds_rope_inv_freq(cfg, m->inv_freq);
    if (cfg->rope_theta_swa > 0) {
        if (!(m->inv_freq_swa = ds_model_alloc_floats(m, (size_t)cfg->head_dim / 2)))
            return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->dir);
        ds_rope_inv_freq_swa(cfg, m->inv_freq_swa);
    }
    return 0;
}

/* ---- tokenizer and chat template ---- */

/* chat_template from tokenizer_config.json (a string, or a list of {name, template} where "default"
 * wins), else the chat_template.jinja file newer transformers write. Absent → NULL, not an error. */
static int template_from_config(hctx *c, const char *path) {
    char *text = NULL;
    int rc = ds_file_read_all(path, 64u << 20, &text, NULL, c->err);
    if (rc) return rc;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return ds_err_set(c->err, DS_EFORMAT, "%s: not a JSON object", path);
    }
    const cJSON *t = field(root, "chat_template"), *pick = cJSON_IsString(t) ? t : NULL;
    for (const cJSON *it = cJSON_IsArray(t) ? t->child : NULL; it; it = it->next) {
        const char *name = get_str(it, "name");
        const cJSON *tt = field(it, "template");
        if (cJSON_IsString(tt) && (!pick || (name && !strcmp(name, "default")))) pick = tt;
    }
    if (pick && !(c->m->chat_template = strdup(pick->valuestring))) rc = ds_err_set(c->err, DS_ENOMEM, "out of memory");
    cJSON_Delete(root);
    return rc;
}

static int load_tokenizer(hctx *c, bool want_tok) {
    char tj[PATH_MAX], tc[PATH_MAX], jinja[PATH_MAX];
    int rc = join(tj, sizeof tj, c->dir, "tokenizer.json", c->err);
    if (!rc) rc = join(tc, sizeof tc, c->dir, "tokenizer_config.json", c->err);
    if (!rc) rc = join(jinja, sizeof jinja, c->dir, "chat_template.jinja", c->err);
    if (rc) return rc;
    const bool have_tc = exists(tc);
    if (have_tc && (rc = template_from_config(c, tc))) return rc;
    if (!c->m->chat_template && exists(jinja) &&
        (rc = ds_file_read_all(jinja, 16u << 20, &c->m->chat_template, NULL, c->err)))
        return rc;
    if (!want_tok) return 0;
    if (!exists(tj)) {
        DS_LOGW("%s: no tokenizer.json; text endpoints will be unavailable", c->dir);
        return 0;
    }
    ds_err e = {{0}};
    if (!(c->m->tok = ds_tokenizer_load_json(tj, have_tc ? tc : NULL, &e)))
        return ds_err_set(c->err, DS_EFORMAT, "%s", e.msg[0] ? e.msg : "tokenizer.json: cannot load");
    return 0;
}

/* ---- entry point ---- */

static int load_all(hctx *c, const ds_model_params *p) {
    if (!(c->m->source_path = strdup(c->dir))) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    int rc = read_config(c);
    if (!rc && p->load_weights) rc = load_weights(c);
    if (!rc) rc = load_tokenizer(c, p->load_tokenizer);
    if (rc || !p->load_weights) return rc;
    if ((rc = ds_model_check_complete(c->m, c->err))) return rc;
    c->m->weights_loaded = true;
    char mem[160];
    ds_model_weight_summary(c->m, mem, sizeof mem);
    if (c->verbose)
        DS_LOGI("loaded %s: %s, %d layers, %.1fM params (F32 x%zu, F16 x%zu, BF16 x%zu) from %zu safetensors file(s), "
                "%s embeddings, weights in memory %s, %.2f s",
                c->dir, c->m->cfg.arch_name, c->m->cfg.n_layer, (double)c->m->n_params / 1e6, c->dtype_count[0],
                c->dtype_count[1], c->dtype_count[2], c->set.n_files, c->m->cfg.tied_embeddings ? "tied" : "untied",
                mem, ds_time_s() - c->t0);
    return rc;
}

ds_model *ds_model_load_hf_dir(const char *dir, const ds_model_params *params, ds_err *err) {
    ds_model_params def = ds_model_default_params();
    const ds_model_params *p = params ? params : &def;
    if (!dir) {
        ds_err_set(err, DS_EINVAL, "ds_model_load_hf_dir: no path");
        return NULL;
    }
    hctx c = {.dir = dir, .err = err, .verbose = p->verbose, .quantize = p->quantize, .t0 = ds_time_s()};
    if (!(c.m = ds_model_new())) {
        ds_err_set(err, DS_ENOMEM, "%s: out of memory", dir);
        return NULL;
    }
    int rc = load_all(&c, p);
    ds_st_set_close(&c.set);
    if (rc) {
        ds_model_free(c.m);
        return NULL;
    }
    return c.m;
}
