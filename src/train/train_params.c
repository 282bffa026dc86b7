/* Trainable adapters: a fresh adapter from a spec (PEFT's initialisations), the checks on an
 * adapter to continue from, deep copies, and the parameter table (PEFT names, grads, moments). */
#include "adapter/loader.h"
#include "util/rng.h"
#include "train/train_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- deterministic random numbers (splitmix64, util/rng.h) ---- */

static double uniform01(uint64_t *s) { return (double)(ds_splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }

static double normal(uint64_t *s) { /* Box–Muller */
    double u1 = uniform01(s), u2 = uniform01(s);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- names ---- */

void tr_module_path(int32_t layer, int proj, char *buf, size_t cap) {
    if (proj == DS_PROJ_COUNT) snprintf(buf, cap, "lm_head");
    else if (proj == TR_PROJ_EMBED) snprintf(buf, cap, "model.embed_tokens");
    else
        snprintf(buf, cap, "model.layers.%d.%s.%s", layer, proj <= DS_PROJ_O ? "self_attn" : "mlp",
                 ds_proj_name((ds_proj)proj));
}

/* ---- kinds ---- */

int ds_train_kind_parse(const char *method, ds_adapter_kind *out, ds_err *err) {
    static const struct {
        const char *name;
        int kind; /* -1: known, not trainable */
    } table[] = {{"lora", DS_ADAPTER_LORA},     {"rslora", DS_ADAPTER_LORA}, {"prompt_tuning", DS_ADAPTER_PROMPT},
                 {"prefix_tuning", DS_ADAPTER_PREFIX}, {"bitfit", DS_ADAPTER_DELTA}, {"diff_pruning", DS_ADAPTER_DELTA}, {"bottleneck", DS_ADAPTER_BOTTLENECK}, {"dora", -1}, {"ia3", -1}, {"adalora", -1},
                 {"p_tuning", -1},          {"loha", -1},                {"lokr", -1}, {"oft", -1}, {"boft", -1},
                 {"vera", -1},              {"fourierft", -1}};
    char buf[32];
    size_t n = method ? strlen(method) : 0;
    if (n == 0 || n >= sizeof buf) return ds_err_set(err, DS_EINVAL, "training method: expected a short name");
    for (size_t i = 0; i <= n; i++) buf[i] = method[i] == '-' ? '_' : method[i];
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcasecmp(buf, table[i].name)) continue;
        if (table[i].kind >= 0) {
            *out = (ds_adapter_kind)table[i].kind;
            return 0;
        }
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "training method '%s' is not supported: deltaserve trains lora (incl. rsLoRA), "
                          "prompt_tuning, prefix_tuning, bitfit, diff_pruning and bottleneck",
                          method);
    }
    return ds_err_set(err, DS_EINVAL, "unknown training method '%s' (expected lora, prompt_tuning, prefix_tuning, bitfit, diff_pruning or bottleneck)",
                      method);
}

bool ds_train_method_is_diff_pruning(const char *method) {
    return method && (!strcasecmp(method, "diff_pruning") || !strcasecmp(method, "diff-pruning"));
}

/* ---- a fresh adapter ---- */

static ds_adapter *new_adapter(const ds_model *m, const char *name, const char *peft_type, ds_adapter_kind kind) {
    ds_adapter *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->n_layer = m->cfg.n_layer;
    a->d_model = m->cfg.d_model;
    for (int p = 0; p < DS_PROJ_COUNT; p++) ds_adapter_base_dims(m, p, &a->proj_in[p], &a->proj_out[p]);
    a->name = strdup(name && *name ? name : "trained");
    a->path = strdup("");
    snprintf(a->peft_type, sizeof a->peft_type, "%s", peft_type);
    a->kind = kind;
    if (!a->name || !a->path) {
        ds_adapter_free(a);
        return NULL;
    }
    return a;
}

/* PEFT LoraLayer.reset_lora_parameters (init_lora_weights=True): A ~ kaiming_uniform(a=√5), whose
 * bound is 1/sqrt(in); B = 0, so the adapter starts as the identity. Embedding: A = 0, B ~ N(0, 1)
 * (A stored transposed, [n_vocab][r]). */
