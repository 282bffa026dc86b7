/* deltaserve — internals shared by the training files (trainer.c, train_params.c,
 * train_forward.c, train_backward.c, optim.c, peft_save.c). One thread at a time per trainer. */
#ifndef DS_TRAIN_INTERNAL_H
#define DS_TRAIN_INTERNAL_H

#include "ds/backend.h"
#include "ds/train.h"


/* LoRA gradient slots: l·DS_PROJ_COUNT + p for the layers, then lm_head, then embed_tokens. */
#define TR_SLOT_HEAD(t) ((size_t)(t)->dim.L * DS_PROJ_COUNT)
#define TR_SLOT_EMBED(t) (TR_SLOT_HEAD(t) + 1)
#define TR_N_SLOTS(t) (TR_SLOT_HEAD(t) + 2)

/* Training compute runs through the backend's training-op table (ds/backend_train.h). */
typedef ds_train_attn_seq tr_attn_seq;
typedef ds_train_attn_args tr_attn_args;

typedef struct tr_dims {
    int32_t d, qd, kvd, ff, V, L, n_head, n_kv, hd;
    float eps;
} tr_dims;

/* One trainable tensor: the public view plus optimizer state. */
typedef struct tr_param {
    ds_train_tensor pub;
    char name[128];
    float *grad, *m, *v; /* [n] each: gradient, AdamW first and second moments */
} tr_param;

/* Activations of one layer that backward needs ([T] = rows of the micro-batch). */
typedef struct tr_act {
    float *h1, *r1;       /* attn RMSNorm output [T][d], inverse rms [T] */
    float *q, *k, *v;     /* [T][qd], [T][kvd] ×2 (q, k after RoPE) */
    float *lse;           /* [T][n_head] */
    float *att;           /* attention output, o_proj input [T][qd] */
    float *x_mid;         /* residual after attention [T][d] */
    float *h2, *r2;       /* ffn RMSNorm output [T][d], [T] */
    float *gate, *up;     /* pre-activation [T][ff] ×2 */
    float *act;           /* silu(gate)·up, down_proj input [T][ff] */
    float *u[DS_PROJ_COUNT]; /* LoRA shrink outputs x·Aᵀ [T][r] where adapted */
} tr_act;

/* The packed micro-batch: sequence s owns rows [seqs[s].row0, +len). The index arrays are
 * backend arrays, uploaded once per micro-batch by tr_pack from their host staging h_idx; seqs
 * is host memory (ds_train_attn_args.seqs is a HOST array). */
typedef struct tr_batch {
    int32_t n_rows, n_seqs;
    tr_attn_seq *seqs; /* [max_seqs] host */
    int32_t *src;      /* [rows] token id, or −(p+1) for prompt-tuning virtual row p */
    int32_t *pos;      /* [rows] RoPE positions */
    int32_t *lrow;     /* rows that have a target, ascending */
    int32_t *ltgt;     /* their targets */
    int32_t *h_idx;    /* host [4][max_rows]: src, pos, lrow, ltgt as tr_pack writes them */
    int32_t n_lrows;
} tr_batch;

/* Backend copies of a layer's fp32 vectors (NULL where the model has none). */
typedef struct tr_layer_vecs {
    float *attn_norm, *ffn_norm; /* [d] */
    float *bq, *bk, *bv;         /* [qd], [kvd], [kvd] or NULL */
} tr_layer_vecs;

/* Gradient work buffers, shared by every layer. */
typedef struct tr_grad_work {
    float *dx;         /* d loss / d residual stream [T][d] */
    float *dh;         /* d loss / d normed input [T][d] */
    float *dq, *dk, *dv, *datt; /* [T][qd], [T][kvd] ×2, [T][qd] */
    float *dgate, *dup, *dact;  /* [T][ff] ×3 */
    float *lora_tmp;   /* [T][r_max] */
    float *emb_u;      /* embed_tokens LoRA: gathered A rows [T][r_max] */
} tr_grad_work;

/* LM-head chunk buffers. */
typedef struct tr_head_work { /* C = head_rows */
    float *x, *hn, *rinv, *logits, *dhn, *u, *dx; /* [C][d], [C][d], [C], [C][V], [C][d], [C][r], [C][d] */
} tr_head_work;

