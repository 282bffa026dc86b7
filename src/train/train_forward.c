/* Training forward pass: the same math as src/model/llama.c (HF LlamaModel / Qwen2Model in fp32),
 * over a packed micro-batch without a KV cache, keeping what backward needs (tr_act), and the LM
 * head + masked cross-entropy over the label rows only. */
#include "train/train_internal.h"

#include <math.h>
#include <string.h>

tr_act *tr_act_of(ds_trainer *t, int32_t l) { return &t->acts[t->n_acts == 1 ? 0 : l]; }

const ds_lora_module *tr_lora(const ds_trainer *t, int32_t layer, int proj) {
    if (!t->res->lora && proj < DS_PROJ_COUNT) return NULL; /* resident modules: backend A, B */
    return proj == DS_PROJ_COUNT ? t->res->lm_head : t->res->lora[(size_t)layer * DS_PROJ_COUNT + proj];
}

/* y = x·Wᵀ (+ bias) (+ s·(x·Aᵀ)·Bᵀ, u = x·Aᵀ saved): PEFT adds the LoRA branch to the base output. */
static void linear(ds_trainer *t, int32_t l, int p, const float *bias, const float *x, float *y, float *u) {
    const int32_t n = t->b.n_rows, in = t->ad->proj_in[p], out = t->ad->proj_out[p];
    TR_MATMUL(t, x, tr_wm(t, l, p), y, n);
    if (bias) TR_OP(t, add_bias, y, bias, n, out);
    const ds_lora_module *m = tr_lora(t, l, p);
    if (m) TR_OP(t, lora_fwd, x, m->A, m->B, m->scale, u, y, n, in, out, m->rank);
    if (t->dp) tr_dp_fwd(t, l, p, x, y); /* diff pruning: y += x·δᵀ */
    const float *db =
        t->res->dbias && l >= 0 && p < DS_PROJ_COUNT ? t->res->dbias[(size_t)l * DS_PROJ_COUNT + p] : NULL;
    if (db) TR_OP(t, add_bias, y, db, n, out); /* BitFit: the bias delta (the bias itself on a bias-free base) */
}

/* Attention arguments of layer l; the prefix of layer l is K at column 2l·kvd, V at (2l+1)·kvd of
 * each row of ds_adapter.prefix [P][L][2][kvd] (PEFT's past_key_values layout, no RoPE). */
tr_attn_args tr_attn_args_of(ds_trainer *t, int32_t l, tr_act *a) {
    const tr_dims *D = &t->dim;
    tr_attn_args r = {.q = a->q, .k = a->k, .v = a->v, .out = a->att, .lse = a->lse, .seqs = t->b.seqs,
                      .n_seqs = t->b.n_seqs, .n_head = D->n_head, .n_kv = D->n_kv, .hd = D->hd,
                      .scale = 1.0f / sqrtf((float)D->hd), .work = t->attn_work};
    if (t->res->prefix) {
        r.n_prefix = t->n_prefix;
        r.p_stride = (size_t)D->L * 2 * D->kvd;
        r.pk = t->res->prefix + (size_t)l * 2 * D->kvd;
        r.pv = r.pk + D->kvd;
    }
    return r;
}

static void attention_block(ds_trainer *t, int32_t l, tr_act *a) {
    const tr_dims *D = &t->dim;
    const tr_layer_vecs *w = &t->lv[l];
    const int32_t n = t->b.n_rows;
    const float *x = t->ck[l];
    TR_OP(t, rmsnorm_fwd, x, w->attn_norm, a->h1, a->r1, n, D->d, D->eps);
    linear(t, l, DS_PROJ_Q, w->bq, a->h1, a->q, a->u[DS_PROJ_Q]);
    linear(t, l, DS_PROJ_K, w->bk, a->h1, a->k, a->u[DS_PROJ_K]);
    linear(t, l, DS_PROJ_V, w->bv, a->h1, a->v, a->u[DS_PROJ_V]);
    TR_OP(t, rope, a->q, t->b.pos, t->inv_freq, n, D->n_head, D->hd, +1);
    TR_OP(t, rope, a->k, t->b.pos, t->inv_freq, n, D->n_kv, D->hd, +1);
    tr_attn_args args = tr_attn_args_of(t, l, a);
    TR_OP(t, attention_fwd, &args);
    linear(t, l, DS_PROJ_O, NULL, a->att, a->x_mid, a->u[DS_PROJ_O]);
    tr_bn_attn_out(t, l, a); /* bottleneck adapter at the attention output (train_bn.c) */
    const size_t nd = (size_t)n * D->d;
    tr_op_note(t, t->be->iface->add(t->be->ctx, a->x_mid, x, nd)); /* residual */
}