static int new_lora_module(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, int32_t l, int p,
                           uint64_t *rng, ds_err *err) {
    int32_t in = m->cfg.n_vocab, out = m->cfg.d_model;
    if (p != TR_PROJ_EMBED) ds_adapter_base_dims(m, p, &in, &out);
    char path[96];
    tr_module_path(l, p, path, sizeof path);
    if (s->r > in || s->r > out)
        return ds_err_set(err, DS_EINVAL, "LoRA rank %d exceeds the dimensions of %s [%d x %d]", s->r, path, out, in);
    ds_lora_module *mod = ds_lora_module_new(s->r, in, out);
    if (!mod) return ds_err_set(err, DS_ENOMEM, "out of memory");
    /* rsLoRA: α/√r, else α/r — in double then rounded, as the PEFT loader (peft_lora.c) does */
    mod->scale = (float)(s->use_rslora ? s->lora_alpha / sqrt((double)s->r) : (double)s->lora_alpha / s->r);
    const double bound = 1.0 / sqrt((double)in);
    const bool emb = p == TR_PROJ_EMBED;
    for (size_t i = 0; i < (size_t)s->r * in; i++) mod->A[i] = emb ? 0.0f : (float)((2.0 * uniform01(rng) - 1.0) * bound);
    for (size_t i = 0; i < (size_t)out * s->r; i++) mod->B[i] = emb ? (float)normal(rng) : 0.0f;
    if (emb) a->embed = mod;
    else if (p == DS_PROJ_COUNT) a->lm_head = mod;
    else a->lora[(size_t)l * DS_PROJ_COUNT + p] = mod;
    a->host_bytes += ds_lora_module_bytes(mod);
    return 0;
}

static int spec_lora(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, uint64_t *rng, ds_err *err) {
    if (s->r < 1) return ds_err_set(err, DS_EINVAL, "LoRA rank r must be >= 1 (got %d)", s->r);
    if (!(s->lora_alpha > 0) || !isfinite(s->lora_alpha))
        return ds_err_set(err, DS_EINVAL, "lora_alpha must be a positive number");
    if (!s->targets || (s->targets & ~(DS_TRAIN_TARGET_ALL_LINEAR | DS_TRAIN_TARGET_LM_HEAD | DS_TRAIN_TARGET_EMBED)))
        return ds_err_set(err, DS_EINVAL,
                          "LoRA targets: choose among q,k,v,o,gate,up,down_proj, lm_head and embed_tokens");
    int rc = ds_adapter_alloc_lora_table(a, err);
    for (int32_t l = 0; !rc && l < m->cfg.n_layer; l++)
        for (int p = 0; !rc && p < DS_PROJ_COUNT; p++)
            if (s->targets & DS_TRAIN_TARGET(p)) rc = new_lora_module(a, m, s, l, p, rng, err);
    if (!rc && (s->targets & DS_TRAIN_TARGET_LM_HEAD)) rc = new_lora_module(a, m, s, -1, DS_PROJ_COUNT, rng, err);
    if (!rc && (s->targets & DS_TRAIN_TARGET_EMBED)) rc = new_lora_module(a, m, s, -1, TR_PROJ_EMBED, rng, err);
    return rc;
}

/* Prompt tuning: N(0, std²) rows (PEFT RANDOM with std 1), or — std 0 — the embeddings of random
 * vocabulary tokens (PEFT SAMPLE_VOCAB), which start at the scale of real inputs. Prefix tuning:
 * N(0, std²), std 1 by default (PEFT's nn.Embedding). */
