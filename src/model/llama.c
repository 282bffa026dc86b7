/* The Llama-family forward pass, written once over ds_backend ops (docs/ARCHITECTURE.md, "The
 * backend interface and how to extend it"); adapters enter only as the step's plan (ds/plan.h).
 * Numerics follow HF transformers' LlamaModel / Qwen2Model in fp32. */
#include "ds/model.h"
#include "util/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct llama_layer {
    ds_mat wq, wk, wv, wo, w_gate, w_up, w_down;
    float *attn_norm, *ffn_norm, *bq, *bk, *bv; /* backend pointers */
    float *q_norm, *k_norm;                     /* Qwen3 / Gemma 3 per-head norms, or NULL */
    float *attn_post_norm, *ffn_post_norm;      /* Gemma 3, or NULL */
    float *k_pool, *v_pool;                     /* [n_blocks][block][n_kv*hd] */
} llama_layer;

/* Per-step activations and index arrays, sized for max_tokens / max_seqs at create time. */
typedef struct llama_work {
    float *x, *h, *q, *k, *v, *att, *gate, *up, *xo, *logits;
    int32_t *tokens, *pos, *tok_seq, *tok_nkv, *block_tables, *seq_prefix, *out_rows;
    int64_t *slots;
    int64_t *host_slots;
    int32_t *host_nkv;
} llama_work;

struct ds_llama {
    const ds_model *model;
    ds_backend *b;
    ds_llama_params p;
    ds_mat tok_embd, output;
    float *output_norm, *inv_freq, *inv_freq_swa; /* inv_freq_swa: sliding layers' RoPE, or NULL */
    llama_layer *layers;
    llama_work w;
    /* Partial rotary (cfg.n_rot < head_dim): each head is seen as K rows of `chunk` floats; the first R
     * rows (the n_rot rotated values) are gathered, roped as heads of n_rot, and gathered back, through
     * the backend's copy / get_rows / rope ops (rope_partial). */
    float *rot_buf;            /* [copy: G·K rows][rotated: G·R rows] of chunk floats, G = max_tokens·n_head */
    int32_t *rot_in, *rot_out; /* [G·R], [G·K] row indices into rot_buf */
    int32_t rot_chunk, rot_k, rot_r;
    void **allocs; /* every backend allocation, for free */
    size_t n_allocs, cap_allocs;
};

ds_llama_params ds_llama_default_params(void) {
    ds_llama_params p = {.max_tokens = 512, .max_seqs = 64, .kv_block_size = 16, .n_kv_blocks = 0,
                         .kv_bytes = (size_t)256 << 20, .max_blocks_per_seq = 0};
    return p;
}

#define IFACE(L) ((L)->b->iface)

static void *balloc(ds_llama *L, size_t bytes) {
    if (L->n_allocs == L->cap_allocs) {
        size_t cap = L->cap_allocs ? L->cap_allocs * 2 : 64;
        void **na = realloc(L->allocs, cap * sizeof *na);
        if (!na) return NULL;
        L->allocs = na;
        L->cap_allocs = cap;
    }
    void *p = IFACE(L)->alloc(L->b->ctx, bytes);
    if (p) L->allocs[L->n_allocs++] = p;
    return p;
}

/* Uploads a host fp32 vector into a fresh backend buffer. */
static float *upload_vec(ds_llama *L, const float *host, size_t n) {
    float *d = balloc(L, n * sizeof(float));
    if (d && IFACE(L)->upload(L->b->ctx, d, host, n * sizeof(float)) != DS_OK) return NULL;
    return d;
}

