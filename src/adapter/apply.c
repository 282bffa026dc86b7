/* Applies the step's adapters inside the forward pass (the hooks of adapter.h), and makes the
 * resident (backend) copies they read. Bottleneck adapters sit at the sub-block outputs instead of
 * inside a projection: one segmented backend op per site (ds_adapter_bottleneck).
 *
 * Per projection, the order follows PEFT: x' = x ⊙ l (IA³ feed-forward side); y = W x';
 * y += s·B(A x') per LoRA segment (one segmented op covering every segment); y += s·b_B (lora_bias);
 * DoRA: y = (m/‖W + sBA‖) ⊙ y; + bias; IA³ attention side: y = y ⊙ l. */
#include "ds/adapter.h"
#include "util/status.h"

#include <stdlib.h>
#include <string.h>

const char *ds_proj_name(ds_proj p) {
    static const char *names[DS_PROJ_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};
    return (unsigned)p < DS_PROJ_COUNT ? names[p] : "?";
}

static const ds_lora_dev *lora_of(const ds_adapter_batch *ad, int32_t slot, int32_t layer, ds_proj proj) {
    const ds_adapter_dev *d = ad->slots[slot];
    if (layer < 0) return d->lm_head.rank ? &d->lm_head : NULL;
    const ds_lora_dev *l = d->lora ? &d->lora[(size_t)layer * DS_PROJ_COUNT + proj] : NULL;
    return l && l->rank ? l : NULL;
}

static const float *ia3_of(const ds_adapter_batch *ad, int32_t slot, int32_t layer, ds_proj proj, bool input) {
    const ds_adapter_dev *d = ad->slots[slot];
    if (layer < 0 || !d->ia3 || d->host->ia3_is_input[proj] != input) return NULL;
    return d->ia3[(size_t)layer * DS_PROJ_COUNT + proj];
}

/* Gathers the segments of one kind for (layer, proj) into vec_tmp; returns their count. */
typedef const float *(*vec_pick)(const ds_adapter_batch *, int32_t, int32_t, ds_proj);

static const float *pick_ia3_in(const ds_adapter_batch *ad, int32_t s, int32_t l, ds_proj p) { return ia3_of(ad, s, l, p, true); }
static const float *pick_ia3_out(const ds_adapter_batch *ad, int32_t s, int32_t l, ds_proj p) { return ia3_of(ad, s, l, p, false); }
static const float *pick_dora(const ds_adapter_batch *ad, int32_t s, int32_t l, ds_proj p) {
    const ds_lora_dev *m = lora_of(ad, s, l, p);
    return m ? m->dora_scale : NULL;
}
static const float *pick_lbias(const ds_adapter_batch *ad, int32_t s, int32_t l, ds_proj p) {
    const ds_lora_dev *m = lora_of(ad, s, l, p);
    return m ? m->bias_B : NULL;
}

static int32_t gather_vecs(const ds_adapter_batch *ad, int32_t layer, ds_proj proj, vec_pick pick) {
    int32_t n = 0;
    for (int32_t i = 0; i < ad->n_segs; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        const float *v = pick(ad, g->slot, layer, proj);
        if (!v) continue;
        float alpha = 1.0f;
        if (pick == pick_lbias) alpha = lora_of(ad, g->slot, layer, proj)->scale;
        ad->vec_tmp[n++] = (ds_vec_seg){.start = g->start, .len = g->len, .v = v, .alpha = alpha};
    }
    return n;
}

static int32_t gather_lora(const ds_adapter_batch *ad, int32_t layer, ds_proj proj) {
    int32_t n = 0;
    for (int32_t i = 0; i < ad->n_segs; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        const ds_lora_dev *m = lora_of(ad, g->slot, layer, proj);
        if (!m) continue;
        ad->lora_tmp[n++] = (ds_lora_seg){.start = g->start, .len = g->len, .rank = m->rank, .scale = m->scale,
                                          .A = m->A, .B = m->B};
    }
    return n;
}

