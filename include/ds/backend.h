/* deltaserve — the backend interface (ggml-backend / SQLite-VFS style).
 *
 * The forward pass (src/model/llama.c) is written once over these ops. All tensor pointers given
 * to ops are BACKEND pointers (host memory for the CPU backend, device memory for CUDA) obtained
 * from alloc() or mat_upload(); the forward never dereferences them. Small per-step index arrays
 * are uploaded once per step with upload(), and the step's adapter segment tables once with
 * plan_upload() (the plan/run split of FlashInfer: the segmented ops then only take ranges of them).
 *
 * Activations are fp32, row-major. Weights are ds_mat handles made from typed host weights
 * (ds/weight.h); their storage format is the backend's business (CPU: the model's own blocks,
 * borrowed, computed on directly; CUDA: bf16 copies). Every matmul accumulates in fp32.
 *
 * Threading: a backend is used by one thread at a time (the engine thread). Every op returns 0 or
 * a negative DS_E* (DS_EDEVICE for device failures, incl. device OOM) — ops never abort. */
#ifndef DS_BACKEND_H
#define DS_BACKEND_H

#include "ds/backend_train.h"
#include "ds/common.h"
#include "ds/weight.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DS_BACKEND_IFACE_VERSION 4

/* A weight matrix in backend memory: logical shape [rows][cols] (torch [out][in]), row r at
 * data + r·row_bytes, in the backend's storage dtype (CPU: the model's own format, borrowed;
 * CUDA: bf16). */
typedef struct ds_mat {
    void *data;
    int32_t rows, cols;
    ds_dtype dtype;
    size_t row_bytes;
    bool borrowed; /* data belongs to someone else (CPU backend: the ds_model) */
    void *aux;     /* the backend's own companion of data, freed by mat_free whether or not data is
                    * borrowed (CPU int8 mode: Q4_K rows repacked into 8-row tiles), or NULL */
} ds_mat;

/* One LoRA-family segment: tokens [start, start+len) of the batch share these adapter weights.
 * y[t] += scale * B · (A · x[t])  for t in the segment. Pointers are backend pointers. */
typedef struct ds_lora_seg {
    int32_t start, len;
    int32_t rank;
    float scale;
    const float *A; /* [rank][in] */
    const float *B; /* [out][rank] */
} ds_lora_seg;

/* A per-segment vector op: rows [start, start+len) of y with vector v (backend pointer). */
typedef struct ds_vec_seg {
    int32_t start, len;
    const float *v;
    float alpha; /* seg_add only */
} ds_vec_seg;

/* Paged attention over a KV pool. Logical KV slot i of sequence s lives at
 * ds_kv_slot(block_table_s, prefix_s, block_size, i). The first prefix_s logical slots are an
 * adapter's prefix-tuning K/V (shared blocks at the head of the block table, last one possibly
 * partial); the sequence's own tokens start on the next block boundary. */
typedef struct ds_attn_args {
    const float *q;              /* [n_tokens][n_head][head_dim], RoPE applied */
    float *out;                  /* [n_tokens][n_head][head_dim] */
    const float *k_cache;        /* this layer: [n_blocks][block_size][n_kv_head][head_dim] */
    const float *v_cache;
    int32_t n_tokens, n_head, n_kv_head, head_dim, block_size;
    const int32_t *tok_seq;      /* [n_tokens] sequence index (backend ptr) */
    const int32_t *tok_nkv;      /* [n_tokens] logical KV slots this token attends to (backend ptr) */
    const int32_t *block_tables; /* [n_seqs][max_blocks] physical block ids (backend ptr) */
    const int32_t *seq_prefix;   /* [n_seqs] prefix slots per sequence (backend ptr) */
    int32_t n_seqs, max_blocks;
    float scale;                 /* 1/sqrt(head_dim) */
    int32_t window;              /* sliding window: a token attends to its last `window` logical slots
                                  * (itself included, prefix slots counted as earlier positions, as HF
                                  * masks past_key_values); 0 = all of [0, tok_nkv) */
} ds_attn_args;

