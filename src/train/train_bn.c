/* Training bottleneck adapters (AdapterHub `adapters`: seq_bn, double_seq_bn, par_bn): fresh
 * modules as the package initialises them, the parameter table under the package's safetensors
 * keys, and the forward / backward hooks the trainer calls around each sub-block's output.
 *
 * With o a sub-block's output (attention after o_proj, FFN after down_proj) and x the residual
 * stream entering it, the three configs the trainer makes (no adapter LayerNorm, scalar scaling;
 * ds_bn_seg in ds/backend.h has the general form the serving op computes) all reduce to
 *   x' = x + o + U(z),   U(z) = s·(up·act(down·z + down_b) + up_b)
 *   sequential (DS_BN_IN_PLUS_X): z = o + x;  houlsby (neither flag): z = o;  parallel: z = x.
 * So the forward hook adds U(z) into o before the trainer's residual add, and the backward routes
 * dz = J_Uᵀ·G (G = d loss / d x') to o and/or x: sequential to both (g.dx += dz before the
 * projection's backward), houlsby to o only (g.dx += dz, then G restored for the residual),
 * parallel to x only (g.dx += dz after the projection's backward). */
#include "adapter/loader.h"
#include "util/rng.h"
#include "train/train_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum { P_DOWN_W = 0, P_DOWN_B, P_UP_W, P_UP_B, P_COUNT };

typedef struct tr_bn_state {
    float **z, **hpre;   /* [L·DS_BN_SITES] adapter input [T][d], pre-activation [T][size]; NULL: no module */
    float *(*g)[P_COUNT]; /* [L·DS_BN_SITES] gradients of down.w, down.b, up.w, up.b */
    float *G, *dz, *tmp;  /* [T][d], [T][d], [2][T][size_max] */
} tr_bn_state;

/* ---- options ---- */

ds_train_bn_opts ds_train_bn_default_opts(void) {
    return (ds_train_bn_opts){.reduction_factor = 16, .placement = DS_TRAIN_BN_SEQUENTIAL, .act = -1, .scaling = 0.0f,
                              .init = DS_TRAIN_BN_INIT_DEFAULT};
}

int ds_train_bn_placement_parse(const char *s, ds_train_bn_placement *out, ds_err *err) {
    static const struct {
        const char *name;
        ds_train_bn_placement p;
    } t[] = {{"sequential", DS_TRAIN_BN_SEQUENTIAL}, {"pfeiffer", DS_TRAIN_BN_SEQUENTIAL},
             {"seq_bn", DS_TRAIN_BN_SEQUENTIAL},     {"houlsby", DS_TRAIN_BN_HOULSBY},
             {"double_seq_bn", DS_TRAIN_BN_HOULSBY}, {"parallel", DS_TRAIN_BN_PARALLEL},
             {"par_bn", DS_TRAIN_BN_PARALLEL}};
    for (size_t i = 0; s && i < sizeof t / sizeof *t; i++)
        if (!strcasecmp(s, t[i].name)) return *out = t[i].p, 0;
    return ds_err_set(err, DS_EINVAL, "placement '%s' is not one of sequential (seq_bn), houlsby (double_seq_bn), "
                      "parallel (par_bn)", s ? s : "");
}

/* AdapterHub names (adapters' Activation_Function_Class via transformers' ACT2FN) of the
 * activations the training ops differentiate; the name written back by ds_ah_save comes first. */
static const struct {
    const char *name;
    ds_act act;
} ACTS[] = {{"relu", DS_ACT_RELU}, {"gelu", DS_ACT_GELU}, {"gelu_new", DS_ACT_GELU_TANH},
            {"swish", DS_ACT_SILU}, {"silu", DS_ACT_SILU}, {"tanh", DS_ACT_TANH}};

const char *ds_train_bn_act_name(int32_t act) { return tr_bn_act_name(act); }

const char *ds_train_bn_placement_name(ds_train_bn_placement p) {
    return p == DS_TRAIN_BN_HOULSBY ? "houlsby" : p == DS_TRAIN_BN_PARALLEL ? "parallel" : "sequential";
}

const char *ds_train_bn_init_name(ds_train_bn_init i) {
    return i == DS_TRAIN_BN_INIT_MAM ? "mam_adapter" : i == DS_TRAIN_BN_INIT_BERT ? "bert" : "default";
}

size_t ds_train_bn_bytes(const ds_model *m, const ds_train_bn_opts *o) {
    const size_t d = (size_t)m->cfg.d_model, rf = o->reduction_factor > 1 ? (size_t)o->reduction_factor : 1;
    const size_t size = d / rf ? d / rf : 1, sites = o->placement == DS_TRAIN_BN_HOULSBY ? 2 : 1;
    return (size_t)m->cfg.n_layer * sites * (2 * size * d + size + d) * sizeof(float);
}

