/* Publishing bottleneck adapters in the AdapterHub format: what adapters 1.3.0 writes for
 * model.save_adapter(dir, name, with_head=False, use_safetensors=True) — adapter_config.json with
 * the full bottleneck config (every key BnConfig.to_dict() has, in its order) and the model
 * metadata, and adapter.safetensors with F32 tensors under the package's module paths. The
 * loader (src/adapter/bottleneck.c) and the package read it back
 * (tests/golden/gen_train_bottleneck.py --check-saved). */
#include "util/durable.h"
#include "train/train_internal.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

/* The one config every module shares (the format has one per adapter). */
typedef struct ah_cfg {
    const ds_bn_module *first;
    bool mh, out;
    int32_t size;
} ah_cfg;

static int check(const ds_adapter *a, const ds_model *m, ah_cfg *c, ds_err *err) {
    if (a->kind != DS_ADAPTER_BOTTLENECK || !a->bn)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: not a bottleneck adapter", a->name);
    if (a->prefix)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: saving config unions (MAM) is not supported", a->name);
    if (a->n_layer != m->cfg.n_layer || a->d_model != m->cfg.d_model)
        return ds_err_set(err, DS_EINVAL, "%s: adapter was made for another base model", a->name);
    *c = (ah_cfg){0};
    for (int32_t l = 0; l < a->n_layer; l++)
        for (int s = 0; s < DS_BN_SITES; s++) {
            const ds_bn_module *b = a->bn[(size_t)l * DS_BN_SITES + s];
            if (!b) continue;
            if (!c->first) *c = (ah_cfg){.first = b, .size = b->size};
            const ds_bn_module *f = c->first;
            if (b->ln_a_w || b->ln_b_w || b->scale_vec || b->flags != f->flags || b->act != f->act ||
                b->scale != f->scale || b->size != f->size || !tr_bn_act_name(b->act))
                return ds_err_set(err, DS_EUNSUPPORTED, "%s: layer %d: ds_ah_save writes adapters with one seq_bn, "
                                  "double_seq_bn or par_bn config over every module (no LayerNorms, channel "
                                  "scaling or per-layer sizes)", a->name, l);
            *(s == DS_BN_ATTN ? &c->mh : &c->out) = true;
        }
    for (int32_t l = 0; c->first && l < a->n_layer; l++) /* every layer has the same sites (no leave_out) */
        for (int s = 0; s < DS_BN_SITES; s++)
            if (!a->bn[(size_t)l * DS_BN_SITES + s] != !(s == DS_BN_ATTN ? c->mh : c->out))
                return ds_err_set(err, DS_EUNSUPPORTED, "%s: layer %d lacks a module other layers have (leave_out "
                                  "is not written)", a->name, l);
    return c->first ? 0 : ds_err_set(err, DS_EINVAL, "%s: no bottleneck module", a->name);
}

/* An integer reduction factor rf with floor(d / rf) == size, as the package sizes the bottleneck. */
static int32_t reduction_factor(int32_t d, int32_t size) {
    for (int32_t rf = 1; rf <= d; rf++)
        if (d / rf == size) return rf;
    return 0;
}

/* A JSON float that Python reads back as a float ("1.0", not cJSON's "1"): the package checks
 * isinstance(scaling, float) (adapters' Adapter.__init__ refuses an int). */
static void add_float(cJSON *o, const char *key, double v) {
    char buf[40];
    snprintf(buf, sizeof buf, "%.9g", v);
    if (!strpbrk(buf, ".eEn")) strcat(buf, ".0");
    cJSON_AddRawToObject(o, key, buf);
}