/* Physical slot index (block*block_size + offset) of logical KV slot i. */
static inline int64_t ds_kv_slot(const int32_t *block_table, int32_t n_prefix, int32_t block_size, int32_t i) {
    int32_t j = i;
    if (i >= n_prefix) j = i - n_prefix + ((n_prefix + block_size - 1) / block_size) * block_size;
    return (int64_t)block_table[j / block_size] * block_size + j % block_size;
}

/* Activations of bottleneck adapters (AdapterHub `non_linearity`, transformers' ACT2FN names). */
typedef enum {
    DS_ACT_IDENTITY = 0, /* "linear", null */
    DS_ACT_RELU,
    DS_ACT_RELU2,        /* relu(x)² */
    DS_ACT_RELU6,        /* min(max(x, 0), 6) */
    DS_ACT_LEAKY_RELU,   /* slope 0.01 */
    DS_ACT_GELU,         /* x·Φ(x), erf form */
    DS_ACT_GELU_10,      /* clip(gelu(x), -10, 10) */
    DS_ACT_GELU_TANH,    /* 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))) */
    DS_ACT_GELU_FAST,    /* 0.5x(1 + tanh(0.7978845608·x·(1 + 0.044715x²))) */
    DS_ACT_QUICK_GELU,   /* x·σ(1.702x) */
    DS_ACT_SILU,         /* x·σ(x) ("swish") */
    DS_ACT_SIGMOID,
    DS_ACT_TANH,
    DS_ACT_MISH,         /* x·tanh(softplus(x)) */
    DS_ACT_LAPLACE,      /* 0.5(1 + erf((x − 0.707107) / (0.282095·√2))) */
} ds_act;

/* act(x) on the host, fp32 as torch computes it (src/backend/act.c). Any thread. */
float ds_act_eval(ds_act a, float x);

/* Residual placement of a bottleneck segment (ds_bn_seg.flags). */
enum {
    DS_BN_PARALLEL = 1u << 0,      /* parallel adapter (input x, output beside o), else sequential */
    DS_BN_IN_PLUS_X = 1u << 1,     /* sequential: adapter input a = o + x (original_ln_before), else a = o */
    DS_BN_RES_INPUT = 1u << 2,     /* sequential: the adapter's own residual is a (residual_before_ln false), else o */
    DS_BN_RES_BEFORE_LN = 1u << 3, /* that residual is added inside ln_after (adapter_residual_before_ln) */
    DS_BN_ADD_X = 1u << 4,         /* the sub-block's residual x is added after the adapter (original_ln_after) */
};

/* One bottleneck segment: tokens [start, start+len) share one adapter module at one site (attention
 * or FFN output). With o the sub-block's output and x the residual stream entering the sub-block:
 *   u(z) = scale ⊙ (up · act(down · LNb(z) + down_b) + up_b)        LNb = ln_before or identity
 *   sequential: a = o (+ x if IN_PLUS_X);  r = RES_INPUT ? a : o
 *               v = RES_BEFORE_LN ? LNa(u(a) + r) : LNa(u(a)) + r    LNa = ln_after or identity
 *               x' = v (+ x if ADD_X)
 *   parallel:   x' = o + LNa(u(x)) (+ x if ADD_X)
 * The op stores o ← x' − x, so the caller's usual x += o gives x'. LayerNorms are torch's
 * (biased variance, eps 1e-5). Pointers are backend pointers. */
typedef struct ds_bn_seg {
    int32_t start, len;
    int32_t size;                  /* bottleneck width (each adapter its own) */
    ds_act act;
    uint32_t flags;                /* DS_BN_* */
    float scale;                   /* scaling (a float, or the learned scalar) */
    const float *scale_vec;        /* [d] (scaling "channel"), or NULL */
    const float *down, *down_b;    /* [size][d], [size] */
    const float *up, *up_b;        /* [d][size], [d] */
    const float *ln_b_w, *ln_b_b;  /* ln_before [d] each, or NULL */
    const float *ln_a_w, *ln_a_b;  /* ln_after [d] each, or NULL */
} ds_bn_seg;

/* One sparse-delta segment (deltaserve's delta adapters: diff pruning, full fine-tunes extracted as
 * deltas): tokens [start, start+len) add x · δᵀ with δ [rows][cols] in CSR form:
 *   y[t][i] += Σ_{k in [row_ptr[i], row_ptr[i+1])} val[k] · x[t][col[k]]
 * Columns of a row are strictly ascending and < cols (the loader checked). Pointers are backend
 * pointers. */