/* A step in progress, advanced one bounded unit at a time (train_units.c). */
typedef enum { TR_PH_IDLE = 0, TR_PH_FWD, TR_PH_HEAD, TR_PH_BWD, TR_PH_APPLY } tr_phase;
typedef struct tr_run {
    tr_phase phase;
    ds_train_run what;
    const ds_train_example *ex; /* borrowed until the step ends */
    int32_t n, next_ex;         /* examples; the first not yet packed */
    int64_t n_labels;
    float scale;                /* 1 / n_labels */
    int32_t piece;              /* forward: next half-layer piece (tr_forward_pieces); backward:
                                 * pieces done from the top (tr_backward_piece) */
    int32_t low;                /* lowest layer the backward reaches (tr_backward_low) */
    int32_t head_row;           /* next label row of the head */
    double mb_loss, loss_sum;   /* CE of the micro-batch's head so far; of the finished ones */
    int32_t n_micro, n_units;
    double t0, busy;            /* begin time; seconds inside units */
    /* measured seconds per (piece · row) of forward / backward and per label row of the head
     * (exponential averages; 0 until measured): a unit takes as many as unit_seconds fits */
    double s_fwd, s_bwd, s_head;
} tr_run;

struct ds_trainer {
    const ds_model *m;
    ds_backend *be;           /* computes every op; every float / index buffer below is its memory
                               * (alloc / upload / download), never dereferenced on the host */
    const struct ds_backend_train_iface *op; /* be->iface->train */
    /* The frozen base weights as ds_mat handles of `be`, typed as the model holds them (CPU:
     * borrowed views, no copy): wm[l·DS_PROJ_COUNT + p], the embedding and the LM head. */
    ds_mat *wm;
    ds_mat wm_embed, wm_output;
    tr_layer_vecs *lv;        /* [L] host table of backend vectors (trainer.c upload_vectors) */
    float *output_norm, *inv_freq; /* backend copies: [d], [hd/2] */
    bool own_be;              /* created by the trainer (ds_train_params.backend NULL) */
    int op_rc;                /* first failing op's status since the last check, 0 if none */
    tr_dims dim;
    ds_train_params p;
    ds_adapter *ad;           /* owned: the HOST adapter, a mirror of res filled by tr_resident_sync */
    ds_adapter *res;          /* owned: the live parameters, ad's structure with backend arrays
                               * (train_resident.c); the ops read these */
    bool rslora;
    float alpha;              /* spec alpha for saving (0: derive) */
    tr_param *params;
    int32_t n_params;
    float **dA, **dB;         /* [TR_N_SLOTS] gradient arrays of each LoRA module (see TR_SLOT_*) */
    float *dprompt, *dprefix; /* prompt / prefix gradients */
    float **ddbias;           /* [L * DS_PROJ_COUNT] bias-delta gradients (BitFit) or NULL */
    float *ones;              /* [max_rows] of 1: Σ_t dy[t] as a GEMM (BitFit), or NULL */
    struct tr_dp *dp;         /* diff pruning's dense deltas and masks (train_dp.c), or NULL */
    int32_t r_max, n_virtual, n_prefix;
    /* activations: ck[l] = input of layer l (l = L: final hidden), [L+1][T][d] */
    float **ck;
    tr_act *acts;             /* [L] when saving everything, [1] when recomputing */
    int32_t n_acts;
    bool recompute;
    int32_t max_rows, max_seqs;
    tr_grad_work g;
    tr_head_work hw;
    float *attn_work;
    tr_batch b;
    void **allocs;            /* every float buffer above, for free */
    size_t n_allocs, cap_allocs;
    int64_t step;
    double accum_loss;        /* Σ CE of the current compute_grads */
    struct tr_bn_state *bn;   /* bottleneck adapters' saves and gradients (train_bn.c), or NULL */
    tr_run run;               /* the step in progress (ds_trainer_begin / ds_trainer_advance) */
    double unit_seconds;      /* target duration of one unit (ds_trainer_set_unit_target) */
    int32_t head_rows;        /* label rows the LM head takes at once (ds_train_params.head_rows) */
};

/* Calls training op `name` of the trainer's backend: TR_OP(t, mm_nt, x, w, y, ...). The first
 * failure is kept in t->op_rc and reported by the step (tr_op_check). */
#define TR_OP(t, name, ...) tr_op_note((t), (t)->op->name((t)->be->ctx, __VA_ARGS__))
static inline void tr_op_note(ds_trainer *t, int rc) {
    if (rc && !t->op_rc) t->op_rc = rc;
}
/* y = x·Wᵀ and dx (+)= dy·W through frozen weight w (the inference ops matmul / matmul_t). */
#define TR_MATMUL(t, x, w, y, n) tr_op_note((t), (t)->be->iface->matmul((t)->be->ctx, (x), (w), NULL, (y), (n), false))
#define TR_MATMUL_T(t, dy, w, dx, n, acc)                                                                         \
    tr_op_note((t), (t)->be->iface->matmul_t((t)->be->ctx, (dy), (w), (dx), (n), (acc)))
