/* ds_trainer: creation (buffers sized once for micro_batch_tokens: a step allocates nothing),
 * example validation, micro-batch packing, gradient accumulation, the masked mean loss.
 *
 * Memory: every buffer the ops touch is the backend's (tr_alloc: be->iface->alloc, zeroed,
 * released in ds_trainer_free), and the host never dereferences it. The host keeps only tables of
 * backend pointers (acts, ck, lv), the batch's staging arrays (uploaded once per micro-batch by
 * tr_pack) and the attention sequence table the interface takes from the host. The model's small
 * vectors are uploaded once here; the frozen projections are the backend's ds_mat handles. The
 * adapter's parameters, gradients and moments are resident too (train_resident.c): downloaded
 * only for a save, a snapshot, ds_trainer_adapter or the jobs' state (docs/ARCHITECTURE.md,
 * "What is resident where"; tests/unit/test_train_shim.c). */
#include "adapter/loader.h"
#include "train/train_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ds_train_adapter_spec ds_train_default_spec(ds_adapter_kind kind) {
    return (ds_train_adapter_spec){.kind = kind, .name = NULL, .r = 8, .lora_alpha = 16.0f, .use_rslora = false,
                                   .targets = kind == DS_ADAPTER_DELTA ? DS_TRAIN_TARGET_ALL_LINEAR /* BitFit */
                                                                       : DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_V),
                                   .n_virtual = 20, .init_std = 0.0f, .seed = 0, .density = 0.0f, .dp_warmup_steps = 1,
                                   .bias = false, .bn = ds_train_bn_default_opts()};
}

ds_train_params ds_train_default_params(void) {
    return (ds_train_params){.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f,
                             .schedule = DS_LR_LINEAR, .warmup_steps = 0, .total_steps = 0, .max_grad_norm = 1.0f,
                             .micro_batch_tokens = 512, .micro_batch_seqs = 0, .recompute = DS_RECOMPUTE_AUTO,
                             .activation_budget = (size_t)1 << 30, .unit_seconds = 0.01, .head_rows = 32, .backend = NULL};
}

/* Backend memory (zeroed, as ds_backend_iface.alloc promises), released with the trainer. */
void *tr_alloc_bytes(ds_trainer *t, size_t bytes) {
    if (t->n_allocs == t->cap_allocs) {
        size_t cap = t->cap_allocs ? 2 * t->cap_allocs : 64;
        void **na = realloc(t->allocs, cap * sizeof *na);
        if (!na) return NULL;
        t->allocs = na;
        t->cap_allocs = cap;
    }
    void *p = t->be->iface->alloc(t->be->ctx, bytes ? bytes : 1);
    if (p) t->allocs[t->n_allocs++] = p;
    return p;
}

float *tr_alloc(ds_trainer *t, size_t n) {
    size_t bytes;
    return ds_mul_ok(n, sizeof(float), &bytes) ? tr_alloc_bytes(t, bytes) : NULL;
}

/* n floats of host memory uploaded into a new backend buffer (NULL src: NULL, no buffer). */
static int upload_vec(ds_trainer *t, const float *src, size_t n, float **out) {
    *out = NULL;
    if (!src) return 0;
    if (!(*out = tr_alloc(t, n))) return DS_ENOMEM;
    return t->be->iface->upload(t->be->ctx, *out, src, n * sizeof(float));
}

/* The model's small fp32 vectors the training ops read (norm weights, q/k/v biases, RoPE inverse
 * frequencies): backend copies, uploaded once, as src/model/llama.c does for inference. */