typedef struct ds_sparse_seg {
    int32_t start, len;
    int32_t rows, cols;
    int64_t nnz;
    const int32_t *row_ptr; /* [rows + 1], row_ptr[0] = 0, row_ptr[rows] = nnz */
    const int32_t *col;     /* [nnz] */
    const float *val;       /* [nnz] */
} ds_sparse_seg;

/* The segment tables of one step (include/ds/plan.h builds them), host arrays. plan_upload()
 * takes them once per step; the segmented ops (lora, seg_scale, seg_add, bottleneck, sparse) then
 * name a range of one table instead of passing segments. */
typedef struct ds_seg_tables {
    const ds_lora_seg *lora;
    int32_t n_lora;
    const ds_vec_seg *vec;
    int32_t n_vec;
    const ds_bn_seg *bn;
    int32_t n_bn;
    const ds_sparse_seg *sparse;
    int32_t n_sparse;
} ds_seg_tables;

/* Entries [first, first + n) of one table of the last plan_upload(). */
typedef struct ds_seg_range {
    int32_t first, n;
} ds_seg_range;

struct ds_backend_iface {
    int version; /* DS_BACKEND_IFACE_VERSION */
    const char *name;
    void (*free)(void *ctx);

    /* Memory. alloc returns NULL on OOM; memory is zeroed. */
    void *(*alloc)(void *ctx, size_t bytes);
    void (*release)(void *ctx, void *ptr);
    int (*upload)(void *ctx, void *dst, const void *src, size_t bytes);
    int (*download)(void *ctx, void *dst, const void *src, size_t bytes);
    int (*synchronize)(void *ctx);

    /* Weights: a typed host matrix (any ds_dtype) → backend format. The host bytes must stay valid
     * for the lifetime of the mat if the backend borrows them (CPU). DS_EUNSUPPORTED for a dtype
     * the backend cannot take. */
    int (*mat_upload)(void *ctx, const ds_weight *host, ds_mat *out);
    void (*mat_free)(void *ctx, ds_mat *m);

    /* y[n][rows] = x[n][cols] · Wᵀ (+ bias[rows]); accumulate: y += instead of =. */
    int (*matmul)(void *ctx, const float *x, const ds_mat *w, const float *bias, float *y, int32_t n,
                  bool accumulate);
    /* dx[n][cols] = dy[n][rows] · W (+= when accumulate): the input gradient through a frozen
     * weight, for training. Optional: NULL → no training on this backend. */
    int (*matmul_t)(void *ctx, const float *dy, const ds_mat *w, float *dx, int32_t n, bool accumulate);
    /* out[t] = embd[ids[t]] for each token. */
    int (*embed)(void *ctx, const ds_mat *embd, const int32_t *ids, float *out, int32_t n);
    /* y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w  (fp32; HF order). */
    int (*rmsnorm)(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t d, float eps); /* x == y allowed */
    /* In place NeoX/rotate_half RoPE on x[n][n_head][head_dim] at positions pos[n]. */
    int (*rope)(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                int32_t head_dim);
    /* out[i] = silu(gate[i]) * up[i] */
    int (*silu_mul)(void *ctx, const float *gate, const float *up, float *out, size_t n);
    /* y[i] += x[i] */
    int (*add)(void *ctx, float *y, const float *x, size_t n);
    /* dst[i] = src[idx[i]] rows of width d (gather, e.g. logits rows). */
    int (*get_rows)(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d);
    /* Writes k[t], v[t] ([n][n_kv_head*head_dim]) at physical slots slot[t] of the layer pools. */
    int (*kv_store)(void *ctx, float *k_cache, float *v_cache, const float *k, const float *v,
                    const int64_t *slot, int32_t n, int32_t row);
    int (*attention)(void *ctx, const ds_attn_args *a);

