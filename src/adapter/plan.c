/* The plan half of the per-step adapter plan (include/ds/plan.h): once per step, the step's adapter
 * segments become per-(layer, projection) and per-(layer, site) segment tables, so that the
 * forward's ops only name ranges of tables uploaded once (FlashInfer's plan/run split). Every
 * array is sized at create for the largest step, so building allocates nothing. */
#include "ds/adapter.h"
#include "ds/model.h"

#include <stdlib.h>
#include <string.h>

typedef struct plan_store {
    ds_plan pub;             /* first: ds_plan * ↔ plan_store * */
    const ds_llama *L;
    ds_backend *b;
    int32_t max_segs, max_tokens;
    ds_proj_plan *proj;      /* [n_layer * DS_PROJ_COUNT] */
    ds_seg_range *bn_ranges; /* [n_layer * DS_BN_SITES] */
    ds_lora_seg *lora, *embed;
    ds_vec_seg *vec;
    ds_bn_seg *bn;
    ds_sparse_seg *sparse;
    ds_adapter_seg *out_segs; /* lm_head: the segments remapped to output rows */
    int32_t cap_lora, cap_vec, cap_bn, cap_sparse;
} plan_store;

/* Vector kinds of a projection (ds_proj_plan). */
typedef enum { VEC_IA3_IN, VEC_LORA_BIAS, VEC_DELTA_BIAS, VEC_DORA, VEC_IA3_OUT } vec_kind;

static const ds_lora_dev *lora_of(const ds_adapter_dev *d, int32_t layer, ds_proj proj) {
    if (layer < 0) return d->lm_head.rank ? &d->lm_head : NULL;
    const ds_lora_dev *l = d->lora ? &d->lora[(size_t)layer * DS_PROJ_COUNT + proj] : NULL;
    return l && l->rank ? l : NULL;
}

/* The vector of one kind an adapter has on (layer, proj), or NULL; *alpha its seg_add factor. */
static const float *vec_of(const ds_adapter_dev *d, int32_t layer, ds_proj proj, vec_kind k, float *alpha) {
    *alpha = 1.0f;
    if (k == VEC_IA3_IN || k == VEC_IA3_OUT) {
        if (layer < 0 || !d->ia3 || d->host->ia3_is_input[proj] != (k == VEC_IA3_IN)) return NULL;
        return d->ia3[(size_t)layer * DS_PROJ_COUNT + proj];
    }
    if (k == VEC_DELTA_BIAS) return layer >= 0 && d->dbias ? d->dbias[(size_t)layer * DS_PROJ_COUNT + proj] : NULL;
    const ds_lora_dev *m = lora_of(d, layer, proj);
    if (!m) return NULL;
    if (k == VEC_DORA) return m->dora_scale;
    *alpha = m->scale;
    return m->bias_B;
}

static ds_seg_range plan_vecs(plan_store *P, const ds_adapter_batch *ad, const ds_adapter_seg *segs, int32_t n,
                              int32_t layer, ds_proj proj, vec_kind k) {
    ds_seg_range r = {P->pub.tables.n_vec, 0};
    for (int32_t i = 0; i < n; i++) {
        float alpha;
        const float *v = vec_of(ad->slots[segs[i].slot], layer, proj, k, &alpha);
        if (v) P->vec[r.first + r.n++] = (ds_vec_seg){.start = segs[i].start, .len = segs[i].len, .v = v, .alpha = alpha};
    }
    P->pub.tables.n_vec += r.n;
    return r;
}

static ds_seg_range plan_loras(plan_store *P, const ds_adapter_batch *ad, const ds_adapter_seg *segs, int32_t n,
                               int32_t layer, ds_proj proj) {
    ds_seg_range r = {P->pub.tables.n_lora, 0};
    for (int32_t i = 0; i < n; i++) {
        const ds_lora_dev *m = lora_of(ad->slots[segs[i].slot], layer, proj);
        if (m)
            P->lora[r.first + r.n++] = (ds_lora_seg){.start = segs[i].start, .len = segs[i].len, .rank = m->rank,
                                                     .scale = m->scale, .A = m->A, .B = m->B};
    }
    P->pub.tables.n_lora += r.n;
    return r;
}