static int upload_layer(ds_llama *L, int32_t i, ds_err *err) {
    const ds_model_config *c = &L->model->cfg;
    const ds_layer_weights *w = &L->model->layers[i];
    llama_layer *l = &L->layers[i];
    const int32_t qd = c->n_head * c->head_dim, kvd = c->n_kv_head * c->head_dim;
    void *ctx = L->b->ctx;
    int st = IFACE(L)->mat_upload(ctx, &w->wq, &l->wq);
    if (!st) st = IFACE(L)->mat_upload(ctx, &w->wk, &l->wk);
    if (!st) st = IFACE(L)->mat_upload(ctx, &w->wv, &l->wv);
    if (!st) st = IFACE(L)->mat_upload(ctx, &w->wo, &l->wo);
    if (!st) st = IFACE(L)->mat_upload(ctx, &w->w_gate, &l->w_gate);
    if (!st) st = IFACE(L)->mat_upload(ctx, &w->w_up, &l->w_up);
    if (!st) st = IFACE(L)->mat_upload(ctx, &w->w_down, &l->w_down);
    if (st) return ds_err_set(err, st, "layer %d: weight upload failed (%s)", i, ds_strerror(st));
    l->attn_norm = upload_vec(L, w->attn_norm, (size_t)c->d_model);
    l->ffn_norm = upload_vec(L, w->ffn_norm, (size_t)c->d_model);
    if (!l->attn_norm || !l->ffn_norm) return ds_err_set(err, DS_EDEVICE, "layer %d: out of backend memory", i);
    if (w->bq) {
        l->bq = upload_vec(L, w->bq, (size_t)qd);
        l->bk = upload_vec(L, w->bk, (size_t)kvd);
        l->bv = upload_vec(L, w->bv, (size_t)kvd);
        if (!l->bq || !l->bk || !l->bv) return ds_err_set(err, DS_EDEVICE, "layer %d: out of backend memory", i);
    }
    if (w->q_norm) {
        l->q_norm = upload_vec(L, w->q_norm, (size_t)c->head_dim);
        l->k_norm = upload_vec(L, w->k_norm, (size_t)c->head_dim);
        if (!l->q_norm || !l->k_norm) return ds_err_set(err, DS_EDEVICE, "layer %d: out of backend memory", i);
    }
    if (w->attn_post_norm) {
        l->attn_post_norm = upload_vec(L, w->attn_post_norm, (size_t)c->d_model);
        l->ffn_post_norm = upload_vec(L, w->ffn_post_norm, (size_t)c->d_model);
        if (!l->attn_post_norm || !l->ffn_post_norm) return ds_err_set(err, DS_EDEVICE, "layer %d: out of backend memory", i);
    }
    return DS_OK;
}