static cJSON *config_json(const ds_adapter *a, const ds_model *m, const ah_cfg *c, const char *model_name) {
    const ds_bn_module *f = c->first;
    const bool par = f->flags & DS_BN_PARALLEL, in_plus_x = f->flags & DS_BN_IN_PLUS_X;
    cJSON *root = cJSON_CreateObject(), *k = cJSON_AddObjectToObject(root, "config");
    cJSON_AddBoolToObject(k, "adapter_residual_before_ln", false);
    cJSON_AddBoolToObject(k, "cross_adapter", false);
    add_float(k, "dropout", 0.0);
    cJSON_AddBoolToObject(k, "factorized_phm_W", true);
    cJSON_AddBoolToObject(k, "factorized_phm_rule", false);
    cJSON_AddStringToObject(k, "hypercomplex_nonlinearity", "glorot-uniform");
    cJSON_AddStringToObject(k, "init_weights", par ? "mam_adapter" : "bert"); /* the configs' defaults */
    cJSON_AddNullToObject(k, "init_weights_seed");
    cJSON_AddNullToObject(k, "inv_adapter");
    cJSON_AddNullToObject(k, "inv_adapter_reduction_factor");
    cJSON_AddBoolToObject(k, "is_parallel", par);
    cJSON_AddBoolToObject(k, "learn_phm", true);
    cJSON_AddItemToObject(k, "leave_out", cJSON_CreateArray());
    cJSON_AddBoolToObject(k, "ln_after", false);
    cJSON_AddBoolToObject(k, "ln_before", false);
    cJSON_AddBoolToObject(k, "mh_adapter", c->mh);
    cJSON_AddStringToObject(k, "non_linearity", tr_bn_act_name(f->act));
    cJSON_AddBoolToObject(k, "original_ln_after", true);
    cJSON_AddBoolToObject(k, "original_ln_before", in_plus_x);
    cJSON_AddBoolToObject(k, "output_adapter", c->out);
    cJSON_AddBoolToObject(k, "phm_bias", true);
    cJSON_AddStringToObject(k, "phm_c_init", "normal");
    cJSON_AddNumberToObject(k, "phm_dim", 4);
    cJSON_AddNumberToObject(k, "phm_init_range", 0.0001);
    cJSON_AddBoolToObject(k, "phm_layer", false);
    cJSON_AddNumberToObject(k, "phm_rank", 1);
    cJSON_AddNumberToObject(k, "reduction_factor", reduction_factor(m->cfg.d_model, c->size));
    cJSON_AddBoolToObject(k, "residual_before_ln", true);
    add_float(k, "scaling", (double)f->scale);
    cJSON_AddBoolToObject(k, "shared_W_phm", false);
    cJSON_AddBoolToObject(k, "shared_phm_rule", true);
    add_float(k, "stochastic_depth", 0.0);
    cJSON_AddBoolToObject(k, "use_gating", false);
    cJSON_AddNumberToObject(root, "hidden_size", m->cfg.d_model);
    /* transformers' class for the model_type: "qwen2" → "Qwen2ForCausalLM" (informational) */
    char cls[64];
    snprintf(cls, sizeof cls, "%sForCausalLM", m->cfg.arch_name);
    cls[0] = (char)toupper((unsigned char)cls[0]);
    cJSON_AddStringToObject(root, "model_class", cls);
    cJSON_AddStringToObject(root, "model_name", model_name ? model_name : "");
    cJSON_AddStringToObject(root, "model_type", m->cfg.arch_name);
    cJSON_AddStringToObject(root, "name", a->name);
    cJSON_AddStringToObject(root, "version", "adapters.1.3.0");
    return root;
}

typedef struct st_item {
    char name[256];
    int64_t shape[2]; /* shape[1] 0: a vector */
    const float *data;
} st_item;

static size_t item_bytes(const st_item *t) {
    return (size_t)t->shape[0] * (size_t)(t->shape[1] ? t->shape[1] : 1) * sizeof(float);
}

/* Every tensor, layers ascending, attention before output, as the package's state dict orders them. */
static st_item *collect(const ds_adapter *a, size_t *n) {
    st_item *v = calloc((size_t)a->n_layer * DS_BN_SITES * 4, sizeof *v);
    if (!v) return NULL;
    *n = 0;
    for (int32_t l = 0; l < a->n_layer; l++)
        for (int s = 0; s < DS_BN_SITES; s++) {
            const ds_bn_module *b = a->bn[(size_t)l * DS_BN_SITES + s];
            if (!b) continue;
            const char *site = s == DS_BN_ATTN ? "attention" : "output";
            const struct {
                const char *sfx;
                int64_t s0, s1;
                const float *p;
            } t[4] = {{"adapter_down.0.weight", b->size, b->d, b->down}, {"adapter_down.0.bias", b->size, 0, b->down_b},
                      {"adapter_up.weight", b->d, b->size, b->up}, {"adapter_up.bias", b->d, 0, b->up_b}};
            for (int k = 0; k < 4; k++) {
                st_item *it = &v[(*n)++];
                snprintf(it->name, sizeof it->name, "model.layers.%d.%s_adapters.adapters.%s.%s", l, site, a->name,
                         t[k].sfx);
                it->shape[0] = t[k].s0, it->shape[1] = t[k].s1, it->data = t[k].p;
            }
        }
    return v;
}