static int spec_prompt(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, uint64_t *rng, ds_err *err) {
    const ds_model_config *c = &m->cfg;
    if (s->n_virtual < 1 || s->n_virtual > DS_ADAPTER_MAX_VIRTUAL)
        return ds_err_set(err, DS_EINVAL, "num_virtual_tokens must be in [1, %d] (got %d)", DS_ADAPTER_MAX_VIRTUAL,
                          s->n_virtual);
    if (!(s->init_std >= 0) || !isfinite(s->init_std)) return ds_err_set(err, DS_EINVAL, "init_std must be >= 0");
    const bool prefix = s->kind == DS_ADAPTER_PREFIX;
    const size_t row = prefix ? (size_t)c->n_layer * 2 * c->n_kv_head * c->head_dim : (size_t)c->d_model;
    float *w = malloc((size_t)s->n_virtual * row * sizeof(float));
    if (!w) return ds_err_set(err, DS_ENOMEM, "out of memory");
    for (int32_t p = 0; p < s->n_virtual; p++) {
        float *r = w + (size_t)p * row;
        if (!prefix && s->init_std == 0) {
            const size_t tok = (size_t)(uniform01(rng) * c->n_vocab) % (size_t)c->n_vocab;
            ds_weight_row(&m->tok_embd, (int32_t)tok, r); /* a real token's embedding, dequantised */
            continue;
        }
        const double std = s->init_std > 0 ? s->init_std : 1.0;
        for (size_t i = 0; i < row; i++) r[i] = (float)(std * normal(rng));
    }
    a->n_virtual = s->n_virtual;
    a->host_bytes += (size_t)s->n_virtual * row * sizeof(float);
    if (prefix) {
        a->prefix = w;
        a->prefix_row = c->n_kv_head * c->head_dim;
    } else {
        a->prompt = w;
    }
    return 0;
}

/* BitFit (Ben Zaken et al. 2022): a bias delta on every target projection of every layer, zero at
 * the start (the model starts as the base); on a base without biases the delta is the bias. Kept as
 * a delta adapter (src/adapter/delta.c), so it is served and saved like any other. */
static int spec_bitfit(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, ds_err *err) {
    if (!s->targets || (s->targets & ~DS_TRAIN_TARGET_ALL_LINEAR))
        return ds_err_set(err, DS_EINVAL, "BitFit targets: choose among q,k,v,o,gate,up,down_proj");
    const size_t n = (size_t)m->cfg.n_layer * DS_PROJ_COUNT;
    if (!(a->dbias = calloc(n, sizeof *a->dbias))) return ds_err_set(err, DS_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const int p = (int)(i % DS_PROJ_COUNT);
        if (!(s->targets & DS_TRAIN_TARGET(p))) continue;
        if (!(a->dbias[i] = calloc((size_t)a->proj_out[p], sizeof(float))))
            return ds_err_set(err, DS_ENOMEM, "out of memory");
        a->host_bytes += (size_t)a->proj_out[p] * sizeof(float);
    }
    return 0;
}

/* DS_ADAPTER_DELTA: BitFit (density 0), or diff pruning, whose dense δ the trainer holds
 * (train_dp.c): the adapter carries only its bias deltas, when they train too. */
static int spec_delta(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, ds_err *err) {
    if (s->density == 0) return spec_bitfit(a, m, s, err);
    int rc = tr_dp_check_spec(s, err);
    return rc ? rc : s->bias ? spec_bitfit(a, m, s, err) : 0;
}

int tr_spec_adapter(const ds_model *m, const ds_train_adapter_spec *s, ds_adapter **out, ds_err *err) {
    static const char *const types[] = {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK", "DELTA"};
    if (s->kind != DS_ADAPTER_LORA && s->kind != DS_ADAPTER_PROMPT && s->kind != DS_ADAPTER_PREFIX &&
        s->kind != DS_ADAPTER_DELTA && s->kind != DS_ADAPTER_BOTTLENECK)
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "adapter type %s cannot be trained: deltaserve trains LoRA, prompt tuning and prefix tuning "
                          "(and BitFit bias deltas)",
                          (unsigned)s->kind < sizeof types / sizeof *types ? types[s->kind] : "(unknown)");
    ds_adapter *a = new_adapter(m, s->name, types[s->kind], s->kind);
    if (!a) return ds_err_set(err, DS_ENOMEM, "out of memory");
    uint64_t rng = s->seed ^ 0x64656c7461ull;
    int rc = s->kind == DS_ADAPTER_LORA    ? spec_lora(a, m, s, &rng, err)
             : s->kind == DS_ADAPTER_DELTA ? spec_delta(a, m, s, err)
             : s->kind == DS_ADAPTER_BOTTLENECK ? tr_bn_spec(a, m, s, err) /* train_bn.c */
                                           : spec_prompt(a, m, s, &rng, err);
    if (rc) {
        ds_adapter_free(a);
        return rc;
    }
    *out = a;
    return 0;
}

/* ---- continuing from an adapter ---- */