static int32_t gcd32(int32_t a, int32_t b) {
    while (b) {
        const int32_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* The gather tables of rope_partial, for every head row g < G (a step uses a prefix of them). */
static int alloc_rope_partial(ds_llama *L, ds_err *err) {
    const ds_model_config *c = &L->model->cfg;
    if (!c->n_rot || c->n_rot == c->head_dim) return DS_OK;
    const int32_t chunk = gcd32(c->n_rot / 2, c->head_dim), K = c->head_dim / chunk, R = c->n_rot / chunk;
    const size_t G = (size_t)L->p.max_tokens * (size_t)c->n_head;
    int32_t *in = malloc(G * (size_t)R * 4), *out = malloc(G * (size_t)K * 4);
    if (G * (size_t)(K + R) > INT32_MAX || !in || !out) {
        free(in), free(out);
        return ds_err_set(err, DS_ENOMEM, "out of memory for partial rotary tables");
    }
    for (size_t g = 0; g < G; g++) {
        for (int32_t j = 0; j < R; j++) in[g * R + j] = (int32_t)(g * K + j);
        for (int32_t k = 0; k < K; k++) out[g * K + k] = (int32_t)(k < R ? G * K + g * R + k : g * K + k);
    }
    L->rot_chunk = chunk, L->rot_k = K, L->rot_r = R;
    L->rot_buf = balloc(L, G * (size_t)(K + R) * chunk * 4);
    L->rot_in = balloc(L, G * (size_t)R * 4);
    L->rot_out = balloc(L, G * (size_t)K * 4);
    int st = L->rot_buf && L->rot_in && L->rot_out ? DS_OK : DS_EDEVICE;
    if (!st) st = IFACE(L)->upload(L->b->ctx, L->rot_in, in, G * (size_t)R * 4);
    if (!st) st = IFACE(L)->upload(L->b->ctx, L->rot_out, out, G * (size_t)K * 4);
    free(in), free(out);
    return st ? ds_err_set(err, st, "out of backend memory for partial rotary") : DS_OK;
}

/* HF Phi-3 apply_rotary_pos_emb with rotary_dim < head_dim: rotate_half RoPE on each head's first
 * n_rot values (pairs i, i + n_rot/2), the rest unchanged. */
static int rope_partial(ds_llama *L, float *x, const float *inv_freq, int32_t T, int32_t n_head) {
    const struct ds_backend_iface *f = IFACE(L);
    void *ctx = L->b->ctx;
    const ds_model_config *c = &L->model->cfg;
    const size_t G = (size_t)L->p.max_tokens * (size_t)c->n_head, g = (size_t)T * (size_t)n_head;
    float *rot = L->rot_buf + G * (size_t)L->rot_k * L->rot_chunk;
    DS_TRY(f->copy(ctx, L->rot_buf, x, g * (size_t)c->head_dim * 4));
    DS_TRY(f->get_rows(ctx, L->rot_buf, L->rot_in, rot, (int32_t)(g * (size_t)L->rot_r), L->rot_chunk));
    DS_TRY(f->rope(ctx, rot, L->w.pos, inv_freq, T, n_head, c->n_rot));
    return f->get_rows(ctx, L->rot_buf, L->rot_out, x, (int32_t)(g * (size_t)L->rot_k), L->rot_chunk);
}

static int alloc_work(ds_llama *L, ds_err *err) {
    const ds_model_config *c = &L->model->cfg;
    const size_t T = (size_t)L->p.max_tokens, S = (size_t)L->p.max_seqs;
    const size_t qd = (size_t)c->n_head * c->head_dim, kvd = (size_t)c->n_kv_head * c->head_dim;
    llama_work *w = &L->w;
    w->x = balloc(L, T * c->d_model * 4);
    w->h = balloc(L, T * c->d_model * 4);
    w->q = balloc(L, T * qd * 4);
    w->k = balloc(L, T * kvd * 4);
    w->v = balloc(L, T * kvd * 4);
    w->att = balloc(L, T * qd * 4);
    w->gate = balloc(L, T * c->d_ff * 4);
    w->up = balloc(L, T * c->d_ff * 4);
    w->xo = balloc(L, T * c->d_model * 4);
    w->logits = balloc(L, (size_t)L->p.max_out * (size_t)c->n_vocab * 4); /* rows a step returns, not T */
    w->tokens = balloc(L, T * 4);
    w->pos = balloc(L, T * 4);
    w->tok_seq = balloc(L, T * 4);
    w->tok_nkv = balloc(L, T * 4);
    w->out_rows = balloc(L, T * 4);
    w->slots = balloc(L, T * 8);
    w->block_tables = balloc(L, S * (size_t)L->p.max_blocks_per_seq * 4);
    w->seq_prefix = balloc(L, S * 4);
    w->host_slots = malloc(T * 8);
    w->host_nkv = malloc(T * 4);
    if (!w->x || !w->h || !w->q || !w->k || !w->v || !w->att || !w->gate || !w->up || !w->xo || !w->logits ||
        !w->tokens || !w->pos || !w->tok_seq || !w->tok_nkv || !w->out_rows || !w->slots || !w->block_tables ||
        !w->seq_prefix || !w->host_slots || !w->host_nkv)
        return ds_err_set(err, DS_EDEVICE, "out of backend memory for activations (max_tokens %d)", L->p.max_tokens);
    return DS_OK;
}

static int alloc_kv(ds_llama *L, ds_err *err) {
    const ds_model_config *c = &L->model->cfg;
    const size_t row = (size_t)c->n_kv_head * c->head_dim;
    const size_t block_bytes = (size_t)L->p.kv_block_size * row * sizeof(float);
    if (L->p.n_kv_blocks <= 0) {
        size_t per_block_all_layers = block_bytes * 2 * (size_t)c->n_layer;
        size_t nb = L->p.kv_bytes / per_block_all_layers;
        if (nb > INT32_MAX / 2) nb = INT32_MAX / 2;
        L->p.n_kv_blocks = (int32_t)nb;
    }
    if (L->p.n_kv_blocks < 2) return ds_err_set(err, DS_EINVAL, "KV cache too small: %d blocks", L->p.n_kv_blocks);
    for (int32_t i = 0; i < c->n_layer; i++) {
        L->layers[i].k_pool = balloc(L, block_bytes * (size_t)L->p.n_kv_blocks);
        L->layers[i].v_pool = balloc(L, block_bytes * (size_t)L->p.n_kv_blocks);
        if (!L->layers[i].k_pool || !L->layers[i].v_pool)
            return ds_err_set(err, DS_EDEVICE, "out of backend memory for the KV cache (%d blocks)", L->p.n_kv_blocks);
    }
    return DS_OK;
}

static int llama_init(ds_llama *L, ds_err *err) {
    const ds_model *m = L->model;
    const ds_model_config *c = &m->cfg;
    const struct ds_backend_iface *f = IFACE(L);
    const char *need = c->embed_scale > 0 && !f->scale                         ? "scale"
                       : c->ffn_act == DS_FFN_GELU_TANH && !f->gelu_tanh_mul ? "gelu_tanh_mul"
                                                                              : NULL;
    if (need)
        return ds_err_set(err, DS_EUNSUPPORTED, "backend '%s' has no %s op, which a %s model needs", f->name, need,
                          c->arch_name);
    int st = IFACE(L)->mat_upload(L->b->ctx, &m->tok_embd, &L->tok_embd);
    if (st) return ds_err_set(err, st, "token embedding upload failed");
    if (m->output.data == m->tok_embd.data) {
        L->output = L->tok_embd;
        L->output.borrowed = true; /* freed once, through tok_embd */
    } else if ((st = IFACE(L)->mat_upload(L->b->ctx, &m->output, &L->output))) {
        return ds_err_set(err, st, "output weight upload failed");
    }
    L->output_norm = upload_vec(L, m->output_norm, (size_t)c->d_model);
    L->inv_freq = upload_vec(L, m->inv_freq, (size_t)c->head_dim / 2);
    if (!L->output_norm || !L->inv_freq) return ds_err_set(err, DS_EDEVICE, "out of backend memory");
    if (m->inv_freq_swa && !(L->inv_freq_swa = upload_vec(L, m->inv_freq_swa, (size_t)c->head_dim / 2)))
        return ds_err_set(err, DS_EDEVICE, "out of backend memory");
    L->layers = calloc((size_t)c->n_layer, sizeof *L->layers);
    if (!L->layers) return ds_err_set(err, DS_ENOMEM, "out of memory");
    for (int32_t i = 0; i < c->n_layer; i++)
        if ((st = upload_layer(L, i, err))) return st;
    if ((st = alloc_kv(L, err))) return st;
    if ((st = alloc_rope_partial(L, err))) return st;
    return alloc_work(L, err);
}

ds_llama *ds_llama_create(const ds_model *model, ds_backend *backend, const ds_llama_params *params,
                          ds_err *err) {
    ds_llama *L = calloc(1, sizeof *L);
    if (!L) {
        ds_err_set(err, DS_ENOMEM, "out of memory");
        return NULL;
    }
    L->model = model;
    L->b = backend;
    L->p = params ? *params : ds_llama_default_params();
    if (L->p.max_out <= 0 || L->p.max_out > L->p.max_tokens) L->p.max_out = L->p.max_tokens;
    if (L->p.max_tokens <= 0 || L->p.max_seqs <= 0 || L->p.kv_block_size <= 0) {
        ds_err_set(err, DS_EINVAL, "llama: max_tokens, max_seqs and kv_block_size must be positive");
        free(L);
        return NULL;
    }
    if (L->p.max_blocks_per_seq <= 0)
        L->p.max_blocks_per_seq = (model->cfg.max_ctx + L->p.kv_block_size - 1) / L->p.kv_block_size + 64;
    if (llama_init(L, err) != DS_OK) {
        ds_llama_free(L);
        return NULL;
    }
    return L;
}

void ds_llama_free(ds_llama *L) {
    if (!L) return;
    void *ctx = L->b->ctx;
    if (L->layers) {
        for (int32_t i = 0; i < L->model->cfg.n_layer; i++) {
            llama_layer *l = &L->layers[i];
            ds_mat *mats[] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
            for (size_t j = 0; j < sizeof mats / sizeof mats[0]; j++)
                if (mats[j]->data) IFACE(L)->mat_free(ctx, mats[j]);
        }
    }
    if (L->output.data && L->output.data != L->tok_embd.data) IFACE(L)->mat_free(ctx, &L->output);
    if (L->tok_embd.data) IFACE(L)->mat_free(ctx, &L->tok_embd);
    for (size_t i = 0; i < L->n_allocs; i++) IFACE(L)->release(ctx, L->allocs[i]);
    free(L->allocs);
    free(L->layers);
    free(L->w.host_slots);
    free(L->w.host_nkv);
    free(L);
}

/* Checks the batch against the limits and uploads its index arrays. */
static int upload_batch(ds_llama *L, const ds_batch *bt, ds_err *err) {
    const int32_t T = bt->n_tokens, S = bt->n_seqs, bs = L->p.kv_block_size, mb = bt->max_blocks;
    if (T <= 0 || T > L->p.max_tokens || S <= 0 || S > L->p.max_seqs || mb <= 0 || mb > L->p.max_blocks_per_seq ||
        bt->n_out < 0 || bt->n_out > T || bt->n_out > L->p.max_out)
        return ds_err_set(err, DS_EINVAL, "batch exceeds limits (tokens %d/%d, seqs %d/%d, blocks %d/%d, outputs %d/%d)",
                          T, L->p.max_tokens, S, L->p.max_seqs, mb, L->p.max_blocks_per_seq, bt->n_out, L->p.max_out);
    for (int32_t t = 0; t < T; t++) {
        const int32_t s = bt->tok_seq[t];
        if (s < 0 || s >= S || bt->tok_kv[t] < 0 || bt->tokens[t] < 0 || bt->tokens[t] >= L->model->cfg.n_vocab)
            return ds_err_set(err, DS_EINVAL, "batch token %d out of range", t);
        const int32_t pre = bt->seq_prefix ? bt->seq_prefix[s] : 0;
        const int32_t *tab = bt->block_tables + (size_t)s * mb;
        int32_t j = bt->tok_kv[t] < pre ? bt->tok_kv[t] : bt->tok_kv[t] - pre + ((pre + bs - 1) / bs) * bs;
        if (j / bs >= mb || tab[j / bs] < 0 || tab[j / bs] >= L->p.n_kv_blocks)
            return ds_err_set(err, DS_EINVAL, "batch token %d: KV slot outside its block table", t);
        L->w.host_slots[t] = ds_kv_slot(tab, pre, bs, bt->tok_kv[t]);
        L->w.host_nkv[t] = bt->tok_kv[t] + 1;
    }
    void *ctx = L->b->ctx;
    const struct ds_backend_iface *f = IFACE(L);
    int st = f->upload(ctx, L->w.tokens, bt->tokens, (size_t)T * 4);
    if (!st) st = f->upload(ctx, L->w.pos, bt->pos, (size_t)T * 4);
    if (!st) st = f->upload(ctx, L->w.tok_seq, bt->tok_seq, (size_t)T * 4);
    if (!st) st = f->upload(ctx, L->w.tok_nkv, L->w.host_nkv, (size_t)T * 4);
    if (!st) st = f->upload(ctx, L->w.slots, L->w.host_slots, (size_t)T * 8);
    if (!st) st = f->upload(ctx, L->w.block_tables, bt->block_tables, (size_t)S * mb * 4);
    if (!st && bt->seq_prefix) st = f->upload(ctx, L->w.seq_prefix, bt->seq_prefix, (size_t)S * 4);
    if (!st && bt->n_out) st = f->upload(ctx, L->w.out_rows, bt->out_rows, (size_t)bt->n_out * 4);
    return st ? ds_err_set(err, st, "batch upload failed") : DS_OK;
}

static int attention_block(ds_llama *L, int32_t il, const ds_batch *bt, const ds_plan *plan) {
    const ds_model_config *c = &L->model->cfg;
    const struct ds_backend_iface *f = IFACE(L);
    void *ctx = L->b->ctx;
    llama_layer *l = &L->layers[il];
    llama_work *w = &L->w;
    const int32_t T = bt->n_tokens, qd = c->n_head * c->head_dim, kvd = c->n_kv_head * c->head_dim;
    DS_TRY(f->rmsnorm(ctx, w->x, l->attn_norm, w->h, T, c->d_model, c->rms_eps));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_Q, &l->wq, l->bq, w->h, w->q, T));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_K, &l->wk, l->bk, w->h, w->k, T));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_V, &l->wv, l->bv, w->h, w->v, T));
    if (l->q_norm) { /* Qwen3: RMSNorm over each head's values (after adapters: they are part of q_proj) */
        DS_TRY(f->rmsnorm(ctx, w->q, l->q_norm, w->q, T * c->n_head, c->head_dim, c->rms_eps));
        DS_TRY(f->rmsnorm(ctx, w->k, l->k_norm, w->k, T * c->n_kv_head, c->head_dim, c->rms_eps));
    }
    const float *inv_freq = L->inv_freq_swa && ds_model_layer_sliding(c, il) ? L->inv_freq_swa : L->inv_freq;
    if (L->rot_buf) {
        DS_TRY(rope_partial(L, w->q, inv_freq, T, c->n_head));
        DS_TRY(rope_partial(L, w->k, inv_freq, T, c->n_kv_head));
    } else {
        DS_TRY(f->rope(ctx, w->q, w->pos, inv_freq, T, c->n_head, c->head_dim));
        DS_TRY(f->rope(ctx, w->k, w->pos, inv_freq, T, c->n_kv_head, c->head_dim));
    }
    DS_TRY(f->kv_store(ctx, l->k_pool, l->v_pool, w->k, w->v, w->slots, T, kvd));
    ds_attn_args a = {.q = w->q, .out = w->att, .k_cache = l->k_pool, .v_cache = l->v_pool, .n_tokens = T,
                      .n_head = c->n_head, .n_kv_head = c->n_kv_head, .head_dim = c->head_dim,
                      .block_size = L->p.kv_block_size, .tok_seq = w->tok_seq, .tok_nkv = w->tok_nkv,
                      .block_tables = w->block_tables, .seq_prefix = bt->seq_prefix ? w->seq_prefix : NULL,
                      .n_seqs = bt->n_seqs, .max_blocks = bt->max_blocks, .scale = c->attn_scale > 0 ? c->attn_scale : 1.0f / sqrtf((float)c->head_dim),
                      .window = ds_model_layer_window(c, il)};
    DS_TRY(f->attention(ctx, &a));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_O, &l->wo, NULL, w->att, w->h, T));
    if (l->attn_post_norm) DS_TRY(f->rmsnorm(ctx, w->h, l->attn_post_norm, w->h, T, c->d_model, c->rms_eps));
    DS_TRY(ds_plan_bottleneck(plan, L->b, il, DS_BN_ATTN, w->x, w->h, c->d_model));
    (void)qd;
    return f->add(ctx, w->x, w->h, (size_t)T * c->d_model);
}