/* Full adapted projection; layer < 0 means lm_head (LoRA only). */
static int adapted_linear(const ds_adapter_batch *ad, ds_backend *b, int32_t layer, ds_proj proj, const ds_mat *w,
                          const float *bias, const float *x, float *y, int32_t n) {
    const struct ds_backend_iface *f = b->iface;
    void *ctx = b->ctx;
    int32_t k = gather_vecs(ad, layer, proj, pick_ia3_in);
    if (k) { /* IA³ feed-forward side scales the projection's input: work on a copy */
        DS_TRY(f->copy(ctx, ad->scratch, x, sizeof(float) * (size_t)n * w->cols));
        DS_TRY(f->seg_scale(ctx, ad->scratch, w->cols, ad->vec_tmp, k));
        x = ad->scratch;
    }
    const int32_t n_dora = gather_vecs(ad, layer, proj, pick_dora);
    DS_TRY(f->matmul(ctx, x, w, n_dora ? NULL : bias, y, n, false));
    if ((k = gather_lora(ad, layer, proj))) {
        if (!f->lora) return DS_EUNSUPPORTED;
        DS_TRY(f->lora(ctx, x, w->cols, y, w->rows, ad->lora_tmp, k));
    }
    if ((k = gather_vecs(ad, layer, proj, pick_lbias))) DS_TRY(f->seg_add(ctx, y, w->rows, ad->vec_tmp, k));
    if (n_dora) {
        k = gather_vecs(ad, layer, proj, pick_dora);
        DS_TRY(f->seg_scale(ctx, y, w->rows, ad->vec_tmp, k));
        if (bias) {
            ds_vec_seg all = {.start = 0, .len = n, .v = bias, .alpha = 1.0f};
            DS_TRY(f->seg_add(ctx, y, w->rows, &all, 1));
        }
    }
    if ((k = gather_vecs(ad, layer, proj, pick_ia3_out))) DS_TRY(f->seg_scale(ctx, y, w->rows, ad->vec_tmp, k));
    return DS_OK;
}

int ds_adapter_linear(const ds_adapter_batch *ad, ds_backend *b, int32_t layer, ds_proj proj, const ds_mat *w,
                      const float *bias, const float *x, float *y, int32_t n) {
    if (!ad || ad->n_segs == 0) return b->iface->matmul(b->ctx, x, w, bias, y, n, false);
    return adapted_linear(ad, b, layer, proj, w, bias, x, y, n);
}

/* Embedding LoRA (PEFT Embedding.forward): rows of Aᵀ gathered by token id (the shrink), then
 * out += s · rows · Bᵀ, per segment. Soft-prompt rows are not token embeddings: their placeholder
 * ids get the delta too, but set_rows overwrites them afterwards. */
static int embed_lora(const ds_adapter_batch *ad, ds_backend *b, const int32_t *ids, float *out, int32_t d) {
    const struct ds_backend_iface *f = b->iface;
    for (int32_t i = 0; i < ad->n_segs; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        const ds_lora_dev *m = &ad->slots[g->slot]->embed;
        if (!m->rank) continue;
        if (!f->lora_expand) return DS_EUNSUPPORTED;
        DS_TRY(f->get_rows(b->ctx, m->A, ids + g->start, ad->scratch, g->len, m->rank));
        DS_TRY(f->lora_expand(b->ctx, ad->scratch, m->rank, m->B, out + (size_t)g->start * d, d, g->len, m->scale));
    }
    return DS_OK;
}

int ds_adapter_embed(const ds_adapter_batch *ad, ds_backend *b, const ds_mat *tok_embd, const int32_t *ids,
                     float *out, int32_t n) {
    DS_TRY(b->iface->embed(b->ctx, tok_embd, ids, out, n));
    if (ad && ad->n_segs > 0) DS_TRY(embed_lora(ad, b, ids, out, tok_embd->cols));
    if (ad && ad->n_soft > 0) DS_TRY(b->iface->set_rows(b->ctx, out, tok_embd->cols, ad->soft_rows, ad->soft_src, ad->n_soft));
    return DS_OK;
}

/* lm_head rows are the batch's out_rows: remap each token segment to the output rows inside it
 * (both ascending), then apply like any projection (layer -1 selects the lm_head module). */
int ds_adapter_lm_head(const ds_adapter_batch *ad, ds_backend *b, const ds_mat *output, const float *x,
                       float *logits, int32_t n, const int32_t *out_rows) {
    if (!ad || ad->n_segs == 0) return b->iface->matmul(b->ctx, x, output, NULL, logits, n, false);
    ds_adapter_seg stack[64], *segs = ad->n_segs <= 64 ? stack : malloc(sizeof *segs * (size_t)ad->n_segs);
    if (!segs) return DS_ENOMEM;
    int32_t k = 0, r = 0;
    for (int32_t i = 0; i < ad->n_segs && r < n; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        while (r < n && out_rows[r] < g->start) r++;
        const int32_t r0 = r;
        while (r < n && out_rows[r] < g->start + g->len) r++;
        if (r > r0) segs[k++] = (ds_adapter_seg){.start = r0, .len = r - r0, .slot = g->slot};
    }
    ds_adapter_batch rows = *ad;
    rows.segs = segs;
    rows.n_segs = k;
    int st = adapted_linear(&rows, b, -1, DS_PROJ_Q, output, NULL, x, logits, n);
    if (segs != stack) free(segs);
    return st;
}

