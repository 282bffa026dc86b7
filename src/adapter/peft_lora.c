/* PEFT LoRA family: LoRA, rsLoRA, rank/alpha patterns, lora_bias, DoRA, AdaLoRA (PEFT tuners/lora, tuners/adalora).
 *
 * Every module becomes y = base(x) + scale·B(A x) (+ scale·bias_B); DoRA adds a constant per-row
 * factor computed here from the base weight; AdaLoRA's SVD triplet is folded into A. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter/loader.h"

typedef struct slot_info {
    size_t slot;
    int32_t layer;
    int proj;       /* DS_PROJ_COUNT = lm_head */
    char path[96];  /* HF module path, for patterns and messages */
    int32_t in, out, rank;
} slot_info;

/* Which tensors a module must / may have, given the config (never silently drop one). */
static int check_roles(peft_ctx *c, const slot_info *s) {
    const ds_st_tensor *const *t = c->slots[s->slot];
    const peft_config *cfg = c->cfg;
    const char *f = c->st_path;
    const char *need = !t[ROLE_A] ? (cfg->adalora ? "lora_A" : "lora_A.weight")
                       : !t[ROLE_B] ? (cfg->adalora ? "lora_B" : "lora_B.weight")
                       : (cfg->adalora && !t[ROLE_E]) ? "lora_E"
                                                       : NULL;
    if (need) return ds_err_set(c->err, DS_EFORMAT, "%s: module '%s' has no %s tensor", f, s->path, need);
    if (t[ROLE_MAG] && !cfg->dora)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' is present but use_dora is false in %s", f,
                          t[ROLE_MAG]->name, c->cfg_path);
    if (!t[ROLE_MAG] && cfg->dora)
        return ds_err_set(c->err, DS_EFORMAT, "%s: use_dora is true but module '%s' has no lora_magnitude_vector", f,
                          s->path);
    if (t[ROLE_BIAS] && !cfg->lora_bias)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' is present but lora_bias is false in %s", f,
                          t[ROLE_BIAS]->name, c->cfg_path);
    return 0;
}

/* Rank from lora_A's shape [r, in]; AdaLoRA may have pruned a module to rank 0. */
static int check_rank(peft_ctx *c, slot_info *s) {
    const ds_st_tensor *A = c->slots[s->slot][ROLE_A];
    if (A->n_dims != 2 || A->shape[1] != s->in)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must have shape [r, %d] (in_features of %s)", c->st_path,
                          A->name, s->in, s->path);
    int64_t r = A->shape[0], lim = s->in < s->out ? s->in : s->out;
    if (c->cfg->adalora && r > c->cfg->init_r)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' has rank %lld > init_r %d", c->st_path, A->name,
                          (long long)r, c->cfg->init_r);
    if ((r < 1 && !c->cfg->adalora) || r > lim)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': rank %lld must be in [1, %lld] for %s", c->st_path,
                          A->name, (long long)r, (long long)lim, s->path);
    s->rank = (int32_t)r;
    return 0;
}

/* PEFT LoraLayer.update_layer: s = α/√r (rsLoRA) or α/r, α from alpha_pattern when a key matches.
 * AdaLoRA SVDLinear: s = α / (ranknum + 1e-5) with ranknum = init_r (kept through pruning) and α ≤ 0
 * meaning r (the rank the module was built with, i.e. the saved rank). */
static int module_scale(peft_ctx *c, const slot_info *s, float *scale) {
    const peft_config *cfg = c->cfg;
    double alpha = cfg->alpha;
    if (cfg->adalora) {
        if (alpha <= 0) alpha = s->rank;
        *scale = (float)(alpha / ((double)cfg->init_r + 1e-5));
        return 0;
    }
    bool found;
    double pa;
    int rc = peft_pattern_lookup(&cfg->alpha_pattern, s->path, &pa, &found, c->cfg_path, "alpha_pattern", c->err);
    if (rc) return rc;
    if (found) alpha = pa;
    *scale = (float)(cfg->rslora ? alpha / sqrt((double)s->rank) : alpha / (double)s->rank);
    if (!isfinite(*scale))
        return ds_err_set(c->err, DS_EFORMAT, "%s: lora_alpha %g gives a non-finite scale for %s", c->cfg_path, alpha,
                          s->path);
    return 0;
}

/* A[i][:] *= E[i]: AdaLoRA's B·diag(E)·A as plain LoRA factors. */
static int fold_e(peft_ctx *c, const slot_info *s, ds_lora_module *m) {
    float *e;
    int64_t shape[2] = {s->rank, 1};
    int rc = peft_read(c, c->slots[s->slot][ROLE_E], shape, 2, &e);
    if (rc) return rc;
    for (int32_t i = 0; i < s->rank; i++)
        for (int32_t j = 0; j < s->in; j++) m->A[(size_t)i * s->in + j] *= e[i];
    free(e);
    return 0;
}

/* DoRA (Liu et al. 2024; PEFT DoraLinearLayer.get_weight_norm): n[o] = ||W[o,:] + s·(B·A)[o,:]||₂
 * over the input dim, a constant at inference; y = (m/n)⊙(W x + s·B A x) + b. Computed in double. */