static int mlp_block(ds_llama *L, int32_t il, const ds_batch *bt, const ds_plan *plan) {
    const ds_model_config *c = &L->model->cfg;
    const struct ds_backend_iface *f = IFACE(L);
    void *ctx = L->b->ctx;
    llama_layer *l = &L->layers[il];
    llama_work *w = &L->w;
    const int32_t T = bt->n_tokens;
    DS_TRY(f->rmsnorm(ctx, w->x, l->ffn_norm, w->h, T, c->d_model, c->rms_eps));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_GATE, &l->w_gate, NULL, w->h, w->gate, T));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_UP, &l->w_up, NULL, w->h, w->up, T));
    if (c->ffn_act == DS_FFN_GELU_TANH) DS_TRY(f->gelu_tanh_mul(ctx, w->gate, w->up, w->gate, (size_t)T * c->d_ff));
    else DS_TRY(f->silu_mul(ctx, w->gate, w->up, w->gate, (size_t)T * c->d_ff));
    DS_TRY(ds_plan_linear(plan, L->b, il, DS_PROJ_DOWN, &l->w_down, NULL, w->gate, w->h, T));
    if (l->ffn_post_norm) DS_TRY(f->rmsnorm(ctx, w->h, l->ffn_post_norm, w->h, T, c->d_model, c->rms_eps));
    DS_TRY(ds_plan_bottleneck(plan, L->b, il, DS_BN_FFN, w->x, w->h, c->d_model));
    return f->add(ctx, w->x, w->h, (size_t)T * c->d_model);
}