static int upload_vectors(ds_trainer *t) {
    const ds_model *m = t->m;
    const ds_model_config *c = &m->cfg;
    if (!(t->lv = calloc((size_t)c->n_layer, sizeof *t->lv))) return DS_ENOMEM;
    int rc = upload_vec(t, m->output_norm, (size_t)c->d_model, &t->output_norm);
    if (!rc) rc = upload_vec(t, m->inv_freq, (size_t)c->head_dim / 2, &t->inv_freq);
    const size_t qd = (size_t)c->n_head * c->head_dim, kvd = (size_t)c->n_kv_head * c->head_dim;
    for (int32_t l = 0; l < c->n_layer && !rc; l++) {
        const ds_layer_weights *w = &m->layers[l];
        tr_layer_vecs *v = &t->lv[l];
        rc = upload_vec(t, w->attn_norm, (size_t)c->d_model, &v->attn_norm);
        if (!rc) rc = upload_vec(t, w->ffn_norm, (size_t)c->d_model, &v->ffn_norm);
        if (!rc) rc = upload_vec(t, w->bq, qd, &v->bq);
        if (!rc) rc = upload_vec(t, w->bk, kvd, &v->bk);
        if (!rc) rc = upload_vec(t, w->bv, kvd, &v->bv);
    }
    return rc;
}

static int check_params(const ds_train_params *p, ds_err *err) {
    if (!(p->lr >= 0) || !isfinite(p->lr)) return ds_err_set(err, DS_EINVAL, "learning rate must be >= 0");
    if (!(p->beta1 >= 0 && p->beta1 < 1) || !(p->beta2 >= 0 && p->beta2 < 1))
        return ds_err_set(err, DS_EINVAL, "AdamW betas must be in [0, 1)");
    if (!(p->eps > 0) || !(p->weight_decay >= 0) || !isfinite(p->weight_decay))
        return ds_err_set(err, DS_EINVAL, "AdamW eps must be > 0 and weight_decay >= 0");
    if (p->warmup_steps < 0 || p->total_steps < 0)
        return ds_err_set(err, DS_EINVAL, "warmup_steps and total_steps must be >= 0");
    if (isnan(p->max_grad_norm)) return ds_err_set(err, DS_EINVAL, "max_grad_norm must be a number");
    if (p->head_rows < 1 || p->head_rows > 4096)
        return ds_err_set(err, DS_EINVAL, "head_rows must be in [1, 4096]");
    if (p->micro_batch_tokens < 2 || p->micro_batch_tokens > (1 << 20) || p->micro_batch_seqs < 0)
        return ds_err_set(err, DS_EINVAL, "micro_batch_tokens must be in [2, 2^20], micro_batch_seqs >= 0");
    if ((unsigned)p->schedule > DS_LR_COSINE || (unsigned)p->recompute > DS_RECOMPUTE_ON)
        return ds_err_set(err, DS_EINVAL, "unknown schedule or recompute mode");
    return 0;
}

/* Floats of one layer's saved activations per row (tr_act). */
static size_t act_floats_per_row(const ds_trainer *t, const bool has_u[DS_PROJ_COUNT]) {
    const tr_dims *D = &t->dim;
    size_t n = 3 * (size_t)D->d + 2 + 2 * (size_t)D->qd + 2 * (size_t)D->kvd + (size_t)D->n_head + 3 * (size_t)D->ff;
    for (int p = 0; p < DS_PROJ_COUNT; p++) n += has_u[p] ? (size_t)t->r_max : 0;
    return n;
}

static int alloc_act(ds_trainer *t, tr_act *a, const bool has_u[DS_PROJ_COUNT]) {
    const tr_dims *D = &t->dim;
    const size_t T = (size_t)t->max_rows;
    float **f[] = {&a->h1, &a->x_mid, &a->h2, &a->r1, &a->r2, &a->q, &a->att, &a->k, &a->v, &a->lse,
                   &a->gate, &a->up, &a->act};
    const size_t w[] = {D->d, D->d, D->d, 1, 1, D->qd, D->qd, D->kvd, D->kvd, D->n_head, D->ff, D->ff, D->ff};
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++)
        if (!(*f[i] = tr_alloc(t, T * w[i]))) return DS_ENOMEM;
    for (int p = 0; p < DS_PROJ_COUNT; p++)
        if (has_u[p] && !(a->u[p] = tr_alloc(t, T * (size_t)t->r_max))) return DS_ENOMEM;
    return 0;
}