static int check_lora_module(const ds_lora_module *mod, int32_t l, int p, int32_t in, int32_t out, ds_err *err) {
    char path[96];
    tr_module_path(l, p, path, sizeof path);
    if (mod->dora_scale)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: DoRA adapters cannot be trained (use_dora); train plain LoRA",
                          path);
    if (mod->bias_B)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: LoRA with lora_bias cannot be trained", path);
    if (mod->in != in || mod->out != out || mod->rank < 1 || !isfinite(mod->scale))
        return ds_err_set(err, DS_EINVAL, "%s: module shape does not match the base model", path);
    return 0;
}

static int check_lora(const ds_adapter *a, const ds_model *m, ds_err *err) {
    bool any = false;
    for (int32_t l = 0; a->lora && l < m->cfg.n_layer; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++) {
            const ds_lora_module *mod = a->lora[(size_t)l * DS_PROJ_COUNT + p];
            int32_t in, out;
            ds_adapter_base_dims(m, p, &in, &out);
            if (!mod) continue;
            int rc = check_lora_module(mod, l, p, in, out, err);
            if (rc) return rc;
            any = true;
        }
    const ds_lora_module *ends[2] = {a->lm_head, a->embed};
    for (int i = 0; i < 2; i++) {
        if (!ends[i]) continue;
        int rc = i ? check_lora_module(a->embed, -1, TR_PROJ_EMBED, m->cfg.n_vocab, m->cfg.d_model, err)
                   : check_lora_module(a->lm_head, -1, DS_PROJ_COUNT, m->cfg.d_model, m->cfg.n_vocab, err);
        if (rc) return rc;
        any = true;
    }
    return any ? 0 : ds_err_set(err, DS_EINVAL, "%s: the adapter has no LoRA module", a->name);
}

int tr_check_trainable(const ds_adapter *a, const ds_model *m, ds_err *err) {
    const ds_model_config *c = &m->cfg;
    if (a->n_layer != c->n_layer || a->d_model != c->d_model)
        return ds_err_set(err, DS_EINVAL, "%s: adapter was made for another base model", a->name);
    if (!strcmp(a->peft_type, "ADALORA"))
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: AdaLoRA adapters cannot be trained (LoRA, prompt and prefix tuning can)",
                          a->name);
    if (!strcmp(a->peft_type, "P_TUNING"))
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "%s: P-tuning cannot be trained: its file holds only the prompt encoder's output, not the "
                          "encoder (train prompt tuning instead)",
                          a->name);
    switch (a->kind) {
    case DS_ADAPTER_LORA: return check_lora(a, m, err);
    case DS_ADAPTER_PROMPT:
        return a->prompt && a->n_virtual > 0 ? 0 : ds_err_set(err, DS_EINVAL, "%s: no prompt rows", a->name);
    case DS_ADAPTER_PREFIX:
        if (!a->prefix || a->n_virtual < 1 || a->prefix_row != c->n_kv_head * c->head_dim)
            return ds_err_set(err, DS_EINVAL, "%s: prefix does not match the base model", a->name);
        return 0;
    case DS_ADAPTER_DELTA: /* BitFit: bias deltas; sparse weight deltas (diff pruning) have no trainer yet */
        if (a->delta)
            return ds_err_set(err, DS_EUNSUPPORTED,
                              "%s: delta adapters with sparse weight deltas cannot be trained yet (bias-only ones can: "
                              "BitFit)",
                              a->name);
        return a->dbias ? 0 : ds_err_set(err, DS_EINVAL, "%s: no bias deltas", a->name);
    case DS_ADAPTER_BOTTLENECK: return tr_bn_check(a, m, err); /* train_bn.c */
    default:
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "%s: %s adapters cannot be trained (deltaserve trains LoRA, prompt tuning, prefix tuning)",
                          a->name, a->peft_type);
    }
}

/* ---- deep copies (trainable kinds: LoRA, prompt, prefix) ---- */

static ds_lora_module *clone_module(const ds_lora_module *s) {
    ds_lora_module *d = ds_lora_module_new(s->rank, s->in, s->out);
    if (!d) return NULL;
    d->scale = s->scale;
    memcpy(d->A, s->A, (size_t)s->rank * s->in * sizeof(float));
    memcpy(d->B, s->B, (size_t)s->out * s->rank * sizeof(float));
    return d;
}

