/* AdapterHub bottleneck adapters (`adapters` package: save_adapter(dir, name, use_safetensors=True)):
 * adapter_config.json {"config": {"architecture": "bottleneck", ...}, "hidden_size", "model_type",
 * "name", "version"} + adapter.safetensors with, per layer i,
 *   model.layers.i.{attention_adapters|output_adapters}.adapters.<name>.
 *     adapter_down.0.{weight [size][d], bias [size]}      (adapter_down.1.* when ln_before: .0 is the LN)
 *     adapter_up.{weight [d][size], bias [d]}
 *     scaling [1] ("learned") or [d] ("channel"); adapter_norm_{before,after}.{weight,bias} [d]
 *
 * The package's forward (a sequential Adapter / ParallelAdapter around the attention output and the
 * MLP output of each decoder layer; Llama passes no layer norm, Qwen2 is hooked on o_proj/down_proj):
 *   sequential: a = original_ln_before ? o + x : o;  r = residual_before_ln ? o : a
 *               u = scaling · up(act(down(ln_before(a))))
 *               v = adapter_residual_before_ln ? ln_after(u + r) : ln_after(u) + r
 *               x' = original_ln_after ? v + x : v
 *   parallel:   x' = o + ln_after(scaling · up(act(down(ln_before(x))))) (+ x if original_ln_after)
 * On Qwen2 (hooked) the model itself adds x afterwards and the package refuses original_ln_after
 * false, so x is always added there. Everything else the configs carry that changes this math is
 * refused by name: Compacter (PHM layers), gating (UniPELT), invertible adapters, residual_before_ln
 * "post_add" (fails in the package without an original LN), learned activations (prelu, xielu).
 * Config unions of one prefix_tuning and one bottleneck member (MAM) are served: the prefix by
 * ah_prefix.c into the pinned prefix-KV blocks, the bottleneck modules here; other unions (UniPELT's
 * LoRA member, two bottleneck members) are refused by name. Prefix tuning alone is served too.
 * Training-only options (dropout, init, stochastic_depth) are ignored. The tensors must match the
 * config exactly (sites, leave_out, reduction factors). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapter/loader.h"

typedef struct bn_cfg {
    bool mh, out, parallel, orig_ln_before, orig_ln_after, ln_before, ln_after, res_before_ln, adapter_res_before_ln;
    int scaling_kind; /* 0 float, 1 learned, 2 channel */
    double scaling;
    ds_act act;
    const cJSON *rf;  /* number or {"<layer>": n, "default": n} */
    const cJSON *leave_out;
    bool has_bn, has_prefix; /* which members the config (or union) has */
    ds_ah_prefix_cfg prefix; /* AdapterHub prefix tuning (ah_prefix.c) */
} bn_cfg;

typedef struct bn_ctx {
    const char *cfg_path, *st_path;
    const ds_model *base;
    bool hooked; /* Qwen2: the package hooks the adapters on o_proj / down_proj outputs */
    ds_err *err;
} bn_ctx;

static bool exists(const char *dir, const char *name) {
    char p[4200];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return stat(p, &st) == 0;
}

bool ds_bottleneck_is_dir(const char *dir) {
    return !exists(dir, "adapter_model.safetensors") && !exists(dir, "adapter_model.bin") &&
           (exists(dir, "adapter.safetensors") || exists(dir, "pytorch_adapter.bin"));
}

/* ---- adapter_config.json ---- */

static const cJSON *field(const cJSON *o, const char *name) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNull(j) ? NULL : j;
}

static int get_bool(bn_ctx *c, const cJSON *o, const char *name, bool dflt, bool *out) {
    const cJSON *j = field(o, name);
    *out = dflt;
    if (!j) return 0;
    if (!cJSON_IsBool(j)) return ds_err_set(c->err, DS_EFORMAT, "%s: \"%s\" must be true or false", c->cfg_path, name);
    *out = cJSON_IsTrue(j);
    return 0;
}