static int dora_scale(peft_ctx *c, const slot_info *s, ds_lora_module *m) {
    const ds_st_tensor *mt = c->slots[s->slot][ROLE_MAG];
    int64_t shape[1] = {s->out};
    float *mag;
    int rc = peft_read(c, mt, shape, 1, &mag);
    if (rc) return rc;
    double *row = malloc((size_t)s->in * sizeof *row);
    float *w = malloc((size_t)s->in * sizeof *w); /* row o of the base weight, dequantised */
    if (!row || !w) rc = ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
    for (int32_t o = 0; !rc && o < s->out; o++) {
        const float *b = m->B + (size_t)o * s->rank;
        ds_adapter_base_row(c->base, s->layer, s->proj, o, w);
        for (int32_t i = 0; i < s->in; i++) row[i] = w[i];
        for (int32_t k = 0; k < s->rank; k++) {
            double f = (double)m->scale * b[k];
            const float *a = m->A + (size_t)k * s->in;
            for (int32_t i = 0; i < s->in; i++) row[i] += f * a[i];
        }
        double n2 = 0;
        for (int32_t i = 0; i < s->in; i++) n2 += row[i] * row[i];
        if (!(n2 > 0))
            rc = ds_err_set(c->err, DS_EFORMAT, "%s: DoRA on %s: row %d of W + s·B·A has zero norm", c->st_path, s->path,
                            o);
        else
            m->dora_scale[o] = (float)(mag[o] / sqrt(n2));
    }
    free(row);
    free(w);
    free(mag);
    return rc;
}

static int read_into(peft_ctx *c, const ds_st_tensor *t, const int64_t *shape, int nd, float *dst, size_t n) {
    float *tmp;
    int rc = peft_read(c, t, shape, nd, &tmp);
    if (rc) return rc;
    memcpy(dst, tmp, n * sizeof *dst);
    free(tmp);
    return 0;
}

static int build_module(peft_ctx *c, const slot_info *s, ds_lora_module **out) {
    const ds_st_tensor *const *t = c->slots[s->slot];
    ds_lora_module *m = ds_lora_module_new(s->rank, s->in, s->out);
    if (!m) return ds_err_set(c->err, DS_ENOMEM, "%s: %s: out of memory", c->st_path, s->path);
    int64_t sa[2] = {s->rank, s->in}, sb[2] = {s->out, s->rank}, sv[1] = {s->out};
    int rc = module_scale(c, s, &m->scale);
    if (!rc) rc = read_into(c, t[ROLE_A], sa, 2, m->A, (size_t)s->rank * s->in);
    if (!rc) rc = read_into(c, t[ROLE_B], sb, 2, m->B, (size_t)s->out * s->rank);
    if (!rc && t[ROLE_E]) rc = fold_e(c, s, m);
    if (!rc && t[ROLE_BIAS] && !(m->bias_B = malloc((size_t)s->out * sizeof(float))))
        rc = ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
    if (!rc && t[ROLE_BIAS]) rc = read_into(c, t[ROLE_BIAS], sv, 1, m->bias_B, (size_t)s->out);
    if (!rc && t[ROLE_MAG] && !(m->dora_scale = malloc((size_t)s->out * sizeof(float))))
        rc = ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
    if (!rc && t[ROLE_MAG]) rc = dora_scale(c, s, m);
    if (rc) {
        ds_lora_module_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

static bool slot_used(const peft_ctx *c, size_t slot) {
    for (int r = 0; r < ROLE_COUNT; r++)
        if (c->slots[slot][r]) return true;
    return false;
}

/* AdaLoRA can prune a module to rank 0: lora_B [out, 0] and lora_E [0, 1] must say so too. */
static int check_pruned(peft_ctx *c, const slot_info *s) {
    const ds_st_tensor *B = c->slots[s->slot][ROLE_B], *E = c->slots[s->slot][ROLE_E];
    if (B->n_dims != 2 || B->shape[0] != s->out || B->shape[1] != 0)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must have shape [%d, 0] (lora_A has rank 0)", c->st_path,
                          B->name, s->out);
    if (E->n_dims != 2 || E->shape[0] != 0 || E->shape[1] != 1)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must have shape [0, 1] (lora_A has rank 0)", c->st_path,
                          E->name);
    return 0;
}

/* A module on Phi-3's fused qkv_proj / gate_up_proj adapts the fused output: its rows split into one
 * module per base projection (B, lora_bias and DoRA rows; A and the scale shared), which is the same
 * sum y_part += s·B_part·(A x). */