static int alloc_work(ds_trainer *t) {
    const tr_dims *D = &t->dim;
    const size_t T = (size_t)t->max_rows, C = (size_t)t->head_rows, R = (size_t)(t->r_max > 0 ? t->r_max : 1);
    tr_grad_work *g = &t->g;
    tr_head_work *h = &t->hw;
    float **f[] = {&g->dx, &g->dh, &g->dq, &g->datt, &g->dk, &g->dv, &g->dgate, &g->dup, &g->dact, &g->lora_tmp,
                   &g->emb_u, &h->x, &h->hn, &h->dhn, &h->dx, &h->rinv, &h->logits, &h->u};
    const size_t n[] = {T * D->d, T * D->d, T * D->qd, T * D->qd, T * D->kvd, T * D->kvd, T * D->ff, T * D->ff,
                        T * D->ff, (T > C ? T : C) * R, T * R, C * D->d, C * D->d, C * D->d, C * D->d, C, C * D->V,
                        C * R};
    for (size_t i = 0; i < sizeof n / sizeof n[0]; i++)
        if (!(*f[i] = tr_alloc(t, n[i]))) return DS_ENOMEM;
    const size_t attn_floats = t->op->attn_work_floats(t->be->ctx, t->max_rows, t->n_prefix, D->hd);
    if (!(t->attn_work = tr_alloc(t, attn_floats))) return DS_ENOMEM;
    /* the packed batch: host staging arrays written by tr_pack, uploaded once per micro-batch into
     * the backend arrays the ops read; seqs stays host (ds_train_attn_args.seqs is a HOST array) */
    tr_batch *b = &t->b;
    b->seqs = calloc((size_t)t->max_seqs, sizeof *b->seqs);
    b->h_idx = calloc(4 * T, sizeof *b->h_idx);
    int32_t **dev[] = {&b->src, &b->pos, &b->lrow, &b->ltgt};
    for (int i = 0; i < 4; i++)
        if (!(*dev[i] = tr_alloc_bytes(t, T * sizeof(int32_t)))) return DS_ENOMEM;
    return b->seqs && b->h_idx ? 0 : DS_ENOMEM;
}

/* Activations: per layer, or (recomputation) one shared set plus the per-layer inputs ck[]. */
static int alloc_acts(ds_trainer *t) {
    bool has_u[DS_PROJ_COUNT] = {0};
    for (int32_t l = 0; l < t->dim.L; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++) has_u[p] |= tr_lora(t, l, p) != NULL;
    const size_t per_layer = act_floats_per_row(t, has_u) * (size_t)t->max_rows * sizeof(float);
    t->recompute = t->p.recompute == DS_RECOMPUTE_ON ||
                   (t->p.recompute == DS_RECOMPUTE_AUTO && per_layer * (size_t)t->dim.L > t->p.activation_budget);
    t->n_acts = t->recompute ? 1 : t->dim.L;
    t->acts = calloc((size_t)t->n_acts, sizeof *t->acts); /* host tables of backend pointers */
    t->ck = calloc((size_t)(t->dim.L + 1), sizeof *t->ck);
    if (!t->acts || !t->ck) return DS_ENOMEM;
    for (int32_t l = 0; l <= t->dim.L; l++)
        if (!(t->ck[l] = tr_alloc(t, (size_t)t->max_rows * t->dim.d))) return DS_ENOMEM;
    for (int32_t i = 0; i < t->n_acts; i++)
        if (alloc_act(t, &t->acts[i], has_u)) return DS_ENOMEM;
    return 0;
}