/* transformers' ACT2FN names (lower-cased by the package) plus its own "leakyrelu". */
int ds_ah_parse_act(const cJSON *j, bool legacy, const char *src, ds_act *out, ds_err *err) {
    static const struct {
        const char *name;
        ds_act act;
    } acts[] = {
        {"linear", DS_ACT_IDENTITY},        {"relu", DS_ACT_RELU},           {"relu2", DS_ACT_RELU2},
        {"relu6", DS_ACT_RELU6},            {"leaky_relu", DS_ACT_LEAKY_RELU}, {"leakyrelu", DS_ACT_LEAKY_RELU},
        {"gelu", DS_ACT_GELU},              {"gelu_python", DS_ACT_GELU},    {"gelu_10", DS_ACT_GELU_10},
        {"gelu_new", DS_ACT_GELU_TANH},     {"gelu_pytorch_tanh", DS_ACT_GELU_TANH},
        {"gelu_python_tanh", DS_ACT_GELU_TANH}, {"gelu_accurate", DS_ACT_GELU_TANH},
        {"gelu_fast", DS_ACT_GELU_FAST},    {"quick_gelu", DS_ACT_QUICK_GELU}, {"silu", DS_ACT_SILU},
        {"swish", DS_ACT_SILU},             {"sigmoid", DS_ACT_SIGMOID},     {"tanh", DS_ACT_TANH},
        {"mish", DS_ACT_MISH},              {"laplace", DS_ACT_LAPLACE},
    };
    if (!j) {
        *out = DS_ACT_IDENTITY; /* None → nn.Identity */
        return 0;
    }
    if (!cJSON_IsString(j) || strlen(j->valuestring) >= 32)
        return ds_err_set(err, DS_EFORMAT, "%s: \"non_linearity\" must be a string", src);
    char name[32];
    size_t n = strlen(j->valuestring);
    for (size_t i = 0; i <= n; i++) name[i] = (char)tolower((unsigned char)j->valuestring[i]);
    if (legacy && !strcmp(name, "gelu")) snprintf(name, sizeof name, "gelu_new"); /* pre-"version" configs */
    else if (legacy && !strcmp(name, "gelu_orig")) snprintf(name, sizeof name, "gelu");
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
        if (!strcmp(acts[i].name, name)) {
            *out = acts[i].act;
            return 0;
        }
    if (!strcmp(name, "prelu") || !strcmp(name, "xielu"))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: non_linearity \"%s\" has learned parameters (not supported)",
                          src, name);
    return ds_err_set(err, DS_EFORMAT, "%s: unknown non_linearity \"%s\"", src, j->valuestring);
}

/* Keys of BnConfig that do not change the inference math (training-only, or sites a decoder-only
 * Llama/Qwen2 does not have), and those checked one by one below. */
static const char *const IGNORED[] = {"init_weights", "init_weights_seed", "dropout", "stochastic_depth",
                                      "cross_adapter", "inv_adapter_reduction_factor", "phm_dim", "factorized_phm_W",
                                      "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
                                      "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank",
                                      "phm_bias", "architecture"};
static const char *const CHECKED[] = {"mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
                                      "original_ln_before", "original_ln_after", "ln_before", "ln_after",
                                      "is_parallel", "scaling", "use_gating", "residual_before_ln",
                                      "adapter_residual_before_ln", "inv_adapter", "leave_out", "phm_layer"};

static bool in_list(const char *k, const char *const *l, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(k, l[i])) return true;
    return false;
}

static int refuse_features(bn_ctx *c, const cJSON *cfg) {
    const char *f = c->cfg_path;
    const cJSON *j;
    if (cJSON_IsTrue(field(cfg, "phm_layer")))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: phm_layer true (Compacter / PHM layers) is not supported", f);
    if (cJSON_IsTrue(field(cfg, "use_gating")))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: use_gating true (UniPELT gating) is not supported", f);
    if ((j = field(cfg, "inv_adapter")))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: inv_adapter \"%s\" (invertible adapter on the embeddings) is "
                          "not supported", f, cJSON_IsString(j) ? j->valuestring : "?");
    const cJSON *it;
    cJSON_ArrayForEach(it, cfg) {
        if (!it->string || (!in_list(it->string, IGNORED, sizeof IGNORED / sizeof *IGNORED) &&
                            !in_list(it->string, CHECKED, sizeof CHECKED / sizeof *CHECKED)))
            return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: unknown bottleneck config key \"%s\"", f,
                              it->string ? it->string : "?");
    }
    return 0;
}

