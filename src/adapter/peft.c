/* PEFT directory loader: adapter_config.json + adapter_model.safetensors.
 *
 * The tensors present in the file are the ground truth for where adapters go (target_modules,
 * layers_to_transform, ... only chose them at training time): every key is parsed,
 * mapped to a (layer, projection, role) slot, and anything that is not an adapter tensor deltaserve
 * applies exactly is refused by name — in particular every tensor that would REPLACE base weights. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapter/loader.h"

/* ---- base model geometry ---- */

void ds_adapter_base_dims(const ds_model *m, int proj, int32_t *in, int32_t *out) {
    const ds_model_config *c = &m->cfg;
    const int32_t d = c->d_model, q = c->n_head * c->head_dim, kv = c->n_kv_head * c->head_dim, ff = c->d_ff;
    switch (proj) {
    case DS_PROJ_Q: *out = q, *in = d; break;
    case DS_PROJ_K:
    case DS_PROJ_V: *out = kv, *in = d; break;
    case DS_PROJ_O: *out = d, *in = q; break;
    case DS_PROJ_GATE:
    case DS_PROJ_UP: *out = ff, *in = d; break;
    case DS_PROJ_DOWN: *out = d, *in = ff; break;
    default: *out = c->n_vocab, *in = d; break; /* lm_head */
    }
}

int ds_adapter_module_parts(const ds_model *m, int proj, int parts[3], int32_t rows[3], int32_t *out) {
    const ds_model_config *c = &m->cfg;
    int n = 1;
    parts[0] = proj;
    if (proj == DS_PROJ_Q && c->fused_qkv) {
        n = 3, parts[1] = DS_PROJ_K, parts[2] = DS_PROJ_V;
    } else if (proj == DS_PROJ_GATE && c->fused_gate_up) {
        n = 2, parts[1] = DS_PROJ_UP;
    }
    int32_t in;
    *out = 0;
    for (int k = 0; k < n; k++) {
        ds_adapter_base_dims(m, parts[k], &in, &rows[k]);
        *out += rows[k];
    }
    return n;
}

void ds_adapter_base_row(const ds_model *m, int32_t layer, int proj, int32_t row, float *dst) {
    int parts[3];
    int32_t rows[3], out;
    const int n = ds_adapter_module_parts(m, proj, parts, rows, &out);
    int k = 0;
    for (; k < n - 1 && row >= rows[k]; k++) row -= rows[k];
    ds_weight_row(ds_adapter_base_weight(m, layer, parts[k]), row, dst);
}

const ds_weight *ds_adapter_base_weight(const ds_model *m, int32_t layer, int proj) {
    if (proj == DS_PROJ_COUNT) return &m->output;
    const ds_layer_weights *l = &m->layers[layer];
    const ds_weight *w[DS_PROJ_COUNT] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
    return w[proj];
}

/* ---- tensor keys ---- */

typedef struct peft_key {
    int layer;       /* -1 for lm_head */
    int proj;        /* ds_proj, DS_PROJ_COUNT for lm_head, -1: not a module deltaserve adapts */
    bool fused;      /* qkv_proj (proj Q) or gate_up_proj (proj GATE): Phi-3's fused modules */
    const char *mod;  /* the key without the "base_model.model." prefix */
    const char *rest; /* what follows the module path (after the '.'), or == mod */
} peft_key;

/* Parses a decimal layer index: no sign, no leading zeros, at most 9 digits. */
static const char *parse_index(const char *s, int *out) {
    if (s[0] < '0' || s[0] > '9' || (s[0] == '0' && s[1] >= '0' && s[1] <= '9')) return NULL;
    long v = 0;
    int n = 0;
    for (; *s >= '0' && *s <= '9'; s++, n++) {
        if (n == 9) return NULL;
        v = v * 10 + (*s - '0');
    }
    *out = (int)v;
    return s;
}

static const char *skip(const char *s, const char *lit) {
    size_t n = strlen(lit);
    return strncmp(s, lit, n) ? NULL : s + n;
}