/* ---- bottleneck adapters ---- */

int ds_adapter_bottleneck(const ds_adapter_batch *ad, ds_backend *b, int32_t layer, ds_bn_site site, const float *x,
                          float *o, int32_t n) {
    (void)n;
    if (!ad || ad->n_segs == 0) return DS_OK;
    ds_bn_seg stack[64], *segs = stack;
    int32_t k = 0, d = 0;
    for (int32_t i = 0; i < ad->n_segs; i++) {
        const ds_adapter_seg *g = &ad->segs[i];
        const ds_bn_seg *m = ad->slots[g->slot]->bn;
        if (!m || !m[(size_t)layer * DS_BN_SITES + site].size) continue;
        d = ad->slots[g->slot]->host->d_model;
        if (k == 64 && segs == stack) { /* more segments than a default engine step has: heap, this step only */
            if (!(segs = malloc(sizeof *segs * (size_t)ad->n_segs))) return DS_ENOMEM;
            memcpy(segs, stack, sizeof stack);
        }
        segs[k] = m[(size_t)layer * DS_BN_SITES + site];
        segs[k].start = g->start;
        segs[k++].len = g->len;
    }
    int st = DS_OK;
    if (k) st = b->iface->bottleneck ? b->iface->bottleneck(b->ctx, x, o, d, segs, k) : DS_EUNSUPPORTED;
    if (segs != stack) free(segs);
    return st;
}

/* ---- resident copies ---- */

static float *dev_copy(ds_backend *b, ds_adapter_dev *d, const float *host, size_t n) {
    if (d->n_allocs == d->cap_allocs) {
        size_t cap = d->cap_allocs ? d->cap_allocs * 2 : 32;
        void **na = realloc(d->allocs, cap * sizeof *na);
        if (!na) return NULL;
        d->allocs = na;
        d->cap_allocs = cap;
    }
    float *p = b->iface->alloc(b->ctx, n * sizeof(float));
    if (!p) return NULL;
    d->allocs[d->n_allocs++] = p;
    d->dev_bytes += n * sizeof(float);
    if (b->iface->upload(b->ctx, p, host, n * sizeof(float)) != DS_OK) return NULL;
    return p;
}

static int upload_lora(ds_backend *b, ds_adapter_dev *d, const ds_lora_module *m, ds_lora_dev *out) {
    out->rank = m->rank;
    out->scale = m->scale;
    out->A = dev_copy(b, d, m->A, (size_t)m->rank * m->in);
    out->B = dev_copy(b, d, m->B, (size_t)m->out * m->rank);
    if (!out->A || !out->B) return DS_EDEVICE;
    if (m->bias_B && !(out->bias_B = dev_copy(b, d, m->bias_B, (size_t)m->out))) return DS_EDEVICE;
    if (m->dora_scale && !(out->dora_scale = dev_copy(b, d, m->dora_scale, (size_t)m->out))) return DS_EDEVICE;
    return DS_OK;
}

static int upload_bn(ds_backend *b, const ds_adapter *a, ds_adapter_dev *d) {
    const size_t n = (size_t)a->n_layer * DS_BN_SITES;
    if (!(d->bn = calloc(n, sizeof *d->bn))) return DS_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const ds_bn_module *m = a->bn[i];
        if (!m) continue;
        const size_t D = (size_t)m->d, S = (size_t)m->size;
        ds_bn_seg *g = &d->bn[i];
        *g = (ds_bn_seg){.size = m->size, .act = m->act, .flags = m->flags, .scale = m->scale};
        g->down = dev_copy(b, d, m->down, S * D);
        g->down_b = dev_copy(b, d, m->down_b, S);
        g->up = dev_copy(b, d, m->up, D * S);
        g->up_b = dev_copy(b, d, m->up_b, D);
        if (!g->down || !g->down_b || !g->up || !g->up_b) return DS_EDEVICE;
        const float *const src[] = {m->scale_vec, m->ln_b_w, m->ln_b_b, m->ln_a_w, m->ln_a_b};
        const float **dst[] = {&g->scale_vec, &g->ln_b_w, &g->ln_b_b, &g->ln_a_w, &g->ln_a_b};
        for (size_t j = 0; j < sizeof src / sizeof *src; j++)
            if (src[j] && !(*dst[j] = dev_copy(b, d, src[j], D))) return DS_EDEVICE;
    }
    return DS_OK;
}