int ds_llama_forward(ds_llama *L, const ds_batch *bt, const ds_plan *plan, float *logits_out, ds_err *err) {
    const ds_model_config *c = &L->model->cfg;
    const struct ds_backend_iface *f = IFACE(L);
    void *ctx = L->b->ctx;
    llama_work *w = &L->w;
    int st = upload_batch(L, bt, err);
    if (st) return st;
    st = ds_plan_upload(plan, L->b); /* the step's adapter segment tables, once for every layer */
    if (!st) st = ds_plan_embed(plan, L->b, &L->tok_embd, w->tokens, w->x, bt->n_tokens, c->embed_scale);
    for (int32_t il = 0; !st && il < c->n_layer; il++) {
        st = attention_block(L, il, bt, plan);
        if (!st) st = mlp_block(L, il, bt, plan);
    }
    if (!st && bt->n_out > 0) {
        st = f->get_rows(ctx, w->x, w->out_rows, w->xo, bt->n_out, c->d_model);
        if (!st) st = f->rmsnorm(ctx, w->xo, L->output_norm, w->h, bt->n_out, c->d_model, c->rms_eps);
        if (!st) st = ds_plan_lm_head(plan, L->b, &L->output, w->h, w->logits, bt->n_out);
        if (!st) st = f->download(ctx, logits_out, w->logits, (size_t)bt->n_out * c->n_vocab * sizeof(float));
    }
    if (!st) st = f->synchronize(ctx);
    if (!st && c->final_softcap > 0) { /* Gemma3ForCausalLM: logits / cap, tanh, × cap (on the host copy) */
        const float cap = c->final_softcap;
        for (size_t i = 0; i < (size_t)bt->n_out * c->n_vocab; i++) logits_out[i] = tanhf(logits_out[i] / cap) * cap;
    }
    if (st) return ds_err_set(err, st, "forward failed: %s", ds_strerror(st));
    return DS_OK;
}