static int parse_scaling(bn_ctx *c, const cJSON *j, bn_cfg *b) {
    b->scaling = 1.0;
    if (!j) return 0;
    if (cJSON_IsNumber(j) && isfinite(j->valuedouble)) {
        b->scaling = j->valuedouble;
        return 0;
    }
    if (cJSON_IsString(j) && !strcmp(j->valuestring, "learned")) b->scaling_kind = 1;
    else if (cJSON_IsString(j) && !strcmp(j->valuestring, "channel")) b->scaling_kind = 2;
    else return ds_err_set(c->err, DS_EFORMAT, "%s: scaling must be a number, \"learned\" or \"channel\"", c->cfg_path);
    return 0;
}

static int parse_bn(bn_ctx *c, const cJSON *cfg, bool legacy, bn_cfg *b) {
    int rc = refuse_features(c, cfg);
    const cJSON *rbl = field(cfg, "residual_before_ln");
    if (!rc && cJSON_IsString(rbl))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: residual_before_ln \"%s\" is not supported (the package itself "
                          "needs an original layer norm there, which Llama/Qwen2 layers do not have)", c->cfg_path,
                          rbl->valuestring);
    if (!rc && (!cJSON_IsBool(field(cfg, "mh_adapter")) || !cJSON_IsBool(field(cfg, "output_adapter"))))
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: mh_adapter and output_adapter must be true or false", c->cfg_path);
    if (!rc) rc = get_bool(c, cfg, "mh_adapter", false, &b->mh);
    if (!rc) rc = get_bool(c, cfg, "output_adapter", false, &b->out);
    if (!rc) rc = get_bool(c, cfg, "is_parallel", false, &b->parallel);
    if (!rc) rc = get_bool(c, cfg, "original_ln_before", false, &b->orig_ln_before);
    if (!rc) rc = get_bool(c, cfg, "original_ln_after", true, &b->orig_ln_after);
    if (!rc) rc = get_bool(c, cfg, "ln_before", false, &b->ln_before);
    if (!rc) rc = get_bool(c, cfg, "ln_after", false, &b->ln_after);
    if (!rc) rc = get_bool(c, cfg, "residual_before_ln", true, &b->res_before_ln);
    if (!rc) rc = get_bool(c, cfg, "adapter_residual_before_ln", false, &b->adapter_res_before_ln);
    if (!rc) rc = ds_ah_parse_act(field(cfg, "non_linearity"), legacy, c->cfg_path, &b->act, c->err);
    if (!rc) rc = parse_scaling(c, field(cfg, "scaling"), b);
    if (rc) return rc;
    b->rf = field(cfg, "reduction_factor");
    if (!b->rf || !(cJSON_IsNumber(b->rf) || cJSON_IsObject(b->rf)))
        return ds_err_set(c->err, DS_EFORMAT, "%s: reduction_factor must be a number or an object", c->cfg_path);
    b->leave_out = field(cfg, "leave_out");
    if (b->leave_out && !cJSON_IsArray(b->leave_out))
        return ds_err_set(c->err, DS_EFORMAT, "%s: leave_out must be a list of layer indices", c->cfg_path);
    if (c->hooked && !b->orig_ln_after)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: original_ln_after false is not supported on %s (the package "
                          "refuses it on hooked models)", c->cfg_path, c->base->cfg.arch_name);
    return 0;
}

/* A config union: at most one prefix_tuning and one bottleneck member (MAM: prefix tuning + a scaled
 * parallel adapter on the FFN). LoRA members (UniPELT), two bottleneck members and the rest are
 * refused by name. */
