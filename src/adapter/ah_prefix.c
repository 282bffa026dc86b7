/* AdapterHub prefix tuning (`adapters` package, PrefixTuningConfig; alone or in a config union such as
 * MAMConfig), mapped onto the pinned prefix-KV blocks PEFT prefix tuning uses (src/adapter/prefix.c).
 *
 * Tensors, under model.prefix_tuning.prefix_tunings.<name>.self_prefix. (the pool) and again under
 * model.layers.<i>.self_attn.prefix_tuning.pool.prefix_tunings.<name>.self_prefix. (every layer
 * references the same pool; the package can only write them as pytorch_adapter.bin, so a
 * safetensors copy carries every name, and every copy must be identical):
 *   flat false: wte.weight [P][d], control_trans.0.{weight [b][d], bias [b]},
 *               control_trans.2.{weight [L·2·H·hd][b], bias [L·2·H·hd]}
 *               kv[p] = W2 · act(W1 · wte[p] + b1) + b2
 *   flat true:  control_trans [P·L·2·H·hd] = kv
 * kv[p] viewed as [L·2][H][hd]: K of layer l at 2l, V at 2l+1 — PEFT's layout, ds_adapter.prefix.
 * H = num_key_value_heads, hd = hidden_size / num_attention_heads.
 *
 * Position semantics (models/llama/modeling_llama.py of the package): the prefix K/V are
 * concatenated to the keys and values AFTER RoPE and after the cache update, with an all-ones mask,
 * so the prefix carries no rotation, every token attends to all of it, and the sequence's own
 * positions start at 0. PEFT passes its prefix as past_key_values instead, so there the positions
 * start at P; ds_adapter.prefix_pos0 tells the two apart. The package supports prefix tuning on
 * Llama only (its Qwen2 plugin interface lists no prefix_tuning). */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter/loader.h"

static const cJSON *field(const cJSON *o, const char *name) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNull(j) ? NULL : j;
}

static const char *const IGNORED[] = {"architecture", "dropout", "init_weights_seed", "encoder_prefix",
                                      "cross_prefix", "shared_gating"};

int ds_ah_prefix_config(const struct cJSON *cfg, const ds_model *base, const char *src, ds_ah_prefix_cfg *out,
                        ds_err *err) {
    const ds_model_config *mc = &base->cfg;
    memset(out, 0, sizeof *out);
    if (mc->arch != DS_ARCH_LLAMA)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: AdapterHub prefix tuning on %s is not supported (the adapters "
                          "package supports it on Llama only)", src, mc->arch_name);
    if (mc->n_head <= 0 || mc->d_model % mc->n_head || mc->d_model / mc->n_head != mc->head_dim)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: AdapterHub prefix tuning needs head_dim = hidden_size / "
                          "num_attention_heads (the package assumes it); the base has %d != %d / %d", src,
                          mc->head_dim, mc->d_model, mc->n_head);
    const cJSON *it;
    cJSON_ArrayForEach(it, cfg) {
        static const char *const checked[] = {"prefix_length", "bottleneck_size", "flat", "non_linearity",
                                              "use_gating", "leave_out"};
        bool known = false;
        for (size_t i = 0; it->string && i < sizeof IGNORED / sizeof *IGNORED; i++)
            known |= !strcmp(it->string, IGNORED[i]);
        for (size_t i = 0; it->string && i < sizeof checked / sizeof *checked; i++)
            known |= !strcmp(it->string, checked[i]);
        if (!known)
            return ds_err_set(err, DS_EUNSUPPORTED, "%s: unknown prefix_tuning config key \"%s\"", src,
                              it->string ? it->string : "?");
    }
    if (cJSON_IsTrue(field(cfg, "use_gating")))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: prefix_tuning use_gating true (UniPELT gating) is not supported", src);
    const cJSON *lo = field(cfg, "leave_out");
    if (lo && (!cJSON_IsArray(lo) || cJSON_GetArraySize(lo) > 0))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: prefix_tuning leave_out (a prefix on some layers only) is not "
                          "supported", src);
    const cJSON *pl = field(cfg, "prefix_length"), *bs = field(cfg, "bottleneck_size"), *fl = field(cfg, "flat");
    if (!cJSON_IsNumber(pl) || pl->valuedouble < 1 || pl->valuedouble > DS_ADAPTER_MAX_VIRTUAL ||
        pl->valuedouble != floor(pl->valuedouble))
        return ds_err_set(err, DS_EFORMAT, "%s: prefix_length must be an integer in [1, %d]", src, DS_ADAPTER_MAX_VIRTUAL);
    if (fl && !cJSON_IsBool(fl)) return ds_err_set(err, DS_EFORMAT, "%s: \"flat\" must be true or false", src);
    out->length = (int32_t)pl->valuedouble;
    out->flat = cJSON_IsTrue(fl);
    if (!out->flat) {
        if (!cJSON_IsNumber(bs) || bs->valuedouble < 1 || bs->valuedouble > 1 << 16 ||
            bs->valuedouble != floor(bs->valuedouble))
            return ds_err_set(err, DS_EFORMAT, "%s: bottleneck_size must be an integer in [1, 65536]", src);
        out->bottleneck = (int32_t)bs->valuedouble;
        const cJSON *nl = field(cfg, "non_linearity");
        if (!nl) return ds_err_set(err, DS_EFORMAT, "%s: prefix_tuning needs \"non_linearity\"", src);
        int rc = ds_ah_parse_act(nl, false, src, &out->act, err);
        if (rc) return rc;
    }
    return 0;
}