int tr_backend_attach(ds_trainer *t, ds_backend *b, ds_err *err) {
    if (!b) {
        ds_backend_params bp = ds_backend_default_params();
        bp.n_threads = -1; /* the engine's thread settings stay as they are */
        if (!(b = ds_backend_cpu_create(&bp, err))) return DS_ENOMEM; /* its only failure */
        t->own_be = true;
    }
    t->be = b;
    if (!b->iface->train)
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "backend '%s' has no training ops (ds_backend_iface.train): fine-tuning runs on the "
                          "cpu backend",
                          b->iface->name);
    t->op = b->iface->train;
    if (!b->iface->matmul_t)
        return ds_err_set(err, DS_EUNSUPPORTED, "backend '%s' has no matmul_t: fine-tuning runs on the cpu backend",
                          b->iface->name);
    const ds_model *m = t->m;
    if (!m) return 0; /* a shell trainer for optimizer-only use (tests): no model weights */
    if (m->cfg.post_norms || m->cfg.ffn_act != DS_FFN_SILU || m->cfg.embed_scale > 0 || m->cfg.attn_scale > 0 ||
        m->cfg.final_softcap > 0 || m->cfg.rope_theta_swa > 0) /* train_forward.c / train_backward.c: Llama math */
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "fine-tuning a %s base (post norms, GeGLU, scaled embeddings, soft-capping) is not supported "
                          "yet; serving its adapters is",
                          m->cfg.arch_name);
    if (m->cfg.qk_norm) /* train_forward.c / train_backward.c have no q_norm / k_norm step yet */
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "fine-tuning a %s base (per-head q/k norms) is not supported yet; serving its adapters is",
                          m->cfg.arch_name);
    if (m->cfg.fused_qkv) /* peft_save.c writes q_proj/k_proj/... where PEFT expects qkv_proj / gate_up_proj */
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "fine-tuning a %s base (fused qkv_proj / gate_up_proj) is not supported yet; serving its "
                          "adapters is",
                          m->cfg.arch_name);
    if (m->cfg.sliding_window > 0) /* the training attention (cpu_train.c) is full causal */
        return ds_err_set(err, DS_EUNSUPPORTED,
                          "fine-tuning a base with sliding-window attention (%d positions) is not supported yet; "
                          "serving its adapters is",
                          m->cfg.sliding_window);
    const size_t nw = (size_t)m->cfg.n_layer * DS_PROJ_COUNT;
    if (!(t->wm = calloc(nw, sizeof *t->wm))) return ds_err_set(err, DS_ENOMEM, "out of memory");
    int rc = b->iface->mat_upload(b->ctx, &m->tok_embd, &t->wm_embed);
    if (!rc) rc = b->iface->mat_upload(b->ctx, &m->output, &t->wm_output);
    for (int32_t l = 0; l < m->cfg.n_layer && !rc; l++) {
        const ds_layer_weights *w = &m->layers[l];
        const ds_weight *src[DS_PROJ_COUNT] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
        for (int p = 0; p < DS_PROJ_COUNT && !rc; p++) rc = b->iface->mat_upload(b->ctx, src[p], &t->wm[(size_t)l * DS_PROJ_COUNT + p]);
    }
    if (!rc) rc = upload_vectors(t);
    if (rc) return ds_err_set(err, rc, "backend '%s': base weights for training: %s", b->iface->name, ds_strerror(rc));
    return 0;
}

void tr_backend_detach(ds_trainer *t) {
    if (t->be && t->wm) {
        for (size_t i = 0; i < (size_t)t->m->cfg.n_layer * DS_PROJ_COUNT; i++)
            if (t->wm[i].data) t->be->iface->mat_free(t->be->ctx, &t->wm[i]);
        if (t->wm_output.data) t->be->iface->mat_free(t->be->ctx, &t->wm_output);
        if (t->wm_embed.data) t->be->iface->mat_free(t->be->ctx, &t->wm_embed);
    }
    free(t->wm);
    free(t->lv); /* the vectors themselves are trainer buffers (t->allocs) */
    t->wm = NULL;
    t->lv = NULL;
    if (t->own_be) ds_backend_free(t->be);
    t->be = NULL;
    t->op = NULL;
    t->own_be = false;
}

int tr_op_check(ds_trainer *t, ds_err *err) {
    const int rc = t->op_rc;
    t->op_rc = 0;
    return rc ? ds_err_set(err, rc, "training op failed on backend '%s'", t->be->iface->name) : 0;
}