static float *clone_floats(const float *s, size_t n) {
    float *d = malloc(n * sizeof(float));
    if (d) memcpy(d, s, n * sizeof(float));
    return d;
}

static int clone_tensors(ds_adapter *d, const ds_adapter *a) {
    const size_t n = (size_t)a->n_layer * DS_PROJ_COUNT;
    if (a->lora) {
        if (!(d->lora = calloc(n, sizeof *d->lora))) return -1;
        for (size_t i = 0; i < n; i++)
            if (a->lora[i] && !(d->lora[i] = clone_module(a->lora[i]))) return -1;
    }
    if (a->lm_head && !(d->lm_head = clone_module(a->lm_head))) return -1;
    if (a->embed && !(d->embed = clone_module(a->embed))) return -1;
    const size_t prow = (size_t)a->n_layer * 2 * (size_t)a->prefix_row;
    if (a->prompt && !(d->prompt = clone_floats(a->prompt, (size_t)a->n_virtual * a->d_model))) return -1;
    if (a->prefix && !(d->prefix = clone_floats(a->prefix, (size_t)a->n_virtual * prow))) return -1;
    if (a->dbias) {
        if (!(d->dbias = calloc(n, sizeof *d->dbias))) return -1;
        for (size_t i = 0; i < n; i++)
            if (a->dbias[i] && !(d->dbias[i] = clone_floats(a->dbias[i], (size_t)a->proj_out[i % DS_PROJ_COUNT])))
                return -1;
    }
    if (a->bn && tr_bn_clone(d, a)) return -1; /* train_bn.c */
    return 0;
}

ds_adapter *tr_adapter_clone(const ds_adapter *a, const char *name, ds_err *err) {
    ds_adapter *d = calloc(1, sizeof *d);
    if (!d) goto oom;
    memcpy(d->peft_type, a->peft_type, sizeof d->peft_type);
    d->kind = a->kind;
    d->n_layer = a->n_layer;
    d->d_model = a->d_model;
    memcpy(d->proj_in, a->proj_in, sizeof d->proj_in);
    memcpy(d->proj_out, a->proj_out, sizeof d->proj_out);
    d->n_virtual = a->n_virtual;
    d->prefix_row = a->prefix_row;
    d->host_bytes = a->host_bytes;
    d->name = strdup(name ? name : a->name ? a->name : "trained");
    d->path = strdup(a->path ? a->path : "");
    if (!d->name || !d->path || clone_tensors(d, a)) goto oom;
    return d;
oom:
    ds_adapter_free(d);
    ds_err_set(err, DS_ENOMEM, "out of memory copying adapter");
    return NULL;
}

/* ---- the parameter table ---- */

int tr_params_grow(ds_trainer *t, int32_t extra) {
    if (extra <= 0) return 0; /* realloc to 0 bytes may free the table */
    tr_param *np = realloc(t->params, ((size_t)t->n_params + (size_t)extra) * sizeof *np);
    if (!np) return DS_ENOMEM;
    t->params = np;
    for (int32_t i = 0; i < t->n_params; i++) np[i].pub.name = np[i].name; /* the names live in the entries */
    return 0;
}

float *tr_param_add(ds_trainer *t, const char *name, float *value, int nd, int64_t s0, int64_t s1) {
    tr_param *p = &t->params[t->n_params];
    memset(p, 0, sizeof *p);
    const size_t n = (size_t)s0 * (size_t)(nd == 2 ? s1 : 1);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->grad = tr_alloc(t, n);
    p->m = tr_alloc(t, n);
    p->v = tr_alloc(t, n);
    if (!p->grad || !p->m || !p->v) return NULL;
    p->pub = (ds_train_tensor){.name = p->name, .n_dims = nd, .shape = {s0, nd == 2 ? s1 : 0}, .n = n,
                               .value = value, .grad = p->grad};
    t->n_params++;
    return p->grad;
}