static void mlp_block(ds_trainer *t, int32_t l, tr_act *a) {
    const tr_dims *D = &t->dim;
    const tr_layer_vecs *w = &t->lv[l];
    const int32_t n = t->b.n_rows;
    float *out = t->ck[l + 1];
    TR_OP(t, rmsnorm_fwd, a->x_mid, w->ffn_norm, a->h2, a->r2, n, D->d, D->eps);
    linear(t, l, DS_PROJ_GATE, NULL, a->h2, a->gate, a->u[DS_PROJ_GATE]);
    linear(t, l, DS_PROJ_UP, NULL, a->h2, a->up, a->u[DS_PROJ_UP]);
    TR_OP(t, silu_mul_fwd, a->gate, a->up, a->act, (size_t)n * D->ff); /* down(silu(gate x) ⊙ up x) */
    linear(t, l, DS_PROJ_DOWN, NULL, a->act, out, a->u[DS_PROJ_DOWN]);
    tr_bn_ffn_out(t, l, a); /* bottleneck adapter at the FFN output (train_bn.c) */
    const size_t nd = (size_t)n * D->d;
    tr_op_note(t, t->be->iface->add(t->be->ctx, out, a->x_mid, nd));
}

void tr_layer_fwd(ds_trainer *t, int32_t l, tr_act *a) {
    attention_block(t, l, a);
    mlp_block(t, l, a);
}

void tr_layer_fwd_half(ds_trainer *t, int32_t l, int half, tr_act *a) {
    if (half == 0) attention_block(t, l, a);
    else mlp_block(t, l, a);
}

void tr_forward_embed(ds_trainer *t) {
    TR_OP(t, embed, &t->wm_embed, t->res->prompt, t->b.src, t->ck[0], t->b.n_rows, t->dim.d);
    const ds_lora_module *e = t->res->embed;
    if (e)
        TR_OP(t, embed_lora_fwd, e->A, e->B, e->scale, t->b.src, t->g.emb_u, t->ck[0], t->b.n_rows, t->dim.d,
              e->rank);
}

void tr_forward_pieces(ds_trainer *t, int32_t p0, int32_t p1, bool save) {
    for (int32_t p = p0; p < p1; p++) {
        const int32_t l = p / 2;
        tr_layer_fwd_half(t, l, p % 2, save ? tr_act_of(t, l) : &t->acts[0]);
    }
}

void tr_forward(ds_trainer *t, bool save) {
    tr_forward_embed(t);
    tr_forward_pieces(t, 0, 2 * t->dim.L, save);
}

/* One chunk of label rows: final norm, logits (+ lm_head LoRA), CE; with grad the chunk's
 * d/d hidden goes to hw.dx. */
static double head_chunk(ds_trainer *t, const int32_t *rows, const int32_t *tgt, int32_t c, float scale, bool grad) {
    const tr_dims *D = &t->dim;
    tr_head_work *hw = &t->hw;
    const float *xL = t->ck[D->L];
    TR_OP(t, gather_rows, xL, rows, hw->x, c, D->d);
    TR_OP(t, rmsnorm_fwd, hw->x, t->output_norm, hw->hn, hw->rinv, c, D->d, D->eps);
    TR_MATMUL(t, hw->hn, &t->wm_output, hw->logits, c);
    const ds_lora_module *m = tr_lora(t, -1, DS_PROJ_COUNT);
    if (m) TR_OP(t, lora_fwd, hw->hn, m->A, m->B, m->scale, hw->u, hw->logits, c, D->d, D->V, m->rank);
    double loss = 0.0;
    TR_OP(t, cross_entropy, hw->logits, tgt, c, D->V, scale, grad, &loss);
    if (!grad) return loss;
    /* the output weight is frozen: input gradient only */
    TR_MATMUL_T(t, hw->logits, &t->wm_output, hw->dhn, c, false);
    if (m) {
        const size_t head = TR_SLOT_HEAD(t);
        TR_OP(t, lora_bwd, hw->hn, hw->u, m->A, m->B, m->scale, hw->logits, hw->dhn, t->dA[head], t->dB[head],
              t->g.lora_tmp, c, D->d, D->V, m->rank);
    }
    TR_OP(t, fill, hw->dx, (size_t)c * D->d, 0.0f);
    TR_OP(t, rmsnorm_bwd, hw->x, t->output_norm, hw->rinv, hw->dhn, hw->dx, c, D->d);
    return loss;
}

void tr_head_begin(ds_trainer *t, bool grad) {
    if (grad) TR_OP(t, fill, t->g.dx, (size_t)t->b.n_rows * t->dim.d, 0.0f);
}

void tr_head_rows(ds_trainer *t, int32_t r0, int32_t r1, float scale, bool grad, double *loss) {
    const tr_dims *D = &t->dim;
    const int32_t C = t->head_rows;
    for (int32_t i0 = r0; i0 < r1; i0 += C) {
        const int32_t c = r1 - i0 < C ? r1 - i0 : C;
        *loss += head_chunk(t, t->b.lrow + i0, t->b.ltgt + i0, c, scale, grad); /* chunk by chunk, however cut */
        if (!grad) continue;
        TR_OP(t, scatter_rows, t->hw.dx, t->b.lrow + i0, t->g.dx, c, D->d); /* each row appears once */
    }
}

double tr_head(ds_trainer *t, float scale, bool grad) {
    tr_head_begin(t, grad);
    double loss = 0.0;
    tr_head_rows(t, 0, t->b.n_lrows, scale, grad, &loss);
    return loss;
}