/* "<rest>" of a pool tensor "...prefix_tunings.<name>.self_prefix.<rest>" (either copy), or NULL; the
 * adapter name's span goes to *name / *name_len. */
static const char *pool_rest(const char *t, const char **name, size_t *name_len) {
    static const char pool[] = "model.prefix_tuning.prefix_tunings.", lay[] = "model.layers.",
                      lay_pool[] = ".self_attn.prefix_tuning.pool.prefix_tunings.";
    const char *s;
    if (!strncmp(t, pool, sizeof pool - 1)) {
        s = t + sizeof pool - 1;
    } else if (!strncmp(t, lay, sizeof lay - 1) && t[sizeof lay - 1] >= '0' && t[sizeof lay - 1] <= '9') {
        s = t + sizeof lay - 1;
        while (*s >= '0' && *s <= '9') s++;
        if (strncmp(s, lay_pool, sizeof lay_pool - 1)) return NULL;
        s += sizeof lay_pool - 1;
    } else {
        return NULL;
    }
    const char *e = strstr(s, ".self_prefix.");
    if (!e || e == s) return NULL;
    *name = s, *name_len = (size_t)(e - s);
    return e + 13;
}

/* Same, for adapter `name` only. */
static const char *pool_rest_of(const char *t, const char *name, size_t name_len) {
    const char *n;
    size_t len;
    const char *rest = pool_rest(t, &n, &len);
    return rest && len == name_len && !strncmp(n, name, len) ? rest : NULL;
}

bool ds_ah_prefix_tensor(const char *tensor_name) {
    return strstr(tensor_name, "prefix_tuning.") != NULL &&
           (!strncmp(tensor_name, "model.prefix_tuning.", 20) || !strncmp(tensor_name, "model.layers.", 13));
}

enum { P_WTE, P_W1, P_B1, P_W2, P_B2, P_FLAT, P_COUNT };
static const char *const P_NAMES[P_COUNT] = {"wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                                             "control_trans.2.weight", "control_trans.2.bias", "control_trans"};

/* The values of one tensor, checked equal over every copy of it. */
static int read_role(const ds_st_file *st, const char *st_path, const char *name, size_t name_len, int role,
                     const int64_t *shape, int nd, float **out, ds_err *err) {
    size_t n = 1;
    for (int i = 0; i < nd; i++) n *= (size_t)shape[i];
    float *tmp = NULL;
    int rc = 0;
    *out = NULL;
    for (size_t i = 0; !rc && i < st->n_tensors; i++) {
        const ds_st_tensor *t = &st->tensors[i];
        const char *rest = pool_rest_of(t->name, name, name_len);
        if (!rest || strcmp(rest, P_NAMES[role])) continue;
        rc = ds_st_check_shape(t, st_path, shape, nd, err);
        float **dst = *out ? &tmp : out;
        if (!rc && !*dst && !(*dst = malloc(sizeof(float) * n))) rc = ds_err_set(err, DS_ENOMEM, "out of memory");
        if (!rc) rc = ds_st_read_f32(t, st_path, shape, nd, *dst, n, err);
        for (size_t k = 0; !rc && k < n; k++)
            if (!isfinite((*dst)[k]))
                rc = ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' holds a non-finite value at index %zu", st_path,
                                t->name, k);
        if (!rc && dst == &tmp && memcmp(tmp, *out, sizeof(float) * n))
            rc = ds_err_set(err, DS_EFORMAT, "%s: tensor '%s' differs from another copy of the shared prefix pool",
                            st_path, t->name);
    }
    free(tmp);
    if (!rc && !*out)
        rc = ds_err_set(err, DS_EFORMAT, "%s: prefix tuning tensor %s of adapter '%.*s' is missing", st_path,
                        P_NAMES[role], (int)name_len, name);
    return rc;
}