int32_t ds_llama_n_kv_blocks(const ds_llama *L) { return L->p.n_kv_blocks; }
int32_t ds_llama_kv_block_size(const ds_llama *L) { return L->p.kv_block_size; }
int32_t ds_llama_max_blocks_per_seq(const ds_llama *L) { return L->p.max_blocks_per_seq; }
ds_backend *ds_llama_backend(const ds_llama *L) { return L->b; }
const ds_model *ds_llama_model(const ds_llama *L) { return L->model; }

const float *ds_llama_proj_bias(const ds_llama *L, int32_t layer, ds_proj proj) {
    if (layer < 0 || layer >= L->model->cfg.n_layer) return NULL;
    const llama_layer *l = &L->layers[layer];
    return proj == DS_PROJ_Q ? l->bq : proj == DS_PROJ_K ? l->bk : proj == DS_PROJ_V ? l->bv : NULL;
}

int ds_llama_kv_write(ds_llama *L, int32_t layer, int64_t slot, const float *k, const float *v) {
    const ds_model_config *c = &L->model->cfg;
    const size_t row = (size_t)c->n_kv_head * c->head_dim;
    if (layer < 0 || layer >= c->n_layer || slot < 0 || slot >= (int64_t)L->p.n_kv_blocks * L->p.kv_block_size)
        return DS_EINVAL;
    const llama_layer *l = &L->layers[layer];
    int st = IFACE(L)->upload(L->b->ctx, l->k_pool + (size_t)slot * row, k, sizeof(float) * row);
    return st ? st : IFACE(L)->upload(L->b->ctx, l->v_pool + (size_t)slot * row, v, sizeof(float) * row);
}