static int add_lora(ds_trainer *t, int32_t l, int p, ds_lora_module *mod) {
    char path[96], key[160];
    tr_module_path(l, p, path, sizeof path);
    const bool emb = p == TR_PROJ_EMBED;
    const size_t i = emb ? TR_SLOT_EMBED(t) : p == DS_PROJ_COUNT ? TR_SLOT_HEAD(t) : (size_t)l * DS_PROJ_COUNT + p;
    snprintf(key, sizeof key, emb ? "base_model.model.%s.lora_embedding_A" : "base_model.model.%s.lora_A.weight", path);
    /* embedding A is stored transposed: [n_vocab][r] */
    if (!(t->dA[i] = tr_param_add(t, key, mod->A, 2, emb ? mod->in : mod->rank, emb ? mod->rank : mod->in)))
        return DS_ENOMEM;
    snprintf(key, sizeof key, emb ? "base_model.model.%s.lora_embedding_B" : "base_model.model.%s.lora_B.weight", path);
    if (!(t->dB[i] = tr_param_add(t, key, mod->B, 2, mod->out, mod->rank))) return DS_ENOMEM;
    if (mod->rank > t->r_max) t->r_max = mod->rank;
    return 0;
}

/* BitFit: one parameter per bias delta (named as the delta format stores it) and the ones vector
 * that turns Σ_t dy[t] into a GEMM. */
static int add_bitfit(ds_trainer *t) {
    const size_t n = (size_t)t->dim.L * DS_PROJ_COUNT;
    if (!(t->ddbias = calloc(n, sizeof *t->ddbias))) return DS_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if (!t->ad->dbias[i]) continue;
        char path[96], key[128];
        tr_module_path((int32_t)(i / DS_PROJ_COUNT), (int)(i % DS_PROJ_COUNT), path, sizeof path);
        snprintf(key, sizeof key, "%s.bias_delta", path);
        if (!(t->ddbias[i] = tr_param_add(t, key, t->ad->dbias[i], 1, t->ad->proj_out[i % DS_PROJ_COUNT], 0)))
            return DS_ENOMEM;
    }
    float *h = malloc((size_t)t->max_rows * sizeof *h);
    if (!h || !(t->ones = tr_alloc(t, (size_t)t->max_rows))) return free(h), DS_ENOMEM;
    for (int32_t i = 0; i < t->max_rows; i++) h[i] = 1.0f;
    const int rc = t->be->iface->upload(t->be->ctx, t->ones, h, (size_t)t->max_rows * sizeof *h);
    free(h);
    return rc;
}

int tr_params_build(ds_trainer *t, ds_err *err) {
    const size_t slots = TR_N_SLOTS(t);
    t->params = calloc(2 * slots + 1, sizeof *t->params);
    t->dA = calloc(slots, sizeof *t->dA);
    t->dB = calloc(slots, sizeof *t->dB);
    if (!t->params || !t->dA || !t->dB) return ds_err_set(err, DS_ENOMEM, "out of memory");
    ds_adapter *a = t->ad;
    int rc = 0;
    for (int32_t l = 0; !rc && a->lora && l < t->dim.L; l++)
        for (int p = 0; !rc && p < DS_PROJ_COUNT; p++)
            if (a->lora[(size_t)l * DS_PROJ_COUNT + p]) rc = add_lora(t, l, p, a->lora[(size_t)l * DS_PROJ_COUNT + p]);
    if (!rc && a->lm_head) rc = add_lora(t, -1, DS_PROJ_COUNT, a->lm_head);
    if (!rc && a->embed) rc = add_lora(t, -1, TR_PROJ_EMBED, a->embed);
    if (!rc && a->prompt && !(t->dprompt = tr_param_add(t, "prompt_embeddings", a->prompt, 2, a->n_virtual, t->dim.d)))
        rc = DS_ENOMEM;
    if (!rc && a->prefix && !(t->dprefix = tr_param_add(t, "prompt_embeddings", a->prefix, 2, a->n_virtual,
                                                         (int64_t)t->dim.L * 2 * t->dim.kvd)))
        rc = DS_ENOMEM;
    if (!rc && a->dbias) rc = add_bitfit(t);
    if (!rc && a->bn) return tr_bn_params_build(t, err); /* train_bn.c; last: it grows t->params */
    return rc ? ds_err_set(err, rc, "out of memory for gradients") : 0;
}

void tr_params_free(ds_trainer *t) {
    tr_bn_free(t);
    free(t->params);
    free(t->dA);
    free(t->dB);
    free(t->ddbias);
}

void tr_params_zero_grad(ds_trainer *t) {
    for (int32_t i = 0; i < t->n_params; i++) TR_OP(t, fill, t->params[i].grad, t->params[i].pub.n, 0.0f);
}