/* Handle of layer l's projection p. */
static inline const ds_mat *tr_wm(const ds_trainer *t, int32_t l, int p) { return &t->wm[(size_t)l * DS_PROJ_COUNT + p]; }
/* 0, or the kept op failure as an error (and clears it). */
int tr_op_check(ds_trainer *t, ds_err *err);

/* Backend (trainer.c): b, or a CPU backend of the trainer's own when b is NULL; DS_EUNSUPPORTED
 * when b has no training ops. tr_backend_detach frees an owned one. */
int tr_backend_attach(ds_trainer *t, ds_backend *b, ds_err *err);
void tr_backend_detach(ds_trainer *t);

/* Geometry and allocation (trainer.c). */
/* Zeroed backend memory (be->iface->alloc) owned by the trainer, released by ds_trainer_free; NULL
 * on OOM. */
void *tr_alloc_bytes(ds_trainer *t, size_t bytes);
float *tr_alloc(ds_trainer *t, size_t n);
const ds_lora_module *tr_lora(const ds_trainer *t, int32_t layer, int proj); /* proj DS_PROJ_COUNT = lm_head */
/* proj value naming embed_tokens in tr_module_path and the parameter table */
#define TR_PROJ_EMBED (DS_PROJ_COUNT + 1)

/* The resident adapter (train_resident.c). build: t->res from t->ad, uploaded (before
 * tr_params_build); remap: the parameter table's values become t->res's arrays (after it); sync:
 * downloads t->res into t->ad (before any host reader: save, snapshot, ds_trainer_adapter). */
int tr_resident_build(ds_trainer *t);
int tr_resident_remap(ds_trainer *t);
int tr_resident_sync(const ds_trainer *t);
void tr_resident_free(ds_trainer *t);
/* Parameter i's value / first moment / second moment / gradient to (write: upload) or from
 * (download) pub.n floats of host memory, any alignment: the jobs' resumable state (job_store.c). */
enum { TR_VALUE = 0, TR_M, TR_V, TR_GRAD };
int tr_param_io(const ds_trainer *t, int32_t i, int which, void *host, bool write);

/* Parameters (train_params.c). */
/* HF module path: "model.layers.3.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head". */
void tr_module_path(int32_t layer, int proj, char *buf, size_t cap);
int tr_params_build(ds_trainer *t, ds_err *err);
/* Appends a trainable tensor of value [s0] (nd 1) or [s0][s1] (nd 2) named `name` to t->params, with
 * zeroed gradient and moments from tr_alloc; the table must have room (tr_params_build sizes it for
 * LoRA, prompts and bias deltas; tr_params_grow adds more). Returns the gradient, NULL on OOM. */
float *tr_param_add(ds_trainer *t, const char *name, float *value, int nd, int64_t s0, int64_t s1);
/* Makes room for `extra` more entries in t->params (re-pointing the public names into the moved
 * entries): 0 or DS_ENOMEM. */
int tr_params_grow(ds_trainer *t, int32_t extra);
void tr_params_free(ds_trainer *t);
void tr_params_zero_grad(ds_trainer *t);
int tr_spec_adapter(const ds_model *m, const ds_train_adapter_spec *s, ds_adapter **out, ds_err *err);
int tr_check_trainable(const ds_adapter *a, const ds_model *m, ds_err *err);
ds_adapter *tr_adapter_clone(const ds_adapter *a, const char *name, ds_err *err);

/* Examples (train_step.c): validation (counting the label tokens) and packing examples [k, ...)
 * into t->b (returns the next unpacked index). */
int tr_check_batch(const ds_trainer *t, const ds_train_example *ex, int32_t n, int64_t *n_labels, ds_err *err);
int32_t tr_pack(ds_trainer *t, const ds_train_example *ex, int32_t n, int32_t k);
/* The update: clip the gradients and apply AdamW (train_step.c, ds_trainer_apply). */
int tr_apply(ds_trainer *t, ds_train_stats *stats, ds_err *err);

/* Forward / backward of one micro-batch (train_forward.c, train_backward.c). tr_forward is
 * tr_forward_embed then tr_forward_pieces (half layers) over every layer; tr_head is tr_head_begin then
 * tr_head_rows over every label row; tr_backward is tr_backward_layer from the top layer down to
 * tr_backward_low, then tr_backward_embed. The pieces let a step run in bounded units
 * (train_units.c) with exactly the same ops in the same order. */
void tr_forward(ds_trainer *t, bool save);
void tr_forward_embed(ds_trainer *t);
/* Forward pieces [p0, p1): piece 2l is layer l's attention block, 2l+1 its MLP block. */
void tr_forward_pieces(ds_trainer *t, int32_t p0, int32_t p1, bool save);
void tr_head_begin(ds_trainer *t, bool grad);
/* Label rows [r0, r1) of t->b (r0 a multiple of head_rows): adds each chunk's Σ CE to *loss. */
void tr_head_rows(ds_trainer *t, int32_t r0, int32_t r1, float scale, bool grad, double *loss);
int32_t tr_backward_low(const ds_trainer *t);
/* Layer l's backward in pieces: [recomputed attention block, recomputed MLP block,] MLP backward,
 * attention backward; tr_backward_layer runs them all. */