/* Splits "[base_model.model.]<module>.<rest>" for the modules deltaserve can adapt. */
static void parse_key(const char *name, peft_key *k) {
    static const char *const attn[] = {"q_proj.", "k_proj.", "v_proj.", "o_proj."};
    static const char *const mlp[] = {"gate_proj.", "up_proj.", "down_proj."};
    const char *s = skip(name, "base_model.model.");
    if (!s) s = name;
    *k = (peft_key){.layer = -1, .proj = -1, .mod = s, .rest = s};
    const char *t;
    if ((t = skip(s, "lm_head."))) {
        k->proj = DS_PROJ_COUNT;
        k->rest = t;
        return;
    }
    int layer;
    if (!(t = skip(s, "model.layers.")) || !(t = parse_index(t, &layer)) || *t++ != '.') return;
    const char *u;
    for (int p = 0; p < 4; p++)
        if ((u = skip(t, "self_attn.")) && (u = skip(u, attn[p]))) *k = (peft_key){layer, DS_PROJ_Q + p, false, s, u};
    for (int p = 0; p < 3; p++)
        if ((u = skip(t, "mlp.")) && (u = skip(u, mlp[p]))) *k = (peft_key){layer, DS_PROJ_GATE + p, false, s, u};
    if ((u = skip(t, "self_attn.")) && (u = skip(u, "qkv_proj."))) *k = (peft_key){layer, DS_PROJ_Q, true, s, u};
    if ((u = skip(t, "mlp.")) && (u = skip(u, "gate_up_proj."))) *k = (peft_key){layer, DS_PROJ_GATE, true, s, u};
}

/* A module name must match the base's layout: Phi-3 has qkv_proj / gate_up_proj where Llama has
 * q/k/v_proj and gate/up_proj. */
static int check_fused(const peft_ctx *c, const peft_key *k, const char *name) {
    const ds_model_config *m = &c->base->cfg;
    if (k->proj < 0 || k->proj >= DS_PROJ_COUNT) return 0;
    const bool attn = k->proj <= DS_PROJ_V, mlp = k->proj == DS_PROJ_GATE || k->proj == DS_PROJ_UP;
    const bool base_fused = attn ? m->fused_qkv : mlp ? m->fused_gate_up : false;
    if (k->fused && !base_fused)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' targets a fused %s, but the base model (%s) has separate "
                          "%s projections", c->st_path, name, attn ? "qkv_proj" : "gate_up_proj", m->arch_name,
                          attn ? "q/k/v" : "gate/up");
    if (!k->fused && base_fused)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' targets %s, but the base model (%s) fuses it into %s",
                          c->st_path, name, ds_proj_name((ds_proj)k->proj), m->arch_name,
                          attn ? "qkv_proj" : "gate_up_proj");
    return 0;
}

/* Removes PEFT's adapter-name infix: "lora_A.default.weight" → "lora_A.weight", "ia3_l.default" → "ia3_l". */
static void strip_default(const char *rest, char *buf, size_t cap) {
    snprintf(buf, cap, "%s", rest);
    char *d = strstr(buf, ".default");
    if (d && (d[8] == '.' || d[8] == 0)) memmove(d, d + 8, strlen(d + 8) + 1);
}