static int parse_union(bn_ctx *c, const cJSON *cfg, bool legacy, bn_cfg *b) {
    char names[160] = "";
    const cJSON *cs = field(cfg, "configs"), *it;
    if (!cJSON_IsArray(cs) || cJSON_GetArraySize(cs) == 0)
        return ds_err_set(c->err, DS_EFORMAT, "%s: a config union needs a non-empty \"configs\" list", c->cfg_path);
    bool lora = false;
    cJSON_ArrayForEach(it, cs) {
        const cJSON *a = field(it, "architecture"); /* absent (null) for bottleneck configs */
        size_t n = strlen(names);
        snprintf(names + n, sizeof names - n, "%s%.24s", n ? "+" : "", cJSON_IsString(a) ? a->valuestring : "bottleneck");
        lora |= cJSON_IsString(a) && !strcmp(a->valuestring, "lora");
    }
    if (lora)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: config union (%s) with an AdapterHub LoRA member (e.g. "
                          "UniPELT) is not supported; MAM (prefix_tuning+bottleneck) is", c->cfg_path, names);
    cJSON_ArrayForEach(it, cfg) {
        if (!it->string || (strcmp(it->string, "architecture") && strcmp(it->string, "configs")))
            return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: unknown config union key \"%s\"", c->cfg_path,
                              it->string ? it->string : "?");
    }
    cJSON_ArrayForEach(it, cs) {
        const cJSON *a = field(it, "architecture");
        const char *an = cJSON_IsString(a) ? a->valuestring : "bottleneck";
        int rc;
        if (!cJSON_IsObject(it) || (a && !cJSON_IsString(a)))
            return ds_err_set(c->err, DS_EFORMAT, "%s: every member of a config union must be an object whose "
                              "\"architecture\" is a string or null", c->cfg_path);
        if (!strcmp(an, "prefix_tuning") && !b->has_prefix) {
            b->has_prefix = true;
            rc = ds_ah_prefix_config(it, c->base, c->cfg_path, &b->prefix, c->err);
        } else if (!strcmp(an, "bottleneck") && !b->has_bn) {
            b->has_bn = true;
            rc = parse_bn(c, it, legacy, b);
        } else {
            rc = ds_err_set(c->err, DS_EUNSUPPORTED, "%s: config union (%s): member \"%s\" is not supported (at most "
                            "one prefix_tuning and one bottleneck member, as MAM, are)", c->cfg_path, names, an);
        }
        if (rc) return rc;
    }
    return 0;
}

static int parse_top(bn_ctx *c, const cJSON *root, bn_cfg *b) {
    const char *f = c->cfg_path;
    const cJSON *cfg = field(root, "config");
    if (!cJSON_IsObject(root) || !cJSON_IsObject(cfg))
        return ds_err_set(c->err, DS_EFORMAT, "%s: not an AdapterHub adapter config (no \"config\" object)", f);
    const cJSON *hs = field(root, "hidden_size"), *mt = field(root, "model_type");
    if (hs && (!cJSON_IsNumber(hs) || hs->valuedouble != c->base->cfg.d_model))
        return ds_err_set(c->err, DS_EFORMAT, "%s: hidden_size %g, but the base model's is %d", f,
                          cJSON_IsNumber(hs) ? hs->valuedouble : -1.0, c->base->cfg.d_model);
    if (mt && (!cJSON_IsString(mt) || strcmp(mt->valuestring, c->base->cfg.arch_name)))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: model_type \"%s\", but the base model is \"%s\"", f,
                          cJSON_IsString(mt) ? mt->valuestring : "?", c->base->cfg.arch_name);
    const cJSON *arch = field(cfg, "architecture");
    const bool legacy = field(root, "version") == NULL;
    if (arch && !cJSON_IsString(arch)) return ds_err_set(c->err, DS_EFORMAT, "%s: \"architecture\" must be a string", f);
    if (arch && !strcmp(arch->valuestring, "union")) return parse_union(c, cfg, legacy, b);
    if (arch && !strcmp(arch->valuestring, "prefix_tuning")) {
        b->has_prefix = true;
        return ds_ah_prefix_config(cfg, c->base, f, &b->prefix, c->err);
    }
    if (arch && strcmp(arch->valuestring, "bottleneck"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: AdapterHub \"%s\" adapters are not supported (bottleneck, "
                          "prefix_tuning and their union, MAM, are)", f, arch->valuestring);
    b->has_bn = true;
    return parse_bn(c, cfg, legacy, b);
}

/* ---- tensors ---- */

enum { T_DOWN_W, T_DOWN_B, T_UP_W, T_UP_B, T_SCALING, T_LNB_W, T_LNB_B, T_LNA_W, T_LNA_B, T_COUNT };

typedef struct bn_slots {
    const ds_st_tensor *t[T_COUNT];
    const ds_st_tensor *lnb_dup[2]; /* adapter_down.0.{weight,bias} when ln_before (the same LN) */
    bool any;
} bn_slots;