int32_t tr_backward_pieces_per_layer(const ds_trainer *t);
void tr_backward_piece(ds_trainer *t, int32_t l, int32_t low, int32_t piece);
void tr_backward_layer(ds_trainer *t, int32_t l, int32_t low);
void tr_backward_embed(ds_trainer *t);
/* LM head + masked CE on the label rows: returns Σ CE; with grad, writes d(scale·ΣCE)/d ck[L]
 * into g.dx (zero elsewhere) and accumulates the lm_head LoRA gradients. */
double tr_head(ds_trainer *t, float scale, bool grad);
void tr_backward(ds_trainer *t);
/* One layer forward from ck[l] into ck[l+1], saving into a (train_forward.c). */
void tr_layer_fwd(ds_trainer *t, int32_t l, tr_act *a);
void tr_layer_fwd_half(ds_trainer *t, int32_t l, int half, tr_act *a); /* 0: attention_block, 1: mlp_block */
tr_act *tr_act_of(ds_trainer *t, int32_t l);
tr_attn_args tr_attn_args_of(ds_trainer *t, int32_t l, tr_act *a);

/* Diff pruning (train_dp.c): hooks called only when t->dp is set. */
int tr_dp_check_spec(const ds_train_adapter_spec *s, ds_err *err);
int tr_dp_init(ds_trainer *t, const ds_train_adapter_spec *s, ds_err *err); /* 0 and no-op unless diff pruning */
void tr_dp_free(ds_trainer *t);
void tr_dp_fwd(ds_trainer *t, int32_t l, int p, const float *x, float *y); /* y += x·δᵀ */
/* dx += dy·δ (dx NULL: not needed), dδ += dyᵀ·x, zeroed outside the mask once it is fixed */
void tr_dp_bwd(ds_trainer *t, int32_t l, int p, const float *x, const float *dy, float *dx);
int tr_dp_sync(ds_trainer *t); /* after an update: fixes the mask when the warm-up is over */
bool tr_dp_masked(const ds_trainer *t);
ds_adapter *tr_dp_snapshot(const ds_trainer *t, const char *name, ds_err *err);
int tr_dp_save(const ds_trainer *t, const char *dir, const char *base_model_name_or_path, ds_err *err);
/* Bottleneck adapters (train_bn.c): one-line hooks in the files above, no-ops without a bottleneck.
 * Forward, after a sub-block's output projection wrote o and before the residual add:
 * tr_bn_attn_out (o = a->x_mid, x = ck[l]) and tr_bn_ffn_out (o = ck[l+1], x = a->x_mid) add the
 * adapter's U(z) into o. Backward, with g.dx = d loss / d(sub-block output + residual):
 * tr_bn_*_bwd at the start of the sub-block's backward, tr_bn_*_bwd_res right after its output
 * projection's input gradient (it routes d/dz to o or x per placement). */
void tr_bn_attn_out(ds_trainer *t, int32_t l, tr_act *a);
void tr_bn_ffn_out(ds_trainer *t, int32_t l, tr_act *a);
void tr_bn_attn_bwd(ds_trainer *t, int32_t l);
void tr_bn_attn_bwd_res(ds_trainer *t, int32_t l);
void tr_bn_ffn_bwd(ds_trainer *t, int32_t l);
void tr_bn_ffn_bwd_res(ds_trainer *t, int32_t l);
/* Fresh modules per spec->bn into a (tr_spec_adapter); the checks on an adapter to continue; the
 * deep copy of a->bn into d; the parameters, saves and gradients (tr_params_build) and their free. */
int tr_bn_spec(ds_adapter *a, const ds_model *m, const ds_train_adapter_spec *s, ds_err *err);
int tr_bn_check(const ds_adapter *a, const ds_model *m, ds_err *err);
int tr_bn_clone(ds_adapter *d, const ds_adapter *a);
int tr_bn_params_build(ds_trainer *t, ds_err *err);
void tr_bn_free(ds_trainer *t);
/* AdapterHub's non_linearity name of a trainable ds_act ("relu", "gelu", "gelu_new", "swish",
 * "tanh"), NULL for the others. */
const char *tr_bn_act_name(int32_t act);

/* AdamW + clipping (optim.c). */
double tr_grad_norm(ds_trainer *t);
void tr_clip(ds_trainer *t, double norm, float max_norm);
void tr_adamw(ds_trainer *t, float lr);

#endif