static ds_seg_range plan_sparse(plan_store *P, const ds_adapter_batch *ad, const ds_adapter_seg *segs, int32_t n,
                                int32_t layer, ds_proj proj) {
    ds_seg_range r = {P->pub.tables.n_sparse, 0};
    for (int32_t i = 0; i < n && layer >= 0; i++) {
        const ds_adapter_dev *d = ad->slots[segs[i].slot];
        const ds_sparse_seg *m = d->delta ? &d->delta[(size_t)layer * DS_PROJ_COUNT + proj] : NULL;
        if (!m || !m->rows) continue;
        ds_sparse_seg *e = &P->sparse[r.first + r.n++];
        *e = *m;
        e->start = segs[i].start;
        e->len = segs[i].len;
    }
    P->pub.tables.n_sparse += r.n;
    return r;
}

/* Everything projection (layer, proj) runs; layer < 0 is lm_head, whose rows are n_rows outputs. */
static ds_proj_plan plan_proj(plan_store *P, const ds_adapter_batch *ad, const ds_adapter_seg *segs, int32_t n,
                              int32_t layer, ds_proj proj, int32_t n_rows) {
    ds_proj_plan pp = {0};
    pp.ia3_in = plan_vecs(P, ad, segs, n, layer, proj, VEC_IA3_IN);
    pp.lora = plan_loras(P, ad, segs, n, layer, proj);
    pp.lora_bias = plan_vecs(P, ad, segs, n, layer, proj, VEC_LORA_BIAS);
    pp.sparse = plan_sparse(P, ad, segs, n, layer, proj);
    pp.delta_bias = plan_vecs(P, ad, segs, n, layer, proj, VEC_DELTA_BIAS);
    pp.dora = plan_vecs(P, ad, segs, n, layer, proj, VEC_DORA);
    const float *bias = layer >= 0 ? ds_llama_proj_bias(P->L, layer, proj) : NULL;
    pp.bias = (ds_seg_range){P->pub.tables.n_vec, 0};
    if (pp.dora.n && bias) { /* DoRA scales W x + ΔW x; the base bias comes after, on every row */
        P->vec[P->pub.tables.n_vec++] = (ds_vec_seg){.start = 0, .len = n_rows, .v = bias, .alpha = 1.0f};
        pp.bias.n = 1;
    }
    pp.ia3_out = plan_vecs(P, ad, segs, n, layer, proj, VEC_IA3_OUT);
    return pp;
}

static ds_seg_range plan_bn(plan_store *P, const ds_adapter_batch *ad, int32_t layer, ds_bn_site site) {
    ds_seg_range r = {P->pub.tables.n_bn, 0};
    for (int32_t i = 0; i < ad->n_segs; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        const ds_bn_seg *m = ad->slots[g->slot]->bn;
        if (!m || !m[(size_t)layer * DS_BN_SITES + site].size) continue;
        ds_bn_seg *e = &P->bn[r.first + r.n++];
        *e = m[(size_t)layer * DS_BN_SITES + site];
        e->start = g->start;
        e->len = g->len;
    }
    P->pub.tables.n_bn += r.n;
    return r;
}

/* lm_head rows are the batch's out_rows: each token segment becomes the output rows inside it
 * (both ascending). Returns the number of remapped segments in P->out_segs. */
static int32_t remap_to_outputs(plan_store *P, const ds_adapter_batch *ad, const ds_batch *bt) {
    int32_t k = 0, r = 0;
    for (int32_t i = 0; i < ad->n_segs && r < bt->n_out; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        while (r < bt->n_out && bt->out_rows[r] < g->start) r++;
        const int32_t r0 = r;
        while (r < bt->n_out && bt->out_rows[r] < g->start + g->len) r++;
        if (r > r0) P->out_segs[k++] = (ds_adapter_seg){.start = r0, .len = r - r0, .slot = g->slot};
    }
    return k;
}