static int role_of(const char *rest, bool ln_before, int *dup) {
    static const struct {
        const char *name;
        int role;
    } fixed[] = {{"adapter_up.weight", T_UP_W},
                 {"adapter_up.bias", T_UP_B},
                 {"scaling", T_SCALING},
                 {"adapter_norm_before.weight", T_LNB_W},
                 {"adapter_norm_before.bias", T_LNB_B},
                 {"adapter_norm_after.weight", T_LNA_W},
                 {"adapter_norm_after.bias", T_LNA_B}};
    *dup = -1;
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++)
        if (!strcmp(rest, fixed[i].name)) return fixed[i].role;
    /* adapter_down is nn.Sequential([LayerNorm if ln_before], Linear, activation) */
    const char *lin = ln_before ? "adapter_down.1." : "adapter_down.0.";
    if (!strncmp(rest, lin, 15)) return !strcmp(rest + 15, "weight") ? T_DOWN_W : !strcmp(rest + 15, "bias") ? T_DOWN_B : -1;
    if (ln_before && !strncmp(rest, "adapter_down.0.", 15)) {
        *dup = !strcmp(rest + 15, "weight") ? 0 : !strcmp(rest + 15, "bias") ? 1 : -1;
        return *dup < 0 ? -1 : T_COUNT;
    }
    return -1;
}

static int refuse_tensor(bn_ctx *c, const char *name) {
    if (strstr(name, "W_left") || strstr(name, "W_right") || strstr(name, "phm_rule") || strstr(name, ".W."))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is a Compacter (PHM) parameter: not supported",
                          c->st_path, name);
    if (strstr(name, ".gate."))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is a gating parameter (UniPELT): not supported",
                          c->st_path, name);
    return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' is not a bottleneck adapter tensor deltaserve applies",
                      c->st_path, name);
}

/* "model.layers.<i>.<attention|output>_adapters.adapters.<name>.<rest>" → slot. */
static int place(bn_ctx *c, const bn_cfg *b, const ds_st_tensor *t, bn_slots *slots, const char **adapter_name,
                 size_t *name_len) {
    const char *s = t->name;
    if (b->has_prefix && ds_ah_prefix_tensor(s)) return 0; /* ds_ah_prefix_load reads those */
    if (!b->has_bn || strncmp(s, "model.layers.", 13)) return refuse_tensor(c, t->name);
    char *end;
    errno = 0;
    if (s[13] < '0' || s[13] > '9') return refuse_tensor(c, t->name); /* strtol would take " +1" */
    long layer = strtol(s + 13, &end, 10);
    if (*end != '.' || errno || layer < 0) return refuse_tensor(c, t->name);
    if (layer >= c->base->cfg.n_layer)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': layer %ld, but the base model has %d layers",
                          c->st_path, t->name, layer, c->base->cfg.n_layer);
    s = end + 1;
    int site = !strncmp(s, "attention_adapters.adapters.", 28) ? DS_BN_ATTN
               : !strncmp(s, "output_adapters.adapters.", 25) ? DS_BN_FFN : -1;
    if (site < 0) return refuse_tensor(c, t->name);
    s += site == DS_BN_ATTN ? 28 : 25;
    const char *dot = strchr(s, '.');
    if (!dot || dot == s) return refuse_tensor(c, t->name);
    if (!*adapter_name) *adapter_name = s, *name_len = (size_t)(dot - s);
    else if ((size_t)(dot - s) != *name_len || strncmp(s, *adapter_name, *name_len))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' belongs to another adapter than '%.*s' (one "
                          "adapter per directory)", c->st_path, t->name, (int)*name_len, *adapter_name);
    int dup, role = role_of(dot + 1, b->ln_before, &dup);
    if (role < 0) return refuse_tensor(c, t->name);
    bn_slots *sl = &slots[layer * DS_BN_SITES + site];
    const ds_st_tensor **dst = role == T_COUNT ? &sl->lnb_dup[dup] : &sl->t[role];
    if (*dst) return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' appears twice", c->st_path, t->name);
    *dst = t;
    sl->any = true;
    return 0;
}

static bool left_out(const bn_cfg *b, int32_t layer) {
    const cJSON *it;
    cJSON_ArrayForEach(it, b->leave_out)
        if (cJSON_IsNumber(it) && it->valuedouble == layer) return true;
    return false;
}