/* Role of a (stripped) suffix for the config's type, or -1. */
static int role_of(const peft_config *cfg, const char *suf) {
    static const struct {
        const char *suf;
        int role;
        int type; /* 0 LoRA, 1 AdaLoRA, 2 IA3 */
    } table[] = {
        {"lora_A.weight", ROLE_A, 0},         {"lora_B.weight", ROLE_B, 0},
        {"lora_B.bias", ROLE_BIAS, 0},        {"lora_magnitude_vector", ROLE_MAG, 0},
        {"lora_magnitude_vector.weight", ROLE_MAG, 0},
        {"lora_A", ROLE_A, 1},                {"lora_B", ROLE_B, 1},
        {"lora_E", ROLE_E, 1},                {"ia3_l", ROLE_IA3, 2},
    };
    int type = cfg->kind == DS_ADAPTER_IA3 ? 2 : cfg->adalora ? 1 : 0;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (table[i].type == type && !strcmp(table[i].suf, suf)) return table[i].role;
    return -1;
}

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* A tensor that is not an adapter tensor we apply: say which config field put it there. */
static int refuse_key(const peft_ctx *c, const char *name) {
    const char *f = c->st_path;
    if (strstr(name, "lora_embedding_A") || strstr(name, "lora_embedding_B"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s': embedding LoRA is supported for LORA on "
                          "model.embed_tokens only", f, name);
    if (strstr(name, "trainable_tokens") || strstr(name, "token_adapter"))
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor '%s' comes from trainable_token_indices, which replaces base embedding rows "
                          "(not supported)",
                          f, name);
    if (strstr(name, "lora_") || strstr(name, "ia3_"))
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor '%s' is not a %s tensor on a supported module (q/k/v/o/gate/up/down_proj of "
                          "model.layers.N, lm_head)",
                          f, name, c->cfg->peft_type);
    if (ends_with(name, ".bias"))
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor '%s' is a trained base bias (bias = \"%s\"): replacing base weights is not "
                          "supported",
                          f, name, c->cfg->bias[0] ? c->cfg->bias : "?");
    if (ends_with(name, ".weight") || strstr(name, "modules_to_save"))
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor '%s' is a full module weight (modules_to_save): replacing base weights is not "
                          "supported",
                          f, name);
    return ds_err_set(c->err, DS_EFORMAT, "%s: unknown tensor '%s'", f, name);
}

static float st_elem(const ds_st_tensor *t, size_t i) {
    const uint8_t *p = t->data;
    if (t->dtype == DS_ST_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
    return t->dtype == DS_ST_F16 ? ds_f16_to_f32(h) : ds_bf16_to_f32(h);
}

/* PEFT's save_embedding_layers="auto" stores a COPY of the base embed_tokens / lm_head weights next
 * to any adapter that targets one of them. A copy of this base's weights changes nothing and is
 * skipped; anything else would replace base weights and is refused. The tolerance admits a base
 * that was quantised after the adapter was trained (4-bit blocks give a relative L2 error near 8%),
 * and no unrelated matrix (two independent ones differ by ~140%). Returns 1 when `t` is not such a tensor, 0 when it is an accepted copy. */
static int embedding_copy(peft_ctx *c, const ds_st_tensor *t, const char *key) {
    const ds_model *m = c->base;
    const ds_weight *w;
    if (!strcmp(key, "model.embed_tokens.weight") || !strcmp(key, "model.embed_tokens.base_layer.weight"))
        w = &m->tok_embd;
    else if (!strcmp(key, "lm_head.weight") || !strcmp(key, "lm_head.base_layer.weight"))
        w = &m->output;
    else
        return 1;
    if (t->dtype == DS_ST_UNSUPPORTED || t->n_dims != 2 || t->shape[0] != m->cfg.n_vocab ||
        t->shape[1] != m->cfg.d_model)
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor '%s' (%s) is a saved embedding layer that does not match the base's [%d, %d] "
                          "(resized vocabulary?): replacing base weights is not supported",
                          c->st_path, t->name, t->dtype_name, m->cfg.n_vocab, m->cfg.d_model);
    double diff = 0, norm = 0;
    const size_t d = (size_t)m->cfg.d_model;
    float *row = malloc(d * sizeof *row); /* the base row, dequantised (typed weights) */
    if (!row) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
    for (size_t i = 0; i < (size_t)t->n_elems; i++) {
        if (i % d == 0) ds_weight_row(w, (int32_t)(i / d), row);
        double a = st_elem(t, i), b = row[i % d];
        diff += (a - b) * (a - b);
        norm += b * b;
    }
    free(row);
    if (!(diff <= 0.0625 * norm)) /* relative L2 error > 25% (also catches NaN) */
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor '%s' differs from the base model's weight (relative L2 error %.3g): replacing "
                          "base weights is not supported",
                          c->st_path, t->name, norm > 0 ? sqrt(diff / norm) : diff);
    if (diff > 0)
        DS_LOGW("%s: tensor '%s' is a near copy of the base weight (relative L2 error %.3g; quantised base?); "
                "using the base", c->st_path, t->name, sqrt(diff / norm));
    return 0;
}