static ds_trainer *trainer_init(const ds_model *m, ds_adapter *ad, const ds_train_params *p,
                                const ds_train_adapter_spec *spec, ds_err *err) {
    ds_trainer *t = calloc(1, sizeof *t);
    if (!t) {
        ds_adapter_free(ad);
        ds_err_set(err, DS_ENOMEM, "out of memory");
        return NULL;
    }
    const ds_model_config *c = &m->cfg;
    t->m = m;
    t->ad = ad;
    t->p = *p;
    t->dim = (tr_dims){.d = c->d_model, .qd = c->n_head * c->head_dim, .kvd = c->n_kv_head * c->head_dim,
                       .ff = c->d_ff, .V = c->n_vocab, .L = c->n_layer, .n_head = c->n_head, .n_kv = c->n_kv_head,
                       .hd = c->head_dim, .eps = c->rms_eps};
    t->n_virtual = ad->prompt ? ad->n_virtual : 0;
    t->n_prefix = ad->prefix ? ad->n_virtual : 0;
    t->max_rows = p->micro_batch_tokens;
    t->max_seqs = p->micro_batch_seqs > 0 ? p->micro_batch_seqs : p->micro_batch_tokens;
    t->unit_seconds = p->unit_seconds;
    t->head_rows = p->head_rows;
    int rc = tr_backend_attach(t, p->backend, err);
    if (!rc && (rc = tr_resident_build(t))) /* the parameters, uploaded once (train_resident.c) */
        ds_err_set(err, rc, "backend '%s': uploading the adapter's parameters: %s", t->be->iface->name, ds_strerror(rc));
    if (!rc) rc = tr_params_build(t, err);
    if (!rc && (rc = tr_resident_remap(t))) ds_err_set(err, rc, "internal: a trainable array is not a parameter");
    if (!rc && spec) rc = tr_dp_init(t, spec, err); /* diff pruning's dense δ (train_dp.c) */
    if (!rc && (alloc_acts(t) || alloc_work(t)))
        rc = ds_err_set(err, DS_ENOMEM, "out of memory for training buffers (micro_batch_tokens %d)", t->max_rows);
    if (!rc && t->n_virtual >= t->max_rows)
        rc = ds_err_set(err, DS_EINVAL, "micro_batch_tokens %d leaves no room after %d virtual tokens", t->max_rows,
                        t->n_virtual);
    if (rc) {
        ds_trainer_free(t);
        return NULL;
    }
    return t;
}

ds_trainer *ds_trainer_create(const ds_model *base, const ds_train_adapter_spec *spec, const ds_train_params *params,
                              ds_err *err) {
    ds_train_params p = params ? *params : ds_train_default_params();
    if (!base || !spec) {
        ds_err_set(err, DS_EINVAL, "ds_trainer_create: no base model or spec");
        return NULL;
    }
    ds_adapter *ad = NULL;
    if (check_params(&p, err) || tr_spec_adapter(base, spec, &ad, err)) return NULL;
    ds_trainer *t = trainer_init(base, ad, &p, spec, err);
    if (t) {
        t->rslora = spec->use_rslora;
        t->alpha = spec->kind == DS_ADAPTER_LORA ? spec->lora_alpha : 0.0f;
    }
    return t;
}

ds_trainer *ds_trainer_create_from(const ds_model *base, const ds_adapter *init, bool use_rslora, float lora_alpha,
                                   const ds_train_params *params, ds_err *err) {
    ds_train_params p = params ? *params : ds_train_default_params();
    if (!base || !init) {
        ds_err_set(err, DS_EINVAL, "ds_trainer_create_from: no base model or adapter");
        return NULL;
    }
    if (check_params(&p, err) || tr_check_trainable(init, base, err)) return NULL;
    ds_adapter *ad = tr_adapter_clone(init, NULL, err);
    if (!ad) return NULL;
    if (ad->kind == DS_ADAPTER_LORA) snprintf(ad->peft_type, sizeof ad->peft_type, "LORA"); /* e.g. from GGUF */
    ds_trainer *t = trainer_init(base, ad, &p, NULL, err);
    if (t) {
        t->rslora = use_rslora;
        t->alpha = lora_alpha > 0 ? lora_alpha : 0.0f;
    }
    return t;
}

void ds_trainer_free(ds_trainer *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n_allocs; i++) t->be->iface->release(t->be->ctx, t->allocs[i]);
    free(t->allocs);
    free(t->acts);
    free(t->ck);
    free(t->b.seqs);
    free(t->b.h_idx);
    tr_params_free(t);
    tr_dp_free(t);
    tr_resident_free(t);
    tr_backend_detach(t);
    ds_adapter_free(t->ad);
    free(t);
}