static int split_module(peft_ctx *c, const slot_info *s, const ds_lora_module *m, int n, const int *parts,
                        const int32_t *rows) {
    int32_t r0 = 0;
    for (int k = 0; k < n; k++) {
        ds_lora_module *p = ds_lora_module_new(m->rank, m->in, rows[k]);
        if (!p) return ds_err_set(c->err, DS_ENOMEM, "%s: %s: out of memory", c->st_path, s->path);
        p->scale = m->scale;
        memcpy(p->A, m->A, (size_t)m->rank * m->in * sizeof(float));
        memcpy(p->B, m->B + (size_t)r0 * m->rank, (size_t)rows[k] * m->rank * sizeof(float));
        if (m->bias_B && (p->bias_B = malloc((size_t)rows[k] * sizeof(float))))
            memcpy(p->bias_B, m->bias_B + r0, (size_t)rows[k] * sizeof(float));
        if (m->dora_scale && (p->dora_scale = malloc((size_t)rows[k] * sizeof(float))))
            memcpy(p->dora_scale, m->dora_scale + r0, (size_t)rows[k] * sizeof(float));
        if ((m->bias_B && !p->bias_B) || (m->dora_scale && !p->dora_scale)) {
            ds_lora_module_free(p);
            return ds_err_set(c->err, DS_ENOMEM, "%s: %s: out of memory", c->st_path, s->path);
        }
        c->a->lora[(size_t)s->layer * DS_PROJ_COUNT + (size_t)parts[k]] = p;
        c->a->host_bytes += ds_lora_module_bytes(p);
        r0 += rows[k];
    }
    return 0;
}

static int load_slot(peft_ctx *c, size_t slot) {
    slot_info s = {.slot = slot};
    bool lm = slot == PEFT_LM_HEAD_SLOT(c);
    s.proj = lm ? DS_PROJ_COUNT : (int)(slot % DS_PROJ_COUNT);
    s.layer = lm ? -1 : (int32_t)(slot / DS_PROJ_COUNT);
    peft_slot_path(c, slot, s.path, sizeof s.path);
    ds_adapter_base_dims(c->base, s.proj, &s.in, &s.out);
    int parts[3];
    int32_t rows[3];
    const int n_parts = lm ? 1 : ds_adapter_module_parts(c->base, s.proj, parts, rows, &s.out);
    int rc = check_roles(c, &s);
    if (!rc) rc = check_rank(c, &s);
    if (!rc && s.rank == 0) return check_pruned(c, &s); /* a fully pruned AdaLoRA module adds nothing */
    if (rc) return rc;
    ds_lora_module *m = NULL;
    if ((rc = build_module(c, &s, &m))) return rc;
    if (n_parts > 1) {
        rc = split_module(c, &s, m, n_parts, parts, rows);
        ds_lora_module_free(m);
        return rc;
    }
    if (lm) c->a->lm_head = m;
    else c->a->lora[slot] = m;
    c->a->host_bytes += ds_lora_module_bytes(m);
    return 0;
}

/* LoRA on embed_tokens: lora_embedding_A [r, vocab], lora_embedding_B [d_model, r]; A is stored
 * transposed ([vocab][r]) so the shrink is a row gather by token id. */
static int load_embedding(peft_ctx *c) {
    if (!c->emb_A || !c->emb_B)
        return ds_err_set(c->err, DS_EFORMAT, "%s: embed_tokens LoRA needs both lora_embedding_A and lora_embedding_B",
                          c->st_path);
    const int32_t V = c->base->cfg.n_vocab, d = c->base->cfg.d_model;
    const ds_st_tensor *A = c->emb_A;
    if (A->n_dims != 2 || A->shape[0] < 1 || A->shape[0] > d || A->shape[1] != V)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must be [r, %d] with 1 <= r <= %d", c->st_path, A->name, V, d);
    slot_info s = {.slot = 0, .layer = -1, .proj = -1, .in = V, .out = d, .rank = (int32_t)A->shape[0]};
    snprintf(s.path, sizeof s.path, "model.embed_tokens");
    ds_lora_module *m = ds_lora_module_new(s.rank, V, d);
    float *a = NULL;
    if (!m) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
    int64_t sa[2] = {s.rank, V}, sb[2] = {d, s.rank};
    int rc = module_scale(c, &s, &m->scale);
    if (!rc) rc = peft_read(c, A, sa, 2, &a);
    if (!rc) rc = read_into(c, c->emb_B, sb, 2, m->B, (size_t)d * s.rank);
    for (int32_t k = 0; !rc && k < s.rank; k++)
        for (int32_t v = 0; v < V; v++) m->A[(size_t)v * s.rank + k] = a[(size_t)k * V + v];
    free(a);
    if (rc) {
        ds_lora_module_free(m);
        return rc;
    }
    c->a->embed = m;
    c->a->host_bytes += ds_lora_module_bytes(m);
    return 0;
}

int peft_load_lora(peft_ctx *c) {
    int rc = ds_adapter_alloc_lora_table(c->a, c->err);
    if (!rc) rc = peft_collect_slots(c);
    size_t used = 0;
    if (!rc && (c->emb_A || c->emb_B) && !(rc = load_embedding(c))) used++;
    for (size_t i = 0; !rc && i < c->n_slots; i++)
        if (slot_used(c, i) && !(rc = load_slot(c, i))) used++;
    if (!rc && used == 0)
        rc = ds_err_set(c->err, DS_EFORMAT, "%s: no %s tensors found", c->st_path, c->cfg->peft_type);
    return rc;
}
