/* deltaserve — the training ops of a backend: an optional table hung off ds_backend_iface.train.
 *
 * Same conventions as the inference ops (ds/backend.h): ctx first, every tensor pointer is a
 * BACKEND pointer, ops never allocate and return 0 or a negative DS_E*. All matrices are fp32,
 * row-major; weights are HF [out][in]. Forward ops save what their backward needs (rinv, u, lse);
 * backward ops take those saves. Frozen base weights are not passed here: the trainer multiplies
 * through them with the inference ops matmul / matmul_t on the model's typed ds_mat handles
 * (QLoRA-style: quantised bases stay quantised). Every op is deterministic. The CPU backend is the reference
 * (src/backend/cpu/cpu_train.c); a backend whose iface.train is NULL cannot train. */
#ifndef DS_BACKEND_TRAIN_H
#define DS_BACKEND_TRAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ds_mat;

#define DS_BACKEND_TRAIN_IFACE_VERSION 4 /* 3: bottleneck ops; 4: data movement */

/* Packed sequences for training attention: sequence s owns rows [row0, row0+len). */
typedef struct ds_train_attn_seq {
    int32_t row0, len;
} ds_train_attn_seq;

/* Causal GQA attention with an optional shared prefix (prefix tuning). A query row i of a
 * sequence sees the n_prefix prefix slots, then its own rows 0..i. Query head h reads KV head
 * h / (n_head/n_kv). seqs is a HOST array; the rest are backend pointers. */
typedef struct ds_train_attn_args {
    const float *q;          /* [rows][n_head·hd], RoPE applied */
    const float *k, *v;      /* [rows][n_kv·hd], RoPE applied to k */
    const float *pk, *pv;    /* prefix row p at pk + p·p_stride (width n_kv·hd), or NULL */
    size_t p_stride;
    int32_t n_prefix;
    float *out;              /* [rows][n_head·hd] */
    float *lse;              /* [rows][n_head] log-sum-exp of the scaled scores (saved by forward) */
    const ds_train_attn_seq *seqs;
    int32_t n_seqs, n_head, n_kv, hd;
    float scale;             /* 1/sqrt(hd) */
    float *work;             /* attn_work_floats(max_len, n_prefix, hd) floats */
} ds_train_attn_args;

/* One bottleneck adapter module for the training ops (AdapterHub's Adapter without LayerNorms):
 * U(z) = scale·(up·act(down·z + down_b) + up_b). act is a ds_act (ds/backend.h); the ops take
 * DS_ACT_IDENTITY, RELU, GELU, GELU_TANH, SILU and TANH, others DS_EUNSUPPORTED. */
typedef struct ds_train_bn_args {
    const float *down, *down_b; /* [size][d], [size] */
    const float *up, *up_b;     /* [d][size], [d] */
    float scale;
    int32_t act;
    int32_t n, d, size;         /* rows, d_model, bottleneck width */
} ds_train_bn_args;

/* One AdamW update (torch.optim.AdamW, single-tensor path); step is 1-based. */
typedef struct ds_adamw_args {
    float lr, beta1, beta2, eps, weight_decay;
    int64_t step;
} ds_adamw_args;

struct ds_backend_train_iface {
    int version; /* DS_BACKEND_TRAIN_IFACE_VERSION */

    /* ---- GEMM ---- */
    /* y[n][m] = alpha · x[n][k] · W[m][k]ᵀ + beta · y   (forward through a [out][in] weight) */
    int (*mm_nt)(void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float alpha,
                 float beta);
    /* dx[n][k] = alpha · dy[n][m] · W[m][k] + beta · dx  (input gradient through a frozen weight) */
    int (*mm_nn)(void *ctx, const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k, float alpha,
                 float beta);
    /* dW[m][k] = alpha · dy[n][m]ᵀ · x[n][k] + beta · dW  (weight gradient) */
    int (*mm_tn)(void *ctx, const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k, float alpha,
                 float beta);
    /* y[t][j] += b[j] */
    int (*add_bias)(void *ctx, float *y, const float *b, int32_t n, int32_t m);

    /* ---- RMSNorm (HF: x·rsqrt(mean(x²)+eps)·w) ---- */
    /* y[t] = x[t]·r[t]·w; r[t] = 1/sqrt(mean(x[t]²) + eps) saved in rinv[t]. */
    int (*rmsnorm_fwd)(void *ctx, const float *x, const float *w, float *y, float *rinv, int32_t n, int32_t d,
                       float eps);
    /* dx[t] += r·(w⊙dy) − x·(r³/d)·Σᵢ wᵢ·dyᵢ·xᵢ */
    int (*rmsnorm_bwd)(void *ctx, const float *x, const float *w, const float *rinv, const float *dy, float *dx,
                       int32_t n, int32_t d);

    /* ---- RoPE (rotate_half / NeoX) in place on x[n][n_head][hd] at positions pos[n] ----
     * sign = +1: forward rotation; sign = −1: its transpose, i.e. the backward. */
    int (*rope)(void *ctx, float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head,
                int32_t hd, int sign);

    /* ---- SiLU-and-multiply ---- */
    /* out = silu(g)·u */
    int (*silu_mul_fwd)(void *ctx, const float *g, const float *u, float *out, size_t n);
    /* dg = dout·u·silu'(g), du = dout·silu(g) (overwrite) */
    int (*silu_mul_bwd)(void *ctx, const float *g, const float *u, const float *dout, float *dg, float *du,
                        size_t n);