/* lora_embedding_A / _B of model.embed_tokens (plain LoRA only). Returns 1 when t is not one. */
static int place_embedding_lora(peft_ctx *c, const ds_st_tensor *t, const char *mod) {
    const char *rest = skip(mod, "model.embed_tokens.");
    if (!rest || c->cfg->kind != DS_ADAPTER_LORA || c->cfg->adalora) return 1;
    if (c->base->cfg.embed_scale > 0) /* Gemma 3's scaled embedding: whether the delta is scaled is PEFT's call */
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s': embedding LoRA on a %s base (scaled embeddings) "
                          "is not supported", c->st_path, t->name, c->base->cfg.arch_name);
    char suf[64];
    strip_default(rest, suf, sizeof suf);
    const ds_st_tensor **dst = !strcmp(suf, "lora_embedding_A") ? &c->emb_A
                               : !strcmp(suf, "lora_embedding_B") ? &c->emb_B : NULL;
    if (!dst) return 1;
    if (*dst) return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' appears twice", c->st_path, t->name);
    *dst = t;
    return 0;
}

static int place(peft_ctx *c, const ds_st_tensor *t) {
    peft_key k;
    parse_key(t->name, &k);
    int rc = embedding_copy(c, t, k.mod);
    if (rc <= 0) return rc;
    if ((rc = place_embedding_lora(c, t, k.mod)) <= 0) return rc;
    if (k.proj < 0) return refuse_key(c, t->name);
    if ((rc = check_fused(c, &k, t->name))) return rc;
    if (k.proj < DS_PROJ_COUNT && k.layer >= c->base->cfg.n_layer)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': layer %d, but the base model has %d layers", c->st_path,
                          t->name, k.layer, c->base->cfg.n_layer);
    char suf[64];
    strip_default(k.rest, suf, sizeof suf);
    int role = strlen(k.rest) < sizeof suf ? role_of(c->cfg, suf) : -1;
    if (role < 0) return refuse_key(c, t->name);
    size_t slot = k.proj == DS_PROJ_COUNT ? PEFT_LM_HEAD_SLOT(c) : (size_t)k.layer * DS_PROJ_COUNT + (size_t)k.proj;
    if (c->slots[slot][role])
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensors '%s' and '%s' are the same parameter", c->st_path,
                          c->slots[slot][role]->name, t->name);
    c->slots[slot][role] = t;
    return 0;
}

