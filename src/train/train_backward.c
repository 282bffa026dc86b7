/* Training backward pass: from d loss / d final hidden (tr_head) back through every frozen layer.
 * Only adapter tensors receive gradients (LoRA A/B, prompt rows, prefix K/V, BitFit bias deltas); base weights are
 * read-only inputs of the input-gradient GEMMs (dx = dy·W). Below the lowest layer that holds a
 * trainable tensor nothing is computed (prompt tuning needs dx all the way to the embeddings). */
#include "train/train_internal.h"

#include <string.h>

/* dx (+)= dy·W through projection p of layer l (l = -1, p = DS_PROJ_COUNT: lm_head), plus the
 * LoRA gradients dA, dB when the projection is adapted. dx NULL: input gradient not needed. */
static void linear_bwd(ds_trainer *t, int32_t l, int p, const float *x, const float *u, const float *dy, float *dx,
                       bool acc) {
    const int32_t n = t->b.n_rows, in = t->ad->proj_in[p], out = t->ad->proj_out[p];
    if (dx) TR_MATMUL_T(t, dy, tr_wm(t, l, p), dx, n, acc);
    if (t->dp) tr_dp_bwd(t, l, p, x, dy, dx); /* diff pruning: dx += dy·δ, dδ += dyᵀx */
    float *ddb = t->ddbias && l >= 0 && p < DS_PROJ_COUNT ? t->ddbias[(size_t)l * DS_PROJ_COUNT + p] : NULL;
    if (ddb) TR_OP(t, mm_tn, dy, t->ones, ddb, n, out, 1, 1.0f, 1.0f); /* d b += Σ_t dy[t] */
    const ds_lora_module *m = tr_lora(t, l, p);
    if (!m) return;
    const size_t i = (size_t)l * DS_PROJ_COUNT + (size_t)p;
    TR_OP(t, lora_bwd, x, u, m->A, m->B, m->scale, dy, dx, t->dA[i], t->dB[i], t->g.lora_tmp, n, in, out,
          m->rank);
}

/* g.dx: d/d(layer output) on entry, d/d x_mid on exit. */
static void mlp_bwd(ds_trainer *t, int32_t l, tr_act *a) {
    const tr_dims *D = &t->dim;
    const tr_layer_vecs *w = &t->lv[l];
    tr_grad_work *g = &t->g;
    const int32_t n = t->b.n_rows;
    tr_bn_ffn_bwd(t, l); /* bottleneck adapter (train_bn.c) */
    linear_bwd(t, l, DS_PROJ_DOWN, a->act, a->u[DS_PROJ_DOWN], g->dx, g->dact, false);
    tr_bn_ffn_bwd_res(t, l);
    TR_OP(t, silu_mul_bwd, a->gate, a->up, g->dact, g->dgate, g->dup, (size_t)n * D->ff);
    linear_bwd(t, l, DS_PROJ_GATE, a->h2, a->u[DS_PROJ_GATE], g->dgate, g->dh, false);
    linear_bwd(t, l, DS_PROJ_UP, a->h2, a->u[DS_PROJ_UP], g->dup, g->dh, true);
    TR_OP(t, rmsnorm_bwd, a->x_mid, w->ffn_norm, a->r2, g->dh, g->dx, n, D->d); /* + the residual path's dx */
}

/* g.dx: d/d x_mid on entry, d/d(layer input) on exit when need_dx. */
static void attention_bwd(ds_trainer *t, int32_t l, tr_act *a, bool need_dx) {
    const tr_dims *D = &t->dim;
    const tr_layer_vecs *w = &t->lv[l];
    tr_grad_work *g = &t->g;
    const int32_t n = t->b.n_rows;
    tr_bn_attn_bwd(t, l); /* bottleneck adapter (train_bn.c) */
    linear_bwd(t, l, DS_PROJ_O, a->att, a->u[DS_PROJ_O], g->dx, g->datt, false);
    tr_bn_attn_bwd_res(t, l);
    TR_OP(t, fill, g->dk, (size_t)n * D->kvd, 0.0f);
    TR_OP(t, fill, g->dv, (size_t)n * D->kvd, 0.0f);
    tr_attn_args args = tr_attn_args_of(t, l, a);
    float *dpk = NULL, *dpv = NULL;
    if (t->dprefix) {
        dpk = t->dprefix + (size_t)l * 2 * D->kvd;
        dpv = dpk + D->kvd;
    }
    TR_OP(t, attention_bwd, &args, g->datt, g->dq, g->dk, g->dv, dpk, dpv);
    /* RoPE backward: rotate by −θ */
    TR_OP(t, rope, g->dq, t->b.pos, t->inv_freq, n, D->n_head, D->hd, -1);
    TR_OP(t, rope, g->dk, t->b.pos, t->inv_freq, n, D->n_kv, D->hd, -1);
    float *dh = need_dx ? g->dh : NULL;
    linear_bwd(t, l, DS_PROJ_Q, a->h1, a->u[DS_PROJ_Q], g->dq, dh, false);
    linear_bwd(t, l, DS_PROJ_K, a->h1, a->u[DS_PROJ_K], g->dk, dh, true);
    linear_bwd(t, l, DS_PROJ_V, a->h1, a->u[DS_PROJ_V], g->dv, dh, true);
    if (need_dx) TR_OP(t, rmsnorm_bwd, t->ck[l], w->attn_norm, a->r1, g->dh, g->dx, n, D->d);
}

/* Lowest layer holding a trainable tensor (prompt rows / prefixes / embedding LoRA: 0). */
int32_t tr_backward_low(const ds_trainer *t) {
    if (t->ad->prompt || t->ad->prefix || t->ad->embed || !t->ad->lora) return 0;
    for (int32_t l = 0; l < t->dim.L; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++)
            if (tr_lora(t, l, p)) return l;
    return t->dim.L; /* lm_head only */
}

int32_t tr_backward_pieces_per_layer(const ds_trainer *t) { return t->recompute ? 4 : 2; }

void tr_backward_piece(ds_trainer *t, int32_t l, int32_t low, int32_t piece) {
    const bool input_grad = t->ad->prompt || t->ad->embed; /* d loss / d embeddings needed */
    tr_act *a = tr_act_of(t, l);
    if (t->recompute) { /* activation recomputation from checkpoint ck[l], half a layer at a time */
        if (piece < 2) {
            tr_layer_fwd_half(t, l, piece, a);
            return;
        }
        piece -= 2;
    }
    if (piece == 0) mlp_bwd(t, l, a);
    else attention_bwd(t, l, a, l > low || input_grad);
}

void tr_backward_layer(ds_trainer *t, int32_t l, int32_t low) {
    for (int32_t p = 0; p < tr_backward_pieces_per_layer(t); p++) tr_backward_piece(t, l, low, p);
}

void tr_backward_embed(ds_trainer *t) {
    if (t->ad->prompt) TR_OP(t, embed_bwd_soft, t->b.src, t->g.dx, t->dprompt, t->b.n_rows, t->dim.d);
    const ds_lora_module *e = t->res->embed;
    if (e)
        TR_OP(t, embed_lora_bwd, e->B, e->scale, t->b.src, t->g.emb_u, t->g.dx, t->dA[TR_SLOT_EMBED(t)],
              t->dB[TR_SLOT_EMBED(t)], t->g.lora_tmp, t->b.n_rows, t->dim.d, e->rank);
}

void tr_backward(ds_trainer *t) {
    const int32_t low = tr_backward_low(t);
    for (int32_t l = t->dim.L - 1; l >= low; l--) tr_backward_layer(t, l, low);
    tr_backward_embed(t);
}
