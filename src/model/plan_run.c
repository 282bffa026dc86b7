/* The run half of the per-step adapter plan (include/ds/plan.h): each function is one backend op
 * per non-empty range the plan holds for this projection or site. The plan was built and uploaded
 * once for the step, so nothing here walks segments or adapters. */
#include "ds/plan.h"
#include "util/status.h"

const char *ds_proj_name(ds_proj p) {
    static const char *names[DS_PROJ_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};
    return (unsigned)p < DS_PROJ_COUNT ? names[p] : "?";
}

static bool active(const ds_plan *p) { return p && p->active; }

int ds_plan_upload(const ds_plan *p, ds_backend *b) {
    if (!active(p)) return DS_OK;
    if (!b->iface->plan_upload) return DS_EUNSUPPORTED;
    return b->iface->plan_upload(b->ctx, &p->tables);
}

/* One adapted projection (PEFT's order, ds_proj_plan). */
static int run_proj(const ds_plan *p, ds_backend *b, const ds_proj_plan *pp, const ds_mat *w, const float *bias,
                    const float *x, float *y, int32_t n) {
    const struct ds_backend_iface *f = b->iface;
    void *ctx = b->ctx;
    if ((pp->ia3_in.n || pp->dora.n || pp->ia3_out.n) && !f->seg_scale) return DS_EUNSUPPORTED;
    if (pp->ia3_in.n) { /* IA³ feed-forward side scales the projection's input: work on a copy */
        DS_TRY(f->copy(ctx, p->scratch, x, sizeof(float) * (size_t)n * w->cols));
        DS_TRY(f->seg_scale(ctx, p->scratch, w->cols, pp->ia3_in));
        x = p->scratch;
    }
    DS_TRY(f->matmul(ctx, x, w, pp->dora.n ? NULL : bias, y, n, false));
    if (pp->lora.n) {
        if (!f->lora) return DS_EUNSUPPORTED;
        DS_TRY(f->lora(ctx, x, w->cols, y, w->rows, pp->lora));
    }
    if (pp->lora_bias.n) {
        if (!f->seg_add) return DS_EUNSUPPORTED;
        DS_TRY(f->seg_add(ctx, y, w->rows, pp->lora_bias));
    }
    if (pp->sparse.n) {
        if (!f->sparse) return DS_EUNSUPPORTED;
        DS_TRY(f->sparse(ctx, x, w->cols, y, w->rows, pp->sparse));
    }
    if (pp->delta_bias.n) {
        if (!f->seg_add) return DS_EUNSUPPORTED;
        DS_TRY(f->seg_add(ctx, y, w->rows, pp->delta_bias));
    }
    if (pp->dora.n) {
        DS_TRY(f->seg_scale(ctx, y, w->rows, pp->dora));
        if (pp->bias.n) DS_TRY(f->seg_add(ctx, y, w->rows, pp->bias)); /* the base bias, after the scaling */
    }
    if (pp->ia3_out.n) DS_TRY(f->seg_scale(ctx, y, w->rows, pp->ia3_out));
    return DS_OK;
}

int ds_plan_linear(const ds_plan *p, ds_backend *b, int32_t layer, ds_proj proj, const ds_mat *w, const float *bias,
                   const float *x, float *y, int32_t n) {
    if (!active(p)) return b->iface->matmul(b->ctx, x, w, bias, y, n, false);
    return run_proj(p, b, &p->proj[(size_t)layer * DS_PROJ_COUNT + proj], w, bias, x, y, n);
}

int ds_plan_lm_head(const ds_plan *p, ds_backend *b, const ds_mat *output, const float *x, float *logits, int32_t n) {
    if (!active(p)) return b->iface->matmul(b->ctx, x, output, NULL, logits, n, false);
    return run_proj(p, b, &p->lm_head, output, NULL, x, logits, n);
}

int ds_plan_bottleneck(const ds_plan *p, ds_backend *b, int32_t layer, ds_bn_site site, const float *x, float *o,
                       int32_t d) {
    if (!active(p) || !p->bn) return DS_OK;
    const ds_seg_range r = p->bn[(size_t)layer * DS_BN_SITES + site];
    if (!r.n) return DS_OK;
    return b->iface->bottleneck ? b->iface->bottleneck(b->ctx, x, o, d, r) : DS_EUNSUPPORTED;
}

/* Embedding LoRA (PEFT Embedding.forward): rows of Aᵀ gathered by token id (the shrink), then
 * out += s · rows · Bᵀ, per segment. Soft-prompt rows are not token embeddings: their placeholder
 * ids get the delta too, but set_rows overwrites them afterwards. */
int ds_plan_embed(const ds_plan *p, ds_backend *b, const ds_mat *tok_embd, const int32_t *ids, float *out, int32_t n,
                  float embed_scale) {
    const struct ds_backend_iface *f = b->iface;
    const int32_t d = tok_embd->cols;
    DS_TRY(f->embed(b->ctx, tok_embd, ids, out, n));
    if (embed_scale > 0) {
        if (!f->scale) return DS_EUNSUPPORTED;
        DS_TRY(f->scale(b->ctx, out, embed_scale, (size_t)n * d));
    }
    if (!active(p)) return DS_OK;
    for (int32_t i = 0; i < p->n_embed; i++) {
        const ds_lora_seg *g = &p->embed[i];
        if (!f->lora_expand) return DS_EUNSUPPORTED;
        DS_TRY(f->get_rows(b->ctx, g->A, ids + g->start, p->scratch, g->len, g->rank));
        DS_TRY(f->lora_expand(b->ctx, p->scratch, g->rank, g->B, out + (size_t)g->start * d, d, g->len, g->scale));
    }
    if (p->n_soft > 0) DS_TRY(f->set_rows(b->ctx, out, d, p->soft_rows, p->soft_src, p->n_soft));
    return DS_OK;
}