/* kv[p] = W2 · act(W1 · wte[p] + b1) + b2, in double (the package computes in fp32). */
static int control_trans(const ds_ah_prefix_cfg *cfg, int32_t d, int64_t width, float *const *w, float *kv) {
    const int32_t b = cfg->bottleneck;
    double *h = malloc(sizeof(double) * (size_t)b);
    if (!h) return DS_ENOMEM;
    for (int32_t p = 0; p < cfg->length; p++) {
        const float *e = w[P_WTE] + (size_t)p * d;
        for (int32_t j = 0; j < b; j++) {
            double s = w[P_B1][j];
            for (int32_t i = 0; i < d; i++) s += (double)w[P_W1][(size_t)j * d + i] * e[i];
            h[j] = ds_act_eval(cfg->act, (float)s);
        }
        for (int64_t o = 0; o < width; o++) {
            double s = w[P_B2][o];
            const float *row = w[P_W2] + (size_t)o * b;
            for (int32_t j = 0; j < b; j++) s += (double)row[j] * h[j];
            kv[(size_t)p * width + o] = (float)s;
        }
    }
    free(h);
    return 0;
}

int ds_ah_prefix_load(ds_adapter *a, const ds_ah_prefix_cfg *cfg, const ds_st_file *st, const char *st_path,
                      const ds_model *base, ds_err *err) {
    const ds_model_config *mc = &base->cfg;
    const int32_t row = mc->n_kv_head * mc->head_dim, d = mc->d_model, P = cfg->length;
    const int64_t width = (int64_t)mc->n_layer * 2 * row;
    /* the adapter's name: the first pool tensor's */
    const char *name = NULL;
    size_t name_len = 0;
    for (size_t i = 0; i < st->n_tensors && !name; i++) pool_rest(st->tensors[i].name, &name, &name_len);
    if (!name) return ds_err_set(err, DS_EFORMAT, "%s: no prefix tuning tensors (prefix_tunings.<name>.self_prefix.*)",
                                 st_path);
    for (size_t i = 0; i < st->n_tensors; i++) {
        const char *t = st->tensors[i].name;
        const char *rest = pool_rest_of(t, name, name_len);
        if (ds_ah_prefix_tensor(t) && !rest)
            return ds_err_set(err, DS_EUNSUPPORTED, "%s: tensor '%s' is not a prefix tuning tensor of adapter '%.*s' "
                              "(one adapter per directory)", st_path, t, (int)name_len, name);
        bool known = false;
        for (int r = 0; rest && r < P_COUNT; r++) known |= !strcmp(rest, P_NAMES[r]) && (r == P_FLAT) == cfg->flat;
        if (rest && !known)
            return ds_err_set(err, DS_EUNSUPPORTED, "%s: tensor '%s' does not fit a %s prefix tuning config", st_path, t,
                              cfg->flat ? "flat" : "non-flat");
    }
    float *w[P_COUNT] = {0};
    int rc = 0;
    if (cfg->flat) {
        const int64_t shape[1] = {(int64_t)P * width};
        rc = read_role(st, st_path, name, name_len, P_FLAT, shape, 1, &a->prefix, err);
    } else {
        const int64_t s_wte[2] = {P, d}, s_w1[2] = {cfg->bottleneck, d}, s_b1[1] = {cfg->bottleneck},
                      s_w2[2] = {width, cfg->bottleneck}, s_b2[1] = {width};
        const int64_t *shapes[5] = {s_wte, s_w1, s_b1, s_w2, s_b2};
        for (int r = P_WTE; !rc && r <= P_B2; r++)
            rc = read_role(st, st_path, name, name_len, r, shapes[r], r == P_B1 || r == P_B2 ? 1 : 2, &w[r], err);
        if (!rc && !(a->prefix = malloc(sizeof(float) * (size_t)P * (size_t)width)))
            rc = ds_err_set(err, DS_ENOMEM, "out of memory");
        if (!rc && control_trans(cfg, d, width, w, a->prefix)) rc = ds_err_set(err, DS_ENOMEM, "out of memory");
    }
    for (int r = 0; r < P_COUNT; r++) free(w[r]);
    if (rc) return rc;
    a->n_virtual = P;
    a->prefix_row = row;
    a->prefix_pos0 = true;
    a->host_bytes += sizeof(float) * (size_t)P * (size_t)width;
    return 0;
}