/* Bottleneck width the package builds: int(hidden_size // reduction_factor), at least 1. */
static int expected_size(bn_ctx *c, const bn_cfg *b, int32_t layer, int32_t *out) {
    const cJSON *rf = b->rf;
    if (cJSON_IsObject(rf)) {
        char key[16];
        snprintf(key, sizeof key, "%d", layer);
        const cJSON *v = field(rf, key);
        rf = v ? v : field(rf, "default");
        if (!rf)
            return ds_err_set(c->err, DS_EFORMAT, "%s: reduction_factor has neither \"%d\" nor \"default\"",
                              c->cfg_path, layer);
    }
    if (!cJSON_IsNumber(rf) || !isfinite(rf->valuedouble) || rf->valuedouble <= 0)
        return ds_err_set(c->err, DS_EFORMAT, "%s: reduction_factor for layer %d must be a positive number",
                          c->cfg_path, layer);
    double s = floor((double)c->base->cfg.d_model / rf->valuedouble);
    *out = s < 1 ? 1 : s > 1 << 20 ? 1 << 20 : (int32_t)s;
    return 0;
}

static int read_vec(bn_ctx *c, const ds_st_tensor *t, int64_t n, float **out) {
    const int64_t shape[1] = {n};
    int rc = ds_st_check_shape(t, c->st_path, shape, 1, c->err);
    if (!rc && !(*out = malloc(sizeof(float) * (size_t)n))) rc = ds_err_set(c->err, DS_ENOMEM, "out of memory");
    if (!rc) rc = ds_st_read_f32(t, c->st_path, shape, 1, *out, (size_t)n, c->err);
    for (int64_t i = 0; !rc && i < n; i++)
        if (!isfinite((*out)[i]))
            rc = ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' holds a non-finite value at index %lld", c->st_path,
                            t->name, (long long)i);
    return rc;
}

static int read_mat(bn_ctx *c, const ds_st_tensor *t, int64_t rows, int64_t cols, float **out) {
    const int64_t shape[2] = {rows, cols};
    int rc = ds_st_check_shape(t, c->st_path, shape, 2, c->err);
    if (!rc && !(*out = malloc(sizeof(float) * (size_t)(rows * cols)))) rc = ds_err_set(c->err, DS_ENOMEM, "out of memory");
    if (!rc) rc = ds_st_read_f32(t, c->st_path, shape, 2, *out, (size_t)(rows * cols), c->err);
    for (int64_t i = 0; !rc && i < rows * cols; i++)
        if (!isfinite((*out)[i]))
            rc = ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' holds a non-finite value at index %lld", c->st_path,
                            t->name, (long long)i);
    return rc;
}

static const char *const ROLE_NAMES[T_COUNT] = {"adapter_down weight", "adapter_down bias", "adapter_up.weight",
                                                "adapter_up.bias", "scaling", "adapter_norm_before.weight",
                                                "adapter_norm_before.bias", "adapter_norm_after.weight",
                                                "adapter_norm_after.bias"};

/* Which tensors a module must have, and nothing else. */
static int check_roles(bn_ctx *c, const bn_cfg *b, bn_slots *sl, int32_t layer, int site) {
    if (b->ln_before) {
        for (int k = 0; k < 2; k++)
            if (!sl->t[T_LNB_W + k]) sl->t[T_LNB_W + k] = sl->lnb_dup[k];
    } else if (sl->lnb_dup[0] || sl->lnb_dup[1]) {
        return ds_err_set(c->err, DS_EFORMAT, "%s: adapter_down.0 of layer %d is a layer norm but ln_before is false",
                          c->st_path, layer);
    }
    for (int r = 0; r < T_COUNT; r++) {
        bool want = r <= T_UP_B || (r == T_SCALING && b->scaling_kind) || ((r == T_LNB_W || r == T_LNB_B) && b->ln_before) ||
                    ((r == T_LNA_W || r == T_LNA_B) && b->ln_after);
        if (want && !sl->t[r])
            return ds_err_set(c->err, DS_EFORMAT, "%s: layer %d %s adapter: missing %s", c->st_path, layer,
                              site == DS_BN_ATTN ? "attention" : "output", ROLE_NAMES[r]);
        if (!want && sl->t[r])
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' does not fit the config (scaling %s, ln_before %d, "
                              "ln_after %d)", c->st_path, sl->t[r]->name,
                              b->scaling_kind == 1 ? "learned" : b->scaling_kind == 2 ? "channel" : "a number",
                              b->ln_before, b->ln_after);
    }
    return 0;
}

