/* deltaserve — the compute ops of training, over plain fp32 buffers (host memory in this slice).
 *
 * Each function is shaped like a ds_backend_iface slot (pointers + sizes, no allocation, no model
 * knowledge) so that it can move into the backend table as an optional training slot: the forward
 * ones mirror existing slots (matmul, rmsnorm, rope, silu_mul, lora, attention), the backward ones
 * are new. All matrices are row-major; weights are HF [out][in]. Every op is deterministic. */
#ifndef DS_TRAIN_OPS_H
#define DS_TRAIN_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- GEMM (cblas_sgemm) ---- */
/* y[n][m] = alpha · x[n][k] · W[m][k]ᵀ + beta · y   (forward through a [out][in] weight) */
void tr_mm_nt(const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float alpha, float beta);
/* dx[n][k] = alpha · dy[n][m] · W[m][k] + beta · dx  (input gradient through a frozen weight) */
void tr_mm_nn(const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k, float alpha, float beta);
/* dW[m][k] = alpha · dy[n][m]ᵀ · x[n][k] + beta · dW (weight gradient; used for adapter weights only) */
void tr_mm_tn(const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k, float alpha, float beta);
/* y[t][j] += b[j] */
void tr_add_bias(float *y, const float *b, int32_t n, int32_t m);

/* ---- RMSNorm (HF: fp32, x·rsqrt(mean(x²)+eps), then ·w) ---- */
/* y[t] = x[t]·r[t]·w, r[t] = 1/sqrt(mean(x[t]²) + eps) saved in rinv[t]. */
void tr_rmsnorm_fwd(const float *x, const float *w, float *y, float *rinv, int32_t n, int32_t d, float eps);
/* dx[t] += r·(w⊙dy) − x·(r³/d)·Σᵢ wᵢ·dyᵢ·xᵢ   (d/dx of x·r(x)·w) */
void tr_rmsnorm_bwd(const float *x, const float *w, const float *rinv, const float *dy, float *dx, int32_t n,
                    int32_t d);

/* ---- RoPE (rotate_half / NeoX, HF Llama) ---- */
/* In place on x[n][n_head][hd] at positions pos[n]; angle θ = pos·inv_freq[i] (fp32, as HF).
 * sign = +1: forward rotation; sign = -1: its transpose = the backward (rotation by −θ). */
void tr_rope(float *x, const int32_t *pos, const float *inv_freq, int32_t n, int32_t n_head, int32_t hd, int sign);

/* ---- SiLU-and-multiply (Llama MLP) ---- */
/* out = silu(g)·u */
void tr_silu_mul_fwd(const float *g, const float *u, float *out, size_t n);
/* silu'(g) = σ(g)·(1 + g·(1 − σ(g))): dg = dout·u·silu'(g), du = dout·silu(g) (overwrite) */
void tr_silu_mul_bwd(const float *g, const float *u, const float *dout, float *dg, float *du, size_t n);

/* ---- LoRA: y += s · B(A x) ---- */
/* u[n][r] = x·Aᵀ (saved for backward), y[n][out] += s · u·Bᵀ */
void tr_lora_fwd(const float *x, const float *A, const float *B, float s, float *u, float *y, int32_t n, int32_t in,
                 int32_t out, int32_t r);
/* dB += s·dyᵀu; t = s·dy·B; dA += tᵀx; dx += t·A (dx may be NULL: not needed). tmp: [n][r]. */
void tr_lora_bwd(const float *x, const float *u, const float *A, const float *B, float s, const float *dy, float *dx,
                 float *dA, float *dB, float *tmp, int32_t n, int32_t in, int32_t out, int32_t r);

/* ---- LoRA on the token embedding (PEFT lora_embedding_A/B): x[t] += s · B · A[:, tok] ---- */
/* A_T is A transposed, [V][r] (a row per token). u[t] = A_T[src[t]] (gathered, saved);
 * y[n][d] += s · u·Bᵀ. Soft rows (src < 0) get u = 0. */
void tr_embed_lora_fwd(const float *A_T, const float *B, float s, const int32_t *src, float *u, float *y, int32_t n,
                       int32_t d, int32_t r);
/* dB[d][r] += s·dyᵀu; dA_T[src[t]] += s·dy[t]·B (scatter-add by token). tmp: [n][r]. */
void tr_embed_lora_bwd(const float *B, float s, const int32_t *src, const float *u, const float *dy, float *dA_T,
                       float *dB, float *tmp, int32_t n, int32_t d, int32_t r);

/* ---- Embedding with soft rows ---- */
/* out[t] = src[t] >= 0 ? embd[src[t]] : soft[-src[t]-1]  (prompt-tuning virtual rows) */
void tr_embed(const float *embd, const float *soft, const int32_t *src, float *out, int32_t n, int32_t d);
/* dsoft[-src[t]-1] += dx[t] for the soft rows (the token table is frozen: no gradient) */
void tr_embed_bwd_soft(const int32_t *src, const float *dx, float *dsoft, int32_t n, int32_t d);

/* ---- Cross-entropy over label rows (HF ForCausalLMLoss, reduction sum·scale) ---- */
/* logits[n][V] in, overwritten by d(scale·Σ CE)/dlogits = scale·(softmax − onehot) when grad;
 * returns Σₜ (logsumexp(logits[t]) − logits[t][target[t]]) in double. */
double tr_cross_entropy(float *logits, const int32_t *target, int32_t n, int32_t V, float scale, bool grad);

/* ---- Causal attention with GQA and an optional shared prefix (prefix tuning) ---- */
/* Sequences are packed: sequence s owns rows [row0, row0+len). A query row i of it sees the
 * n_prefix prefix slots, then its own rows 0..i. Query head h reads KV head h / (n_head/n_kv). */
typedef struct tr_attn_seq {
    int32_t row0, len;
} tr_attn_seq;

typedef struct tr_attn_args {
    const float *q;          /* [rows][n_head·hd], RoPE applied */
    const float *k, *v;      /* [rows][n_kv·hd], RoPE applied to k */
    const float *pk, *pv;    /* prefix row p at pk + p·p_stride (width n_kv·hd), or NULL */
    size_t p_stride;
    int32_t n_prefix;
    float *out;              /* [rows][n_head·hd] */
    float *lse;              /* [rows][n_head] log-sum-exp of the scaled scores (saved by forward) */
    const tr_attn_seq *seqs;
    int32_t n_seqs, n_head, n_kv, hd;
    float scale;             /* 1/sqrt(hd) */
    float *work;             /* tr_attn_work_floats(max_len, n_prefix, hd) floats */
} tr_attn_args;

size_t tr_attn_work_floats(int32_t max_len, int32_t n_prefix, int32_t hd);
/* out = softmax(scale·q·kᵀ + causal mask)·v; saves lse. */
void tr_attention_fwd(const tr_attn_args *a);
/* From dout: dq (overwritten), dk, dv (ACCUMULATED: zero them first), dpk/dpv (accumulated into
 * rows p·p_stride; NULL when the prefix is frozen). Probabilities are recomputed from lse
 * (FlashAttention-style), so forward saves O(rows·heads), not O(rows²). */
void tr_attention_bwd(const tr_attn_args *a, const float *dout, float *dq, float *dk, float *dv, float *dpk,
                      float *dpv);

#endif