int peft_collect_slots(peft_ctx *c) {
    c->n_slots = (size_t)c->base->cfg.n_layer * DS_PROJ_COUNT + 1;
    if (!(c->slots = calloc(c->n_slots, sizeof *c->slots)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
    for (size_t i = 0; i < c->st.n_tensors; i++) {
        int rc = place(c, &c->st.tensors[i]);
        if (rc) return rc;
    }
    return 0;
}

void peft_slot_path(const peft_ctx *c, size_t slot, char *buf, size_t cap) {
    if (slot == PEFT_LM_HEAD_SLOT(c)) {
        snprintf(buf, cap, "lm_head");
        return;
    }
    int p = (int)(slot % DS_PROJ_COUNT);
    const ds_model_config *m = &c->base->cfg;
    const char *name = p == DS_PROJ_Q && m->fused_qkv          ? "qkv_proj"
                       : p == DS_PROJ_GATE && m->fused_gate_up ? "gate_up_proj"
                                                               : ds_proj_name((ds_proj)p);
    snprintf(buf, cap, "model.layers.%zu.%s.%s", slot / DS_PROJ_COUNT, p <= DS_PROJ_O ? "self_attn" : "mlp", name);
}

int peft_read(peft_ctx *c, const ds_st_tensor *t, const int64_t *shape, int ndims, float **out) {
    size_t n = 1;
    for (int i = 0; i < ndims; i++)
        if (shape[i] < 0 || !ds_mul_ok(n, (size_t)shape[i], &n))
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': size overflow", c->st_path, t->name);
    if (!(*out = malloc(n ? n * sizeof(float) : 1)))
        return ds_err_set(c->err, DS_ENOMEM, "%s: tensor '%s': out of memory", c->st_path, t->name);
    int rc = ds_st_read_f32(t, c->st_path, shape, ndims, *out, n, c->err);
    for (size_t i = 0; !rc && i < n; i++)
        if (!isfinite((*out)[i]))
            rc = ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' holds a non-finite value at index %zu", c->st_path,
                            t->name, i);
    if (rc) {
        free(*out);
        *out = NULL;
    }
    return rc;
}

/* ---- directory ---- */

static int read_config(const char *dir, peft_config *cfg, char *cfg_path, size_t cap, ds_err *err) {
    snprintf(cfg_path, cap, "%s/adapter_config.json", dir);
    struct stat st;
    if (stat(cfg_path, &st) != 0)
        return ds_err_set(err, errno == ENOENT ? DS_ENOTFOUND : DS_EIO, "%s: no adapter_config.json (%s)", dir,
                          strerror(errno));
    char *json;
    size_t len;
    int rc = ds_file_read_all(cfg_path, DS_ADAPTER_CONFIG_MAX, &json, &len, err);
    if (rc) return rc;
    rc = peft_config_parse(cfg, json, len, cfg_path, err);
    free(json);
    return rc;
}

static int open_weights(const char *dir, ds_st_file *st, char *st_path, size_t cap, ds_err *err) {
    snprintf(st_path, cap, "%s/adapter_model.safetensors", dir);
    struct stat sb;
    if (stat(st_path, &sb) == 0) return ds_st_open(st, st_path, err);
    char bin[4096];
    snprintf(bin, sizeof bin, "%s/adapter_model.bin", dir);
    if (stat(bin, &sb) == 0)
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "%s: only adapter_model.bin (pickle) is present; save the adapter with safetensors", dir);
    return ds_err_set(err, DS_ENOTFOUND, "%s: no adapter_model.safetensors", dir);
}

int ds_peft_load(ds_adapter *a, const char *dir, const ds_model *base, ds_err *err) {
    char cfg_path[4096], st_path[4096];
    if (strlen(dir) > sizeof cfg_path - 64) return ds_err_set(err, DS_EINVAL, "%.200s...: path too long", dir);
    peft_config cfg;
    int rc = read_config(dir, &cfg, cfg_path, sizeof cfg_path, err);
    if (rc) return rc;
    peft_ctx c = {.st_path = st_path, .cfg_path = cfg_path, .base = base, .cfg = &cfg, .a = a, .err = err};
    rc = open_weights(dir, &c.st, st_path, sizeof st_path, err);
    if (!rc) {
        snprintf(a->peft_type, sizeof a->peft_type, "%s", cfg.peft_type);
        a->kind = cfg.kind;
        switch (cfg.kind) {
        case DS_ADAPTER_LORA: rc = peft_load_lora(&c); break;
        case DS_ADAPTER_IA3: rc = peft_load_ia3(&c); break;
        case DS_ADAPTER_PROMPT: rc = peft_load_prompt(&c); break;
        case DS_ADAPTER_PREFIX: rc = peft_load_prefix(&c); break;
        case DS_ADAPTER_BOTTLENECK: /* never from a PEFT config (bottleneck.c, delta.c) */
        case DS_ADAPTER_DELTA: break;
        }
    }
    free(c.slots);
    ds_st_close(&c.st);
    peft_config_free(&cfg);
    return rc;
}