static uint32_t flags_of(const bn_ctx *c, const bn_cfg *b) {
    uint32_t f = 0;
    if (b->parallel) f |= DS_BN_PARALLEL;
    if (!b->parallel && b->orig_ln_before) f |= DS_BN_IN_PLUS_X;
    if (!b->res_before_ln) f |= DS_BN_RES_INPUT;
    if (b->adapter_res_before_ln) f |= DS_BN_RES_BEFORE_LN;
    if (b->orig_ln_after || c->hooked) f |= DS_BN_ADD_X;
    return f;
}

static int load_module(bn_ctx *c, const bn_cfg *b, bn_slots *sl, int32_t layer, int site, ds_bn_module **out) {
    const int32_t d = c->base->cfg.d_model;
    int rc = check_roles(c, b, sl, layer, site);
    int32_t want = 0;
    if (!rc) rc = expected_size(c, b, layer, &want);
    if (rc) return rc;
    const ds_st_tensor *dw = sl->t[T_DOWN_W];
    if (dw->n_dims != 2 || dw->shape[1] != d || dw->shape[0] != want)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must have shape [%d, %d] (hidden %d / reduction_factor "
                          "of layer %d)", c->st_path, dw->name, want, d, d, layer);
    ds_bn_module *m = calloc(1, sizeof *m);
    if (!m) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    *out = m;
    *m = (ds_bn_module){.size = want, .d = d, .act = b->act, .flags = flags_of(c, b), .scale = (float)b->scaling};
    rc = read_mat(c, dw, want, d, &m->down);
    if (!rc) rc = read_vec(c, sl->t[T_DOWN_B], want, &m->down_b);
    if (!rc) rc = read_mat(c, sl->t[T_UP_W], d, want, &m->up);
    if (!rc) rc = read_vec(c, sl->t[T_UP_B], d, &m->up_b);
    if (!rc && b->scaling_kind == 1) {
        float *s = NULL;
        rc = read_vec(c, sl->t[T_SCALING], 1, &s);
        if (!rc) m->scale = s[0];
        free(s);
    }
    if (!rc && b->scaling_kind == 2) rc = read_vec(c, sl->t[T_SCALING], d, &m->scale_vec);
    if (!rc && b->ln_before) rc = read_vec(c, sl->t[T_LNB_W], d, &m->ln_b_w);
    if (!rc && b->ln_before) rc = read_vec(c, sl->t[T_LNB_B], d, &m->ln_b_b);
    if (!rc && b->ln_after) rc = read_vec(c, sl->t[T_LNA_W], d, &m->ln_a_w);
    if (!rc && b->ln_after) rc = read_vec(c, sl->t[T_LNA_B], d, &m->ln_a_b);
    return rc;
}

static size_t module_bytes(const ds_bn_module *m) {
    size_t n = (size_t)m->size * (2 * (size_t)m->d + 1) + (size_t)m->d;
    n += (m->scale_vec ? 1 : 0) * (size_t)m->d + (m->ln_b_w ? 2 : 0) * (size_t)m->d + (m->ln_a_w ? 2 : 0) * (size_t)m->d;
    return n * sizeof(float);
}

void ds_bn_module_free(ds_bn_module *m) {
    if (!m) return;
    float *p[] = {m->scale_vec, m->down, m->down_b, m->up, m->up_b, m->ln_b_w, m->ln_b_b, m->ln_a_w, m->ln_a_b};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++) free(p[i]);
    free(m);
}

static int load_tensors(bn_ctx *c, const bn_cfg *b, const ds_st_file *st, ds_adapter *a) {
    const int32_t L = c->base->cfg.n_layer;
    bn_slots *slots = calloc((size_t)L * DS_BN_SITES, sizeof *slots);
    a->bn = calloc((size_t)L * DS_BN_SITES, sizeof *a->bn);
    if (!slots || !a->bn) {
        free(slots);
        return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    }
    const char *name = NULL;
    size_t name_len = 0;
    int rc = 0;
    for (size_t i = 0; !rc && i < st->n_tensors; i++) rc = place(c, b, &st->tensors[i], slots, &name, &name_len);
    int32_t n_mod = 0;
    for (int32_t l = 0; !rc && b->has_bn && l < L; l++)
        for (int s = 0; !rc && s < DS_BN_SITES; s++) {
            bn_slots *sl = &slots[l * DS_BN_SITES + s];
            const bool want = (s == DS_BN_ATTN ? b->mh : b->out) && !left_out(b, l);
            if (sl->any && !want)
                rc = ds_err_set(c->err, DS_EFORMAT, "%s: tensors for the %s adapter of layer %d, but the config has "
                                "%s", c->st_path, s == DS_BN_ATTN ? "attention" : "output", l,
                                left_out(b, l) ? "the layer in leave_out" : s == DS_BN_ATTN ? "mh_adapter false"
                                                                                            : "output_adapter false");
            else if (want && !sl->any)
                rc = ds_err_set(c->err, DS_EFORMAT, "%s: no tensors for the %s adapter of layer %d", c->st_path,
                                s == DS_BN_ATTN ? "attention" : "output", l);
            else if (want && !(rc = load_module(c, b, sl, l, s, &a->bn[l * DS_BN_SITES + s]))) {
                a->host_bytes += module_bytes(a->bn[l * DS_BN_SITES + s]);
                n_mod++;
            }
        }
    if (!rc && b->has_bn && n_mod == 0)
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: no adapter modules (empty adapter)", c->st_path);
    free(slots);
    if (!rc && !b->has_bn) { /* prefix tuning alone */
        free(a->bn);
        a->bn = NULL;
    }
    return rc;
}