int ds_adapter_plan_build(ds_plan *p, const ds_adapter_batch *ad, const ds_batch *bt) {
    plan_store *P = (plan_store *)p;
    const int32_t n_layer = p->n_layer, n_segs = ad ? ad->n_segs : 0;
    p->tables = (ds_seg_tables){.lora = P->lora, .vec = P->vec, .bn = P->bn, .sparse = P->sparse};
    p->n_embed = p->n_soft = 0;
    p->active = ad && (n_segs > 0 || ad->n_soft > 0);
    if (!p->active) return DS_OK;
    if (n_segs > P->max_segs || bt->n_tokens > P->max_tokens || ad->n_soft > P->max_tokens) return DS_EINVAL;
    for (int32_t i = 0; i < n_segs; i++)
        if (ad->segs[i].slot < 0 || !ad->slots[ad->segs[i].slot]) return DS_EINVAL;
    for (int32_t l = 0; l < n_layer; l++)
        for (int pr = 0; pr < DS_PROJ_COUNT; pr++)
            P->proj[(size_t)l * DS_PROJ_COUNT + pr] = plan_proj(P, ad, ad->segs, n_segs, l, (ds_proj)pr, bt->n_tokens);
    const int32_t n_out_segs = remap_to_outputs(P, ad, bt);
    p->lm_head = plan_proj(P, ad, P->out_segs, n_out_segs, -1, DS_PROJ_Q, bt->n_out);
    for (int32_t l = 0; l < n_layer; l++)
        for (int s = 0; s < DS_BN_SITES; s++) P->bn_ranges[(size_t)l * DS_BN_SITES + s] = plan_bn(P, ad, l, (ds_bn_site)s);
    for (int32_t i = 0; i < n_segs; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        const ds_lora_dev *m = &ad->slots[g->slot]->embed;
        if (m->rank)
            P->embed[p->n_embed++] = (ds_lora_seg){.start = g->start, .len = g->len, .rank = m->rank, .scale = m->scale,
                                                   .A = m->A, .B = m->B};
    }
    p->soft_rows = ad->soft_rows;
    p->soft_src = ad->soft_src;
    p->n_soft = ad->n_soft;
    return DS_OK;
}

ds_plan *ds_adapter_plan_create(const ds_llama *L, int32_t max_segs, int32_t max_tokens, ds_err *err) {
    const ds_model_config *c = &ds_llama_model(L)->cfg;
    if (max_segs <= 0 || max_tokens <= 0) {
        ds_err_set(err, DS_EINVAL, "adapter plan: max_segs and max_tokens must be positive");
        return NULL;
    }
    plan_store *P = calloc(1, sizeof *P);
    if (!P) {
        ds_err_set(err, DS_ENOMEM, "out of memory");
        return NULL;
    }
    const size_t n_proj = (size_t)c->n_layer * DS_PROJ_COUNT + 1; /* + lm_head */
    const size_t S = (size_t)max_segs, width = (size_t)(c->d_ff > c->d_model ? c->d_ff : c->d_model);
    P->L = L;
    P->b = ds_llama_backend(L);
    P->max_segs = max_segs;
    P->max_tokens = max_tokens;
    P->cap_lora = (int32_t)(n_proj * S);
    P->cap_vec = (int32_t)(n_proj * (5 * S + 1)); /* ds_proj_plan's five per-segment vec kinds + the bias */
    P->cap_sparse = (int32_t)(n_proj * S);
    P->cap_bn = (int32_t)((size_t)c->n_layer * DS_BN_SITES * S);
    P->proj = calloc(n_proj, sizeof *P->proj);
    P->bn_ranges = calloc((size_t)c->n_layer * DS_BN_SITES, sizeof *P->bn_ranges);
    P->lora = malloc(sizeof *P->lora * (size_t)P->cap_lora);
    P->embed = malloc(sizeof *P->embed * S);
    P->vec = malloc(sizeof *P->vec * (size_t)P->cap_vec);
    P->bn = malloc(sizeof *P->bn * (size_t)P->cap_bn);
    P->sparse = malloc(sizeof *P->sparse * (size_t)P->cap_sparse);
    P->out_segs = malloc(sizeof *P->out_segs * S);
    P->pub.scratch = P->b->iface->alloc(P->b->ctx, sizeof(float) * width * (size_t)max_tokens);
    P->pub.n_layer = c->n_layer;
    P->pub.proj = P->proj;
    P->pub.bn = P->bn_ranges;
    P->pub.embed = P->embed;
    if (!P->proj || !P->bn_ranges || !P->lora || !P->embed || !P->vec || !P->bn || !P->sparse || !P->out_segs || !P->pub.scratch) {
        ds_adapter_plan_free(&P->pub);
        ds_err_set(err, DS_ENOMEM, "out of memory for the adapter plan (%d segments, %d tokens)", max_segs, max_tokens);
        return NULL;
    }
    return &P->pub;
}

void ds_adapter_plan_free(ds_plan *p) {
    if (!p) return;
    plan_store *P = (plan_store *)p;
    if (p->scratch) P->b->iface->release(P->b->ctx, p->scratch);
    free(P->proj), free(P->bn_ranges), free(P->lora), free(P->embed), free(P->vec), free(P->bn), free(P->sparse), free(P->out_segs);
    free(P);
}