static int upload_all(ds_backend *b, const ds_adapter *a, ds_adapter_dev *d) {
    const size_t n_mod = (size_t)a->n_layer * DS_PROJ_COUNT;
    if (a->lora) {
        if (!(d->lora = calloc(n_mod, sizeof *d->lora))) return DS_ENOMEM;
        for (size_t i = 0; i < n_mod; i++)
            if (a->lora[i]) DS_TRY(upload_lora(b, d, a->lora[i], &d->lora[i]));
    }
    if (a->bn) DS_TRY(upload_bn(b, a, d));
    if (a->lm_head) DS_TRY(upload_lora(b, d, a->lm_head, &d->lm_head));
    if (a->embed) DS_TRY(upload_lora(b, d, a->embed, &d->embed)); /* A is [in=n_vocab][rank]: same count */
    if (a->ia3) {
        if (!(d->ia3 = calloc(n_mod, sizeof *d->ia3))) return DS_ENOMEM;
        for (size_t i = 0; i < n_mod; i++) {
            if (!a->ia3[i]) continue;
            const ds_proj p = (ds_proj)(i % DS_PROJ_COUNT);
            const size_t len = (size_t)(a->ia3_is_input[p] ? a->proj_in[p] : a->proj_out[p]);
            if (!(d->ia3[i] = dev_copy(b, d, a->ia3[i], len))) return DS_EDEVICE;
        }
    }
    if (a->n_virtual > 0 && a->prompt) {
        if (!(d->prompt_rows = calloc((size_t)a->n_virtual, sizeof *d->prompt_rows))) return DS_ENOMEM;
        float *rows = dev_copy(b, d, a->prompt, (size_t)a->n_virtual * a->d_model);
        if (!rows) return DS_EDEVICE;
        for (int32_t i = 0; i < a->n_virtual; i++) d->prompt_rows[i] = rows + (size_t)i * a->d_model;
    }
    return DS_OK;
}

/* The optional backend op an adapter needs and the backend lacks, or NULL: checked before the
 * adapter becomes resident, so a backend without an op refuses the adapter's requests with a clear
 * error instead of failing a forward pass shared with other requests. */
static const char *missing_op(const struct ds_backend_iface *f, const ds_adapter *a) {
    bool lora = a->lm_head != NULL, dora = false, bias = false, ia3 = a->ia3 != NULL;
    for (size_t i = 0; a->lora && i < (size_t)a->n_layer * DS_PROJ_COUNT; i++)
        if (a->lora[i]) {
            lora = true;
            dora |= a->lora[i]->dora_scale != NULL;
            bias |= a->lora[i]->bias_B != NULL;
        }
    if (lora && !f->lora) return "lora (segmented LoRA)";
    if (a->embed && !f->lora_expand) return "lora_expand (LoRA on embed_tokens)";
    if ((dora || ia3) && !f->seg_scale) return "seg_scale (DoRA / IA3)";
    if (bias && !f->seg_add) return "seg_add (lora_bias)";
    if (a->prompt && !f->set_rows) return "set_rows (prompt tuning)";
    if (a->bn && !f->bottleneck) return "bottleneck (bottleneck adapters)";
    return NULL;
}

int ds_adapter_dev_upload(ds_backend *b, const ds_adapter *a, ds_adapter_dev *out, ds_err *err) {
    memset(out, 0, sizeof *out);
    out->host = a;
    const char *op = missing_op(b->iface, a);
    if (op)
        return ds_err_set(err, DS_EUNSUPPORTED, "adapter '%s' needs the %s op, which the %s backend does not have yet",
                          a->name ? a->name : "?", op, b->iface->name);
    int st = upload_all(b, a, out);
    if (st) {
        ds_adapter_dev_release(b, out);
        return ds_err_set(err, st, "adapter '%s': upload to the %s backend failed (%s)", a->name ? a->name : "?",
                          b->iface->name, ds_strerror(st));
    }
    return DS_OK;
}

void ds_adapter_dev_release(ds_backend *b, ds_adapter_dev *d) {
    for (size_t i = 0; i < d->n_allocs; i++) b->iface->release(b->ctx, d->allocs[i]);
    free(d->allocs);
    free(d->lora);
    free(d->ia3);
    free(d->prompt_rows);
    free(d->bn);
    memset(d, 0, sizeof *d);
}