/* Parses the config and works out every module's expected width (the fuzz target's entry point). */
int ds_bottleneck_config_check(const char *json, size_t len, const ds_model *base, ds_err *err) {
    bn_ctx c = {.cfg_path = "adapter_config.json", .base = base, .hooked = base->cfg.arch == DS_ARCH_QWEN2,
                .err = err};
    if (len > DS_ADAPTER_CONFIG_MAX) return ds_err_set(err, DS_ERANGE, "adapter_config.json: too large");
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) return ds_err_set(err, DS_EFORMAT, "adapter_config.json: not valid JSON");
    bn_cfg b = {0};
    int rc = parse_top(&c, root, &b);
    for (int32_t l = 0; !rc && l < base->cfg.n_layer; l++) {
        int32_t size;
        if (b.has_bn && (b.mh || b.out) && !left_out(&b, l)) rc = expected_size(&c, &b, l, &size);
    }
    cJSON_Delete(root);
    return rc;
}

int ds_bottleneck_load(ds_adapter *a, const char *dir, const ds_model *base, ds_err *err) {
    char cfg_path[4200], st_path[4200];
    snprintf(cfg_path, sizeof cfg_path, "%s/adapter_config.json", dir);
    snprintf(st_path, sizeof st_path, "%s/adapter.safetensors", dir);
    bn_ctx c = {.cfg_path = cfg_path, .st_path = st_path, .base = base, .hooked = base->cfg.arch == DS_ARCH_QWEN2,
                .err = err};
    if (base->cfg.post_norms) /* where the package would hook around Gemma's post-norms is not established */
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: bottleneck adapters on a %s base are not supported", dir,
                          base->cfg.arch_name);
    if (!exists(dir, "adapter.safetensors"))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: only pytorch_adapter.bin (a pickle) is present, and deltaserve "
                          "never unpickles: re-save it as safetensors with the adapters package, "
                          "model.load_adapter(dir); model.save_adapter(dir, name, use_safetensors=True)", dir);
    char *json = NULL;
    size_t len = 0;
    int rc = ds_file_read_all(cfg_path, DS_ADAPTER_CONFIG_MAX, &json, &len, err);
    if (rc) return rc;
    cJSON *root = cJSON_ParseWithLength(json, len);
    free(json);
    if (!root) return ds_err_set(err, DS_EFORMAT, "%s: not valid JSON", cfg_path);
    bn_cfg b = {0};
    rc = parse_top(&c, root, &b);
    ds_st_file st = {0};
    if (!rc) rc = ds_st_open(&st, st_path, err);
    if (!rc) {
        a->kind = b.has_bn ? DS_ADAPTER_BOTTLENECK : DS_ADAPTER_PREFIX;
        snprintf(a->peft_type, sizeof a->peft_type, "%s", !b.has_prefix ? "BOTTLENECK" : !b.has_bn ? "AH_PREFIX_TUNING"
                 : b.parallel ? "MAM" : "PREFIX+BOTTLENECK");
        rc = load_tensors(&c, &b, &st, a);
    }
    if (!rc && b.has_prefix) rc = ds_ah_prefix_load(a, &b.prefix, &st, st_path, base, err);
    ds_st_close(&st);
    cJSON_Delete(root);
    return rc;
}