/* adapters' SeqBnConfig / DoubleSeqBnConfig / ParBnConfig defaults (configuration/adapter_config.py):
 * non_linearity relu / swish / relu, scaling 1 / 1 / 4, init_weights bert / bert / mam_adapter. */
void ds_train_bn_resolve(ds_train_bn_opts *o) {
    const bool par = o->placement == DS_TRAIN_BN_PARALLEL, houlsby = o->placement == DS_TRAIN_BN_HOULSBY;
    if (o->act < 0) o->act = houlsby ? DS_ACT_SILU : DS_ACT_RELU;
    if (!(o->scaling > 0)) o->scaling = par ? 4.0f : 1.0f;
    if (o->init == DS_TRAIN_BN_INIT_DEFAULT) o->init = par ? DS_TRAIN_BN_INIT_MAM : DS_TRAIN_BN_INIT_BERT;
}

const char *tr_bn_act_name(int32_t act) {
    for (size_t i = 0; i < sizeof ACTS / sizeof *ACTS; i++)
        if ((int32_t)ACTS[i].act == act) return ACTS[i].name;
    return NULL;
}

int ds_train_bn_act_parse(const char *s, int32_t *out, ds_err *err) {
    static const char *const served[] = {"linear", "relu2", "relu6", "leaky_relu", "leakyrelu", "gelu_python",
                                         "gelu_10", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate",
                                         "gelu_fast", "quick_gelu", "sigmoid", "mish", "laplace", "prelu", "xielu"};
    for (size_t i = 0; s && i < sizeof ACTS / sizeof *ACTS; i++)
        if (!strcasecmp(s, ACTS[i].name)) return *out = (int32_t)ACTS[i].act, 0;
    for (size_t i = 0; s && i < sizeof served / sizeof *served; i++)
        if (!strcasecmp(s, served[i]))
            return ds_err_set(err, DS_EUNSUPPORTED, "non_linearity '%s' cannot be trained (served only): choose relu, "
                              "gelu, gelu_new, silu (swish) or tanh", s);
    return ds_err_set(err, DS_EINVAL, "unknown non_linearity '%s' (expected relu, gelu, gelu_new, silu, swish or tanh)",
                      s ? s : "");
}

int ds_train_bn_init_parse(const char *s, ds_train_bn_init *out, ds_err *err) {
    if (s && !strcasecmp(s, "bert")) return *out = DS_TRAIN_BN_INIT_BERT, 0;
    if (s && !strcasecmp(s, "mam_adapter")) return *out = DS_TRAIN_BN_INIT_MAM, 0;
    return ds_err_set(err, DS_EINVAL, "init_weights '%s' is not one of bert, mam_adapter", s ? s : "");
}

/* ---- fresh modules ---- */