    /* ---- LoRA: y += s·B(A x) ---- */
    /* u[n][r] = x·Aᵀ (saved), y[n][out] += s·u·Bᵀ */
    int (*lora_fwd)(void *ctx, const float *x, const float *A, const float *B, float s, float *u, float *y, int32_t n,
                    int32_t in, int32_t out, int32_t r);
    /* dB += s·dyᵀu; t = s·dy·B; dA += tᵀx; dx += t·A (dx may be NULL). tmp: [n][r]. */
    int (*lora_bwd)(void *ctx, const float *x, const float *u, const float *A, const float *B, float s,
                    const float *dy, float *dx, float *dA, float *dB, float *tmp, int32_t n, int32_t in, int32_t out,
                    int32_t r);

    /* ---- Embedding with soft rows, and LoRA on the token embedding ---- */
    /* out[t] = src[t] >= 0 ? embd[src[t]] : soft[-src[t]-1]  (src: backend int32 array; embd: the
     * frozen typed table as a ds_mat of this backend, rows dequantised to fp32) */
    int (*embed)(void *ctx, const struct ds_mat *embd, const float *soft, const int32_t *src, float *out, int32_t n,
                 int32_t d);
    /* dsoft[-src[t]-1] += dx[t] for the soft rows (the token table is frozen) */
    int (*embed_bwd_soft)(void *ctx, const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d);
    /* A_T = Aᵀ [V][r]: u[t] = A_T[src[t]] (0 for soft rows; saved), y[n][d] += s·u·Bᵀ */
    int (*embed_lora_fwd)(void *ctx, const float *A_T, const float *B, float s, const int32_t *src, float *u,
                          float *y, int32_t n, int32_t d, int32_t r);
    /* dB[d][r] += s·dyᵀu; dA_T[src[t]] += s·dy[t]·B. tmp: [n][r]. */
    int (*embed_lora_bwd)(void *ctx, const float *B, float s, const int32_t *src, const float *u, const float *dy,
                          float *dA_T, float *dB, float *tmp, int32_t n, int32_t d, int32_t r);

    /* ---- Cross-entropy (HF ForCausalLMLoss, reduction sum·scale) ----
     * *loss (host) = Σₜ logsumexp(logits[t]) − logits[t][target[t]]; with grad, logits are
     * overwritten by scale·(softmax − onehot). target: backend int32 array. */
    int (*cross_entropy)(void *ctx, float *logits, const int32_t *target, int32_t n, int32_t V, float scale,
                         bool grad, double *loss);

    /* ---- Attention ---- */
    /* Floats of ds_train_attn_args.work for sequences up to max_len rows. */
    size_t (*attn_work_floats)(void *ctx, int32_t max_len, int32_t n_prefix, int32_t hd);
    /* out = softmax(scale·q·kᵀ + causal mask)·v; saves lse. */
    int (*attention_fwd)(void *ctx, const ds_train_attn_args *a);
    /* dq (overwritten), dk, dv (ACCUMULATED), dpk/dpv (accumulated; NULL: frozen prefix).
     * Probabilities are recomputed from lse (FlashAttention-style). */
    int (*attention_bwd)(void *ctx, const ds_train_attn_args *a, const float *dout, float *dq, float *dk, float *dv,
                         float *dpk, float *dpv);

    /* ---- Optimizer ---- */
    /* *out (host) += Σ x[i]² in double (global gradient norm, one tensor at a time) */
    int (*sumsq)(void *ctx, const float *x, size_t n, double *out);
    /* x[i] = (float)(x[i]·s) (gradient clipping) */
    int (*scale)(void *ctx, float *x, size_t n, double s);
    /* One AdamW step on one tensor: w, its gradient g and moments m, v ([n] each). */
    int (*adamw)(void *ctx, float *w, const float *g, float *m, float *v, size_t n, const ds_adamw_args *a);

    /* ---- Bottleneck adapters (src/backend/cpu/cpu_train_bn.c). Optional: NULL → bottleneck
     * adapters cannot be trained on this backend (ds_trainer_create: DS_EUNSUPPORTED). ---- */
    /* hpre[n][size] = z·downᵀ + down_b (saved for backward); y[n][d] += U(z). tmp: [n][size]. */
    int (*bn_fwd)(void *ctx, const ds_train_bn_args *a, const float *z, float *hpre, float *tmp, float *y);
    /* With G = dy [n][d]: dup_b += s·Σₜ G; dup += s·Gᵀ·act(hpre); dh = (s·G·up) ⊙ act'(hpre);
     * ddown_b += Σₜ dh; ddown += dhᵀ·z; dz = dh·down (overwritten). Gradients accumulate.
     * tmp: [2][n][size]. */
    int (*bn_bwd)(void *ctx, const ds_train_bn_args *a, const float *z, const float *hpre, const float *dy, float *dz,
                  float *ddown, float *ddown_b, float *dup, float *dup_b, float *tmp);
    /* ---- Data movement (version 4): what the trainer did with host memset / memcpy ---- */
    /* x[i] = v, i < n (clearing gradients and accumulators) */
    int (*fill)(void *ctx, float *x, size_t n, float v);
    /* dst[i] = src[idx[i]] for rows of d floats, i < n (the LM head's label rows). idx: backend
     * int32 array. */
    int (*gather_rows)(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d);
    /* dst[idx[i]] = src[i] for rows of d floats, i < n; the indices are distinct (overwrite). */
    int (*scatter_rows)(void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d);
};

#ifdef __cplusplus
}
#endif
#endif