    /* Plan/run: takes the step's segment tables before the first segmented op of the step. The
     * arrays are borrowed until the next plan_upload() (the CPU backend reads them in place; CUDA
     * packs its kernel metadata and copies it to the device here, once per step). Required when any
     * of lora, seg_scale, seg_add, bottleneck, sparse is set. Returns 0, DS_EINVAL (bad segment), DS_EDEVICE. */
    int (*plan_upload)(void *ctx, const ds_seg_tables *t);
    /* Segmented LoRA (SGMV): y[t][out] += scale·B·(A·x[t]) for the lora segments of r; x [n][in].
     * May be NULL (backend without adapter support). DS_EINVAL when r is outside the plan. */
    int (*lora)(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r);
    /* y[t][j] *= v[j] for t in each vec segment of r (DoRA magnitude, IA³). */
    int (*seg_scale)(void *ctx, float *y, int32_t width, ds_seg_range r);
    /* y[t][j] += alpha * v[j] for t in each vec segment of r (biases). */
    int (*seg_add)(void *ctx, float *y, int32_t width, ds_seg_range r);
    /* dst[rows[i]] = src[i] (width floats each): soft-prompt rows. rows and src are host arrays of
     * row indices and backend row pointers. */
    int (*set_rows)(void *ctx, float *dst, int32_t width, const int32_t *rows, const float *const *src, int32_t n);
    /* Backend-to-backend copy. */
    int (*copy)(void *ctx, void *dst, const void *src, size_t bytes);
    /* LoRA expand alone: y[n][out] += scale · t[n][rank] · B[out][rank]ᵀ (embedding LoRA, whose
     * shrink is a row gather). Optional: NULL → embedding LoRA unsupported on this backend. */
    int (*lora_expand)(void *ctx, const float *t, int32_t rank, const float *B, float *y, int32_t out, int32_t n,
                       float scale);

    /* Training ops (forward-with-saves, backward, loss, optimizer; ds/backend_train.h). Optional:
     * NULL → no training on this backend. */
    const struct ds_backend_train_iface *train;

    /* Segmented bottleneck adapters (AdapterHub): rewrites rows of o[n][d] in place per bn segment of
     * r as ds_bn_seg says, reading x[n][d]. Optional: NULL → resident copies of bottleneck adapters
     * are refused on this backend (ds_adapter_dev_upload). */
    int (*bottleneck)(void *ctx, const float *x, float *o, int32_t d, ds_seg_range r);

    /* Gemma 3's ops. Optional: NULL → ds_llama_create refuses a model that needs them on this backend. */
    /* x[i] *= s (scaled embeddings). */
    int (*scale)(void *ctx, float *x, float s, size_t n);
    /* out[i] = gelu_tanh(gate[i]) * up[i], torch's gelu(approximate="tanh") (GeGLU); out may alias gate. */
    int (*gelu_tanh_mul)(void *ctx, const float *gate, const float *up, float *out, size_t n);
    /* Segmented sparse deltas: y[t][out] += x[t][in] · δᵀ per sparse segment of r (ds_sparse_seg);
     * DS_EINVAL when r is outside the plan or a segment's shape is not [out][in]. Optional: NULL →
     * resident copies of sparse delta adapters are refused on this backend (ds_adapter_dev_upload). */
    int (*sparse)(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r);
};

typedef struct ds_backend {
    const struct ds_backend_iface *iface;
    void *ctx;
} ds_backend;

typedef struct ds_backend_params {
    int32_t n_threads; /* CPU: 0 → all cores; < 0 → the process's current OpenMP/OpenBLAS setting,
                        * left as it is (a second backend beside the engine's, e.g. the trainer's) */
    int32_t device;    /* CUDA device index */
    /* CPU: quantised weights (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) multiply int8-quantised
     * activations (llama.cpp's numerics, faster) instead of the exact fp32 ones (the default). */
    bool int8_activations;
} ds_backend_params;

ds_backend_params ds_backend_default_params(void);

/* Creates a backend by name: "cpu" (always), "cuda" (when built with DS_CUDA and a device is
 * present). Returns NULL with a message. */
ds_backend *ds_backend_create(const char *name, const ds_backend_params *params, ds_err *err);
void ds_backend_free(ds_backend *b);

/* The CPU backend (src/backend/cpu). */
ds_backend *ds_backend_cpu_create(const ds_backend_params *params, ds_err *err);

#ifdef __cplusplus
}
#endif
#endif