static double uniform01(uint64_t *s) { return (double)(ds_splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }

static double normal(uint64_t *s) { /* Box–Muller */
    double u1 = uniform01(s), u2 = uniform01(s);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static ds_bn_module *new_module(int32_t d, int32_t size, ds_act act, uint32_t flags, float scale) {
    ds_bn_module *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    *m = (ds_bn_module){.size = size, .d = d, .act = act, .flags = flags, .scale = scale};
    m->down = calloc((size_t)size * d, sizeof(float));
    m->down_b = calloc((size_t)size, sizeof(float));
    m->up = calloc((size_t)d * size, sizeof(float));
    m->up_b = calloc((size_t)d, sizeof(float));
    if (m->down && m->down_b && m->up && m->up_b) return m;
    ds_bn_module_free(m);
    return NULL;
}

/* adapters 1.3.0, Adapter.__init__ (methods/modeling.py): "bert" applies init_bert_weights to
 * adapter_down and adapter_up (weights N(0, 0.02²), biases 0); "mam_adapter" gives adapter_down
 * kaiming_uniform_(a=√5) — bound gain·√(3/fan_in) with gain √(2/(1+5)), i.e. 1/√d — and zeros
 * adapter_up and both biases, so the adapter starts as the identity. */
static void init_module(ds_bn_module *m, bool mam, uint64_t *rng) {
    const size_t n = (size_t)m->size * m->d;
    const double bound = 1.0 / sqrt((double)m->d);
    for (size_t i = 0; i < n; i++) m->down[i] = (float)(mam ? (2.0 * uniform01(rng) - 1.0) * bound : 0.02 * normal(rng));
    for (size_t i = 0; !mam && i < n; i++) m->up[i] = (float)(0.02 * normal(rng));
}

int tr_bn_spec(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, ds_err *err) {
    ds_train_bn_opts ro = s->bn;
    const ds_train_bn_opts *o = &ro;
    const int32_t d = m->cfg.d_model, L = m->cfg.n_layer;
    if (m->cfg.post_norms)
        return ds_err_set(err, DS_EUNSUPPORTED, "bottleneck adapters on a %s base are not supported", m->cfg.arch_name);
    if (o->reduction_factor < 1 || o->reduction_factor > d)
        return ds_err_set(err, DS_EINVAL, "reduction_factor must be in [1, %d] (d_model) (got %d)", d,
                          o->reduction_factor);
    if ((unsigned)o->placement > DS_TRAIN_BN_PARALLEL || (unsigned)o->init > DS_TRAIN_BN_INIT_MAM)
        return ds_err_set(err, DS_EINVAL, "unknown bottleneck placement or init_weights");
    if (!(o->scaling >= 0) || !isfinite(o->scaling))
        return ds_err_set(err, DS_EINVAL, "scaling must be a finite number > 0");
    ds_train_bn_resolve(&ro);
    const bool par = o->placement == DS_TRAIN_BN_PARALLEL, houlsby = o->placement == DS_TRAIN_BN_HOULSBY;
    const int32_t act = o->act;
    if (!tr_bn_act_name(act)) return ds_err_set(err, DS_EUNSUPPORTED, "this non_linearity cannot be trained");
    const float scale = o->scaling;
    const bool mam = o->init == DS_TRAIN_BN_INIT_MAM;
    /* flags as the loader derives them from the package's configs (bottleneck.c flags_of) */
    const uint32_t flags = DS_BN_ADD_X | (par ? DS_BN_PARALLEL : houlsby ? 0u : DS_BN_IN_PLUS_X);
    if (!(a->bn = calloc((size_t)L * DS_BN_SITES, sizeof *a->bn))) return ds_err_set(err, DS_ENOMEM, "out of memory");
    uint64_t rng = s->seed ^ 0x626f74746c65ull;
    for (int32_t l = 0; l < L; l++)
        for (int site = houlsby ? DS_BN_ATTN : DS_BN_FFN; site < DS_BN_SITES; site++) {
            ds_bn_module *mod = new_module(d, d / o->reduction_factor, (ds_act)act, flags, scale);
            if (!mod) return ds_err_set(err, DS_ENOMEM, "out of memory");
            init_module(mod, mam, &rng);
            a->bn[(size_t)l * DS_BN_SITES + site] = mod;
            a->host_bytes += ((size_t)2 * mod->size * d + mod->size + d) * sizeof(float);
        }
    return 0;
}

/* ---- continuing, copies ---- */

int tr_bn_check(const ds_adapter *a, const ds_model *m, ds_err *err) {
    if (!a->bn) return ds_err_set(err, DS_EINVAL, "%s: the adapter has no bottleneck module", a->name);
    if (a->prefix)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: config unions with prefix tuning (MAM) cannot be trained; "
                          "bottleneck adapters alone can", a->name);
    for (size_t i = 0; i < (size_t)m->cfg.n_layer * DS_BN_SITES; i++) {
        const ds_bn_module *b = a->bn[i];
        if (!b) continue;
        const uint32_t f = b->flags;
        const bool known = f == (DS_BN_ADD_X | DS_BN_IN_PLUS_X) || f == DS_BN_ADD_X || f == (DS_BN_ADD_X | DS_BN_PARALLEL);
        if (b->ln_b_w || b->ln_a_w || b->scale_vec || !known)
            return ds_err_set(err, DS_EUNSUPPORTED, "%s: layer %zu: only seq_bn, double_seq_bn and par_bn adapters "
                              "without their own LayerNorms, channel scaling or other residual options can be "
                              "trained", a->name, i / DS_BN_SITES);
        if (!tr_bn_act_name(b->act))
            return ds_err_set(err, DS_EUNSUPPORTED, "%s: its non_linearity cannot be trained (relu, gelu, gelu_new, "
                              "silu/swish, tanh can)", a->name);
        if (b->d != m->cfg.d_model) return ds_err_set(err, DS_EINVAL, "%s: module width does not match", a->name);
    }
    return 0;
}

static float *dup_floats(const float *s, size_t n) {
    float *d = malloc(n * sizeof(float));
    if (d) memcpy(d, s, n * sizeof(float));
    return d;
}

int tr_bn_clone(ds_adapter *d, const ds_adapter *a) {
    const size_t n = (size_t)a->n_layer * DS_BN_SITES;
    if (!(d->bn = calloc(n, sizeof *d->bn))) return -1;
    for (size_t i = 0; i < n; i++) {
        const ds_bn_module *s = a->bn[i];
        if (!s) continue;
        ds_bn_module *c = calloc(1, sizeof *c);
        if (!c) return -1;
        *c = *s;
        c->scale_vec = c->ln_b_w = c->ln_b_b = c->ln_a_w = c->ln_a_b = NULL;
        c->down = dup_floats(s->down, (size_t)s->size * s->d);
        c->down_b = dup_floats(s->down_b, (size_t)s->size);
        c->up = dup_floats(s->up, (size_t)s->d * s->size);
        c->up_b = dup_floats(s->up_b, (size_t)s->d);
        const float *opt[] = {s->scale_vec, s->ln_b_w, s->ln_b_b, s->ln_a_w, s->ln_a_b};
        float **dst[] = {&c->scale_vec, &c->ln_b_w, &c->ln_b_b, &c->ln_a_w, &c->ln_a_b};
        for (int k = 0; k < 5; k++)
            if (opt[k]) *dst[k] = dup_floats(opt[k], (size_t)s->d);
        d->bn[i] = c; /* freed with d from here on, complete or not */
        if (!c->down || !c->down_b || !c->up || !c->up_b) return -1;
        for (int k = 0; k < 5; k++)
            if (opt[k] && !*dst[k]) return -1;
    }
    return 0;
}

/* ---- the parameter table ---- */

/* A module's four tensors (the table has room: tr_bn_params_build grows it) and its saves. */
static int add_module(ds_trainer *t, int32_t l, int site, ds_bn_module *b) {
    tr_bn_state *s = t->bn;
    const size_t i = (size_t)l * DS_BN_SITES + site, T = (size_t)t->max_rows;
    static const char *const sfx[P_COUNT] = {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight",
                                             "adapter_up.bias"};
    float *val[P_COUNT] = {b->down, b->down_b, b->up, b->up_b};
    const int64_t shp[P_COUNT][2] = {{b->size, b->d}, {b->size, 0}, {b->d, b->size}, {b->d, 0}};
    for (int k = 0; k < P_COUNT; k++) {
        char key[sizeof t->params[0].name];
        snprintf(key, sizeof key, "model.layers.%d.%s_adapters.adapters.%s.%s", l,
                 site == DS_BN_ATTN ? "attention" : "output", t->ad->name, sfx[k]);
        if (!(s->g[i][k] = tr_param_add(t, key, val[k], shp[k][1] ? 2 : 1, shp[k][0], shp[k][1]))) return DS_ENOMEM;
    }
    if (!(s->z[i] = tr_alloc(t, T * b->d)) || !(s->hpre[i] = tr_alloc(t, T * b->size))) return DS_ENOMEM;
    return 0;
}

int tr_bn_params_build(ds_trainer *t, ds_err *err) {
    const ds_adapter *a = t->ad;
    int rc = tr_bn_check(a, t->m, err);
    if (rc) return rc;
    if (t->op->version < 3 || !t->op->bn_fwd || !t->op->bn_bwd)
        return ds_err_set(err, DS_EUNSUPPORTED, "backend '%s' has no bottleneck training ops: fine-tuning bottleneck "
                          "adapters runs on the cpu backend", t->be->iface->name);
    const size_t n = (size_t)t->dim.L * DS_BN_SITES, T = (size_t)t->max_rows;
    tr_bn_state *s = t->bn = calloc(1, sizeof *s);
    if (!s || !(s->z = calloc(n, sizeof *s->z)) || !(s->hpre = calloc(n, sizeof *s->hpre)) ||
        !(s->g = calloc(n, sizeof *s->g)))
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    int32_t size_max = 1, n_mod = 0;
    for (size_t i = 0; i < n; i++) n_mod += a->bn[i] != NULL;
    rc = tr_params_grow(t, P_COUNT * n_mod); /* last in tr_params_build: its table counts no modules */
    for (size_t i = 0; !rc && i < n; i++) {
        if (!a->bn[i]) continue;
        if (a->bn[i]->size > size_max) size_max = a->bn[i]->size;
        rc = add_module(t, (int32_t)(i / DS_BN_SITES), (int)(i % DS_BN_SITES), a->bn[i]);
    }
    if (!rc && (!(s->G = tr_alloc(t, T * t->dim.d)) || !(s->dz = tr_alloc(t, T * t->dim.d)) ||
                !(s->tmp = tr_alloc(t, 2 * T * (size_t)size_max))))
        rc = DS_ENOMEM;
    return rc ? ds_err_set(err, rc, "out of memory for bottleneck gradients") : 0;
}

void tr_bn_free(ds_trainer *t) {
    if (!t->bn) return;
    free(t->bn->z);
    free(t->bn->hpre);
    free(t->bn->g);
    free(t->bn);
    t->bn = NULL;
}

/* ---- forward / backward hooks ---- */

static const ds_bn_module *module_at(const ds_trainer *t, int32_t l, int site) {
    return t->bn ? t->res->bn[(size_t)l * DS_BN_SITES + site] : NULL; /* resident arrays */
}

static ds_train_bn_args args_of(const ds_bn_module *b, int32_t n) {
    return (ds_train_bn_args){.down = b->down, .down_b = b->down_b, .up = b->up, .up_b = b->up_b, .scale = b->scale,
                              .act = (int32_t)b->act, .n = n, .d = b->d, .size = b->size};
}

static void fwd(ds_trainer *t, int32_t l, int site, float *o, const float *x) {
    const ds_bn_module *b = module_at(t, l, site);
    if (!b) return;
    tr_bn_state *s = t->bn;
    const size_t i = (size_t)l * DS_BN_SITES + site, nd = (size_t)t->b.n_rows * b->d;
    float *z = s->z[i];
    tr_op_note(t, t->be->iface->copy(t->be->ctx, z, b->flags & DS_BN_PARALLEL ? x : o, nd * sizeof(float)));
    if (!(b->flags & DS_BN_PARALLEL) && (b->flags & DS_BN_IN_PLUS_X))
        tr_op_note(t, t->be->iface->add(t->be->ctx, z, x, nd));
    const ds_train_bn_args a = args_of(b, t->b.n_rows);
    TR_OP(t, bn_fwd, &a, z, s->hpre[i], s->tmp, o);
}

void tr_bn_attn_out(ds_trainer *t, int32_t l, tr_act *a) { fwd(t, l, DS_BN_ATTN, a->x_mid, t->ck[l]); }
void tr_bn_ffn_out(ds_trainer *t, int32_t l, tr_act *a) { fwd(t, l, DS_BN_FFN, t->ck[l + 1], a->x_mid); }

static void bwd(ds_trainer *t, int32_t l, int site) {
    const ds_bn_module *b = module_at(t, l, site);
    if (!b) return;
    tr_bn_state *s = t->bn;
    const size_t i = (size_t)l * DS_BN_SITES + site, nd = (size_t)t->b.n_rows * b->d;
    const ds_train_bn_args a = args_of(b, t->b.n_rows);
    float *const *g = s->g[i];
    TR_OP(t, bn_bwd, &a, s->z[i], s->hpre[i], t->g.dx, s->dz, g[P_DOWN_W], g[P_DOWN_B], g[P_UP_W], g[P_UP_B],
          s->tmp);
    if (b->flags & DS_BN_PARALLEL) return; /* dz belongs to x: bwd_res */
    if (!(b->flags & DS_BN_IN_PLUS_X)) /* houlsby: x gets G alone */
        tr_op_note(t, t->be->iface->copy(t->be->ctx, s->G, t->g.dx, nd * sizeof(float)));
    tr_op_note(t, t->be->iface->add(t->be->ctx, t->g.dx, s->dz, nd));
}

static void bwd_res(ds_trainer *t, int32_t l, int site) {
    const ds_bn_module *b = module_at(t, l, site);
    if (!b) return;
    const size_t nd = (size_t)t->b.n_rows * b->d;
    if (b->flags & DS_BN_PARALLEL) tr_op_note(t, t->be->iface->add(t->be->ctx, t->g.dx, t->bn->dz, nd));
    else if (!(b->flags & DS_BN_IN_PLUS_X))
        tr_op_note(t, t->be->iface->copy(t->be->ctx, t->g.dx, t->bn->G, nd * sizeof(float)));
}

void tr_bn_attn_bwd(ds_trainer *t, int32_t l) { bwd(t, l, DS_BN_ATTN); }
void tr_bn_attn_bwd_res(ds_trainer *t, int32_t l) { bwd_res(t, l, DS_BN_ATTN); }
void tr_bn_ffn_bwd(ds_trainer *t, int32_t l) { bwd(t, l, DS_BN_FFN); }
void tr_bn_ffn_bwd_res(ds_trainer *t, int32_t l) { bwd_res(t, l, DS_BN_FFN); }