static char *st_header(const st_item *v, size_t n, size_t *len) {
    cJSON *h = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        cJSON *t = cJSON_AddObjectToObject(h, v[i].name);
        cJSON_AddStringToObject(t, "dtype", "F32");
        const double shape[2] = {(double)v[i].shape[0], (double)v[i].shape[1]};
        const double offs[2] = {(double)off, (double)(off + item_bytes(&v[i]))};
        cJSON_AddItemToObject(t, "shape", cJSON_CreateDoubleArray(shape, v[i].shape[1] ? 2 : 1));
        cJSON_AddItemToObject(t, "data_offsets", cJSON_CreateDoubleArray(offs, 2));
        off += item_bytes(&v[i]);
    }
    char *s = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!s) return NULL;
    size_t l = strlen(s), padded = (l + 7) / 8 * 8; /* data 8-byte aligned, header padded with spaces */
    char *out = realloc(s, padded + 1);
    if (!out) return free(s), NULL;
    memset(out + l, ' ', padded - l);
    out[padded] = 0;
    *len = padded;
    return out;
}

static int write_tensors(const ds_adapter *a, const char *dir, ds_err *err) {
    size_t n = 0, hlen = 0;
    st_item *v = collect(a, &n);
    char *hdr = v ? st_header(v, n, &hlen) : NULL;
    ds_iovec *parts = calloc(n + 2, sizeof *parts);
    int rc = 0;
    if (!hdr || !parts) rc = ds_err_set(err, DS_ENOMEM, "out of memory");
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    if (!rc) {
        parts[0] = (ds_iovec){len8, 8};
        parts[1] = (ds_iovec){hdr, hlen};
        for (size_t i = 0; i < n; i++) parts[i + 2] = (ds_iovec){v[i].data, item_bytes(&v[i])};
        rc = ds_durable_write(dir, "adapter.safetensors", parts, (int)n + 2, err);
    }
    free(parts);
    free(hdr);
    free(v);
    return rc;
}

/* adapter_interface.json, which the package writes beside the config for a model it adapts through
 * a plugin interface (adapters/wrappers/interfaces.py) rather than its own model classes: of the
 * bases deltaserve trains, Qwen2 (Llama and Mistral have their own classes, no file). Keys sorted. */
static cJSON *interface_json(const ds_model *m) {
    if (strcmp(m->cfg.arch_name, "qwen2")) return NULL;
    static const char *const kv[][2] = {
        {"attn_k_proj", "k_proj"}, {"attn_o_proj", "o_proj"}, {"attn_q_proj", "q_proj"}, {"attn_qkv_proj", NULL},
        {"attn_v_proj", "v_proj"}, {"base_model", NULL}, {"layer_cross_attn", NULL},
        {"layer_intermediate_proj", "mlp.up_proj"}, {"layer_ln_1", NULL}, {"layer_ln_2", NULL},
        {"layer_output_proj", "mlp.down_proj"}, {"layer_pre_cross_attn", NULL},
        {"layer_pre_ffn", "post_attention_layernorm"}, {"layer_pre_self_attn", "input_layernorm"},
        {"layer_self_attn", "self_attn"}, {"model_embeddings", "embed_tokens"}, {"model_layers", "layers"}};
    static const char *const methods[] = {"bottleneck", "lora", "reft", "invertible"};
    cJSON *root = cJSON_CreateObject(), *itf = cJSON_AddObjectToObject(root, "interface");
    cJSON_AddItemToObject(itf, "adapter_methods", cJSON_CreateStringArray(methods, 4));
    for (size_t i = 0; i < sizeof kv / sizeof *kv; i++)
        if (kv[i][1]) cJSON_AddStringToObject(itf, kv[i][0], kv[i][1]);
        else cJSON_AddNullToObject(itf, kv[i][0]);
    cJSON_AddStringToObject(root, "model_type", m->cfg.arch_name);
    cJSON_AddStringToObject(root, "version", "adapters.1.3.0");
    return root;
}

static int write_json(const char *dir, const char *name, cJSON *j, ds_err *err) {
    char *s = j ? cJSON_Print(j) : NULL;
    cJSON_Delete(j);
    if (!s) return ds_err_set(err, DS_ENOMEM, "out of memory");
    const ds_iovec part[2] = {{s, strlen(s)}, {"\n", 1}};
    int rc = ds_durable_write(dir, name, part, 2, err);
    free(s);
    return rc;
}

int ds_ah_save(const ds_adapter *a, const ds_model *m, const char *dir, const char *model_name, ds_err *err) {
    ah_cfg c;
    int rc = check(a, m, &c, err);
    if (rc) return rc;
    if (!reduction_factor(m->cfg.d_model, c.size))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: no integer reduction_factor gives width %d", a->name, c.size);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return ds_err_set(err, DS_EIO, "cannot create the adapter directory: %s", strerror(errno));
    rc = write_tensors(a, dir, err);
    cJSON *itf = interface_json(m);
    if (!rc && itf) rc = write_json(dir, "adapter_interface.json", itf, err);
    else cJSON_Delete(itf);
    if (!rc) rc = write_json(dir, "adapter_config.json", config_json(a, m, &c, model_name), err);
    return rc;
}
